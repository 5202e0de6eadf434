"""IPAM: pools and addresses, unique cluster-wide through create-if-absent on one key per IP.

Design choices, each forced by Docker:
- A network created without `--subnet` gets the pool `0.0.0.0/0`: libnetwork skips its host
  route-overlap check for it (otherwise the /32 routes of running containers make it call
  RequestPool forever). Its addresses come from this host's flannel subnet lease.
- Every container address is a /32 (routed, no L2), whatever the pool.
- Identical pool requests give identical answers (PoolID derived from the request), so
  replays, Swarm's manager/node double requests and several hosts creating the same network
  all land on one pool record.
- IPv6 (`--ipv6`) the same way: `::/0` for a network without an IPv6 `--subnet`, whose
  addresses come from this host's IPv6 subnet of its dual-stack lease (the cluster's IPv6
  network while there is none); every container address a routed /128.
  Addresses of both families share one directory (8 or 32 hex digits per key).
"""

from __future__ import annotations

import ipaddress
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from canal.datastore.base import Datastore
from canal.datastore.keys import Keys, hex_prefix, ip_hex
from canal.errors import BadRequest, Conflict, Exhausted, NotFound
from canal.records import ANY_NET, ANY_NET6, AddressRecord, PoolRecord, RecordError, replace, safe

log = logging.getLogger(__name__)

LOCAL_SPACE = "CanalLocal"
GLOBAL_SPACE = "CanalGlobal"
DEFAULT_POOL_ID = "canal-default"  # local networks without --subnet: this host's subnet
DEFAULT6_POOL_ID = "canal-default6"  # --ipv6 networks without an IPv6 --subnet: the cluster's IPv6 network
POOL6_ID_PREFIX = "canal-pool6:"  # IPv6 networks with --subnet (":" is in the CIDR: "+" before an ip-range)
CLUSTER_POOL_ID = "canal-cluster"  # Swarm networks without --subnet: the whole cluster network
POOL_ID_PREFIX = "canal-pool:"  # networks with --subnet
GATEWAY_OPTION = "com.docker.network.gateway"
REQUEST_TYPE_OPTION = "RequestAddressType"

KIND_ENDPOINT = "endpoint"
KIND_GATEWAY = "gateway"
# The last component of an address record's key (ip_hex): 8 or 32 lowercase hex digits.
_ADDRESS_KEY4 = re.compile(r"[0-9a-f]{8}")
_ADDRESS_KEY6 = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class PoolRef:
    """What a PoolID stands for; parsed, never looked up, so IDs stay valid across restarts.

    IDs do not depend on the address space: a Swarm manager asks in Docker's global space and
    the nodes (for the same network) in the local one, and both must land on the same pool.
    """

    pool: Net | None  # None: the default pool (this host's subnet; the cluster's IPv6 network)
    sub_pool: Net | None = None
    cluster: bool = False  # the cluster network itself: no pool record, overlaps allowed
    v6: bool = False

    @property
    def id(self) -> str:
        if self.v6:
            if self.pool is None:
                return DEFAULT6_POOL_ID
            return POOL6_ID_PREFIX + str(self.pool) + (f"+{self.sub_pool}" if self.sub_pool else "")
        if self.cluster:
            return CLUSTER_POOL_ID
        if self.pool is None:
            return DEFAULT_POOL_ID
        return POOL_ID_PREFIX + str(self.pool) + (f":{self.sub_pool}" if self.sub_pool else "")

    @staticmethod
    def parse(pool_id: Any, cluster: Callable[[], ipaddress.IPv4Network] | None = None) -> "PoolRef":
        if pool_id == DEFAULT_POOL_ID:
            return PoolRef(None)
        if pool_id == DEFAULT6_POOL_ID:
            return PoolRef(None, v6=True)
        if isinstance(pool_id, str) and pool_id.startswith(POOL6_ID_PREFIX):
            parts6 = pool_id[len(POOL6_ID_PREFIX):].split("+")
            try:
                pool6 = ipaddress.IPv6Network(parts6[0])
                sub6 = ipaddress.IPv6Network(parts6[1]) if len(parts6) > 1 else None
            except (ValueError, IndexError):
                raise NotFound(f"unknown PoolID {pool_id!r}: malformed") from None
            return PoolRef(pool6, sub6, v6=True)
        if pool_id == CLUSTER_POOL_ID and cluster is not None:
            return PoolRef(cluster(), cluster=True)
        if not isinstance(pool_id, str) or not pool_id.startswith(POOL_ID_PREFIX):
            raise NotFound(f"unknown PoolID {pool_id!r}: not a canal pool")
        parts = pool_id[len(POOL_ID_PREFIX):].split(":")
        try:
            pool = ipaddress.IPv4Network(parts[0])
            sub = ipaddress.IPv4Network(parts[1]) if len(parts) > 1 else None
        except (ValueError, IndexError):
            raise NotFound(f"unknown PoolID {pool_id!r}: malformed") from None
        return PoolRef(pool, sub)


Net = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _network6(value: str, what: str) -> ipaddress.IPv6Network:
    try:
        return ipaddress.IPv6Network(value, strict=False)
    except ValueError as err:
        raise BadRequest(f"{what} {value!r} is not an IPv6 CIDR: {err}") from None


def _network(value: str, what: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(value, strict=False)
    except ValueError as err:
        if ":" in value:
            raise BadRequest(f"{what} {value!r}: IPv6 is not supported by canal") from None
        raise BadRequest(f"{what} {value!r} is not an IPv4 CIDR: {err}") from None
    return net


def _usable(net: Net, ip: Address) -> bool:
    """Network and broadcast addresses are never handed out (except in /31 and /32); in IPv6,
    the subnet-router anycast address (the network address) is not (except in /127 and /128)."""
    if net.prefixlen >= net.max_prefixlen - 1:
        return True
    if net.version == 6:
        return ip != net.network_address
    return ip not in (net.network_address, net.broadcast_address)


class Ipam:
    def __init__(
        self,
        store: Datastore,
        keys: Keys,
        host: str,
        host_subnet: Callable[[], ipaddress.IPv4Network],
        cluster_network: Callable[[], ipaddress.IPv4Network] | None = None,
        cluster_network6: Callable[[], ipaddress.IPv6Network | None] = lambda: None,
        host_subnet6: Callable[[], ipaddress.IPv6Network | None] = lambda: None,
    ):
        self.store = store
        self.keys = keys
        self.host = host
        self.host_subnet = host_subnet
        self.cluster_network = cluster_network or host_subnet
        # None: no IPv6 network configured (--ipv6 then needs an IPv6 --subnet)
        self.cluster_network6 = cluster_network6
        # This host's IPv6 subnet of its dual-stack lease (None: none): the default v6 pool's
        # addresses come from it, as the default v4 pool's from the host subnet.
        self.host_subnet6 = host_subnet6

    # Pools --------------------------------------------------------------------------------

    def request_pool(
        self, address_space: str, pool: str, sub_pool: str, options: Mapping[str, str], v6: bool
    ) -> tuple[str, str, dict[str, str]]:
        if address_space not in ("", LOCAL_SPACE, GLOBAL_SPACE):
            raise BadRequest(
                f"unknown address space {address_space!r}: canal serves {LOCAL_SPACE} and {GLOBAL_SPACE}"
            )
        if not pool and sub_pool:
            raise BadRequest("--ip-range needs --subnet")
        if v6:
            if not pool:
                return self._default_pool6()
            if "." in pool and ":" not in pool:
                raise BadRequest(f"subnet {pool!r} is IPv4, but it was requested as the IPv6 pool of an --ipv6 network")
            return self._user_pool(pool, sub_pool, v6=True)
        shared = address_space == GLOBAL_SPACE
        if shared and ":" in pool:
            # Docker 20.10's Swarm allocator asks for every --subnet of a swarm network as an
            # IPv4 pool (V6 false), its IPv6 one too; the CIDR says which it is. Nodes then ask
            # for it again as IPv6 (V6 true): the same pool record answers both.
            return self._user_pool(pool, sub_pool, v6=True, shared=True)
        if ":" in pool or ":" in sub_pool:
            raise BadRequest(f"subnet {pool or sub_pool!r} is IPv6: create the network with --ipv6")
        if (shared and not pool) or (pool == str(self.cluster_network()) and not sub_pool):
            # Swarm: the manager allocates task addresses anywhere in the cluster network;
            # each node then asks again for the same pool by its CIDR: one answer for both.
            return CLUSTER_POOL_ID, str(self.cluster_network()), {}
        if not pool:
            # No gateway request follows: the gateway is given here (see module docstring).
            return DEFAULT_POOL_ID, ANY_NET, {GATEWAY_OPTION: ANY_NET}
        return self._user_pool(pool, sub_pool, v6=False, shared=shared)

    def _user_pool(self, pool: str, sub_pool: str, v6: bool, shared: bool = False) -> tuple[str, str, dict[str, str]]:
        """A --subnet (and --ip-range) of either family: checked, then its pool record made once.
        "shared": a Swarm pool (requested in the global space), where task addresses are
        allocated by the manager and claimed again by the node running the task."""
        what, parse, smallest = ("IPv6 subnet", _network6, 126) if v6 else ("subnet", _network, 30)
        net: Net = parse(pool, what)
        if str(net) != pool and net.network_address != ipaddress.ip_address(pool.split("/")[0]):
            raise BadRequest(f"{what} {pool!r} has host bits set; did you mean {net}?")
        if net.prefixlen > smallest:
            raise BadRequest(f"{what} {net} is too small: canal needs /{smallest} or larger")
        sub: Net | None = None
        if sub_pool:
            range_what = "IPv6 ip-range" if v6 else "ip-range"
            sub = parse(sub_pool, range_what)
            if not sub.subnet_of(net):  # type: ignore[arg-type]  # same version
                raise BadRequest(f"{range_what} {sub} is not inside subnet {net}")
        self._check_overlap(net)
        if self.store.create(self.keys.pool(net), PoolRecord(net, "", shared).to_json()):
            log.info("pool %s created", net)
        elif shared:
            self._update_pool(net, lambda p: replace(p, shared=True))
        return PoolRef(net, sub, v6=v6).id, str(net), {}

    def _check_overlap(self, net: Net) -> None:
        for key, raw in self.store.list_json(self.keys.pools).items():
            try:
                other_net = PoolRecord.parse(raw).cidr
            except RecordError as err:
                log.warning("ignoring malformed pool record %s: %s", safe(key), err)
                continue
            if other_net.version != net.version:
                continue
            if other_net != net and other_net.overlaps(net):  # type: ignore[arg-type]  # same version
                raise Conflict(
                    f"subnet {net} overlaps subnet {other_net} of another canal network; "
                    "use the same subnet or one that does not overlap"
                )

    def _default_pool6(self) -> tuple[str, str, dict[str, str]]:
        """--ipv6 without an IPv6 --subnet: the cluster's IPv6 network. Every v6 pool is
        cluster-wide (no address spaces, no Swarm sharing as for IPv4)."""
        if self.cluster_network6() is None:
            raise BadRequest(
                "--ipv6 without an IPv6 --subnet needs the cluster's IPv6 network: set EnableIPv6 and "
                "IPv6Network in flannel's config (etcd), or --network6 (embedded datastore)"
            )
        # No gateway request follows: the gateway is given here (see module docstring).
        return DEFAULT6_POOL_ID, ANY_NET6, {GATEWAY_OPTION: ANY_NET6}

    def _host_subnet6(self) -> ipaddress.IPv6Network | None:
        try:
            return self.host_subnet6()
        except Exception as err:  # no lease yet: the cluster's network still works (/128 records)
            log.warning("no IPv6 host subnet yet (%s): allocating from the cluster's IPv6 network", err)
            return None

    def release_pool(self, pool_id: str) -> None:
        ref = PoolRef.parse(pool_id, self.cluster_network)
        if ref.pool is None or ref.cluster:
            return
        # The same pool may serve other networks (other hosts, Swarm): keep it while in use.
        if self._allocated(ref.pool):
            log.info("pool %s still has addresses in use; keeping it", ref.pool)
            return
        self.store.delete(self.keys.pool(ref.pool))
        log.info("pool %s released", ref.pool)

    # Addresses ----------------------------------------------------------------------------

    def request_address(
        self, pool_id: str, address: str, options: Mapping[str, str] | None
    ) -> tuple[str, dict[str, str]]:
        ref = PoolRef.parse(pool_id, self.cluster_network)
        kind = KIND_GATEWAY if (options or {}).get(REQUEST_TYPE_OPTION) == GATEWAY_OPTION else KIND_ENDPOINT
        scope: Net
        if ref.pool is None:
            if kind == KIND_GATEWAY:
                raise BadRequest("--gateway needs --subnet on a canal network")
            if ref.v6:
                net6 = self.cluster_network6()
                if net6 is None:
                    raise BadRequest("the cluster has no IPv6 network (any more): give the network an IPv6 --subnet")
                if address:  # --ip6: anywhere in the cluster's network (a route record carries it)
                    ip = self._parse_ip(address, net6, True)
                    self._reserve(ip, ref, kind)
                    return f"{ip}/{ip.max_prefixlen}", {}
                mine6 = self._host_subnet6()
                scope = mine6 if mine6 is not None and mine6.subnet_of(net6) else net6
            else:
                scope = self.host_subnet()
        else:
            scope = ref.pool
            if not ref.cluster and self.store.get(self.keys.pool(ref.pool)) is None:
                raise NotFound(f"pool {ref.pool} does not exist (released?)")
        if address:
            ip = self._parse_ip(address, scope, ref.v6)
            self._reserve(ip, ref, kind)
        else:
            ip = self._allocate(ref, scope, kind)
        if kind == KIND_GATEWAY:
            if not ref.cluster:
                self._update_pool(scope, lambda p: replace(p, gateway=str(ip)))
            return f"{ip}/{scope.prefixlen}", {}
        return f"{ip}/{ip.max_prefixlen}", {}

    def release_address(self, pool_id: str, address: str) -> None:
        ref = PoolRef.parse(pool_id, self.cluster_network)
        ip = self._parse_ip(address, None, ref.v6)
        key = self.keys.address(ip)

        def release(raw: Any) -> Any:
            if raw is None:
                return None
            record = self._address(raw, ip)
            if record.pool != ref.id:
                raise Conflict(f"address {ip} belongs to pool {record.pool}, not {ref.id}")
            if record.endpoint:
                # Still bound to a live endpoint: a Swarm manager releasing a task address
                # before the node's container is gone, or a failed duplicate `--ip` start.
                log.info("address %s still used by endpoint %s; kept", ip, record.endpoint[:12])
                return raw
            return None

        if self.store.get(key) is not None:
            self.store.update(key, release)
            log.info("released %s from %s", ip, ref.id)

    @staticmethod
    def _address(raw: Any, ip: Address) -> AddressRecord:
        try:
            return AddressRecord.parse(raw, ip)
        except RecordError as err:
            raise Conflict(f"the datastore record of address {ip} is malformed ({err}); remove or fix it") from None

    def pool_record(self, net: Net) -> PoolRecord | None:
        raw = self.store.get_json(self.keys.pool(net))
        if raw is None:
            return None
        try:
            return PoolRecord.parse(raw)
        except RecordError as err:
            raise Conflict(f"the datastore record of pool {net} is malformed ({err}); remove or fix it") from None

    def _update_pool(self, net: Net, change: Any) -> None:
        def apply(raw: Any) -> Any:
            if raw is None:
                return None
            try:
                return change(PoolRecord.parse(raw)).to_json()
            except RecordError as err:
                raise Conflict(f"the datastore record of pool {net} is malformed ({err})") from None

        self.store.update(self.keys.pool(net), apply)

    # Internals ----------------------------------------------------------------------------

    @staticmethod
    def _parse_ip(address: str, scope: Net | None, v6: bool = False) -> Address:
        ip: Address
        try:
            ip = ipaddress.IPv6Address(address.split("/")[0]) if v6 else ipaddress.IPv4Address(address.split("/")[0])
        except ValueError:
            family = "IPv6" if v6 else "IPv4"
            raise BadRequest(f"address {address!r} is not an {family} address (this pool is {family})") from None
        if scope is not None:
            if ip not in scope:
                raise BadRequest(f"address {ip} is outside the network's subnet {scope}")
            if not _usable(scope, ip):
                raise BadRequest(f"address {ip} is the network or broadcast address of {scope}")
        return ip

    def _record(self, ip: Address, ref: PoolRef, kind: str) -> dict[str, Any]:
        return AddressRecord(ip, ref.id, kind, self.host, time=int(time.time())).to_json()

    def _reserve(self, ip: Address, ref: PoolRef, kind: str) -> None:
        if self.store.create(self.keys.address(ip), self._record(ip, ref, kind)):
            return
        raw = self.store.get_json(self.keys.address(ip))
        if raw is None:
            raise Conflict(f"address {ip} changed while reserving it; retry")
        held = self._address(raw, ip)
        same = held.kind == kind and held.pool == ref.id
        if same and kind == KIND_GATEWAY:
            return  # the same gateway requested again (replay, another host): idempotent
        if same and not held.endpoint and self._shared(ref):
            return  # a Swarm node claiming the address its manager allocated for the task
        owner = f" by endpoint {held.endpoint[:12]}" if held.endpoint else ""
        raise Conflict(f"address {ip} is already in use{owner} (as {held.kind} on host {held.host})")

    def _shared(self, ref: PoolRef) -> bool:
        if ref.cluster:
            return True
        if ref.pool is None:
            return False
        record = self.pool_record(ref.pool)
        return record is not None and record.shared

    def _allocated(self, net: Net) -> set[int]:
        """The addresses of `net` that have a record. Keys only, checked by one regex each: on a
        host of 1,500 containers this runs per RequestAddress (values and a per-character check
        made it 27 ms there)."""
        keys = self.store.list_keys(self.keys.addresses + hex_prefix(net))
        address_key = _ADDRESS_KEY4 if net.version == 4 else _ADDRESS_KEY6
        low, high = int(net.network_address), int(net.broadcast_address)
        out = set()
        for key in keys:
            name = key[key.rfind("/") + 1:]
            if not address_key.fullmatch(name):
                continue  # not an address key (a foreign or broken record): cannot collide
            value = int(name, 16)
            if low <= value <= high:
                out.add(value)
        return out

    def _ranges(self, ref: PoolRef, scope: Net) -> list[Net]:
        """Where to look, in order: this host's own subnet first when the pool contains it,
        so most addresses route through the subnet routes and need no /32 route records."""
        if ref.pool is None:
            return [scope]
        if ref.sub_pool is not None:
            return [ref.sub_pool]
        if ref.v6 or self._shared(ref):
            return [ref.pool]  # the manager allocates for tasks landing on any node
        try:
            mine = self.host_subnet()
        except Exception:  # no lease yet: the whole pool still works
            return [ref.pool]
        if isinstance(ref.pool, ipaddress.IPv4Network) and mine.subnet_of(ref.pool) and mine != ref.pool:
            return [mine, ref.pool]
        return [ref.pool]

    def _allocate(self, ref: PoolRef, scope: Net, kind: str) -> Address:
        pool = self.pool_record(scope) if ref.pool and not ref.cluster else None
        gateway = pool.gateway if pool is not None else ""
        for _attempt in range(50):
            free: list[Address] = []
            for rng in self._ranges(ref, scope):
                taken = self._allocated(rng)
                for value in range(int(rng.network_address), int(rng.broadcast_address) + 1):
                    if value in taken:  # first: no address object for the ~1,500 taken ones
                        continue
                    ip = ipaddress.ip_address(value) if rng.version == 4 else ipaddress.IPv6Address(value)
                    if not _usable(rng, ip) or not _usable(scope, ip):
                        continue
                    if str(ip) == gateway:
                        continue
                    free.append(ip)
                    if len(free) >= 16:
                        break
                if free:
                    break
            if not free:
                where = ref.sub_pool or scope
                raise Exhausted(f"no free address left in {where}")
            # A random pick among the lowest free addresses keeps concurrent requests apart.
            ip = random.choice(free)
            if self.store.create(self.keys.address(ip), self._record(ip, ref, kind)):
                log.debug("allocated %s (%s) from %s", ip, kind, ref.id)
                return ip
        raise Conflict(f"could not allocate an address in {scope}: too much contention; retry")


__all__ = ["Ipam", "PoolRef", "LOCAL_SPACE", "GLOBAL_SPACE", "CLUSTER_POOL_ID", "ip_hex"]
