"""Published ports (`docker run -p/-P`): ProgramExternalConnectivity and its revocation.

Docker hands the gateway endpoint of a sandbox its bindings; this service picks the host
ports (the given one, the first free of a range, or one of the kernel's ephemeral range for
`-P` and `-p PORT`), reserves them (canal.dataplane.ports), records them on the endpoint, and
waits for the pass that programs the DNAT. All or nothing: one port taken and none is kept.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from canal.dataplane.ports import HostPort, Reservations, ephemeral_range
from canal.errors import BadRequest, Conflict, NotFound
from canal.records import EndpointRecord, PortBinding, replace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PortRequest:
    """One entry of Docker's `com.docker.network.portmap`, typed (api.protocol parses it)."""

    proto: str
    port: int
    host_ip: Optional[ipaddress.IPv4Address | ipaddress.IPv6Address]
    host_port: int  # 0: any
    host_port_end: int  # == host_port, or the end of a range

    def candidates(self, ephemeral: tuple[int, int]) -> range:
        if self.host_port == 0:
            return range(ephemeral[0], ephemeral[1] + 1)
        return range(self.host_port, max(self.host_port, self.host_port_end) + 1)

    def fits(self, binding: PortBinding, ephemeral: tuple[int, int]) -> bool:
        return (binding.proto, binding.port, binding.host_ip) == (self.proto, self.port, self.host_ip) and (
            binding.host_port in self.candidates(ephemeral)
        )

    def __str__(self) -> str:
        ports = str(self.host_port) if self.host_port_end <= self.host_port else f"{self.host_port}-{self.host_port_end}"
        host = f"[{self.host_ip}]" if self.host_ip is not None and self.host_ip.version == 6 else self.host_ip or "0.0.0.0"
        return f"{host}:{ports if self.host_port else '(any)'}->{self.port}/{self.proto}"


class Ports:
    def __init__(
        self,
        read: Callable[[str, str], EndpointRecord],
        update: Callable[[str, str, Callable[[EndpointRecord], EndpointRecord]], EndpointRecord],
        reservations: Reservations,
        changed: Callable[[bool], None],
        sysctl_dir: str = "/proc/sys",
    ):
        self.read = read  # (network, endpoint) -> record; NotFound if absent
        self.update = update  # read-modify-write of one endpoint record
        self.reservations = reservations
        self.changed = changed
        self.sysctl_dir = sysctl_dir

    def program(self, network_id: str, endpoint_id: str, requests: Sequence[PortRequest]) -> list[PortBinding]:
        record = self.read(network_id, endpoint_id)
        if not requests and not record.ports:
            return []
        ipv6 = record.ip6 is not None
        for request in requests:
            if request.host_ip is not None and request.host_ip.version == 6 and not ipv6:
                raise BadRequest(f"cannot publish {request}: the container has no IPv6 address on this network "
                                 "(created without --ipv6)")
        ephemeral = ephemeral_range(self.sysctl_dir)
        chosen: list[PortBinding] = []
        taken: list[HostPort] = []
        kept = list(record.ports)  # a replay keeps what it was given
        try:
            for request in requests:
                reuse = next((b for b in kept if request.fits(b, ephemeral)), None)
                if reuse is not None:
                    kept.remove(reuse)
                    for key in HostPort.all_of(reuse, ipv6):
                        self.reservations.reserve(key, endpoint_id)
                    chosen.append(reuse)
                    continue
                binding = self._allocate(request, endpoint_id, ephemeral, taken, ipv6)
                chosen.append(binding)
        except Exception:
            self.reservations.release(taken)
            raise
        stale = [key for b in kept for key in HostPort.all_of(b, ipv6)]
        ports = tuple(sorted(chosen))
        try:
            self.update(network_id, endpoint_id, lambda r: replace(r, ports=ports))
        except Exception:
            self.reservations.release(taken)
            raise
        self.reservations.release(stale)
        self.changed(True)  # the DNAT is in place when Docker starts the container
        if ports:
            log.info("endpoint %s: published %s", endpoint_id[:12], ", ".join(str(b) for b in ports))
        return list(ports)

    def _allocate(
        self, request: PortRequest, endpoint_id: str, ephemeral: tuple[int, int], taken: list[HostPort], ipv6: bool
    ) -> PortBinding:
        """The first candidate host port free in every family the binding takes (both, for a
        binding on all addresses of a dual-stack container): all of them or none."""
        candidates = request.candidates(ephemeral)
        last: Conflict | None = None
        for host_port in candidates:
            binding = PortBinding(request.proto, request.port, host_port, request.host_ip)
            keys = HostPort.all_of(binding, ipv6)
            if any(key in taken for key in keys):
                continue
            got: list[HostPort] = []
            try:
                for key in keys:
                    self.reservations.reserve(key, endpoint_id)
                    got.append(key)
            except Conflict as err:
                self.reservations.release(got)
                last = err
                if len(candidates) == 1:
                    raise Conflict(f"cannot publish {request}: {err}") from None
                continue
            taken.extend(got)
            return binding
        raise Conflict(f"cannot publish {request}: no free host port in {candidates.start}-{candidates.stop - 1}"
                       f"{f' (last: {last})' if last else ''}")

    def revoke(self, network_id: str, endpoint_id: str) -> None:
        try:
            record = self.read(network_id, endpoint_id)
        except NotFound:
            return  # gone with its endpoint: the agent releases its ports
        if not record.ports:
            return
        self.update(network_id, endpoint_id, lambda r: replace(r, ports=()))
        self.reservations.release(key for b in record.ports for key in HostPort.all_of(b, record.ip6 is not None))
        self.changed(True)
        log.info("endpoint %s: unpublished %s", endpoint_id[:12], ", ".join(str(b) for b in record.ports))


def wanted_reservations(local: Sequence[EndpointRecord]) -> dict[HostPort, str]:
    """What the records say this host holds: published ports of its endpoints."""
    return {key: ep.id for ep in local for b in ep.ports for key in HostPort.all_of(b, ep.ip6 is not None)}
