"""Wiring: builds every collaborator from the Config once, in the serving process.

Nothing is built at import time; tests build services with fakes where they need to.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
import urllib.parse
from typing import Any, Iterable, Mapping, Optional

from canal.agent.agent import Agent
from canal.agent.desired import (
    DataplaneSettings,
    Snapshot,
    desired_route_records,
    desired_route_records6,
    endpoint_rows,
    identity_known,
)
from canal.agent.docker_watch import DockerWatch
from canal.agent.index import MembershipIndex
from canal.agent.mirror import Held, Mirror
from canal.agent.sandboxes import SandboxRouting, SandboxStep
from canal import health
from canal.backends.manager import BackendManager
from canal.config import Config
from canal.dataplane import links as linkmod
from canal.dataplane.firewall import Firewall
from canal.dataplane.iptables import Iptables, detect_backend
from canal.dataplane.ports import Reservations
from canal.dataplane.routes6 import Routes6, Routes6State
from canal.dataplane.sandbox import Sandboxes
from canal.dataplane.vxlan import device_name
from canal.datastore.base import Datastore, open_datastore
from canal.datastore.keys import Keys
from canal.errors import CanalError, Unavailable
from canal.policy.compiler import HostProtection
from canal.policy.model import Policy
from canal.records import (
    EndpointRecord,
    Lease,
    NetworkRecord,
    RecordError,
    RouteRecord,
    address_entry,
    endpoint_entry,
    host_entry,
    hostname,
    lease_entry,
    network_entry,
    route_entry,
    safe,
)
from canal.services.hosts import Hosts
from canal.services.ipam import Ipam
from canal.services.networks import Networks
from canal.services.introspect import PolicyIntrospection
from canal.services.policies import Policies
from canal.services.ports import Ports, wanted_reservations
from canal.services.subnets import NetworkConfig, SubnetManager, parse_network_config

log = logging.getLogger(__name__)


def datastore_addresses(config: Config) -> tuple[tuple[str, int], ...]:
    """(IPv4 address, port) of each etcd endpoint, names resolved; loopback ones are left out
    (containers cannot reach the host's loopback). Closed to workloads by the compiler."""
    if config.datastore != "etcd":
        return ()
    out: list[tuple[str, int]] = []
    for url in config.etcd_endpoints.split(","):
        parsed = urllib.parse.urlsplit(url.strip())
        if not parsed.hostname:
            continue
        port = parsed.port or (443 if parsed.scheme == "https" else 2379)
        try:
            infos = socket.getaddrinfo(parsed.hostname, port, socket.AF_INET, socket.SOCK_STREAM)
        except OSError as err:
            log.warning("cannot resolve etcd endpoint %s to guard it from containers: %s", parsed.hostname, err)
            continue
        for info in infos:
            address = str(info[4][0])
            if not ipaddress.IPv4Address(address).is_loopback and (address, port) not in out:
                out.append((address, port))
    return tuple(out)


def check_start(config: Config) -> None:
    """What must hold before serving, checked in a child of the serving process (canal.cli.main):
    the host name is usable, the datastore accepts our TLS and credentials (open_datastore
    refuses them, naming the setting), and no live host already holds our name. An unreachable
    datastore is not a refusal: the plugin starts and retries, and the identity is checked
    again before the first lease."""
    hostname(config.host_name, "host name (--hostname, CANAL_HOSTNAME, or the system's)")
    store = open_datastore(config)
    try:
        _iface, public_ip, _mtu = linkmod.underlay(config.iface, config.public_ip)
        Hosts(store, Keys(config.etcd_prefix, config.flannel_prefix), config.host_name, public_ip).check_identity()
    except Unavailable as err:
        log.warning("host identity not checked at start (datastore unreachable): %s", err)
    finally:
        store.close()


class Plugin:
    def __init__(self, config: Config, store: Datastore | None = None):
        self.config = config
        self.host = config.host_name
        self.store = store or open_datastore(config, check=False)  # check_start checked it
        self.keys = Keys(config.etcd_prefix, config.flannel_prefix)
        self.iface, self.public_ip, self.underlay_mtu = linkmod.underlay(config.iface, config.public_ip)
        self.subnets = SubnetManager(
            self.store, self.keys, config.network, config.subnet_len, config.vxlan_vni, config.vxlan_port,
            ttl=config.lease_ttl, backend=config.backend, network6=None if config.datastore == "etcd" else config.network6,
        )
        self.multihost = config.datastore == "etcd"
        self.hosts = Hosts(self.store, self.keys, self.host, self.public_ip, ttl=config.lease_ttl)
        self.public_ip6 = linkmod.underlay6(self.iface, config.public_ip6) if linkmod.has_ipv6() else ""
        self.backend = BackendManager(config, self.hosts, self.subnets, self.network_config,
                                      self.iface, self.public_ip, self.underlay_mtu, self.public_ip6)
        self._departed: set[str] = set()  # addresses whose conntrack state is still to drop
        self._departed_lock = threading.Lock()
        self.links = linkmod.Links(config.sysctl_dir)
        sandboxes = Sandboxes(config.netns_dir)
        self.ipam = Ipam(self.store, self.keys, self.host, self.backend.host_subnet, self.cluster_network,
                         self.cluster_network6, self.backend.host_subnet6)
        self.networks = Networks(
            self.store, self.keys, self.ipam, self.links, self.host, self.backend.default_mtu, self._changed,
            forget=self._forget,
            request=lambda: self.agent.request(),
            settle=self._settle,
            docker_ipam_allowed=not self.multihost,
            routing=SandboxRouting(self.snapshot, sandboxes, lambda: self._index.published_local),
            encrypted_mtu=self.backend.encrypted_mtu,
        )
        self.reservations = Reservations()
        self._port_problems: list[str] = []
        self.ports = Ports(self.networks.endpoint, self.networks.update_endpoint, self.reservations, self._changed,
                           config.sysctl_dir)
        self.policies = Policies(self.store, self.keys, self._changed)
        backend = detect_backend(config.iptables_backend)
        log.info(
            "host %s: underlay %s (%s, mtu %d), iptables %s, datastore %s",
            self.host, self.public_ip, self.iface, self.underlay_mtu, backend, config.datastore,
        )
        steps: list[Any] = [self.publish_routes, self.backend.program] if self.multihost else []
        self.routes6 = Routes6(config.sysctl_dir)
        self._routes6_applied = False
        self._routes6_last: Routes6State | None = None
        if self.multihost:
            steps.append(self.program_routes6)
        steps.append(SandboxStep(sandboxes.apply, self._retry_soon))
        self.agent = Agent(
            self.pass_snapshot,
            self.links,
            Firewall(Iptables(backend), ip6tables=Iptables(backend, "ip6tables") if linkmod.has_ipv6() else None),
            config.resync_interval,
            periodic=self.renew_lease,
            steps=steps,
            side_steps=[self.forget_departed],
            periodic_interval=min(config.resync_interval, config.lease_ttl / 3),
            check_interval=max(300.0, 10 * config.resync_interval),
            sets_interval=config.ipset_refresh_interval or 3 * config.resync_interval,
        )
        self.introspection = PolicyIntrospection(self.snapshot, lambda: self.agent.firewall.iptables.save_counters(),
                                                 linkmod.local_addresses46, self._counters6)
        self.mirror = Mirror(self.store, [self.keys.root + "/", self.keys.flannel + "/"], self.agent.trigger,
                             quiet=(self.keys.root + "/hosts/", self.keys.root + "/ipam/"),
                             held={self.keys.endpoints: Held(endpoint_entry),
                                   self.keys.addresses: Held(address_entry, wanted=self._ours)})
        # The agent's passes: endpoints as a live view with a change journal, and the set
        # memberships kept from it incrementally (canal.agent.index); other readers use records().
        self._endpoint_view = self.mirror.view(self.keys.endpoints, endpoint_entry)
        # Route records likewise: the pass's split by family is the same objects until one
        # changes, so the backend recomputes its peers only then (canal.backends.manager).
        self._route_view = self.mirror.view(self.keys.routes, route_entry)
        self._route_split: tuple[dict[str, RouteRecord], dict[str, RouteRecord]] = ({}, {})
        self._index = MembershipIndex(self.host)
        self.docker = DockerWatch(
            self.store, self.keys, self.host, config.docker_host, config.resync_interval, records=self.mirror.records,
            collect_endpoint=self.networks.delete_endpoint, collect_address=self.ipam.release_address,
            on_reconnect=lambda: self.agent.request(full=True), grace=config.gc_grace,
            endpoints=self.mirror.view(self.keys.endpoints, endpoint_entry, keep=lambda r: r.host == self.host),
            addresses=self.mirror.view(self.keys.addresses, address_entry, keep=lambda r: r.host == self.host),
        )
        self._network_config: Optional[NetworkConfig] = None  # last valid flannel config seen
        self._settings: Optional[tuple[float, DataplaneSettings]] = None

    def start(self) -> None:
        linkmod.enable_forwarding(self.config.sysctl_dir)
        try:
            self.backend.host_subnet()
        except Exception as err:  # Docker calls still get answers; IPAM retries the lease
            log.error("could not lease a host subnet yet: %s", err)
        self.mirror.start()
        if not self.mirror.wait_ready(5):
            log.warning("datastore not read yet; the dataplane waits for it")
        self.agent.start()
        self.agent.trigger()
        self.docker.start()

    def stop(self) -> None:
        self.mirror.stop()
        self.docker.stop()
        self.agent.stop()
        self.reservations.close()
        self.links.close()
        self.routes6.close()
        self.store.close()

    def _changed(self, sync: bool) -> None:
        self.docker.poke()
        if sync and not self.agent.trigger(wait=10):
            raise self._dataplane_failed()
        if not sync:
            self.agent.trigger()

    def hold_ports(self, local_endpoints: list[EndpointRecord], read_at: int) -> None:
        """Hold the host ports the records publish (after a restart; and let go of those of
        endpoints removed while the plugin was down), before the pass computes the DNAT: only
        ports actually held are DNATed. O(local endpoints): the pass's work, not every reader's.
        read_at: the reservations' mark() from before the records were read."""
        local = [ep for ep in local_endpoints if ep.joined]  # the index's local records: ours already
        problems = self.reservations.sync(wanted_reservations(local), read_at)
        if problems and problems != self._port_problems:
            log.warning("published ports not held, so not DNATed (a host process holds them, or the "
                        "records are not this plugin's): %s", "; ".join(problems)[:1000])
        self._port_problems = problems

    def _counters6(self) -> str:
        """ip6tables-save -c of the filter table ("" on a kernel without IPv6)."""
        ip6 = self.agent.firewall.ip6tables
        return ip6.save_counters() if ip6 is not None else ""

    def held_ports(self) -> dict[tuple[str, str, int], str]:
        return {(k.proto, str(k.ip or ""), k.port): endpoint for k, endpoint in self.reservations.held().items()}

    def _retry_soon(self, delay: float) -> None:
        """Another pass shortly: an interface Docker is still moving into its sandbox."""
        timer = threading.Timer(delay, self.agent.request)
        timer.daemon = True
        timer.start()

    def _forget(self, ip: str) -> None:
        """Queue a departed address for the next pass: DeleteEndpoint need not wait for
        conntrack, and a new endpoint's Join waits for a pass that flushes first."""
        with self._departed_lock:
            self._departed.add(ip)
        self.agent.request()

    def forget_departed(self, snap: Snapshot, full: bool) -> None:
        """A side step: a failed flush is logged (by forget_connections) and retried on the
        next pass, never a failed pass — an unrelated Join waits on this pass."""
        # Even if the address was handed out again meanwhile: its new container cannot have
        # sent anything yet, as its Join waits for this very pass.
        with self._departed_lock:
            departed, self._departed = self._departed, set()
        if not departed:
            return
        result = linkmod.forget_connections(*sorted(departed))
        if not result and not result.tool_missing:
            with self._departed_lock:
                self._departed.update(ip for ip, _why in result.failed if ip in departed)

    def _settle(self, generation: int) -> None:
        if not self.agent.wait(generation, 10):
            raise self._dataplane_failed()

    def _dataplane_failed(self) -> CanalError:
        """Docker's answer when the pass a call waits for failed: a permanent failure (a refused
        restore, a missing tool) keeps its 500; a transient one (or a timeout) is a 503."""
        message = f"the dataplane could not be programmed: {self.agent.last_error or 'timed out'}"
        cause = self.agent.last_exception
        if isinstance(cause, CanalError) and not isinstance(cause, Unavailable):
            failure = CanalError(message)
            failure.status = cause.status
            return failure
        return Unavailable(message)

    # Host subnet lease (canal.backends.manager) ------------------------------------------------

    @property
    def lease(self) -> Lease | None:
        return self.backend.lease

    @property
    def lease_renewed_at(self) -> float | None:
        return self.backend.lease_renewed_at

    def renew_lease(self) -> None:
        if self.backend.flannel_mode == "external":
            return
        self.backend.renew_lease()
        if self.multihost:
            self.hosts.collect_departed(self.mirror.records, self._leases(), self.config.lease_ttl,
                                        self.config.host_absence)

    # Multi-host steps of the reconcile pass --------------------------------------------------

    def program_routes6(self, snap: Snapshot, full: bool) -> None:
        """IPv6 to other hosts on the vxlan backend: their leased IPv6 subnets and /128s over
        flannel-v6.<VNI> or into flannel.<VNI> (canal.backends.vxlan6), except the peers whose
        IPv6 the backend step routes directly (DirectRouting). host-gw and wireguard carry IPv6
        themselves (direct routes via PublicIPv6, the WireGuard device)."""
        if self.backend.backend().type != "vxlan":
            if full:  # switched away from vxlan (all hosts restart, flannel's rule): no flannel-v6.<VNI>
                self.backend.remove6()
            return
        canal_hosts = frozenset(r.public_ip for r in self.mirror.records(self.keys.root + "/hosts/", host_entry).values()
                                if r.public_ip)
        tunnel4 = self.backend.program6(snap, full, canal_hosts).tunnel4
        if not full and (tunnel4 == self._routes6_last or (not tunnel4.routes and not self._routes6_applied)):
            return  # event passes: the kernel is read back only when something changed
        self.routes6.apply(device_name(self.config.vxlan_vni), tunnel4)
        self._routes6_applied = bool(tunnel4.routes)
        self._routes6_last = tunnel4

    def publish_routes(self, snap: Snapshot, full: bool) -> None:
        """Keep this host's route records (/32s and /128s) equal to what its endpoints need."""
        for wanted, have in ((desired_route_records(snap), snap.routes), (desired_route_records6(snap), snap.routes6)):
            for ip, record in wanted.items():
                if have.get(ip) != record:
                    self.store.put(self.keys.route(record.ip), record.to_json())
            for ip, record in have.items():
                if record.host == self.host and ip not in wanted:
                    self.store.delete(self.keys.route(record.ip))

    # Status and snapshot ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        try:
            snap = self.snapshot()
            local = [ep for ep in snap.endpoints.values() if ep.host == self.host]
            # pending: closed because their labels or network name are not known yet
            endpoints, pending = len(local), sorted(ep.id[:12] for ep in local if not identity_known(snap, ep))
            endpoints6: Optional[int] = sum(1 for ep in local if ep.ip6 is not None)
        except Unavailable:  # the datastore not read yet
            endpoints, pending, endpoints6 = None, [], None
        reachable, store_error = True, ""
        try:
            self.store.get(self.keys.host(self.host))  # one read: does the datastore answer now?
        except CanalError as err:
            reachable, store_error = False, str(err)
        last = self.agent.last_success
        return health.annotate({
            "host": self.host,
            "public_ip": self.public_ip,
            "subnet": str(self.lease.subnet) if self.lease else None,
            "subnet6": str(self.lease.subnet6) if self.lease and self.lease.subnet6 else None,
            "public_ip6": self.public_ip6 or None,
            "network6": self._cluster_network6_text() or None,
            "datastore": self.config.datastore,
            "flannel_mode": self.backend.flannel_mode_decided or "undecided",
            "scope": self.config.scope,
            "mtu": self.backend.default_mtu(),
            "last_error": self.agent.last_error,
            "docker_error": self.docker.last_error,
            "endpoints": endpoints,
            "endpoints6": endpoints6,  # of them, those with an IPv6 address (--ipv6 networks)
            "pending_endpoints": pending,
            "quarantined": {key: why for key, (_rev, why) in sorted(self.mirror.quarantined.items())},
            "quarantined_total": self.mirror.quarantined_total,
            "datastore_reachable": reachable,
            "datastore_error": store_error,
            "last_pass_age": None if last is None else round(time.monotonic() - last, 1),
            "resync_interval": self.config.resync_interval,
            "lease": self.backend.lease_status(),
            "backend": self.backend.status() if self.multihost else None,
            "peers": self._peers(),
        })

    def diagnostics(self) -> dict[str, Any]:
        """The plugin's half of `canal diagnose`: redacted here, and again as the CLI writes it."""
        from canal import diagnose, logs

        records: dict[str, Any] = {}
        try:
            snap = self.snapshot()
            records["endpoints"] = {k: e.to_json() for k, e in snap.endpoints.items() if e.host == self.host}
            records["networks"] = {k: n.to_json() for k, n in snap.networks.items() if n.host == self.host}
            records["routes"] = {k: r.to_json() for k, r in snap.routes.items() if r.host == self.host}
            record = self.hosts.read()
            records["host"] = record.to_json() if record else None
            if self.lease is not None:
                entry = self.store.get(self.keys.leases + self.lease.name)
                records["lease"] = {"key": self.keys.leases + self.lease.name,
                                    "value": entry.json() if entry else None}
        except CanalError as err:
            records["error"] = str(err)
        return diagnose.plugin_half(self.config, self.status(), records, logs.RING.records())

    def _peers(self) -> list[dict[str, Any]]:
        """Other hosts with a lease, and when each last renewed (their host record), if known."""
        if not self.multihost:
            return []
        try:
            hosts = self.mirror.records(self.keys.root + "/hosts/", host_entry)
            leases = self._leases()
        except Unavailable:
            return []
        by_ip = {r.public_ip: r for r in hosts.values() if r.public_ip}
        now = time.time()
        out = []
        for lease in sorted(leases, key=lambda x: x.subnet):
            if lease.public_ip == self.public_ip:
                continue
            record = by_ip.get(lease.public_ip)
            out.append({
                "host": record.name if record else None,
                "public_ip": lease.public_ip,
                "subnet": str(lease.subnet),
                "subnet6": str(lease.subnet6) if lease.subnet6 else None,
                "public_ip6": lease.public_ip6 or None,
                "last_contact_age": round(now - record.renewed, 1) if record and record.renewed else None,
            })
        return out

    def cluster_network(self) -> ipaddress.IPv4Network:
        """flannel's Network, from the mirror (IPAM asks on every Swarm call: no etcd round trip).
        A config record that stops parsing is quarantined; the last valid one stays in force."""
        try:
            configs = self.mirror.records(self.keys.flannel + "/", self._flannel_config)
        except Unavailable:  # the mirror is not listed yet
            configs = {}
        config = configs.get("config")
        if config is not None:
            self._network_config = config
        elif self._network_config is None:
            # Absent only before the first lease created it (or malformed from the start).
            self._network_config = self.subnets.network_config()
        return self._network_config.network

    def cluster_network6(self) -> ipaddress.IPv6Network | None:
        """The IPv6 network of --ipv6 networks without an IPv6 --subnet: flannel's IPv6Network
        (EnableIPv6) with etcd, where every host must agree; --network6 on a single host."""
        if self.multihost:
            return self.network_config().ipv6_network
        return ipaddress.IPv6Network(self.config.network6)

    def network_config(self) -> NetworkConfig:
        """The flannel config in force (its Backend picks the backend), as cluster_network reads it."""
        self.cluster_network()
        assert self._network_config is not None
        return self._network_config

    @staticmethod
    def _flannel_config(name: str, raw: Any) -> Any:
        """Only the config is parsed here; leases are parsed by _leases()."""
        return parse_network_config(raw) if name == "config" else None

    def _ours(self, raw: Any) -> bool:
        """An address record of this host (JSON, before it is parsed): the only ones held."""
        return isinstance(raw, dict) and raw.get("host") == self.host

    def _leases(self) -> list[Lease]:
        return list(self.mirror.records(self.keys.leases, lease_entry).values())

    def _networks(self) -> dict[str, NetworkRecord]:
        return self.mirror.records(self.keys.networks, network_entry)

    def _routes(self, hold: bool = False) -> tuple[dict[str, RouteRecord], dict[str, RouteRecord]]:
        """The route records, read once and split by family: (/32s, /128s) by address. The
        agent's pass (hold) gets the same two dicts as long as no route record changed; they
        are never mutated, only replaced."""
        if not self.multihost:
            return {}, {}
        if hold:
            if self._route_view.refresh():
                self._route_split = _by_family(self._route_view.values())
            return self._route_split
        return _by_family(self.mirror.records(self.keys.routes, route_entry).values())

    def pass_snapshot(self) -> Snapshot:
        """The agent's snapshot: the published ports are held first (the DNAT follows them)."""
        return self.snapshot(hold=True)

    def snapshot(self, hold: bool = False) -> Snapshot:
        """From the mirror: memory, not datastore round trips, on every pass. Malformed records
        are quarantined by the mirror and absent here. Readers (Join, status, metrics, explain)
        see the ports as held now; only the pass (hold) syncs them with the records."""
        network = self.cluster_network().with_prefixlen
        policies, broken = self._policies()
        networks = self._networks()
        encrypt_all = self.multihost and self.network_config().backend_config.type == "wireguard"
        endpoints: Mapping[str, EndpointRecord]
        index: Optional[MembershipIndex] = None
        if hold:  # the agent's pass: work in proportion to what changed since the last
            endpoints, index = self._endpoint_view, self._index
            read_at = self.reservations.mark()  # a port released after this is not taken back
            try:
                index.update(endpoints, self._endpoint_view.refresh(), networks, encrypt_all)
            except Exception:
                index.reset()  # rebuilt whole by the next pass
                raise
            self.hold_ports(index.local_records(), read_at)
        else:
            endpoints = self.mirror.records(self.keys.endpoints, endpoint_entry)
        routes, routes6 = self._routes(hold)
        return Snapshot(
            host=self.host,
            cluster_network=network,
            subnet_len=self.network_config().subnet_len,
            networks=networks,
            endpoints=endpoints,
            own_subnet=self.lease.subnet if self.lease else None,
            leases=tuple(self._leases()) if self.multihost else (),
            routes=routes,
            policies=policies,
            broken_policy_scopes=broken,
            settings=self.dataplane_settings(),
            held_ports=self.held_ports(),
            encrypt_all=encrypt_all,
            cluster_network6=self._cluster_network6_text(),
            routes6=routes6,
            own_subnet6=self.lease.subnet6 if self.lease else None,
            index=index,
        )

    def _cluster_network6_text(self) -> str:
        try:
            net6 = self.cluster_network6()
        except CanalError:  # a flannel config that does not parse: no IPv6 network
            return ""
        return str(net6) if net6 is not None else ""

    def dataplane_settings(self) -> DataplaneSettings:
        """Settings the rules depend on; the host's resolvers and the datastore's addresses are
        looked up again at most once per resync interval (resolv.conf and DNS may change)."""
        now = time.monotonic()
        if self._settings is None or now - self._settings[0] >= self.config.resync_interval:
            dns = linkmod.host_resolvers(self.config.resolv_conf, linkmod.local_addresses())
            host = HostProtection(self.config.workload_to_host, dns, datastore_addresses(self.config))
            settings = DataplaneSettings(self.config.vxlan_port, host)
            if self._settings is None or self._settings[1] != settings:
                log.info("host protection: workload-to-host %s, DNS open on %s, datastore closed at %s",
                         host.workload_to_host, ", ".join(dns) or "none",
                         ", ".join(f"{a}:{p}" for a, p in host.datastore) or "none")
            self._settings = (now, settings)
        return self._settings[1]

    def _policies(self) -> tuple[tuple[Policy, ...], frozenset[Optional[str]]]:
        """Stored policies, parsed once per change (the mirror caches typed records). One that no
        longer validates is quarantined and closes every endpoint its scope could select."""
        parsed = self.mirror.records(self.keys.policies, _stored_policy)
        prefix = self.keys.policies
        broken: set[Optional[str]] = set()
        for key in self.mirror.quarantined:
            if key.startswith(prefix):
                broken.add(_policy_scope(key[len(prefix):]))
        return tuple(sorted(parsed.values(), key=lambda p: p.sort_key)), frozenset(broken)

    def rotate_key(self) -> dict[str, Any]:
        public = self.backend.rotate_key()
        self.agent.trigger()
        return {"host": self.host, "public_key": public}

    def endpoint_list(self) -> list[dict[str, Any]]:
        return endpoint_rows(self.snapshot())


def _policy_scope(rel: str) -> Optional[str]:
    """The scope of a policy key relative to the policies prefix: `global/NAME` -> None,
    `net/NETWORK/NAME` -> NETWORK; anything else is treated as global (closes everything)."""
    parts = rel.split("/")
    if len(parts) == 3 and parts[0] == "net" and parts[1]:
        return parts[1]
    return None


def _stored_policy(rel: str, raw: Any) -> Policy:
    policy = Policy.from_dict(raw)
    scope = _policy_scope(rel)
    expected = f"net/{policy.network}/{policy.name}" if policy.network is not None else f"global/{policy.name}"
    if rel != expected:
        raise RecordError(f"policy {policy.key} is stored under another key {safe(rel)}")
    if scope != policy.network:
        raise RecordError(f"policy {policy.key} is stored in the scope of another network")
    return policy


def _by_family(records: Iterable[RouteRecord]) -> tuple[dict[str, RouteRecord], dict[str, RouteRecord]]:
    by_family: tuple[dict[str, RouteRecord], dict[str, RouteRecord]] = ({}, {})
    for record in records:
        by_family[record.ip.version == 6][str(record.ip)] = record
    return by_family
