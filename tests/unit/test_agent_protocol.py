"""The agent's request/wait/settle protocol (what Docker's calls rely on: a Join returns only
once a pass that started after its record was written is done), driven through the real loop
thread. Synchronised on events the fake snapshot sets and waits for, never on sleeps."""

from __future__ import annotations

import threading

from fakes import FakeIpsets, FakeIptables, FakeLinks

from canal.agent.agent import Agent
from canal.agent.desired import Snapshot
from canal.dataplane.firewall import Firewall
from canal.errors import Unavailable
from canal.records import NetworkRecord

NET = NetworkRecord(id="a" * 64, host="h1", pools=("0.0.0.0/0",))
SNAP = Snapshot("h1", "100.64.0.0/16", {f"h1/{NET.id}": NET}, {})
PATIENCE = 10  # seconds; only reached when the protocol is broken


class Gate:
    """A snapshot source that holds each pass until released, and counts passes."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.release = threading.Semaphore(0)
        self.passes = 0
        self.fail_next: Exception | None = None
        self.full: list[bool] = []

    def __call__(self) -> Snapshot:
        self.passes += 1
        self.entered.release()
        assert self.release.acquire(timeout=PATIENCE), "never released"
        if self.fail_next is not None:
            err, self.fail_next = self.fail_next, None
            raise err
        return SNAP

    def step(self, snap: Snapshot, full: bool) -> None:
        self.full.append(full)

    def one_pass(self) -> None:
        """Let exactly one pass run through the snapshot."""
        assert self.entered.acquire(timeout=PATIENCE), "no pass started"
        self.release.release()


def started(gate: Gate) -> Agent:
    ipt = FakeIptables()
    agent = Agent(gate, FakeLinks(), Firewall(ipt, FakeIpsets(ipt)), interval=3600, steps=[gate.step])
    agent.start()
    return agent


def test_wait_returns_once_a_pass_started_after_the_request_is_done():
    gate = Gate()
    agent = started(gate)
    try:
        first = agent.request()
        assert gate.entered.acquire(timeout=PATIENCE)  # pass 1 is running, holding the snapshot
        second = agent.request()  # written while pass 1 runs: pass 1 does not cover it
        assert second == first + 1
        gate.release.release()  # pass 1 ends
        assert agent.wait(first, PATIENCE)
        assert not agent.wait(second, 0)  # not yet: pass 2 has not run
        gate.one_pass()
        assert agent.wait(second, PATIENCE)
    finally:
        gate.release.release()
        agent.stop()


def test_requests_during_a_pass_are_coalesced_into_one_pass():
    gate = Gate()
    agent = started(gate)
    try:
        agent.request()
        assert gate.entered.acquire(timeout=PATIENCE)
        generations = [agent.request() for _ in range(50)]  # a burst of Docker calls
        gate.release.release()
        gate.one_pass()
        assert agent.wait(generations[-1], PATIENCE)
        assert gate.passes == 2  # one for the first request, one for the whole burst
    finally:
        gate.release.release()
        agent.stop()


def test_a_failed_pass_fails_its_waiters_and_the_next_good_pass_clears_it():
    gate = Gate()
    agent = started(gate)
    try:
        gate.fail_next = Unavailable("etcd down")
        failed = agent.request()
        gate.one_pass()
        assert agent.wait(failed, PATIENCE) is False
        assert "etcd down" in agent.last_error
        retried = agent.request()
        gate.one_pass()
        assert agent.wait(retried, PATIENCE) is True and agent.last_error == ""
        # The pass after a failure reads the kernel back (full), whatever was asked.
        assert gate.full[-1] is True
    finally:
        gate.release.release()
        agent.stop()


def test_full_is_honoured_and_quick_passes_stay_quick():
    gate = Gate()
    agent = started(gate)
    try:
        first = agent.request()  # the first pass is full (nothing read back yet)
        gate.one_pass()
        assert agent.wait(first, PATIENCE)
        quick = agent.request()
        gate.one_pass()
        assert agent.wait(quick, PATIENCE)
        full = agent.request(full=True)  # e.g. dockerd restarted: read the kernel back
        gate.one_pass()
        assert agent.wait(full, PATIENCE)
        assert gate.full == [True, False, True]
    finally:
        gate.release.release()
        agent.stop()


def test_stop_releases_waiters():
    gate = Gate()
    agent = started(gate)
    generation = agent.request()
    assert gate.entered.acquire(timeout=PATIENCE)
    outcome: list[bool] = []
    waiter = threading.Thread(target=lambda: outcome.append(agent.wait(generation + 1, PATIENCE)))
    waiter.start()
    agent.stop(timeout=0)  # the pass in flight still holds the snapshot
    waiter.join(PATIENCE)
    assert outcome == [False]  # not left hanging for the whole timeout
    gate.release.release()
