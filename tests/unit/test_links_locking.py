"""Links: a veth deletion in progress (an RCU wait of ~20 ms in the kernel) must not hold up a
Join creating its own veth: deletions run on their own netlink socket and lock."""

from __future__ import annotations

import ipaddress
import threading
from typing import Any

from canal.dataplane.links import EndpointLink, Links


class FakeIpr:
    """Records calls; `link("del")` blocks until `release` is set (a slow kernel delete)."""

    def __init__(self, release: threading.Event | None = None):
        self.release = release
        self.deleting = threading.Event()
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.links: dict[str, int] = {}

    def link_lookup(self, ifname: str) -> list[int]:
        return [self.links[ifname]] if ifname in self.links else []

    def link(self, command: str, **kw: Any) -> None:
        self.calls.append((command, kw))
        if command == "add":
            self.links[kw["ifname"]] = len(self.links) + 1
        elif command == "del":
            self.deleting.set()
            if self.release is not None:
                assert self.release.wait(10), "the test never released the delete"

    def addr(self, command: str, **kw: Any) -> None:
        self.calls.append((f"addr {command}", kw))

    def route(self, command: str, **kw: Any) -> None:
        self.calls.append((f"route {command}", kw))

    def close(self) -> None:
        pass


def links_with(ipr: FakeIpr, reaper: FakeIpr, sysctl_dir: str) -> Links:
    links = Links.__new__(Links)
    links.sysctl_dir = sysctl_dir
    links._ipr, links._reaper = ipr, reaper  # type: ignore[assignment]
    links._lock, links._reap_lock = threading.Lock(), threading.Lock()
    links.guard = threading.RLock()
    links._configured = {}
    return links


def endpoint(tmp_path: Any) -> EndpointLink:
    link = EndpointLink("ab" * 32, ipaddress.IPv4Address("100.64.0.5"), "02:00:00:00:00:05", 1450)
    for sub in (f"net/ipv4/conf/{link.host_if}", f"net/ipv4/neigh/{link.host_if}"):
        (tmp_path / sub).mkdir(parents=True)
    return link


def test_ensure_veth_does_not_wait_for_an_orphan_being_deleted(tmp_path):
    release = threading.Event()
    ipr, reaper = FakeIpr(), FakeIpr(release)
    links = links_with(ipr, reaper, str(tmp_path))
    link = endpoint(tmp_path)
    deleter = threading.Thread(target=links.reconcile, args=([], {"cnl0123456789ab"}), daemon=True)
    deleter.start()
    try:
        assert reaper.deleting.wait(10)  # the orphan's delete is in the kernel now
        assert links._lock.acquire(blocking=False)  # ensure_veth's lock is free meanwhile
        links._lock.release()
        links.ensure_veth(link)  # would deadlock (until release) if it shared the delete's lock
        assert [c for c, _ in ipr.calls][:2] == ["add", "set"] and deleter.is_alive()
    finally:
        release.set()
        deleter.join(10)
    assert [(c, kw["ifname"]) for c, kw in reaper.calls] == [("del", "cnl0123456789ab")]
    assert not [c for c, _ in ipr.calls if c == "del"]  # deletions never use the Join's socket


def test_positive_control_a_shared_lock_is_held_through_the_delete(tmp_path):
    """The fake's delete really blocks, and with one lock for both (the old layout) the lock
    ensure_veth takes is held all through it: the Join would have waited."""
    release = threading.Event()
    reaper = FakeIpr(release)
    links = links_with(FakeIpr(), reaper, str(tmp_path))
    links._reap_lock = links._lock
    deleter = threading.Thread(target=links.reconcile, args=([], {"cnl0123456789ab"}), daemon=True)
    deleter.start()
    try:
        assert reaper.deleting.wait(10)
        assert not links._lock.acquire(blocking=False)
    finally:
        release.set()
        deleter.join(10)
    assert links._lock.acquire(blocking=False)
