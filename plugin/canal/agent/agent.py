"""The reconcile loop: on every change event and on a timer, compute then apply.

One thread, one queue of "something changed" signals coalesced into one pass: many Docker
calls in a burst cost one iptables-restore, not one each (Felix's lesson, felix#1343).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable, Sequence

from canal import metrics
from canal.agent.desired import Snapshot, desired_firewall, desired_links
from canal.dataplane.firewall import Firewall, FirewallState
from canal.dataplane.links import Links
from canal.errors import CanalError, Unavailable

log = logging.getLogger(__name__)


# Reconcile phases, in order (the log line's "links" phase runs every step, veths included).
_PHASES = ("snapshot", "steps", "compile", "firewall")
_PHASE_SECONDS = {phase: metrics.RECONCILE_PHASE_SECONDS.labels(phase) for phase in _PHASES}
_PASS_SECONDS = {full: metrics.RECONCILE_SECONDS.labels(str(full).lower()) for full in (True, False)}


class StepsFailed(Unavailable):
    """Several steps of one pass failed; each is named, the rest of the pass was programmed."""

    def __init__(self, failures: Sequence[Exception]):
        self.failures = list(failures)
        super().__init__("; ".join(f"{type(e).__name__}: {e}" for e in failures))


class Agent:
    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        links: Links,
        firewall: Firewall,
        interval: float,
        periodic: Callable[[], None] = lambda: None,
        steps: Sequence[Callable[[Snapshot, bool], object]] = (),
        periodic_interval: float | None = None,
        side_steps: Sequence[Callable[[Snapshot, bool], object]] = (),
        check_interval: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        sets_interval: float = 0.0,
    ):
        self.snapshot = snapshot
        self.links = links
        self.firewall = firewall
        self.interval = interval
        self.periodic = periodic  # e.g. lease renewal, run on its own timer only
        self.periodic_interval = periodic_interval or interval
        self.steps = list(steps)  # more compute+apply steps (VXLAN peers, route records)
        # Best-effort steps (conntrack flushes): their failures are logged, never fail a pass.
        self.side_steps = list(side_steps)
        self._cond = threading.Condition()
        self._requested = 0
        self._full_requested = False
        self._done = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.last_error: str = ""
        self.last_exception: Exception | None = None  # what failed the last pass, for its status
        self.last_success: float | None = None  # time.monotonic() of the last good pass (health)
        # The timer's passes read the kernel back every `interval`; the from-scratch check of
        # the incremental state (O(cluster): seconds at 100,000 endpoints, and the event passes
        # wait behind it) runs at most every `check_interval`.
        self.check_interval = check_interval
        self.clock = clock
        self._next_check = 0.0
        # The timer's passes read every ipset member back at most every `sets_interval` (0:
        # each); in between they diff the sets against what was last written. The members grow
        # with the cluster (175,000 at 100,000 endpoints: `ipset save` and its parse were most
        # of an idle plugin's CPU), the rules and routes they also read back do not.
        self.sets_interval = sets_interval
        self._next_sets = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="canal-agent", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread:
            self._thread.join(timeout)

    def request(self, full: bool = False) -> int:
        """Ask for a pass; returns its generation, to wait() for later. full: the pass reads
        the kernel back (e.g. dockerd restarted and may have rewritten FORWARD)."""
        with self._cond:
            self._full_requested = self._full_requested or full
            self._requested += 1
            self._cond.notify_all()
            return self._requested

    def wait(self, generation: int, timeout: float) -> bool:
        """Block until a pass that started after request() returned `generation` is done."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._done < generation and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return self._done >= generation and not self.last_error

    def trigger(self, wait: float = 0) -> bool:
        """Ask for a pass; with wait > 0, block until a pass that started after now is done."""
        generation = self.request()
        return self.wait(generation, wait) if wait > 0 else True

    def reconcile(self, full: bool = True) -> None:
        """One pass. full: also read the kernel back and repair drift (the timer's passes);
        otherwise diff against what was last programmed (event-driven passes, fast)."""
        marks = [time.perf_counter()]
        with self.links.guard:  # Join holds it across "record + veth": no fresh veth looks orphaned
            snap = self.snapshot()
            links = desired_links(snap)
            orphans = self.links.orphans(links)
        marks.append(time.perf_counter())
        for side_step in self.side_steps:
            try:
                side_step(snap, full)
            except Exception:  # noqa: BLE001 - best effort by contract
                log.exception("side step %s failed; the pass goes on", getattr(side_step, "__name__", side_step))
        # One failing step (a VXLAN peer, a route record) must not keep the others, the veths
        # or the firewall from being programmed: run everything, then report the failures.
        failures: list[Exception] = []
        for step in self.steps:
            try:
                step(snap, full)
            except Exception as err:  # noqa: BLE001 - re-raised below, after the rest ran
                failures.append(err)
        self.links.reconcile(links, orphans, full)
        marks.append(time.perf_counter())
        state = desired_firewall(snap)
        if full and snap.index is not None and self.clock() >= self._next_check:
            # An index built whole in this pass has no incremental history to check (a restart's
            # first pass would compute everything twice: seconds at 100,000 endpoints).
            if not snap.index.rebuilt:
                state = self._checked(snap, state)
            self._next_check = self.clock() + self.check_interval
        marks.append(time.perf_counter())
        sets_back = full and self.clock() >= self._next_sets
        changed = self.firewall.apply(state, read_back=full, read_back_sets=sets_back)
        if sets_back:
            self._next_sets = self.clock() + self.sets_interval
        marks.append(time.perf_counter())
        if failures:
            raise failures[0] if len(failures) == 1 else StepsFailed(failures)
        phases = list(zip(_PHASES, marks, marks[1:]))
        for phase, a, b in phases:
            _PHASE_SECONDS[phase].observe(b - a)
        spans = " ".join(f"{name} {1000 * (b - a):.1f}ms" for name, a, b in phases)
        log.log(logging.INFO if changed else logging.DEBUG, "pass: %s%s", spans, " (firewall changed)" if changed else "")

    def _checked(self, snap: Snapshot, incremental: FirewallState) -> FirewallState:
        """The check (a timer's pass, every check_interval): everything computed from scratch
        too, and the incremental state applied only if it equals that (its sets' views then
        let the next passes write deltas); otherwise the index is rebuilt and the full state
        applied."""
        full = desired_firewall(dataclasses.replace(snap, index=None))
        as_full = dataclasses.replace(incremental, ipsets=[
            dataclasses.replace(s, members=frozenset(s.members)) for s in incremental.ipsets])
        if as_full == full:
            return incremental
        log.error("incremental firewall state differed from the full computation; rebuilding the index")
        metrics.RECONCILE_FAILURES.labels("IncrementalMismatch").inc()
        assert snap.index is not None
        snap.index.reset()
        return full

    def _run(self) -> None:
        backoff = 1.0
        next_periodic = 0.0
        next_full = 0.0
        while True:
            with self._cond:
                if self._requested == self._done and not self._stopping:
                    wait = min(self.interval, self.periodic_interval)
                    self._cond.wait(min(wait, backoff) if self.last_error else wait)
                if self._stopping:
                    return
                target = self._requested
                full_requested, self._full_requested = self._full_requested, False
            try:
                full = time.monotonic() >= next_full or bool(self.last_error) or full_requested
                if time.monotonic() >= next_periodic:
                    self.periodic()
                    next_periodic = time.monotonic() + self.periodic_interval
                started = time.perf_counter()
                try:
                    self.reconcile(full)
                finally:
                    _PASS_SECONDS[full].observe(time.perf_counter() - started)
                metrics.RECONCILE_LAST_SUCCESS.set(time.time())
                if full:
                    next_full = time.monotonic() + self.interval
                self.last_error = ""
                self.last_exception = None
                self.last_success = time.monotonic()
                backoff = 1.0
            except Exception as err:  # keep the loop alive; the next pass retries
                self.last_error = f"{type(err).__name__}: {err}"
                self.last_exception = err
                metrics.RECONCILE_FAILURES.labels(type(err).__name__).inc()
                if isinstance(err, CanalError):  # expected kinds (datastore down, ...): no stack
                    log.warning("reconcile failed (retrying in %.0fs): %s", backoff, err)
                else:
                    log.exception("reconcile failed (retrying in %.0fs): %s", backoff, err)
                backoff = min(backoff * 2, 30.0)
            with self._cond:
                self._done = max(self._done, target)
                self._cond.notify_all()
