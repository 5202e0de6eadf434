"""Docker Swarm services on canal networks: the managed plugin (CANAL_SCOPE=global) installed
from a registry on both nodes of a real two-node swarm, etcd as the datastore.

Services talk across nodes, label policy governs them across nodes, plugin disable/enable keeps
tasks connected, and scaling to zero or removing a service leaves nothing behind on any node.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from e2e_support import IMAGE
from test_managed_plugin import Registry, exec_root_source, plugin_enabled, plugin_host, remove_everything

from testbed import REPO, Etcd, SimHost, TestbedError, Underlay, wait_until
from testbed._util import cgroup_dirs, remove_cgroups, run

pytestmark = pytest.mark.e2e

CLUSTER = "100.64.0.0/16"
SETTINGS = ["CANAL_DATASTORE=etcd", f"CANAL_NETWORK={CLUSTER}", "CANAL_SCOPE=global",
            "CANAL_LOG_LEVEL=debug", "CANAL_ETCD_TIMEOUT=2", "CANAL_RESYNC_INTERVAL=5"]
PLUGIN_IDS: list[str] = []


class Swarm:
    def __init__(self, etcd: Etcd, manager: SimHost, worker: SimHost, ref: str):
        self.etcd, self.manager, self.worker, self.ref = etcd, manager, worker, ref

    @property
    def nodes(self) -> tuple[SimHost, SimHost]:
        return (self.manager, self.worker)

    def install(self, h: SimHost) -> None:
        h.docker("plugin", "install", "--grant-all-permissions", self.ref, exec_root_source(h),
                 f"CANAL_ETCD_ENDPOINTS={self.etcd.endpoint}", *SETTINGS, timeout=600)
        PLUGIN_IDS.append(h.docker("plugin", "inspect", "-f", "{{.Id}}", self.ref).stdout.strip())


@pytest.fixture(scope="module")
def swarm(plugin_rootfs) -> Iterator[Swarm]:
    ul = Underlay()
    registry = None
    nodes: list[SimHost] = []
    ref = ""
    try:
        etcd = Etcd(ul)
        registry = Registry(ul)
        ref = f"{registry.address}/canal:swarm"
        for i in (1, 2):
            nodes.append(plugin_host(ul, f"s{i}", f"198.18.0.{i}", registry))
        manager, worker = nodes
        # plugin_rootfs built (or found cached) the rootfs; this only runs `docker plugin create`.
        run([str(REPO / "scripts" / "build-plugin"), ref], timeout=1800,
            env={"DOCKER_HOST": f"unix://{manager.docker_sock}", "DOCKER_CONFIG": str(manager.workdir / "docker-cli")})
        manager.docker("plugin", "push", ref, timeout=600)
        manager.docker("plugin", "rm", ref)
        s = Swarm(etcd, manager, worker, ref)
        for h in nodes:
            s.install(h)
        manager.docker("swarm", "init", "--advertise-addr", manager.address)
        token = manager.docker("swarm", "join-token", "-q", "worker").stdout.strip()
        worker.docker("swarm", "join", "--token", token, f"{manager.address}:2377")
        yield s
    finally:
        for h in nodes:
            try:
                if h.dockerd_running():
                    for svc in h.docker("service", "ls", "-q", check=False).stdout.split():
                        h.docker("service", "rm", svc, check=False)
                remove_everything(h, ref)
            except Exception as exc:  # noqa: BLE001 - the hosts are destroyed below anyway
                print(f"cleanup of {h.name}: {exc!r}")
        if registry is not None:
            registry.close()
        ul.close()
        for plugin_id in PLUGIN_IDS:
            remove_cgroups(cgroup_dirs(plugin_id))


@pytest.fixture
def sw(swarm) -> Iterator[Swarm]:
    """The swarm with the plugin enabled on both nodes; services and networks removed after
    each test, and then nothing of theirs may remain on any node or in etcd."""
    for h in swarm.nodes:
        if not plugin_enabled(h, swarm.ref):
            h.docker("plugin", "enable", swarm.ref)
    yield swarm
    m = swarm.manager
    for svc in m.docker("service", "ls", "-q").stdout.split():
        m.docker("service", "rm", svc)
    for h in swarm.nodes:
        wait_until(lambda h=h: not h.docker("ps", "-aq").stdout.split(), timeout=60, what="tasks gone")
    for net in m.docker("network", "ls", "--filter", f"driver={swarm.ref}", "-q").stdout.split():
        m.docker("network", "rm", net)
    for h in swarm.nodes:
        wait_until(lambda h=h: not [l for l in h.ip("-o", "link").stdout.splitlines() if ": cnl" in l],
                   timeout=30, what=f"veths gone on {h.name}")
    def leftovers():
        keys = swarm.etcd.etcdctl("get", "--prefix", "--keys-only", "/canal/v1/").stdout.split()
        return [k for k in keys if "/hosts/" not in k]
    wait_until(lambda: leftovers() == [], timeout=30, what="no records left in etcd")


# A task's main process (sleep, or sh running nc) is its container's PID 1, which ignores
# SIGTERM: stopping a task always ends in SIGKILL. Swarm's default grace period (10 s) only
# delayed that kill, on every scale-down, drain, forced update and removal; 0 s sends the same
# SIGTERM then SIGKILL at once, so the plugin sees the same container exits, sooner.
STOP = ("--stop-grace-period", "0s")


def service(sw: Swarm, name: str, network: str, *opts: str, replicas: int = 2, cmd: tuple = ("sleep", "100000")) -> None:
    sw.manager.docker("service", "create", "--detach", "--name", name, "--network", network,
                      "--replicas", str(replicas), *STOP, *opts, IMAGE, *cmd, timeout=120)
    try:
        wait_until(lambda: running_tasks(sw, name) == replicas, timeout=90, what=f"{replicas} tasks of {name}")
    except TestbedError:
        states = sw.manager.docker("service", "ps", "--no-trunc", name, "--format", "{{.Node}} {{.CurrentState}} {{.Error}}").stdout
        raise TestbedError(f"{name}: tasks not running:\n{states}") from None


def running_tasks(sw: Swarm, name: str) -> int:
    out = sw.manager.docker("service", "ps", name, "--filter", "desired-state=running",
                            "--format", "{{.CurrentState}}").stdout.splitlines()
    return sum(1 for line in out if line.startswith("Running"))


def tasks(sw: Swarm, name: str) -> list[tuple[SimHost, str]]:
    """(node, container id) of each running task of the service."""
    out = []
    for h in sw.nodes:
        for cid in h.docker("ps", "-q", "--filter", f"label=com.docker.swarm.service.name={name}").stdout.split():
            out.append((h, cid))
    return out


def task_ip(h: SimHost, cid: str, network: str) -> str:
    return h.docker_json("inspect", cid)[0]["NetworkSettings"]["Networks"][network]["IPAddress"]


def reaches(h: SimHost, cid: str, target: str, timeout: float = 15) -> bool:
    try:
        wait_until(lambda: h.container_exec(cid, "ping", "-c1", "-W1", target, check=False).returncode == 0,
                   timeout=timeout, interval=0.3, what=f"ping {target}")
        return True
    except TestbedError:
        return False


def swarm_net(sw: Swarm, name: str, *opts: str) -> dict:
    sw.manager.docker("network", "create", "-d", sw.ref, "--ipam-driver", sw.ref, "--attachable", *opts, name)
    # The swarm allocates the network asynchronously: its IPAM config appears when done.
    return wait_until(lambda: (lambda n: n if n["IPAM"]["Config"] else None)(
        sw.manager.docker_json("network", "inspect", name)[0]), timeout=30, what=f"{name} allocated")


def test_swarm_network_and_services_across_nodes(sw):
    info = swarm_net(sw, "appnet")
    assert info["Scope"] == "swarm" and info["IPAM"]["Config"][0]["Subnet"] == CLUSTER
    service(sw, "api", "appnet", "--endpoint-mode", "dnsrr",
            cmd=("sh", "-c", "while true; do echo pong-api | nc -l -p 8080; done"))
    service(sw, "client", "appnet", "--endpoint-mode", "dnsrr")
    placed = {h.name for h, _ in tasks(sw, "api") + tasks(sw, "client")}
    assert placed == {"s1", "s2"}, placed  # spread over both nodes
    api_ips = sorted(task_ip(h, cid, "appnet") for h, cid in tasks(sw, "api"))
    assert len(set(api_ips)) == 2
    for h, cid in tasks(sw, "client"):
        resolved = h.container_exec(cid, "nslookup", "api").stdout
        assert all(ip in resolved for ip in api_ips), resolved
        for ip in api_ips:  # each client reaches each api task, on its own node and the other
            assert reaches(h, cid, ip)
            out = h.container_exec(cid, "sh", "-c", f"nc -w 2 {ip} 8080 </dev/null", check=False, timeout=20).stdout
            assert "pong-api" in out


def test_service_on_two_canal_networks_across_nodes(sw):
    """A service on two canal networks (--network twice), one task per node: each of its tasks
    reaches the tasks of a service on either network by their addresses, on its own node and
    on the other; tasks of the two single-network services do not reach each other."""
    swarm_net(sw, "neta")
    swarm_net(sw, "netb")
    spread = ("--endpoint-mode", "dnsrr", "--replicas-max-per-node", "1")
    service(sw, "multi", "neta", "--network", "netb", *spread)
    service(sw, "ona", "neta", *spread)
    service(sw, "onb", "netb", *spread)
    for name in ("multi", "ona", "onb"):
        assert {h.name for h, _ in tasks(sw, name)} == {"s1", "s2"}, name
    on_a = [task_ip(h, cid, "neta") for h, cid in tasks(sw, "ona")]
    on_b = [task_ip(h, cid, "netb") for h, cid in tasks(sw, "onb")]
    for h, cid in tasks(sw, "multi"):
        for ip in on_a + on_b:
            assert reaches(h, cid, ip), (h.name, ip, h.container_exec(cid, "ip", "route").stdout)
    # Each single-network task reaches the multi-network tasks on its own network (the
    # positive control of the isolation below) and no task of the other network.
    isolated = []
    for svc, own, other in (("ona", "neta", on_b), ("onb", "netb", on_a)):
        for h, cid in tasks(sw, svc):
            for mh, mcid in tasks(sw, "multi"):
                assert reaches(h, cid, task_ip(mh, mcid, own)), (svc, h.name, mh.name)
            isolated += [(svc, h, cid, ip) for ip in other]
    # Each of these pairs must stay unreachable for 3 s: the pairs tried all at once (each its
    # own task and target), so the 3 s are spent once rather than once per pair.
    with ThreadPoolExecutor(max_workers=len(isolated)) as pool:
        reached = list(pool.map(lambda t: reaches(t[1], t[2], t[3], timeout=3), isolated))
    assert len(isolated) == 8 and not any(reached), [(s, h.name, ip) for (s, h, _, ip), r in zip(isolated, reached) if r]


def test_scale_and_remove_leave_nothing_behind(sw):
    swarm_net(sw, "scaled")
    service(sw, "web", "scaled", "--endpoint-mode", "dnsrr", replicas=4)
    before = json.loads(json.dumps(sw.etcd.etcdctl("get", "--prefix", "--keys-only", "/canal/v1/ipam/addresses/").stdout.split()))
    assert len(before) >= 5  # the gateway + 4 tasks
    sw.manager.docker("service", "scale", "--detach", "web=0")
    for h in sw.nodes:
        wait_until(lambda h=h: not h.docker("ps", "-q").stdout.split(), timeout=60, what="tasks stopped")
        wait_until(lambda h=h: not [l for l in h.ip("-o", "link").stdout.splitlines() if ": cnl" in l],
                   timeout=30, what="veths gone")
    def task_addresses():
        out = sw.etcd.etcdctl("get", "--prefix", "/canal/v1/ipam/addresses/", "--print-value-only").stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{") and json.loads(line)["kind"] == "endpoint"]
    wait_until(lambda: task_addresses() == [], timeout=30, what="task addresses released")
    service_scale = sw.manager.docker("service", "scale", "--detach", "web=2")
    assert service_scale.returncode == 0
    wait_until(lambda: running_tasks(sw, "web") == 2, timeout=90, what="scaled back up")


def test_policy_for_services_across_nodes(sw):
    swarm_net(sw, "polnet")
    service(sw, "db", "polnet", "--endpoint-mode", "dnsrr", "--replicas-max-per-node", "1",
            cmd=("sh", "-c", "while true; do echo pong-db | nc -l -p 5432; done"))
    service(sw, "api", "polnet", "--endpoint-mode", "dnsrr", "--replicas-max-per-node", "1",
            "--container-label", "tier=front")
    service(sw, "batch", "polnet", "--endpoint-mode", "dnsrr", "--replicas-max-per-node", "1")
    dbs = [task_ip(h, cid, "polnet") for h, cid in tasks(sw, "db")]

    def tcp(svc: str) -> bool:
        ok = True
        for h, cid in tasks(sw, svc):
            for ip in dbs:
                out = h.container_exec(cid, "sh", "-c", f"nc -w 1 {ip} 5432 </dev/null", check=False, timeout=20).stdout
                ok &= "pong-db" in out
        return ok

    wait_until(lambda: tcp("api") and tcp("batch"), timeout=20, what="open by default")
    policy = {"apiVersion": "canal/v1", "kind": "NetworkPolicy", "metadata": {"name": "db-from-api", "network": "polnet"},
              "spec": {"selector": "com.docker.swarm.service.name == 'db'", "ingress": [
                  {"action": "Allow", "protocol": "TCP", "destination": {"ports": [5432]},
                   "source": {"selector": "com.docker.swarm.service.name == 'api' && tier == 'front'"}}]}}
    canal_cli(sw.worker, sw.ref, "policy", "apply", "-f", "-", input=json.dumps(policy))
    wait_until(lambda: not tcp("batch"), timeout=10, what="batch denied on both nodes")
    assert tcp("api")
    canal_cli(sw.manager, sw.ref, "policy", "delete", "db-from-api")
    wait_until(lambda: tcp("batch"), timeout=10, what="batch allowed again")


def test_plugin_disable_enable_keeps_tasks_connected(sw):
    swarm_net(sw, "steady")
    service(sw, "pair", "steady", "--endpoint-mode", "dnsrr", "--replicas-max-per-node", "1")
    (h1, c1), (h2, c2) = sorted(tasks(sw, "pair"), key=lambda t: t[0].name)
    ip1, ip2 = task_ip(h1, c1, "steady"), task_ip(h2, c2, "steady")
    sw.worker.docker("plugin", "disable", "-f", sw.ref)
    assert reaches(h1, c1, ip2, timeout=5) and reaches(h2, c2, ip1, timeout=5)
    sw.worker.docker("plugin", "enable", sw.ref)
    assert reaches(h1, c1, ip2) and reaches(h2, c2, ip1)
    assert {task_ip(h1, c1, "steady"), task_ip(h2, c2, "steady")} == {ip1, ip2}


def canal_cli(h: SimHost, ref: str, *args: str, input: str | None = None) -> str:
    """The canal CLI as shipped in the managed plugin's rootfs, run in the plugin itself.
    `canal status` exits 1 while unhealthy (a peer not routed yet, say): its JSON is printed
    all the same, and the callers poll it."""
    plugin_id = h.docker("plugin", "inspect", "-f", "{{.Id}}", ref).stdout.strip()
    sock = f"/run/docker/plugins/{plugin_id}/canal.sock"
    return h.exec([h.plugin_argv()[0], "-m", "canal", *args, "--socket", sock], input=input,
                  check=args[:1] != ("status",)).stdout


def node_id(h: SimHost) -> str:
    return h.docker("info", "-f", "{{.Swarm.NodeID}}").stdout.strip()


def canal_state_of(sw: Swarm, h: SimHost) -> dict:
    """What a node holds of ours: veths, canal routes, endpoint records naming it."""
    out = sw.etcd.etcdctl("get", "--prefix", "/canal/v1/endpoints/", "--print-value-only").stdout
    endpoints = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {
        "veths": [l for l in h.ip("-o", "link").stdout.splitlines() if ": cnl" in l],
        "endpoints": [e["ip"] for e in endpoints if e["host"] == h.name],
    }


def test_drain_and_leave_leave_nothing_on_the_node(sw):
    swarm_net(sw, "movable")
    service(sw, "roam", "movable", "--endpoint-mode", "dnsrr", replicas=4)
    assert canal_state_of(sw, sw.worker)["veths"]
    worker = node_id(sw.worker)
    sw.manager.docker("node", "update", "--availability", "drain", worker)
    try:
        wait_until(lambda: canal_state_of(sw, sw.worker) == {"veths": [], "endpoints": []}, timeout=60,
                   what="drained node empty")
        wait_until(lambda: running_tasks(sw, "roam") == 4, timeout=90, what="tasks moved")
        ips = [task_ip(h, cid, "movable") for h, cid in tasks(sw, "roam")]
        assert len(set(ips)) == 4 and all(h is sw.manager for h, _ in tasks(sw, "roam"))
    finally:
        sw.manager.docker("node", "update", "--availability", "active", worker)
    # Leave: the node's task containers go, and with them everything of ours on it.
    sw.manager.docker("service", "scale", "--detach", "roam=6")
    sw.manager.docker("service", "update", "--detach", "--force", "roam")  # spread again
    wait_until(lambda: canal_state_of(sw, sw.worker)["veths"], timeout=90, what="tasks back on the worker")
    sw.worker.docker("swarm", "leave", "--force")
    try:
        wait_until(lambda: canal_state_of(sw, sw.worker) == {"veths": [], "endpoints": []}, timeout=60,
                   what="left node empty")
    finally:
        token = sw.manager.docker("swarm", "join-token", "-q", "worker").stdout.strip()
        sw.worker.docker("swarm", "join", "--token", token, f"{sw.manager.address}:2377")
        sw.manager.docker("node", "rm", "--force", worker, check=False)


def vip_service(sw: Swarm) -> tuple[str, list[str]]:
    swarm_net(sw, "vipnet")
    service(sw, "vip", "vipnet", cmd=("sh", "-c", "while true; do echo pong-vip | nc -l -p 8080; done"))
    service(sw, "caller", "vipnet", "--endpoint-mode", "dnsrr")
    vip = sw.manager.docker_json("service", "inspect", "vip")[0]["Endpoint"]["VirtualIPs"][0]["Addr"].split("/")[0]
    return vip, [task_ip(h, cid, "vipnet") for h, cid in tasks(sw, "vip")]


def resolved(h: SimHost, cid: str, name: str) -> set[str]:
    """The IPv4 addresses nslookup gives for `name` in a container (parsed, not substrings)."""
    out = h.container_exec(cid, "nslookup", name, check=False).stdout
    found = set()
    for line in out.splitlines()[2:]:  # past the server's own "Server:"/"Address:" lines
        if line.startswith("Address"):
            text = line.split(":", 1)[1].strip().split()[0]
            try:
                found.add(str(ipaddress.IPv4Address(text)))
            except ValueError:
                continue
    return found


def test_vip_endpoint_mode_service_resolves_and_its_tasks_connect(sw):
    vip, task_ips = vip_service(sw)
    for h, cid in tasks(sw, "caller"):
        assert vip in resolved(h, cid, "vip")
        # Swarm's DNS learns the tasks through its gossip: the full set may take a moment.
        wait_until(lambda h=h, cid=cid: set(task_ips) <= resolved(h, cid, "tasks.vip"), timeout=30,
                   what="tasks.vip resolving to every task")
        for ip in task_ips:
            assert "pong-vip" in h.container_exec(cid, "sh", "-c", f"nc -w 2 {ip} 8080 </dev/null", check=False, timeout=20).stdout


def _kernel_has_ipvs() -> bool:
    return __import__("os").path.exists("/proc/net/ip_vs")


@pytest.mark.xfail(not _kernel_has_ipvs(), strict=True,
                   reason="Docker balances a VIP with IPVS in the caller's namespace; this kernel has no "
                          "ip_vs (and no module loading), for every network driver, overlay included")
def test_vip_endpoint_mode_connects_through_the_vip(sw):
    vip, _ = vip_service(sw)
    for h, cid in tasks(sw, "caller"):
        assert "pong-vip" in h.container_exec(cid, "sh", "-c", f"nc -w 2 {vip} 8080 </dev/null", check=False, timeout=20).stdout


# --------------------------------------------------------------------------------------------------
# Issue 13: dual-stack service networks


def task_ip6(h: SimHost, cid: str, network: str) -> str:
    return h.docker_json("inspect", cid)[0]["NetworkSettings"]["Networks"][network]["GlobalIPv6Address"]


def test_dual_stack_service_network_with_an_ipv6_subnet(sw):
    """`--ipv6 --subnet V4 --subnet V6`: Docker 20.10's Swarm allocator asks IPAM for every pool
    as IPv4 (V6 false) and lists the IPv6 one in AllocateNetwork's IPv4Data; Canal takes each by
    its CIDR's family. Tasks on both nodes get a /32 and a /128, reach each other over IPv6 (ping
    and TCP), and a policy decides their IPv6 as their IPv4, on both nodes."""
    info = swarm_net(sw, "dual", "--ipv6", "--subnet", CLUSTER, "--subnet", "fd00:6574::/64")
    assert info["EnableIPv6"] is True
    assert {c["Subnet"] for c in info["IPAM"]["Config"]} == {CLUSTER, "fd00:6574::/64"}  # in either order
    service(sw, "db", "dual", "--endpoint-mode", "dnsrr", "--replicas-max-per-node", "1",
            cmd=("sh", "-c", "while true; do echo pong-db | nc -l -p 5432; done"))
    service(sw, "api", "dual", "--endpoint-mode", "dnsrr", "--replicas-max-per-node", "1")
    assert {h.name for h, _ in tasks(sw, "db") + tasks(sw, "api")} == {"s1", "s2"}
    dbs = [(task_ip(h, cid, "dual"), task_ip6(h, cid, "dual")) for h, cid in tasks(sw, "db")]
    assert all(ipaddress.IPv6Address(v6) in ipaddress.IPv6Network("fd00:6574::/64") for _, v6 in dbs), dbs
    for h, cid in tasks(sw, "api"):
        for _, v6 in dbs:  # the task on this node and the one on the other
            assert h.container_exec(cid, "ping", "-6", "-c1", "-W2", v6, check=False).returncode == 0, (h.name, v6)

    def tcp(family: int) -> bool:
        ok = True
        for h, cid in tasks(sw, "api"):
            for v4, v6 in dbs:
                target = v4 if family == 4 else v6
                out = h.container_exec(cid, "sh", "-c", f"nc -w 1 {target} 5432 </dev/null", check=False, timeout=20).stdout
                ok &= "pong-db" in out
        return ok

    wait_until(lambda: tcp(4) and tcp(6), timeout=20, what="open in both families")  # control
    policy = {"apiVersion": "canal/v1", "kind": "NetworkPolicy", "metadata": {"name": "db-closed", "network": "dual"},
              "spec": {"selector": "com.docker.swarm.service.name == 'db'", "ingress": [
                  {"action": "Allow", "source": {"selector": "com.docker.swarm.service.name == 'nobody'"}}]}}
    canal_cli(sw.worker, sw.ref, "policy", "apply", "-f", "-", input=json.dumps(policy))
    wait_until(lambda: not tcp(4) and not tcp(6), timeout=15, what="db closed over both families on both nodes")
    canal_cli(sw.manager, sw.ref, "policy", "delete", "dual/db-closed")
    wait_until(lambda: tcp(4) and tcp(6), timeout=15, what="open again")


def test_dual_stack_service_network_from_the_clusters_ipv6_network(sw):
    """`--ipv6` without an IPv6 --subnet: the Swarm allocator asks only for an IPv4 pool; each node
    asks for the IPv6 one and allocates its tasks' /128s from the cluster's IPv6 network (flannel
    config's IPv6Network). Without that network the tasks are rejected with Canal's own message."""
    key = "/coreos.com/network/config"
    original = sw.etcd.etcdctl("get", "--print-value-only", key).stdout.strip()
    config = json.loads(original)
    assert "IPv6Network" not in config
    swarm_net(sw, "v6none", "--ipv6")
    sw.manager.docker("service", "create", "--detach", "--name", "none", "--network", "v6none",
                      "--endpoint-mode", "dnsrr", *STOP, IMAGE, "sleep", "100000", timeout=120)

    def rejected() -> str:
        return sw.manager.docker("service", "ps", "--no-trunc", "none", "--format", "{{.Error}}").stdout
    wait_until(lambda: "needs the cluster's IPv6 network" in rejected(), timeout=60, what="tasks rejected")
    sw.manager.docker("service", "rm", "none")
    try:
        sw.etcd.etcdctl("put", key, json.dumps({**config, "EnableIPv6": True, "IPv6Network": "fd00:6575::/48"}))
        for h in sw.nodes:  # each plugin watches flannel's config
            wait_until(lambda h=h: json.loads(canal_cli(h, sw.ref, "status", "-o", "json"))["network6"] == "fd00:6575::/48",
                       timeout=30, what=f"{h.name} sees the cluster's IPv6 network")
        swarm_net(sw, "v6net", "--ipv6")
        service(sw, "pair", "v6net", "--endpoint-mode", "dnsrr", "--replicas-max-per-node", "1")
        (h1, c1), (h2, c2) = sorted(tasks(sw, "pair"), key=lambda t: t[0].name)
        a6, b6 = task_ip6(h1, c1, "v6net"), task_ip6(h2, c2, "v6net")
        assert a6 != b6 and all(ipaddress.IPv6Address(x) in ipaddress.IPv6Network("fd00:6575::/48") for x in (a6, b6))
        assert h1.container_exec(c1, "ping", "-6", "-c1", "-W2", b6, check=False).returncode == 0
        assert h2.container_exec(c2, "ping", "-6", "-c1", "-W2", a6, check=False).returncode == 0
        sw.manager.docker("service", "rm", "pair")
        for h in sw.nodes:
            wait_until(lambda h=h: not h.docker("ps", "-aq").stdout.split(), timeout=60, what="tasks gone")
        sw.manager.docker("network", "rm", "v6net")
    finally:
        sw.etcd.etcdctl("put", key, original)
