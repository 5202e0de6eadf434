"""The applier of `flannel-v6.<VNI>`: flannel's IPv6 VXLAN device over an IPv6 underlay.

Converges the device (VNI, port, local IPv6 address and underlay fixed at creation: a
difference recreates it; MAC, MTU, up state and the `<subnet6 address>/128` fixed in place)
and its peers (neighbours, FDB, routes) on a Vxlan6State computed by canal.backends.vxlan6,
by reading what the device holds: stale entries are removed whoever left them. Routes are
ours by RTPROT_CANAL_VXLAN; flannel's order (neighbour, FDB, route in; the reverse out).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from canal.dataplane import routedump
from canal.dataplane.links import delete_link
from canal.dataplane.netlink import open_socket
from canal.dataplane.vxlan import DEFAULT_PORT, NTF_SELF, NUD_PERMANENT, RT_TABLE_MAIN, RTNH_F_ONLINK, RTPROT_CANAL_VXLAN
from canal.errors import Unavailable

log = logging.getLogger(__name__)

OVERHEAD6 = 70  # outer IPv6 (40) + UDP (8) + VXLAN (8) + inner Ethernet (14)


def device6_name(vni: int) -> str:
    return f"flannel-v6.{vni}"


def vxlan6_mtu(underlay_mtu: int) -> int:
    return underlay_mtu - OVERHEAD6


@dataclass(frozen=True)
class Vxlan6State:
    """Everything flannel-v6.<VNI> should hold (anything else of ours on it is stale)."""

    address: ipaddress.IPv6Address  # our subnet's network address, as /128 (flannel's)
    neighbours: dict[ipaddress.IPv6Address, str] = field(default_factory=dict)  # peer subnet address -> MAC
    fdb: dict[str, ipaddress.IPv6Address] = field(default_factory=dict)  # MAC -> peer PublicIPv6
    routes: dict[ipaddress.IPv6Network, ipaddress.IPv6Address] = field(default_factory=dict)  # dst -> next hop


class Vxlan6:
    def __init__(self, sysctl_dir: str = "/proc/sys") -> None:
        self.sysctl_dir = sysctl_dir
        self._ipr = open_socket()
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._ipr.close()

    def _index(self, name: str) -> int | None:
        found = self._ipr.link_lookup(ifname=name)
        return found[0] if found else None

    def exists(self, vni: int) -> bool:
        with self._lock:
            return self._index(device6_name(vni)) is not None

    def delete_device(self, vni: int) -> None:
        with self._lock:
            delete_link(self._ipr, device6_name(vni))

    def _sysctl(self, name: str, key: str, value: str) -> None:
        path = f"{self.sysctl_dir}/net/ipv6/conf/{name}/{key}"
        try:
            with open(path) as handle:
                if handle.read().strip() == value:
                    return
            with open(path, "w") as handle:
                handle.write(value)
        except OSError as err:
            raise Unavailable(f"cannot set {name} {key}={value}: {err.strerror}") from err

    def ensure_device(self, vni: int, port: int, local_ip6: str, underlay_ifname: str, mac: str, mtu: int,
                      address: ipaddress.IPv6Address) -> None:
        name = device6_name(vni)
        mac = mac.lower()
        with self._lock:
            try:
                underlay = self._index(underlay_ifname)
                if underlay is None:
                    raise Unavailable(f"underlay interface {underlay_ifname} does not exist")
                index = self._index(name)
                if index is not None:
                    why = self._incompatible(self._ipr.get_links(index)[0], vni, port, local_ip6, underlay)
                    if why:
                        log.warning("%s has a different %s; recreating it", name, why)
                        self._ipr.link("del", index=index)
                        index = None
                if index is None:
                    try:
                        self._ipr.link("add", ifname=name, kind="vxlan", vxlan_id=vni, vxlan_local6=local_ip6,
                                       vxlan_port=port or DEFAULT_PORT, vxlan_learning=0, vxlan_link=underlay,
                                       address=mac, mtu=mtu)
                        log.info("created %s (vni %d, local %s, port %d, dev %s)", name, vni, local_ip6,
                                 port or DEFAULT_PORT, underlay_ifname)
                    except NetlinkError as err:
                        if err.code != errno.EEXIST:
                            raise
                    index = self._index(name)
                    if index is None:
                        raise Unavailable(f"{name} vanished right after creating it")
                # No router advertisements from the tunnel (flannel sets accept_ra=0 too).
                self._sysctl(name, "accept_ra", "0")
                self._sysctl(name, "disable_ipv6", "0")
                link = self._ipr.get_links(index)[0]
                changes: dict[str, Any] = {}
                if (link.get_attr("IFLA_ADDRESS") or "").lower() != mac:
                    changes["address"] = mac
                if link.get_attr("IFLA_MTU") != mtu:
                    changes["mtu"] = mtu
                if changes or not link["flags"] & 1:
                    self._ipr.link("set", index=index, state="up", **changes)
                self._ensure_address(index, name, address)
            except NetlinkError as err:
                raise Unavailable(f"{name}: netlink: {err}") from err

    @staticmethod
    def _incompatible(link: Any, vni: int, port: int, local_ip6: str, underlay: int) -> str:
        info = link.get_attr("IFLA_LINKINFO")
        if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
            return "kind (not vxlan)"
        data = info.get_attr("IFLA_INFO_DATA")
        if data.get_attr("IFLA_VXLAN_ID") != vni:
            return f"VNI ({data.get_attr('IFLA_VXLAN_ID')})"
        if data.get_attr("IFLA_VXLAN_PORT") != (port or DEFAULT_PORT):
            return f"port ({data.get_attr('IFLA_VXLAN_PORT')})"
        have = data.get_attr("IFLA_VXLAN_LOCAL6")
        if have is None or ipaddress.IPv6Address(have) != ipaddress.IPv6Address(local_ip6):
            return f"local IPv6 address ({have})"
        link_index = data.get_attr("IFLA_VXLAN_LINK")
        if link_index and link_index != underlay:
            return f"underlay interface (index {link_index})"
        return ""

    def _ensure_address(self, index: int, name: str, address: ipaddress.IPv6Address) -> None:
        """Exactly `<subnet6 address>/128` besides the link-local one (flannel's)."""
        found = False
        stale = []
        for addr in self._ipr.get_addr(family=socket.AF_INET6, index=index):
            have = ipaddress.IPv6Address(addr.get_attr("IFA_ADDRESS"))
            if have.is_link_local:
                continue
            if have == address and addr["prefixlen"] == 128:
                found = True
            else:
                stale.append((str(have), addr["prefixlen"]))
        if not found:
            try:
                self._ipr.addr("add", index=index, address=str(address), prefixlen=128, flags=0x02)  # IFA_F_NODAD
            except NetlinkError as err:
                if err.code != errno.EEXIST:
                    raise
            log.info("%s: address %s/128", name, address)
        for have_text, prefixlen in stale:
            log.info("%s: removing stale address %s/%d", name, have_text, prefixlen)
            try:
                self._ipr.addr("del", index=index, address=have_text, prefixlen=prefixlen)
            except NetlinkError as err:
                if err.code not in (errno.EADDRNOTAVAIL, errno.ENOENT):
                    raise

    def apply(self, vni: int, state: Vxlan6State) -> None:
        name = device6_name(vni)
        with self._lock:
            try:
                index = self._index(name)
                if index is None:
                    raise Unavailable(f"{name} does not exist; ensure_device first")
                self._apply(index, name, state)
            except NetlinkError as err:
                raise Unavailable(f"{name}: netlink: {err}") from err

    def _apply(self, index: int, name: str, state: Vxlan6State) -> None:
        neighbours: dict[ipaddress.IPv6Address, tuple[str, int]] = {}
        for msg in self._ipr.get_neighbours(family=socket.AF_INET6, ifindex=index):
            dst = msg.get_attr("NDA_DST")
            if msg["ifindex"] == index and dst:
                neighbours[ipaddress.IPv6Address(dst)] = ((msg.get_attr("NDA_LLADDR") or "").lower(), msg["state"])
        fdb: dict[tuple[str, ipaddress.IPv6Address], int] = {}
        for msg in self._ipr.get_neighbours(family=socket.AF_BRIDGE, ifindex=index):
            dst, mac = msg.get_attr("NDA_DST"), msg.get_attr("NDA_LLADDR")
            if msg["ifindex"] == index and dst and mac and ":" in dst:
                fdb[(mac.lower(), ipaddress.IPv6Address(dst))] = msg["state"]
        ours: dict[ipaddress.IPv6Network, ipaddress.IPv6Address | None] = {}
        for r in routedump.dump(socket.AF_INET6, table=RT_TABLE_MAIN, protocol=RTPROT_CANAL_VXLAN, oif=index):
            if isinstance(r.dst, ipaddress.IPv6Network):
                ours[r.dst] = r.gateway if isinstance(r.gateway, ipaddress.IPv6Address) else None
        for dst in sorted(set(ours) - set(state.routes)):
            self._route("del", index, dst)
            log.info("%s: route del %s", name, dst)
        for hop, mac in sorted(state.neighbours.items()):
            have = neighbours.get(hop)
            if have is None or have[0] != mac or not have[1] & NUD_PERMANENT:
                self._ipr.neigh("replace", family=socket.AF_INET6, dst=str(hop), lladdr=mac, ifindex=index,
                                state=NUD_PERMANENT)
                log.info("%s: neighbour %s lladdr %s", name, hop, mac)
        for mac, public in sorted(state.fdb.items()):
            if not fdb.get((mac, public), 0) & NUD_PERMANENT:
                self._ipr.neigh("replace", family=socket.AF_BRIDGE, lladdr=mac, dst=str(public), ifindex=index,
                                state=NUD_PERMANENT, flags=NTF_SELF)
                log.info("%s: fdb %s dst %s", name, mac, public)
        for dst, hop in sorted(state.routes.items()):
            if ours.get(dst, None) != hop or dst not in ours:
                self._route("replace", index, dst, hop)
                log.info("%s: route %s via %s onlink", name, dst, hop)
        for mac, public in sorted(fdb):
            if state.fdb.get(mac) != public:
                self._del_neigh(family=socket.AF_BRIDGE, lladdr=mac, dst=str(public), ifindex=index, flags=NTF_SELF)
                log.info("%s: fdb %s dst %s removed", name, mac, public)
        for hop, (_mac, nud) in sorted(neighbours.items()):
            if hop not in state.neighbours and nud & NUD_PERMANENT and not hop.is_link_local:
                self._del_neigh(family=socket.AF_INET6, dst=str(hop), ifindex=index)
                log.info("%s: neighbour %s removed", name, hop)

    def _route(self, command: str, index: int, dst: ipaddress.IPv6Network,
               hop: ipaddress.IPv6Address | None = None) -> None:
        kwargs: dict[str, Any] = {"family": socket.AF_INET6, "dst": str(dst), "oif": index,
                                  "proto": RTPROT_CANAL_VXLAN, "table": RT_TABLE_MAIN}
        if hop is not None:
            kwargs.update(gateway=str(hop), flags=RTNH_F_ONLINK)
        try:
            self._ipr.route(command, **kwargs)
        except NetlinkError as err:
            if command != "del" or err.code not in (errno.ESRCH, errno.ENOENT):
                raise

    def _del_neigh(self, **kwargs: Any) -> None:
        try:
            self._ipr.neigh("del", **kwargs)
        except NetlinkError as err:
            if err.code not in (errno.ENOENT, errno.ESRCH):
                raise
