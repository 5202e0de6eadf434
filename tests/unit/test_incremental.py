"""The incremental path (canal.agent.index + Members views + the ipset applier's deltas) against
the full computation, on random histories: after every step both produce the same desired state
(chains, jumps, ipsets with their members, both families), and a kernel programmed only by
event-driven (delta) passes holds exactly the full computation's sets.

Seeded generator, many seeds: a failure names its seed and step (rerun with SEEDS=[n]).
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import replace
from typing import Any, Dict, List, Optional

import pytest

from canal.agent import desired
from canal.agent.desired import Snapshot, desired_firewall
from canal.agent.index import MembershipIndex
from canal.agent.sandboxes import members_by_network
from canal.dataplane import ipset as ipsetmod
from canal.dataplane.firewall import FirewallState
from canal.dataplane.ipset import IpSet, Ipsets, Members, StaleMembers, TrackedSet
from canal.policy.model import load_documents
from canal.records import EndpointRecord, NetworkRecord

HOST = "h1"
HOSTS = ["h1", "h2", "h3"]
NET_IDS = ["n" * 63 + "1", "n" * 63 + "2"]
NAMES = ["", "appnet", "db", "appnet"]
SELECTORS = ["all()", "role == 'web'", "has(tier)", "role in {'web', 'db'}", "tier == 'x' && role != 'db'",
             "canal.network == 'db'", "!has(role)", "role == 'db' || tier == 'y'", "role not in {'web'}",
             "role in {'web', 'x'} && has(tier)"]


def _policy_docs(rng: random.Random, name: str) -> str:
    kind = rng.choice(["GlobalNetworkPolicy", "NetworkPolicy"])
    meta = f"{{name: {name}}}" if kind == "GlobalNetworkPolicy" else f"{{name: {name}, network: {rng.choice(['appnet', 'db'])}}}"
    sel = rng.choice(SELECTORS)
    peer = rng.choice(SELECTORS)
    action = rng.choice(["Allow", "Deny", "Pass"])
    direction = rng.choice(["ingress", "egress"])
    side = "source" if direction == "ingress" else "destination"
    neg = f", notSelector: \"{rng.choice(SELECTORS)}\"" if rng.random() < 0.3 else ""
    return (f"apiVersion: canal/v1\nkind: {kind}\nmetadata: {meta}\nspec:\n  selector: \"{sel}\"\n"
            f"  order: {rng.randint(1, 20)}\n  {direction}:\n    - action: {action}\n"
            f"      {side}: {{selector: \"{peer}\"{neg}}}\n")


class World:
    """Records of a random cluster, mutated one step at a time; knows which ids each step touched."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.endpoints: Dict[str, EndpointRecord] = {}
        self.networks: Dict[str, NetworkRecord] = {}
        self.policies: Dict[str, Any] = {}
        self.broken: set[Optional[str]] = set()
        self.encrypt_all = False
        for host in HOSTS:
            self._network(host, NET_IDS[0])

    def _network(self, host: str, net: str) -> None:
        rng = self.rng
        self.networks[f"{host}/{net}"] = NetworkRecord(
            net, host, ("10.0.0.0/8",), internal=rng.random() < 0.2, name=rng.choice(NAMES),
            encrypted=rng.random() < 0.2, pools6=("fd00::/64",) if rng.random() < 0.5 else ())

    def step(self) -> set[str]:
        rng = self.rng
        roll = rng.random()
        if roll < 0.6:  # an endpoint joins, leaves, changes labels, network, address
            endpoint_id = f"{rng.randrange(40):02d}" * 32
            if endpoint_id in self.endpoints and rng.random() < 0.3:
                del self.endpoints[endpoint_id]
            else:
                labels = None if rng.random() < 0.15 else {
                    k: rng.choice(v) for k, v in (("role", ["web", "db", "x"]), ("tier", ["x", "y"])) if rng.random() < 0.7}
                self.endpoints[endpoint_id] = EndpointRecord(
                    endpoint_id, rng.choice(NET_IDS), rng.choice(HOSTS),
                    ipaddress.IPv4Address(f"10.1.0.{rng.randrange(1, 30)}"),  # duplicates on purpose
                    "02:42:00:00:00:01", 1450, joined=rng.random() < 0.8, labels=labels,
                    ip6=ipaddress.IPv6Address(f"fd00::{rng.randrange(1, 30):x}") if rng.random() < 0.5 else None)
            return {endpoint_id}
        if roll < 0.75:  # a policy added, changed or removed
            name = f"p{rng.randrange(5)}"
            if name in self.policies and rng.random() < 0.3:
                del self.policies[name]
            else:
                self.policies[name] = load_documents(_policy_docs(rng, name))[0]
        elif roll < 0.88:  # a network record appears or changes (name learned, encrypted, ...)
            self._network(rng.choice(HOSTS), rng.choice(NET_IDS))
        elif roll < 0.94:  # a broken policy in some scope, or fixed
            scope = rng.choice([None, "appnet", "db"])
            self.broken ^= {scope}
        elif roll < 0.97:
            self.encrypt_all = not self.encrypt_all
        else:
            key = rng.choice(sorted(self.networks))
            if key != f"{HOST}/{NET_IDS[0]}":
                del self.networks[key]
        return set()

    def snapshot(self, index: Optional[MembershipIndex] = None) -> Snapshot:
        return Snapshot(HOST, "10.0.0.0/8", dict(self.networks), dict(self.endpoints),
                        policies=tuple(sorted(self.policies.values(), key=lambda p: p.sort_key)),
                        broken_policy_scopes=frozenset(self.broken), encrypt_all=self.encrypt_all, index=index)


def materialized(state: FirewallState) -> FirewallState:
    return replace(state, ipsets=[replace(s, members=frozenset(s.members)) for s in state.ipsets])


class FakeKernel:
    """`ipset restore` interpreted: what the applier really wrote, line by line."""

    def __init__(self) -> None:
        self.sets: Dict[str, set[str]] = {}
        self.lines: List[str] = []

    def run(self, argv, input: str = "", **_: Any):
        assert argv == ["ipset", "restore"], argv
        for line in input.splitlines():
            self.lines.append(line)
            op, name, *rest = line.split()
            if op == "create":
                self.sets.setdefault(name, set())
            elif op == "flush":
                self.sets[name].clear()
            elif op == "add":
                self.sets[name].add(rest[0])
            elif op == "del":
                self.sets[name].discard(rest[0])
            elif op == "swap":
                self.sets[name], self.sets[rest[0]] = self.sets[rest[0]], self.sets[name]
            elif op == "destroy":
                del self.sets[name]


class KernelIpsets(Ipsets):
    def __init__(self, kernel: FakeKernel):
        super().__init__()
        self.kernel = kernel

    def current(self) -> dict[str, set[str]]:
        return {k: set(v) for k, v in self.kernel.sets.items()}


SEEDS = range(150)


@pytest.mark.parametrize("seed", SEEDS)
def test_incremental_equals_full_on_random_histories(seed, monkeypatch):
    kernel = FakeKernel()
    monkeypatch.setattr(ipsetmod, "run", kernel.run)
    rng = random.Random(seed)
    world = World(rng)
    index = MembershipIndex(HOST)
    applier = KernelIpsets(kernel)
    views = 0
    for step in range(60):
        changed = world.step()
        index.update(world.endpoints, changed, world.networks, world.encrypt_all)
        incremental = desired_firewall(world.snapshot(index))
        full = desired_firewall(world.snapshot())
        assert materialized(incremental) == full, f"seed {seed} step {step}"
        views += sum(isinstance(s.members, Members) for s in incremental.ipsets)
        names = {n.logical_name for n in world.networks.values()} | set(NET_IDS)
        full_members = members_by_network(world.snapshot())
        for name, records in members_by_network(world.snapshot(index), names).items():
            assert sorted(e.id for e in records) == sorted(e.id for e in full_members.get(name, [])), name
        assert [e.id for e in desired.local_endpoints(world.snapshot(index))] == \
            sorted(e.id for e in desired.local_endpoints(world.snapshot()))
        assert {e.id: e for e in index.published_local or ()} == \
            {e.id: e for e in desired.local_endpoints(world.snapshot())}  # what a Join reads
        applier.apply(incremental.ipsets, read_back=step % 25 == 0)  # mostly event-driven passes
        assert {s.name: kernel.sets.get(s.name) for s in full.ipsets} == \
            {s.name: set(s.members) for s in full.ipsets}, f"seed {seed} step {step}"
    assert views  # the sets did come from the index


def test_one_remote_join_writes_one_line_per_set_it_enters(monkeypatch):
    kernel = FakeKernel()
    monkeypatch.setattr(ipsetmod, "run", kernel.run)
    world = World(random.Random(1))
    world.networks = {f"{h}/{NET_IDS[0]}": NetworkRecord(NET_IDS[0], h, ("10.0.0.0/8",), name="appnet") for h in HOSTS}
    world.policies = {"p": load_documents(_policy_docs(random.Random(3), "p"))[0]}
    world.policies["w"] = load_documents(
        "apiVersion: canal/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: w}\nspec:\n  selector: all()\n"
        "  ingress:\n    - action: Allow\n      source: {selector: \"role == 'web'\"}\n")[0]
    for i in range(300):
        world.endpoints[f"{i:04d}" * 16] = EndpointRecord(
            f"{i:04d}" * 16, NET_IDS[0], HOSTS[i % 3], ipaddress.IPv4Address("10.2.0.0") + i, "02:42:00:00:00:01", 1450,
            joined=True, labels={"role": ("web", "db")[i % 2]})
    index = MembershipIndex(HOST)
    applier = KernelIpsets(kernel)
    index.update(world.endpoints, (), world.networks, False)
    applier.apply(desired_firewall(world.snapshot(index)).ipsets, read_back=True)
    kernel.lines.clear()
    evaluations = index.evaluations
    joining = EndpointRecord("f" * 64, NET_IDS[0], "h2", ipaddress.IPv4Address("10.3.0.1"), "02:42:00:00:00:01",
                             1450, joined=True, labels={"role": "web"})
    world.endpoints[joining.id] = joining
    index.update(world.endpoints, {joining.id}, world.networks, False)
    state = desired_firewall(world.snapshot(index))
    applier.apply(state.ipsets, read_back=False)
    # the network's members set and the role == 'web' set (and all() if policy p uses it): one add each
    assert kernel.lines and all(line.startswith("add ") and line.split()[2] == "10.3.0.1" for line in kernel.lines)
    assert index.evaluations - evaluations <= 10  # the selectors in use, not the 300 endpoints
    assert materialized(state) == desired_firewall(world.snapshot())


def test_members_views_compare_by_version_and_refuse_stale_reads():
    tracked = TrackedSet()
    tracked.add("10.0.0.1")
    first = tracked.view()
    assert first == frozenset({"10.0.0.1"}) and first == tracked.view()
    tracked.add("10.0.0.2")
    assert first != tracked.view()
    with pytest.raises(StaleMembers):
        list(first)
    assert len(first) == 1  # its size as programmed stays readable (metrics)
    assert first != frozenset({"10.0.0.1"}) and first != TrackedSet().view()  # stale: never "unchanged"
    tracked.add("10.0.0.2")  # a second contributor: removed only with the last
    tracked.discard("10.0.0.2")
    assert "10.0.0.2" in tracked.view()
    tracked.discard("10.0.0.2")
    assert "10.0.0.2" not in tracked.view()
    assert tracked.touched_since(first.version) == {"10.0.0.2"}
    for _ in range(3):  # three contributors: it stays until the third leaves
        tracked.add("10.0.0.3")
    for left in (2, 1, 0):
        tracked.discard("10.0.0.3")
        assert ("10.0.0.3" in tracked.view()) == bool(left)
    with pytest.raises(KeyError):
        tracked.discard("10.0.0.3")  # never added (any more): a bug, refused


def test_ipset_applier_falls_back_to_a_whole_diff_when_the_journal_is_cut(monkeypatch):
    kernel = FakeKernel()
    monkeypatch.setattr(ipsetmod, "run", kernel.run)
    applier = KernelIpsets(kernel)
    tracked = TrackedSet()
    tracked.add("10.0.0.1")
    applier.apply([IpSet("canal-x", "hash:ip", tracked.view())], read_back=True)
    for i in range(2, 1500):  # more than the journal keeps
        tracked.add(f"10.0.{i // 256}.{i % 256}")
    for i in range(2, 1500):
        tracked.discard(f"10.0.{i // 256}.{i % 256}")
    tracked.add("10.9.9.9")
    view = tracked.view()
    applier.apply([IpSet("canal-x", "hash:ip", view)], read_back=False)
    assert kernel.sets["canal-x"] == {"10.0.0.1", "10.9.9.9"}
    assert isinstance(view, Members)


def test_snapshot_readers_still_work_with_an_index():
    world = World(random.Random(5))
    for _ in range(80):
        world.step()
    index = MembershipIndex(HOST)
    index.update(world.endpoints, (), world.networks, world.encrypt_all)
    snap = world.snapshot(index)
    assert sorted(e.id for e in desired.local_endpoints(snap)) == \
        sorted(e.id for e in desired.local_endpoints(world.snapshot()))
    assert desired.desired_links(snap) == desired.desired_links(world.snapshot()) or \
        sorted(desired.desired_links(snap), key=lambda link: link.endpoint_id) == \
        sorted(desired.desired_links(world.snapshot()), key=lambda link: link.endpoint_id)


def test_a_full_pass_repairs_an_index_that_disagrees_with_the_full_computation(caplog, monkeypatch):
    from fakes import FakeIptables, FakeLinks

    from canal.agent import agent as agentmod
    from canal.agent.agent import Agent
    from canal.dataplane.firewall import Firewall

    from_scratch = []  # the check's full computations (a snapshot without the index)

    def counted(snap):
        if snap.index is None:
            from_scratch.append(snap)
        return desired_firewall(snap)

    monkeypatch.setattr(agentmod, "desired_firewall", counted)

    world = World(random.Random(11))
    world.networks = {f"{h}/{NET_IDS[0]}": NetworkRecord(NET_IDS[0], h, ("10.0.0.0/8",), name="appnet") for h in HOSTS}
    for i in range(20):
        world.endpoints[f"{i:04d}" * 16] = EndpointRecord(
            f"{i:04d}" * 16, NET_IDS[0], HOSTS[i % 3], ipaddress.IPv4Address("10.2.0.0") + i, "02:42:00:00:00:01",
            1450, joined=True, labels={"role": "web"})
    index = MembershipIndex(HOST)

    def snapshot():  # as the runtime's: the index is told the changed ids (here: none, ever)
        index.update(world.endpoints, (), world.networks, False)
        return world.snapshot(index)

    ipt = FakeIptables()
    applied = []

    class Recording(Ipsets):
        def current(self):
            return {}

        def apply(self, desired, read_back=True):
            applied.append([replace(s, members=frozenset(s.members)) for s in desired])

        def destroy_unused(self, keep):
            pass

    now = [0.0]
    agent = Agent(snapshot, FakeLinks(), Firewall(ipt, Recording()), 30,
                  check_interval=300, clock=lambda: now[0])
    agent.reconcile(full=True)
    assert index.rebuilt and not from_scratch  # built whole just now: nothing incremental to check
    good = applied[-1]
    lost = world.endpoints.pop("0001" * 16)  # a change the index is never told about: a bug
    agent.reconcile(full=False)  # event-driven passes trust the index...
    assert applied[-1] == good
    now[0] = 30.0
    agent.reconcile(full=True)  # ...and so do the timer's passes between two checks (their cost)
    assert applied[-1] == good and "differed" not in caplog.text
    now[0] = 300.0
    agent.reconcile(full=True)  # ...the check, every check_interval, does not
    assert "differed from the full computation" in caplog.text and len(from_scratch) == 1
    network_set = [s for s in applied[-1] if s.name.startswith("canal-net-")][0]
    assert lost.ip_text not in network_set.members
    index.update(world.endpoints, (), world.networks, False)  # the next pass's snapshot: rebuilt whole
    assert materialized(desired_firewall(world.snapshot(index))) == desired_firewall(world.snapshot())


def test_the_label_index_evaluates_only_the_selectors_an_endpoint_could_match():
    world = World(random.Random(2))
    world.networks = {f"{h}/{NET_IDS[0]}": NetworkRecord(NET_IDS[0], h, ("10.0.0.0/8",), name="appnet") for h in HOSTS}
    world.policies = {f"p{k}": load_documents(
        f"apiVersion: canal/v1\nkind: GlobalNetworkPolicy\nmetadata: {{name: p{k}}}\nspec:\n  selector: all()\n"
        f"  ingress:\n    - action: Allow\n      source: {{selector: \"role == 'r{k}'\"}}\n")[0] for k in range(40)}
    world.endpoints = {"a" * 64: EndpointRecord("a" * 64, NET_IDS[0], HOST, ipaddress.IPv4Address("10.2.0.1"),
                                                "02:42:00:00:00:01", 1450, joined=True, labels={})}
    index = MembershipIndex(HOST)
    index.update(world.endpoints, (), world.networks, False)
    desired_firewall(world.snapshot(index))  # the 40 selectors are in use now
    before = index.evaluations
    joining = EndpointRecord("b" * 64, NET_IDS[0], "h2", ipaddress.IPv4Address("10.3.0.1"), "02:42:00:00:00:01",
                             1450, joined=True, labels={"role": "r7", "tier": "x"})
    world.endpoints[joining.id] = joining
    index.update(world.endpoints, {joining.id}, world.networks, False)
    assert index.evaluations - before == 1  # role == 'r7' only, not the other 39
    state = desired_firewall(world.snapshot(index))
    assert materialized(state) == desired_firewall(world.snapshot())
    member_of = [s.name for s in state.ipsets if joining.ip_text in s.members]
    assert len(member_of) == 2  # the r7 set and the network's
