"""IPv6 between hosts on the vxlan backend, flannel's dual-stack way: pure desired state.

Each peer's leased IPv6 subnet takes one of two paths, decided per peer from the leases alone
(both ends decide alike, so the path is symmetric):
- both hosts have an IPv6 underlay (PublicIPv6): flannel's `flannel-v6.<VNI>` device over it,
  as flanneld programs it (neighbour: the peer subnet's network address -> its BackendV6Data
  VtepMAC; FDB: that MAC -> its PublicIPv6; route: the subnet via that address, onlink). This
  is the only path a flanneld peer understands.
- otherwise, a Canal peer: into the IPv4 tunnel `flannel.<VNI>`, via the peer VTEP's link-local
  address (canal.dataplane.routes6), as Canal routed IPv6 before leases were dual stack.
A flanneld peer without the first path cannot carry IPv6: named as a problem (`canal status`).
Every lease field used here is checked again (address kinds, MACs, subnets inside the
cluster's IPv6 network, no two peers on one subnet or MAC): the leases are input from others.
/128 route records of other hosts (addresses outside their subnet) follow their host's path.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable

from canal.dataplane.routes6 import Routes6State, link_local
from canal.dataplane.vxlan import _mac
from canal.dataplane.vxlan6 import Vxlan6State
from canal.records import Lease


@dataclass(frozen=True)
class Desired6:
    device: Vxlan6State | None = None  # None: no flannel-v6.<VNI> wanted here
    tunnel4: Routes6State = field(default_factory=Routes6State)  # IPv6 routes into flannel.<VNI>
    problems: tuple[str, ...] = ()


def public6(value: str) -> ipaddress.IPv6Address | None:
    """A lease's PublicIPv6 usable as a VXLAN destination: a unicast, non-link-local address."""
    try:
        address = ipaddress.IPv6Address(value)
    except ValueError:
        return None
    if (address.is_link_local or address.is_multicast or address.is_loopback or address.is_unspecified
            or address.ipv4_mapped is not None):
        return None
    return address


def desired6(
    leases: Iterable[Lease],
    own: Lease | None,
    own_public_ip6: str,
    network6: ipaddress.IPv6Network | None,
    canal_hosts: frozenset[str],
    records: Iterable[tuple[ipaddress.IPv6Address, ipaddress.IPv4Network]] = (),
) -> Desired6:
    """leases: every vxlan host's (ours included); own: our lease; own_public_ip6: our IPv6
    underlay address ("" none); network6: the cluster's IPv6 network; canal_hosts: public IPs
    of Canal hosts (their host records); records: other hosts' /128s outside their subnets
    as (address, the IPv4 subnet of the owning host's lease)."""
    problems: list[str] = []
    own6 = own.subnet6 if own is not None else None
    local6 = public6(own_public_ip6) if own_public_ip6 else None
    device = own6 is not None and local6 is not None
    v6_neigh: dict[ipaddress.IPv6Address, str] = {}
    v6_fdb: dict[str, ipaddress.IPv6Address] = {}
    v6_routes: dict[ipaddress.IPv6Network, ipaddress.IPv6Address] = {}
    t4_neigh: dict[ipaddress.IPv6Address, str] = {}
    t4_routes: dict[ipaddress.IPv6Network, ipaddress.IPv6Address] = {}
    # A peer's IPv4 subnet -> its path for /128 records: (over flannel-v6?, next hop, VTEP MAC)
    hop_of: dict[ipaddress.IPv4Network, tuple[bool, ipaddress.IPv6Address, str]] = {}
    claimed: dict[ipaddress.IPv6Network, str] = {}
    for lease in sorted(leases, key=lambda x: (x.subnet6 or ipaddress.IPv6Network("::/128"), x.subnet, x.public_ip)):
        if own is not None and lease.subnet == own.subnet:
            continue
        if lease.backend_type != "vxlan":
            continue  # the IPv4 side names peers of other backends
        who = f"peer {lease.public_ip} (subnet {lease.subnet})"
        canal = lease.public_ip in canal_hosts
        mac4 = _mac(lease.vtep_mac)
        # The tunnel-4 path a Canal peer also uses for its /128 records.
        if mac4 is not None and canal:
            hop_of[lease.subnet] = (False, link_local(mac4), mac4)
        sub6 = lease.subnet6
        if own6 is None:
            continue  # no IPv6 subnets here: /128 records only
        if sub6 is None:
            problems.append(f"{who} has no IPv6 subnet in its lease (a host without EnableIPv6?): "
                            "IPv6 to it is not routed")
            continue
        if network6 is not None and not sub6.subnet_of(network6):
            problems.append(f"{who}: its IPv6 subnet {sub6} is outside the cluster's IPv6 network {network6}; "
                            "not routed")
            continue
        if sub6.overlaps(own6) or any(sub6.overlaps(other) for other in claimed):
            holder = "this host" if sub6.overlaps(own6) else next(v for k, v in claimed.items() if sub6.overlaps(k))
            problems.append(f"{who}: its IPv6 subnet {sub6} overlaps the one of {holder}; not routed")
            continue
        peer6 = public6(lease.public_ip6) if lease.public_ip6 else None
        mac6 = _mac(lease.vtep_mac6)
        if device and peer6 is not None and mac6 is not None:
            if mac6 in v6_fdb:
                problems.append(f"{who}: its IPv6 VTEP MAC {mac6} is claimed by another peer too; not routed")
                continue
            hop = sub6.network_address
            v6_neigh[hop] = mac6
            v6_fdb[mac6] = peer6
            v6_routes[sub6] = hop
            hop_of[lease.subnet] = (True, hop, mac6)
        elif canal and mac4 is not None:
            t4_neigh[link_local(mac4)] = mac4
            t4_routes[sub6] = link_local(mac4)
        elif canal:
            continue  # a Canal host without a VTEP yet: the IPv4 side waits for it too
        elif peer6 is None:
            problems.append(f"{who}, a flanneld host, has no usable PublicIPv6 in its lease: flanneld carries IPv6 "
                            f"only over flannel-v6, so IPv6 to {sub6} is not routed")
            continue
        else:
            problems.append(f"{who}, a flanneld host, carries IPv6 only over flannel-v6, but this host has no "
                            f"IPv6 underlay (--public-ip6, or a global IPv6 address on the underlay interface); "
                            f"IPv6 to {sub6} is not routed")
            continue
        claimed[sub6] = who
    for ip, via in sorted(records):
        if own6 is not None and ip in own6:
            continue  # claims an address of ours: never routed away
        path = hop_of.get(via)
        if path is None:
            continue  # no usable lease of its host (yet)
        dst = ipaddress.IPv6Network(f"{ip}/128")
        on_v6, hop, mac = path
        if on_v6:
            v6_routes.setdefault(dst, hop)
        else:
            t4_neigh[hop] = mac
            t4_routes.setdefault(dst, hop)
    state = Vxlan6State(own6.network_address, v6_neigh, v6_fdb, v6_routes) if device and own6 is not None else None
    return Desired6(state, Routes6State(t4_neigh, t4_routes), tuple(problems))

