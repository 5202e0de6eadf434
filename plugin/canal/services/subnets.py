"""Host subnet leases in flannel's own schema, so Canal hosts and flanneld hosts share one etcd.

Knows nothing of the kernel (flannel's subnet.Manager vs Backend split): it turns the cluster
network config and the leases under `<prefix>/subnets/` into "this host owns subnet S".
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Optional

from canal.backends.base import BackendConfig, parse_backend
from canal.datastore.base import Datastore, Delete, Entry, Guard, Put, dumps
from canal.datastore.keys import Keys
from canal.errors import BadRequest, CanalError, Exhausted, Unavailable
from canal.records import Lease, RecordError, lease_key, safe

log = logging.getLogger(__name__)

LEASE_TTL = 24 * 3600


@dataclass(frozen=True)
class NetworkConfig:
    network: ipaddress.IPv4Network
    subnet_len: int
    subnet_min: ipaddress.IPv4Network
    subnet_max: ipaddress.IPv4Network
    backend: dict = field(repr=False)  # raw: may hold flannel's wireguard PSK
    backend_config: BackendConfig = BackendConfig()  # `backend`, checked and typed
    ipv6_network: ipaddress.IPv6Network | None = None  # EnableIPv6 + IPv6Network (dual stack)
    ipv6_subnet_len: int = 64  # each host's IPv6 subnet (flannel's IPv6SubnetLen)
    ipv6_subnet_min: ipaddress.IPv6Network | None = None
    ipv6_subnet_max: ipaddress.IPv6Network | None = None

    @property
    def vni(self) -> int:
        return int(_ci(self.backend, "VNI", 1))

    @property
    def port(self) -> int:
        return int(_ci(self.backend, "Port", 0) or 0)


def _ci(mapping: dict, key: str, default: Any) -> Any:
    """flannel reads backend keys case-insensitively."""
    for k, v in mapping.items():
        if k.lower() == key.lower():
            return v
    return default


def parse_network_config(raw: Any) -> NetworkConfig:
    """flannel's config JSON with flannel's defaults; errors name the field."""
    if not isinstance(raw, dict):
        raise BadRequest(f"flannel config {safe(raw)} is not a JSON object")
    if "Network" not in raw:
        raise BadRequest("flannel config has no Network field")
    if not isinstance(raw["Network"], str):
        raise BadRequest(f"flannel config Network {safe(raw['Network'])} is not a CIDR string")
    try:
        network = ipaddress.IPv4Network(raw["Network"])
    except ValueError as err:
        raise BadRequest(f"flannel config Network {safe(raw['Network'])}: {err}") from None
    if network.prefixlen > 28:
        raise BadRequest(f"flannel config Network {network} is smaller than /28")
    default_len = 24 if network.prefixlen <= 22 else network.prefixlen + 2
    subnet_len = raw.get("SubnetLen") or default_len
    if isinstance(subnet_len, bool) or not isinstance(subnet_len, int) or not network.prefixlen < subnet_len <= 30:
        raise BadRequest(f"flannel config SubnetLen {safe(subnet_len)} does not fit Network {network}")
    for name in ("SubnetMin", "SubnetMax"):
        if raw.get(name) is not None and not isinstance(raw[name], str):
            raise BadRequest(f"flannel config {name} {safe(raw[name])} is not an address string")
    backend_config = parse_backend(raw.get("Backend"))
    subnets = network.subnets(new_prefix=subnet_len)
    first = next(subnets)
    second = next(subnets, first)
    last = ipaddress.IPv4Network(
        (int(network.broadcast_address) - (1 << (32 - subnet_len)) + 1, subnet_len)
    )
    try:
        lo = ipaddress.IPv4Network((raw["SubnetMin"], subnet_len), strict=False) if raw.get("SubnetMin") else second
        hi = ipaddress.IPv4Network((raw["SubnetMax"], subnet_len), strict=False) if raw.get("SubnetMax") else last
    except ValueError as err:
        raise BadRequest(f"flannel config SubnetMin/SubnetMax: {err}") from None
    backend = raw.get("Backend") or {"Type": "udp"}
    return NetworkConfig(network, subnet_len, lo, hi, backend, backend_config, **_ipv6_network(raw))


def _ipv6_network(raw: dict) -> dict[str, Any]:
    """flannel's dual stack: IPv6Network counts only with EnableIPv6 true (as in flanneld)."""
    enabled = raw.get("EnableIPv6", False)
    if not isinstance(enabled, bool):
        raise BadRequest(f"flannel config EnableIPv6 {safe(enabled)} is not true or false")
    if not enabled:
        return {}
    value = raw.get("IPv6Network")
    if not isinstance(value, str):
        raise BadRequest(f"flannel config IPv6Network {safe(value)} is not a CIDR string (EnableIPv6 is true)")
    try:
        net = ipaddress.IPv6Network(value)
    except ValueError as err:
        raise BadRequest(f"flannel config IPv6Network {safe(value)}: {err}") from None
    return ipv6_ranges(net, raw)


def ipv6_ranges(net: ipaddress.IPv6Network, raw: dict) -> dict[str, Any]:
    """NetworkConfig's IPv6 fields with flannel's rules (CheckNetworkConfig): IPv6SubnetLen
    default /64 (network+2 if the network is smaller than /62), at most /126, the network
    split at least in four; IPv6SubnetMin/Max default to the second and the last subnet,
    must lie in the network and on a subnet boundary."""
    if net.prefixlen > 120:
        raise BadRequest(f"flannel config IPv6Network {net} is smaller than /120")
    length = raw.get("IPv6SubnetLen") or (64 if net.prefixlen <= 62 else net.prefixlen + 2)
    if isinstance(length, bool) or not isinstance(length, int) or not net.prefixlen + 2 <= length <= 126:
        raise BadRequest(f"flannel config IPv6SubnetLen {safe(length)} does not fit IPv6Network {net} "
                         f"(between /{net.prefixlen + 2} and /126)")
    size = 1 << (128 - length)
    bounds = {}
    for name, default in (("IPv6SubnetMin", int(net.network_address) + size),
                          ("IPv6SubnetMax", int(net.broadcast_address) + 1 - size)):
        value = raw.get(name)
        if value is None or value == "":
            bounds[name] = ipaddress.IPv6Network((default, length))
            continue
        try:
            address = ipaddress.IPv6Address(value) if isinstance(value, str) else None
        except ValueError:
            address = None
        if address is None:
            raise BadRequest(f"flannel config {name} {safe(value)} is not an IPv6 address")
        if address not in net:
            raise BadRequest(f"flannel config {name} {address} is not in IPv6Network {net}")
        if int(address) % size:
            raise BadRequest(f"flannel config {name} {address} is not on an IPv6SubnetLen (/{length}) boundary")
        bounds[name] = ipaddress.IPv6Network((address, length))
    if bounds["IPv6SubnetMin"].network_address > bounds["IPv6SubnetMax"].network_address:
        raise BadRequest(f"flannel config IPv6SubnetMin {bounds['IPv6SubnetMin']} is above IPv6SubnetMax")
    return {"ipv6_network": net, "ipv6_subnet_len": length, "ipv6_subnet_min": bounds["IPv6SubnetMin"],
            "ipv6_subnet_max": bounds["IPv6SubnetMax"]}


class SubnetManager:
    def __init__(
        self, store: Datastore, keys: Keys, network: str, subnet_len: int, vni: int, port: int, ttl: int = LEASE_TTL,
        backend: str = "vxlan", network6: str | None = None,
    ):
        """`backend`: the Backend Type written into a config created here (--backend).
        `network6`: the embedded datastore's --network6, which every host subnet's /64 comes
        from whatever the stored config says (with etcd, flannel's EnableIPv6 + IPv6Network)."""
        self.ttl = ttl
        self.store = store
        self.keys = keys
        self.vni = vni
        self._network6 = ipaddress.IPv6Network(network6) if network6 else None
        self._wanted = {
            "Network": network,
            "SubnetLen": subnet_len,
            "Backend": {"Type": "vxlan", "VNI": vni, "Port": port} if backend == "vxlan" else {"Type": backend},
        }

    def network_config(self) -> NetworkConfig:
        """Read `<prefix>/config`, creating it from our settings only if absent."""
        raw = self.store.get_json(self.keys.flannel_config)
        if raw is None:
            self.store.create(self.keys.flannel_config, self._wanted)
            raw = self.store.get_json(self.keys.flannel_config)
            log.info("created flannel network config: Network %s, Backend %s", safe(raw.get("Network")),
                     safe((raw.get("Backend") or {}).get("Type")))
        elif raw.get("Network") != self._wanted["Network"]:
            log.warning(
                "cluster network %s from %s overrides the configured %s",
                raw.get("Network"), self.keys.flannel_config, self._wanted["Network"],
            )
        config = parse_network_config(raw)
        if self._network6 is not None:
            config = dataclasses.replace(config, **ipv6_ranges(self._network6, {}))
        return config

    def leases(self) -> list[Lease]:
        entries, _ = self.store.list(self.keys.leases)
        out = []
        for entry in entries:
            lease = lease_from_entry(entry.key[len(self.keys.leases):], entry.value, entry.lease)
            if lease is not None:
                out.append(lease)
        return out

    def _claims(self) -> list[tuple[Entry, ipaddress.IPv4Network, ipaddress.IPv6Network | None]]:
        """Every lease key's subnets, parsable value or not: a malformed lease is still somebody's."""
        entries, _ = self.store.list(self.keys.leases)
        out = []
        for entry in entries:
            try:
                out.append((entry, *lease_key(entry.key[len(self.keys.leases):])))
            except (ValueError, RecordError):
                continue  # not a subnet key: cannot collide with one
        return out

    def _taken(self) -> set[ipaddress.IPv4Network]:
        return {v4 for _, v4, _ in self._claims()}

    def acquire(self, public_ip: str, vtep_mac: str, previous: str | None = None, wg: WgKey = None,
                public_ip6: str = "", vtep_mac6: str = "", previous6: str | None = None) -> Lease:
        """flannel's order: our own lease by PublicIP, then the previous subnet, then a free one.
        With the cluster's IPv6 network, the lease is dual stack (an IPv6 subnet beside the
        IPv4 one, one key for both); our own v4-only lease is upgraded to it (and a dual-stack
        one downgraded when the cluster drops IPv6). wg: (public key, port) this host
        publishes for WireGuard, or None. public_ip6/vtep_mac6: our IPv6 underlay address and
        the IPv6 VTEP's MAC ("": none), published only in a dual-stack lease."""
        cfg = self.network_config()
        cfg.backend_config.require_supported()
        kind = cfg.backend_config.type
        key, port = wg if wg is not None else ("", 0)
        ours = [lease for lease in self.leases() if lease.public_ip == public_ip and lease.subnet.subnet_of(cfg.network)]
        if ours:
            # After a crash mid-upgrade both keys exist: keep the one that fits the config.
            ours.sort(key=lambda x: (not _fits6(cfg, x.subnet6), x.name))
            lease = dataclasses.replace(ours[0], vtep_mac=vtep_mac, backend_type=kind, public_key=key, wg_port=port,
                                        public_ip6=public_ip6, vtep_mac6=vtep_mac6)
            if _fits6(cfg, lease.subnet6):
                lease = self._renew(lease, vtep_mac, kind, wg)
            else:
                lease = self._migrate(lease, cfg, ours[0].name)
            self._drop_leftovers(lease, ours)
            return lease
        taken = self._taken()
        candidates: list[ipaddress.IPv4Network] = []
        if previous:
            prev = ipaddress.IPv4Network(previous)
            if prev.prefixlen == cfg.subnet_len and prev.subnet_of(cfg.network) and prev not in taken:
                candidates.append(prev)
        free = [s for s in self._range(cfg) if s not in taken][:100]
        random.shuffle(free)
        candidates.extend(free)
        if not candidates:
            raise Exhausted(f"no free /{cfg.subnet_len} subnet left in cluster network {cfg.network}")
        for subnet in candidates[:20]:
            subnet6 = self._free6(cfg, previous6)
            # public_ip6/vtep_mac6 kept even without an IPv6 subnet: published once the cluster
            # gains one (renew moves the lease to a dual-stack key then).
            lease = Lease(subnet, public_ip, vtep_mac, 0, kind, key, port, subnet6=subnet6,
                          public_ip6=public_ip6, vtep_mac6=vtep_mac6)
            lease_id = self.store.grant(self.ttl)
            name = self.keys.lease(subnet, subnet6)
            if self.store.txn([Guard(name, 0)], [Put(name, self._value(lease), lease_id)]):
                if self._first_claim(name, subnet, subnet6):
                    log.info("leased subnet %s%s for host %s", subnet, f" and {subnet6}" if subnet6 else "", public_ip)
                    return dataclasses.replace(lease, lease_id=lease_id)
                self._withdraw(name)
            self.store.revoke(lease_id)
        raise Unavailable("could not lease a subnet: every candidate was taken concurrently; retry")

    def _free6(self, cfg: NetworkConfig, previous6: str | None = None) -> ipaddress.IPv6Network | None:
        """A free IPv6 subnet of the cluster's (the previous one if still free), or None when the
        cluster has no IPv6. Picked at random as flannel does: the range is too big to list."""
        if cfg.ipv6_network is None or cfg.ipv6_subnet_min is None or cfg.ipv6_subnet_max is None:
            return None
        taken = {v6 for _, _, v6 in self._claims() if v6 is not None}
        if previous6:
            prev = ipaddress.IPv6Network(previous6)
            if _fits6(cfg, prev) and prev not in taken:
                return prev
        shift = 128 - cfg.ipv6_subnet_len
        lo, hi = int(cfg.ipv6_subnet_min.network_address) >> shift, int(cfg.ipv6_subnet_max.network_address) >> shift
        if hi - lo < 4096:
            free = [n for n in (ipaddress.IPv6Network((i << shift, cfg.ipv6_subnet_len)) for i in range(lo, hi + 1))
                    if n not in taken]
            if free:
                return random.choice(free)
        else:
            for _ in range(100):
                pick = ipaddress.IPv6Network((random.randint(lo, hi) << shift, cfg.ipv6_subnet_len))
                if pick not in taken:
                    return pick
        raise Exhausted(f"no free /{cfg.ipv6_subnet_len} IPv6 subnet left in cluster network {cfg.ipv6_network}")

    def _first_claim(self, name: str, subnet: ipaddress.IPv4Network, subnet6: ipaddress.IPv6Network | None,
                     replacing: str = "") -> bool:
        """After writing `name`: is it the oldest key holding its IPv4 or IPv6 subnet? Keys only
        guard their exact text, and a dual-stack key differs from a v4-only one (or another
        pairing) of the same subnet, so two hosts could each write one; the later yields.
        `replacing`: our own old key of the same subnet (an upgrade in progress)."""
        claims = self._claims()
        mine = next((entry for entry, _, _ in claims if entry.key == name), None)
        if mine is None:
            return False
        for entry, v4, v6 in claims:
            if entry.key in (name, replacing):
                continue
            if (v4 == subnet or (subnet6 is not None and v6 == subnet6)) and \
                    entry.create_revision < mine.create_revision:
                log.warning("lease %s collides with the older %s; choosing another subnet", safe(name), safe(entry.key))
                return False
        return True

    def _withdraw(self, name: str) -> None:
        entry = self.store.get(name)
        if entry is not None:
            self.store.txn([Guard(name, entry.mod_revision)], [Delete(name)])

    def _migrate(self, lease: Lease, cfg: NetworkConfig, old_name: str) -> Lease:
        """Our lease under a new key with (or without) an IPv6 subnet, keeping its IPv4 subnet.
        Crash-safe: the new key is written first and the old removed only after (a restart
        finds both, keeps the new and drops the old: `_drop_leftovers`)."""
        old = self.store.get(self.keys.leases + old_name)
        for _ in range(5):
            subnet6 = self._free6(cfg, str(lease.subnet6) if lease.subnet6 else None)
            moved = dataclasses.replace(lease, subnet6=subnet6)
            name = self.keys.lease(moved.subnet, subnet6)
            lease_id = self.store.grant(self.ttl) if old is None or old.lease else 0
            if self.store.txn([Guard(name, 0)], [Put(name, self._value(moved), lease_id)]):
                if self._first_claim(name, moved.subnet, subnet6, replacing=self.keys.leases + old_name):
                    log.info("lease %s now %s (the cluster's IPv6 network %s)", safe(old_name), moved.name,
                             cfg.ipv6_network or "none")
                    return dataclasses.replace(moved, lease_id=lease_id)
                self._withdraw(name)
            if lease_id:
                self.store.revoke(lease_id)
        raise Unavailable(f"could not move lease {safe(old_name)} to a dual-stack key; retry")

    def _drop_leftovers(self, lease: Lease, ours: list[Lease]) -> None:
        """Our other keys of the same IPv4 subnet (an interrupted or finished upgrade): removed,
        each only at the revision we read, after the kept one is written."""
        for other in ours:
            if other.subnet != lease.subnet or other.name == lease.name:
                continue
            name = self.keys.leases + other.name
            entry = self.store.get(name)
            if entry is not None and self.store.txn([Guard(name, entry.mod_revision)], [Delete(name)]):
                log.info("removed our old lease key %s (now %s)", safe(other.name), lease.name)
                if entry.lease:
                    self.store.revoke(entry.lease)

    def renew(self, lease: Lease) -> Lease:
        """Keep the lease alive; if it expired meanwhile, take the same subnet back if free.
        A cluster that gained (or dropped) its IPv6 network moves the lease to the new key."""
        if lease.lease_id == 0 or self.store.keepalive(lease.lease_id):
            if self.store.get(self.keys.leases + lease.name) is not None:
                if _fits6(self.network_config(), lease.subnet6):
                    return lease
                return self.acquire(lease.public_ip, lease.vtep_mac, previous=str(lease.subnet), wg=_wg_of(lease),
                                    public_ip6=lease.public_ip6, vtep_mac6=lease.vtep_mac6)
        log.warning("lease on %s was lost; re-acquiring", lease.name)
        return self.acquire(lease.public_ip, lease.vtep_mac, previous=str(lease.subnet), wg=_wg_of(lease),
                            public_ip6=lease.public_ip6, vtep_mac6=lease.vtep_mac6,
                            previous6=str(lease.subnet6) if lease.subnet6 else None)

    def publish_key(self, lease: Lease, wg: WgKey, force: bool = False) -> Lease:
        """Our lease with a new WireGuard public key (first use, rotation): rewritten in place,
        under a guard, keeping its subnet and kind (force: even if `lease` already says so)."""
        if _wg_of(lease) == wg and not force:
            return lease
        return self._renew(lease, lease.vtep_mac, lease.backend_type, wg)

    def _renew(self, lease: Lease, vtep_mac: str, kind: str, wg: WgKey = None) -> Lease:
        """Rewrites the value too: a backend switched (all hosts restart, flannel's rule) shows
        in our lease's BackendType."""
        key = self.keys.leases + lease.name
        entry = self.store.get(key)
        public_key, port = wg if wg is not None else ("", 0)
        lease = dataclasses.replace(lease, vtep_mac=vtep_mac, backend_type=kind, public_key=public_key, wg_port=port)
        value = self._value(lease)
        if entry is not None and entry.lease == 0:  # a reservation: keep it lease-less
            if entry.value != value:
                self.store.txn([Guard(key, entry.mod_revision)], [Put(key, value)])
            return dataclasses.replace(lease, lease_id=0)
        lease_id = self.store.grant(self.ttl)
        guard = Guard(key, entry.mod_revision if entry else 0)
        if not self.store.txn([guard], [Put(key, value, lease_id)]):
            self.store.revoke(lease_id)
            raise Unavailable(f"lease {key} changed while renewing; retry")
        if entry is not None and entry.lease:
            self.store.revoke(entry.lease)
        return dataclasses.replace(lease, lease_id=lease_id)

    @staticmethod
    def _range(cfg: NetworkConfig):  # type: ignore[no-untyped-def]
        step = 1 << (32 - cfg.subnet_len)
        for start in range(int(cfg.subnet_min.network_address), int(cfg.subnet_max.network_address) + 1, step):
            yield ipaddress.IPv4Network((start, cfg.subnet_len))

    def _value(self, lease: Lease) -> str:
        """flannel's lease JSON (LeaseAttrs) for the backend: host-gw leases carry no BackendData
        of their own; a WireGuard key rides in BackendData as flannel's wireguard backend
        writes it (other backends' readers ignore the extra fields). Dual stack: PublicIPv6
        when this host has an IPv6 underlay, and for vxlan BackendV6Data with the VTEP MAC of
        flannel-v6.<VNI> (flanneld's newSubnetAttrs); without an IPv6 underlay both are left out."""
        kind = lease.backend_type
        data: dict[str, object] = {}
        if kind == "vxlan":
            data = {"VNI": self.vni, "VtepMAC": lease.vtep_mac}
        if lease.public_key:
            data.update(PublicKey=lease.public_key, Port=lease.wg_port)
        out: dict[str, object] = {"PublicIP": lease.public_ip}
        dual = lease.subnet6 is not None and bool(lease.public_ip6)
        if dual:
            out["PublicIPv6"] = lease.public_ip6
        out["BackendType"] = kind
        if data:
            out["BackendData"] = data
        data6: dict[str, object] = {}
        if dual and kind == "vxlan" and lease.vtep_mac6:
            data6 = {"VNI": self.vni, "VtepMAC": lease.vtep_mac6}
        if dual and lease.public_key:
            # The same key for IPv6 (one device for both families: flanneld's wireguard Mode
            # "auto" reads a dual-stack peer's key from BackendV6Data).
            data6.update(PublicKey=lease.public_key, Port=lease.wg_port)
        if data6:
            out["BackendV6Data"] = data6
        return dumps(out)


WgKey = Optional[tuple[str, int]]  # (WireGuard public key, listen port) published in a lease


def _wg_of(lease: Lease) -> WgKey:
    return (lease.public_key, lease.wg_port) if lease.public_key else None


def _fits6(cfg: NetworkConfig, subnet6: ipaddress.IPv6Network | None) -> bool:
    """Does a lease's IPv6 subnet (None: v4-only) match the cluster's IPv6 network?"""
    if cfg.ipv6_network is None:
        return subnet6 is None
    return (subnet6 is not None and subnet6.prefixlen == cfg.ipv6_subnet_len and subnet6.subnet_of(cfg.ipv6_network))


def lease_from_entry(name: str, value: str, lease_id: int) -> Lease | None:
    """Parse `a.b.c.d-len` + flannel's JSON; foreign or broken records are skipped, not fatal."""
    try:
        return Lease.parse(name, json.loads(value), lease_id)
    except (ValueError, CanalError) as err:
        log.warning("ignoring malformed flannel lease %s: %s", safe(name), err)
        return None
