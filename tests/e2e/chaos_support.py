"""Faults under load (issue 12): the cluster-wide invariant checker and the fault scenarios,
shared by tests/e2e/test_faults.py (short forms) and bench/chaos.py (long forms).

The checker compares three independent views after a fault: the datastore's records (etcd, or
the embedded SQLite file), what Docker says runs (containers, their endpoints and addresses),
and each host's kernel (veths, routes by protocol, FDB and neighbours of the VXLAN device,
Canal's iptables chains and ipset members). It never asks the plugin, so a plugin that lies
about its state cannot hide a violation. Every violation names the invariant, where (host,
container, key) and what was seen; `check()` returning [] is the recovered state.

Names as the dataplane gives them (canal.dataplane.links, canal.policy.compiler,
canal.dataplane.vxlan): host-side veth cnl<endpoint id[:12]>, per-endpoint chains
CANAL-FW-/CANAL-TW-<endpoint id[:12]>, routes proto 101 (veth), 102 (VXLAN), 103 (direct),
104 (WireGuard), device flannel.<vni>, ipsets canal-*.
"""

from __future__ import annotations

import base64
import json
import random
import re
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from canal.records import (
    AddressRecord,
    EndpointRecord,
    Lease,
    NetworkRecord,
    RecordError,
    RouteRecord,
    address_entry,
    endpoint_entry,
    lease_entry,
    network_entry,
    route_entry,
)

from testbed import IMAGE, Etcd, SimHost, TestbedError

ROOT = "/canal/v1"
FLANNEL = "/coreos.com/network"
VETH = re.compile(r"cnl[0-9a-f]{12}")
EP_CHAIN = re.compile(r"CANAL-(?:FW|TW)-([0-9a-f]{12})")
#: What the last check() looked at (for reports: a check of nothing passes trivially).
LAST: dict[str, int] = {}
PROTOS = {"101": "veth", "102": "vxlan", "103": "direct", "104": "wireguard"}


@dataclass(frozen=True)
class Violation:
    invariant: str  # duplicate-address, allocation, leak, missing, connectivity, policy, record
    where: str  # host, container or key
    what: str

    def __str__(self) -> str:
        return f"[{self.invariant}] {self.where}: {self.what}"


# ----------------------------------------------------------------------------- records

@dataclass
class Records:
    """The datastore's records, typed by the plugin's own parsers (canal.records)."""

    endpoints: dict[str, EndpointRecord] = field(default_factory=dict)
    addresses: dict[str, AddressRecord] = field(default_factory=dict)
    networks: dict[str, NetworkRecord] = field(default_factory=dict)
    routes: dict[str, RouteRecord] = field(default_factory=dict)
    leases: dict[str, Lease] = field(default_factory=dict)
    hosts: set[str] = field(default_factory=set)
    bad: list[Violation] = field(default_factory=list)


def parse_records(raw: Mapping[str, str], root: str = ROOT, flannel: str = FLANNEL) -> Records:
    out = Records()
    tables: list[tuple[str, Callable[[str, Any], Any], dict[str, Any]]] = [
        (f"{root}/endpoints/", endpoint_entry, out.endpoints),
        (f"{root}/ipam/addresses/", address_entry, out.addresses),
        (f"{root}/networks/", network_entry, out.networks),
        (f"{root}/routes/", route_entry, out.routes),
        (f"{flannel}/subnets/", lease_entry, out.leases),
    ]
    for key, value in sorted(raw.items()):
        if key.startswith(f"{root}/hosts/"):
            out.hosts.add(key.rsplit("/", 1)[1])
        for prefix, parse, into in tables:
            if key.startswith(prefix):
                name = key[len(prefix):]
                try:
                    into[name] = parse(name, json.loads(value))
                except (ValueError, RecordError) as err:
                    out.bad.append(Violation("record", key, f"does not parse: {err}"))
    return out


def etcd_records(etcd: Etcd) -> Records:
    raw = {}
    for prefix in (ROOT + "/", FLANNEL + "/"):
        doc = json.loads(etcd.etcdctl("get", "--prefix", prefix, "-w", "json").stdout)
        for kv in doc.get("kvs") or []:
            raw[base64.b64decode(kv["key"]).decode()] = base64.b64decode(kv["value"]).decode()
    return parse_records(raw)


_SQLITE_READ = """
import json, sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=10)
db.execute("PRAGMA query_only=1")
if sys.argv[2] == "integrity":
    print(json.dumps(db.execute("PRAGMA integrity_check").fetchone()[0]))
else:
    now = time.clock_gettime(time.CLOCK_BOOTTIME)
    print(json.dumps(dict(db.execute("SELECT key, value FROM kv WHERE lease = 0 OR lease IN "
                                     "(SELECT id FROM leases WHERE expires >= ?)", (now,)).fetchall())))
"""


def sqlite_query(host: SimHost, path: str, what: str) -> Any:
    """Read the embedded datastore from inside the host's mount namespace: SQLite resolves
    symlinks, so /proc/<pid>/root/... would land on the machine's own directory, not the
    host's (a tmpfs mounted there, say)."""
    import sys
    return json.loads(host.exec([sys.executable, "-c", _SQLITE_READ, path, what]).stdout)


def sqlite_records(host: SimHost, path: str) -> Records:
    """The embedded datastore's live keys (as LocalDatastore lists them), read query-only."""
    return parse_records(sqlite_query(host, path, "records"))


# ----------------------------------------------------------------------------- Docker's view

@dataclass(frozen=True)
class Attachment:
    host: str
    container: str
    network: str
    endpoint: str
    ip: str


def attachments(host: SimHost, driver: str = "canal") -> list[Attachment]:
    """Every endpoint Docker holds on this host's canal networks (running containers or not)."""
    nets = host.docker("network", "ls", "--filter", f"driver={driver}", "-q").stdout.split()
    out = []
    for doc in host.docker_json("network", "inspect", *nets) if nets else []:
        for cid, c in (doc.get("Containers") or {}).items():
            if cid.startswith("ep-"):
                continue  # a Swarm load balancer endpoint
            out.append(Attachment(host.name, c.get("Name", cid[:12]), doc["Name"], c["EndpointID"],
                                  c["IPv4Address"].split("/")[0]))
    return out


def running(host: SimHost) -> set[str]:
    return set(host.docker("ps", "--format", "{{.Names}}").stdout.split())


# ----------------------------------------------------------------------------- kernel's view

@dataclass
class Kernel:
    links: list[str]
    routes: dict[str, list[str]]  # proto -> destinations
    fdb: list[tuple[str, str]]  # (mac, dst)
    neigh: list[tuple[str, str]]  # (ip, mac)
    iptables: list[str]
    ipsets: dict[str, tuple[str, list[str]]]  # name -> (type, members)


def kernel(host: SimHost, vni: int = 1) -> Kernel:
    links = [l.split(":")[1].strip().split("@")[0] for l in host.ip("-o", "link").stdout.splitlines()]
    routes = {}
    for proto in PROTOS:
        out = host.exec(["ip", "route", "show", "table", "all", "proto", proto]).stdout
        routes[proto] = [l.split()[0] for l in out.splitlines() if l.strip()]
    dev = f"flannel.{vni}"
    fdb: list[tuple[str, str]] = []
    neigh: list[tuple[str, str]] = []
    if dev in links:
        for line in host.exec(["bridge", "fdb", "show", "dev", dev]).stdout.splitlines():
            f = line.split()
            if "dst" in f:
                fdb.append((f[0].lower(), f[f.index("dst") + 1]))
        for line in host.ip("neigh", "show", "dev", dev).stdout.splitlines():
            f = line.split()
            if "lladdr" in f:
                neigh.append((f[0], f[f.index("lladdr") + 1].lower()))
    rules = [l for l in host.exec(["iptables-nft-save"]).stdout.splitlines() if "CANAL" in l or "cnl" in l]
    sets: dict[str, tuple[str, list[str]]] = {}
    name, kind, members, in_members = "", "", [], False
    for line in host.exec(["ipset", "list"]).stdout.splitlines() + ["Name: "]:
        if line.startswith("Name: "):
            if name.startswith("canal-"):
                sets[name] = (kind, members)
            name, kind, members, in_members = line[6:].strip(), "", [], False
        elif line.startswith("Type: "):
            kind = line[6:].strip()
        elif line.startswith("Members:"):
            in_members = True
        elif in_members and line.strip():
            members.append(line.split()[0])
    return Kernel(links, routes, fdb, neigh, rules, sets)


# ----------------------------------------------------------------------------- the checker

@dataclass
class Probe:
    """A small fixed policy checked before and after each fault: in network `network`, a server
    (role=db, on the first host) answers the allowed client (role=app) and not the denied one
    (role=other), both on the last host."""

    network: str = "chaos-pol"
    server: str = "chaos-db"
    allowed: str = "chaos-app"
    denied: str = "chaos-other"
    server_host: str = ""  # set by setup_probe
    client_host: str = ""

    def decisions(self, hosts: Sequence[SimHost]) -> dict[str, bool]:
        srv = next(h for h in hosts if h.name == self.server_host)
        cli = next(h for h in hosts if h.name == self.client_host)
        address = ip_of(srv, self.server, self.network)
        return {name: f"pong-{self.server}" in cli.docker(
            "exec", name, "sh", "-c", f"nc -w 2 {address} 5432 </dev/null", check=False, timeout=20).stdout
            for name in (self.allowed, self.denied)}

    def expected(self) -> dict[str, bool]:
        return {self.allowed: True, self.denied: False}


def check(hosts: Sequence[SimHost], records: Records, *, vni: int = 1, connectivity: bool = True,
          probe: Optional[Probe] = None, gone: Mapping[str, str] = {}, grace: float = 60.0) -> list[Violation]:
    """Every invariant, everywhere; [] when the cluster is consistent. `gone`: hosts removed
    for good, name -> underlay address (nothing of theirs may remain in the records, and no
    peer may keep a route, FDB entry or neighbour for them)."""
    out = list(records.bad)
    live = [h for h in hosts if h.name not in gone]
    docker = {h.name: attachments(h) for h in live}
    LAST.clear()
    LAST.update(endpoints=len(records.endpoints), attachments=sum(map(len, docker.values())), pings=0)
    out += _addresses(records, docker, set(gone), grace)
    for h in live:
        out += _kernel(h, kernel(h, vni), records)
    for name, address in gone.items():
        out += [Violation("leak", f"lease {k}", f"of removed host {name}") for k, l in records.leases.items()
                if l.public_ip == address]
        if name in records.hosts:
            out.append(Violation("leak", f"{ROOT}/hosts/{name}", "record of a host removed for good"))
    if connectivity and not out:
        out += reachability(live, docker, skip={probe.network} if probe else set())
    if probe is not None and not out:
        seen = probe.decisions(live)
        if seen != probe.expected():
            out.append(Violation("policy", probe.network, f"decisions {seen}, expected {probe.expected()}"))
    return out


def _addresses(records: Records, docker: Mapping[str, list[Attachment]], gone: set[str],
               grace: float) -> list[Violation]:
    out = []
    by_ip: dict[str, list[str]] = {}
    for ep in records.endpoints.values():
        by_ip.setdefault(ep.ip_text, []).append(f"{ep.host}/{ep.id[:12]}")
    out += [Violation("duplicate-address", ip, f"in endpoint records {owners}")
            for ip, owners in by_ip.items() if len(owners) > 1]
    held: dict[str, list[str]] = {}
    for atts in docker.values():
        for a in atts:
            held.setdefault(a.ip, []).append(f"{a.host}/{a.container}")
    out += [Violation("duplicate-address", ip, f"held by containers {owners}")
            for ip, owners in held.items() if len(owners) > 1]
    known = {a.endpoint: a for atts in docker.values() for a in atts}
    for a in known.values():
        ep = records.endpoints.get(a.endpoint)
        if ep is None:
            out.append(Violation("missing", f"{a.host}/{a.container}", f"endpoint {a.endpoint[:12]} has no record"))
        elif ep.ip_text != a.ip:
            out.append(Violation("duplicate-address", f"{a.host}/{a.container}",
                                 f"Docker says {a.ip}, the record {ep.ip_text}"))
    for ep in records.endpoints.values():
        if ep.host in gone:
            out.append(Violation("leak", f"endpoint {ep.id[:12]}", f"of removed host {ep.host}"))
        elif ep.host in docker and ep.id not in known:
            out.append(Violation("allocation", f"{ep.host}/endpoint {ep.id[:12]}",
                                 f"record ({ep.ip_text}) of an endpoint Docker does not have"))
    now = time.time()
    for a in records.addresses.values():
        where = f"address {a.ip} ({a.host})"
        if a.host in gone:
            out.append(Violation("leak", where, f"allocated to removed host {a.host}"))
        elif a.kind == "endpoint" and a.endpoint:
            ep = records.endpoints.get(a.endpoint)
            if ep is None or ep.ip != a.ip:
                out.append(Violation("allocation", where, f"bound to endpoint {a.endpoint[:12]} which has no record"))
        elif a.kind == "endpoint" and now - a.time > grace:
            out.append(Violation("allocation", where, f"unbound for {now - a.time:.0f} s"))
    bound = {a.endpoint for a in records.addresses.values()}
    out += [Violation("allocation", f"endpoint {ep.id[:12]}", f"{ep.ip_text} without its address record")
            for ep in records.endpoints.values() if ep.id not in bound]
    return out


def _kernel(host: SimHost, k: Kernel, records: Records) -> list[Violation]:
    out = []
    where = host.name
    local = {ep.id[:12]: ep for ep in records.endpoints.values() if ep.host == host.name}
    joined = {i: ep for i, ep in local.items() if ep.joined}
    veths = {l[3:] for l in k.links if VETH.fullmatch(l)}
    out += [Violation("leak", where, f"veth cnl{i} without a joined endpoint record") for i in sorted(veths - set(joined))]
    out += [Violation("missing", where, f"no veth for joined endpoint {i} ({joined[i].ip_text})")
            for i in sorted(set(joined) - veths)]
    own_ips = {f"{ep.ip_text}" for ep in joined.values()}
    out += [Violation("leak", where, f"veth route {dst} (proto 101) without a local endpoint record")
            for dst in k.routes["101"] if dst.split("/")[0] not in own_ips or dst.endswith("/0")]
    own_lease = [l for l in records.leases.values() if l.public_ip == host.address]
    peers = [l for l in records.leases.values() if l.public_ip != host.address]
    tunnel_dsts = {str(l.subnet) for l in peers}
    tunnel_dsts |= {f"{r.ip}" for r in records.routes.values() if r.host != host.name}
    for proto in ("102", "103", "104"):
        for dst in k.routes[proto]:
            if dst.removesuffix("/32") not in tunnel_dsts and dst not in tunnel_dsts:
                out.append(Violation("leak", where, f"{PROTOS[proto]} route {dst} (proto {proto}) without a lease "
                                                    "or route record of a peer"))
    fdb_ok = {(l.vtep_mac, l.public_ip) for l in peers}
    out += [Violation("leak", where, f"FDB {mac} dst {dst} without a peer's lease")
            for mac, dst in k.fdb if mac != "00:00:00:00:00:00" and (mac, dst) not in fdb_ok]
    neigh_ok = {(str(l.subnet.network_address), l.vtep_mac) for l in peers}
    out += [Violation("leak", where, f"neighbour {ip} lladdr {mac} without a peer's lease")
            for ip, mac in k.neigh if (ip, mac) not in neigh_ok]
    if own_lease:
        out += [Violation("missing", where, f"no FDB entry for peer {l.public_ip} ({l.vtep_mac})")
                for l in peers if l.vtep_mac and (l.vtep_mac, l.public_ip) not in set(k.fdb)]
    for rule in k.iptables:
        for ident in set(EP_CHAIN.findall(rule)) | {m[3:] for m in VETH.findall(rule)}:
            if ident not in local:
                out.append(Violation("leak", where, f"iptables names endpoint {ident} without a local record: {rule}"))
    all_ips = {ep.ip_text for ep in records.endpoints.values()}
    for name, (kind, members) in k.ipsets.items():
        if kind != "hash:ip":
            continue
        scope = {ep.ip_text for ep in local.values()} if name == "canal-masq" else all_ips
        out += [Violation("leak", where, f"ipset {name} member {m} without an endpoint record")
                for m in members if m not in scope]
    return out


def reachability(hosts: Sequence[SimHost], docker: Mapping[str, list[Attachment]],
                 skip: set[str] = frozenset()) -> list[Violation]:  # type: ignore[assignment]
    """Every running container pings a peer of its network on each other host (and one on its
    own), so a broken veth, route, FDB entry or chain anywhere shows up."""
    alive = {h.name: running(h) for h in hosts}
    by_net: dict[str, list[Attachment]] = {}
    for atts in docker.values():
        for a in atts:
            if a.container in alive[a.host] and a.network not in skip:
                by_net.setdefault(a.network, []).append(a)
    host_of = {h.name: h for h in hosts}
    pairs = []
    for members in by_net.values():
        for a in members:
            targets: dict[str, Attachment] = {}
            for b in members:
                if b.endpoint != a.endpoint:
                    targets.setdefault(b.host, b)
            pairs += [(a, b) for b in targets.values()]

    def ping(pair: tuple[Attachment, Attachment]) -> Optional[Violation]:
        a, b = pair
        res = host_of[a.host].docker("exec", a.container, "ping", "-c1", "-W2", b.ip, check=False, timeout=30)
        if res.returncode == 0:
            return None
        return Violation("connectivity", f"{a.host}/{a.container}", f"cannot reach {b.host}/{b.container} ({b.ip})")

    LAST["pings"] = len(pairs)
    with ThreadPoolExecutor(max_workers=8) as pool:
        return [v for v in pool.map(ping, pairs) if v is not None]


def settle(check_once: Callable[[], list[Violation]], timeout: float, interval: float = 1.0
           ) -> tuple[list[Violation], float]:
    """Check until nothing is violated (or timeout); returns (last violations, seconds taken):
    the recovery time of a scenario."""
    started = time.monotonic()
    while True:
        try:
            found = check_once()
        except TestbedError as err:  # a host not answering yet (dockerd restarting)
            found = [Violation("check", "testbed", str(err)[:300])]
        took = time.monotonic() - started
        if not found or took >= timeout:
            return found, took
        time.sleep(interval)


# ----------------------------------------------------------------------------- workload helpers

def ip_of(host: SimHost, container: str, network: str) -> str:
    return host.docker_json("inspect", container)[0]["NetworkSettings"]["Networks"][network]["IPAddress"]


def canal_cli(host: SimHost, *args: str, input: Optional[str] = None) -> str:
    return host.exec([host.plugin_argv()[0], "-m", "canal", *args], input=input).stdout


def network(host: SimHost, name: str, *opts: str) -> None:
    if host.docker("network", "inspect", name, check=False).returncode != 0:
        host.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", *opts, name)


# A sleeper's PID 1 (sleep; sh for the probe's server) ignores SIGTERM: a dockerd shutdown (a
# restart without --live-restore) always ends in SIGKILL, and 0 s sends it at once rather than
# after Docker's default 10 s.
STOP = ("--stop-timeout", "0")


def sleeper(host: SimHost, name: str, net: str, *opts: str) -> None:
    host.docker("run", "-d", "--name", name, "--network", net, *STOP, *opts, IMAGE, "sleep", "100000")


def setup_probe(hosts: Sequence[SimHost], probe: Probe) -> None:
    """The policy probe's network, containers and policy (see Probe)."""
    for h in hosts:
        network(h, probe.network)
    srv, cli = hosts[0], hosts[-1]
    probe.server_host, probe.client_host = srv.name, cli.name
    srv.docker("run", "-d", "--name", probe.server, "--network", probe.network, "--label", "role=db",
               "--restart", "always", *STOP, IMAGE,
               "sh", "-c", f"while true; do echo pong-{probe.server} | nc -l -p 5432; done & sleep 100000")
    for name, role in ((probe.allowed, "app"), (probe.denied, "other")):
        sleeper(cli, name, probe.network, "--label", f"role={role}", "--restart", "always")
    doc = {"apiVersion": "canal/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "chaos-db", "network": probe.network},
           "spec": {"selector": "role == 'db'", "ingress": [
               {"action": "Allow", "protocol": "TCP", "source": {"selector": "role == 'app'"}}]}}
    canal_cli(srv, "policy", "apply", "-f", "-", input=json.dumps(doc))


def churn(host: SimHost, net: str, count: int, prefix: str, rng: random.Random, workers: int = 8
          ) -> list[str]:
    """`count` concurrent `docker run -d` then a random half `docker rm -f`, failures allowed
    (a plugin killed meanwhile fails some); returns the names that were started."""
    names = [f"{prefix}-{uuid.uuid4().hex[:6]}" for _ in range(count)]

    def start(name: str) -> str:
        res = host.docker("run", "-d", "--name", name, "--network", net, IMAGE, "sleep", "100000",
                          check=False, timeout=120)
        return name if res.returncode == 0 else ""

    with ThreadPoolExecutor(max_workers=workers) as pool:
        started = [n for n in pool.map(start, names) if n]
        doomed = rng.sample(started, len(started) // 2)
        list(pool.map(lambda n: host.docker("rm", "-f", n, check=False, timeout=120), doomed))
    return started


def remove_failed(host: SimHost) -> None:
    """Containers a fault left created but not running (their `docker run` failed): removed,
    as a user would after a failed run; the invariants are about what runs."""
    ids = host.docker("ps", "-aq", "--filter", "status=created", "--filter", "status=exited").stdout.split()
    if ids:
        host.docker("rm", "-f", *ids, check=False, timeout=120)


def kill_plugin_at_random(host: SimHost, rng: random.Random, window: float) -> float:
    """SIGKILL the plugin (its whole process group: the gunicorn master and workers) at a
    random moment within `window` seconds; returns the delay used."""
    delay = rng.uniform(0, window)
    time.sleep(delay)
    host.stop_plugin(signal.SIGKILL)
    return delay


__all__ = ["Attachment", "Kernel", "Probe", "Records", "Violation", "attachments", "canal_cli", "check", "churn",
           "etcd_records", "ip_of", "kernel", "kill_plugin_at_random", "network", "parse_records", "reachability",
           "remove_failed", "settle", "setup_probe", "sleeper", "sqlite_records"]


# ----------------------------------------------------------------------------- scenarios

@dataclass
class Bed:
    """Two or more etcd-backed hosts, the policy probe, and how to (re)start their plugins."""

    etcd: Etcd
    hosts: list[SimHost]
    plugin_args: Callable[[SimHost], list[str]]
    probe: Probe = field(default_factory=Probe)
    grace: float = 5.0
    net: str = "chaos"
    underlay: Any = None  # where scenario_host_gone adds its short-lived host

    def records(self) -> Records:
        return etcd_records(self.etcd)

    def check(self, **kw: Any) -> list[Violation]:
        return check(self.hosts, self.records(), probe=self.probe, grace=self.grace, **kw)

    def settle(self, timeout: float = 90, **kw: Any) -> tuple[list[Violation], float]:
        return settle(lambda: self.check(**kw), timeout)

    def setup(self) -> None:
        for h in self.hosts:
            network(h, self.net)
        setup_probe(self.hosts, self.probe)

    def ensure_up(self) -> None:
        """What a failed scenario may have left down: etcd, dockerds, plugins, a partition."""
        if self.etcd.proc is not None and self.etcd.running():
            _signal_group(self.etcd.proc.pid, signal.SIGCONT)
        self.etcd.start()
        for h in self.hosts:
            heal(h, self.etcd)
            if not h.dockerd_running():
                h.start_dockerd(h._dockerd_args)
            if not h.plugin_running():
                h.start_plugin(self.plugin_args(h))

    def clear_churn(self) -> None:
        """Remove every container but the probe's."""
        keep = {self.probe.server, self.probe.allowed, self.probe.denied}
        for h in self.hosts:
            names = [n for n in h.docker("ps", "-a", "--format", "{{.Names}}").stdout.split() if n not in keep]
            if names:
                h.docker("rm", "-f", *names, check=False, timeout=120)


@dataclass
class Outcome:
    scenario: str
    seed: int
    violations: list[Violation]
    recovery: float  # seconds from the fault's end until the checker found nothing
    note: str = ""


def _signal_group(pid: int, sig: int) -> None:
    import os
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def scenario_kill(bed: Bed, seed: int, count: int = 10, window: float = 4.0) -> Outcome:
    """(a) kill -9 of a plugin at a random moment of concurrent runs and removals on every
    host; the plugin restarted at once, Docker retries its calls, the leftovers of failed runs
    removed; then every invariant must hold again."""
    rng = random.Random(seed)
    victim = rng.choice(bed.hosts)
    per_host = max(1, count // len(bed.hosts))
    with ThreadPoolExecutor(max_workers=len(bed.hosts) + 1) as pool:
        runs = [pool.submit(churn, h, bed.net, per_host, f"k{seed % 1000}", random.Random(rng.random()))
                for h in bed.hosts]
        delay = kill_plugin_at_random(victim, rng, window)
        victim.start_plugin(bed.plugin_args(victim))
        started = sum(len(r.result()) for r in runs)
    ended = time.monotonic()
    for h in bed.hosts:
        remove_failed(h)
    found, _ = bed.settle()
    return Outcome("kill -9 plugin", seed, found, time.monotonic() - ended,
                   f"{victim.name} killed after {delay:.2f} s; {started}/{per_host * len(bed.hosts)} runs succeeded; "
                   f"checked {LAST.get('attachments')} endpoints, {LAST.get('pings')} pings")


def stop_dockerd_live(host: SimHost) -> None:
    """Stop dockerd alone (SIGTERM): with --live-restore its containerd and shims keep the
    containers running, so nothing else of the host is swept (SimHost.stop_dockerd would)."""
    from testbed._util import stop_popen
    stop_popen(host.dockerd, signal.SIGTERM, 30, group=False)


def scenario_dockerd(bed: Bed, seed: int, live_restore: bool, count: int = 2) -> Outcome:
    """(b) dockerd restarted while containers run. With --live-restore the containers keep
    running and keep talking to their peers while dockerd is down; without, they stop and come
    back (--restart always) with their addresses and connectivity."""
    rng = random.Random(seed)
    host = rng.choice(bed.hosts)
    flags = ["--live-restore"] if live_restore else []
    if tuple(flags) != host._dockerd_args:
        host.restart_dockerd(flags)
    names = [f"d{seed % 1000}-{h.name}-{i}" for h in bed.hosts for i in range(count)]
    for h in bed.hosts:
        for i in range(count):
            sleeper(h, f"d{seed % 1000}-{h.name}-{i}", bed.net, "--restart", "always")
    found, _ = bed.settle()
    if found:
        return Outcome(f"dockerd restart ({'live-restore' if live_restore else 'no live-restore'})", seed, found, 0,
                       "not consistent before the fault")
    peer = next(h for h in bed.hosts if h is not host)
    target = ip_of(host, f"d{seed % 1000}-{host.name}-0", bed.net)
    note = ""
    if live_restore:
        stop_dockerd_live(host)
        # The kernel state is the plugin's, not dockerd's: traffic flows while dockerd is down.
        res = peer.docker("exec", f"d{seed % 1000}-{peer.name}-0", "ping", "-c3", "-W2", target, check=False)
        note = "peers reach its containers while dockerd is down" if res.returncode == 0 else \
            "NOT reachable while dockerd was down"
        violations_down = [] if res.returncode == 0 else [Violation("connectivity", host.name, note)]
        host.start_dockerd(flags)
    else:
        host.restart_dockerd(flags)
        violations_down = []
    ended = time.monotonic()
    found, _ = bed.settle()
    after = {n for n in running(host) if n.startswith(f"d{seed % 1000}-{host.name}-")}
    missing = [Violation("missing", host.name, f"container {n} not running after the restart")
               for n in names if n.startswith(f"d{seed % 1000}-{host.name}-") and n not in after]
    if not live_restore and ip_of(host, f"d{seed % 1000}-{host.name}-0", bed.net) != target:
        note = "came back with another address"
    return Outcome(f"dockerd restart ({'live-restore' if live_restore else 'no live-restore'})", seed,
                   violations_down + missing + found, time.monotonic() - ended, note)


def scenario_etcd_stop(bed: Bed, seed: int, outage: float = 15, count: int = 4) -> Outcome:
    """(c) etcd frozen (SIGSTOP) for `outage` s, longer than the lease TTL, while one host
    tries to run and remove containers (its calls fail, clearly); then SIGCONT: leases renewed
    or re-acquired, the dataplane consistent again without help."""
    rng = random.Random(seed)
    busy = rng.choice(bed.hosts)
    assert bed.etcd.proc is not None
    _signal_group(bed.etcd.proc.pid, signal.SIGSTOP)
    try:
        end = time.monotonic() + outage
        tried = failed = 0
        while time.monotonic() < end:
            name = f"e{seed % 1000}-{uuid.uuid4().hex[:6]}"
            res = busy.docker("run", "-d", "--name", name, "--network", bed.net, IMAGE, "sleep", "100000",
                              check=False, timeout=60)
            tried += 1
            failed += res.returncode != 0
            busy.docker("rm", "-f", name, check=False, timeout=60)
            if tried >= count:
                time.sleep(max(0.0, end - time.monotonic()))
    finally:
        _signal_group(bed.etcd.proc.pid, signal.SIGCONT)
    ended = time.monotonic()
    remove_failed(busy)
    found, _ = bed.settle()
    return Outcome(f"etcd SIGSTOP {outage:g} s", seed, found, time.monotonic() - ended,
                   f"{failed}/{tried} runs on {busy.name} failed during the outage")


def partition(host: SimHost, etcd: Etcd) -> None:
    """Drop this host's traffic to etcd, in the host's own netns only."""
    addr = etcd.endpoint.split("//")[1].split(":")[0]
    host.exec(["iptables", "-w", "-I", "OUTPUT", "-d", f"{addr}/32", "-p", "tcp", "-j", "DROP"])


def heal(host: SimHost, etcd: Etcd) -> None:
    addr = etcd.endpoint.split("//")[1].split(":")[0]
    while host.exec(["iptables", "-w", "-D", "OUTPUT", "-d", f"{addr}/32", "-p", "tcp", "-j", "DROP"],
                    check=False).returncode == 0:
        pass


def scenario_partition(bed: Bed, seed: int, outage: float = 15, count: int = 4) -> Outcome:
    """(c) one host cut from etcd for `outage` s (longer than its lease) while another runs
    and removes containers; healed, it must catch up and be reachable again, unaided."""
    rng = random.Random(seed)
    cut = rng.choice(bed.hosts)
    busy = next(h for h in bed.hosts if h is not cut)
    partition(cut, bed.etcd)
    try:
        end = time.monotonic() + outage
        started = churn(busy, bed.net, count, f"p{seed % 1000}", rng)
        time.sleep(max(0.0, end - time.monotonic()))
    finally:
        heal(cut, bed.etcd)
    ended = time.monotonic()
    found, _ = bed.settle()
    return Outcome(f"partition from etcd {outage:g} s", seed, found, time.monotonic() - ended,
                   f"{cut.name} cut; {busy.name} started {len(started)} containers meanwhile")


def scenario_host_gone(bed: Bed, seed: int, count: int = 2, name: str = "h9", address: str = "198.18.0.9"
                       ) -> Outcome:
    """(e) a third host joins, runs containers that its peers reach, then is removed for good
    (plugin and dockerd killed, its namespace deleted): its lease expires, the peers remove its
    routes, FDB and neighbour entries, and its records are collected (--host-absence)."""
    rng = random.Random(seed)
    from testbed import SimHost as Host
    extra = Host(bed.underlay, name, address)
    try:
        extra.start_dockerd()
        extra.load_image()
        extra.start_plugin(bed.plugin_args(extra))
        network(extra, bed.net)
        for i in range(count):
            sleeper(extra, f"g{i}-{rng.randrange(1000)}", bed.net)
        bed.hosts.append(extra)
        try:
            found, _ = bed.settle()
        finally:
            bed.hosts.remove(extra)
        if found:
            return Outcome("host removed for good", seed, found, 0, "not consistent before the fault")
        peers = {h.name: len(kernel(h).fdb) for h in bed.hosts}
        extra.stop_plugin(signal.SIGKILL)
        extra.stop_dockerd(signal.SIGKILL)
    finally:
        extra.close()
    ended = time.monotonic()
    found, _ = bed.settle(timeout=300, gone={name: address})
    return Outcome("host removed for good", seed, found, time.monotonic() - ended,
                   f"{name} removed; peers' FDB entries before: {peers}")


def scenario_disk_full(host: SimHost, seed: int, state_dir: str, plugin_args: list[str], grace: float,
                       net: str = "chaos", count: int = 6) -> Outcome:
    """(d) the embedded datastore's disk full (a tiny tmpfs for the state dir, inside the host's
    mount namespace): `docker run` refused with a clear error; the plugin killed while runs are
    in flight; SQLite's integrity check passes on what the killed process left; space freed and
    the plugin restarted, every invariant holds again and new containers run."""
    rng = random.Random(seed)
    fill = f"{state_dir}/cnlt-fill"
    db = f"{state_dir}/canal.db"
    host.exec(["sh", "-c", f"dd if=/dev/zero of={fill} bs=4k 2>/dev/null; sync; true"])
    found: list[Violation] = []
    try:
        refused = host.docker("run", "-d", "--name", f"full-{seed % 1000}", "--network", net, IMAGE,
                              "sleep", "100000", check=False, timeout=120)
        if refused.returncode == 0 or "full" not in refused.stderr:
            found.append(Violation("error", host.name, "docker run with the disk full: "
                                   f"exit {refused.returncode}, {refused.stderr.strip()[-300:]!r}"))
        pool = ThreadPoolExecutor(max_workers=4)
        runs = [pool.submit(host.docker, "run", "-d", "--name", f"f{i}-{rng.randrange(10**6)}", "--network", net,
                            IMAGE, "sleep", "100000", check=False, timeout=120) for i in range(count)]
        kill_plugin_at_random(host, rng, 1.0)
    finally:
        host.exec(["rm", "-f", fill])
    # What the killed process left, opened as the restarted plugin will (WAL recovery included).
    integrity = sqlite_query(host, db, "integrity")
    if integrity != "ok":
        found.append(Violation("record", db, f"integrity_check after kill -9: {integrity}"))
    host.start_plugin(plugin_args)
    ended = time.monotonic()
    results = [r.result() for r in runs]
    pool.shutdown()
    remove_failed(host)
    after, _ = settle(lambda: check([host], sqlite_records(host, db), grace=grace), 90)
    sleeper(host, f"after-{seed % 1000}", net)  # space freed: runs work again
    failed = sum(r.returncode != 0 for r in results)
    return Outcome("SQLite disk full + kill -9", seed, found + after, time.monotonic() - ended,
                   f"refusal: {refused.stderr.strip()[-160:]!r}; {failed}/{count} runs in flight failed")


class EtcdMember(Etcd):
    """One member of a three-member etcd cluster on the underlay: its own client port on the
    gateway address, its peer port on the underlay netns' loopback."""

    def __init__(self, underlay: Any, index: int, initial_cluster: str) -> None:
        self.initial_cluster = initial_cluster
        super().__init__(underlay, client_port=2379 + 10000 * index, peer_port=2380 + 10000 * index,
                         name=f"cnlt-etcd{index}")

    def argv(self) -> list[str]:
        argv = super().argv()
        argv[argv.index("--initial-cluster") + 1] = self.initial_cluster
        return argv


class EtcdCluster:
    """Three members started together (one alone has no quorum, so none is healthy before a
    second one runs); duck-types Etcd for Bed and the checker: every endpoint, comma-separated."""

    def __init__(self, underlay: Any, size: int = 3) -> None:
        cluster = ",".join(f"cnlt-etcd{i}=http://127.0.0.1:{2380 + 10000 * i}" for i in range(size))
        with ThreadPoolExecutor(max_workers=size) as pool:
            self.members = list(pool.map(lambda i: EtcdMember(underlay, i, cluster), range(size)))
        self.endpoint = ",".join(m.endpoint for m in self.members)
        self.proc = self.members[0].proc

    def etcdctl(self, *args: str, check: bool = True, timeout: float = 15) -> Any:
        live = self.members[[m.running() for m in self.members].index(True)]
        return live.underlay.exec(["etcdctl", "--endpoints", self.endpoint, "--dial-timeout", "2s", *args],
                                  check=check, timeout=timeout, env={"ETCDCTL_API": "3"})

    def running(self) -> bool:
        return all(m.running() for m in self.members)

    def start(self) -> None:
        for m in self.members:
            m.start()


def scenario_etcd_member(bed: Bed, seed: int, count: int = 6) -> Outcome:
    """A three-member etcd cluster loses a member (SIGKILL) while both hosts run and remove
    containers: the plugins fail over to the other endpoints; the member restarted rejoins."""
    rng = random.Random(seed)
    cluster = bed.etcd
    assert isinstance(cluster, EtcdCluster)
    victim = cluster.members[0]  # the first endpoint: the one every client talks to first
    victim.stop(signal.SIGKILL)
    with ThreadPoolExecutor(max_workers=len(bed.hosts)) as pool:
        started = sum(len(n) for n in pool.map(
            lambda h: churn(h, bed.net, count // len(bed.hosts), f"m{seed % 1000}", random.Random(rng.random())),
            bed.hosts))
    ended = time.monotonic()
    for h in bed.hosts:
        remove_failed(h)
    found, _ = bed.settle()
    recovery = time.monotonic() - ended
    victim.start()
    again, _ = bed.settle()
    return Outcome("etcd member lost (3 members)", seed, found + again, recovery,
                   f"{victim.name} killed; {started}/{count} runs succeeded without it; rejoined")


__all__ += ["Bed", "Outcome", "heal", "partition", "scenario_dockerd", "scenario_etcd_stop", "scenario_kill",
            "scenario_partition", "stop_dockerd_live", "scenario_host_gone", "scenario_disk_full",
            "EtcdCluster", "EtcdMember", "scenario_etcd_member"]
