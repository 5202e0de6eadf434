"""Networks and endpoints: the records Docker's driver calls create, and their kernel side.

Handlers record intent in the datastore first and program the kernel second, so a crash in
between leaves a record the reconcile loop completes or cleans up, never an orphan nobody
knows about.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from canal.datastore.base import Datastore, Delete, Entry, Guard, Put, dumps
from canal.datastore.keys import Keys
from canal.dataplane.links import EndpointLink, Links, host_ifname, peer_ifname
from canal.errors import BadRequest, Conflict, NotFound
from canal.records import (
    DEFAULT_GATEWAY,
    GATEWAY6,
    AddressRecord,
    EndpointRecord,
    NetworkRecord,
    RecordError,
    mac_address,
    replace,
)
from canal.records import options as endpoint_options
from canal.services.ipam import GLOBAL_SPACE, LOCAL_SPACE, Ipam

if TYPE_CHECKING:  # handlers translate wire to domain types; no import of the API at run time
    from canal.api.protocol import CreateEndpoint, CreateNetwork

log = logging.getLogger(__name__)

GENERIC = "com.docker.network.generic"
INTERNAL = "com.docker.network.internal"
ENABLE_IPV6 = "com.docker.network.enable_ipv6"

# -o options a canal network accepts; Docker's standard MTU key is accepted as an alias.
OPTION_ALIASES = {
    "nat": "nat",
    "canal.nat": "nat",
    "mtu": "mtu",
    "com.docker.network.driver.mtu": "mtu",
    "network": "name",
    "canal.network": "name",
    "encrypted": "encrypted",  # Docker's overlay option name: `--opt encrypted` (no value) or =true
}
NETWORK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def _bool(name: str, value: Any) -> bool:
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise BadRequest(f"option {name}={value!r}: expected true or false")


@dataclass(frozen=True)
class NetworkSpec:
    """A network's settings, parsed from CreateNetwork; the record stored for it."""

    id: str
    pools: tuple[str, ...]
    internal: bool
    nat: bool
    mtu: int  # 0: the host default
    name: str = ""  # the logical network name given with -o network=NAME ("": learn Docker's)
    docker_ipam: bool = False  # addresses from Docker's default IPAM (embedded datastore only)
    encrypted: bool = False  # traffic between hosts only through WireGuard
    pools6: tuple[str, ...] = ()  # --ipv6: its IPv6 pools

    def record(self, host: str) -> NetworkRecord:
        return NetworkRecord(
            id=self.id, host=host, pools=self.pools, internal=self.internal, nat=self.nat,
            mtu=self.mtu, name=self.name, explicit_name=bool(self.name), docker_ipam=self.docker_ipam,
            encrypted=self.encrypted,
            pools6=self.pools6,
        )


DOCKER_SPACES = ("LocalDefault", "GlobalDefault")  # Docker's default IPAM driver's address spaces


def parse_network(req: "CreateNetwork", docker_ipam_allowed: bool = False) -> NetworkSpec:
    """docker_ipam_allowed: a single host (embedded datastore), where Docker's own per-host IPAM
    cannot hand one address to two containers; across hosts it would, so canal's is required."""
    options = req.Options
    generic = options.get(GENERIC) or {}
    if not isinstance(generic, dict):
        raise BadRequest(f"CreateNetwork: {GENERIC} must be an object")
    settings: dict[str, Any] = {"nat": True, "mtu": 0, "name": "", "encrypted": False}
    for name, value in generic.items():
        key = OPTION_ALIASES.get(name)
        if key is None:
            known = ", ".join(sorted(set(OPTION_ALIASES)))
            raise BadRequest(f"unknown option {name!r} for a canal network; known options: {known}")
        if key == "nat":
            settings["nat"] = _bool(name, value)
        elif key == "encrypted":
            settings["encrypted"] = value == "" or _bool(name, value)
        elif key == "name":
            if not isinstance(value, str) or not NETWORK_NAME.fullmatch(value):
                raise BadRequest(f"option {name}={value!r}: a network name is [A-Za-z0-9][A-Za-z0-9_.-]*")
            settings["name"] = value
        else:
            try:
                mtu = int(value)
            except (TypeError, ValueError):
                raise BadRequest(f"option {name}={value!r}: expected a number") from None
            if not 576 <= mtu <= 65535:
                raise BadRequest(f"option {name}={mtu}: MTU must be between 576 and 65535")
            settings["mtu"] = mtu
    pools = []
    spaces = set()
    for data in req.IPv4Data:
        if not isinstance(data, dict):
            raise BadRequest("CreateNetwork: IPv4Data entries must be objects")
        space = data.get("AddressSpace", "")
        spaces.add(space)
        if space in DOCKER_SPACES and not docker_ipam_allowed:
            raise BadRequest(
                "with --datastore etcd, Docker's own IPAM would give containers on different hosts the "
                "same addresses: create the network with --ipam-driver canal"
            )
        if space not in (LOCAL_SPACE, GLOBAL_SPACE, *DOCKER_SPACES):
            raise BadRequest(
                f"address space {space!r} is not canal's: create the network with --ipam-driver canal"
            )
        try:
            if not isinstance(data.get("Pool"), str):
                raise TypeError
            pool = str(ipaddress.IPv4Network(data["Pool"], strict=True))
        except (TypeError, ValueError):
            raise BadRequest(f"CreateNetwork: IPv4Data pool {data.get('Pool')!r:.60} is not an IPv4 CIDR") from None
        pools.append(pool)
    if not pools:
        raise BadRequest("CreateNetwork: no IPv4 pool; create the network with --ipam-driver canal")
    docker_ipam = bool(spaces & set(DOCKER_SPACES))
    if docker_ipam and len(spaces) > 1:
        raise BadRequest("CreateNetwork: pools of canal's IPAM and Docker's in one network")
    internal = _bool(INTERNAL, options.get(INTERNAL, False))
    nat = settings["nat"] and not internal
    pools6 = _pools6(req.IPv6Data, _bool(ENABLE_IPV6, options.get(ENABLE_IPV6, False)), docker_ipam)
    return NetworkSpec(req.NetworkID, tuple(pools), internal, nat, settings["mtu"], settings["name"], docker_ipam,
                       settings["encrypted"], pools6)


def _pools6(data: list, enabled: bool, docker_ipam: bool) -> tuple[str, ...]:
    """The IPv6 pools of an --ipv6 network (from canal IPAM: Docker's would hand out the same
    addresses on several hosts, and canal's records are what policy and routes trust)."""
    if not data:
        if enabled:
            raise BadRequest("CreateNetwork: --ipv6 without an IPv6 pool; create the network with --ipam-driver canal")
        return ()
    if docker_ipam:
        raise BadRequest("CreateNetwork: --ipv6 needs --ipam-driver canal (Docker's IPAM only serves IPv4 here)")
    pools = []
    for entry in data:  # shape checked by the API layer
        if entry.get("AddressSpace") not in (LOCAL_SPACE, GLOBAL_SPACE):
            raise BadRequest(
                f"IPv6 address space {entry.get('AddressSpace')!r} is not canal's: create the network with --ipam-driver canal"
            )
        try:
            pools.append(str(ipaddress.IPv6Network(entry["Pool"], strict=True)))
        except (TypeError, ValueError, KeyError):
            raise BadRequest(f"CreateNetwork: IPv6Data pool {entry.get('Pool')!r:.60} is not an IPv6 CIDR") from None
    return tuple(pools)


def _address6(endpoint_id: str, network: NetworkRecord, address: str) -> ipaddress.IPv6Address | None:
    """CreateEndpoint's AddressIPv6 (shape checked by the API layer): only on an --ipv6 network."""
    if not address:
        return None
    if not network.ipv6:
        raise BadRequest(f"endpoint {endpoint_id[:12]}: IPv6 address {address!r:.60} on network "
                         f"{network.id[:12]}, which was not created with --ipv6")
    try:
        return ipaddress.IPv6Interface(address).ip
    except ValueError:
        raise BadRequest(f"endpoint {endpoint_id[:12]}: bad IPv6 address {address!r:.60}") from None


def container_mac(ip: ipaddress.IPv4Address) -> str:
    """Docker's own scheme (02:42 + the IPv4 bytes): stable, unique where the IP is."""
    return "02:42:" + ":".join(f"{b:02x}" for b in ip.packed)


@dataclass(frozen=True)
class JoinResult:
    """What Join answers, in domain terms; the API layer writes Docker's JSON for it."""

    src_name: str
    dst_prefix: str
    gateway: str
    routes: tuple[ipaddress.IPv4Network, ...] = ()  # destinations via `gateway` (several canal networks)
    gateway6: str = ""  # the host veth's link-local address: endpoints with an IPv6 address


class SandboxRouting(Protocol):
    """Routing inside a container with several canal interfaces (canal.agent.sandboxes)."""

    def gateway(self, key: str, record: EndpointRecord) -> ipaddress.IPv4Address: ...

    def routes(self, record: EndpointRecord) -> tuple[ipaddress.IPv4Network, ...]: ...


class SingleInterface:
    """Routing without access to sandboxes: every interface gets the one gateway."""

    def gateway(self, key: str, record: EndpointRecord) -> ipaddress.IPv4Address:
        return DEFAULT_GATEWAY

    def routes(self, record: EndpointRecord) -> tuple[ipaddress.IPv4Network, ...]:
        return ()


def _parse(entry: Entry | None, parse: Callable[[Any], Any]) -> Any:
    """A stored record, typed; a malformed one is a Conflict naming its key, never a 500."""
    if entry is None:
        return None
    try:
        return parse(json.loads(entry.value))
    except (ValueError, RecordError) as err:
        raise Conflict(f"datastore record {entry.key} is malformed ({err}); remove or fix it") from None


class Networks:
    def __init__(
        self,
        store: Datastore,
        keys: Keys,
        ipam: Ipam,
        links: Links,
        host: str,
        default_mtu: Callable[[], int],
        changed: Callable[[bool], None],
        forget: Callable[[str], None] = lambda ip: None,
        request: Callable[[], int] = lambda: 0,
        settle: Callable[[int], None] = lambda generation: None,
        docker_ipam_allowed: bool = False,
        routing: SandboxRouting | None = None,
        encrypted_mtu: Callable[[], int] | None = None,
    ):
        self.docker_ipam_allowed = docker_ipam_allowed
        self.routing: SandboxRouting = routing or SingleInterface()
        self.store = store
        self.keys = keys
        self.ipam = ipam
        self.links = links
        self.host = host
        self.default_mtu = default_mtu
        self.encrypted_mtu = encrypted_mtu  # an encrypted network's cap (WireGuard's overhead)
        self.changed = changed  # changed(sync): ask the agent to reconcile (and wait if sync)
        self.forget = forget  # forget(ip): drop the conntrack state of a departed address
        # request() starts an agent pass and returns its generation; settle(g) waits for it.
        # CreateEndpoint requests the pass that programs the endpoint's chains, Join settles it:
        # the work overlaps Docker's sandbox setup, and no first packet meets a missing chain.
        self.request = request
        self.settle = settle
        self._pending: dict[str, int] = {}

    # Networks -----------------------------------------------------------------------------

    def create_network(self, req: "CreateNetwork") -> None:
        spec = parse_network(req, self.docker_ipam_allowed)
        self.store.put(self.keys.network(self.host, spec.id), spec.record(self.host).to_json())
        log.info("network %s created (pools %s, internal=%s, nat=%s, encrypted=%s)", spec.id[:12], spec.pools,
                 spec.internal, spec.nat, spec.encrypted)
        self.changed(True)  # base chains must exist before the first packet

    def _mtu(self, network: NetworkRecord) -> int:
        mtu = network.mtu or self.default_mtu()
        if network.encrypted and self.encrypted_mtu is not None:
            mtu = min(mtu, self.encrypted_mtu())
        return mtu

    def delete_network(self, network_id: str) -> None:
        self.network(network_id)
        # Docker deletes endpoints first; any left are stale (a lost DeleteEndpoint) and go too,
        # because Docker only logs a DeleteNetwork error and forgets the network anyway.
        for ep in self.local_endpoints():
            if ep.network == network_id:
                log.warning("network %s: removing stale endpoint %s", network_id[:12], ep.id[:12])
                self.delete_endpoint(network_id, ep.id)
        self.store.delete(self.keys.network(self.host, network_id))
        log.info("network %s deleted", network_id[:12])
        self.changed(True)  # `docker network rm` returns with no rule or ipset of it left

    def network(self, network_id: str) -> NetworkRecord:
        record = _parse(self.store.get(self.keys.network(self.host, network_id)), NetworkRecord.parse)
        if record is None:
            raise NotFound(f"network {network_id[:12]} is not a canal network")
        return record  # type: ignore[no-any-return]

    # Endpoints ----------------------------------------------------------------------------

    def local_endpoints(self) -> list[EndpointRecord]:
        """This host's endpoints; malformed records are skipped here (the agent quarantines them)."""
        out = []
        for key, value in self.store.list_json(self.keys.endpoints).items():
            try:
                record = EndpointRecord.parse(value, key)
            except RecordError:
                continue
            if record.host == self.host:
                out.append(record)
        return out

    def _endpoint_entry(self, endpoint_id: str) -> tuple[Entry | None, EndpointRecord | None]:
        entry = self.store.get(self.keys.endpoint(endpoint_id))
        return entry, _parse(entry, lambda raw: EndpointRecord.parse(raw, endpoint_id))

    def endpoint(self, network_id: str, endpoint_id: str) -> EndpointRecord:
        _, record = self._endpoint_entry(endpoint_id)
        if record is None or record.network != network_id:
            raise NotFound(f"endpoint {endpoint_id[:12]} does not exist in network {network_id[:12]}")
        return record

    def create_endpoint(self, req: "CreateEndpoint") -> dict:
        network = self.network(req.NetworkID)
        iface: Mapping[str, Any] = req.Interface
        ip6 = _address6(req.EndpointID, network, iface.get("AddressIPv6") or "")
        address = iface.get("Address") or ""
        if not address:
            raise BadRequest(f"endpoint {req.EndpointID[:12]}: no IPv4 address (the network needs --ipam-driver canal)")
        try:
            ip = ipaddress.IPv4Interface(address).ip
        except ValueError:
            raise BadRequest(f"endpoint {req.EndpointID[:12]}: bad address {address!r:.60}") from None
        given_mac = iface.get("MacAddress") or ""
        try:
            mac = mac_address(given_mac) if given_mac else container_mac(ip)
            options = endpoint_options(req.Options)
        except RecordError as err:
            raise BadRequest(f"endpoint {req.EndpointID[:12]}: {err}") from None
        # The address binding and the endpoint record are one transaction: a failure between
        # two writes would leak the address for ever (ReleaseAddress finds it still bound).
        for _attempt in range(20):
            ep_entry, existing = self._endpoint_entry(req.EndpointID)
            if existing is not None and (existing.ip != ip or existing.ip6 != ip6):
                raise Conflict(f"endpoint {req.EndpointID[:12]} already exists with address {existing.ip}"
                               + (f" and {existing.ip6}" if existing.ip6 else ""))
            addr_entry = self.store.get(self.keys.address(ip))
            held = _parse(addr_entry, lambda raw: AddressRecord.parse(raw, ip))
            if held is None and not network.docker_ipam:
                raise Conflict(f"address {ip} was not allocated by canal IPAM")
            if held is not None and held.endpoint not in ("", req.EndpointID):
                raise Conflict(f"address {ip} is already used by endpoint {held.endpoint[:12]}")
            record = EndpointRecord(
                id=req.EndpointID,
                network=req.NetworkID,
                host=self.host,
                ip=ip,
                mac=mac,
                mtu=self._mtu(network),
                joined=bool(existing and existing.joined),
                sandbox=existing.sandbox if existing else "",
                options=options,
                created=existing.created if existing else time.time(),
                labels=existing.labels if existing else None,
                container=existing.container if existing else "",
                container_name=existing.container_name if existing else "",
                ip6=ip6,
            )
            guards = [Guard(self.keys.endpoint(req.EndpointID), ep_entry.mod_revision if ep_entry else 0)]
            ops: list[Put | Delete] = [Put(self.keys.endpoint(req.EndpointID), dumps(record.to_json()))]
            if held is not None:  # Docker's IPAM keeps no record here: it owns the address
                bound = replace(held, endpoint=req.EndpointID, network=req.NetworkID)
                assert addr_entry is not None  # held was parsed from it
                guards.append(Guard(self.keys.address(ip), addr_entry.mod_revision))
                ops.insert(0, Put(self.keys.address(ip), dumps(bound.to_json())))
            if ip6 is not None:
                self._bind6(req.EndpointID, req.NetworkID, ip6, guards, ops)
            if self.store.txn(guards, ops):
                break
        else:
            raise Conflict(f"endpoint {req.EndpointID[:12]}: its records changed concurrently 20 times; retry")
        self.links.prepare(EndpointLink(record.id, record.ip, record.mac, record.mtu, ip6=record.ip6))  # Join configures it
        self._pending[req.EndpointID] = self.request()
        log.info("endpoint %s created in network %s with %s%s", req.EndpointID[:12], req.NetworkID[:12], ip,
                 f" and {ip6}" if ip6 else "")
        return {} if given_mac else {"Interface": {"MacAddress": mac}}

    def _bind6(self, endpoint_id: str, network_id: str, ip6: ipaddress.IPv6Address,
               guards: list[Guard], ops: list[Put | Delete]) -> None:
        """Bind the IPv6 address record to the endpoint, in the endpoint's transaction."""
        entry = self.store.get(self.keys.address(ip6))
        held = _parse(entry, lambda raw: AddressRecord.parse(raw, ip6))
        if held is None:
            raise Conflict(f"address {ip6} was not allocated by canal IPAM")
        if held.endpoint not in ("", endpoint_id):
            raise Conflict(f"address {ip6} is already used by endpoint {held.endpoint[:12]}")
        assert entry is not None
        guards.append(Guard(self.keys.address(ip6), entry.mod_revision))
        ops.insert(0, Put(self.keys.address(ip6), dumps(replace(held, endpoint=endpoint_id, network=network_id).to_json())))

    def _unbind6(self, record: EndpointRecord, guards: list[Guard], ops: list[Put | Delete]) -> None:
        """Unbind the endpoint's IPv6 address record (if still bound to it), in the same transaction."""
        if record.ip6 is None:
            return
        ip6 = record.ip6
        key = self.keys.address(ip6)
        entry = self.store.get(key)
        try:
            held = _parse(entry, lambda raw: AddressRecord.parse(raw, ip6))
        except Conflict as err:
            log.warning("endpoint %s: %s; deleting the endpoint anyway", record.id[:12], err)
            return
        if held is not None and held.endpoint == record.id and entry is not None:
            guards.append(Guard(key, entry.mod_revision))
            ops.append(Put(key, dumps(replace(held, endpoint="").to_json())))

    def delete_endpoint(self, network_id: str, endpoint_id: str) -> None:
        """Unbind the address and delete the record in one transaction (idempotent)."""
        for _attempt in range(20):
            ep_entry, record = self._endpoint_entry(endpoint_id)
            if record is None or record.network != network_id:
                raise NotFound(f"endpoint {endpoint_id[:12]} does not exist in network {network_id[:12]}")
            addr_key = self.keys.address(record.ip)
            addr_entry = self.store.get(addr_key)
            def address(raw: Any, ip: ipaddress.IPv4Address = record.ip) -> AddressRecord:
                return AddressRecord.parse(raw, ip)

            try:
                held = _parse(addr_entry, address)
            except Conflict as err:
                log.warning("endpoint %s: %s; deleting the endpoint anyway", endpoint_id[:12], err)
                held = None
            assert ep_entry is not None  # a record was parsed from it
            guards = [Guard(self.keys.endpoint(endpoint_id), ep_entry.mod_revision)]
            ops: list[Put | Delete] = [Delete(self.keys.endpoint(endpoint_id))]
            if held is not None and held.endpoint == endpoint_id and addr_entry is not None:
                guards.append(Guard(addr_key, addr_entry.mod_revision))
                ops.append(Put(addr_key, dumps(replace(held, endpoint="").to_json())))
            self._unbind6(record, guards, ops)
            if self.store.txn(guards, ops):
                break
        else:
            raise Conflict(f"endpoint {endpoint_id[:12]}: its records changed concurrently 20 times; retry")
        self._pending.pop(endpoint_id, None)
        self.links.forget(endpoint_id)
        # As in leave(), the agent removes a veth still there; `docker network rm` waits for it.
        self.forget(str(record.ip))
        if record.ip6 is not None:
            self.forget(str(record.ip6))
        log.info("endpoint %s deleted (%s)", endpoint_id[:12], record.ip)
        self.changed(False)

    def update_endpoint(
        self, network_id: str, endpoint_id: str, change: Callable[[EndpointRecord], EndpointRecord]
    ) -> EndpointRecord:
        """Read-modify-write of one endpoint of `network_id` (one read: Join's hot path)."""

        def apply(raw: Any) -> Any:
            try:
                record = EndpointRecord.parse(raw, endpoint_id) if raw is not None else None
            except RecordError as err:
                raise Conflict(f"endpoint record {endpoint_id[:12]} is malformed ({err})") from None
            if record is None or record.network != network_id:
                raise NotFound(f"endpoint {endpoint_id[:12]} does not exist in network {network_id[:12]}")
            return change(record).to_json()

        return EndpointRecord.parse(self.store.update(self.keys.endpoint(endpoint_id), apply), endpoint_id)

    def join(self, network_id: str, endpoint_id: str, sandbox_key: str) -> JoinResult:
        def joined(r: EndpointRecord) -> EndpointRecord:
            return replace(r, joined=True, sandbox=sandbox_key, gateway=self.routing.gateway(sandbox_key, r))

        with self.links.guard:  # the reconciler must not see the veth before the record
            record = self.update_endpoint(network_id, endpoint_id, joined)
            self.links.ensure_veth(EndpointLink(record.id, record.ip, record.mac, record.mtu, record.gateway, record.ip6))
        routes = self.routing.routes(record)
        generation = self._pending.pop(endpoint_id, None)
        self.settle(generation if generation is not None else self.request())
        log.info("endpoint %s joined (%s via %s, gateway %s%s)", endpoint_id[:12], record.ip,
                 host_ifname(endpoint_id), record.gateway, f", {len(routes)} routes" if routes else "")
        self.changed(False)
        return JoinResult(peer_ifname(endpoint_id), "eth", str(record.gateway), routes,
                          str(GATEWAY6) if record.ip6 is not None else "")

    def leave(self, network_id: str, endpoint_id: str) -> None:
        self.update_endpoint(network_id, endpoint_id, lambda r: replace(r, joined=False, sandbox=""))
        # The agent deletes the veth: the kernel takes tens of ms for it, which Docker's
        # container stop need not wait for (the sandbox's own teardown removes it anyway).
        log.info("endpoint %s left", endpoint_id[:12])
        self.changed(False)
