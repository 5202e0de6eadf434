"""flannel's wireguard backend, and the peers of Canal's encrypted networks: desired state
from the leases.

A peer is any other host whose lease carries a WireGuard public key (flannel's wireguard
leases; Canal hosts of other backends add theirs for encrypted networks). Its AllowedIPs are
its subnet plus the /32s it owns outside it, and those are routed through `flannel-wg`. A
peer without a key, or claiming another's key, is left out with a problem naming it: its
traffic is dropped by the firewall, never sent in the clear (unlike Calico, which falls back
to plaintext).

Both families ride one tunnel (flannel's wireguard Mode "auto": one device, one key, the
IPv4 endpoint; with Mode "ipv6" the peers' PublicIPv6 as endpoints, over the IPv6 underlay): a peer's AllowedIPs also hold its IPv6 subnet and the /128s it owns outside
it. A flanneld host in Mode "separate" (flannel's default in dual stack) keeps IPv6 on a
second device, `flannel-wg-v6`, with a key of its own in BackendV6Data: with such a peer only
IPv4 is carried; its IPv6 is left out with a problem (and dropped, never sent in the clear).
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

from canal.backends.base import BackendConfig, Desired, HostRoute6, Net, destinations6, group6
from canal.dataplane.vxlan import HostRoute
from canal.dataplane.wireguard import RT_TABLE_MAIN, WgPeer, WgState
from canal.records import Lease


def peers(
    leases: Iterable[Lease], host_routes: Iterable[HostRoute], own_subnet: ipaddress.IPv4Network | None,
    listen_port: int, host_routes6: Iterable[HostRoute6] = (), mode: str = "auto",
) -> tuple[tuple[WgPeer, ...], tuple[Net, ...], list[str]]:
    """(peers, destinations routed through the device, problems). Leases in subnet order, so
    every host settles a clash (two leases, one key) the same way: the lower subnet wins."""
    problems: list[str] = []
    chosen: dict[ipaddress.IPv4Network, Lease] = {}
    key_owner: dict[str, ipaddress.IPv4Network] = {}
    for lease in sorted(leases, key=lambda x: (x.subnet, x.public_ip)):
        if lease.subnet == own_subnet or lease.subnet in chosen:
            continue
        if not lease.public_key:
            problems.append(f"peer {lease.public_ip} (subnet {lease.subnet}) has published no WireGuard key: "
                            "encrypted traffic to it is dropped until it does")
            continue
        if lease.public_key in key_owner:
            problems.append(f"peer {lease.public_ip} (subnet {lease.subnet}) publishes the WireGuard key of "
                            f"subnet {key_owner[lease.public_key]}: left out")
            continue
        key_owner[lease.public_key] = lease.subnet
        chosen[lease.subnet] = lease
    extra: dict[ipaddress.IPv4Network, list[ipaddress.IPv4Network]] = {}
    for route in sorted(host_routes, key=lambda h: (h.ip, h.via_subnet)):
        if route.via_subnet in chosen:  # even inside our own subnet: it lives there, not here
            extra.setdefault(route.via_subnet, []).append(ipaddress.IPv4Network(f"{route.ip}/32"))
    owned6 = group6(host_routes6)
    out = []
    routes: list[Net] = []
    for subnet, lease in chosen.items():
        allowed: tuple[Net, ...] = (subnet, *[n for n in extra.get(subnet, ()) if not n.subnet_of(subnet)])
        v6 = destinations6(lease, owned6.get(subnet, ()))
        if v6 and lease.public_key6 and lease.public_key6 != lease.public_key:
            problems.append(f"peer {lease.public_ip} (subnet {lease.subnet}) has another WireGuard key for IPv6 "
                            "(flanneld Mode \"separate\": flannel-wg-v6); its IPv6 is not carried: set Mode "
                            "\"auto\" on flanneld hosts")
            v6 = []
        allowed += tuple(v6)
        port = lease.wg_port or listen_port
        endpoint = f"[{lease.public_ip6}]:{port}" if mode == "ipv6" and lease.public_ip6 else f"{lease.public_ip}:{port}"
        out.append(WgPeer(lease.public_key, endpoint, allowed))
        routes.extend(allowed)
    return tuple(out), tuple(sorted(routes, key=lambda n: (n.version, n))), problems


def state(
    config: BackendConfig, leases: Iterable[Lease], host_routes: Iterable[HostRoute],
    own_subnet: ipaddress.IPv4Network | None, table: int,
    local: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address] = (), host_routes6: Iterable[HostRoute6] = (),
) -> tuple[WgState, list[str]]:
    """`local`: this host's endpoint addresses (both families); in a table of its own, those
    inside a routed prefix get a throw route (the main table's veth route is more specific,
    this table's not). The device's addresses: our lease's first address of each family (as
    flannel), so the host's own packets through it have a source the peers accept."""
    leases = tuple(leases)
    found, routes, problems = peers(leases, host_routes, own_subnet, config.listen_port, host_routes6, config.mode)
    address = own_subnet.network_address if own_subnet is not None else None
    own = next((x for x in leases if x.subnet == own_subnet), None)
    address6 = own.subnet6.network_address if own is not None and own.subnet6 is not None else None
    throws: tuple[Net, ...] = ()
    if table != RT_TABLE_MAIN:
        wanted = {ipaddress.ip_network(ip) for ip in local if any(ip.version == r.version and ip in r for r in routes)}
        throws = tuple(sorted(wanted, key=lambda n: (n.version, n)))
    return WgState(config.listen_port, found, routes, table, config.keepalive, config.psk, address, throws,
                   address6), problems


def desired(
    config: BackendConfig,
    leases: Iterable[Lease],
    host_routes: Iterable[HostRoute],
    own_subnet: ipaddress.IPv4Network | None,
    underlay: tuple[Net, ...],
    host_routes6: Iterable[HostRoute6] = (),
) -> Desired:
    """Cluster-wide wireguard: every peer through the device, routes in the main table (as
    flannel, so the host's own traffic to containers elsewhere is encrypted too)."""
    wg, problems = state(config, leases, host_routes, own_subnet, RT_TABLE_MAIN, host_routes6=host_routes6)
    return Desired(None, {}, tuple(problems), wireguard=wg)
