"""The rtnetlink socket every applier opens for itself (pyroute2 sockets are not thread-safe)."""

from __future__ import annotations

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from canal.errors import Unavailable


def open_socket() -> IPRoute:
    """A socket bound to the calling thread's network namespace; a host without netlink (or a
    sandbox refusing it) is Unavailable, with the kernel's reason."""
    try:
        return IPRoute()
    except (OSError, NetlinkError) as err:
        raise Unavailable(f"cannot open netlink: {err}") from err
