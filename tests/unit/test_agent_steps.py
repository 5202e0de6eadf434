"""The reconcile pass: one failing step never keeps the rest of the pass from being programmed,
and best-effort side steps (conntrack flushes) never fail a pass at all."""

from __future__ import annotations

import pytest
from fakes import FakeIpsets, FakeIptables, FakeLinks

from canal.agent.agent import Agent, StepsFailed
from canal.agent.desired import Snapshot
from canal.dataplane.firewall import Firewall
from canal.errors import Unavailable
from canal.records import NetworkRecord

NET = NetworkRecord(id="a" * 64, host="h1", pools=("0.0.0.0/0",))


def agent(steps=(), side_steps=()):
    ipt = FakeIptables()
    snap = Snapshot("h1", "100.64.0.0/16", {f"h1/{NET.id}": NET}, {})
    return Agent(lambda: snap, FakeLinks(), Firewall(ipt, FakeIpsets(ipt)), 30, steps=steps,
                 side_steps=side_steps), ipt


def test_a_failing_side_step_is_logged_and_the_pass_succeeds(caplog):
    ran = []

    def flush(snap, full):
        raise RuntimeError("conntrack exploded")

    a, ipt = agent(steps=[lambda s, f: ran.append("vxlan")], side_steps=[flush])
    a.reconcile(full=True)  # does not raise
    assert ran == ["vxlan"] and "CANAL-FORWARD" in ipt.tables["filter"].chains
    assert "conntrack exploded" in caplog.text


def test_a_failing_step_still_lets_the_others_and_the_firewall_run():
    ran = []

    def routes(snap, full):
        raise Unavailable("etcd down while publishing routes")

    a, ipt = agent(steps=[routes, lambda s, f: ran.append("vxlan")])
    with pytest.raises(Unavailable, match="publishing routes"):
        a.reconcile(full=True)
    assert ran == ["vxlan"]
    assert "CANAL-FORWARD" in ipt.tables["filter"].chains  # programmed despite the failure


def test_several_failing_steps_are_all_named():
    def boom(msg):
        def step(snap, full):
            raise Unavailable(msg)
        return step

    a, _ = agent(steps=[boom("routes failed"), boom("vxlan failed")])
    with pytest.raises(StepsFailed) as err:
        a.reconcile(full=True)
    assert "routes failed" in str(err.value) and "vxlan failed" in str(err.value)


def test_a_permanent_failure_keeps_its_status_for_docker():
    """A refused restore is a 500 with its cause, not a 503 'try again' (which cannot help)."""
    from canal.errors import CommandFailed
    from canal.runtime import Plugin

    class Stub:
        agent = type("A", (), {"last_error": "CommandFailed: iptables-restore: line 3 failed",
                               "last_exception": CommandFailed(["iptables-restore"], 1, "", "line 3 failed")})()

    failure = Plugin._dataplane_failed(Stub())  # type: ignore[arg-type]
    assert failure.status == 500 and "line 3 failed" in str(failure)
    Stub.agent.last_exception = Unavailable("etcd down")
    assert Plugin._dataplane_failed(Stub()).status == 503  # type: ignore[arg-type]


def test_timer_passes_read_the_ipsets_back_only_every_sets_interval():
    ipt = FakeIptables()
    reads = []

    class Recording(FakeIpsets):
        def apply(self, desired, read_back=True):
            reads.append((now[0], read_back))
            super().apply(desired, read_back)

    now = [0.0]
    snap = Snapshot("h1", "100.64.0.0/16", {f"h1/{NET.id}": NET}, {})
    a = Agent(lambda: snap, FakeLinks(), Firewall(ipt, Recording(ipt)), 30, sets_interval=90, clock=lambda: now[0])
    for t in (0, 30, 60, 90, 100, 180):
        now[0] = t
        a.reconcile(full=True)
    # the first full pass and those 90 s apart read the members back; the rest diff memory
    assert reads == [(0, True), (30, False), (60, False), (90, True), (100, False), (180, True)]
