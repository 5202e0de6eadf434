"""Typed records: where datastore JSON and Docker's identifiers become typed, validated values.

Every record the services write and the agent computes from passes through here. The
datastore is every host's trust root, yet any client with write access can put anything in
it: a record that does not parse raises RecordError naming the field, and the caller refuses
the request (services) or quarantines that one record (agent) — nothing unvalidated reaches
iptables-restore, ipset, interface names, logs or the policy compiler.

Serialised forms are the ones earlier versions wrote, so upgrades read old records.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
import sys
import types
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Optional, TypeVar

from canal.errors import BadRequest

__all__ = [
    "ANY_NET",
    "ANY_NET6",
    "GATEWAY6",
    "DEFAULT_GATEWAY",
    "GATEWAYS",
    "PROTOCOLS",
    "AddressRecord",
    "EndpointRecord",
    "HostRecord",
    "Lease",
    "NetworkRecord",
    "PoolRecord",
    "PortBinding",
    "RecordError",
    "RouteRecord",
    "endpoint_gateway",
    "endpoint_id",
    "hostname",
    "labels",
    "mac_address",
    "network_id",
    "network_name",
    "replace",
    "safe",
    "wg_key",
]

ANY_NET = "0.0.0.0/0"  # the pool of networks created without --subnet (see services.ipam)

ENDPOINT_ID = re.compile(r"[0-9a-f]{64}")
# libnetwork: 64 lowercase hex; Swarm (swarmkit identity.NewID): 25 lowercase base-36.
NETWORK_ID = re.compile(r"[0-9a-f]{64}|[0-9a-z]{25}")
_CONTAINER_ID = re.compile(r"[0-9a-f]{64}")
# A host name becomes a datastore key segment and a log field: no "/", no whitespace.
_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,252}")
# Docker's own pattern for network and container names (daemon/names).
_DOCKER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")
_MAC = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}")
_POOL_ID = re.compile(
    r"canal-default6?|canal-cluster|canal-pool:[0-9./]+(?::[0-9./]+)?|canal-pool6:[0-9a-f:/]+(?:\+[0-9a-f:/]+)?"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

MAX_LABELS = 512
MAX_LABEL_KEY = 255
MAX_LABEL_VALUE = 4096
MAX_OPTIONS = 64
MAX_OPTION_LEN = 1024
KINDS = ("endpoint", "gateway")


class RecordError(BadRequest):
    """A record or identifier failed validation; the message names the field, never echoes
    more than a short, escaped excerpt of the bad value."""


def safe(value: Any, limit: int = 60) -> str:
    """A short repr of untrusted input for messages and logs: escaped, cut, never multi-line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(what: str, value: Any, why: str) -> RecordError:
    return RecordError(f"{what} {safe(value)}: {why}")


T = TypeVar("T")


def _str(what: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(what, value, f"must be a string, not {type(value).__name__}")
    return value


def _pattern(what: str, value: Any, pattern: re.Pattern[str], expected: str) -> str:
    text = _str(what, value)
    if not pattern.fullmatch(text):
        raise _fail(what, value, f"expected {expected}")
    return text


def endpoint_id(value: Any, what: str = "endpoint ID") -> str:
    return _pattern(what, value, ENDPOINT_ID, "64 lowercase hex digits")


def _shared(text: str) -> str:
    """One copy of a value that many records repeat (network IDs, host names, label keys and
    values), or that many structures key by (an endpoint's ID): at 100,000 endpoints each
    repeated copy of them was ~40 MB. Interned strings are
    freed with their last user, so hostile values cannot pile up."""
    return sys.intern(str(text))


def network_id(value: Any, what: str = "network ID") -> str:
    return _shared(_pattern(what, value, NETWORK_ID, "64 lowercase hex digits (or Swarm's 25 base-36 characters)"))


def container_id(value: Any, what: str = "container ID") -> str:
    return _pattern(what, value, _CONTAINER_ID, "64 lowercase hex digits")


def hostname(value: Any, what: str = "host name") -> str:
    return _shared(_pattern(what, value, _HOSTNAME, "a host name ([A-Za-z0-9][A-Za-z0-9_.-]*, at most 253)"))


def network_name(value: Any, what: str = "network name") -> str:
    return _pattern(what, value, _DOCKER_NAME, "a Docker name ([A-Za-z0-9][A-Za-z0-9_.-]*)")


def container_name(value: Any, what: str = "container name") -> str:
    return _pattern(what, value.lstrip("/") if isinstance(value, str) else value, _DOCKER_NAME, "a Docker name")


def pool_id(value: Any, what: str = "pool ID") -> str:
    return _shared(_pattern(what, value, _POOL_ID, "canal-default[6], canal-cluster, canal-pool:CIDR[:CIDR] or canal-pool6:CIDR[+CIDR]"))


def mac_address(value: Any, what: str = "MAC address") -> str:
    """A unicast device MAC aa:bb:cc:dd:ee:ff, returned in lower case (as Docker and flannel
    write it): a multicast or all-zero one cannot be a veth's or a VTEP's address."""
    text = _str(what, value)
    if not _MAC.fullmatch(text):
        raise _fail(what, value, "expected six colon-separated hex bytes")
    mac = text.lower()
    if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        raise _fail(what, value, "expected a unicast MAC address")
    return mac


# A dotted quad as ipaddress accepts it (octets 0-255, no leading zeros), as a pattern (the
# ipset applier checks its members with it too).
IPV4_TEXT = r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(IPV4_TEXT)


def ipv4(value: Any, what: str = "address") -> ipaddress.IPv4Address:
    """Dotted quad, no leading zeros (what ipaddress accepts), parsed without ipaddress's
    per-octet Python: a restart parses every endpoint and address record of the cluster."""
    text = _str(what, value)
    if not _IPV4.fullmatch(text):
        raise _fail(what, value, "not an IPv4 address")
    return ipaddress.IPv4Address(socket.inet_aton(text))


def ipv6(value: Any, what: str = "address") -> ipaddress.IPv6Address:
    text = _str(what, value)
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        raise _fail(what, value, "not an IPv6 address") from None
    if address.scope_id is not None or address.ipv4_mapped is not None:
        raise _fail(what, value, "not a plain IPv6 address (zone or IPv4-mapped)")
    return address


def ip_address(value: Any, what: str = "address") -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """IPv4 or IPv6 (records shared by both families: addresses, pools)."""
    if isinstance(value, str) and ":" in value:
        return ipv6(value, what)
    return ipv4(value, what)


def ipv6_net(value: Any, what: str = "subnet") -> ipaddress.IPv6Network:
    text = _str(what, value)
    try:
        net = ipaddress.IPv6Network(text, strict=True)
    except ValueError as err:
        raise _fail(what, value, f"not an IPv6 CIDR ({err})") from None
    if net.network_address.scope_id is not None:
        raise _fail(what, value, "not a plain IPv6 CIDR (zone)")
    return net


def ip_net(value: Any, what: str = "subnet") -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if isinstance(value, str) and ":" in value:
        return ipv6_net(value, what)
    return ipv4_net(value, what)


DEFAULT_GATEWAY = ipaddress.IPv4Address("169.254.1.1")
# The host end of every veth has MAC ee:ee:ee:ee:ee:ee, hence this EUI-64 link-local address:
# a container's IPv6 default route goes via it (Calico's way), the host answering as a neighbour.
GATEWAY6 = ipaddress.IPv6Address("fe80::ecee:eeff:feee:eeee")
ANY_NET6 = "::/0"  # the IPv6 pool of networks created with --ipv6 but no IPv6 --subnet
GATEWAYS = tuple(ipaddress.IPv4Address(f"169.254.1.{n}") for n in range(1, 255))


def endpoint_gateway(value: Any, what: str = "gateway") -> ipaddress.IPv4Address:
    """A container's link-local next hop: one of 169.254.1.1-254 (the host veth carries it)."""
    address = ipv4(value, what)
    if address not in GATEWAYS:
        raise _fail(what, value, "must be one of 169.254.1.1-169.254.1.254")
    return address

_WG_KEY = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=")


def wg_key(value: Any, what: str = "WireGuard public key") -> str:
    """A WireGuard (Curve25519) key as `wg` prints it: base64 of 32 bytes, 44 characters. It
    reaches `wg`'s configuration text, so nothing else may pass (no newline, no `=` inside)."""
    return _pattern(what, value, _WG_KEY, "a WireGuard key (base64 of 32 bytes, 44 characters)")


def ipv4_net(value: Any, what: str = "subnet") -> ipaddress.IPv4Network:
    text = _str(what, value)
    try:
        return ipaddress.IPv4Network(text, strict=True)
    except ValueError as err:
        raise _fail(what, value, f"not an IPv4 CIDR ({err})") from None


def _bool(what: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(what, value, "must be true or false")
    return value


def _int(what: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _fail(what, value, f"must be a whole number from {lo} to {hi}")
    return value


def _time(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _fail(what, value, "must be a non-negative number of seconds")
    return float(value)


def labels(value: Any, what: str = "labels") -> dict[str, str]:
    """Container labels: string to string, printable keys, bounded — they feed selectors and logs."""
    if not isinstance(value, dict):
        raise _fail(what, value, "must be a map of strings")
    if len(value) > MAX_LABELS:
        raise _fail(what, f"{len(value)} labels", f"at most {MAX_LABELS} labels")
    out: dict[str, str] = {}
    for key, val in value.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_LABEL_KEY or _CONTROL.search(key):
            raise _fail(f"{what} key", key, f"must be 1-{MAX_LABEL_KEY} printable characters")
        if not isinstance(val, str) or len(val) > MAX_LABEL_VALUE or _CONTROL.search(val):
            raise _fail(f"{what} value of {safe(key)}", val, f"must be a string of at most {MAX_LABEL_VALUE} printable characters")
        out[_shared(key)] = _shared(val)
    return out


_NO_OPTIONS: Mapping[str, str] = types.MappingProxyType({})  # shared by every record without any


def options(value: Any, what: str = "options") -> Mapping[str, str]:
    """Docker's endpoint options we keep: string values only, bounded."""
    if not isinstance(value, dict) or len(value) > MAX_OPTIONS:
        raise _fail(what, value, f"must be a map of at most {MAX_OPTIONS} entries")
    out: dict[str, str] = {}
    for key, val in value.items():
        if not isinstance(key, str) or not isinstance(val, str):
            continue  # Docker's structured options (port maps, ...) are not stored
        if len(key) > MAX_OPTION_LEN or len(val) > MAX_OPTION_LEN or _CONTROL.search(key + val):
            raise _fail(f"{what} entry", key, f"at most {MAX_OPTION_LEN} printable characters")
        out[key] = val
    return out or _NO_OPTIONS


def _object(what: str, raw: Any) -> Mapping[str, Any]:
    if not isinstance(raw, dict):
        raise _fail(what, raw, "must be a JSON object")
    return raw


def _get(raw: Mapping[str, Any], name: str, parse: Callable[[str, Any], T], what: str, default: Any = ...) -> T:
    if name not in raw or raw[name] is None:
        if default is ...:
            raise RecordError(f"{what}: field {name} is missing")
        return default  # type: ignore[no-any-return]
    return parse(f"{what} field {name}", raw[name])


# Records ---------------------------------------------------------------------------------------


PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp"}  # Docker's Proto numbers -> names


@dataclass(frozen=True)
class PortBinding:
    """One published port: host_ip:host_port on this host -> the container's port."""

    proto: str  # tcp, udp or sctp
    port: int  # the container's
    host_port: int
    # None: every address of the host, IPv6 ones too when the container has an IPv6 address
    # (as Docker's bridge); an IPv6 address ("::": any) publishes over IPv6 only.
    host_ip: Optional[ipaddress.IPv4Address | ipaddress.IPv6Address] = None

    @classmethod
    def parse(cls, raw: Any, what: str = "port binding") -> "PortBinding":
        obj = _object(what, raw)
        proto = _get(obj, "proto", _str, what)
        if proto not in PROTOCOLS.values():
            raise _fail(f"{what} field proto", proto, "must be tcp, udp or sctp")
        host_ip = _get(obj, "host_ip", _str, what, "")
        return cls(
            proto=proto,
            port=_get(obj, "port", lambda w, v: _int(w, v, 1, 65535), what),
            host_port=_get(obj, "host_port", lambda w, v: _int(w, v, 1, 65535), what),
            host_ip=ip_address(host_ip, f"{what} host_ip") if host_ip else None,
        )

    def __lt__(self, other: "PortBinding") -> bool:
        """Sorted by protocol and ports, then host address (IPv4 before IPv6; an address of
        either family never compares with one of the other, nor with None)."""
        return self._key() < other._key()

    def _key(self) -> tuple[str, int, int, int, int]:
        ip = self.host_ip
        return (self.proto, self.port, self.host_port, 0 if ip is None else ip.version, int(ip) if ip is not None else 0)

    def to_json(self) -> dict[str, Any]:
        return {"proto": self.proto, "port": self.port, "host_port": self.host_port,
                "host_ip": str(self.host_ip) if self.host_ip else ""}

    def __str__(self) -> str:
        """As `docker port` prints it: 80/tcp -> 0.0.0.0:8080 (or [::]:8080)."""
        host = f"[{self.host_ip}]" if self.host_ip is not None and self.host_ip.version == 6 else self.host_ip or "0.0.0.0"
        return f"{self.port}/{self.proto} -> {host}:{self.host_port}"


@dataclass(frozen=True, slots=True)
class EndpointRecord:
    """One container interface anywhere in the cluster (`<prefix>/endpoints/<id>`)."""

    id: str
    network: str  # Docker network ID
    host: str
    ip: ipaddress.IPv4Address
    mac: str
    mtu: int
    joined: bool = False
    sandbox: str = ""
    options: Mapping[str, str] = field(default_factory=dict)
    created: float = 0.0
    labels: Optional[Mapping[str, str]] = None  # None: not learned from Docker yet
    container: str = ""
    container_name: str = ""
    # The container's next hop on this interface: distinct per canal interface of one sandbox
    # (169.254.1.N), so each gets its own connected /32 to it (see canal.agent.sandboxes).
    gateway: ipaddress.IPv4Address = DEFAULT_GATEWAY
    ports: tuple[PortBinding, ...] = ()  # published (ProgramExternalConnectivity), sorted
    ip6: Optional[ipaddress.IPv6Address] = None  # its /128 on a network created with --ipv6
    # Not fields of the record (eq, repr and replace() ignore them). Slots, not a __dict__:
    # 100,000 of these are held at once (the instance dicts were ~30 MB of them).
    ip_text: str = field(init=False, repr=False, compare=False)  # str(ip): every pass renders it
    compiled: Any = field(init=False, repr=False, compare=False, default=None)  # canal.agent.desired's cache

    def __post_init__(self) -> None:
        object.__setattr__(self, "ip_text", str(self.ip))

    @classmethod
    def parse(cls, raw: Any, key_id: str | None = None) -> "EndpointRecord":
        obj = _object("endpoint record", raw)
        what = "endpoint record"
        # Interned: the mirror files the record under this same string (one copy, not three).
        ep_id = _shared(_get(obj, "id", lambda w, v: endpoint_id(v, w), what))
        if key_id is not None and ep_id != key_id:
            raise RecordError(f"{what} {ep_id[:12]} is stored under another endpoint's key {safe(key_id)}")
        what = f"endpoint {ep_id[:12]}"
        sandbox = _get(obj, "sandbox", _str, what, "")
        if _CONTROL.search(sandbox) or len(sandbox) > 4096:
            raise _fail(f"{what} field sandbox", sandbox, "not a path")
        return cls(
            id=ep_id,
            network=_get(obj, "network", lambda w, v: network_id(v, w), what),
            host=_get(obj, "host", lambda w, v: hostname(v, w), what),
            ip=_get(obj, "ip", lambda w, v: ipv4(v, w), what),
            mac=_get(obj, "mac", lambda w, v: mac_address(v, w), what),
            mtu=_get(obj, "mtu", lambda w, v: _int(w, v, 68, 65535), what),
            joined=_get(obj, "joined", _bool, what, False),
            sandbox=sandbox,
            options=_get(obj, "options", lambda w, v: options(v, w), what, _NO_OPTIONS),
            created=_get(obj, "created", _time, what, 0.0),
            labels=_get(obj, "labels", lambda w, v: labels(v, w), what, None),
            container=_get(obj, "container", lambda w, v: container_id(v, w) if v else "", what, ""),
            container_name=_get(obj, "container_name", lambda w, v: container_name(v, w) if v else "", what, ""),
            gateway=_get(obj, "gateway", lambda w, v: endpoint_gateway(v, w), what, DEFAULT_GATEWAY),
            ports=_get(obj, "ports", lambda w, v: _ports(v, w), what, ()),
            ip6=_get(obj, "ip6", lambda w, v: ipv6(v, w) if v else None, what, None),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "network": self.network,
            "host": self.host,
            "ip": str(self.ip),
            "mac": self.mac,
            "mtu": self.mtu,
            "joined": self.joined,
            "sandbox": self.sandbox,
            "options": dict(self.options),
            "created": self.created,
        }
        if self.labels is not None:
            out["labels"] = dict(self.labels)
        if self.container:
            out["container"] = self.container
            out["container_name"] = self.container_name
        if self.gateway != DEFAULT_GATEWAY:
            out["gateway"] = str(self.gateway)
        if self.ports:
            out["ports"] = [b.to_json() for b in self.ports]
        if self.ip6 is not None:
            out["ip6"] = str(self.ip6)
        return out


@dataclass(frozen=True)
class NetworkRecord:
    """One host's view of a canal network (`<prefix>/networks/<host>/<id>`)."""

    id: str
    host: str
    pools: tuple[str, ...]  # IPv4 CIDRs (ANY_NET: no --subnet)
    internal: bool = False
    nat: bool = True
    mtu: int = 0  # 0: the host default
    name: str = ""  # logical name: learned from Docker, or -o network=NAME ("": not yet known)
    explicit_name: bool = False
    docker_ipam: bool = False  # addresses from Docker's default IPAM (one host only), not canal's
    encrypted: bool = False  # -o encrypted: its traffic between hosts only through WireGuard
    pools6: tuple[str, ...] = ()  # IPv6 CIDRs of a network created with --ipv6 (ANY_NET6: no v6 --subnet)

    @property
    def ipv6(self) -> bool:
        """Created with --ipv6: IPv6 is open on its endpoints' interfaces (else closed)."""
        return bool(self.pools6)

    @classmethod
    def parse(cls, raw: Any, key: str | None = None) -> "NetworkRecord":
        obj = _object("network record", raw)
        what = "network record"
        net_id = _get(obj, "id", lambda w, v: network_id(v, w), what)
        what = f"network {net_id[:12]}"
        host = _get(obj, "host", lambda w, v: hostname(v, w), what)
        if key is not None and key != f"{host}/{net_id}":
            raise RecordError(f"{what} of host {host} is stored under another key {safe(key)}")
        pools = _get(obj, "pools", _list, what)
        return cls(
            id=net_id,
            host=host,
            pools=tuple(str(ipv4_net(p, f"{what} pool")) for p in pools),
            internal=_get(obj, "internal", _bool, what, False),
            nat=_get(obj, "nat", _bool, what, True),
            mtu=_get(obj, "mtu", lambda w, v: _int(w, v, 0, 65535), what, 0),
            name=_get(obj, "name", lambda w, v: network_name(v, w) if v else "", what, ""),
            explicit_name=_get(obj, "explicit_name", _bool, what, False),
            docker_ipam=_get(obj, "docker_ipam", _bool, what, False),
            pools6=tuple(str(ipv6_net(p, f"{what} IPv6 pool")) for p in _get(obj, "pools6", _list, what, [])),
            encrypted=_get(obj, "encrypted", _bool, what, False),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "host": self.host,
            "pools": list(self.pools),
            "internal": self.internal,
            "nat": self.nat,
            "mtu": self.mtu,
            "name": self.name,
            "explicit_name": self.explicit_name,
        }
        if self.docker_ipam:
            out["docker_ipam"] = True
        if self.pools6:
            out["pools6"] = list(self.pools6)
        if self.encrypted:
            out["encrypted"] = True
        return out

    @property
    def logical_name(self) -> str:
        return self.name or self.id


def _ports(value: Any, what: str) -> tuple[PortBinding, ...]:
    items = _list(what, value)
    if len(items) > 65535:
        raise _fail(what, f"{len(items)} bindings", "too many")
    return tuple(sorted(PortBinding.parse(item, f"{what} entry") for item in items))


def _list(what: str, value: Any) -> list[Any]:
    if not isinstance(value, list) or len(value) > 64:
        raise _fail(what, value, "must be a list of at most 64 entries")
    return value


@dataclass(frozen=True)
class AddressRecord:
    """One allocated address (`<prefix>/ipam/addresses/<hex>`): unique cluster-wide."""

    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    pool: str
    kind: str  # "endpoint" or "gateway"
    host: str
    endpoint: str = ""  # bound endpoint ID ("" until CreateEndpoint)
    network: str = ""
    time: int = 0

    @classmethod
    def parse(cls, raw: Any, key_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None) -> "AddressRecord":
        obj = _object("address record", raw)
        what = "address record"
        ip = _get(obj, "ip", lambda w, v: ip_address(v, w), what)
        if key_ip is not None and ip != key_ip:
            raise RecordError(f"{what} {ip} is stored under the key of {key_ip}")
        what = f"address {ip}"
        kind = _get(obj, "kind", _str, what)
        if kind not in KINDS:
            raise _fail(f"{what} field kind", kind, "must be endpoint or gateway")
        return cls(
            ip=ip,
            pool=_get(obj, "pool", lambda w, v: pool_id(v, w), what),
            kind=kind,
            host=_get(obj, "host", lambda w, v: hostname(v, w), what),
            endpoint=_get(obj, "endpoint", lambda w, v: endpoint_id(v, w) if v else "", what, ""),
            network=_get(obj, "network", lambda w, v: network_id(v, w) if v else "", what, ""),
            time=int(_get(obj, "time", _time, what, 0)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "ip": str(self.ip),
            "pool": self.pool,
            "kind": self.kind,
            "host": self.host,
            "endpoint": self.endpoint,
            "network": self.network,
            "time": self.time,
        }


@dataclass(frozen=True)
class PoolRecord:
    """A --subnet pool (`<prefix>/ipam/pools/<cidr>`), shared by every network using it."""

    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network
    gateway: str = ""  # the gateway address, "" if none was requested
    shared: bool = False  # a Swarm pool: the manager allocates, nodes claim

    @classmethod
    def parse(cls, raw: Any) -> "PoolRecord":
        obj = _object("pool record", raw)
        cidr = _get(obj, "cidr", lambda w, v: ip_net(v, w), "pool record")
        what = f"pool {cidr}"
        parse_ip = ipv4 if cidr.version == 4 else ipv6
        gateway = _get(obj, "gateway", lambda w, v: str(parse_ip(v, w)) if v else "", what, "")
        return cls(cidr, gateway, _get(obj, "shared", _bool, what, False))

    def to_json(self) -> dict[str, Any]:
        return {"cidr": str(self.cidr), "gateway": self.gateway, "shared": self.shared}


@dataclass(frozen=True)
class RouteRecord:
    """A /32 of a host outside its own subnet (`<prefix>/routes/<hex>`), routed to it by peers;
    or the /128 of an endpoint of an --ipv6 network (every one: IPv6 has no host subnets yet)."""

    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    host: str
    subnet: ipaddress.IPv4Network  # the owner's subnet: peers route via its VTEP (<subnet>.0)

    @classmethod
    def parse(cls, raw: Any, key_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None) -> "RouteRecord":
        obj = _object("route record", raw)
        ip = _get(obj, "ip", lambda w, v: ip_address(v, w), "route record")
        if key_ip is not None and ip != key_ip:
            raise RecordError(f"route record {ip} is stored under the key of {key_ip}")
        what = f"route {ip}"
        return cls(
            ip,
            _get(obj, "host", lambda w, v: hostname(v, w), what),
            _get(obj, "subnet", lambda w, v: ipv4_net(v, w), what),
        )

    def to_json(self) -> dict[str, Any]:
        return {"ip": str(self.ip), "host": self.host, "subnet": str(self.subnet)}


@dataclass(frozen=True)
class HostRecord:
    """One host's identity (`<prefix>/hosts/<name>`): its VTEP MAC (kept across restarts, as
    flanneld keeps it), last subnet, underlay address and last lease renewal."""

    name: str
    vtep_mac: str
    subnet: Optional[ipaddress.IPv4Network] = None
    public_ip: str = ""  # "" in records of versions before identities were checked
    renewed: float = 0.0  # wall-clock time of the last lease renewal (host collection)

    @classmethod
    def parse(cls, raw: Any, name: str) -> "HostRecord":
        obj = _object("host record", raw)
        what = f"host {name}"
        return cls(
            name=hostname(name),
            vtep_mac=_get(obj, "vtep_mac", lambda w, v: mac_address(v, w), what),
            subnet=_get(obj, "subnet", lambda w, v: ipv4_net(v, w) if v else None, what, None),
            public_ip=_get(obj, "public_ip", lambda w, v: str(ipv4(v, w)) if v else "", what, ""),
            renewed=_get(obj, "renewed", _time, what, 0.0),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "vtep_mac": self.vtep_mac,
            "subnet": str(self.subnet) if self.subnet else "",
            "public_ip": self.public_ip,
            "renewed": self.renewed,
        }


@dataclass(frozen=True)
class Lease:
    """A host's subnet lease in flannel's schema (`/coreos.com/network/subnets/<a.b.c.d-len>`)."""

    subnet: ipaddress.IPv4Network
    public_ip: str
    vtep_mac: str  # "" for backends without a VTEP
    lease_id: int = 0  # datastore lease; 0 for a reservation (never expires)
    backend_type: str = "vxlan"
    # WireGuard: the host's public key and listen port (flannel's wireguard BackendData; Canal
    # hosts of other backends add them to theirs for encrypted networks). "": no key (yet).
    public_key: str = ""
    wg_port: int = 0  # 0: the listener's own port (flannel's rule)
    # flannel's dual stack (EnableIPv6): the key's `&<v6 subnet>`, PublicIPv6, BackendV6Data
    subnet6: Optional[ipaddress.IPv6Network] = None
    public_ip6: str = ""
    vtep_mac6: str = ""
    # BackendV6Data.PublicKey: flanneld's dual-stack wireguard hosts write the same key as
    # BackendData's (Mode "auto", one device) or another one (Mode "separate", flannel-wg-v6).
    public_key6: str = ""

    @property
    def name(self) -> str:
        """Its key under `<prefix>/subnets/` (flannel's MakeSubnetKey)."""
        return lease_name(self.subnet, self.subnet6)

    @classmethod
    def parse(cls, name: str, raw: Any, lease_id: int = 0) -> "Lease":
        subnet, subnet6 = lease_key(name)
        obj = _object(f"flannel lease {subnet}", raw)
        what = f"flannel lease {subnet}"
        public_ip = str(_get(obj, "PublicIP", lambda w, v: ipv4(v, w), what))
        backend_type = _get(obj, "BackendType", _str, what, "vxlan")
        if not re.fullmatch(r"[a-z0-9-]{1,32}", backend_type):
            raise _fail(f"{what} field BackendType", backend_type, "not a backend name")
        data = _get(obj, "BackendData", lambda w, v: _object(w, v), what, {})
        mac = data.get("VtepMAC")
        # Absent in a reservation until its host fills it in: such a peer gets no tunnel yet.
        vtep_mac = mac_address(mac, f"{what} VtepMAC") if mac else ""
        public_key = _get(data, "PublicKey", lambda w, v: wg_key(v, w), what, "")
        wg_port = _get(data, "Port", lambda w, v: _int(w, v, 0, 65535), what, 0) if public_key else 0
        public_ip6 = _get(obj, "PublicIPv6", lambda w, v: str(ipv6(v, w)) if v else "", what, "")
        data6 = _get(obj, "BackendV6Data", lambda w, v: _object(w, v), what, {})
        mac6 = data6.get("VtepMAC")
        vtep_mac6 = mac_address(mac6, f"{what} BackendV6Data VtepMAC") if mac6 else ""
        public_key6 = _get(data6, "PublicKey", lambda w, v: wg_key(v, w), f"{what} BackendV6Data", "")
        return cls(subnet, public_ip, vtep_mac, lease_id, backend_type, public_key, wg_port,
                   subnet6=subnet6, public_ip6=public_ip6, vtep_mac6=vtep_mac6, public_key6=public_key6)


_LEASE_KEY = re.compile(r"([0-9]{1,3}(?:\.[0-9]{1,3}){3})-([0-9]{1,2})(?:&([0-9a-f:]{2,39})-([0-9]{1,3}))?")


def lease_key(name: str) -> tuple[ipaddress.IPv4Network, Optional[ipaddress.IPv6Network]]:
    """A flannel lease key: `a.b.c.d-len`, or in dual stack `a.b.c.d-len&<v6 address>-len`
    (flannel's MakeSubnetKey: the IPv6 address keeps its colons)."""
    match = _LEASE_KEY.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise _fail("flannel lease key", name, "expected a.b.c.d-len or a.b.c.d-len&<IPv6 address>-len")
    subnet = ipv4_net(f"{match[1]}/{match[2]}", "flannel lease key")
    subnet6 = ipv6_net(f"{match[3]}/{match[4]}", "flannel lease key IPv6 subnet") if match[3] else None
    return subnet, subnet6


def lease_name(subnet: ipaddress.IPv4Network, subnet6: Optional[ipaddress.IPv6Network] = None) -> str:
    """The inverse of lease_key: flannel's MakeSubnetKey (`a.b.c.d-len`, plus `&<v6 address>-len`
    in dual stack; Go prints the IPv6 address compressed, as Python's `compressed`)."""
    name = f"{subnet.network_address}-{subnet.prefixlen}"
    if subnet6 is not None:
        name += f"&{subnet6.network_address.compressed}-{subnet6.prefixlen}"
    return name


# Whole datastore entries: (key relative to the record's directory, JSON value) -> record. One
# parser per directory, used by every reader (the mirror caches by it): the key a record is
# stored under must agree with the record, so no record can claim another one's slot.


def _key_ip(key: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """8 hex digits: an IPv4 address; 32: an IPv6 one (see canal.datastore.keys)."""
    if re.fullmatch(r"[0-9a-f]{32}", key):
        return ipaddress.IPv6Address(int(key, 16))
    if not re.fullmatch(r"[0-9a-f]{8}", key):
        raise RecordError(f"{what} key {safe(key)} is not 8 (IPv4) or 32 (IPv6) hex digits")
    return ipaddress.IPv4Address(int(key, 16))


def endpoint_entry(key: str, raw: Any) -> EndpointRecord:
    return EndpointRecord.parse(raw, key)


def network_entry(key: str, raw: Any) -> NetworkRecord:
    return NetworkRecord.parse(raw, key)


def address_entry(key: str, raw: Any) -> AddressRecord:
    return AddressRecord.parse(raw, _key_ip(key, "address"))


def route_entry(key: str, raw: Any) -> RouteRecord:
    return RouteRecord.parse(raw, _key_ip(key, "route"))


def pool_entry(key: str, raw: Any) -> PoolRecord:
    record = PoolRecord.parse(raw)
    if key != str(record.cidr).replace("/", "-"):
        raise RecordError(f"pool {record.cidr} is stored under another key {safe(key)}")
    return record


def host_entry(name: str, raw: Any) -> HostRecord:
    return HostRecord.parse(raw, name)


def lease_entry(name: str, raw: Any) -> Lease:
    return Lease.parse(name, raw)
