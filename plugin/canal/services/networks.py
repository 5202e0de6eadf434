"""Networks and endpoints: the records Docker's driver calls create, and their kernel side.

Handlers record intent in the datastore first and program the kernel second, so a crash in
between leaves a record the reconcile loop completes or cleans up, never an orphan nobody
knows about.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from canal.api import protocol
from canal.datastore.base import Datastore
from canal.datastore.keys import Keys
from canal.dataplane.links import GATEWAY, EndpointLink, Links, host_ifname, peer_ifname
from canal.errors import BadRequest, Conflict, NotFound
from canal.services.ipam import GLOBAL_SPACE, LOCAL_SPACE, Ipam

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

    def record(self, host: str) -> dict:
        return {
            "id": self.id,
            "pools": list(self.pools),
            "internal": self.internal,
            "nat": self.nat,
            "mtu": self.mtu,
            "host": host,
            "name": self.name,
            "explicit_name": bool(self.name),
        }


def parse_network(req: protocol.CreateNetwork) -> NetworkSpec:
    options = req.Options
    generic = options.get(GENERIC) or {}
    if not isinstance(generic, dict):
        raise BadRequest(f"CreateNetwork: {GENERIC} must be an object")
    if _bool(ENABLE_IPV6, options.get(ENABLE_IPV6, False)) or req.IPv6Data:
        raise BadRequest("IPv6 is not supported by canal: create the network without --ipv6")
    settings: dict[str, Any] = {"nat": True, "mtu": 0, "name": ""}
    for name, value in generic.items():
        key = OPTION_ALIASES.get(name)
        if key is None:
            known = ", ".join(sorted(set(OPTION_ALIASES)))
            raise BadRequest(f"unknown option {name!r} for a canal network; known options: {known}")
        if key == "nat":
            settings["nat"] = _bool(name, value)
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
    for data in req.IPv4Data:
        if not isinstance(data, dict):
            raise BadRequest("CreateNetwork: IPv4Data entries must be objects")
        space = data.get("AddressSpace", "")
        if space not in (LOCAL_SPACE, GLOBAL_SPACE):
            raise BadRequest(
                f"address space {space!r} is not canal's: create the network with --ipam-driver canal"
            )
        pools.append(str(data.get("Pool", "")))
    if not pools:
        raise BadRequest("CreateNetwork: no IPv4 pool; create the network with --ipam-driver canal")
    internal = _bool(INTERNAL, options.get(INTERNAL, False))
    nat = settings["nat"] and not internal
    return NetworkSpec(req.NetworkID, tuple(pools), internal, nat, settings["mtu"], settings["name"])


def container_mac(ip: ipaddress.IPv4Address) -> str:
    """Docker's own scheme (02:42 + the IPv4 bytes): stable, unique where the IP is."""
    return "02:42:" + ":".join(f"{b:02x}" for b in ip.packed)


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
    ):
        self.store = store
        self.keys = keys
        self.ipam = ipam
        self.links = links
        self.host = host
        self.default_mtu = default_mtu
        self.changed = changed  # changed(sync): ask the agent to reconcile (and wait if sync)
        self.forget = forget  # forget(ip): drop the conntrack state of a departed address
        # request() starts an agent pass and returns its generation; settle(g) waits for it.
        # CreateEndpoint requests the pass that programs the endpoint's chains, Join settles it:
        # the work overlaps Docker's sandbox setup, and no first packet meets a missing chain.
        self.request = request
        self.settle = settle
        self._pending: dict[str, int] = {}

    # Networks -----------------------------------------------------------------------------

    def create_network(self, req: protocol.CreateNetwork) -> None:
        spec = parse_network(req)
        self.store.put(self.keys.network(self.host, spec.id), spec.record(self.host))
        log.info("network %s created (pools %s, internal=%s, nat=%s)", spec.id[:12], spec.pools, spec.internal, spec.nat)
        self.changed(True)  # base chains must exist before the first packet

    def delete_network(self, network_id: str) -> None:
        self.network(network_id)
        # Docker deletes endpoints first; any left are stale (a lost DeleteEndpoint) and go too,
        # because Docker only logs a DeleteNetwork error and forgets the network anyway.
        for ep in self.local_endpoints():
            if ep["network"] == network_id:
                log.warning("network %s: removing stale endpoint %s", network_id[:12], ep["id"][:12])
                self.delete_endpoint(network_id, ep["id"])
        self.store.delete(self.keys.network(self.host, network_id))
        log.info("network %s deleted", network_id[:12])
        self.changed(True)  # `docker network rm` returns with no rule or ipset of it left

    def network(self, network_id: str) -> dict:
        record = self.store.get_json(self.keys.network(self.host, network_id))
        if record is None:
            raise NotFound(f"network {network_id[:12]} is not a canal network")
        return record

    # Endpoints ----------------------------------------------------------------------------

    def local_endpoints(self) -> list[dict]:
        return [ep for ep in self.store.list_json(self.keys.endpoints).values() if ep.get("host") == self.host]

    def endpoint(self, network_id: str, endpoint_id: str) -> dict:
        record = self.store.get_json(self.keys.endpoint(endpoint_id))
        if record is None or record.get("network") != network_id:
            raise NotFound(f"endpoint {endpoint_id[:12]} does not exist in network {network_id[:12]}")
        return record

    def create_endpoint(self, req: protocol.CreateEndpoint) -> dict:
        network = self.network(req.NetworkID)
        iface: Mapping[str, Any] = req.Interface
        if iface.get("AddressIPv6"):
            raise BadRequest("IPv6 is not supported by canal")
        address = iface.get("Address") or ""
        if not address:
            raise BadRequest(f"endpoint {req.EndpointID[:12]}: no IPv4 address (the network needs --ipam-driver canal)")
        try:
            ip = ipaddress.IPv4Interface(address).ip
        except ValueError:
            raise BadRequest(f"endpoint {req.EndpointID[:12]}: bad address {address!r}") from None
        mac = iface.get("MacAddress") or container_mac(ip)
        existing = self.store.get_json(self.keys.endpoint(req.EndpointID))
        if existing is not None and existing.get("ip") != str(ip):
            raise Conflict(f"endpoint {req.EndpointID[:12]} already exists with address {existing['ip']}")
        self.ipam.bind(ip, req.EndpointID, req.NetworkID)
        record = {
            "id": req.EndpointID,
            "network": req.NetworkID,
            "host": self.host,
            "ip": str(ip),
            "mac": mac,
            "mtu": network.get("mtu") or self.default_mtu(),
            "joined": bool(existing and existing.get("joined")),
            "options": {k: v for k, v in req.Options.items() if isinstance(v, str)},
            "created": existing["created"] if existing else time.time(),
        }
        self.store.put(self.keys.endpoint(req.EndpointID), record)
        self._pending[req.EndpointID] = self.request()
        log.info("endpoint %s created in network %s with %s", req.EndpointID[:12], req.NetworkID[:12], ip)
        return {} if iface.get("MacAddress") else {"Interface": {"MacAddress": mac}}

    def delete_endpoint(self, network_id: str, endpoint_id: str) -> None:
        record = self.endpoint(network_id, endpoint_id)
        self._pending.pop(endpoint_id, None)
        # As in leave(), the agent removes a veth still there; `docker network rm` waits for it.
        self.ipam.unbind(ipaddress.IPv4Address(record["ip"]), endpoint_id)
        self.store.delete(self.keys.endpoint(endpoint_id))
        self.forget(record["ip"])
        log.info("endpoint %s deleted (%s)", endpoint_id[:12], record["ip"])
        self.changed(False)

    def join(self, req: protocol.Join) -> dict:
        record = self.endpoint(req.NetworkID, req.EndpointID)
        record = {**record, "joined": True, "sandbox": req.SandboxKey}
        with self.links.guard:  # the reconciler must not see the veth before the record
            self.store.put(self.keys.endpoint(req.EndpointID), record)
            self.links.ensure_veth(link_of(record))
        generation = self._pending.pop(req.EndpointID, None)
        self.settle(generation if generation is not None else self.request())
        log.info("endpoint %s joined (%s via %s)", req.EndpointID[:12], record["ip"], host_ifname(req.EndpointID))
        self.changed(False)
        return protocol.join(peer_ifname(req.EndpointID), "eth", GATEWAY)

    def leave(self, network_id: str, endpoint_id: str) -> None:
        record = self.endpoint(network_id, endpoint_id)
        self.store.put(self.keys.endpoint(endpoint_id), {**record, "joined": False, "sandbox": ""})
        # The agent deletes the veth: the kernel takes tens of ms for it, which Docker's
        # container stop need not wait for (the sandbox's own teardown removes it anyway).
        log.info("endpoint %s left", endpoint_id[:12])
        self.changed(False)


def link_of(record: Mapping[str, Any]) -> EndpointLink:
    return EndpointLink(record["id"], ipaddress.IPv4Address(record["ip"]), record["mac"], int(record["mtu"]))
