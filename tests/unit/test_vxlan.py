"""flannel's VXLAN backend: the pure desired-state function, then the applier on a real kernel.

Kernel tests run as root inside throwaway network namespaces (`cnlt<pid>-vx<n>`, so the test
bed's leftover cleanup also finds them after a crash) and read the result back with iproute2,
an oracle independent of the pyroute2 code under test. Underlay 198.18.0.0/15, overlay
100.64.0.0/10; nothing is created in the machine's own namespace.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import queue
import select
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from ipaddress import IPv4Address, IPv4Network

import pytest

from canal.dataplane.vxlan import (
    RTPROT_CANAL_VXLAN,
    HostRoute,
    Peer,
    Vxlan,
    VxlanState,
    desired_vxlan,
    vxlan_mtu,
)
from canal.errors import Unavailable

N = IPv4Network
A = IPv4Address
OWN = N("100.64.1.0/24")
P2 = Peer(N("100.64.2.0/24"), "198.18.0.2", "02:aa:00:00:00:02")
P3 = Peer(N("100.64.3.0/24"), "198.18.0.3", "02:aa:00:00:00:03")
MAC1 = "02:aa:00:00:00:01"


# ------------------------------------------------------------------------------ pure


def test_desired_two_peers_skips_own_subnet_and_macless_leases() -> None:
    own = Peer(OWN, "198.18.0.1", MAC1)
    macless = Peer(N("100.64.4.0/24"), "198.18.0.4", "")
    state = desired_vxlan([P3, own, macless, P2], [], OWN)
    assert state.neighbors == {A("100.64.2.0"): P2.vtep_mac, A("100.64.3.0"): P3.vtep_mac}
    assert state.fdb == {P2.vtep_mac: "198.18.0.2", P3.vtep_mac: "198.18.0.3"}
    assert state.routes == {P2.subnet: A("100.64.2.0"), P3.subnet: A("100.64.3.0")}


def test_desired_is_independent_of_input_order() -> None:
    clash = Peer(N("100.64.9.0/24"), "198.18.0.9", P3.vtep_mac)
    peers = [P2, P3, clash]
    results = {repr(desired_vxlan(list(p), [], OWN)) for p in itertools.permutations(peers)}
    assert len(results) == 1


def test_desired_mac_claimed_by_two_hosts_keeps_lower_subnet(caplog: pytest.LogCaptureFixture) -> None:
    clash = Peer(N("100.64.0.0/24"), "198.18.0.9", P3.vtep_mac.upper())  # lower subnet, other host
    state = desired_vxlan([P3, clash], [HostRoute(A("100.64.77.7"), P3.subnet)], OWN)
    assert state.fdb == {P3.vtep_mac: "198.18.0.9"}
    assert state.neighbors == {A("100.64.0.0"): P3.vtep_mac}
    assert state.routes == {clash.subnet: A("100.64.0.0")}  # the loser and its host routes: gone
    assert "claimed by" in caplog.text


def test_desired_same_host_two_subnets_share_one_mac() -> None:
    """A host holding two leases (old one not yet expired) is no conflict: one FDB, two routes."""
    again = Peer(N("100.64.8.0/24"), P2.public_ip, P2.vtep_mac)
    state = desired_vxlan([P2, again], [], OWN)
    assert state.fdb == {P2.vtep_mac: P2.public_ip}
    assert set(state.neighbors) == {A("100.64.2.0"), A("100.64.8.0")}
    assert set(state.routes) == {P2.subnet, again.subnet}


def test_desired_normalises_mac_and_skips_unusable_leases() -> None:
    peers = [
        Peer(N("100.64.2.0/24"), "198.18.0.2", "02:AA:00:00:00:02"),
        Peer(N("100.64.3.0/24"), "198.18.0.3", "01:00:5e:00:00:01"),  # multicast
        Peer(N("100.64.4.0/24"), "198.18.0.4", "not-a-mac"),
        Peer(N("100.64.5.0/24"), "fd00::5", "02:aa:00:00:00:05"),  # no IPv4 underlay
        Peer(N("100.64.6.0/24"), "", "02:aa:00:00:00:06"),
    ]
    state = desired_vxlan(peers, [], OWN)
    assert state.fdb == {"02:aa:00:00:00:02": "198.18.0.2"}
    assert list(state.routes) == [N("100.64.2.0/24")]


def test_desired_host_routes() -> None:
    routes = [
        HostRoute(A("100.64.1.9"), P2.subnet),  # an address from our pool that lives on host 2
        HostRoute(A("100.64.3.7"), P3.subnet),
        HostRoute(A("100.64.3.8"), OWN),  # via ourselves: meaningless
        HostRoute(A("100.64.3.9"), N("100.64.50.0/24")),  # via no known host
        HostRoute(A("100.64.1.9"), P3.subnet),  # a second claim: the first (sorted) wins
    ]
    state = desired_vxlan([P2, P3], routes, OWN)
    assert state.routes == {
        P2.subnet: A("100.64.2.0"),
        P3.subnet: A("100.64.3.0"),
        N("100.64.1.9/32"): A("100.64.2.0"),
        N("100.64.3.7/32"): A("100.64.3.0"),
    }


def test_desired_empty_and_mtu() -> None:
    assert desired_vxlan([], [], None) == VxlanState()
    assert vxlan_mtu(1500) == 1450


# ------------------------------------------------------------------------------ kernel helpers

_counter = itertools.count(1)


def sh(*argv: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> rc {proc.returncode}: {proc.stderr.strip()}")
    return proc


def in_ns(ns: str, *argv: str, **kw: object) -> subprocess.CompletedProcess:
    """Run a command inside a netns (nsenter, not `ip netns exec`, which remounts /sys)."""
    return sh("nsenter", f"--net=/run/netns/{ns}", "--", *argv, **kw)  # type: ignore[arg-type]


def sysctl(ns: str, key: str, value: str) -> None:
    in_ns(ns, "sh", "-c", f"echo {value} > /proc/sys/{key.replace('.', '/')}")


def jq(ns: str, *argv: str) -> list[dict]:
    out = sh(argv[0], "-n", ns, "-j", *argv[1:]).stdout.strip()
    return json.loads(out) if out else []


@pytest.fixture
def netns() -> Iterator[Callable[[], str]]:
    """Factory of fresh namespaces; all deleted at teardown, also when the test fails."""
    if os.geteuid() != 0:
        pytest.fail("the vxlan kernel tests need root (network namespaces); run them as root", pytrace=False)
    made: list[str] = []

    def make() -> str:
        name = f"cnlt{os.getpid()}-vx{next(_counter)}"
        sh("ip", "netns", "add", name)
        made.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    yield make
    errors = [p.stderr for p in (sh("ip", "netns", "delete", n, check=False) for n in reversed(made)) if p.returncode]
    assert not errors, errors


class InNetns:
    """Calls an object's methods from one thread that joined netns `ns` (setns is per thread):
    every netlink socket it opens and uses lives there.

    Not pyroute2's IPRoute(netns=...): that forks a helper process which, now and then,
    returned into the forked pytest and ran its fixture teardowns (deleting our namespaces)."""

    def __init__(self, ns: str, factory: Callable[[], Any]) -> None:
        self._calls: "queue.Queue[Any]" = queue.Queue()
        self._thread = threading.Thread(target=self._serve, args=(ns,), daemon=True)
        self._thread.start()
        self._target = self._call(factory)

    def _serve(self, ns: str) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            ok = libc.setns(fd, 0x40000000) == 0  # CLONE_NEWNET, this thread only
        finally:
            os.close(fd)
        while True:
            item = self._calls.get()
            if item is None:
                return
            func, reply = item
            try:
                if not ok:
                    raise OSError(ctypes.get_errno(), f"setns {ns}")
                reply.put((True, func()))
            except BaseException as err:  # handed to the caller's thread
                reply.put((False, err))

    def _call(self, func: Callable[[], Any]) -> Any:
        reply: "queue.Queue[Any]" = queue.Queue()
        self._calls.put((func, reply))
        ok, value = reply.get(timeout=60)
        if not ok:
            raise value
        return value

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr
        return lambda *a, **kw: self._call(lambda: attr(*a, **kw))

    def stop(self) -> None:
        self._calls.put(None)
        self._thread.join(5)


class Host:
    """One simulated host: a namespace with an underlay interface `u0` and our applier."""

    def __init__(self, ns: str, ip: str) -> None:
        self.ns = ns
        self.ip = ip
        self.vx = InNetns(ns, Vxlan)

    def ensure(self, subnet: N = OWN, mac: str = MAC1, vni: int = 1, port: int = 0,
               mtu: int = 1450, local: str | None = None) -> None:
        self.vx.ensure_device(vni, port, local or self.ip, "u0", mac, mtu, subnet)

    def link(self, name: str = "flannel.1") -> dict:
        return jq(self.ns, "ip", "-d", "link", "show", name)[0]

    def neighbors(self) -> dict[str, tuple[str, list[str]]]:
        return {n["dst"]: (n.get("lladdr"), n["state"]) for n in jq(self.ns, "ip", "neigh", "show", "dev", "flannel.1")}

    def fdb(self) -> set[tuple[str, str]]:
        out = jq(self.ns, "bridge", "fdb", "show", "dev", "flannel.1")
        assert all("permanent" in e.get("state", "") and "self" in e.get("flags", []) for e in out), out
        return {(e["mac"], e["dst"]) for e in out}

    def routes(self) -> dict[str, dict]:
        return {r["dst"]: r for r in jq(self.ns, "ip", "route", "show", "dev", "flannel.1")}


@pytest.fixture
def host(netns: Callable[[], str]) -> Iterator[Host]:
    ns = netns()
    sh("ip", "-n", ns, "link", "add", "u0", "type", "veth", "peer", "name", "u1")
    sh("ip", "-n", ns, "addr", "add", "198.18.0.1/24", "dev", "u0")
    sh("ip", "-n", ns, "link", "set", "u0", "up")
    h = Host(ns, "198.18.0.1")
    yield h
    h.vx.close()
    h.vx.stop()


def expect_peers(h: Host, *peers: Peer) -> None:
    """flannel.1 holds exactly these peers' neighbour, FDB entry and route."""
    assert h.neighbors() == {
        str(p.subnet.network_address): (p.vtep_mac, ["PERMANENT"]) for p in peers
    }
    assert h.fdb() == {(p.vtep_mac, p.public_ip) for p in peers}
    ours = {k: v for k, v in h.routes().items() if v.get("protocol") == str(RTPROT_CANAL_VXLAN)}
    assert set(ours) == {str(p.subnet) for p in peers}
    for p in peers:
        route = ours[str(p.subnet)]
        assert route["gateway"] == str(p.subnet.network_address) and "onlink" in route["flags"]


# ------------------------------------------------------------------------------ device


def test_device_created_with_flannels_attributes(host: Host) -> None:
    assert not host.vx.exists(1) and host.vx.device_mac(1) is None
    host.ensure(port=4789)
    link = host.link()
    data = link["linkinfo"]["info_data"]
    assert link["linkinfo"]["info_kind"] == "vxlan"
    assert (data["id"], data["local"], data["port"], data["learning"], data["link"]) == (
        1, "198.18.0.1", 4789, False, "u0"
    )
    assert (link["address"], link["mtu"], "UP" in link["flags"]) == (MAC1, 1450, True)
    addrs = jq(host.ns, "ip", "-4", "addr", "show", "dev", "flannel.1")[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in addrs] == [("100.64.1.0", 32)]
    assert host.vx.exists(1) and host.vx.device_mac(1) == MAC1
    assert host.vx.underlay_mtu("u0") == 1500
    with pytest.raises(Unavailable):
        host.vx.underlay_mtu("nosuchdev")


def test_device_port_zero_means_kernel_default(host: Host) -> None:
    host.ensure(port=0)
    index = host.link()["ifindex"]
    assert host.link()["linkinfo"]["info_data"]["port"] == 8472
    host.ensure(port=0)
    assert host.link()["ifindex"] == index


@pytest.mark.parametrize("change", ["vni", "port", "local"])
def test_device_recreated_when_vni_port_or_local_ip_differ(host: Host, change: str) -> None:
    sh("ip", "-n", host.ns, "addr", "add", "198.18.0.11/24", "dev", "u0")
    if change == "vni":  # someone made flannel.1 with VNI 7: the name says 1, so it is wrong
        sh("ip", "-n", host.ns, "link", "add", "flannel.1", "type", "vxlan", "id", "7", "dstport", "8472",
           "local", "198.18.0.1", "dev", "u0", "nolearning")
    else:
        host.ensure(port=8472)
    before = host.link()["ifindex"]
    if change == "port":
        host.ensure(port=4789)
    elif change == "local":
        host.ensure(port=8472, local="198.18.0.11")
    else:
        host.ensure(port=8472)
    link = host.link()
    data = link["linkinfo"]["info_data"]
    assert link["ifindex"] != before
    assert (data["id"], data["port"], data["local"]) == (
        1, 4789 if change == "port" else 8472, "198.18.0.11" if change == "local" else "198.18.0.1"
    )


def test_device_mtu_and_subnet_fixed_in_place_without_losing_peers(host: Host) -> None:
    host.ensure()
    sh("ip", "-n", host.ns, "route", "add", "100.64.60.0/24", "dev", "flannel.1", "proto", "static")
    state = desired_vxlan([P2], [], OWN)
    host.vx.apply(state)
    index = host.link()["ifindex"]
    host.ensure(subnet=N("100.64.5.0/24"), mtu=1400)  # e.g. our lease was lost and re-acquired
    link = host.link()
    assert (link["ifindex"], link["mtu"]) == (index, 1400)
    addrs = jq(host.ns, "ip", "-4", "addr", "show", "dev", "flannel.1")[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in addrs] == [("100.64.5.0", 32)]
    # the new address went on before the old came off, so the kernel flushed no route
    assert not host.vx.apply(state)
    expect_peers(host, P2)
    assert "100.64.60.0/24" in host.routes()


def test_device_mac_fixed_in_place_and_apply_restores_flushed_neighbours(host: Host) -> None:
    host.ensure()
    state = desired_vxlan([P2], [], OWN)
    host.vx.apply(state)
    index = host.link()["ifindex"]
    sh("ip", "-n", host.ns, "link", "set", "flannel.1", "down")
    host.ensure(mac="02:aa:00:00:00:55")
    link = host.link()
    assert (link["ifindex"], link["address"], "UP" in link["flags"]) == (index, "02:aa:00:00:00:55", True)
    assert host.neighbors() == {}  # kernel quirk: a MAC change (or down) flushes permanent neighbours
    assert host.vx.apply(state)
    expect_peers(host, P2)
    assert not host.vx.apply(state)


def test_delete_device_is_idempotent(host: Host) -> None:
    host.ensure()
    host.vx.delete_device(1)
    host.vx.delete_device(1)
    assert not host.vx.exists(1)
    assert sh("ip", "-n", host.ns, "link", "show", "flannel.1", check=False).returncode != 0
    with pytest.raises(Unavailable):
        host.vx.apply(VxlanState(), vni=1)


# ------------------------------------------------------------------------------ peers


def test_two_peers_then_idempotent(host: Host) -> None:
    host.ensure()
    state = desired_vxlan([P2, P3], [], OWN)
    assert host.vx.apply(state) is True
    expect_peers(host, P2, P3)
    assert host.vx.apply(state) is False
    expect_peers(host, P2, P3)


def test_peer_mac_change_leaves_no_stale_fdb_or_neighbour(host: Host) -> None:
    host.ensure()
    host.vx.apply(desired_vxlan([P2, P3], [], OWN))
    moved = Peer(P2.subnet, P2.public_ip, "02:aa:00:00:00:22")  # host 2 rebooted: new VTEP MAC
    assert host.vx.apply(desired_vxlan([moved, P3], [], OWN))
    expect_peers(host, moved, P3)
    assert not host.vx.apply(desired_vxlan([moved, P3], [], OWN))


def test_peer_public_ip_change_rewrites_fdb(host: Host) -> None:
    host.ensure()
    host.vx.apply(desired_vxlan([P2, P3], [], OWN))
    moved = Peer(P2.subnet, "198.18.0.22", P2.vtep_mac)
    assert host.vx.apply(desired_vxlan([moved, P3], [], OWN))
    expect_peers(host, moved, P3)


def test_stale_entries_from_elsewhere_are_removed(host: Host) -> None:
    """Extra remotes on a wanted MAC (bridge fdb append) and leftovers of a lost peer go."""
    host.ensure()
    host.vx.apply(desired_vxlan([P2], [], OWN))
    fdb = ("bridge", "-n", host.ns, "fdb")
    sh(*fdb, "append", P2.vtep_mac, "dev", "flannel.1", "dst", "198.18.0.99", "self", "permanent")
    sh(*fdb, "add", "02:aa:00:00:00:99", "dev", "flannel.1", "dst", "198.18.0.98", "self", "permanent")
    sh("ip", "-n", host.ns, "neigh", "add", "100.64.99.0", "lladdr", "02:aa:00:00:00:99", "dev", "flannel.1",
       "nud", "permanent")
    for dst in ("198.18.0.97", "198.18.0.96"):  # a wanted MAC with only wrong remotes
        sh(*fdb, "append", P3.vtep_mac, "dev", "flannel.1", "dst", dst, "self", "permanent")
    assert host.vx.apply(desired_vxlan([P2, P3], [], OWN))
    expect_peers(host, P2, P3)
    assert not host.vx.apply(desired_vxlan([P2, P3], [], OWN))


def test_peer_removal_removes_route_fdb_and_neighbour_in_reverse_order(host: Host) -> None:
    host.ensure()
    monitor = Monitor(host.ns)
    try:
        host.vx.apply(desired_vxlan([P2, P3], [], OWN))
        assert host.vx.apply(desired_vxlan([P3], [], OWN))
    finally:
        events = monitor.stop()
    expect_peers(host, P3)
    # the kernel reports a neighbour deletion as an update to FAILED, then "Deleted": keep the latter
    p2 = [e for e in events if ("100.64.2.0" in e or P2.vtep_mac in e)
          and not (e.endswith("FAILED") and not e.startswith("Deleted"))]
    kinds = [("del " if e.startswith("Deleted") else "add ") + _kind(e) for e in p2]
    assert kinds == ["add neigh", "add fdb", "add route", "del route", "del fdb", "del neigh"], p2


def test_host_routes_added_and_removed(host: Host) -> None:
    host.ensure()
    hr = HostRoute(A("100.64.1.9"), P2.subnet)
    host.vx.apply(desired_vxlan([P2, P3], [hr], OWN))
    route = host.routes()["100.64.1.9"]
    assert (route["gateway"], route["protocol"], "onlink" in route["flags"]) == ("100.64.2.0", "102", True)
    moved = HostRoute(A("100.64.1.9"), P3.subnet)  # the container moved to host 3
    assert host.vx.apply(desired_vxlan([P2, P3], [moved], OWN))
    assert host.routes()["100.64.1.9"]["gateway"] == "100.64.3.0"
    assert host.vx.apply(desired_vxlan([P2, P3], [], OWN))
    assert "100.64.1.9" not in host.routes()
    expect_peers(host, P2, P3)


def test_foreign_routes_on_the_device_survive(host: Host) -> None:
    """Routes some other agent (a real flanneld: proto boot/static) put on flannel.1 stay,
    including one to a subnet we also want: we neither clobber nor fight over it."""
    host.ensure()
    sh("ip", "-n", host.ns, "route", "add", "100.64.60.0/24", "dev", "flannel.1", "proto", "static")
    sh("ip", "-n", host.ns, "route", "add", "100.64.3.0/24", "via", "100.64.3.0", "dev", "flannel.1", "onlink")
    host.vx.apply(desired_vxlan([P2, P3], [], OWN))
    assert not host.vx.apply(desired_vxlan([P2, P3], [], OWN))
    host.vx.apply(VxlanState())
    routes = host.routes()
    assert set(routes) == {"100.64.60.0/24", "100.64.3.0/24"}
    assert {r.get("protocol", "boot") for r in routes.values()} == {"static", "boot"}  # boot: not printed


def test_wrong_route_of_ours_is_replaced(host: Host) -> None:
    host.ensure()
    sh("ip", "-n", host.ns, "route", "add", "100.64.2.0/24", "via", "100.64.3.0", "dev", "flannel.1",
       "onlink", "proto", str(RTPROT_CANAL_VXLAN))
    assert host.vx.apply(desired_vxlan([P2, P3], [], OWN))
    expect_peers(host, P2, P3)


def _kind(event: str) -> str:
    if " via " in event:
        return "route"
    return "fdb" if " 198.18." in " " + event.removeprefix("Deleted ") else "neigh"


class Monitor:
    """`ip monitor neigh route` in the namespace, fenced by marker routes so that no event
    is lost at the start or still in flight at the end."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.proc: subprocess.Popen | None = subprocess.Popen(
            ["ip", "-n", ns, "monitor", "neigh", "route"], stdout=subprocess.PIPE
        )
        self.buf = b""
        self.lines: list[str] = []
        self.marks = itertools.count(1)
        try:
            self._mark()
        except BaseException:
            self.proc.kill()
            self.proc.wait(5)
            raise

    def _mark(self) -> None:
        """Add fresh blackhole routes until the monitor prints one; keep the events before it.
        (A new route each time: the monitor may subscribe after the first one, and replacing
        an identical route again is not reported.)"""
        assert self.proc and self.proc.stdout
        fd = self.proc.stdout.fileno()
        mine: set[str] = set()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            mark = f"198.19.255.{next(self.marks)}"
            mine.add(mark)
            sh("ip", "-n", self.ns, "route", "add", "blackhole", mark, "table", "99")
            ready, _, _ = select.select([fd], [], [], 0.2)
            while ready:
                self.buf += os.read(fd, 65536)
                *done, self.buf = self.buf.split(b"\n")
                for raw in done:
                    line = raw.decode().strip()
                    if mine & set(line.split()):
                        return
                    if "198.19.255." not in line:  # a late marker of an earlier call: skip
                        self.lines.append(line)
                ready, _, _ = select.select([fd], [], [], 0.05)
        raise AssertionError("ip monitor never reported the marker route")

    def stop(self) -> list[str]:
        if self.proc is not None:
            try:
                self._mark()
            finally:
                self.proc.kill()
                self.proc.wait(5)
                self.proc = None
        return [line for line in self.lines if line]


# ------------------------------------------------------------------------------ traffic


def _container(netns: Callable[[], str], host_ns: str, veth: str, ip: str) -> str:
    """A 'container': its own netns, a /32 on eth0, default route straight out of eth0; the host
    end answers its ARP by proxy and routes the /32 back (Calico-style, no bridge)."""
    ns = netns()
    sh("ip", "-n", host_ns, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh("ip", "-n", ns, "addr", "add", f"{ip}/32", "dev", "eth0")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sh("ip", "-n", ns, "route", "add", "default", "dev", "eth0")
    sh("ip", "-n", host_ns, "link", "set", veth, "up")
    sh("ip", "-n", host_ns, "route", "add", f"{ip}/32", "dev", veth, "scope", "link")
    sysctl(host_ns, f"net.ipv4.conf.{veth}.proxy_arp", "1")
    return ns


def test_traffic_between_two_hosts_through_the_tunnel(netns: Callable[[], str]) -> None:
    ha, hb = netns(), netns()
    sh("ip", "-n", ha, "link", "add", "u0", "type", "veth", "peer", "name", "u0", "netns", hb)
    for ns, ip in ((ha, "198.18.0.1"), (hb, "198.18.0.2")):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "u0")
        sh("ip", "-n", ns, "link", "set", "u0", "up")
        sysctl(ns, "net.ipv4.ip_forward", "1")
    sa, sb = N("100.64.1.0/24"), N("100.64.2.0/24")
    a, b = Host(ha, "198.18.0.1"), Host(hb, "198.18.0.2")
    try:
        a.ensure(subnet=sa, mac="02:aa:00:00:00:01", mtu=vxlan_mtu(a.vx.underlay_mtu("u0")))
        b.ensure(subnet=sb, mac="02:aa:00:00:00:02", mtu=vxlan_mtu(b.vx.underlay_mtu("u0")))
        peers = [Peer(sa, "198.18.0.1", a.vx.device_mac(1) or ""), Peer(sb, "198.18.0.2", b.vx.device_mac(1) or "")]
        assert a.vx.apply(desired_vxlan(peers, [], sa)) and b.vx.apply(desired_vxlan(peers, [], sb))
        ca = _container(netns, ha, "cnlca", "100.64.1.5")
        cb = _container(netns, hb, "cnlcb", "100.64.2.5")
        # host to host, VTEP address to VTEP address
        in_ns(ha, "busybox", "ping", "-A", "-c", "2", "-W", "2", "-I", "100.64.1.0", "100.64.2.0", timeout=15)
        # container to container, full-size packets (1450 - 28) so the MTU is right too
        in_ns(ca, "busybox", "ping", "-A", "-c", "2", "-W", "2", "-s", "1422", "100.64.2.5", timeout=15)
        in_ns(cb, "busybox", "ping", "-A", "-c", "2", "-W", "2", "100.64.1.5", timeout=15)
        # the traffic really went through the tunnel: the underlay carried UDP to 8472
        stats = jq(ha, "ip", "-s", "link", "show", "flannel.1")[0]["stats64"]
        assert stats["tx"]["packets"] >= 6 and stats["rx"]["packets"] >= 6
        # the peer goes away: the path goes with it
        a.vx.apply(desired_vxlan(peers[:1], [], sa))
        lost = in_ns(ca, "busybox", "ping", "-c", "1", "-W", "1", "100.64.2.5", check=False, timeout=15)
        assert lost.returncode != 0
    finally:
        a.vx.close()
        b.vx.close()


def test_host_network_is_the_address_as_a_32():
    from ipaddress import IPv4Address, IPv4Network

    from canal.dataplane.vxlan import host_network

    for text in ("0.0.0.0", "10.1.2.3", "255.255.255.255"):
        assert host_network(IPv4Address(text)) == IPv4Network(f"{text}/32")
    assert host_network(IPv4Address("10.1.2.3")) is host_network(IPv4Address("10.1.2.3"))  # made once
