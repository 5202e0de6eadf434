"""Compute: the kernel state this host should have, from a datastore snapshot. Pure functions.

Tested without root; the applier (canal.agent.agent) diffs the result against the kernel.
Every input is a typed, validated record (canal.records): malformed records never get here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from canal.dataplane.firewall import FirewallState, Jump
from canal.dataplane.ipset import IpSet
from canal.dataplane.links import EndpointLink
from canal.dataplane.vxlan import HostRoute, Peer, VxlanState
from canal.dataplane.vxlan import desired_vxlan as vxlan_state
from canal.policy import selector as selectors
from canal.policy.compiler import EndpointInfo, NetworkInfo, compile_filter, effective_labels
from canal.policy.model import Policy
from canal.records import ANY_NET, EndpointRecord, Lease, NetworkRecord, RouteRecord

POSTROUTING = "CANAL-POSTROUTING"
CLUSTER_SET = "canal-nets"  # destinations that stay un-NATed: cluster network + canal pools
MASQ_SET = "canal-masq"  # local endpoints whose outbound traffic is masqueraded


@dataclass(frozen=True)
class Snapshot:
    host: str
    cluster_network: str
    networks: Mapping[str, NetworkRecord]  # "host/network id" -> record (all hosts)
    endpoints: Mapping[str, EndpointRecord]  # endpoint id -> record (all hosts)
    own_subnet: ipaddress.IPv4Network | None = None
    leases: tuple[Lease, ...] = ()  # every host's flannel lease, ours included
    routes: Mapping[str, RouteRecord] = field(default_factory=dict)  # ip -> /32 route record
    policies: tuple[Policy, ...] = ()
    # Scopes holding a stored policy that does not parse: None = global, else a network name.
    # Endpoints such a policy could select are closed (fail closed, never open).
    broken_policy_scopes: frozenset[Optional[str]] = frozenset()


def link_of(record: EndpointRecord) -> EndpointLink:
    return EndpointLink(record.id, record.ip, record.mac, record.mtu)


def local_endpoints(snap: Snapshot) -> list[EndpointRecord]:
    return [ep for ep in snap.endpoints.values() if ep.host == snap.host]


def desired_links(snap: Snapshot) -> list[EndpointLink]:
    """Veths of the joined local endpoints; every other cnl* veth goes."""
    return [link_of(ep) for ep in local_endpoints(snap) if ep.joined]


def network_of(snap: Snapshot, endpoint: EndpointRecord) -> NetworkRecord | None:
    return snap.networks.get(f"{endpoint.host}/{endpoint.network}")


def network_name(snap: Snapshot, endpoint: EndpointRecord) -> str:
    """The logical, cluster-wide name of an endpoint's network: learned from Docker (or
    -o network=NAME); until then the Docker network ID, which isolates the network from its
    namesakes on other hosts meanwhile (a Swarm network has one ID everywhere)."""
    network = network_of(snap, endpoint)
    return network.logical_name if network is not None else endpoint.network


def endpoint_infos(snap: Snapshot) -> list[EndpointInfo]:
    """Joined endpoints everywhere, plus our own not yet joined: their chains are programmed
    between CreateEndpoint and Join, so a container's first packet finds them in place."""
    return [
        EndpointInfo(ep.id, str(ep.ip), network_name(snap, ep), ep.host, ep.labels)
        for ep in snap.endpoints.values()
        if ep.joined or ep.host == snap.host
    ]


def network_infos(snap: Snapshot) -> dict[str, NetworkInfo]:
    out: dict[str, NetworkInfo] = {}
    for record in snap.networks.values():
        name = record.logical_name
        out[name] = NetworkInfo(name, record.internal or out.get(name, NetworkInfo(name)).internal)
    return out


def desired_firewall(snap: Snapshot) -> FirewallState:
    """filter: policy and isolation (the compiler); nat: masquerade of outbound traffic."""
    if not any(n.host == snap.host for n in snap.networks.values()):
        return FirewallState()  # nothing of ours on this host: leave no trace
    state = compile_filter(
        endpoint_infos(snap), snap.policies, snap.host, network_infos(snap), snap.broken_policy_scopes
    )
    nets = {snap.cluster_network}
    for network in snap.networks.values():
        nets.update(p for p in network.pools if p != ANY_NET)
    masq = frozenset(
        str(ep.ip)
        for ep in local_endpoints(snap)
        if (own := network_of(snap, ep)) is None or (own.nat and not own.internal)
    )
    state.ipsets += [IpSet(CLUSTER_SET, "hash:net", frozenset(nets)), IpSet(MASQ_SET, "hash:ip", masq)]
    state.chains[("nat", POSTROUTING)] = [
        f"-m set ! --match-set {MASQ_SET} src -j RETURN",
        f"-m set --match-set {CLUSTER_SET} dst -j RETURN",
        "-j MASQUERADE",
    ]
    state.jumps.append(Jump("nat", "POSTROUTING", POSTROUTING))
    return state


def desired_route_records(snap: Snapshot) -> dict[str, RouteRecord]:
    """ip -> record for our joined endpoints outside our subnet (a --ip from elsewhere, a
    Swarm task address): peers route those /32s to our VTEP instead of the subnet's owner."""
    if snap.own_subnet is None:
        return {}
    return {
        str(ep.ip): RouteRecord(ep.ip, snap.host, snap.own_subnet)
        for ep in local_endpoints(snap)
        if ep.joined and ep.ip not in snap.own_subnet
    }


def desired_vxlan(snap: Snapshot) -> VxlanState:
    peers = [
        Peer(lease.subnet, lease.public_ip, lease.vtep_mac)
        for lease in snap.leases
        if lease.subnet != snap.own_subnet
    ]
    host_routes = [HostRoute(record.ip, record.subnet) for record in snap.routes.values() if record.host != snap.host]
    return vxlan_state(peers, host_routes, snap.own_subnet)


def applied_policies(endpoint: EndpointInfo, policies: list[Policy]) -> list[str]:
    """Keys of the policies selecting `endpoint`, in application order (for `canal endpoint list`)."""
    labels = effective_labels(endpoint)
    if labels is None:
        return []
    return [
        p.key
        for p in policies
        if (p.network is None or p.network == endpoint.network) and selectors.parse(p.selector).matches(labels)
    ]


def endpoint_rows(snap: Snapshot) -> list[dict[str, Any]]:
    """Every endpoint of the cluster, with what policy sees of it (`canal endpoint list`)."""
    rows = []
    for ep in sorted(snap.endpoints.values(), key=lambda e: (e.host, e.ip)):
        info = EndpointInfo(ep.id, str(ep.ip), network_name(snap, ep), ep.host, ep.labels)
        rows.append({
            "endpoint": ep.id[:12],
            "container": ep.container_name,
            "network": info.network,
            "host": ep.host,
            "ip": str(ep.ip),
            "labels": dict(ep.labels) if ep.labels is not None else None,
            "policies": applied_policies(info, list(snap.policies)) if ep.joined else [],
        })
    return rows
