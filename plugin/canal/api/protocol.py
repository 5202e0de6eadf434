"""libnetwork's remote NetworkDriver and IpamDriver protocol: every request and response shape.

Docker's requests are untrusted input (a user picks `--subnet`, `--mac-address`, `-o` options;
anything on the socket can call us), so every request is parsed strictly here, at the edge,
into one dataclass per call with values already validated and normalised: IDs are exactly
Docker's formats, addresses are canonical IPv4 CIDRs, a MAC is a unicast MAC in lower case,
option maps hold only bounded JSON values. A bad value is a BadRequest naming the call and the
field, before any service, datastore record or kernel tool (iptables-restore and ipset read
newline-separated commands) sees it. Docker sends `null` for empty maps and lists; those become
empty values here so services never test for None.

`decode` turns the raw body into JSON with limits (nesting depth, number sizes) so a hostile
body costs a 400, never a RecursionError or a 500.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Type, TypeVar

from canal.errors import BadRequest
from canal.records import ENDPOINT_ID, NETWORK_ID, RecordError, mac_address
from canal.services.ports import PortRequest

CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"

MAX_BODY = 1 << 20  # bytes; Docker's largest request (CreateEndpoint with a port map) is far below
MAX_DEPTH = 32  # JSON nesting; Docker's deepest request is 4 levels
MAX_NUMBER_DIGITS = 20  # a JSON integer literal; int64 has 19 digits
MAX_STRING = 65536  # any string inside a request
MAX_KEY = 1024  # any option key
MAX_ITEMS = 65536  # entries of any one list or map (a port map of a big range is thousands)

T = TypeVar("T")

_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_IPV4_CIDR = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}/[0-9]{1,2}")
_IPV6_CIDR = re.compile(r"[0-9a-f:]{2,39}/[0-9]{1,3}")  # lower-case hex: canonical spelling only
_TOKEN = re.compile(r"[!-~]{1,256}")  # PoolID, AddressSpace: printable ASCII, no spaces
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class _Refused(Exception):
    """Internal: `problem` with the value at `path`; parse() adds the call name."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"field {path} {problem}")


def _show(value: Any) -> str:
    """A refused value for an error message: quoted, escaped (newlines stay visible), clipped."""
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."
    return _kind(value)


def _kind(value: Any) -> str:
    return type(value).__name__


# Field checks: (path, value) -> normalised value, or _Refused ------------------------------------


def _check_network_id(path: str, value: str) -> str:
    if not NETWORK_ID.fullmatch(value):
        raise _Refused(path, f"must be 64 lowercase hex digits (or a 25-character Swarm ID), got {_show(value)}")
    return value


def _check_endpoint_id(path: str, value: str) -> str:
    if not ENDPOINT_ID.fullmatch(value):
        raise _Refused(path, f"must be 64 lowercase hex digits, got {_show(value)}")
    return value


def _check_token(path: str, value: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise _Refused(path, f"must be at most 256 printable ASCII characters without spaces, got {_show(value)}")
    return value


def _check_space(path: str, value: str) -> str:
    return _check_token(path, value) if value else value


def _interface(value: str) -> ipaddress.IPv4Interface | None:
    """`a.b.c.d/len` in canonical spelling (no leading zeros, ASCII digits), else None."""
    if not _IPV4_CIDR.fullmatch(value):
        return None
    try:
        iface = ipaddress.IPv4Interface(value)
    except ValueError:
        return None
    return iface if str(iface) == value else None


def _interface6(value: str) -> ipaddress.IPv6Interface | None:
    """An IPv6 `addr/len` in canonical spelling (as Python and Go print it), else None: no zone,
    no IPv4-mapped form, nothing a later ip/ip6tables/ipset line could read otherwise."""
    if len(value) > 64 or not _IPV6_CIDR.fullmatch(value):
        return None
    try:
        iface = ipaddress.IPv6Interface(value)
    except ValueError:
        return None
    return iface if str(iface) == value and iface.ip.ipv4_mapped is None else None


def _not_v4(path: str, value: str, want: str) -> _Refused:
    if ":" in value and "\n" not in value and len(value) < 64:
        return _Refused(path, f"must be {want}, got {_show(value)}: IPv6 is not supported by canal")
    return _Refused(path, f"must be {want}, got {_show(value)}: not an IPv4 CIDR")


def _check_pool(path: str, value: str) -> str:
    """A network in canonical form (Docker's 0.0.0.0/0 included): what the pool record and the
    ipsets hold, so nothing else may pass."""
    iface = _interface(value)
    if iface is None:
        raise _not_v4(path, value, "an IPv4 network a.b.c.d/len")
    if str(iface.network) != value:
        raise _Refused(path, f"must be an IPv4 network, got {_show(value)} (host bits set; did you mean {iface.network}?)")
    return value


def _check_request_cidr(path: str, value: str) -> str:
    """RequestPool's Pool/SubPool: a CIDR or "". Host bits are left to IPAM, which explains them."""
    if value and ":" in value and _IPV6_CIDR.fullmatch(value.lower()) and len(value) <= 64:
        try:
            ipaddress.IPv6Interface(value)
            return value
        except ValueError:
            raise _Refused(path, f"must be an IPv6 CIDR, got {_show(value)}") from None
    if value and _interface(value) is None:
        raise _not_v4(path, value, "an IPv4 CIDR a.b.c.d/len or empty")
    return value


def _check_cidr_or_empty(path: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _Refused(path, f"must be a string, got {_kind(value)}")
    if value and _interface(value) is None:
        raise _not_v4(path, value, "an IPv4 CIDR a.b.c.d/len or empty")
    return value


def _check_ip(path: str, value: str) -> str:
    """A plain IPv4 address a.b.c.d (what Docker sends to RequestAddress/ReleaseAddress), a
    canonical IPv6 address (pools of --ipv6 networks), or ""."""
    if not value:
        return value
    if ":" in value:
        if _interface6(f"{value}/128") is None:
            raise _Refused(path, f"must be an IPv6 address in canonical form, got {_show(value)}")
        return value
    ok = bool(_IPV4.fullmatch(value))
    if ok:
        try:
            ok = str(ipaddress.IPv4Address(value)) == value
        except ValueError:
            ok = False
    if not ok:
        raise _Refused(path, f"must be an IPv4 address a.b.c.d, got {_show(value)}: not an IPv4 address")
    return value


def _check_string(path: str, value: Any, limit: int = MAX_STRING) -> str:
    if not isinstance(value, str):
        raise _Refused(path, f"must be a string, got {_kind(value)}")
    if len(value) > limit:
        raise _Refused(path, f"is longer than {limit} characters")
    if _CONTROL.search(value):
        raise _Refused(path, f"must not contain control characters, got {_show(value)}")
    return value


def _check_sandbox_key(path: str, value: str) -> str:
    _check_string(path, value, 4096)
    if value and not value.startswith("/"):
        raise _Refused(path, f"must be an absolute path, got {_show(value)}")
    return value


def _check_value(path: str, value: Any) -> Any:
    """Any JSON value inside an option map: bounded sizes (depth is bounded by decode)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) >= 1 << 63:
            raise _Refused(path, "is a number out of range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Refused(path, "must be a finite number")
        return value
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise _Refused(path, f"is longer than {MAX_STRING} characters")
        return value
    if isinstance(value, list):
        if len(value) > MAX_ITEMS:
            raise _Refused(path, f"has more than {MAX_ITEMS} entries")
        return [_check_value(f"{path}[{i}]", v) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return _check_map(path, value)
    raise _Refused(path, f"has an unsupported type {_kind(value)}")


def _check_map(path: str, value: dict) -> dict:
    if len(value) > MAX_ITEMS:
        raise _Refused(path, f"has more than {MAX_ITEMS} entries")
    out = {}
    for key, item in value.items():
        if not isinstance(key, str) or len(key) > MAX_KEY or _CONTROL.search(key):
            raise _Refused(path, f"has a key that is not a string of at most {MAX_KEY} printable characters: {_show(key)}")
        out[key] = _check_value(f"{path}.{key}" if len(key) <= 64 else f"{path}[...]", item)
    return out


def _ip_data(path: str, value: list, pool: Callable[[str, Any], str], gateway: Callable[[str, Any], str],
             aux: Callable[[str, Any], dict]) -> list:
    """IPv4Data/IPv6Data: what IPAM answered, echoed by Docker; each family checks its pools,
    gateways and aux addresses, the shape is shared."""
    if len(value) > 64:
        raise _Refused(path, "has more than 64 entries")
    out = []
    for i, entry in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(entry, dict):
            raise _Refused(where, f"must be an object, got {_kind(entry)}")
        space = entry.get("AddressSpace")
        space = "" if space is None else space
        if not isinstance(space, str):
            raise _Refused(f"{where}.AddressSpace", f"must be a string, got {_kind(space)}")
        _check_space(f"{where}.AddressSpace", space)
        gw = entry.get("Gateway")
        out.append({"AddressSpace": space, "Pool": pool(f"{where}.Pool", entry.get("Pool")),
                    "Gateway": gateway(f"{where}.Gateway", "" if gw is None else gw),
                    "AuxAddresses": aux(f"{where}.AuxAddresses", entry.get("AuxAddresses"))})
    return out


def _pool4(path: str, pool: Any) -> str:
    if pool is None:
        raise _Refused(path, "is missing")
    if not isinstance(pool, str):
        raise _Refused(path, f"must be a string, got {_kind(pool)}")
    return _check_pool(path, pool)


def _aux4(path: str, aux: Any) -> dict:
    aux = {} if aux is None else aux
    if not isinstance(aux, dict):
        raise _Refused(path, f"must be an object, got {_kind(aux)}")
    if len(aux) > 4096:
        raise _Refused(path, "has more than 4096 entries")
    checked = {}
    for name, address in aux.items():
        _check_string(path, name, 256)
        if not name:
            raise _Refused(path, "has an empty name")
        checked[name] = _check_cidr_or_empty(f"{path}.{name}", address)
        if not address:
            raise _Refused(f"{path}.{name}", "must be an IPv4 CIDR a.b.c.d/len, got ''")
    return checked


def _pool6(path: str, pool: Any) -> str:
    if not isinstance(pool, str):
        raise _Refused(path, f"must be an IPv6 network string, got {_kind(pool)}")
    iface = _interface6(pool)
    if iface is None or str(iface.network) != pool:
        raise _Refused(path, f"must be an IPv6 network in canonical form, got {_show(pool)}")
    return pool


def _gateway6(path: str, gateway: Any) -> str:
    if not isinstance(gateway, str) or (gateway and _interface6(gateway) is None):
        raise _Refused(path, f"must be an IPv6 CIDR or empty, got {_show(gateway)}")
    return gateway


def _aux6(path: str, aux: Any) -> dict:
    """Aux addresses of IPv6 pools only need to be bounded strings (nothing programs them)."""
    aux = _check_value(path, aux or {})
    if not isinstance(aux, dict):
        raise _Refused(path, f"must be an object, got {_kind(aux)}")
    return aux


def _check_ipv4_data(path: str, value: list) -> list:
    """IPv4Data: canonical pools and gateways only."""
    return _ip_data(path, value, _pool4, _check_cidr_or_empty, _aux4)


def _check_ipv6_data(path: str, value: list) -> list:
    """IPv6Data of an --ipv6 network: canonical IPv6 pools and gateways, ::/0 included."""
    return _ip_data(path, value, _pool6, _gateway6, _aux6)


def _check_swarm_ip_data(path: str, value: list) -> list:
    """AllocateNetwork's IPv4Data: Docker 20.10's Swarm allocator lists every pool of a swarm
    network there, the IPv6 one of an --ipv6 network too; each pool, gateway and aux address is
    checked as its own family's (the nodes' CreateNetwork then gets them split by family)."""
    def six(v: Any) -> bool:
        return isinstance(v, str) and ":" in v

    return _ip_data(
        path, value,
        lambda p, v: (_pool6 if six(v) else _pool4)(p, v),
        lambda p, v: (_gateway6 if six(v) else _check_cidr_or_empty)(p, v),
        lambda p, v: (_aux6 if isinstance(v, dict) and any(six(x) for x in v.values()) else _aux4)(p, v))


def _check_mac(path: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _Refused(path, f"must be a string, got {_kind(value)}")
    if not value:
        return value
    try:
        return mac_address(value)
    except RecordError:
        raise _Refused(path, f"must be a unicast MAC address aa:bb:cc:dd:ee:ff or empty, got {_show(value)}") from None


def _check_interface(path: str, value: dict) -> dict:
    address = value.get("Address")
    address = "" if address is None else address
    if not isinstance(address, str):
        raise _Refused(f"{path}.Address", f"must be a string, got {_kind(address)}")
    if address and _interface(address) is None:
        raise _Refused(f"{path}.Address", f"must be an IPv4 CIDR a.b.c.d/len or empty: bad address {_show(address)}")
    v6 = value.get("AddressIPv6")
    v6 = _check_string(f"{path}.AddressIPv6", "" if v6 is None else v6, 256)
    if v6 and _interface6(v6) is None:
        raise _Refused(f"{path}.AddressIPv6", f"must be an IPv6 CIDR addr/len or empty: bad address {_show(v6)}")
    mac = value.get("MacAddress")
    mac = _check_mac(f"{path}.MacAddress", "" if mac is None else mac)
    return {"Address": address, "AddressIPv6": v6, "MacAddress": mac}


def _check_discovery_type(path: str, value: int) -> int:
    if not 0 <= value < 1 << 31:
        raise _Refused(path, "is out of range")
    return value


def _field(default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING,
           check: Callable[[str, Any], Any] | None = None, required: bool = False) -> Any:
    metadata = {"required": required, "check": check}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    if default is not dataclasses.MISSING:
        return field(default=default, metadata=metadata)
    return field(metadata=metadata)


def _required(check: Callable[[str, Any], Any] | None = None) -> Any:
    return _field(check=check, required=True)


def _options() -> Any:
    return _field(factory=dict, check=_check_map)


PORTMAP = "com.docker.network.portmap"
_PROTO_NUMBERS = {6: "tcp", 17: "udp", 132: "sctp"}


def _check_port(path: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        raise _Refused(path, f"must be a port number {low}-65535, got {_show(value)}")
    return value


def _check_portmap(path: str, value: Any) -> list[PortRequest]:
    """Docker's PortBindings: [{Proto, IP, Port, HostIP, HostPort, HostPortEnd}], typed."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > 65535:
        raise _Refused(path, f"must be a list of port bindings, got {_kind(value)}")
    out = []
    for i, entry in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(entry, dict):
            raise _Refused(where, f"must be an object, got {_kind(entry)}")
        proto = entry.get("Proto")
        if isinstance(proto, bool) or proto not in _PROTO_NUMBERS:
            raise _Refused(f"{where}.Proto", f"must be 6 (tcp), 17 (udp) or 132 (sctp), got {_show(proto)}")
        host_ip = entry.get("HostIP") or ""
        if not isinstance(host_ip, str):
            raise _Refused(f"{where}.HostIP", f"must be a string, got {_kind(host_ip)}")
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
        try:
            address = ipaddress.ip_address(host_ip) if host_ip else None
        except ValueError:
            raise _Refused(f"{where}.HostIP", f"must be an IPv4 or IPv6 address or empty, got {_show(host_ip)}") from None
        if isinstance(address, ipaddress.IPv6Address) and (address.scope_id or address.ipv4_mapped
                                                            or address.is_link_local or address.is_multicast):
            raise _Refused(f"{where}.HostIP", f"must be a plain IPv6 address (no zone, IPv4-mapped, link-local "
                                              f"or multicast), got {_show(host_ip)}")
        if address is not None and address.version == 4 and address.is_unspecified:
            address = None  # 0.0.0.0: every address (IPv6 too on an --ipv6 network, as Docker's bridge)
        port = _check_port(f"{where}.Port", entry.get("Port"), 1)
        host_port = _check_port(f"{where}.HostPort", entry.get("HostPort", 0), 0)
        end = _check_port(f"{where}.HostPortEnd", entry.get("HostPortEnd", 0) or host_port, 0)
        if end < host_port:
            raise _Refused(f"{where}.HostPortEnd", f"{end} is below HostPort {host_port}")
        out.append(PortRequest(_PROTO_NUMBERS[proto], port, address, host_port, end))
    return out


def _check_connectivity(path: str, value: Any) -> dict:
    options = _check_map(path, value)
    return {**options, PORTMAP: _check_portmap(f"{path}.{PORTMAP}", options.get(PORTMAP))}


@dataclass(frozen=True)
class ExternalConnectivity:
    """ProgramExternalConnectivity / RevokeExternalConnectivity: Options carry the bindings."""

    NetworkID: str = _required(_check_network_id)
    EndpointID: str = _required(_check_endpoint_id)
    Options: dict = _field(factory=dict, check=_check_connectivity)

    @property
    def requests(self) -> list[PortRequest]:
        return list(self.Options.get(PORTMAP, []))


@dataclass(frozen=True)
class Empty:
    pass


# NetworkDriver ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateNetwork:
    NetworkID: str = _required(_check_network_id)
    Options: dict = _options()
    IPv4Data: list = _field(factory=list, check=_check_ipv4_data)  # normalised dicts, see above
    IPv6Data: list = _field(factory=list, check=_check_ipv6_data)


@dataclass(frozen=True)
class AllocateNetwork:
    NetworkID: str = _required(_check_network_id)
    Options: dict = _options()
    IPv4Data: list = _field(factory=list, check=_check_swarm_ip_data)
    IPv6Data: list = _field(factory=list, check=_check_ipv6_data)


@dataclass(frozen=True)
class NetworkRef:
    """DeleteNetwork, FreeNetwork."""

    NetworkID: str = _required(_check_network_id)


@dataclass(frozen=True)
class CreateEndpoint:
    NetworkID: str = _required(_check_network_id)
    EndpointID: str = _required(_check_endpoint_id)
    # {"Address": CIDR or "", "AddressIPv6": str, "MacAddress": lower-case MAC or ""}
    Interface: dict = _field(factory=dict, check=_check_interface)
    Options: dict = _options()


@dataclass(frozen=True)
class EndpointRef:
    """EndpointOperInfo, DeleteEndpoint, Leave, Program/RevokeExternalConnectivity."""

    NetworkID: str = _required(_check_network_id)
    EndpointID: str = _required(_check_endpoint_id)
    Options: dict = _options()


@dataclass(frozen=True)
class Join:
    NetworkID: str = _required(_check_network_id)
    EndpointID: str = _required(_check_endpoint_id)
    SandboxKey: str = _field(default="", check=_check_sandbox_key)
    Options: dict = _options()


@dataclass(frozen=True)
class Discovery:
    DiscoveryType: int = _field(default=0, check=_check_discovery_type)
    DiscoveryData: Any = _field(default=None, check=_check_value)


# IpamDriver ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestPool:
    AddressSpace: str = _field(default="", check=_check_space)
    Pool: str = _field(default="", check=_check_request_cidr)
    SubPool: str = _field(default="", check=_check_request_cidr)
    Options: dict = _options()
    V6: bool = False


@dataclass(frozen=True)
class ReleasePool:
    PoolID: str = _required(_check_token)


@dataclass(frozen=True)
class RequestAddress:
    PoolID: str = _required(_check_token)
    Address: str = _field(default="", check=_check_ip)
    Options: dict = _options()


@dataclass(frozen=True)
class ReleaseAddress:
    PoolID: str = _required(_check_token)
    Address: str = _required(_check_ip)


_TYPE_NAMES = {str: "a string", dict: "an object", list: "an array", bool: "a boolean", int: "a number"}


def parse(call: str, cls: Type[T], body: Any) -> T:
    """Validate Docker's JSON for `call` into `cls`; raise BadRequest naming the bad field.

    Unknown top-level fields are ignored: newer Docker versions add some, and nothing reads them.
    """
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise BadRequest(f"{call}: request body must be a JSON object")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        want = hints[f.name]
        value = body.get(f.name)
        if value is None:
            if f.metadata.get("required"):
                raise BadRequest(f"{call}: missing field {f.name}")
            continue
        if want is not Any and not _is(value, want):
            raise BadRequest(
                f"{call}: field {f.name} must be {_TYPE_NAMES.get(want, want.__name__)}, "
                f"got {type(value).__name__}"
            )
        if want is str and f.metadata.get("required") and not value:
            raise BadRequest(f"{call}: field {f.name} is empty")
        check = f.metadata.get("check")
        if check is not None:
            try:
                value = check(f.name, value)
            except _Refused as err:
                raise BadRequest(f"{call}: {err}") from None
        values[f.name] = value
    return cls(**values)


def _is(value: Any, want: type) -> bool:
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, want)


# Raw bodies -----------------------------------------------------------------------------------


class _TooLarge(Exception):
    pass


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise _TooLarge(f"a number with more than {MAX_NUMBER_DIGITS} digits")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > 64:
        raise _TooLarge("a number literal longer than 64 characters")
    value = float(text)
    if not math.isfinite(value):
        raise _TooLarge(f"a number out of range ({text[:20]})")
    return value


def _parse_constant(name: str) -> Any:
    raise _TooLarge(f"{name}, which is not JSON")


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """True if `value` nests lists/maps more than `limit` deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def decode(what: str, data: bytes) -> Any:
    """The JSON value of a request body (None for an empty one), within the limits above;
    BadRequest naming `what` otherwise. Never a RecursionError or a huge int."""
    if not data.strip():
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{what}: request body is not valid JSON (not UTF-8)") from None
    try:
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except _TooLarge as err:
        raise BadRequest(f"{what}: request body has {err}") from None
    except RecursionError:
        raise BadRequest(f"{what}: request body is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError:
        raise BadRequest(f"{what}: request body is not valid JSON") from None
    if too_deep(value):
        raise BadRequest(f"{what}: request body is nested deeper than {MAX_DEPTH} levels")
    return value


# Responses ----------------------------------------------------------------------------------


def activate() -> dict:
    return {"Implements": ["NetworkDriver", "IpamDriver"]}


def capabilities(scope: str) -> dict:
    return {"Scope": scope, "ConnectivityScope": scope}


def ipam_capabilities() -> dict:
    # State is persistent in the datastore, so Docker need not replay allocations at start;
    # replays are still answered idempotently where Docker sends them anyway.
    return {"RequiresMACAddress": False, "RequiresRequestReplay": False}


def address_spaces(local: str, global_: str) -> dict:
    return {"LocalDefaultAddressSpace": local, "GlobalDefaultAddressSpace": global_}


def pool(pool_id: str, cidr: str, data: dict) -> dict:
    return {"PoolID": pool_id, "Pool": cidr, "Data": data}


def address(cidr: str, data: dict) -> dict:
    return {"Address": cidr, "Data": data}


def join(src_name: str, dst_prefix: str, gateway: str, routes: Iterable[str] = (), gateway6: str = "") -> dict:
    """Calico's answer: a link-local gateway made reachable by a connected /32 route; then, for
    a container's further canal interfaces, the destinations that interface carries (RouteType
    0: via the gateway), in place before the container runs. gateway6: the host veth's IPv6
    link-local address (endpoints of --ipv6 networks), on-link by nature: no route needed."""
    static = [{"Destination": f"{gateway}/32", "RouteType": 1, "NextHop": ""}]
    static += [{"Destination": cidr, "RouteType": 0, "NextHop": gateway} for cidr in routes]
    answer = {
        "InterfaceName": {"SrcName": src_name, "DstPrefix": dst_prefix},
        "Gateway": gateway,
        "StaticRoutes": static,
        "DisableGatewayService": False,
    }
    if gateway6:
        answer["GatewayIPv6"] = gateway6
    return answer


def error(message: str) -> dict:
    return {"Err": message}
