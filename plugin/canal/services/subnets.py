"""Host subnet leases in flannel's own schema, so Canal hosts and flanneld hosts share one etcd.

Knows nothing of the kernel (flannel's subnet.Manager vs Backend split): it turns the cluster
network config and the leases under `<prefix>/subnets/` into "this host owns subnet S".
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Optional

from canal.backends.base import BackendConfig, parse_backend
from canal.datastore.base import Datastore, Guard, Put, dumps
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
    return NetworkConfig(network, subnet_len, lo, hi, backend, backend_config, _ipv6_network(raw))


def _ipv6_network(raw: dict) -> ipaddress.IPv6Network | None:
    """flannel's dual stack: IPv6Network counts only with EnableIPv6 true (as in flanneld)."""
    enabled = raw.get("EnableIPv6", False)
    if not isinstance(enabled, bool):
        raise BadRequest(f"flannel config EnableIPv6 {safe(enabled)} is not true or false")
    if not enabled:
        return None
    value = raw.get("IPv6Network")
    if not isinstance(value, str):
        raise BadRequest(f"flannel config IPv6Network {safe(value)} is not a CIDR string (EnableIPv6 is true)")
    try:
        net = ipaddress.IPv6Network(value)
    except ValueError as err:
        raise BadRequest(f"flannel config IPv6Network {safe(value)}: {err}") from None
    if net.prefixlen > 120:
        raise BadRequest(f"flannel config IPv6Network {net} is smaller than /120")
    return net


class SubnetManager:
    def __init__(
        self, store: Datastore, keys: Keys, network: str, subnet_len: int, vni: int, port: int, ttl: int = LEASE_TTL,
        backend: str = "vxlan",
    ):
        """`backend`: the Backend Type written into a config created here (--backend)."""
        self.ttl = ttl
        self.store = store
        self.keys = keys
        self.vni = vni
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
        return parse_network_config(raw)

    def leases(self) -> list[Lease]:
        entries, _ = self.store.list(self.keys.leases)
        out = []
        for entry in entries:
            lease = lease_from_entry(entry.key[len(self.keys.leases):], entry.value, entry.lease)
            if lease is not None:
                out.append(lease)
        return out

    def _taken(self) -> set[ipaddress.IPv4Network]:
        entries, _ = self.store.list(self.keys.leases)
        out = set()
        for entry in entries:
            try:
                # A dual-stack lease (flanneld with EnableIPv6) holds its IPv4 subnet as well.
                out.add(lease_key(entry.key[len(self.keys.leases):])[0])
            except (ValueError, RecordError):
                continue  # not a subnet key: cannot collide with one
        return out

    def acquire(self, public_ip: str, vtep_mac: str, previous: str | None = None, wg: WgKey = None) -> Lease:
        """flannel's order: our own lease by PublicIP, then the previous subnet, then a free one.
        wg: (public key, port) this host publishes for WireGuard, or None."""
        cfg = self.network_config()
        cfg.backend_config.require_supported()
        kind = cfg.backend_config.type
        leases = self.leases()
        for lease in leases:
            if lease.public_ip == public_ip and lease.subnet.subnet_of(cfg.network):
                return self._renew(lease, vtep_mac, kind, wg)
        # Every key counts as taken, parsable or not: a malformed lease is still somebody's.
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
        value = self._value(public_ip, vtep_mac, kind, wg)
        for subnet in candidates[:20]:
            lease_id = self.store.grant(self.ttl)
            if self.store.txn([Guard(self.keys.lease(subnet), 0)], [Put(self.keys.lease(subnet), value, lease_id)]):
                log.info("leased subnet %s for host %s", subnet, public_ip)
                return _lease(subnet, public_ip, vtep_mac, lease_id, kind, wg)
            self.store.revoke(lease_id)
        raise Unavailable("could not lease a subnet: every candidate was taken concurrently; retry")

    def renew(self, lease: Lease) -> Lease:
        """Keep the lease alive; if it expired meanwhile, take the same subnet back if free."""
        if lease.lease_id == 0 or self.store.keepalive(lease.lease_id):
            if self.store.get(self.keys.lease(lease.subnet)) is not None:
                return lease
        log.warning("lease on %s was lost; re-acquiring", lease.subnet)
        return self.acquire(lease.public_ip, lease.vtep_mac, previous=str(lease.subnet), wg=_wg_of(lease))

    def publish_key(self, lease: Lease, wg: WgKey, force: bool = False) -> Lease:
        """Our lease with a new WireGuard public key (first use, rotation): rewritten in place,
        under a guard, keeping its subnet and kind (force: even if `lease` already says so)."""
        if _wg_of(lease) == wg and not force:
            return lease
        return self._renew(lease, lease.vtep_mac, lease.backend_type, wg)

    def _renew(self, lease: Lease, vtep_mac: str, kind: str, wg: WgKey = None) -> Lease:
        """Rewrites the value too: a backend switched (all hosts restart, flannel's rule) shows
        in our lease's BackendType."""
        key = self.keys.lease(lease.subnet)
        entry = self.store.get(key)
        value = self._value(lease.public_ip, vtep_mac, kind, wg)
        if entry is not None and entry.lease == 0:  # a reservation: keep it lease-less
            if entry.value != value:
                self.store.txn([Guard(key, entry.mod_revision)], [Put(key, value)])
            return _lease(lease.subnet, lease.public_ip, vtep_mac, 0, kind, wg)
        lease_id = self.store.grant(self.ttl)
        guard = Guard(key, entry.mod_revision if entry else 0)
        if not self.store.txn([guard], [Put(key, value, lease_id)]):
            self.store.revoke(lease_id)
            raise Unavailable(f"lease {key} changed while renewing; retry")
        if entry is not None and entry.lease:
            self.store.revoke(entry.lease)
        return _lease(lease.subnet, lease.public_ip, vtep_mac, lease_id, kind, wg)

    @staticmethod
    def _range(cfg: NetworkConfig):  # type: ignore[no-untyped-def]
        step = 1 << (32 - cfg.subnet_len)
        for start in range(int(cfg.subnet_min.network_address), int(cfg.subnet_max.network_address) + 1, step):
            yield ipaddress.IPv4Network((start, cfg.subnet_len))

    def _value(self, public_ip: str, vtep_mac: str, kind: str = "vxlan", wg: WgKey = None) -> str:
        """flannel's lease JSON for the backend: host-gw leases carry no BackendData of their own;
        a WireGuard key rides in BackendData as flannel's wireguard backend writes it (other
        backends' readers ignore the extra fields)."""
        data: dict[str, object] = {}
        if kind == "vxlan":
            data = {"VNI": self.vni, "VtepMAC": vtep_mac}
        if wg is not None:
            data.update(PublicKey=wg[0], Port=wg[1])
        lease: dict[str, object] = {"PublicIP": public_ip, "BackendType": kind}
        if data:
            lease["BackendData"] = data
        return dumps(lease)


WgKey = Optional[tuple[str, int]]  # (WireGuard public key, listen port) published in a lease


def _wg_of(lease: Lease) -> WgKey:
    return (lease.public_key, lease.wg_port) if lease.public_key else None


def _lease(subnet: ipaddress.IPv4Network, public_ip: str, vtep_mac: str, lease_id: int, kind: str,
           wg: WgKey) -> Lease:
    key, port = wg if wg is not None else ("", 0)
    return Lease(subnet, public_ip, vtep_mac, lease_id, kind, key, port)


def lease_from_entry(name: str, value: str, lease_id: int) -> Lease | None:
    """Parse `a.b.c.d-len` + flannel's JSON; foreign or broken records are skipped, not fatal."""
    try:
        return Lease.parse(name, json.loads(value), lease_id)
    except (ValueError, CanalError) as err:
        log.warning("ignoring malformed flannel lease %s: %s", safe(name), err)
        return None
