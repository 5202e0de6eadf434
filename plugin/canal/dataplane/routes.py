"""Direct routes to peer subnets over the underlay (host-gw, vxlan DirectRouting), converged,
in both families: IPv6 destinations via the peer's PublicIPv6.

Ours are tagged with their own route protocol, so routes anyone else installed are never
touched. A route the kernel refuses (a gateway not on-link after all) is reported, naming the
peer, and the others are still installed: one bad peer never stops a host.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import threading
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from canal.dataplane import routedump
from canal.dataplane.netlink import open_socket
from canal.errors import Unavailable

log = logging.getLogger(__name__)

RTPROT_CANAL_DIRECT = 103  # next to RTPROT_CANAL_VXLAN (102)
RTPROT_CANAL_TUNNELS = (102, 104)  # Canal's vxlan and wireguard routes: not someone else's
RT_TABLE_MAIN = 254

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
Routes = dict[Net, ipaddress.IPv4Address | ipaddress.IPv6Address]


def _family(net: Net) -> int:
    return socket.AF_INET6 if net.version == 6 else socket.AF_INET


def _ordered(routes: Routes) -> list[tuple[Net, ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    return sorted(routes.items(), key=lambda item: (item[0].version, item[0]))


def _ipv6() -> bool:
    return os.path.exists("/proc/net/if_inet6")


class DirectRoutes:
    """`<peer subnet> via <peer public IP> dev <underlay>`, read back from the kernel each time."""

    def __init__(self, iface: str) -> None:
        self.iface = iface
        self._ipr = open_socket()
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._ipr.close()

    def _index(self) -> int:
        found = self._ipr.link_lookup(ifname=self.iface)
        if not found:
            raise Unavailable(f"underlay interface {self.iface} does not exist")
        return int(found[0])

    def underlay_networks(self) -> tuple[Net, ...]:
        """The prefixes of the underlay interface's addresses, IPv4 then IPv6 (link-local
        left out: no peer publishes one): its L2 segment(s) in each family."""
        with self._lock:
            try:
                index = self._index()
                addrs = self._ipr.get_addr(family=socket.AF_INET, index=index)
                addrs6 = self._ipr.get_addr(family=socket.AF_INET6, index=index) if _ipv6() else []
            except NetlinkError as err:
                raise Unavailable(f"{self.iface}: netlink: {err}") from err
        nets = {ipaddress.IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}").network for a in addrs}
        nets6 = {ipaddress.IPv6Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}").network for a in addrs6}
        return (*sorted(nets), *sorted(n for n in nets6 if not n.is_link_local))

    def _read(self, families: tuple[int, ...]) -> tuple[dict[Net, tuple[str | None, int | None]], set[Net]]:
        ours: dict[Net, tuple[str | None, int | None]] = {}
        foreign: set[Net] = set()
        for family in families:
            for r in routedump.dump(family, table=RT_TABLE_MAIN):
                dst = r.dst
                if dst is None:
                    continue
                if r.protocol == RTPROT_CANAL_DIRECT:
                    ours[dst] = (str(r.gateway) if r.gateway is not None else None, r.oif)
                elif family == socket.AF_INET and not r.priority:
                    foreign.add(dst)
                elif family == socket.AF_INET6 and r.protocol not in RTPROT_CANAL_TUNNELS and r.type == 1:
                    # IPv6 routes always carry a metric; a replace takes over Canal's own /128s
                    # of a peer that moved to direct routing (the tunnel step drops them anyway).
                    foreign.add(dst)
        return ours, foreign

    def _families(self, wanted: Routes) -> tuple[int, ...]:
        """IPv6 is read when wanted or when the kernel has it (leftovers to clear)."""
        return (socket.AF_INET, socket.AF_INET6) if _ipv6() or any(d.version == 6 for d in wanted) else (socket.AF_INET,)

    def remove_stale(self, wanted: Routes) -> None:
        """First, so a subnet moving to the tunnel finds its destination free."""
        with self._lock:
            try:
                ours, _foreign = self._read(self._families(wanted))
                for dst in sorted(set(ours) - set(wanted), key=lambda n: (n.version, n)):
                    self._route("del", dst)
            except NetlinkError as err:
                raise Unavailable(f"direct routes: netlink: {err}") from err

    def add(self, wanted: Routes) -> list[str]:
        """Install or fix each wanted route; returns one problem per route the kernel refused."""
        problems: list[str] = []
        if not wanted:
            return problems  # no dump of the main table (5,000 routes at 100,000 endpoints) for nothing
        with self._lock:
            try:
                index = self._index()
                ours, foreign = self._read(self._families(wanted))
            except NetlinkError as err:
                raise Unavailable(f"direct routes: netlink: {err}") from err
            for dst, gateway in _ordered(wanted):
                if ours.get(dst) == (str(gateway), index):
                    continue
                if dst not in ours and dst in foreign:
                    problems.append(f"route {dst} via {gateway}: a route to {dst} not installed by Canal exists; left alone")
                    continue
                try:
                    self._route("replace", dst, gateway, index)
                except NetlinkError as err:
                    problems.append(f"peer {gateway} (subnet {dst}): the kernel refused the route via "
                                    f"{gateway} dev {self.iface}: {err.args[-1] if err.args else err}")
        for problem in problems:
            log.warning("%s", problem)
        return problems

    def _route(self, command: str, dst: Net, gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None,
               index: int | None = None) -> None:
        kwargs: dict[str, Any] = {"dst": str(dst), "proto": RTPROT_CANAL_DIRECT, "table": RT_TABLE_MAIN,
                                  "family": _family(dst)}
        if command != "del":
            kwargs.update(gateway=str(gateway), oif=index)
        try:
            self._ipr.route(command, **kwargs)
        except NetlinkError as err:
            if command == "del" and err.code in (errno.ESRCH, errno.ENOENT):
                return
            raise
        log.info("direct route %s %s%s", command, dst, f" via {gateway} dev {self.iface}" if gateway else "")
