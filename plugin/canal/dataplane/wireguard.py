"""WireGuard between hosts: flannel's `wireguard` backend and Canal's encrypted networks.

One device, `flannel-wg` (flannel's name, so flanneld wireguard hosts and Canal hosts peer):
the kernel's where the kernel has WireGuard, `wireguard-go` (userspace, over a TUN device)
where it does not; both are configured the same way, through `wg` (the UAPI). The private key
is made on this host and never leaves it: a 0600 file under the state directory, handed to
`wg` on stdin, never in argv, a log line or the datastore. Only the public key is published
(flannel's lease `BackendData.PublicKey`).

What the device should hold is computed from the leases (`WgState`, pure) and then converged:
`wg syncconf` changes only what differs, so established sessions survive a peer being added.
Routes through the device go in the main table for flannel's cluster-wide backend, or in a
table of their own, chosen by a firewall mark, for encrypted networks on a cluster of another
backend. Whatever is not (yet) routed through the device is dropped by the firewall
(canal.agent.desired): an encrypted network fails closed.

IPv6 rides the same device (flannel's Mode "auto"): peers' AllowedIPs and the routes hold
both families, the mark rule exists in both, and the device gets the lease's first IPv6
address beside the IPv4 one. The outer packets use the peer's IPv4 endpoint; OVERHEAD (80,
an outer IPv6 header's worth) covers an IPv6 underlay as well.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from pyroute2.netlink.exceptions import NetlinkError

from canal.config import Secret
from canal.dataplane import routedump
from canal.dataplane.cmd import run
from canal.dataplane.links import _sysctl, delete_link
from canal.dataplane.netlink import open_socket
from canal.errors import CanalError, CommandFailed, Unavailable
from canal.records import wg_key

log = logging.getLogger(__name__)

DEVICE = "flannel-wg"
OVERHEAD = 80  # outer IPv6 + UDP + WireGuard header and tag: flannel's figure, either family
Net = ipaddress.IPv4Network | ipaddress.IPv6Network
FAMILIES = (socket.AF_INET, socket.AF_INET6)
WG_TABLE = 25900  # routes of encrypted networks' traffic (per-network mode)
RULE_PRIORITY = 900  # before the main table (32766)
ENCRYPT_MARK = 0x100000  # set by the mangle table on encrypted networks' packets
RTPROT_CANAL_WG = 104  # next to direct (103) and vxlan (102)
RT_TABLE_MAIN = 254
RTN_THROW = 9


@dataclass(frozen=True)
class WgPeer:
    public_key: str  # checked (records.wg_key) before it gets here
    endpoint: str  # "a.b.c.d:port", or "[v6]:port" (Mode ipv6)
    allowed_ips: tuple[Net, ...]  # both families


@dataclass(frozen=True)
class WgState:
    """The device's peers and the destinations routed through it (in `table`)."""

    listen_port: int
    peers: tuple[WgPeer, ...] = ()
    routes: tuple[Net, ...] = ()
    table: int = RT_TABLE_MAIN
    keepalive: int = 0
    psk: Secret = field(default_factory=Secret)
    address: ipaddress.IPv4Address | None = None  # the lease's .0, /32 on the device (as flannel)
    # Local addresses inside a routed prefix (a --ip from a peer's range): `throw` in `table`,
    # so a marked packet to them falls through to the main table's veth route.
    throws: tuple[Net, ...] = ()
    address6: ipaddress.IPv6Address | None = None  # the lease's IPv6 subnet's first address, /128


def _ipv6() -> bool:
    """The kernel has IPv6 (a host booted with ipv6.disable=1 has no IPv6 routes or rules)."""
    return os.path.exists("/proc/net/if_inet6")


def wg_mtu(underlay_mtu: int) -> int:
    return underlay_mtu - OVERHEAD


def config_text(state: WgState, private_key: str) -> str:
    """`wg syncconf`'s input. Every value here was validated (keys by records.wg_key, addresses
    and ports typed): the format has no quoting, so nothing else may reach it."""
    lines = ["[Interface]", f"PrivateKey = {private_key}", f"ListenPort = {state.listen_port}"]
    for peer in state.peers:
        lines += ["", "[Peer]", f"PublicKey = {peer.public_key}"]
        if state.psk:
            lines.append(f"PresharedKey = {state.psk.reveal()}")
        lines.append(f"Endpoint = {peer.endpoint}")
        lines.append(f"AllowedIPs = {', '.join(str(n) for n in peer.allowed_ips)}")
        if state.keepalive:
            lines.append(f"PersistentKeepalive = {state.keepalive}")
    return "\n".join(lines) + "\n"


def _sysctl_if_needed(base: str, name: str, value: str) -> None:
    """Write a per-device sysctl only when it differs (a pass sees it every time)."""
    try:
        with open(f"{base}/{name}") as handle:
            if handle.read().strip() == value:
                return
        with open(f"{base}/{name}", "w") as handle:
            handle.write(value)
    except OSError as err:
        raise Unavailable(f"cannot set {DEVICE} {name}={value}: {err.strerror}") from err


class KeyFile:
    """This host's private key: made here, kept in a 0600 file, replaced atomically."""

    def __init__(self, directory: str, runner: Callable[..., Any] = run) -> None:
        self.path = os.path.join(directory, "wireguard", "private.key")
        self._run = runner
        self._read: tuple[tuple[int, int, int], str] | None = None  # (the file's stat, its key)

    def private(self) -> str:
        """The key, made on first use. A file that does not hold a key is replaced, not used.
        Read again only when the file changed (a pass asks for it more than once)."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._read is not None and self._read[0] == stamp:
                return self._read[1]
            with open(self.path) as handle:
                key = wg_key(handle.read().strip(), f"private key in {self.path}")
            self._read = (stamp, key)
            return key
        except FileNotFoundError:
            pass
        except CanalError:
            log.error("%s does not hold a WireGuard key: making a new one", self.path)
        return self.renew()

    def renew(self) -> str:
        key = wg_key(self._run(["wg", "genkey"]).stdout.strip(), "output of wg genkey")
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        return key

    def public(self, private: str | None = None) -> str:
        out = self._run(["wg", "pubkey"], input=(private or self.private()) + "\n").stdout.strip()
        return wg_key(out, "output of wg pubkey")


class WireGuard:
    """The device (kernel or wireguard-go), its configuration, its routes and mark rule."""

    def __init__(self, keys: KeyFile, sysctl_dir: str = "/proc/sys", runner: Callable[..., Any] = run) -> None:
        self.keys = keys
        self.sysctl_dir = sysctl_dir
        self._run = runner
        self._ipr = open_socket()
        self._lock = threading.Lock()
        self._key_lock = threading.Lock()  # a rotation never interleaves with a syncconf of the old key
        self.implementation = ""  # "kernel" or "wireguard-go", once the device exists
        self._configured: tuple[WgState, str] | None = None

    def close(self) -> None:
        with self._lock:
            self._ipr.close()

    def _index(self) -> int | None:
        found = self._ipr.link_lookup(ifname=DEVICE)
        return int(found[0]) if found else None

    def exists(self) -> bool:
        with self._lock:
            return self._index() is not None

    def ensure_device(self, mtu: int, address: ipaddress.IPv4Address | None,
                      address6: ipaddress.IPv6Address | None = None) -> None:
        """Create the device if it is missing (kernel first, else wireguard-go), then its MTU,
        addresses, loose reverse-path filter (WireGuard itself checks each packet's source against
        the peer's AllowedIPs) and state up. With an IPv6 address: IPv6 on (no router
        advertisements taken from the tunnel) before the address goes on."""
        with self._lock:
            index = self._index()
            first = index is None or not self.implementation  # created now, or first seen by this process
            if index is None:
                self._configured = None
                index = self._create()
            elif not self.implementation:
                self.implementation = self._kind(index)
            try:
                link = self._ipr.get_links(index)[0]
                if link.get_attr("IFLA_MTU") != mtu:
                    self._ipr.link("set", index=index, mtu=mtu)
                if address is not None:
                    have = {a.get_attr("IFA_ADDRESS") for a in self._ipr.get_addr(family=socket.AF_INET, index=index)}
                    if str(address) not in have:
                        self._ipr.addr("add", index=index, address=str(address), prefixlen=32)
                if address6 is not None:
                    base = f"{self.sysctl_dir}/net/ipv6/conf/{DEVICE}"
                    for name, value in (("accept_ra", "0"), ("disable_ipv6", "0")):
                        _sysctl_if_needed(base, name, value)
                    have6 = {a.get_attr("IFA_ADDRESS") for a in self._ipr.get_addr(family=socket.AF_INET6, index=index)}
                    if str(address6) not in have6:
                        self._ipr.addr("add", index=index, address=str(address6), prefixlen=128, family=socket.AF_INET6)
                if not link["flags"] & 1:
                    self._ipr.link("set", index=index, state="up")
            except NetlinkError as err:
                raise Unavailable(f"{DEVICE}: netlink: {err}") from err
        if first:  # a per-device setting: it lives and dies with the device, no need to rewrite it each pass
            _sysctl(self.sysctl_dir, f"net/ipv4/conf/{DEVICE}/rp_filter", "2")

    def _create(self) -> int:
        try:
            self._ipr.link("add", ifname=DEVICE, kind="wireguard")
            self.implementation = "kernel"
        except NetlinkError as err:
            if err.code not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV):
                raise Unavailable(f"cannot create {DEVICE}: {err}") from err
            # No WireGuard in this kernel: the userspace implementation, same UAPI. It detaches
            # itself once the device and its socket exist; it exits when the device is deleted.
            try:
                self._run(["wireguard-go", DEVICE], timeout=15)
            except CommandFailed as failed:
                raise Unavailable(f"cannot create {DEVICE}: the kernel has no WireGuard ({err}) and "
                                  f"wireguard-go failed: {failed}") from failed
            self.implementation = "wireguard-go"
        log.info("created %s (%s)", DEVICE, self.implementation)
        index = self._index()
        if index is None:
            raise Unavailable(f"{DEVICE} vanished right after it was created")
        return index

    def _kind(self, index: int) -> str:
        info = self._ipr.get_links(index)[0].get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        return "kernel" if kind == "wireguard" else "wireguard-go"

    def configure(self, state: WgState, full: bool) -> None:
        """`wg syncconf`: peers added, changed or removed without touching the others' sessions.
        Skipped when neither the state nor the key changed, unless full (repairs tampering)."""
        with self._key_lock:
            private = self.keys.private()
            if not full and self._configured == (state, private):
                return
            self._run(["wg", "syncconf", DEVICE, "/dev/stdin"], input=config_text(state, private))
            self._configured = (state, private)

    def rotate(self) -> str:
        """A new private key, in force at once; returns the new public key (to publish)."""
        with self._key_lock:
            private = self.keys.renew()
            if self.exists():
                self._run(["wg", "set", DEVICE, "private-key", "/dev/stdin"], input=private + "\n")
            self._configured = None
        return self.keys.public(private)

    def apply_routes(self, wanted: Sequence[Net], table: int, throws: Sequence[Net] = ()) -> None:
        """Our routes (proto 104), both families: exactly `wanted` through the device and
        `throws` in `table`, none elsewhere."""
        want: dict[Net, str] = {dst: "unicast" for dst in wanted} | {dst: "throw" for dst in throws}
        with self._lock:
            index = self._index()
            try:
                have: set[Net] = set()
                for family in FAMILIES:
                    if family == socket.AF_INET6 and not any(d.version == 6 for d in want) and not _ipv6():
                        continue
                    for r in routedump.dump(family, protocol=RTPROT_CANAL_WG):
                        rt, dst = r.table, r.dst
                        if rt not in (RT_TABLE_MAIN, WG_TABLE) or dst is None:
                            continue
                        kind = "throw" if r.type == RTN_THROW else "unicast"
                        ok = kind == "throw" or r.oif == index
                        if rt == table and want.get(dst) == kind and ok:
                            have.add(dst)
                        else:
                            self._route("del", dst, rt)
                for dst in sorted(set(want) - have, key=lambda n: (n.version, n)):
                    if want[dst] == "throw":
                        self._route("replace", dst, table, kind="throw")
                    elif index is None:
                        raise Unavailable(f"{DEVICE} does not exist: no route through it")
                    else:
                        self._route("replace", dst, table, index)
            except NetlinkError as err:
                raise Unavailable(f"{DEVICE} routes: netlink: {err}") from err

    def _route(self, command: str, dst: Net, table: int, index: int | None = None, kind: str = "unicast") -> None:
        family = socket.AF_INET6 if dst.version == 6 else socket.AF_INET
        kwargs: dict[str, Any] = {"dst": str(dst), "proto": RTPROT_CANAL_WG, "table": table, "family": family}
        if index is not None:
            kwargs["oif"] = index
        if kind == "throw":
            kwargs["type"] = RTN_THROW
        try:
            self._ipr.route(command, **kwargs)
        except NetlinkError as err:
            if command == "del" and err.code in (errno.ESRCH, errno.ENOENT):
                return
            raise
        log.info("wireguard route %s %s%s table %d", command, "throw " if kind == "throw" else "", dst, table)

    def ensure_rule(self, present: bool) -> None:
        """`fwmark ENCRYPT_MARK lookup WG_TABLE`, in both families: encrypted networks' packets
        find their routes."""
        with self._lock:
            for family in FAMILIES:
                if family == socket.AF_INET6 and not _ipv6():
                    continue
                try:
                    rules = [r for r in self._ipr.get_rules(family=family) if r.get_attr("FRA_PRIORITY") == RULE_PRIORITY]
                    ours = [r for r in rules if (r.get_attr("FRA_TABLE") or r["table"]) == WG_TABLE
                            and r.get_attr("FRA_FWMARK") == ENCRYPT_MARK and r.get_attr("FRA_FWMASK") == ENCRYPT_MARK]
                    if present and not ours:
                        self._ipr.rule("add", table=WG_TABLE, priority=RULE_PRIORITY, fwmark=ENCRYPT_MARK,
                                       fwmask=ENCRYPT_MARK, family=family)
                        log.info("rule fwmark %#x lookup %d added (%s)", ENCRYPT_MARK, WG_TABLE,
                                 "IPv6" if family == socket.AF_INET6 else "IPv4")
                    elif not present:
                        for _ in ours:
                            self._ipr.rule("del", table=WG_TABLE, priority=RULE_PRIORITY, fwmark=ENCRYPT_MARK,
                                           fwmask=ENCRYPT_MARK, family=family)
                except NetlinkError as err:
                    raise Unavailable(f"wireguard rule: netlink: {err}") from err

    def remove(self) -> None:
        """No encryption wanted any more: routes, rule and device go."""
        self.apply_routes((), RT_TABLE_MAIN)
        self.ensure_rule(False)
        with self._lock:
            delete_link(self._ipr, DEVICE)
        self._configured = None
        self.implementation = ""

    def peer_status(self) -> list[dict[str, Any]]:
        """Per peer: public key, endpoint, latest handshake, bytes. `wg show dump`'s first line
        carries the private key: it is skipped, never parsed into anything kept."""
        if not self.exists():
            return []
        lines = self._run(["wg", "show", DEVICE, "dump"]).stdout.splitlines()[1:]
        out = []
        for line in lines:
            fields = line.split("\t")
            if len(fields) < 8:
                continue
            out.append({
                "public_key": fields[0], "endpoint": fields[2], "allowed_ips": fields[3],
                "latest_handshake": int(fields[4]) if fields[4].isdigit() else 0,
                "rx_bytes": int(fields[5]) if fields[5].isdigit() else 0,
                "tx_bytes": int(fields[6]) if fields[6].isdigit() else 0,
            })
        return out
