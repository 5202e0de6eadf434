"""Several canal networks per container: the plan (pure), the agent step, the Join helper, and
the applier against a real kernel in namespaces of the test's own."""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import os
import subprocess
from typing import Callable, Iterator

import pytest

from canal.agent.desired import Snapshot
from canal.agent.sandboxes import SandboxRouting, SandboxStep, plans, sandboxes
from canal.api import protocol
from canal.dataplane.sandbox import (
    SandboxIface,
    SandboxPlan,
    Sandboxes,
    apply_plan,
    free_gateway,
    in_netns,
    netns_path,
    taken_gateways,
)
from canal.errors import Unavailable
from canal.records import DEFAULT_GATEWAY, EndpointRecord, NetworkRecord, RecordError

CLUSTER = "100.64.0.0/16"
A = ipaddress.IPv4Address
N = ipaddress.IPv4Network
KEY = "/var/run/docker/netns/0123456789ab"


def network(net_id: str, name: str, pools=("0.0.0.0/0",), host="h1") -> NetworkRecord:
    return NetworkRecord(id=net_id * 64, host=host, pools=tuple(pools), name=name)


def endpoint(n: int, net_id: str, host="h1", sandbox="", gateway=DEFAULT_GATEWAY, joined=True) -> EndpointRecord:
    ip = A(f"100.64.{1 if host == 'h1' else 2}.{n}")
    return EndpointRecord(
        id=f"{n:064x}", network=net_id * 64, host=host, ip=ip, mac=f"02:42:64:40:01:{n:02x}", mtu=1450,
        joined=joined, sandbox=sandbox, gateway=gateway,
    )


def snap(endpoints, networks=None) -> Snapshot:
    nets = networks or [network("a", "front"), network("b", "back"), network("a", "front", host="h2"),
                        network("b", "back", host="h2")]
    return Snapshot("h1", CLUSTER, {f"{n.host}/{n.id}": n for n in nets}, {e.id: e for e in endpoints})


def proxy_and_members():
    return [
        endpoint(1, "a", sandbox=KEY),
        endpoint(2, "b", sandbox=KEY, gateway=A("169.254.1.2")),
        endpoint(3, "a", host="h2"),
        endpoint(4, "b", host="h2"),
        endpoint(5, "b", host="h2", joined=False),  # not joined elsewhere: not a destination yet
        endpoint(6, "b"),  # ours, created: its chains exist, so it counts
    ]


def test_a_single_canal_interface_is_left_as_docker_set_it_up():
    assert plans(snap([endpoint(1, "a", sandbox=KEY), endpoint(3, "a", host="h2")])) == {}


def test_shared_pools_route_each_member_by_its_network():
    plan = plans(snap(proxy_and_members()))[KEY]
    by_id = {i.endpoint_id: i for i in plan.ifaces}
    front, back = by_id[f"{1:064x}"], by_id[f"{2:064x}"]
    assert front.gateway == A("169.254.1.1") and back.gateway == A("169.254.1.2")
    # Own addresses included in the plan's lists are skipped by the applier; the members:
    assert set(front.destinations) == {N("100.64.1.1/32"), N("100.64.2.3/32")}
    assert set(back.destinations) == {N("100.64.1.2/32"), N("100.64.2.4/32"), N("100.64.1.6/32")}
    # Docker's order (by network name): back before front.
    assert [i.endpoint_id for i in plan.ifaces] == [f"{2:064x}", f"{1:064x}"]


def test_distinct_pools_route_by_prefix_and_overlap_falls_back_to_members():
    nets = [network("a", "front", ("100.65.1.0/24",)), network("b", "back", ("100.65.2.0/24",)),
            network("c", "third")]
    eps = [endpoint(1, "a", sandbox=KEY), endpoint(2, "b", sandbox=KEY, gateway=A("169.254.1.2"))]
    plan = plans(snap(eps, nets))[KEY]
    assert {i.destinations for i in plan.ifaces} == {(N("100.65.1.0/24"),), (N("100.65.2.0/24"),)}
    # A third network on the cluster pool does not overlap them: prefix routes for all three.
    eps.append(endpoint(7, "c", sandbox=KEY, gateway=A("169.254.1.3")))
    plan = plans(snap(eps, nets))[KEY]
    assert {i.destinations for i in plan.ifaces} == {(N("100.65.1.0/24"),), (N("100.65.2.0/24"),), (N(CLUSTER),)}
    # A pool inside another's: both sides by member, never a prefix holding another address.
    nets[2] = network("c", "third", ("100.65.0.0/16",))
    plan = plans(snap(eps, nets))[KEY]
    assert all(d.prefixlen == 32 for i in plan.ifaces for d in i.destinations)


def test_plan_is_independent_of_record_order():
    eps = proxy_and_members()
    assert plans(snap(eps)) == plans(snap(list(reversed(eps))))


def test_sandboxes_group_only_local_joined_endpoints():
    eps = [endpoint(1, "a", sandbox=KEY), endpoint(2, "b", sandbox=KEY, joined=False),
           endpoint(3, "a", host="h2", sandbox=KEY)]
    assert {k: [e.id for e in v] for k, v in sandboxes(snap(eps)).items()} == {KEY: [f"{1:064x}"]}


class FakeApplier:
    def __init__(self, missing=()):
        self.calls: list[SandboxPlan] = []
        self.missing = set(missing)
        self.fail: Exception | None = None

    def __call__(self, plan: SandboxPlan) -> set[str]:
        self.calls.append(plan)
        if self.fail:
            raise self.fail
        return {i.endpoint_id for i in plan.ifaces} & self.missing


def test_step_applies_changes_only_and_clears_a_sandbox_that_drops_to_one():
    applier, retries = FakeApplier(), []
    step = SandboxStep(applier, retries.append)
    eps = proxy_and_members()
    step(snap(eps), False)
    step(snap(eps), False)  # unchanged: nothing to do
    assert len(applier.calls) == 1
    step(snap(eps), True)  # a full pass reads the kernel back
    assert len(applier.calls) == 2
    step(snap([e for e in eps if e.id != f"{2:064x}"]), False)  # disconnected from back
    assert applier.calls[-1] == SandboxPlan(KEY, ())
    step(snap([e for e in eps if e.id != f"{2:064x}"]), True)
    assert len(applier.calls) == 3 and retries == []


def test_step_retries_an_interface_docker_has_not_moved_in_yet_then_stops():
    applier, retries = FakeApplier(missing={f"{2:064x}"}), []
    step = SandboxStep(applier, retries.append)
    for _ in range(SandboxStep.QUICK + SandboxStep.SLOW + 5):
        step(snap(proxy_and_members()), False)
    assert retries == [0.05] * SandboxStep.QUICK + [1.0] * SandboxStep.SLOW
    applier.missing = set()
    step(snap(proxy_and_members()), False)
    assert KEY not in step.incomplete


def test_step_failure_in_one_sandbox_is_logged_not_raised(caplog):
    applier = FakeApplier()
    applier.fail = Unavailable("netlink said no")
    step = SandboxStep(applier, lambda delay: None)
    step(snap(proxy_and_members()), False)
    assert "netlink said no" in caplog.text


class FakeDataplane:
    netns_dir = "/var/run/docker/netns"

    def __init__(self, taken=(), error: Exception | None = None):
        self.taken = set(taken)
        self.error = error
        self.applied: list[SandboxPlan] = []

    def gateways(self, key):
        if self.error:
            raise self.error
        return set(self.taken)

    def apply(self, plan):
        self.applied.append(plan)
        return set()


def test_join_picks_the_first_free_gateway_of_the_sandbox_and_keeps_it_on_replay():
    dp = FakeDataplane(taken={A("169.254.1.1"), A("169.254.1.3")})
    routing = SandboxRouting(lambda: snap([]), dp)
    fresh = endpoint(9, "b", joined=False)
    assert routing.gateway(KEY, fresh) == A("169.254.1.2")
    joined = endpoint(9, "b", sandbox=KEY, gateway=A("169.254.1.7"))
    assert routing.gateway(KEY, joined) == A("169.254.1.7")


def test_join_before_the_sandbox_exists_takes_the_recorded_gateways_into_account():
    """docker create + network connect (Compose): both Joins come before the namespace exists."""
    first = endpoint(1, "a", sandbox=KEY)
    routing = SandboxRouting(lambda: snap([first]), FakeDataplane(error=FileNotFoundError(2, "gone")))
    assert routing.gateway(KEY, endpoint(2, "b", joined=False)) == A("169.254.1.2")


def test_join_reads_the_agents_local_endpoints_not_a_cluster_snapshot():
    """Once the agent has published this host's endpoints, a Join's gateway comes from them
    (a snapshot copies every endpoint of the cluster: tens of ms at 100,000); before, from a
    snapshot."""
    first = endpoint(1, "a", sandbox=KEY)
    snapshots = []

    def snapshot():
        snapshots.append(1)
        return snap([first])

    gone = FakeDataplane(error=FileNotFoundError(2, "gone"))
    published: list = [None]
    routing = SandboxRouting(snapshot, gone, lambda: published[0])
    assert routing.gateway(KEY, endpoint(2, "b", joined=False)) == A("169.254.1.2") and len(snapshots) == 1
    published[0] = (first, endpoint(3, "c", sandbox="/elsewhere"))
    assert routing.gateway(KEY, endpoint(2, "b", joined=False)) == A("169.254.1.2") and len(snapshots) == 1
    published[0] = ()  # control: what the agent published is what counts
    assert routing.gateway(KEY, endpoint(2, "b", joined=False)) == A("169.254.1.1")


def test_the_index_publishes_local_endpoints_once_complete():
    from canal.agent.index import MembershipIndex

    index = MembershipIndex("h1")
    assert index.published_local is None
    ours, theirs = endpoint(1, "a", sandbox=KEY), endpoint(2, "b", host="h2")
    index.update({ours.id: ours, theirs.id: theirs}, (), {}, False)
    assert index.published_local == (ours,)
    moved = dataclasses.replace(ours, sandbox="/other")
    index.update({ours.id: moved, theirs.id: theirs}, (ours.id,), {}, False)
    assert index.published_local == (moved,)


def test_join_without_access_to_the_sandbox_falls_back_to_the_one_gateway(caplog):
    routing = SandboxRouting(lambda: snap([]), FakeDataplane(error=Unavailable("needs CAP_SYS_ADMIN")))
    assert routing.gateway(KEY, endpoint(9, "b", joined=False)) == DEFAULT_GATEWAY
    assert "CAP_SYS_ADMIN" in caplog.text


def test_join_warns_when_docker_keeps_sandboxes_elsewhere(caplog):
    routing = SandboxRouting(lambda: snap([]), FakeDataplane())
    routing.gateway("/srv/docker-exec/netns/0123456789ab", endpoint(9, "b", joined=False))
    assert "--netns-dir /srv/docker-exec/netns" in caplog.text


def test_join_routes_replan_the_sandbox_and_hand_the_new_interface_its_members():
    eps = proxy_and_members()
    joining = eps[1]
    dp = FakeDataplane()
    routing = SandboxRouting(lambda: snap([e for e in eps if e.id != joining.id]), dp)
    routes = routing.routes(joining)
    assert set(routes) == {N("100.64.2.4/32"), N("100.64.1.6/32")}  # not its own, nor the proxy's
    assert len(dp.applied) == 1 and len(dp.applied[0].ifaces) == 2
    # Alone in its sandbox: nothing to route, nothing applied.
    lone = SandboxRouting(lambda: snap([]), dp)
    assert lone.routes(endpoint(1, "a", sandbox=KEY)) == ()


def test_a_lone_join_takes_one_snapshot_not_two():
    """The single-network Join (the hot path): gateway() already found nothing else in the
    sandbox, so routes() answers () without reading the records again."""
    calls = []

    def snapshot():
        calls.append(1)
        return snap([])

    routing = SandboxRouting(snapshot, FakeDataplane())
    record = endpoint(1, "a", joined=False)
    gateway = routing.gateway(KEY, record)
    assert gateway == DEFAULT_GATEWAY and len(calls) == 1
    assert routing.routes(dataclasses.replace(record, joined=True, sandbox=KEY)) == ()
    assert len(calls) == 1
    # Not remembered past that Join: a later Join in the same sandbox plans again.
    assert routing.routes(dataclasses.replace(record, joined=True, sandbox=KEY)) == ()
    assert len(calls) == 2


def test_join_answer_carries_the_routes_via_the_gateway():
    answer = protocol.join("cnp0123", "eth", "169.254.1.2", ["100.64.2.4/32"])
    assert answer["Gateway"] == "169.254.1.2"
    assert answer["StaticRoutes"] == [
        {"Destination": "169.254.1.2/32", "RouteType": 1, "NextHop": ""},
        {"Destination": "100.64.2.4/32", "RouteType": 0, "NextHop": "169.254.1.2"},
    ]


def test_endpoint_gateway_is_validated_at_the_boundary():
    record = endpoint(2, "b", sandbox=KEY, gateway=A("169.254.1.2"))
    assert EndpointRecord.parse(record.to_json()) == record
    assert "gateway" not in endpoint(1, "a").to_json()  # records of before stay as they were
    for bad in ("10.0.0.1", "169.254.2.1", "169.254.1.0", "169.254.1.255", "x", 5):
        with pytest.raises(RecordError):
            EndpointRecord.parse({**record.to_json(), "gateway": bad})


@pytest.mark.parametrize("key", ["/x/..", "/x/.", "/var/run/docker/netns/", "/a/b/c d", "/a/" + "x" * 65, ""])
def test_sandbox_keys_that_are_not_docker_sandboxes_are_refused(key):
    with pytest.raises(Unavailable):
        netns_path(key, "/var/run/docker/netns")


def test_sandbox_path_stays_in_the_configured_directory():
    assert netns_path("/elsewhere/netns/0123456789ab", "/run/docker/netns") == "/run/docker/netns/0123456789ab"


def test_free_gateway_exhausted():
    from canal.records import GATEWAYS

    assert free_gateway([]) == DEFAULT_GATEWAY
    with pytest.raises(Unavailable):
        free_gateway(GATEWAYS)


# --- the applier against the kernel, in namespaces of the test's own ---------------------------

_counter = itertools.count()


def sh(*argv: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, f"{argv}: {proc.stderr}"
    return proc


@pytest.fixture
def sandbox() -> Iterator[Callable[..., str]]:
    """A namespace standing in for a container with canal interfaces (veth ends whose peers
    stay in the same namespace), removed at teardown."""
    if os.geteuid() != 0:
        pytest.fail("the sandbox kernel tests need root (network namespaces)", pytrace=False)
    name = f"cnlt{os.getpid()}-sb{next(_counter)}"
    sh("ip", "netns", "add", name)

    def iface(dev: str, mac: str, ip: str, gateway: str) -> str:
        sh("ip", "-n", name, "link", "add", dev, "address", mac, "type", "veth", "peer", "name", dev + "p")
        for d in (dev, dev + "p"):
            sh("ip", "-n", name, "link", "set", d, "up")
        sh("ip", "-n", name, "addr", "add", f"{ip}/32", "dev", dev)
        sh("ip", "-n", name, "route", "add", f"{gateway}/32", "dev", dev, "scope", "link")
        return name

    try:
        yield iface
    finally:
        sh("ip", "netns", "delete", name)


def routes(ns: str) -> set[str]:
    out = sh("ip", "-n", ns, "route", "show", "table", "all").stdout.splitlines()
    return {" ".join(line.split()) for line in out if "169.254.1." in line and " via " in line}


def rules(ns: str) -> set[str]:
    return {" ".join(line.split()) for line in sh("ip", "-n", ns, "rule").stdout.splitlines() if "lookup 256" in line}


def test_applier_programs_diffs_and_clears_in_a_real_namespace(sandbox):
    ns = sandbox("eth0", "02:42:64:40:01:01", "100.64.1.1", "169.254.1.1")
    sandbox("eth1", "02:42:64:40:01:02", "100.64.1.2", "169.254.1.2")
    path = f"/run/netns/{ns}"
    front = SandboxIface("e1", "02:42:64:40:01:01", A("100.64.1.1"), A("169.254.1.1"), (N("100.64.2.3/32"),))
    back = SandboxIface("e2", "02:42:64:40:01:02", A("100.64.1.2"), A("169.254.1.2"),
                        (N("100.64.2.4/32"), N("100.64.1.2/32")))  # its own address: skipped
    assert in_netns(path, taken_gateways) == {A("169.254.1.1"), A("169.254.1.2")}
    assert in_netns(path, lambda ipr: apply_plan(ipr, SandboxPlan(ns, (front, back)))) == set()
    assert routes(ns) == {
        "100.64.2.3 via 169.254.1.1 dev eth0 proto 101 src 100.64.1.1 onlink",
        "100.64.2.4 via 169.254.1.2 dev eth1 proto 101 src 100.64.1.2 onlink",
        "default via 169.254.1.1 dev eth0 table 25601 proto 101 onlink",
        "default via 169.254.1.2 dev eth1 table 25602 proto 101 onlink",
    }
    assert rules(ns) == {"1000: from 100.64.1.1 lookup 25601", "1000: from 100.64.1.2 lookup 25602"}
    # A member moves: the old route goes, Docker's own default route and others stay.
    sh("ip", "-n", ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
    moved = SandboxIface("e2", back.mac, back.ip, back.gateway, (N("100.64.2.9/32"),))
    in_netns(path, lambda ipr: apply_plan(ipr, SandboxPlan(ns, (front, moved))))
    assert "100.64.2.9 via 169.254.1.2 dev eth1 proto 101 src 100.64.1.2 onlink" in routes(ns)
    assert not any(r.startswith("100.64.2.4 ") for r in routes(ns))
    # A route Docker installed from a Join's StaticRoutes (no source) is taken over.
    sh("ip", "-n", ns, "route", "add", "100.64.2.8/32", "via", "169.254.1.2", "dev", "eth1")
    in_netns(path, lambda ipr: apply_plan(ipr, SandboxPlan(ns, (front, moved))))
    assert not any(r.startswith("100.64.2.8 ") for r in routes(ns))
    # An interface not there yet is reported, its rule already in place.
    later = SandboxIface("e3", "02:42:64:40:01:03", A("100.64.1.3"), A("169.254.1.3"), ())
    assert in_netns(path, lambda ipr: apply_plan(ipr, SandboxPlan(ns, (front, moved, later)))) == {"e3"}
    # Empty plan: everything Canal programmed goes; Docker's default route stays.
    in_netns(path, lambda ipr: apply_plan(ipr, SandboxPlan(ns, ())))
    assert routes(ns) == {"default via 169.254.1.1 dev eth0"} and rules(ns) == set()


def test_applier_refuses_this_hosts_own_namespace_and_non_namespaces(tmp_path):
    with pytest.raises(Unavailable, match="own network namespace"):
        in_netns("/proc/self/ns/net", taken_gateways)
    plain = tmp_path / "0123456789ab"
    plain.write_text("")
    with pytest.raises(Unavailable, match="not a network namespace"):
        Sandboxes(str(tmp_path)).apply(SandboxPlan(str(plain), ()))
    with pytest.raises(FileNotFoundError):
        Sandboxes(str(tmp_path)).apply(SandboxPlan("/x/gone", ()))
