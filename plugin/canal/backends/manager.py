"""The host's side of flannel's Manager/Backend split: its subnet lease, whether a real flanneld
owns it (flannel mode), subnet.env, and the pass step that programs the peers with the
cluster's backend (moved here from runtime.py, which only wires it)."""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from dataclasses import replace as replace_desired
from typing import Any, Callable

from canal.agent.desired import Snapshot, local_endpoints
from canal.backends import hostgw, vxlan as vxlan_backend, wireguard as wireguard_backend
from canal.backends.base import BackendConfig, Desired, HostRoute6, Net
from canal.backends.vxlan6 import Desired6, desired6
from canal.config import Config
from canal.dataplane.routes import DirectRoutes
from canal.dataplane.vxlan import HostRoute, Vxlan, VxlanState, vxlan_mtu
from canal.dataplane.vxlan6 import Vxlan6, device6_name, vxlan6_mtu
from canal.dataplane.wireguard import RT_TABLE_MAIN, WG_TABLE, KeyFile, WireGuard, wg_mtu
from canal.errors import CanalError, Unavailable
from canal.records import Lease, replace
from canal.services.hosts import Hosts, v6_mac
from canal.services.subnets import NetworkConfig, SubnetManager

log = logging.getLogger(__name__)

SUBNET_ENV = "/run/flannel/subnet.env"

DESIRED = {"vxlan": vxlan_backend.desired, "host-gw": hostgw.desired, "wireguard": wireguard_backend.desired}


def read_subnet_env(path: str = SUBNET_ENV) -> dict[str, str]:
    try:
        with open(path) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return {}
    pairs = (line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def write_subnet_env(network: str, subnet: ipaddress.IPv4Network, mtu: int, path: str = SUBNET_ENV,
                     network6: str = "", subnet6: ipaddress.IPv6Network | None = None) -> None:
    """flannel's format (WriteSubnetFile), so tools written for flannel hosts work on Canal hosts
    too: each subnet as its first address; the IPv6 pair in dual stack."""
    first = next(subnet.hosts())
    text = f"FLANNEL_NETWORK={network}\nFLANNEL_SUBNET={first}/{subnet.prefixlen}\n"
    if network6 and subnet6 is not None:
        text += f"FLANNEL_IPV6_NETWORK={network6}\nFLANNEL_IPV6_SUBNET={subnet6.network_address + 1}/{subnet6.prefixlen}\n"
    text += f"FLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=true\n"
    if read_subnet_env(path) == dict(line.split("=", 1) for line in text.splitlines()):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def desired_state(config: BackendConfig, snap: Snapshot, underlay: tuple[Net, ...]) -> Desired:
    """The backend's desired state for this snapshot: pure (the underlay's prefixes, both
    families, passed in)."""
    config.require_supported()
    host_routes = [HostRoute(r.ip, r.subnet) for r in snap.routes.values()
                   if r.host != snap.host and isinstance(r.ip, ipaddress.IPv4Address)]
    host_routes6 = [HostRoute6(r.ip, r.subnet) for r in snap.routes6.values()
                    if r.host != snap.host and isinstance(r.ip, ipaddress.IPv6Address)]
    desired = DESIRED[config.type](config, snap.leases, host_routes, snap.own_subnet, underlay, host_routes6)
    if config.type != "wireguard" and encrypts(snap):
        # Encrypted networks on a cluster of another backend: their peers in a table of their own.
        local: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        for ep in local_endpoints(snap):
            local += [ep.ip] if ep.ip6 is None else [ep.ip, ep.ip6]
        wg, problems = wireguard_backend.state(config, snap.leases, host_routes, snap.own_subnet, WG_TABLE, local,
                                               host_routes6)
        desired = replace_desired(desired, wireguard=wg, problems=desired.problems + tuple(problems))
    return desired


def encrypts(snap: Snapshot) -> bool:
    """A network of this host is encrypted: this host needs the WireGuard device and key."""
    return any(n.encrypted for n in snap.networks.values() if n.host == snap.host)


class DesiredCache:
    """desired_state, recomputed only when an input changed: with thousands of route records
    it was most of an event pass (py-spy, 20,000 endpoints: 237 of 417 samples). The route
    records are compared by identity: the agent's snapshots hand out the same dicts until
    one changes (Runtime._routes); everything else desired_state reads, by value."""

    def __init__(self) -> None:
        self._last: tuple[Any, Any, tuple[Any, ...], Desired] | None = None

    def __call__(self, config: BackendConfig, snap: Snapshot, underlay: tuple[Net, ...]) -> Desired:
        local = tuple((ep.ip, ep.ip6) for ep in local_endpoints(snap)) if encrypts(snap) else None
        inputs = (config, snap.host, snap.own_subnet, snap.leases, underlay, local)
        last = self._last
        if last is not None and last[0] is snap.routes and last[1] is snap.routes6 and last[2] == inputs:
            return last[3]
        desired = desired_state(config, snap, underlay)
        self._last = (snap.routes, snap.routes6, inputs, desired)
        return desired


class BackendManager:
    """Lease, flannel mode, subnet.env and peer programming for one host."""

    def __init__(
        self, config: Config, hosts: Hosts, subnets: SubnetManager, network_config: Callable[[], NetworkConfig],
        iface: str, public_ip: str, underlay_mtu: int, public_ip6: str = "",
    ):
        self.config = config
        self.hosts = hosts
        self.subnets = subnets
        self.network_config = network_config
        self.iface, self.public_ip, self.underlay_mtu = iface, public_ip, underlay_mtu
        self.public_ip6 = public_ip6  # "": no IPv6 underlay (no PublicIPv6, no flannel-v6.<VNI>)
        self.multihost = config.datastore == "etcd"
        self.vxlan = Vxlan() if self.multihost else None
        self.vxlan6 = Vxlan6(config.sysctl_dir) if self.multihost else None
        self._v6_device = True  # unknown at start: the first pass checks for a leftover
        self.problems6: tuple[str, ...] = ()  # IPv6 peers not routed, each named (canal status)
        self._applied6: Desired6 | None = None
        self.direct = DirectRoutes(iface) if self.multihost else None
        self.keys = KeyFile(config.state_dir)
        self.wireguard = WireGuard(self.keys, config.sysctl_dir) if self.multihost else None
        self._public_key: tuple[str, str] | None = None  # (private, public): `wg pubkey` once per key
        self._flannel_mode: str | None = None  # decided on first use: the datastore may be down now
        self._lease_lock = threading.Lock()
        self.lease: Lease | None = None
        self.lease_renewed_at: float | None = None  # Unix time of its last grant or renewal (status, metrics)
        # The same on the monotonic clock: how long the lease has left (health) must not move
        # when the wall clock is stepped.
        self._renewed_monotonic: float | None = None
        self._applied: tuple[BackendConfig, Desired] | None = None
        self._desired = DesiredCache()
        self._direct_installed = True  # unknown at start: the first pass reads the kernel
        self._vtep_mac = ""
        self.problems: tuple[str, ...] = ()  # peers not routed, each named (canal status)
        # Peers (by lease subnet) whose IPv6 this pass routes directly: the IPv6 tunnel step
        # leaves their /128s alone.
        self.direct6_peers: frozenset[ipaddress.IPv4Network] = frozenset()

    # Lease -------------------------------------------------------------------------------------

    @property
    def flannel_mode(self) -> str:
        if self._flannel_mode is None:
            self._flannel_mode = self._detect_flannel_mode()
        return self._flannel_mode

    @property
    def flannel_mode_decided(self) -> str | None:
        return self._flannel_mode

    def _detect_flannel_mode(self) -> str:
        """external: a real flanneld owns this host's lease and VXLAN device; we use its subnet."""
        if not self.multihost or self.config.flannel_mode == "embedded":
            return "embedded"
        env = read_subnet_env()
        mac = self.vxlan.device_mac(self.config.vxlan_vni) if self.vxlan else None
        record = self.hosts.read()
        ours = record.vtep_mac if record else None
        if self.config.flannel_mode == "external":
            if not env:
                raise Unavailable(f"flannel-mode external, but {SUBNET_ENV} is missing: is flanneld running?")
            return "external"
        return "external" if env and mac and mac != ours else "embedded"

    def host_subnet(self) -> ipaddress.IPv4Network:
        with self._lease_lock:
            if self.lease is None:
                if self.flannel_mode == "external":
                    env = read_subnet_env()
                    subnet = ipaddress.IPv4Interface(env["FLANNEL_SUBNET"]).network
                    subnet6 = ipaddress.IPv6Interface(env["FLANNEL_IPV6_SUBNET"]).network \
                        if env.get("FLANNEL_IPV6_SUBNET") else None
                    self.lease = Lease(subnet, self.public_ip, "", 0, subnet6=subnet6)
                    log.info("host %s uses flanneld's subnet %s", self.config.host_name, subnet)
                    return subnet
                record = self.hosts.ensure()
                previous = str(record.subnet) if record.subnet else None
                config = self.backend()
                wg = (self.public_key(), config.listen_port) if config.type == "wireguard" else None
                self.lease = self.subnets.acquire(
                    self.public_ip, record.vtep_mac, previous, wg=wg, public_ip6=self.public_ip6,
                    vtep_mac6=v6_mac(record.vtep_mac) if self.public_ip6 else "")
                if record.subnet != self.lease.subnet:
                    subnet = self.lease.subnet
                    self.hosts.update(lambda r: replace(r, subnet=subnet))
                self.lease_renewed_at = time.time()
                self._renewed_monotonic = time.monotonic()
                log.info("host %s owns subnet %s (flannel %s, backend %s)", self.config.host_name,
                         self.lease.subnet, self.flannel_mode, self.lease.backend_type)
            return self.lease.subnet

    def host_subnet6(self) -> ipaddress.IPv6Network | None:
        """This host's IPv6 subnet of a dual-stack lease (None: the cluster has no IPv6 network)."""
        self.host_subnet()
        return self.lease.subnet6 if self.lease is not None else None

    def renew_lease(self) -> None:
        if self.flannel_mode == "external":
            return
        with self._lease_lock:
            if self.lease is not None:
                self.lease = self.subnets.renew(self.lease)
                self.lease_renewed_at = time.time()
                self._renewed_monotonic = time.monotonic()
                self.hosts.touch()

    def backend(self) -> BackendConfig:
        return self.network_config().backend_config

    def default_mtu(self) -> int:
        if self.config.mtu:
            return self.config.mtu
        if self._flannel_mode == "external":
            mtu = read_subnet_env().get("FLANNEL_MTU", "")
            if mtu.isdigit():
                return int(mtu)
        try:
            kind = self.backend().type
        except CanalError:  # the config not readable now: the smallest MTU fits every backend
            kind = "wireguard"
        if kind == "wireguard":
            return max(576, wg_mtu(self.underlay_mtu))
        if kind == "host-gw":
            return self.underlay_mtu
        if self.public_ip6 and self._cluster_has_ipv6():
            # IPv6 may cross hosts through flannel-v6.<VNI>, whose outer IPv6 header is 20 bytes
            # more than IPv4's: one MTU for both families, so no packet relies on PMTU discovery.
            return max(1280, vxlan6_mtu(self.underlay_mtu))
        return max(576, vxlan_mtu(self.underlay_mtu))

    def _cluster_has_ipv6(self) -> bool:
        try:
            return self.network_config().ipv6_network is not None
        except CanalError:
            return False

    def encrypted_mtu(self) -> int:
        """The largest MTU of an encrypted network's endpoints: WireGuard's overhead included."""
        return max(576, wg_mtu(self.underlay_mtu))

    # WireGuard ---------------------------------------------------------------------------------

    def public_key(self) -> str:
        private = self.keys.private()
        if self._public_key is None or self._public_key[0] != private:
            self._public_key = (private, self.keys.public(private))
        return self._public_key[1]

    def _publish_key(self, port: int, seen: Lease | None = None) -> None:
        """Our public key in our lease (first use, a new key, a new port, or the lease as the
        datastore holds it (`seen`) rewritten by someone else: repaired)."""
        wanted = (self.public_key(), port)
        with self._lease_lock:
            if self.lease is None:
                return
            stale = seen is not None and (seen.public_key, seen.wg_port) != wanted
            if stale or (self.lease.public_key, self.lease.wg_port) != wanted:
                self.lease = self.subnets.publish_key(self.lease, wanted, force=stale)
                log.info("host %s publishes its WireGuard public key %s (port %d) in lease %s",
                         self.config.host_name, wanted[0], port, self.lease.subnet)

    def rotate_key(self) -> str:
        """`canal encryption rotate`: a new key on the device at once, then published; peers
        pick it up from the lease and handshake again (packets meanwhile are dropped, not
        sent in the clear; TCP retransmits them)."""
        if self.wireguard is None or self._flannel_mode == "external":
            raise CanalError("encryption needs the etcd datastore and Canal's own lease (not flannel-mode external)")
        if not self.wireguard.exists():
            raise CanalError("this host has no WireGuard device: no encrypted network here and the "
                             "cluster backend is not wireguard")
        public = self.wireguard.rotate()
        self._public_key = None
        self._publish_key(self.backend().listen_port)
        log.info("host %s rotated its WireGuard key; new public key %s", self.config.host_name, public)
        return public

    def encryption_status(self) -> dict[str, Any] | None:
        if self.wireguard is None or not self.wireguard.exists():
            return None
        now = time.time()
        peers = [{**p, "latest_handshake_age": round(now - p["latest_handshake"], 1) if p["latest_handshake"] else None}
                 for p in self.wireguard.peer_status()]
        return {"device": "flannel-wg", "implementation": self.wireguard.implementation or "unknown",
                "public_key": self.public_key(), "peers": peers}

    def lease_status(self) -> dict[str, Any] | None:
        if self.lease is None:
            return None
        own = self.multihost and self._flannel_mode != "external" and self.lease.lease_id != 0
        left = None
        if own and self._renewed_monotonic is not None:
            left = round(self._renewed_monotonic + self.config.lease_ttl - time.monotonic(), 1)
        return {"subnet": str(self.lease.subnet), "subnet6": str(self.lease.subnet6) if self.lease.subnet6 else None,
                "ttl": self.config.lease_ttl if own else None, "expires_in": left}

    def status(self) -> dict[str, Any]:
        try:
            config = self.backend()
            kind, direct = config.type, config.direct_routing
        except CanalError as err:
            kind, direct = f"unknown ({err})", False
        try:
            encryption = self.encryption_status()
        except CanalError as err:
            encryption = {"error": str(err)}
        out = {"type": kind, "direct_routing": direct, "problems": list(self.problems) + list(self.problems6)}
        if encryption is not None:
            out["encryption"] = encryption
        return out

    # The pass step -------------------------------------------------------------------------------

    def program(self, snap: Snapshot, full: bool) -> None:
        """Peers from the leases: the VXLAN device's neighbours/FDB/routes and the direct routes."""
        if self.vxlan is None or self.direct is None or snap.own_subnet is None:
            return
        config = self.backend()
        # The underlay's prefixes matter only where peers may be routed directly (one netlink
        # query less per pass for plain vxlan).
        direct_capable = config.type == "host-gw" or config.direct_routing
        desired = self._desired(config, snap, self.direct.underlay_networks() if direct_capable else ())
        if not full and self._applied == (config, desired):
            return  # event passes skip the kernel read-back when nothing changed
        vni = self.config.vxlan_vni
        # Direct routes: two route dumps each time; skipped on event passes while there are
        # none to have (vxlan without DirectRouting), kept on full passes to clear leftovers.
        touch_direct = full or bool(desired.direct) or self._direct_installed
        if touch_direct:
            self.direct.remove_stale(desired.direct)
        if self.flannel_mode == "embedded":
            if desired.vxlan is not None:
                if not self._vtep_mac:
                    self._vtep_mac = self.hosts.ensure().vtep_mac
                self.vxlan.ensure_device(
                    vni, self.config.vxlan_port, self.public_ip, self.iface,
                    self._vtep_mac, vxlan_mtu(self.underlay_mtu), snap.own_subnet,
                )
                self.vxlan.apply(desired.vxlan, vni)
            elif self.vxlan.exists(vni):
                log.info("backend %s has no VXLAN device: removing flannel.%d", config.type, vni)
                self.vxlan.delete_device(vni)
            write_subnet_env(snap.cluster_network, snap.own_subnet, self.default_mtu(),
                             network6=snap.cluster_network6, subnet6=snap.own_subnet6)
        elif desired.vxlan is not None:
            if not self.vxlan.exists(vni):
                raise Unavailable(f"flannel.{vni} is missing: is flanneld running?")
            # flanneld programs the peers' subnets; we add only the /32s it cannot know about.
            host_routes = {dst: gw for dst, gw in desired.vxlan.routes.items() if dst.prefixlen == 32}
            self.vxlan.apply(VxlanState({}, {}, host_routes), vni, routes_only=True)
        wanted = desired.direct
        if self.flannel_mode != "embedded":
            wanted = {dst: gw for dst, gw in wanted.items() if dst.prefixlen == dst.max_prefixlen}  # /32s, /128s
        self._program_wireguard(config, desired, snap, full)
        problems = list(desired.problems) + (self.direct.add(wanted) if touch_direct else [])
        self._direct_installed = bool(wanted)
        self.direct6_peers = desired.direct6_peers
        if tuple(problems) != self.problems:
            for problem in problems:
                log.error("backend %s: %s", config.type, problem)
        self.problems = tuple(problems)
        self._applied = (config, desired)

    def _program_wireguard(self, config: BackendConfig, desired: Desired, snap: Snapshot, full: bool) -> None:
        """The device, its peers, routes and mark rule; removed when nothing here wants it.
        flanneld's own device is never touched (flannel-mode external)."""
        if self.wireguard is None or self.flannel_mode != "embedded":
            return
        state = desired.wireguard
        if state is None:
            if full or self.wireguard.implementation:
                if self.wireguard.exists():
                    log.info("no encrypted network here and backend %s: removing flannel-wg", config.type)
                self.wireguard.remove()
            return
        own = next((x for x in snap.leases if x.subnet == snap.own_subnet and x.public_ip == self.public_ip), None)
        self._publish_key(config.listen_port, own)
        self.wireguard.ensure_device(wg_mtu(self.underlay_mtu), state.address, state.address6)
        self.wireguard.configure(state, full)
        self.wireguard.apply_routes(state.routes, state.table, state.throws)
        self.wireguard.ensure_rule(state.table != RT_TABLE_MAIN)

    def remove6(self) -> None:
        """Another backend than vxlan: our flannel-v6.<VNI> goes (its routes with it); flanneld's
        (external mode) is never touched."""
        vni = self.config.vxlan_vni
        if self.vxlan6 is not None and self.flannel_mode == "embedded" and self.vxlan6.exists(vni):
            log.info("backend %s has no IPv6 VXLAN device: removing %s", self.backend().type, device6_name(vni))
            self.vxlan6.delete_device(vni)
        self._v6_device = False
        self._applied6 = None

    def program6(self, snap: Snapshot, full: bool, canal_hosts: frozenset[str]) -> Desired6:
        """IPv6 to the peers on the vxlan backend (canal.backends.vxlan6): flannel-v6.<VNI>
        programmed here (embedded mode; removed when no longer wanted); the part that goes into
        flannel.<VNI> returned for the caller's Routes6 applier."""
        records = [(r.ip, r.subnet) for r in snap.routes6.values()
                   if r.host != snap.host and isinstance(r.ip, ipaddress.IPv6Address)]
        network6 = ipaddress.IPv6Network(snap.cluster_network6) if snap.cluster_network6 else None
        embedded = self.flannel_mode == "embedded"
        own = self.lease
        if not embedded and own is not None:
            own = replace_desired(own, subnet6=None)  # flanneld routes the subnets: only our /128s here
        # Peers whose IPv6 the backend step routes directly (DirectRouting) stay off the tunnels.
        leases = [x for x in snap.leases if x.subnet not in self.direct6_peers]
        desired = desired6(leases, own, self.public_ip6 if embedded else "", network6, canal_hosts, records)
        vni = self.config.vxlan_vni
        if not full and self._applied6 == desired:
            return desired  # event passes skip the kernel read-back when nothing changed
        if self.vxlan6 is not None and embedded:
            if desired.device is not None:
                if not self._vtep_mac:
                    self._vtep_mac = self.hosts.ensure().vtep_mac
                self.vxlan6.ensure_device(vni, self.config.vxlan_port, self.public_ip6, self.iface,
                                          v6_mac(self._vtep_mac), vxlan6_mtu(self.underlay_mtu), desired.device.address)
                self.vxlan6.apply(vni, desired.device)
                self._v6_device = True
            elif (full or self._v6_device) and self.vxlan6.exists(vni):
                log.info("no IPv6 underlay or no IPv6 subnet here: removing %s", device6_name(vni))
                self.vxlan6.delete_device(vni)
                self._v6_device = False
            else:
                self._v6_device = False
        if desired.problems != self.problems6:
            for problem in desired.problems:
                log.error("IPv6: %s", problem)
        self.problems6 = desired.problems
        self._applied6 = desired
        return desired
