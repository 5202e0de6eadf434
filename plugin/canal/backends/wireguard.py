"""flannel's wireguard backend, and the peers of Canal's encrypted networks: desired state
from the leases.

A peer is any other host whose lease carries a WireGuard public key (flannel's wireguard
leases; Canal hosts of other backends add theirs for encrypted networks). Its AllowedIPs are
its subnet plus the /32s it owns outside it, and those are routed through `flannel-wg`. A
peer without a key, or claiming another's key, is left out with a problem naming it: its
traffic is dropped by the firewall, never sent in the clear (unlike Calico, which falls back
to plaintext).
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

from canal.backends.base import BackendConfig, Desired
from canal.dataplane.vxlan import HostRoute
from canal.dataplane.wireguard import RT_TABLE_MAIN, WgPeer, WgState
from canal.records import Lease


def peers(
    leases: Iterable[Lease], host_routes: Iterable[HostRoute], own_subnet: ipaddress.IPv4Network | None,
    listen_port: int,
) -> tuple[tuple[WgPeer, ...], tuple[ipaddress.IPv4Network, ...], list[str]]:
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
        if route.via_subnet in chosen and not (own_subnet is not None and route.ip in own_subnet):
            extra.setdefault(route.via_subnet, []).append(ipaddress.IPv4Network(f"{route.ip}/32"))
    out = []
    routes: list[ipaddress.IPv4Network] = []
    for subnet, lease in chosen.items():
        allowed = (subnet, *[n for n in extra.get(subnet, ()) if not n.subnet_of(subnet)])
        out.append(WgPeer(lease.public_key, f"{lease.public_ip}:{lease.wg_port or listen_port}", allowed))
        routes.extend(allowed)
    return tuple(out), tuple(sorted(routes)), problems


def state(
    config: BackendConfig, leases: Iterable[Lease], host_routes: Iterable[HostRoute],
    own_subnet: ipaddress.IPv4Network | None, table: int,
) -> tuple[WgState, list[str]]:
    found, routes, problems = peers(leases, host_routes, own_subnet, config.listen_port)
    address = own_subnet.network_address if own_subnet is not None else None
    return WgState(config.listen_port, found, routes, table, config.keepalive, config.psk, address), problems


def desired(
    config: BackendConfig,
    leases: Iterable[Lease],
    host_routes: Iterable[HostRoute],
    own_subnet: ipaddress.IPv4Network | None,
    underlay: tuple[ipaddress.IPv4Network, ...],
) -> Desired:
    """Cluster-wide wireguard: every peer through the device, routes in the main table (as
    flannel, so the host's own traffic to containers elsewhere is encrypted too)."""
    wg, problems = state(config, leases, host_routes, own_subnet, RT_TABLE_MAIN)
    return Desired(None, {}, tuple(problems), wireguard=wg)
