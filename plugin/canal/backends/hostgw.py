"""flannel's host-gw backend: a route per peer subnet via the peer's public IP, dev = underlay.

Only peers on our L2 segment can be gateways (the kernel refuses others: "network is
unreachable"). Such a peer is left out with a problem naming it, computed here rather than
learnt from a failed netlink call, and every other peer is still routed: one bad lease never
stops a host. vxlan leases are routed the same way (flannel would ignore them): their host
answers directly only if it runs vxlan with DirectRouting.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

from canal.backends.base import BackendConfig, Desired, on_link
from canal.backends.vxlan import direct_routes, off_link_problem
from canal.dataplane.vxlan import HostRoute
from canal.records import Lease


def desired(
    config: BackendConfig,
    leases: Iterable[Lease],
    host_routes: Iterable[HostRoute],
    own_subnet: ipaddress.IPv4Network | None,
    underlay: tuple[ipaddress.IPv4Network, ...],
) -> Desired:
    direct: dict[ipaddress.IPv4Network, ipaddress.IPv4Address] = {}
    problems: list[str] = []
    for lease in sorted(leases, key=lambda x: (x.subnet, x.public_ip)):
        if lease.subnet == own_subnet:
            continue
        if lease.backend_type not in ("host-gw", "vxlan"):
            problems.append(f"peer {lease.public_ip} (subnet {lease.subnet}) uses backend "
                            f"{lease.backend_type}, which a host-gw host cannot reach; not routed")
        elif on_link(lease.public_ip, underlay):
            direct[lease.subnet] = ipaddress.IPv4Address(lease.public_ip)
        else:
            problems.append(off_link_problem(lease, underlay, "host-gw routes only via peers on the same L2 segment"))
    routes, rest = direct_routes(direct, host_routes)
    problems.extend(f"host route {r.ip} via subnet {r.via_subnet}: no routable peer owns that subnet; not routed"
                    for r in rest)
    return Desired(None, routes, tuple(problems))
