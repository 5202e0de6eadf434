"""Routes inside a container's network namespace, for containers on several canal networks.

Every canal network of a host shares the host's leased subnet, so the container cannot tell
its networks apart by destination prefix: Canal programs, inside the sandbox, a route per
network (its pool, or a /32 per member where pools overlap) via that interface's own
link-local gateway, plus a source rule per address so replies leave by the interface their
address belongs to. The plan comes from canal.agent.sandboxes; this module only diffs and
programs it.

The namespace is entered by a short-lived thread (setns affects only the calling thread), so
no other thread of the plugin ever runs in a container's namespace, even if a call fails.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import ipaddress
import logging
import os
import re
import stat
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from canal.errors import Unavailable
from canal.records import GATEWAYS

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
RTPROT_CANAL = 101
RULE_PRIORITY = 1000  # before the main table's 32766
TABLE_BASE = 25600  # table of gateway 169.254.1.N: TABLE_BASE + N
_GATEWAY_NET = ipaddress.IPv4Network("169.254.1.0/24")
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
T = TypeVar("T")


@dataclass(frozen=True)
class SandboxIface:
    """One canal interface of a sandbox and the destinations it carries."""

    endpoint_id: str
    mac: str
    ip: ipaddress.IPv4Address
    gateway: ipaddress.IPv4Address
    destinations: tuple[ipaddress.IPv4Network, ...]

    @property
    def table(self) -> int:
        return TABLE_BASE + int(self.gateway.packed[3])


@dataclass(frozen=True)
class SandboxPlan:
    key: str  # Docker's SandboxKey
    ifaces: tuple[SandboxIface, ...]  # empty: remove what Canal programmed there


def netns_path(key: str, netns_dir: str) -> str:
    """The namespace file of a SandboxKey, under the configured directory only: a record may
    name any path, and a namespace other than a Docker sandbox's (the host's own) must never
    be entered."""
    name = key.rsplit("/", 1)[-1]
    if not _KEY_NAME.fullmatch(name) or name in (".", ".."):
        raise Unavailable(f"sandbox key {key[:80]!r} is not a Docker sandbox")
    return os.path.join(netns_dir, name)


_libc: Any = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def in_netns(path: str, work: Callable[[IPRoute], T], timeout: float = 5.0) -> T:
    """Run `work` with a netlink socket inside the namespace at `path`, on a thread of its
    own. Raises FileNotFoundError when the sandbox is gone, Unavailable otherwise."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                info = os.fstat(fd)
                own = os.stat("/proc/self/ns/net")
                if info.st_dev != own.st_dev or not stat.S_ISREG(info.st_mode):
                    raise Unavailable(f"{path} is not a network namespace")
                if info.st_ino == own.st_ino:
                    raise Unavailable(f"{path} is this host's own network namespace")
                _setns(fd)
            finally:
                os.close(fd)
            with IPRoute() as ipr:  # bound to the namespace it is created in
                outcome["value"] = work(ipr)
        except BaseException as err:  # handed to the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=run, name="canal-netns", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise Unavailable(f"sandbox {path}: netlink did not answer within {timeout:.0f} s")
    if "error" in outcome:
        err = outcome["error"]
        if isinstance(err, FileNotFoundError):
            raise err
        if isinstance(err, OSError) and err.errno == errno.EPERM:
            raise Unavailable(f"cannot enter sandbox {path}: {err.strerror} (needs CAP_SYS_ADMIN)") from err
        if isinstance(err, (OSError, NetlinkError)):
            raise Unavailable(f"sandbox {path}: {err}") from err
        raise err
    return outcome["value"]  # type: ignore[no-any-return]


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


def taken_gateways(ipr: IPRoute) -> set[ipaddress.IPv4Address]:
    """Gateways already connected in a sandbox: the link-scope /32 routes Docker installed for
    its earlier canal interfaces (from each Join's StaticRoutes)."""
    taken = set()
    for route in ipr.get_routes(family=2, table=254):
        dst = _attr(route, "RTA_DST")
        if route["dst_len"] == 32 and dst and _attr(route, "RTA_GATEWAY") is None:
            address = ipaddress.IPv4Address(dst)
            if address in _GATEWAY_NET:
                taken.add(address)
    return taken


def free_gateway(taken: Iterable[ipaddress.IPv4Address]) -> ipaddress.IPv4Address:
    used = set(taken)
    for gateway in GATEWAYS:
        if gateway not in used:
            return gateway
    raise Unavailable("the sandbox already has 254 canal interfaces")


def _owned_table(table: int) -> bool:
    return TABLE_BASE < table < TABLE_BASE + 255


def apply_plan(ipr: IPRoute, plan: SandboxPlan) -> set[str]:
    """Diff and program one sandbox; returns the endpoints whose interface is not (yet) in it
    (Docker moves an interface in after its Join returns)."""
    index_of = {}
    for link in ipr.get_links():
        mac = _attr(link, "IFLA_ADDRESS")
        if mac:
            index_of[mac.lower()] = link["index"]
    missing = set()
    want_main: dict[ipaddress.IPv4Network, tuple[str, int, str]] = {}
    want_tables: dict[int, tuple[str, int]] = {}
    want_rules: dict[tuple[str, int], None] = {}
    own = {str(iface.ip) for iface in plan.ifaces}
    for iface in plan.ifaces:
        index = index_of.get(iface.mac.lower())
        want_rules[(str(iface.ip), iface.table)] = None  # harmless before its interface exists
        if index is None:
            missing.add(iface.endpoint_id)
            continue
        want_tables[iface.table] = (str(iface.gateway), index)
        for dst in iface.destinations:
            if not (dst.prefixlen == 32 and str(dst.network_address) in own):
                want_main[dst] = (str(iface.gateway), index, str(iface.ip))

    have_main: dict[ipaddress.IPv4Network, tuple[str, int, str]] = {}
    have_tables: dict[int, tuple[str, int]] = {}
    for route in ipr.route("dump", family=2):
        table = _attr(route, "RTA_TABLE") or route["table"]
        gateway = _attr(route, "RTA_GATEWAY")
        if gateway is None or ipaddress.IPv4Address(gateway) not in _GATEWAY_NET:
            continue
        index = _attr(route, "RTA_OIF")
        if table == 254 and route["dst_len"] > 0:  # ours, or Docker's from a Join's StaticRoutes
            dst = ipaddress.IPv4Network(f"{_attr(route, 'RTA_DST')}/{route['dst_len']}")
            have_main[dst] = (gateway, index, _attr(route, "RTA_PREFSRC") or "")
        elif _owned_table(table) and route["dst_len"] == 0:
            have_tables[table] = (gateway, index)

    for dst, (gateway, index, _src) in have_main.items():
        if dst not in want_main:
            _quiet(ipr.route, "del", dst=str(dst), gateway=gateway, oif=index, table=254)
    for dst, (gateway, index, src) in want_main.items():
        if have_main.get(dst) != (gateway, index, src):
            ipr.route("replace", dst=str(dst), gateway=gateway, oif=index, prefsrc=src, table=254,
                      proto=RTPROT_CANAL, flags=4)  # RTNH_F_ONLINK
    for table in have_tables:
        if table not in want_tables:
            _quiet(ipr.route, "del", dst="0.0.0.0/0", table=table)
    for table, (gateway, index) in want_tables.items():
        if have_tables.get(table) != (gateway, index):
            ipr.route("replace", dst="0.0.0.0/0", gateway=gateway, oif=index, table=table,
                      proto=RTPROT_CANAL, flags=4)

    have_rules: dict[tuple[str, int], None] = {}
    for rule in ipr.get_rules(family=2):
        table = _attr(rule, "FRA_TABLE") or rule["table"]
        if _owned_table(table) and rule["src_len"] == 32:
            have_rules[(_attr(rule, "FRA_SRC"), table)] = None
    for src, table in set(have_rules) - set(want_rules):
        _quiet(ipr.rule, "del", src=src, src_len=32, table=table, priority=RULE_PRIORITY)
    for src, table in set(want_rules) - set(have_rules):
        try:
            ipr.rule("add", src=src, src_len=32, table=table, priority=RULE_PRIORITY)
        except NetlinkError as err:
            if err.code != errno.EEXIST:
                raise
    return missing


def _quiet(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """A delete of what is already gone (the kernel drops routes with their device) is done."""
    try:
        call(*args, **kwargs)
    except NetlinkError as err:
        if err.code not in (errno.ESRCH, errno.ENOENT, errno.ENODEV):
            raise


class Sandboxes:
    """The applier: programs plans in sandboxes under `netns_dir` (where Docker's SandboxKeys
    live; the managed plugin sees the host's through a mount)."""

    def __init__(self, netns_dir: str = "/var/run/docker/netns"):
        self.netns_dir = netns_dir

    def gateways(self, key: str) -> set[ipaddress.IPv4Address]:
        """Gateways in use in the sandbox; empty when it cannot be read (the first interface)."""
        return in_netns(netns_path(key, self.netns_dir), taken_gateways)

    def apply(self, plan: SandboxPlan) -> set[str]:
        return in_netns(netns_path(plan.key, self.netns_dir), lambda ipr: apply_plan(ipr, plan))
