"""Direct routes to peer subnets over the underlay (host-gw, vxlan DirectRouting), converged.

Ours are tagged with their own route protocol, so routes anyone else installed are never
touched. A route the kernel refuses (a gateway not on-link after all) is reported, naming the
peer, and the others are still installed: one bad peer never stops a host.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import threading
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from canal.dataplane.netlink import open_socket
from canal.errors import Unavailable

log = logging.getLogger(__name__)

RTPROT_CANAL_DIRECT = 103  # next to RTPROT_CANAL_VXLAN (102)
RT_TABLE_MAIN = 254

Routes = dict[ipaddress.IPv4Network, ipaddress.IPv4Address]


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

    def underlay_networks(self) -> tuple[ipaddress.IPv4Network, ...]:
        """The prefixes of the underlay interface's IPv4 addresses: its L2 segment(s)."""
        with self._lock:
            try:
                index = self._index()
                addrs = self._ipr.get_addr(family=socket.AF_INET, index=index)
            except NetlinkError as err:
                raise Unavailable(f"{self.iface}: netlink: {err}") from err
        nets = {ipaddress.IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}").network for a in addrs}
        return tuple(sorted(nets))

    def _read(self) -> tuple[dict[ipaddress.IPv4Network, tuple[str | None, int | None]], set[ipaddress.IPv4Network]]:
        ours: dict[ipaddress.IPv4Network, tuple[str | None, int | None]] = {}
        foreign: set[ipaddress.IPv4Network] = set()
        for r in self._ipr.get_routes(family=socket.AF_INET):
            if (r.get_attr("RTA_TABLE") or r["table"]) != RT_TABLE_MAIN or not r.get_attr("RTA_DST"):
                continue
            dst = ipaddress.IPv4Network(f"{r.get_attr('RTA_DST')}/{r['dst_len']}")
            if r["proto"] == RTPROT_CANAL_DIRECT:
                ours[dst] = (r.get_attr("RTA_GATEWAY"), r.get_attr("RTA_OIF"))
            elif not r.get_attr("RTA_PRIORITY"):
                foreign.add(dst)
        return ours, foreign

    def remove_stale(self, wanted: Routes) -> None:
        """First, so a subnet moving to the tunnel finds its destination free."""
        with self._lock:
            try:
                ours, _foreign = self._read()
                for dst in sorted(set(ours) - set(wanted)):
                    self._route("del", dst)
            except NetlinkError as err:
                raise Unavailable(f"direct routes: netlink: {err}") from err

    def add(self, wanted: Routes) -> list[str]:
        """Install or fix each wanted route; returns one problem per route the kernel refused."""
        problems = []
        with self._lock:
            try:
                index = self._index()
                ours, foreign = self._read()
            except NetlinkError as err:
                raise Unavailable(f"direct routes: netlink: {err}") from err
            for dst, gateway in sorted(wanted.items()):
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

    def _route(self, command: str, dst: ipaddress.IPv4Network, gateway: ipaddress.IPv4Address | None = None,
               index: int | None = None) -> None:
        kwargs: dict[str, Any] = {"dst": str(dst), "proto": RTPROT_CANAL_DIRECT, "table": RT_TABLE_MAIN}
        if command != "del":
            kwargs.update(gateway=str(gateway), oif=index)
        try:
            self._ipr.route(command, **kwargs)
        except NetlinkError as err:
            if command == "del" and err.code in (errno.ESRCH, errno.ENOENT):
                return
            raise
        log.info("direct route %s %s%s", command, dst, f" via {gateway} dev {self.iface}" if gateway else "")
