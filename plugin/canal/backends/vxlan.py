"""flannel's vxlan backend, with its DirectRouting option: desired state from the leases.

Peers with a VTEP go over `flannel.<VNI>`, exactly as before (canal.dataplane.vxlan computes
and applies that part). With DirectRouting, a vxlan peer whose public IP is on-link on our
underlay is routed directly instead (as host-gw), decided per peer, so a cluster spanning
several L2 segments mixes both. A host-gw peer has no VTEP: it is reachable only directly.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

from canal.backends.base import BackendConfig, Desired, on_link
from canal.dataplane.vxlan import HostRoute, Peer, desired_vxlan
from canal.records import Lease


def off_link_problem(lease: Lease, underlay: Iterable[ipaddress.IPv4Network], why: str) -> str:
    nets = ", ".join(str(n) for n in underlay) or "none"
    return (f"peer {lease.public_ip} (subnet {lease.subnet}, {lease.backend_type}): {why}, but "
            f"{lease.public_ip} is not on the same L2 segment (not on-link on the underlay: {nets}); not routed")


def direct_routes(
    direct: dict[ipaddress.IPv4Network, ipaddress.IPv4Address], host_routes: Iterable[HostRoute]
) -> tuple[dict[ipaddress.IPv4Network, ipaddress.IPv4Address], list[HostRoute]]:
    """Adds the /32s owned by directly routed peers (via their public IP); returns the rest."""
    rest = []
    out = dict(direct)
    for route in sorted(host_routes, key=lambda h: (h.ip, h.via_subnet)):
        gateway = direct.get(route.via_subnet)
        if gateway is None:
            rest.append(route)
        else:
            out.setdefault(ipaddress.IPv4Network(f"{route.ip}/32"), gateway)
    return out, rest


def desired(
    config: BackendConfig,
    leases: Iterable[Lease],
    host_routes: Iterable[HostRoute],
    own_subnet: ipaddress.IPv4Network | None,
    underlay: tuple[ipaddress.IPv4Network, ...],
) -> Desired:
    tunnel: list[Peer] = []
    direct: dict[ipaddress.IPv4Network, ipaddress.IPv4Address] = {}
    problems: list[str] = []
    for lease in sorted(leases, key=lambda x: (x.subnet, x.public_ip)):
        if lease.subnet == own_subnet:
            continue
        if lease.backend_type == "vxlan":
            if config.direct_routing and on_link(lease.public_ip, underlay):
                direct[lease.subnet] = ipaddress.IPv4Address(lease.public_ip)
            else:
                tunnel.append(Peer(lease.subnet, lease.public_ip, lease.vtep_mac))
        elif lease.backend_type == "host-gw":
            if on_link(lease.public_ip, underlay):
                direct[lease.subnet] = ipaddress.IPv4Address(lease.public_ip)
            else:
                problems.append(off_link_problem(lease, underlay, "a host-gw peer is reachable only directly"))
        else:
            problems.append(f"peer {lease.public_ip} (subnet {lease.subnet}) uses backend "
                            f"{lease.backend_type}, which a vxlan host cannot reach; not routed")
    routes, rest = direct_routes(direct, host_routes)
    return Desired(desired_vxlan(tunnel, rest, own_subnet), routes, tuple(problems))
