"""flannel's vxlan backend, with its DirectRouting option: desired state from the leases.

Peers with a VTEP go over `flannel.<VNI>`, exactly as before (canal.dataplane.vxlan computes
and applies that part). With DirectRouting, a vxlan peer whose public IP is on-link on our
underlay is routed directly instead (as host-gw), decided per peer, so a cluster spanning
several L2 segments mixes both. A host-gw peer has no VTEP: it is reachable only directly.
IPv6 is decided per peer on its own: with DirectRouting, a peer whose PublicIPv6 is on-link on
our underlay's IPv6 prefixes gets its IPv6 subnet (and /128s) via that address, and its /128s
stay off the tunnel (`Desired.direct6_peers`); the others' IPv6 goes over the tunnel.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

from canal.backends.base import Address, BackendConfig, Desired, HostRoute6, Net, group6, on_link, route6_directly
from canal.dataplane.vxlan import HostRoute, Peer, desired_vxlan
from canal.records import Lease


def off_link_problem(lease: Lease, underlay: Iterable[Net], why: str) -> str:
    nets = ", ".join(str(n) for n in underlay if n.version == 4) or "none"
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
    underlay: tuple[Net, ...],
    host_routes6: Iterable[HostRoute6] = (),
) -> Desired:
    tunnel: list[Peer] = []
    direct: dict[ipaddress.IPv4Network, ipaddress.IPv4Address] = {}
    direct6: dict[Net, Address] = {}
    peers6: set[ipaddress.IPv4Network] = set()
    owned6 = group6(host_routes6)
    problems: list[str] = []
    for lease in sorted(leases, key=lambda x: (x.subnet, x.public_ip)):
        if lease.subnet == own_subnet:
            continue
        if lease.backend_type == "vxlan":
            if config.direct_routing and on_link(lease.public_ip, underlay):
                direct[lease.subnet] = ipaddress.IPv4Address(lease.public_ip)
            else:
                tunnel.append(Peer(lease.subnet, lease.public_ip, lease.vtep_mac))
            if config.direct_routing and lease.public_ip6 and on_link(lease.public_ip6, underlay):
                route6_directly(lease, owned6.get(lease.subnet, ()), underlay, "", direct6, problems)
                peers6.add(lease.subnet)
        elif lease.backend_type == "host-gw":
            if on_link(lease.public_ip, underlay):
                direct[lease.subnet] = ipaddress.IPv4Address(lease.public_ip)
            else:
                problems.append(off_link_problem(lease, underlay, "a host-gw peer is reachable only directly"))
            if route6_directly(lease, owned6.get(lease.subnet, ()), underlay,
                               "a host-gw peer is reachable only directly", direct6, problems):
                peers6.add(lease.subnet)
        else:
            problems.append(f"peer {lease.public_ip} (subnet {lease.subnet}) uses backend "
                            f"{lease.backend_type}, which a vxlan host cannot reach; not routed")
    routes, rest = direct_routes(direct, host_routes)
    both: dict[Net, Address] = {dst: gw for dst, gw in routes.items()}
    both.update(direct6)
    return Desired(desired_vxlan(tunnel, rest, own_subnet), both, tuple(problems), direct6_peers=frozenset(peers6))
