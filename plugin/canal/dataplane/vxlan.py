"""Flannel's VXLAN backend, computed then applied, so Canal hosts and flanneld hosts interoperate.

`desired_vxlan` turns the cluster's leases (and /32s owned by remote hosts) into the exact
neighbour / FDB / route sets flannel programs on `flannel.<VNI>`; it is pure and tested without
root. `Vxlan` diffs that against the kernel and converges it, in flannel's order (neighbour,
FDB, route on the way in; the reverse on the way out, so the kernel never ARPs on the tunnel).
Unlike flannel it also deletes stale entries left by a peer whose MAC or public IP changed,
by reading what the device holds rather than remembering what it once added.
"""

from __future__ import annotations

import errno
import functools
import logging
import re
import socket
import threading
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Iterable

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import ndmsg

from canal.dataplane import routedump
from canal.dataplane.links import delete_link
from canal.dataplane.netlink import open_socket
from canal.dataplane.routedump import Route
from canal.errors import Unavailable

log = logging.getLogger(__name__)

DEVICE_PREFIX = "flannel."
DEFAULT_PORT = 8472  # the Linux kernel's own default (flannel's too); 4789 is IANA's
OVERHEAD = 50  # outer IPv4 + UDP + VXLAN + inner Ethernet
RTPROT_CANAL_VXLAN = 102  # our tunnel routes; routes with any other proto are never touched
RT_TABLE_MAIN = 254
RTNH_F_ONLINK = 4
NUD_PERMANENT = ndmsg.NUD_PERMANENT
NTF_SELF = ndmsg.NTF_SELF

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def device_name(vni: int) -> str:
    return f"{DEVICE_PREFIX}{vni}"


def vtep_address(subnet: IPv4Network) -> IPv4Address:
    """A host's VTEP address is its subnet's network address (`<subnet>.0`), as in flannel."""
    return subnet.network_address


@dataclass(frozen=True)
class Peer:
    """One remote host, as its flannel lease describes it."""

    subnet: IPv4Network
    public_ip: str
    vtep_mac: str


@dataclass(frozen=True)
class HostRoute:
    """A /32 owned by a remote host, routed through that host's VTEP (`via_subnet`.0)."""

    ip: IPv4Address
    via_subnet: IPv4Network


@dataclass(frozen=True)
class VxlanState:
    """Everything flannel.N should hold: the whole truth, so anything else on it is stale."""

    neighbors: dict[IPv4Address, str] = field(default_factory=dict)  # <subnet>.0 -> VTEP MAC
    fdb: dict[str, str] = field(default_factory=dict)  # VTEP MAC -> public IP
    routes: dict[IPv4Network, IPv4Address] = field(default_factory=dict)  # dst -> <subnet>.0


@functools.lru_cache(maxsize=1 << 17)
def host_network(ip: IPv4Address) -> IPv4Network:
    """ip/32, made once per address: every route record change recomputes every peer's
    routes, and parsing "a.b.c.d/32" again for each of 5,000 routed addresses was the biggest
    part of that at 100,000 endpoints."""
    return IPv4Network((int(ip), 32))


def _mac(value: str) -> str | None:
    """Lower-case unicast MAC, or None: a multicast/zero MAC cannot be a permanent FDB target."""
    mac = (value or "").strip().lower().replace("-", ":")
    if not _MAC_RE.match(mac) or mac == "00:00:00:00:00:00" or int(mac[:2], 16) & 1:
        return None
    return mac


def desired_vxlan(
    peers: Iterable[Peer], host_routes: Iterable[HostRoute], own_subnet: IPv4Network | None
) -> VxlanState:
    """What flannel.N should hold for these peers. Peers are taken in subnet order, so when two
    hosts claim one VTEP MAC (a cloned VM, a hand-edited lease) the lower subnet wins on every
    host alike; the loser is left out entirely rather than half-routed to the wrong host."""
    neighbors: dict[IPv4Address, str] = {}
    fdb: dict[str, str] = {}
    routes: dict[IPv4Network, IPv4Address] = {}
    by_subnet: dict[IPv4Network, Peer] = {}
    for peer in sorted(peers, key=lambda p: (p.subnet, p.public_ip, p.vtep_mac)):
        if own_subnet is not None and peer.subnet == own_subnet:
            continue
        if peer.subnet in by_subnet:
            log.warning("two leases for subnet %s; keeping %s", peer.subnet, by_subnet[peer.subnet])
            continue
        mac = _mac(peer.vtep_mac)
        if mac is None:
            if peer.vtep_mac:
                log.warning("lease %s has an unusable VtepMAC %r; skipped", peer.subnet, peer.vtep_mac)
            else:
                log.debug("lease %s has no VtepMAC (not a vxlan host yet); skipped", peer.subnet)
            continue
        try:
            public_ip = str(IPv4Address(peer.public_ip))
        except ValueError:
            log.warning("lease %s has an unusable PublicIP %r; skipped", peer.subnet, peer.public_ip)
            continue
        if fdb.get(mac, public_ip) != public_ip:
            log.warning(
                "VTEP MAC %s is claimed by %s (%s) and %s (%s); keeping the lower subnet",
                mac, fdb[mac], next(s for s, p in by_subnet.items() if _mac(p.vtep_mac) == mac),
                public_ip, peer.subnet,
            )
            continue
        by_subnet[peer.subnet] = peer
        fdb[mac] = public_ip
        neighbors[vtep_address(peer.subnet)] = mac
        routes[peer.subnet] = vtep_address(peer.subnet)
    for host in sorted(host_routes, key=lambda h: (h.ip, h.via_subnet)):
        dst = host_network(host.ip)
        if host.via_subnet not in by_subnet:
            log.warning("host route %s via %s: no usable remote lease for that subnet; skipped",
                        host.ip, host.via_subnet)
            continue
        if dst in routes and routes[dst] != vtep_address(host.via_subnet):
            log.warning("host route %s claimed via %s and %s; keeping the first", host.ip, routes[dst], host.via_subnet)
            continue
        routes[dst] = vtep_address(host.via_subnet)
    return VxlanState(neighbors, fdb, routes)


def _ignore(err: NetlinkError, *codes: int) -> None:
    if err.code not in codes:
        raise err


class Vxlan:
    """Applies VxlanState to `flannel.<VNI>` through one netlink socket, serialised (pyroute2
    sockets are not thread-safe). `netns` (a name under /run/netns) lets tests run it in a
    throwaway namespace; the product passes None."""

    def __init__(self) -> None:
        """Binds to the network namespace of the calling thread (tests create it in one)."""
        self._ipr = open_socket()
        self._lock = threading.Lock()
        self._vni: int | None = None  # the device of the last ensure_device, apply's default

    def close(self) -> None:
        with self._lock:
            self._ipr.close()

    def __enter__(self) -> Vxlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- device ---------------------------------------------------------------------------

    def _index(self, name: str) -> int | None:
        found = self._ipr.link_lookup(ifname=name)
        return found[0] if found else None

    def _link(self, name: str) -> Any | None:
        index = self._index(name)
        return self._ipr.get_links(index)[0] if index is not None else None

    def exists(self, vni: int) -> bool:
        with self._lock:
            try:
                return self._index(device_name(vni)) is not None
            except NetlinkError as err:
                raise Unavailable(f"{device_name(vni)}: netlink: {err}") from err

    def device_mac(self, vni: int) -> str | None:
        """The device's MAC, e.g. to tell whether a real flanneld (whose MAC is in its lease) owns it."""
        with self._lock:
            try:
                link = self._link(device_name(vni))
            except NetlinkError as err:
                raise Unavailable(f"{device_name(vni)}: netlink: {err}") from err
            return link.get_attr("IFLA_ADDRESS") if link is not None else None

    def underlay_mtu(self, ifname: str) -> int:
        with self._lock:
            try:
                link = self._link(ifname)
            except NetlinkError as err:
                raise Unavailable(f"{ifname}: netlink: {err}") from err
            if link is None:
                raise Unavailable(f"underlay interface {ifname} does not exist")
            return int(link.get_attr("IFLA_MTU"))

    def delete_device(self, vni: int) -> None:
        """Idempotent; the kernel drops the device's neighbours, FDB and routes with it."""
        name = device_name(vni)
        with self._lock:
            delete_link(self._ipr, name)

    def ensure_device(
        self, vni: int, port: int, local_ip: str, underlay_ifname: str, mac: str, mtu: int,
        subnet: IPv4Network,
    ) -> None:
        """flannel.N as flannel makes it. A device with another VNI, port, local IP or underlay
        is recreated (flannel's rule: those cannot be changed on a live vxlan device); MAC, MTU,
        up state and the `<subnet>.0/32` address are fixed in place. `port` 0 = kernel default.
        A MAC change makes the kernel flush the device's neighbours (permanent ones too): call
        `apply` right after, which puts them back (it reads the kernel, it does not remember)."""
        name = device_name(vni)
        mac = mac.lower()
        with self._lock:
            try:
                underlay = self._index(underlay_ifname)
                if underlay is None:
                    raise Unavailable(f"underlay interface {underlay_ifname} does not exist")
                link = self._link(name)
                if link is not None:
                    why = self._incompatible(link, vni, port, local_ip, underlay)
                    if why:
                        log.warning("%s has a different %s; recreating it", name, why)
                        self._ipr.link("del", index=link["index"])
                        link = None
                if link is None:
                    try:
                        self._ipr.link(
                            "add", ifname=name, kind="vxlan", vxlan_id=vni, vxlan_local=local_ip,
                            vxlan_port=port or DEFAULT_PORT, vxlan_learning=0, vxlan_link=underlay,
                            # Outer UDP checksums on, as Docker 20.10's overlay device (udpcsum):
                            # measured faster than without (bench/multihost.py --baseline, see the
                            # commit). flanneld sends none; a zero IPv4 UDP checksum means "none"
                            # to every receiver, so mixed clusters interoperate either way.
                            vxlan_udp_csum=1, address=mac, mtu=mtu,
                        )
                        log.info("created %s (vni %d, local %s, port %d, dev %s)", name, vni, local_ip,
                                 port or DEFAULT_PORT, underlay_ifname)
                    except NetlinkError as err:
                        _ignore(err, errno.EEXIST)  # created concurrently: configure it below
                    link = self._link(name)
                    if link is None:
                        raise Unavailable(f"{name} vanished right after creating it")
                index = link["index"]
                changes: dict[str, Any] = {}
                if (link.get_attr("IFLA_ADDRESS") or "").lower() != mac:
                    changes["address"] = mac
                if link.get_attr("IFLA_MTU") != mtu:
                    changes["mtu"] = mtu
                if changes:
                    log.info("%s: setting %s", name, changes)
                if changes or not link["flags"] & 1:  # IFF_UP
                    self._ipr.link("set", index=index, state="up", **changes)
                self._ensure_address(index, name, vtep_address(subnet))
            except NetlinkError as err:
                raise Unavailable(f"{name}: netlink: {err}") from err
        self._vni = vni

    @staticmethod
    def _incompatible(link: Any, vni: int, port: int, local_ip: str, underlay: int) -> str:
        info = link.get_attr("IFLA_LINKINFO")
        if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
            return "kind (not vxlan)"
        data = info.get_attr("IFLA_INFO_DATA")
        if data.get_attr("IFLA_VXLAN_ID") != vni:
            return f"VNI ({data.get_attr('IFLA_VXLAN_ID')})"
        have_port = data.get_attr("IFLA_VXLAN_PORT")
        if have_port != (port or DEFAULT_PORT):  # 0 resolved, so "back to the default" recreates too
            return f"port ({have_port})"
        have_local = data.get_attr("IFLA_VXLAN_LOCAL")
        if have_local != local_ip:  # stricter than flannel: a device without one differs too
            return f"local IP ({have_local})"
        have_link = data.get_attr("IFLA_VXLAN_LINK")  # flannel's rule: only if both are set
        if have_link and have_link != underlay:
            return f"underlay interface (index {have_link})"
        return ""

    def _ensure_address(self, index: int, name: str, address: IPv4Address) -> None:
        """Exactly `<subnet>.0/32`: an old subnet's address would keep answering as our VTEP.
        The new address goes on before the old ones come off: when a device loses its last
        IPv4 address the kernel flushes every route through it (ours and foreign ones)."""
        stale = []
        found = False
        for addr in self._ipr.get_addr(family=socket.AF_INET, index=index):
            have = addr.get_attr("IFA_ADDRESS")
            if have == str(address) and addr["prefixlen"] == 32:
                found = True
            else:
                stale.append((have, addr["prefixlen"]))
        if not found:
            try:
                self._ipr.addr("add", index=index, address=str(address), prefixlen=32)
            except NetlinkError as err:
                _ignore(err, errno.EEXIST)
            log.info("%s: address %s/32", name, address)
        for have, prefixlen in stale:
            log.info("%s: removing stale address %s/%d", name, have, prefixlen)
            try:
                self._ipr.addr("del", index=index, address=have, prefixlen=prefixlen)
            except NetlinkError as err:
                _ignore(err, errno.EADDRNOTAVAIL, errno.ENOENT)

    # -- peers ----------------------------------------------------------------------------

    def apply(self, state: VxlanState, vni: int | None = None, routes_only: bool = False) -> bool:
        """Converge flannel.N (default: the last ensured device) on `state`; True if anything
        changed. Order: stale routes out; neighbours, FDB, routes in; stale FDB, neighbours out.

        routes_only: a real flanneld owns the device's neighbours and FDB; touch only our routes."""
        vni = self._vni if vni is None else vni
        if vni is None:
            raise Unavailable("vxlan apply before ensure_device: which flannel.N?")
        name = device_name(vni)
        with self._lock:
            try:
                index = self._index(name)
                if index is None:
                    raise Unavailable(f"{name} does not exist; ensure_device first")
                return self._apply(index, name, state, routes_only)
            except NetlinkError as err:
                raise Unavailable(f"{name}: netlink: {err}") from err

    def _read(self, index: int) -> tuple[dict[str, tuple[str, int]], dict[tuple[str, str], int], list[Route]]:
        """flannel.N's neighbours (ip -> (mac, nud)), FDB ((mac, dst) -> nud), main-table routes."""
        neighbors = {}
        for msg in self._ipr.get_neighbours(family=socket.AF_INET, ifindex=index):
            if msg["ifindex"] == index and msg.get_attr("NDA_DST"):
                neighbors[msg.get_attr("NDA_DST")] = ((msg.get_attr("NDA_LLADDR") or "").lower(), msg["state"])
        fdb = {}
        for msg in self._ipr.get_neighbours(family=socket.AF_BRIDGE, ifindex=index):
            if msg["ifindex"] == index and msg.get_attr("NDA_DST") and msg.get_attr("NDA_LLADDR"):
                fdb[(msg.get_attr("NDA_LLADDR").lower(), msg.get_attr("NDA_DST"))] = msg["state"]
        routes = [r for r in routedump.dump(socket.AF_INET, table=RT_TABLE_MAIN) if r.dst is not None]
        return neighbors, fdb, routes

    def _apply(self, index: int, name: str, state: VxlanState, routes_only: bool) -> bool:
        neighbors, fdb, routes = self._read(index)
        ours: dict[IPv4Network, IPv4Address | None] = {}
        foreign: set[IPv4Network] = set()
        for r in routes:
            dst = r.dst
            if not isinstance(dst, IPv4Network):
                continue
            if r.protocol == RTPROT_CANAL_VXLAN and r.oif == index:
                ok = isinstance(r.gateway, IPv4Address) and r.flags & RTNH_F_ONLINK and not r.priority
                ours[dst] = r.gateway if ok and isinstance(r.gateway, IPv4Address) else None
            elif not r.priority:  # same kernel key as ours: replace would clobber it
                foreign.add(dst)
        changed = False

        def route(command: str, dst: IPv4Network, gateway: IPv4Address | None = None) -> None:
            nonlocal changed
            kwargs: dict[str, Any] = {"dst": str(dst), "oif": index, "proto": RTPROT_CANAL_VXLAN,
                                      "table": RT_TABLE_MAIN}
            if command != "del":
                kwargs.update(gateway=str(gateway), flags=RTNH_F_ONLINK)
            try:
                self._ipr.route(command, **kwargs)
            except NetlinkError as err:
                _ignore(err, errno.ESRCH, errno.ENOENT)
            changed = True
            log.info("%s: route %s %s%s", name, command, dst, f" via {gateway}" if gateway else "")

        # 1. routes that go (first: nothing may still send to a VTEP whose entries are removed)
        for dst in sorted(set(ours) - set(state.routes)):
            route("del", dst)
        if routes_only:
            neighbors, fdb = {}, {}
            state = VxlanState({}, {}, state.routes)
        # 2. neighbours in
        for ip, mac in sorted(state.neighbors.items()):
            have = neighbors.get(str(ip))
            if have is None or have[0] != mac or not have[1] & NUD_PERMANENT:
                self._ipr.neigh("replace", dst=str(ip), lladdr=mac, ifindex=index, state=NUD_PERMANENT)
                changed = True
                log.info("%s: neighbour %s lladdr %s (was %s)", name, ip, mac, have[0] if have else "none")
        # 3. FDB in ('replace' also turns a changed public IP into the new one in one step)
        for mac, public in sorted(state.fdb.items()):
            if not fdb.get((mac, public), 0) & NUD_PERMANENT:
                self._ipr.neigh("replace", family=socket.AF_BRIDGE, lladdr=mac, dst=public, ifindex=index,
                                state=NUD_PERMANENT, flags=NTF_SELF)
                changed = True
                log.info("%s: fdb %s dst %s", name, mac, public)
        # 4. routes in (last, so the kernel never has to ARP on the tunnel)
        for dst, gateway in sorted(state.routes.items()):
            if dst in ours:
                if ours[dst] != gateway:
                    route("replace", dst, gateway)
            elif dst in foreign:
                log.warning("%s: a route to %s not installed by Canal exists; leaving it", name, dst)
            else:
                route("add", dst, gateway)
        # 5. stale FDB out (flannel forgets these when a peer's MAC changes; we read and delete)
        for mac, public in sorted(fdb):
            if state.fdb.get(mac) != public:
                try:
                    self._ipr.neigh("del", family=socket.AF_BRIDGE, lladdr=mac, dst=public, ifindex=index,
                                    flags=NTF_SELF)
                except NetlinkError as err:
                    _ignore(err, errno.ENOENT)  # step 3 replaced it already
                changed = True
                log.info("%s: removed stale fdb %s dst %s", name, mac, public)
        # 6. stale neighbours out (permanent ones only: the kernel ages the rest)
        for neighbour, (mac, nud) in sorted(neighbors.items()):
            if nud & NUD_PERMANENT and IPv4Address(neighbour) not in state.neighbors:
                try:
                    self._ipr.neigh("del", dst=neighbour, ifindex=index)
                except NetlinkError as err:
                    _ignore(err, errno.ENOENT)
                changed = True
                log.info("%s: removed stale neighbour %s lladdr %s", name, neighbour, mac)
        return changed


def vxlan_mtu(underlay_mtu: int) -> int:
    """flannel's default: the underlay MTU minus the IPv4 VXLAN overhead (1500 -> 1450)."""
    return underlay_mtu - OVERHEAD
