"""flannel's host-gw backend: a route per peer subnet via the peer's public IP, dev = underlay.

Only peers on our L2 segment can be gateways (the kernel refuses others: "network is
unreachable"). Such a peer is left out with a problem naming it, computed here rather than
learnt from a failed netlink call, and every other peer is still routed: one bad lease never
stops a host. vxlan leases are routed the same way (flannel would ignore them): their host
answers directly only if it runs vxlan with DirectRouting.

IPv6 the same way, decided on its own: the peer's IPv6 subnet (and its /128s outside it) via
its PublicIPv6 when that is on-link on our underlay's IPv6 prefixes (flannel's host-gw in dual
stack); else a problem naming the peer, and its IPv4 is still routed.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

from canal.backends.base import Address, BackendConfig, Desired, HostRoute6, Net, group6, on_link, route6_directly
from canal.backends.vxlan import direct_routes, off_link_problem
from canal.dataplane.vxlan import HostRoute
from canal.records import Lease


def desired(
    config: BackendConfig,
    leases: Iterable[Lease],
    host_routes: Iterable[HostRoute],
    own_subnet: ipaddress.IPv4Network | None,
    underlay: tuple[Net, ...],
    host_routes6: Iterable[HostRoute6] = (),
) -> Desired:
    direct: dict[ipaddress.IPv4Network, ipaddress.IPv4Address] = {}
    direct6: dict[Net, Address] = {}
    peers6: set[ipaddress.IPv4Network] = set()
    owned6 = group6(host_routes6)
    problems: list[str] = []
    for lease in sorted(leases, key=lambda x: (x.subnet, x.public_ip)):
        if lease.subnet == own_subnet:
            continue
        if lease.backend_type not in ("host-gw", "vxlan"):
            problems.append(f"peer {lease.public_ip} (subnet {lease.subnet}) uses backend "
                            f"{lease.backend_type}, which a host-gw host cannot reach; not routed")
            continue
        if on_link(lease.public_ip, underlay):
            direct[lease.subnet] = ipaddress.IPv4Address(lease.public_ip)
        else:
            problems.append(off_link_problem(lease, underlay, "host-gw routes only via peers on the same L2 segment"))
        if route6_directly(lease, owned6.pop(lease.subnet, ()), underlay,
                           "host-gw routes only via peers on the same L2 segment", direct6, problems):
            peers6.add(lease.subnet)
    routes, rest = direct_routes(direct, host_routes)
    problems.extend(f"host route {r.ip} via subnet {r.via_subnet}: no routable peer owns that subnet; not routed"
                    for r in rest)
    if own_subnet is not None:
        owned6.pop(own_subnet, None)
    problems.extend(f"host route {ip} via subnet {subnet}: no routable peer owns that subnet; not routed"
                    for subnet, ips in sorted(owned6.items()) for ip in ips)
    both: dict[Net, Address] = {dst: gw for dst, gw in routes.items()}
    both.update(direct6)
    return Desired(None, both, tuple(problems), direct6_peers=frozenset(peers6))
