"""Routed endpoints, Calico's way, through netlink (pyroute2).

Per endpoint: a veth pair; the container end is moved into the sandbox by Docker (Join's
SrcName); the host end carries the container's gateway (169.254.1.1/32, or 169.254.1.N for a
container's further canal interfaces: it answers ARP even on hosts without a default route),
proxy ARP, and a /32 route to the container. No bridge. An endpoint of an --ipv6 network also
gets a /128 route on the same veth, whose host end then has IPv6 with exactly one address, the
link-local fe80::ecee:eeff:feee:eeee (from its MAC ee:ee:ee:ee:ee:ee): the container's IPv6
default route goes via it and the host answers its neighbour solicitations itself (no proxy
NDP; nothing depends on the host having an IPv6 default route). Every other veth has IPv6
disabled on its host end.
Every function here is idempotent: the reconcile loop calls the same ones the handlers do.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from canal.errors import CanalError, ToolMissing, Unavailable

log = logging.getLogger(__name__)
# pyroute2 resets its logger to level 0 when imported; its per-message debug output would
# drown ours.
logging.getLogger("pyroute2").setLevel(logging.WARNING)

HOST_PREFIX = "cnl"  # host-side veth: cnl + 12 chars of the endpoint ID (15 = IFNAMSIZ-1)
PEER_PREFIX = "cnp"  # container side, until Docker moves and renames it
GATEWAY = "169.254.1.1"
HOST_MAC = "ee:ee:ee:ee:ee:ee"
GATEWAY6 = "fe80::ecee:eeff:feee:eeee"  # the link-local address of HOST_MAC (EUI-64)
RT_SCOPE_LINK = 253
RTPROT_CANAL = 101  # our routes carry their own protocol number, so we find (only) them again
IFF_UP = 0x1
# Veths a full pass checks the sysctls of, in turn (each every 15 full passes on a host of
# 1,500), and of those the ones it reconfigures whole (each every ~190 passes there; at once on
# a host of a few dozen).
AUDIT_SLICE = 100
RECONFIGURE_SLICE = 8


def _routes32(path: str) -> set[tuple[str, str]]:
    """(device, destination) of every /32 in the main table: one read, not a netlink dump
    (pyroute2 parses ~1 ms per message on a busy host)."""
    out = set()
    try:
        with open(path) as handle:
            next(handle, None)  # the header
            for line in handle:
                fields = line.split()
                if len(fields) >= 8 and fields[7] == "FFFFFFFF":
                    raw = int(fields[1], 16).to_bytes(4, sys.byteorder)  # printed in host byte order
                    out.add((fields[0], str(ipaddress.IPv4Address(raw))))
    except OSError:
        pass  # every veth then counts as drifted: reconfigured, as before
    return out


def delete_link(ipr: IPRoute, name: str) -> bool:
    """Delete a link by name; False if it was already gone (every caller is idempotent)."""
    try:
        ipr.link("del", ifname=name)
    except NetlinkError as err:
        if err.code in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
            return False
        raise Unavailable(f"cannot delete {name}: {err}") from err
    log.info("deleted %s", name)
    return True


def host_ifname(endpoint_id: str) -> str:
    return HOST_PREFIX + endpoint_id[:12]


def peer_ifname(endpoint_id: str) -> str:
    return PEER_PREFIX + endpoint_id[:12]


@dataclass(frozen=True)
class EndpointLink:
    """The kernel state one local endpoint needs."""

    endpoint_id: str
    ip: ipaddress.IPv4Address
    mac: str
    mtu: int
    gateway: ipaddress.IPv4Address = ipaddress.IPv4Address(GATEWAY)  # the container's next hop
    ip6: ipaddress.IPv6Address | None = None  # on an --ipv6 network: its /128

    @property
    def host_if(self) -> str:
        return host_ifname(self.endpoint_id)

    @property
    def peer_if(self) -> str:
        return peer_ifname(self.endpoint_id)


def _sysctl(root: str, path: str, value: str) -> None:
    try:
        with open(f"{root}/{path}", "w") as handle:
            handle.write(value)
    except OSError as err:
        raise Unavailable(f"cannot set sysctl {path.replace('/', '.')}={value}: {err}") from err


def has_ipv6() -> bool:
    """A kernel without IPv6 has nothing to lock down (and no ip6tables tables to write)."""
    return os.path.exists("/proc/net/if_inet6")


def enable_forwarding6(sysctl_dir: str = "/proc/sys") -> None:
    """Turn on IPv6 forwarding, at the first endpoint with an IPv6 address (as Docker does for
    its --ipv6 networks). The kernel has no per-interface IPv6 forwarding switch that works
    without conf/all: setting that makes every interface a router, and a router ignores
    router advertisements when accept_ra is 1, so interfaces that accepted them (SLAAC,
    default routes) are moved to accept_ra=2 first (accept them while forwarding)."""
    base = f"{sysctl_dir}/net/ipv6/conf"
    try:
        with open(f"{base}/all/forwarding") as handle:
            if handle.read().strip() == "1":
                return
        names = os.listdir(base)
    except OSError as err:
        raise Unavailable(f"cannot read IPv6 forwarding at {base}: {err.strerror}") from err
    for name in names:
        if name in ("all", "default") or name.startswith(HOST_PREFIX):
            continue
        try:
            with open(f"{base}/{name}/accept_ra") as handle:
                if handle.read().strip() != "1":
                    continue
        except OSError:
            continue
        _sysctl(sysctl_dir, f"net/ipv6/conf/{name}/accept_ra", "2")
        log.info("interface %s: accept_ra 1 -> 2, so it keeps its router advertisements with IPv6 forwarding on", name)
    _sysctl(sysctl_dir, "net/ipv6/conf/all/forwarding", "1")
    log.info("enabled IPv6 forwarding (an endpoint of an --ipv6 network)")


def enable_forwarding(sysctl_dir: str = "/proc/sys") -> None:
    """Turn on IPv4 forwarding (routed endpoints need it; the kernel carries it over to
    conf/all/forwarding). A failure names the directory and the setting that moves it, since
    the usual cause is a read-only /proc/sys (Docker mounts a managed plugin's so)."""
    path = f"{sysctl_dir}/net/ipv4/ip_forward"
    try:
        with open(path) as handle:
            before = handle.read().strip()
    except OSError as err:
        raise Unavailable(
            f"cannot read sysctl net.ipv4.ip_forward at {path}: {err.strerror} (is --sysctl-dir "
            f"{sysctl_dir!r} right? the managed plugin uses /host/proc/sys)"
        ) from err
    try:  # written even if already 1: a no-op, but a read-only tree fails now, not at a Join
        _sysctl(sysctl_dir, "net/ipv4/ip_forward", "1")
    except Unavailable as err:
        raise Unavailable(
            f"{err} (canal needs {sysctl_dir}/net writable: run as root; the managed plugin mounts "
            "the host's /proc/sys/net rw at /host/proc/sys/net)"
        ) from err.__cause__
    if before != "1":
        log.info("enabled IPv4 forwarding (%s was %s)", path, before or "empty")


class Links:
    """One netlink socket, serialised: pyroute2 sockets are not thread-safe."""

    def __init__(self, sysctl_dir: str = "/proc/sys", submit: Callable[[Callable[[], None]], object] | None = None) -> None:
        # A managed plugin's /proc/sys is read-only (Docker mounts it so); the host's
        # /proc/sys/net is mounted writable elsewhere instead of granting CAP_SYS_ADMIN.
        self.sysctl_dir = sysctl_dir
        self._ipr = IPRoute()
        self._lock = threading.Lock()
        # Deletions get their own socket and lock: deleting a veth blocks ~20 ms in the kernel
        # (an RCU wait), and a Join creating its veth on the shared socket waited behind the
        # reconciler removing the previous container's (Join p50 18 ms, of it 8-24 ms here).
        self._reaper = IPRoute()
        self._reap_lock = threading.Lock()
        # Held by Join across "record joined + create veth" and by the reconciler across
        # "read records + delete unowned veths", so a new veth is never taken for an orphan.
        self.guard = threading.RLock()
        self._configured: dict[str, EndpointLink] = {}  # host veth -> what it was configured as
        # Host veth -> endpoint id of pairs made ahead of their Join (prepare): not orphans.
        self._expected: dict[str, str] = {}
        self._submit = submit or _in_background
        self._forwarding6 = False  # IPv6 forwarding turned on (at the first --ipv6 endpoint)
        self._audit = 0  # where drifted()'s next slice of whole reconfigurations starts
        self.net_dir = "/sys/class/net"  # where drifted() reads each veth's MTU and flags
        self.route_file = "/proc/net/route"

    def close(self) -> None:
        with self._lock:
            self._ipr.close()
        with self._reap_lock:
            self._reaper.close()

    def _index(self, name: str) -> int | None:
        found = self._ipr.link_lookup(ifname=name)
        return found[0] if found else None

    def prepare(self, link: EndpointLink) -> None:
        """Start making the pair at CreateEndpoint, in the background (as Docker's bridge driver
        makes its veth at CreateEndpoint): Docker calls Join a few ms later, and the kernel's
        veth add (4-24 ms here) then overlaps with the agent's pass instead of adding to Join.
        It is configured as for a container's first interface (gateway 169.254.1.1), so Join
        has nothing left to do unless its gateway differs; its peer stays in this namespace
        (down, so nothing flows) until Docker moves it into the sandbox after Join. The
        reconciler leaves it alone until Join or forget()."""
        with self.guard:  # registered before any later pass can count it an orphan
            self._expected[link.host_if] = link.endpoint_id
        self._submit(lambda: self._precreate(link))

    def forget(self, endpoint_id: str) -> None:
        """The endpoint was deleted without a Join: its prepared pair is an orphan again."""
        with self.guard:
            self._expected.pop(host_ifname(endpoint_id), None)

    def _precreate(self, link: EndpointLink) -> None:
        with self._lock:
            if self._expected.get(link.host_if) != link.endpoint_id:
                return  # joined (ensure_veth made it) or deleted meanwhile
            try:
                self._create(link)
                self._configure(link)
                self._configured[link.host_if] = link
            except (NetlinkError, CanalError, OSError) as err:  # Join makes it then, or says why
                log.info("veth %s not made ahead of its Join (%s)", link.host_if, err)

    def _create(self, link: EndpointLink) -> None:
        if self._index(link.host_if) is None:
            if self._index(link.peer_if) is not None:  # half-made by a crashed attempt
                self._ipr.link("del", ifname=link.peer_if)
            self._ipr.link(
                "add",
                ifname=link.host_if,
                kind="veth",
                address=HOST_MAC,
                mtu=link.mtu,
                peer={"ifname": link.peer_if, "address": link.mac, "mtu": link.mtu},
            )
            log.info("created veth %s for endpoint %s (%s)", link.host_if, link.endpoint_id[:12], link.ip)

    def ensure_veth(self, link: EndpointLink) -> None:
        """Create the pair (if the host end is missing) and configure the host end."""
        with self._lock:
            try:
                done = self._configured.get(link.host_if)
                if not (done == link and link.host_if in self._expected and self._exists(link.host_if)):
                    self._create(link)
                    self._configure(link, done)
                    self._configured[link.host_if] = link
            except NetlinkError as err:
                raise Unavailable(f"endpoint {link.endpoint_id[:12]}: netlink: {err}") from err
            finally:
                self._expected.pop(link.host_if, None)  # wanted as a joined endpoint's from now on

    @staticmethod
    def _exists(name: str) -> bool:
        return os.path.exists(f"/sys/class/net/{name}")

    def _configure(self, link: EndpointLink, before: EndpointLink | None = None) -> None:
        index = self._index(link.host_if)
        if index is None:
            raise Unavailable(f"veth {link.host_if} vanished while configuring it")
        if before is not None and before.gateway != link.gateway:  # prepared for another gateway
            try:
                self._ipr.addr("del", index=index, address=str(before.gateway), prefixlen=32)
            except NetlinkError as err:
                if err.code not in (errno.EADDRNOTAVAIL, errno.ENOENT):
                    raise
        conf = f"net/ipv4/conf/{link.host_if}/"
        _sysctl(self.sysctl_dir, conf + "proxy_arp", "1")
        _sysctl(self.sysctl_dir, conf + "forwarding", "1")
        # Strict reverse-path filtering: a source not routed back out of this veth is dropped
        # (the raw table's rpfilter rule does the same where conf/all asks for loose mode).
        _sysctl(self.sysctl_dir, conf + "rp_filter", "1")
        _sysctl(self.sysctl_dir, f"net/ipv4/neigh/{link.host_if}/proxy_delay", "0")
        # Published ports on 127.0.0.1 are DNATed out of the veth (masqueraded): the kernel
        # routes loopback sources out of it only with route_localnet. The raw table drops
        # every loopback address arriving from a workload, which this would otherwise accept.
        _sysctl(self.sysctl_dir, conf + "route_localnet", "1")
        if link.ip6 is not None:
            self._configure6(link)
        # IPv4 only: no IPv6 address on the host side, so no link-local way to the host.
        elif os.path.isdir(f"{self.sysctl_dir}/net/ipv6/conf/{link.host_if}"):
            _sysctl(self.sysctl_dir, f"net/ipv6/conf/{link.host_if}/disable_ipv6", "1")
        self._ipr.link("set", index=index, state="up", mtu=link.mtu)
        try:
            self._ipr.addr("add", index=index, address=str(link.gateway), prefixlen=32, scope=RT_SCOPE_LINK)
        except NetlinkError as err:
            if err.code != errno.EEXIST:
                raise
        self._ipr.route(
            "replace",
            dst=f"{link.ip}/32",
            oif=index,
            scope=RT_SCOPE_LINK,
            proto=RTPROT_CANAL,
        )
        if link.ip6 is not None:
            self._address6(index, link)

    def _configure6(self, link: EndpointLink) -> None:
        """The host end of an --ipv6 endpoint's veth: IPv6 on, with only the fixed link-local
        address (no DAD: the MAC is the same on every veth, each its own link), no router
        advertisements taken from the container, a router towards it."""
        if not self._forwarding6:
            enable_forwarding6(self.sysctl_dir)
            self._forwarding6 = True
        conf = f"net/ipv6/conf/{link.host_if}/"
        _sysctl(self.sysctl_dir, conf + "addr_gen_mode", "1")  # none: we add the address ourselves
        _sysctl(self.sysctl_dir, conf + "accept_dad", "0")
        _sysctl(self.sysctl_dir, conf + "accept_ra", "0")
        _sysctl(self.sysctl_dir, conf + "forwarding", "1")
        _sysctl(self.sysctl_dir, conf + "disable_ipv6", "0")

    def _address6(self, index: int, link: EndpointLink) -> None:
        try:
            self._ipr.addr("add", index=index, address=GATEWAY6, prefixlen=64, family=socket.AF_INET6)
        except NetlinkError as err:
            if err.code != errno.EEXIST:
                raise
        self._ipr.route(
            "replace",
            family=socket.AF_INET6,
            dst=f"{link.ip6}/128",
            oif=index,
            proto=RTPROT_CANAL,
        )

    def delete(self, endpoint_id: str) -> None:
        """Remove both ends and the route (the route goes with the device)."""
        with self._reap_lock:
            for name in (host_ifname(endpoint_id), peer_ifname(endpoint_id)):
                delete_link(self._reaper, name)

    def present(self) -> set[str]:
        """Names of the host-side veths that exist now (from sysfs: a netlink dump of every
        link costs milliseconds of parsing per pass in pyroute2)."""
        try:
            return {name for name in os.listdir("/sys/class/net") if name.startswith(HOST_PREFIX)}
        except OSError as err:
            raise Unavailable(f"cannot list network interfaces: {err}") from err

    def drifted(self, links: list[EndpointLink]) -> set[str]:
        """Host veths whose state differs from what ensure_veth() makes. Every veth: its /32
        route (one read of /proc/net/route), up and MTU (sysfs); in turn, AUDIT_SLICE of them
        also their sysctls, and the first RECONFIGURE_SLICE of those are reconfigured whole
        (their gateway address has no file to read). Configuring every veth on each full pass
        cost ~5 netlink requests and 6 sysctl writes each: 20-36 s for 1,500 veths here, and
        every Join queued behind it (its 10 s wait then ran out)."""
        routes = _routes32(self.route_file)
        out = {link.host_if for link in links if link.ip6 is not None or not self._up(link, routes)}
        if links:
            start = self._audit % len(links)
            turn = (links[start:] + links[:start])[:AUDIT_SLICE]
            self._audit = start + len(turn)
            out.update(link.host_if for link in turn[:RECONFIGURE_SLICE])
            out.update(link.host_if for link in turn[RECONFIGURE_SLICE:] if not self._sysctls_set(link))
        return out

    def _up(self, link: EndpointLink, routes: set[tuple[str, str]]) -> bool:
        """Routed, up and at its MTU: what a container's traffic needs first."""
        name = link.host_if
        if (name, str(link.ip)) not in routes:
            return False
        try:
            with open(f"{self.net_dir}/{name}/mtu") as handle:
                if int(handle.read()) != link.mtu:
                    return False
            with open(f"{self.net_dir}/{name}/flags") as handle:
                return bool(int(handle.read(), 16) & IFF_UP)
        except (OSError, ValueError):
            return False

    def _sysctls_set(self, link: EndpointLink) -> bool:
        name = link.host_if
        conf = f"{self.sysctl_dir}/net/ipv4/conf/{name}/"
        wanted = [(conf + "proxy_arp", "1"), (conf + "forwarding", "1"), (conf + "rp_filter", "1"),
                  (conf + "route_localnet", "1"), (f"{self.sysctl_dir}/net/ipv4/neigh/{name}/proxy_delay", "0")]
        v6 = f"{self.sysctl_dir}/net/ipv6/conf/{name}/disable_ipv6"
        if os.path.exists(v6):
            wanted.append((v6, "1"))
        try:
            for path, value in wanted:
                with open(path) as handle:
                    if handle.read().strip() != value:
                        return False
        except OSError:
            return False
        return True

    def orphans(self, desired: list[EndpointLink]) -> set[str]:
        """Host-side veths of no joined endpoint (nor prepared for a Join); decide under `guard`,
        delete after."""
        return self.present() - {link.host_if for link in desired} - set(self._expected)

    def reconcile(self, desired: list[EndpointLink], orphans: set[str], full: bool = True) -> None:
        """Fix what drifted on the wanted veths (when full: the ones drifted() finds, else the
        ones not yet configured as wanted); delete the orphans (slow: an RCU wait each)."""
        present = self.present()
        drifted = self.drifted([link for link in desired if link.host_if in present]) if full else set()
        for link in desired:
            if link.host_if in present:
                if link.host_if in drifted or self._configured.get(link.host_if) != link:
                    self.ensure_veth(link)
            else:
                log.warning(
                    "endpoint %s (%s): its veth %s is gone; the container lost its network",
                    link.endpoint_id[:12], link.ip, link.host_if,
                )
        for name in set(self._configured) - {link.host_if for link in desired} - set(self._expected):
            self._configured.pop(name, None)
        for name in sorted(orphans):
            log.info("removing veth %s (no joined endpoint)", name)
            with self._reap_lock:  # not self._lock: a Join's ensure_veth need not wait for it
                delete_link(self._reaper, name)


def _in_background(work: Callable[[], None]) -> None:
    threading.Thread(target=work, name="canal-veth", daemon=True).start()


def default_route_device() -> tuple[str, str, int] | None:
    """(iface, address, mtu) of the default route's device, if the host has one."""
    with IPRoute() as ipr:
        for route in ipr.get_default_routes(family=2):
            oif = route.get_attr("RTA_OIF")
            link = ipr.get_links(oif)[0]
            addrs = ipr.get_addr(family=2, index=oif)
            if addrs:
                return link.get_attr("IFLA_IFNAME"), addrs[0].get_attr("IFA_ADDRESS"), link.get_attr("IFLA_MTU")
    return None


def underlay(iface: str = "", public_ip: str = "") -> tuple[str, str, int]:
    """(iface, public ip, mtu) of the underlay: as configured, else the default route's device,
    else the first up interface with a global IPv4 address (hosts without a default route)."""
    with IPRoute() as ipr:
        candidates = []
        for addr in ipr.get_addr(family=2):
            if addr["scope"] != 0:
                continue
            index = addr["index"]
            link = ipr.get_links(index)[0]
            name = link.get_attr("IFLA_IFNAME")
            if name.startswith((HOST_PREFIX, "docker", "flannel", "veth", "br-")):
                continue
            candidates.append((name, addr.get_attr("IFA_ADDRESS"), link.get_attr("IFLA_MTU")))
    if iface or public_ip:
        for name, ip, mtu in candidates:
            if (not iface or name == iface) and (not public_ip or ip == public_ip):
                return name, ip, mtu
        raise Unavailable(f"no interface matches iface={iface!r} public-ip={public_ip!r}")
    found = default_route_device()
    if found:
        return found
    if candidates:
        return candidates[0]
    return "lo", "127.0.0.1", 1500


IFA_F_TEMPORARY, IFA_F_DADFAILED, IFA_F_DEPRECATED = 0x01, 0x08, 0x20


def underlay6(iface: str, public_ip6: str = "") -> str:
    """This host's IPv6 underlay address (a dual-stack lease's PublicIPv6): --public-ip6, which
    must be on `iface`, else the first global IPv6 address of `iface` (flannel takes the
    external interface's global IPv6 address); "" when it has none (no IPv6 underlay)."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=iface)
        addresses = []
        if found:
            for addr in ipr.get_addr(family=socket.AF_INET6, index=found[0]):
                flags = addr.get_attr("IFA_FLAGS") or addr["flags"]
                # Not a privacy address (it changes), nor one that failed DAD or is going away.
                if addr["scope"] == 0 and not flags & (IFA_F_TEMPORARY | IFA_F_DADFAILED | IFA_F_DEPRECATED):
                    addresses.append(str(ipaddress.IPv6Address(addr.get_attr("IFA_ADDRESS"))))
    if public_ip6:
        if public_ip6 not in addresses:
            raise Unavailable(f"public-ip6 {public_ip6} is not a global IPv6 address of the underlay interface {iface}")
        return public_ip6
    return addresses[0] if addresses else ""


@dataclass(frozen=True)
class Forgotten:
    """What a conntrack flush achieved: truthy when every address was flushed (or had no
    state). `failed` pairs each address left with stale state with the reason."""

    flushed: tuple[str, ...] = ()
    failed: tuple[tuple[str, str], ...] = ()
    tool_missing: bool = False  # conntrack itself is missing: retrying before it is installed is pointless

    def __bool__(self) -> bool:
        return not self.failed


def forget_connections(*ips: str, runner: Callable[..., Any] | None = None) -> Forgotten:
    """Drop conntrack entries to and from departed endpoints' addresses, as Felix does: a new
    container that gets an address must not inherit the old one's NAT and accept state.

    Never raises: a missing `conntrack` or a failing flush costs stale state for those
    addresses, never the pass (and with it an unrelated Join) that called this. Each address
    is flushed on its own, so one failure leaves the others flushed; one log line per call
    names every address left behind and why. `runner` defaults to canal.dataplane.cmd.run."""
    from canal.dataplane.cmd import run

    call = runner or run
    flushed: list[str] = []
    failed: list[tuple[str, str]] = []
    missing = False
    for raw in ips:
        try:
            address = ipaddress.ip_address(raw)  # from records: never let one become an option
            ip = str(address)
        except ValueError:
            failed.append((str(raw)[:64], "not an IPv4 or IPv6 address"))
            continue
        family = ["-f", "ipv6"] if address.version == 6 else []
        reason = ""
        for direction in ("--orig-src", "--orig-dst"):
            try:
                proc = call(["conntrack", "-D", *family, direction, ip], check=False, timeout=5)
            except ToolMissing:
                reason = "conntrack is not installed (apt-get install conntrack)"
                missing = True
                break
            except CanalError as err:  # timed out, refused
                reason = str(err)
                break
            if proc.returncode not in (0, 1):  # 1: nothing to delete
                reason = f"conntrack -D {direction} rc={proc.returncode}: {(proc.stderr or '').strip()[:200]}"
                break
        if reason:
            failed.append((ip, reason))
        else:
            flushed.append(ip)
    if failed:
        reasons: dict[str, list[str]] = {}
        for ip, reason in failed:
            reasons.setdefault(reason, []).append(ip)
        log.warning(
            "conntrack state of %d departed address(es) not flushed, new holders of them may inherit "
            "old connections' state (%d flushed): %s",
            len(failed), len(flushed), "; ".join(f"{', '.join(a)}: {r}" for r, a in reasons.items()),
        )
    elif flushed:
        log.debug("conntrack state flushed for %s", ", ".join(flushed))
    return Forgotten(tuple(flushed), tuple(failed), missing)


def local_addresses() -> set[str]:
    """Every IPv4 address of this host (this network namespace)."""
    with IPRoute() as ipr:
        return {addr.get_attr("IFA_ADDRESS") for addr in ipr.get_addr(family=2)}


def local_addresses46() -> set[str]:
    """Every IPv4 and IPv6 address of this host (this network namespace), IPv6 as str() of
    ipaddress prints it (the form explain compares with)."""
    with IPRoute() as ipr:
        six = {str(ipaddress.IPv6Address(addr.get_attr("IFA_ADDRESS"))) for addr in ipr.get_addr(family=10)}
    return local_addresses() | six


def host_resolvers(resolv_conf: str, local: set[str]) -> tuple[str, ...]:
    """Nameservers of the host's resolv.conf that are this host's own (non-loopback) addresses:
    Docker's embedded DNS forwards containers' queries to them from the containers' own
    namespaces, so they arrive through the veths like any workload-to-host traffic.
    Loopback resolvers are never reached from containers (Docker replaces them)."""
    try:
        with open(resolv_conf, encoding="utf-8", errors="replace") as handle:
            lines = handle.read(65536).splitlines()
    except OSError:
        return ()
    out = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                address = ipaddress.IPv4Address(fields[1])
            except ValueError:
                continue
            if not address.is_loopback and str(address) in local and str(address) not in out:
                out.append(str(address))
    return tuple(out)
