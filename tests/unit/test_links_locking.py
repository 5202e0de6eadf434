"""Links: a veth deletion in progress (an RCU wait of ~20 ms in the kernel) must not hold up a
Join creating its own veth: deletions run on their own netlink socket and lock."""

from __future__ import annotations

import ipaddress
import sys
import threading
from typing import Any

from canal.dataplane import links as linkmod
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
    links._expected = {}
    links._audit = 0
    links.net_dir = f"{sysctl_dir}/class-net"
    links.route_file = f"{sysctl_dir}/route"
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


class Deferred:
    """A `submit` that keeps the work for the test to run when it chooses."""

    def __init__(self) -> None:
        self.work: list[Any] = []

    def __call__(self, work: Any) -> None:
        self.work.append(work)

    def run(self) -> None:
        while self.work:
            self.work.pop(0)()


def prepared_links(tmp_path: Any) -> tuple[Links, FakeIpr, Deferred]:
    ipr, later = FakeIpr(), Deferred()
    links = links_with(ipr, FakeIpr(), str(tmp_path))
    links._submit = later
    links.present = lambda: set(ipr.links)  # type: ignore[method-assign]
    links._exists = lambda name: name in ipr.links  # type: ignore[method-assign]
    return links, ipr, later


CONFIGURE = ["set", "addr add", "route replace"]


def test_prepare_makes_and_configures_the_pair_and_keeps_it_from_the_reaper(tmp_path):
    links, ipr, later = prepared_links(tmp_path)
    link = endpoint(tmp_path)
    links.prepare(link)
    assert not ipr.calls  # CreateEndpoint does not wait for the kernel
    later.run()
    assert [c for c, _ in ipr.calls] == ["add", *CONFIGURE]
    assert (tmp_path / f"net/ipv4/conf/{link.host_if}/rp_filter").read_text() == "1"
    assert link.host_if in ipr.links and links.orphans([]) == set()
    links.reconcile([], set())  # a pass before the Join keeps what was configured
    links.ensure_veth(link)  # Join: nothing left to do
    assert [c for c, _ in ipr.calls] == ["add", *CONFIGURE]
    assert links.orphans([link]) == set()
    assert links.orphans([]) == {link.host_if}  # once left, an ordinary orphan (positive control)
    links.ensure_veth(link)  # no longer a prepared pair: configured in full again
    assert [c for c, _ in ipr.calls] == ["add", *CONFIGURE, *CONFIGURE]


def test_a_join_with_another_gateway_moves_the_prepared_address(tmp_path):
    from dataclasses import replace

    links, ipr, later = prepared_links(tmp_path)
    link = endpoint(tmp_path)
    links.prepare(link)
    later.run()
    second = replace(link, gateway=ipaddress.IPv4Address("169.254.1.2"))  # a second canal interface
    links.ensure_veth(second)
    assert [(c, str(kw.get("address", ""))) for c, kw in ipr.calls[4:]] == [
        ("addr del", "169.254.1.1"), ("set", ""), ("addr add", "169.254.1.2"), ("route replace", ""),
    ]


def test_a_prepared_pair_that_vanished_is_made_again_at_join(tmp_path):
    links, ipr, later = prepared_links(tmp_path)
    link = endpoint(tmp_path)
    links.prepare(link)
    later.run()
    del ipr.links[link.host_if]  # removed behind our back
    links.ensure_veth(link)
    assert [c for c, _ in ipr.calls] == ["add", *CONFIGURE, "add", *CONFIGURE]


def test_a_pair_prepared_for_an_endpoint_deleted_without_join_is_reaped(tmp_path):
    links, ipr, later = prepared_links(tmp_path)
    link = endpoint(tmp_path)
    links.prepare(link)
    later.run()
    assert links.orphans([]) == set()
    links.forget(link.endpoint_id)
    assert links.orphans([]) == {link.host_if}


def test_background_work_after_join_or_delete_makes_nothing(tmp_path):
    links, ipr, later = prepared_links(tmp_path)
    link = endpoint(tmp_path)
    links.prepare(link)
    links.forget(link.endpoint_id)  # deleted before the background add ran
    later.run()
    assert not ipr.calls
    links.prepare(link)
    links.ensure_veth(link)  # joined before it ran: Join made and configured the pair
    calls = list(ipr.calls)
    later.run()
    assert ipr.calls == calls and [c for c, _ in calls].count("add") == 1


# Full passes: only the veths that drifted are reconfigured -----------------------------------

def _kernel_as_configured(tmp_path: Any, links: list[EndpointLink]) -> None:
    """sysfs, sysctls and /proc/net/route as ensure_veth() leaves them (little-endian host)."""
    rows = ["Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT"]
    for link in links:
        for sub, value in (("proxy_arp", "1"), ("forwarding", "1"), ("rp_filter", "1"), ("route_localnet", "1")):
            conf = tmp_path / f"net/ipv4/conf/{link.host_if}"
            conf.mkdir(parents=True, exist_ok=True)
            (conf / sub).write_text(value + "\n")
        neigh = tmp_path / f"net/ipv4/neigh/{link.host_if}"
        neigh.mkdir(parents=True, exist_ok=True)
        (neigh / "proxy_delay").write_text("0\n")
        dev = tmp_path / f"class-net/{link.host_if}"
        dev.mkdir(parents=True, exist_ok=True)
        (dev / "mtu").write_text(f"{link.mtu}\n")
        (dev / "flags").write_text("0x1003\n")
        dst = int.from_bytes(link.ip.packed, "little") if sys.byteorder == "little" else int(link.ip)
        rows.append(f"{link.host_if}\t{dst:08X}\t00000000\t0001\t0\t0\t0\tFFFFFFFF\t0\t0\t0")
    (tmp_path / "route").write_text("\n".join(rows) + "\n")


def _many(n: int) -> list[EndpointLink]:
    return [EndpointLink(f"{i:02x}" * 32, ipaddress.IPv4Address(f"100.64.0.{i + 2}"), "02:00:00:00:00:05", 1450)
            for i in range(n)]


def test_full_pass_finds_exactly_the_veths_that_drifted(tmp_path, monkeypatch):
    monkeypatch.setattr(linkmod, "AUDIT_SLICE", 0)
    monkeypatch.setattr(linkmod, "RECONFIGURE_SLICE", 0)
    many = _many(6)
    _kernel_as_configured(tmp_path, many)
    links = links_with(FakeIpr(), FakeIpr(), str(tmp_path))
    assert links.drifted(many) == set()  # positive control: as configured, nothing to redo
    route = (tmp_path / "route").read_text().splitlines()
    (tmp_path / "route").write_text("\n".join(r for r in route if not r.startswith(many[0].host_if)) + "\n")
    (tmp_path / f"class-net/{many[1].host_if}/flags").write_text("0x1002\n")  # down
    (tmp_path / f"class-net/{many[2].host_if}/mtu").write_text("1500\n")
    (tmp_path / f"class-net/{many[3].host_if}/mtu").unlink()  # unreadable: redo it
    assert links.drifted(many) == {link.host_if for link in many[:4]}


def test_full_pass_checks_sysctls_and_reconfigures_whole_in_turn(tmp_path, monkeypatch):
    monkeypatch.setattr(linkmod, "AUDIT_SLICE", 3)
    monkeypatch.setattr(linkmod, "RECONFIGURE_SLICE", 1)
    many = _many(6)
    _kernel_as_configured(tmp_path, many)
    (tmp_path / f"net/ipv4/conf/{many[2].host_if}/proxy_arp").write_text("0\n")
    (tmp_path / f"net/ipv4/conf/{many[4].host_if}/rp_filter").write_text("2\n")
    links = links_with(FakeIpr(), FakeIpr(), str(tmp_path))
    # turn 1: links 0-2 audited, 0 reconfigured whole, 2's sysctl is off; turn 2: 3-5, 3 whole, 4 off
    assert links.drifted(many) == {many[0].host_if, many[2].host_if}
    assert links.drifted(many) == {many[3].host_if, many[4].host_if}
    assert links.drifted(many) == {many[0].host_if, many[2].host_if}  # and round again


def test_full_pass_reconfigures_only_the_drifted(tmp_path, monkeypatch):
    monkeypatch.setattr(linkmod, "AUDIT_SLICE", 0)
    monkeypatch.setattr(linkmod, "RECONFIGURE_SLICE", 0)
    many = _many(3)
    _kernel_as_configured(tmp_path, many)
    ipr = FakeIpr()
    ipr.links = {link.host_if: i + 1 for i, link in enumerate(many)}
    links = links_with(ipr, FakeIpr(), str(tmp_path))
    links._configured = {link.host_if: link for link in many}
    monkeypatch.setattr(links, "present", lambda: {link.host_if for link in many})
    (tmp_path / f"class-net/{many[1].host_if}/flags").write_text("0x1002\n")
    links.reconcile(many, set(), full=True)
    assert {kw.get("index") for command, kw in ipr.calls if command == "set"} == {2}  # only the down one
