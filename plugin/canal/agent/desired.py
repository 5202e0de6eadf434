"""Compute: the kernel state this host should have, from a datastore snapshot. Pure functions.

Tested without root; the applier (canal.agent.agent) diffs the result against the kernel.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Mapping

from canal.dataplane.firewall import FirewallState, Jump
from canal.dataplane.ipset import IpSet
from canal.dataplane.links import EndpointLink
from canal.dataplane.vxlan import HostRoute, Peer, VxlanState
from canal.dataplane.vxlan import desired_vxlan as vxlan_state
from canal.services.ipam import ANY_NET
from canal.policy.compiler import EndpointInfo, NetworkInfo, compile_filter
from canal.policy.model import Policy
from canal.services.networks import link_of
from canal.services.subnets import Lease

POSTROUTING = "CANAL-POSTROUTING"
CLUSTER_SET = "canal-nets"  # destinations that stay un-NATed: cluster network + canal pools
MASQ_SET = "canal-masq"  # local endpoints whose outbound traffic is masqueraded


@dataclass(frozen=True)
class Snapshot:
    host: str
    cluster_network: str
    networks: Mapping[str, Mapping[str, Any]]  # "host/network id" -> record (all hosts)
    endpoints: Mapping[str, Mapping[str, Any]]  # endpoint id -> record (all hosts)
    own_subnet: ipaddress.IPv4Network | None = None
    leases: tuple[Lease, ...] = ()  # every host's flannel lease, ours included
    routes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # /32 route records
    policies: tuple[Policy, ...] = ()


def local_endpoints(snap: Snapshot) -> list[Mapping[str, Any]]:
    return [ep for ep in snap.endpoints.values() if ep.get("host") == snap.host]


def desired_links(snap: Snapshot) -> list[EndpointLink]:
    """Veths of the joined local endpoints; every other cnl* veth goes."""
    return [link_of(ep) for ep in local_endpoints(snap) if ep.get("joined")]


def network_of(snap: Snapshot, endpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    return snap.networks.get(f"{endpoint.get('host')}/{endpoint.get('network')}", {})


def network_name(snap: Snapshot, endpoint: Mapping[str, Any]) -> str:
    """The logical, cluster-wide name of an endpoint's network: learned from Docker (or
    -o network=NAME); until then the Docker network ID, which isolates the network from its
    namesakes on other hosts meanwhile (a Swarm network has one ID everywhere)."""
    return network_of(snap, endpoint).get("name") or endpoint["network"]


def endpoint_infos(snap: Snapshot) -> list[EndpointInfo]:
    """Joined endpoints everywhere, plus our own not yet joined: their chains are programmed
    between CreateEndpoint and Join, so a container's first packet finds them in place."""
    return [
        EndpointInfo(ep["id"], ep["ip"], network_name(snap, ep), ep["host"], ep.get("labels"))
        for ep in snap.endpoints.values()
        if ep.get("joined") or ep.get("host") == snap.host
    ]


def network_infos(snap: Snapshot) -> dict[str, NetworkInfo]:
    out: dict[str, NetworkInfo] = {}
    for record in snap.networks.values():
        name = record.get("name") or record["id"]
        out[name] = NetworkInfo(name, bool(record.get("internal")) or out.get(name, NetworkInfo(name)).internal)
    return out


def desired_firewall(snap: Snapshot) -> FirewallState:
    """filter: policy and isolation (the compiler); nat: masquerade of outbound traffic."""
    if not any(n.get("host") == snap.host for n in snap.networks.values()):
        return FirewallState()  # nothing of ours on this host: leave no trace
    state = compile_filter(endpoint_infos(snap), snap.policies, snap.host, network_infos(snap))
    nets = {snap.cluster_network}
    for network in snap.networks.values():
        nets.update(p for p in network.get("pools", ()) if p and p != ANY_NET)
    masq = frozenset(
        ep["ip"]
        for ep in local_endpoints(snap)
        if network_of(snap, ep).get("nat", True) and not network_of(snap, ep).get("internal")
    )
    state.ipsets += [IpSet(CLUSTER_SET, "hash:net", frozenset(nets)), IpSet(MASQ_SET, "hash:ip", masq)]
    state.chains[("nat", POSTROUTING)] = [
        f"-m set ! --match-set {MASQ_SET} src -j RETURN",
        f"-m set --match-set {CLUSTER_SET} dst -j RETURN",
        "-j MASQUERADE",
    ]
    state.jumps.append(Jump("nat", "POSTROUTING", POSTROUTING))
    return state


def desired_route_records(snap: Snapshot) -> dict[str, dict[str, Any]]:
    """ip -> record for our joined endpoints outside our subnet (a --ip from elsewhere, a
    Swarm task address): peers route those /32s to our VTEP instead of the subnet's owner."""
    if snap.own_subnet is None:
        return {}
    out = {}
    for ep in local_endpoints(snap):
        ip = ipaddress.IPv4Address(ep["ip"])
        if ep.get("joined") and ip not in snap.own_subnet:
            out[str(ip)] = {"ip": str(ip), "host": snap.host, "subnet": str(snap.own_subnet)}
    return out


def desired_vxlan(snap: Snapshot) -> VxlanState:
    peers = [
        Peer(lease.subnet, lease.public_ip, lease.vtep_mac)
        for lease in snap.leases
        if lease.subnet != snap.own_subnet
    ]
    host_routes = [
        HostRoute(ipaddress.IPv4Address(record["ip"]), ipaddress.IPv4Network(record["subnet"]))
        for record in snap.routes.values()
        if record.get("host") != snap.host
    ]
    return vxlan_state(peers, host_routes, snap.own_subnet)
