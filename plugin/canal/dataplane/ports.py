"""Host ports of published container ports: reserved by holding a bound socket, as Docker's
port mapper does, so a host process cannot take one later and a taken one is refused now.

The traffic itself never reaches these sockets: the nat table's DNAT (canal.agent.desired)
sends every packet for a published port on one of the host's addresses to the container first.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from canal.errors import Conflict, Unavailable
from canal.records import PortBinding

log = logging.getLogger(__name__)

_KINDS = {"tcp": (socket.SOCK_STREAM, 0), "udp": (socket.SOCK_DGRAM, 0), "sctp": (socket.SOCK_STREAM, 132)}
_PROC_FILES = {"tcp": ("tcp", "tcp6"), "udp": ("udp", "udp6"), "sctp": ()}


ANY6 = ipaddress.IPv6Address("::")


@dataclass(frozen=True)
class HostPort:
    """What a reservation holds: a protocol's port on one host address (None: every IPv4
    address; `::`: every IPv6 one, held apart with IPV6_V6ONLY)."""

    proto: str
    port: int
    ip: Optional[ipaddress.IPv4Address | ipaddress.IPv6Address] = None

    @classmethod
    def of(cls, binding: PortBinding) -> "HostPort":
        return cls(binding.proto, binding.host_port, binding.host_ip)

    @classmethod
    def all_of(cls, binding: PortBinding, ipv6: bool) -> list["HostPort"]:
        """Every host port a binding takes: a binding on all addresses of a container with an
        IPv6 address takes the IPv6 port too (Docker's bridge publishes both families)."""
        keys = [cls.of(binding)]
        if binding.host_ip is None and ipv6:
            keys.append(cls(binding.proto, binding.host_port, ANY6))
        return keys

    @property
    def family(self) -> int:
        return 4 if self.ip is None else self.ip.version

    def sort_key(self) -> tuple[str, int, int, int]:
        return (self.proto, self.port, self.family, int(self.ip) if self.ip is not None else -1)

    def __lt__(self, other: "HostPort") -> bool:
        return self.sort_key() < other.sort_key()

    def __str__(self) -> str:
        host = f"[{self.ip}]" if self.family == 6 else self.ip or "0.0.0.0"
        return f"{host}:{self.port}/{self.proto}"


def ephemeral_range(sysctl_dir: str = "/proc/sys") -> tuple[int, int]:
    """The kernel's ephemeral port range, where `-P` and `-p PORT` take host ports (as Docker)."""
    try:
        with open(f"{sysctl_dir}/net/ipv4/ip_local_port_range") as handle:
            low, high = (int(x) for x in handle.read().split())
        if 1 <= low <= high <= 65535:
            return low, high
    except (OSError, ValueError):
        pass
    return 49153, 60999  # Docker's fallback


def process_owner(proto: str, port: int, proc: str = "/proc") -> str:
    """Which process has `port` bound ('' if none is found): for the conflict message."""
    inodes = set()
    for name in _PROC_FILES.get(proto, ()):
        try:
            with open(f"{proc}/net/{name}") as handle:
                lines = handle.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    if not inodes:
        return ""
    wanted = {f"socket:[{inode}]" for inode in inodes if inode != "0"}
    for pid in (p for p in os.listdir(proc) if p.isdigit()):
        try:
            fds = os.listdir(f"{proc}/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{proc}/{pid}/fd/{fd}") in wanted:
                    with open(f"{proc}/{pid}/comm") as handle:
                        return f"process {handle.read().strip()[:32]} (pid {pid})"
            except OSError:
                continue
    return "a process of another namespace or user"


class Reservations:
    """Bound sockets, one per published host port, owned by the endpoint that published it."""

    GRACE = 10.0  # seconds a new reservation is kept though no record shows it yet (mirror lag)

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._held: dict[HostPort, tuple[str, socket.socket]] = {}  # -> (endpoint id, socket)
        self._since: dict[HostPort, float] = {}
        self.clock = clock
        # Each release's sequence number: a sync from records read before a release must not
        # take the port back (Docker removed the container and may publish the port again now).
        self._sequence = 0
        self._released: dict[HostPort, int] = {}

    def mark(self) -> int:
        """The position to pass to sync() for records read after this call."""
        with self._lock:
            return self._sequence

    def reserve(self, key: HostPort, endpoint: str) -> None:
        """Hold `key` for `endpoint` (a no-op if it already does). Conflict names the holder."""
        with self._lock:
            held = self._held.get(key)
            if held is not None:
                if held[0] == endpoint:
                    return
                raise Conflict(f"host port {key} is already published by endpoint {held[0][:12]}")
            kind, number = _KINDS[key.proto]
            six = key.family == 6
            try:
                sock = socket.socket(socket.AF_INET6 if six else socket.AF_INET, kind, number)
                if six:  # the IPv6 port only: the IPv4 one is a reservation of its own
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            except OSError as err:
                raise Unavailable(f"cannot open a {key.proto} socket to reserve {key}: {err.strerror}"
                                  f"{' (no SCTP in this kernel: modprobe sctp)' if key.proto == 'sctp' else ''}") from err
            try:
                sock.bind((str(key.ip) if key.ip else "0.0.0.0", key.port))
            except OSError as err:
                sock.close()
                if err.errno == errno.EADDRNOTAVAIL:
                    raise Conflict(f"host address {key.ip} of {key} is not an address of this host") from None
                if err.errno != errno.EADDRINUSE:
                    raise Unavailable(f"cannot reserve host port {key}: {err.strerror}") from err
                holder = None
                for other, (owner, _sock) in self._held.items():
                    if other.proto == key.proto and other.port == key.port and other.family == key.family:
                        holder = f"endpoint {owner[:12]}"
                raise Conflict(f"host port {key} is in use by {holder or process_owner(key.proto, key.port) or 'another socket'}") from None
            self._held[key] = (endpoint, sock)
            self._since[key] = self.clock()

    def release(self, keys: Iterable[HostPort]) -> None:
        with self._lock:
            for key in keys:
                self._since.pop(key, None)
                held = self._held.pop(key, None)
                if held is not None:
                    held[1].close()
                    self._sequence += 1
                    self._released[key] = self._sequence

    def held(self) -> dict[HostPort, str]:
        with self._lock:
            return {key: endpoint for key, (endpoint, _sock) in self._held.items()}

    def sync(self, wanted: dict[HostPort, str], read_at: int | None = None) -> list[str]:
        """Hold exactly `wanted` (from the records: after a restart, or a container removed
        while the plugin was down); returns what could not be taken back. A reservation younger
        than GRACE is kept: its record may not have reached the records read yet. A port
        released after `read_at` (mark() before the records were read) is not taken back:
        its release (RevokeExternalConnectivity) is newer than those records."""
        held = self.held()
        now = self.clock()
        with self._lock:
            young = {key for key, since in self._since.items() if now - since < self.GRACE}
            # Releases at or before read_at can no longer race a sync: forgotten (the map stays small).
            self._released = {k: n for k, n in self._released.items() if read_at is not None and n > read_at}
            newer = set(self._released)
        self.release(key for key, endpoint in held.items() if wanted.get(key) != endpoint and key not in young)
        problems = []
        for key, endpoint in sorted(wanted.items()):
            if held.get(key) == endpoint or key in newer:
                continue
            try:
                self.reserve(key, endpoint)
            except (Conflict, Unavailable) as err:
                problems.append(f"endpoint {endpoint[:12]}: {err}")
        return problems

    def close(self) -> None:
        self.release(list(self.held()))
