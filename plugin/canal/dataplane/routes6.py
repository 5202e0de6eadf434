"""IPv6 across hosts over the IPv4 VXLAN device: a Canal peer's IPv6 subnet (when either end
has no IPv6 underlay, see canal.backends.vxlan6) and remote /128s routed to its host's VTEP,
into flannel.<VNI>, the same tunnel as IPv4. The kernel takes no IPv4 next hop for an IPv6
route, so the next hop is the peer VTEP's EUI-64 link-local address (from its VtepMAC, as
that device would derive it itself) with a permanent neighbour entry to the VtepMAC; the
VXLAN FDB entry VtepMAC -> PublicIP the IPv4 side keeps carries the frame there.
Compute (pure) and apply (netlink, idempotent) are separate; routes are ours by RTPROT_CANAL.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import threading
from dataclasses import dataclass, field

from pyroute2.netlink.exceptions import NetlinkError

from canal.dataplane import routedump
from canal.dataplane.links import RTPROT_CANAL
from canal.dataplane.netlink import open_socket
from canal.errors import Unavailable

log = logging.getLogger(__name__)

NUD_PERMANENT = 0x80


def link_local(mac: str) -> ipaddress.IPv6Address:
    """The EUI-64 link-local address of a MAC (what the kernel gives a device by default)."""
    octets = [int(b, 16) for b in mac.split(":")]
    octets[0] ^= 0x02
    eui = octets[:3] + [0xFF, 0xFE] + octets[3:]
    return ipaddress.IPv6Address(bytes([0xFE, 0x80] + [0] * 6 + eui))


@dataclass(frozen=True)
class Routes6State:
    neighbours: dict[ipaddress.IPv6Address, str] = field(default_factory=dict)  # next hop -> VtepMAC
    # a peer's IPv6 subnet or a remote /128 -> next hop
    routes: dict[ipaddress.IPv6Network, ipaddress.IPv6Address] = field(default_factory=dict)


def desired_routes6(records: list[tuple[ipaddress.IPv6Address, str]]) -> Routes6State:
    """(remote /128, its host's VtepMAC) pairs -> neighbours and routes."""
    neighbours: dict[ipaddress.IPv6Address, str] = {}
    routes: dict[ipaddress.IPv6Network, ipaddress.IPv6Address] = {}
    for ip, mac in records:
        hop = link_local(mac)
        neighbours[hop] = mac
        routes[ipaddress.IPv6Network(f"{ip}/128")] = hop
    return Routes6State(neighbours, routes)


class Routes6:
    """The applier: one netlink socket, serialised."""

    def __init__(self, sysctl_dir: str = "/proc/sys") -> None:
        self.sysctl_dir = sysctl_dir
        self._ipr = open_socket()
        self._lock = threading.Lock()
        self._neighbours: dict[ipaddress.IPv6Address, str] = {}  # programmed by us

    def close(self) -> None:
        with self._lock:
            self._ipr.close()

    def _enable(self, device: str) -> None:
        """IPv6 on the VXLAN device (for the frames it decapsulates), without taking router
        advertisements from the tunnel."""
        base = f"{self.sysctl_dir}/net/ipv6/conf/{device}"
        for name, value in (("accept_ra", "0"), ("disable_ipv6", "0")):
            try:
                with open(f"{base}/{name}") as handle:
                    if handle.read().strip() == value:
                        continue
                with open(f"{base}/{name}", "w") as handle:
                    handle.write(value)
            except OSError as err:
                raise Unavailable(f"cannot set {device} {name}={value}: {err.strerror}") from err

    def apply(self, device: str, state: Routes6State) -> None:
        with self._lock:
            found = self._ipr.link_lookup(ifname=device)
            if not found:
                if state.routes:
                    raise Unavailable(f"{device} is missing: no IPv6 routes to other hosts")
                return
            index = found[0]
            if state.routes and os.path.isdir(f"{self.sysctl_dir}/net/ipv6/conf/{device}"):
                self._enable(device)
            try:
                for hop, mac in state.neighbours.items():
                    self._ipr.neigh("replace", family=socket.AF_INET6, dst=str(hop), lladdr=mac, ifindex=index,
                                    state=NUD_PERMANENT)
                for net, hop in state.routes.items():
                    self._ipr.route("replace", family=socket.AF_INET6, dst=str(net), gateway=str(hop), oif=index,
                                    proto=RTPROT_CANAL)
                for route in routedump.dump(socket.AF_INET6, protocol=RTPROT_CANAL, oif=index):
                    have = route.dst
                    if not isinstance(have, ipaddress.IPv6Network):
                        continue
                    if have not in state.routes:
                        self._ipr.route("del", family=socket.AF_INET6, dst=str(have), oif=index, proto=RTPROT_CANAL)
                        log.info("removed IPv6 route %s via %s", have, device)
                for hop in set(self._neighbours) - set(state.neighbours):
                    try:
                        self._ipr.neigh("del", family=socket.AF_INET6, dst=str(hop), ifindex=index)
                    except NetlinkError as err:
                        if err.code not in (errno.ENOENT, errno.ESRCH):
                            raise
            except NetlinkError as err:
                raise Unavailable(f"IPv6 routes via {device}: netlink: {err}") from err
            self._neighbours = dict(state.neighbours)
