"""Compute: the kernel state this host should have, from a datastore snapshot. Pure functions.

Tested without root; the applier (canal.agent.agent) diffs the result against the kernel.
Every input is a typed, validated record (canal.records): malformed records never get here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AbstractSet, Any, Mapping, Optional

from canal.dataplane.firewall import FirewallState, Jump
from canal.dataplane.ipset import IpSet
from canal.dataplane.links import EndpointLink, host_ifname
from canal.dataplane.vxlan import HostRoute, Peer, VxlanState
from canal.dataplane.vxlan import desired_vxlan as vxlan_state
from canal.dataplane.wireguard import DEVICE as WG_DEVICE, ENCRYPT_MARK
from canal.policy import selector as selectors
from canal.policy.compiler import (
    EndpointInfo,
    HostProtection,
    NetworkInfo,
    compile_filter,
    compile_filter6,
    effective_labels,
    protocol_name,
)
from canal.policy.model import Policy
from canal.records import ANY_NET, ANY_NET6, EndpointRecord, Lease, NetworkRecord, RouteRecord

if TYPE_CHECKING:
    from canal.agent.index import MembershipIndex

POSTROUTING = "CANAL-POSTROUTING"
DNAT = "CANAL-DNAT"  # nat: published ports (docker run -p) on this host's addresses
PREROUTING = "CANAL-PREROUTING"  # raw table: before conntrack sees a packet
WORKLOADS = "cnl+"
CLUSTER_SET = "canal-nets"  # destinations that stay un-NATed: cluster network + canal pools
CLUSTER_SET6 = "canal-6nets"  # the same for IPv6: the cluster's IPv6 network + canal IPv6 pools
MASQ_SET = "canal-masq"  # local endpoints whose outbound traffic is masqueraded
ENCRYPTED_SET = "canal-encrypted"  # endpoints (all hosts) of encrypted networks
ENCRYPTED_SET6 = "canal-6encrypted"  # their IPv6 addresses (--ipv6 networks)
ENCRYPT_CHAIN = "CANAL-ENCRYPT"  # filter: their traffic between hosts only through WireGuard
MARK_CHAIN = "CANAL-MARK"  # mangle: marks their packets for the WireGuard routing table


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
    settings: "DataplaneSettings" = field(default_factory=lambda: DataplaneSettings())
    # Published host ports this plugin holds, (proto, host ip or "", port) -> endpoint id: only
    # those are DNATed, so a forged record cannot divert a port some host service listens on.
    held_ports: Mapping[tuple[str, str, int], str] = field(default_factory=dict)
    cluster_network6: str = ""  # the cluster's IPv6 network ("": none configured)
    routes6: Mapping[str, RouteRecord] = field(default_factory=dict)  # ip6 -> /128 route record (multi-host)
    own_subnet6: ipaddress.IPv6Network | None = None  # this host's IPv6 subnet of a dual-stack lease
    subnet_len: int = 0  # flannel's SubnetLen: the size every genuine lease has (0: not known)
    # flannel's wireguard backend: every endpoint's traffic between hosts is encrypted.
    encrypt_all: bool = False
    # The agent's passes: memberships kept incrementally from the same records (canal.agent.index),
    # so desired_firewall reads the local endpoints and the index, never every endpoint.
    # None: computed from `endpoints` whole (every other reader, and the timer's full passes).
    index: Optional["MembershipIndex"] = field(default=None, compare=False)


@dataclass(frozen=True)
class DataplaneSettings:
    """This host's settings the rules depend on (not records: they come from the config)."""

    vxlan_port: int = 8472
    host: HostProtection = HostProtection()


def link_of(record: EndpointRecord) -> EndpointLink:
    return EndpointLink(record.id, record.ip, record.mac, record.mtu, record.gateway, record.ip6)


def local_endpoints(snap: Snapshot) -> list[EndpointRecord]:
    if snap.index is not None:
        return snap.index.local_records()
    return [ep for ep in snap.endpoints.values() if ep.host == snap.host]


def desired_links(snap: Snapshot) -> list[EndpointLink]:
    """Veths of the joined local endpoints; every other cnl* veth goes."""
    return [link_of(ep) for ep in local_endpoints(snap) if ep.joined]


def network_of(snap: Snapshot, endpoint: EndpointRecord) -> NetworkRecord | None:
    return snap.networks.get(f"{endpoint.host}/{endpoint.network}")


def _naming(snap: Snapshot, endpoint: EndpointRecord) -> tuple[str, bool]:
    """(the endpoint's logical network name, whether that name is learned). Until it is, the
    Docker network ID stands in, which isolates the network from its namesakes on other hosts."""
    network = network_of(snap, endpoint)
    return (network.logical_name, bool(network.name)) if network is not None else (endpoint.network, False)


def network_name(snap: Snapshot, endpoint: EndpointRecord) -> str:
    """The logical, cluster-wide name of an endpoint's network: learned from Docker (or
    -o network=NAME)."""
    return _naming(snap, endpoint)[0]


def identity_known(snap: Snapshot, endpoint: EndpointRecord) -> bool:
    """Labels and network name both learned: until then NetworkPolicy of its network could
    not find it, nor a Deny naming its labels, so it is closed (unknown means closed)."""
    return endpoint.labels is not None and _naming(snap, endpoint)[1]


def endpoint_infos(snap: Snapshot) -> list[EndpointInfo]:
    """Joined endpoints everywhere, plus our own not yet joined: their chains are programmed
    between CreateEndpoint and Join, so a container's first packet finds them in place.
    An endpoint whose identity is not known yet has labels None: closed, in no selector."""
    return [_info(ep, *_naming(snap, ep)) for ep in snap.endpoints.values() if ep.joined or ep.host == snap.host]


def _info(ep: EndpointRecord, name: str, named: bool) -> EndpointInfo:
    """The compiler's view of a record (labels None while its identity is unknown), kept on
    the (immutable, per-revision) record itself: a pass over thousands of unchanged endpoints
    builds none of them again."""
    info = ep.compiled
    if info is None or info.network != name or info.named != named:
        published = tuple(sorted({(b.proto, b.port) for b in ep.ports}))
        info = EndpointInfo(ep.id, ep.ip_text, name, ep.host, ep.labels if named and ep.labels is not None else None,
                            published, str(ep.ip6) if ep.ip6 is not None else None, named)
        object.__setattr__(ep, "compiled", info)  # frozen: set as __init__ would (a slot eq/repr ignore)
    return info


endpoint_info = _info  # for canal.agent.index: one definition, one cache


def network_infos(snap: Snapshot) -> dict[str, NetworkInfo]:
    out: dict[str, NetworkInfo] = {}
    for record in snap.networks.values():
        name = record.logical_name
        out[name] = NetworkInfo(name, record.internal or out.get(name, NetworkInfo(name)).internal)
    return out


def filter_inputs(snap: Snapshot) -> tuple[Any, ...]:
    """compile_filter's arguments for this snapshot's host: shared by the agent and by
    `canal policy explain` / dry-run (canal.policy.explain), so both see the same rules."""
    return (
        endpoint_infos(snap), snap.policies, snap.host, network_infos(snap), snap.broken_policy_scopes,
        snap.settings.host, CLUSTER_SET,
    )


def _compiler_inputs(snap: Snapshot) -> tuple[Any, ...]:
    """filter_inputs for the agent: with an index, only the local endpoints (the index holds
    every set's members)."""
    if snap.index is None:
        return filter_inputs(snap)
    return (snap.index.local_infos(), snap.policies, snap.host, network_infos(snap), snap.broken_policy_scopes,
            snap.settings.host, CLUSTER_SET)


def cluster_nets(snap: Snapshot) -> frozenset[str]:
    """Members of CLUSTER_SET: the cluster network and every canal pool."""
    nets = {snap.cluster_network}
    for network in snap.networks.values():
        nets.update(p for p in network.pools if p != ANY_NET)
    return frozenset(nets)


def desired_firewall(snap: Snapshot) -> FirewallState:
    """filter: policy and isolation (the compiler); nat: masquerade of outbound traffic."""
    if not any(n.host == snap.host for n in snap.networks.values()):
        return FirewallState()  # nothing of ours on this host: leave no trace
    infos, policies, host, networks, broken, protection, cluster_set = _compiler_inputs(snap)
    state = compile_filter(infos, policies, host, networks, broken, protection, cluster_set, snap.index)
    # raw: what no conntrack entry may ever match. A source that would not be routed back out
    # of the veth it came in on (a forged address, a neighbour's) is dropped before conntrack
    # could take it for a reply in someone's flow; so is tunnel traffic from workloads (VXLAN to
    # the configured port, IP-in-IP, ESP): it would reach peers' VTEPs with any inner address.
    state.chains[("raw", PREROUTING)] = [
        f"-i {WORKLOADS} -m rpfilter --invert -j DROP",
        f"-i {WORKLOADS} -p udp -m udp --dport {snap.settings.vxlan_port} -j DROP",
        f"-i {WORKLOADS} -p {protocol_name(4)} -j DROP",
        f"-i {WORKLOADS} -p {protocol_name(50)} -j DROP",
        # The veths have route_localnet (published ports on 127.0.0.1 are DNATed out of them):
        # nothing from a workload may address, or claim to come from, the host's loopback.
        f"-s 127.0.0.0/8 -i {WORKLOADS} -j DROP",
        f"-d 127.0.0.0/8 -i {WORKLOADS} -j DROP",
    ]
    # Every rule above is -i WORKLOADS: the jump carries it, so the host's other packets (the
    # tunnel's, the decapsulated ones) skip the chain after one interface check, not six.
    state.jumps.append(Jump("raw", "PREROUTING", PREROUTING, match=f"-i {WORKLOADS}"))
    _ipv6_firewall(snap, state)
    masq = frozenset(
        ep.ip_text
        for ep in local_endpoints(snap)
        if (own := network_of(snap, ep)) is None or (own.nat and not own.internal)
    )
    state.ipsets += [IpSet(CLUSTER_SET, "hash:net", cluster_nets(snap)), IpSet(MASQ_SET, "hash:ip", masq)]
    published = sorted(
        (b, ep.ip_text)
        for ep in local_endpoints(snap)
        if ep.joined
        for b in ep.ports
        if (b.host_ip is None or b.host_ip.version == 4)
        and snap.held_ports.get((b.proto, str(b.host_ip or ""), b.host_port)) == ep.id
    )
    # Published ports: DNAT of traffic to the host's own addresses (from other hosts, from this
    # one, loopback included), so remote clients keep their address for the container's policy.
    state.chains[("nat", DNAT)] = ["-m addrtype ! --dst-type LOCAL -j RETURN"] + [
        f"{f'-d {b.host_ip}/32 ' if b.host_ip else ''}-p {b.proto} -m {b.proto} --dport {b.host_port} "
        f"-j DNAT --to-destination {ip}:{b.port}"
        for b, ip in published
    ]
    state.jumps += [Jump("nat", "PREROUTING", DNAT), Jump("nat", "OUTPUT", DNAT)]
    state.chains[("nat", POSTROUTING)] = [
        # From the host's loopback (a client of 127.0.0.1:PORT), and a container to its own
        # published port (hairpin): the container answers the host end of its veth.
        f"-s 127.0.0.0/8 -o {WORKLOADS} -j MASQUERADE",
        *sorted({f"-s {ip}/32 -d {ip}/32 -p {b.proto} -m {b.proto} --dport {b.port} -j MASQUERADE"
                 for b, ip in published}),
        f"-m set ! --match-set {MASQ_SET} src -j RETURN",
        f"-m set --match-set {CLUSTER_SET} dst -j RETURN",
        "-j MASQUERADE",
    ]
    state.jumps.append(Jump("nat", "POSTROUTING", POSTROUTING))
    _published6(snap, state)
    _encryption(snap, state)
    return state


def _published6(snap: Snapshot, state: FirewallState) -> None:
    """Published ports over IPv6 (ip6tables' nat), for endpoints with an IPv6 address: a binding
    on every address (the IPv6 port held as `::`) or on an IPv6 one, as Docker's bridge does.
    No ::1: IPv6 has no route_localnet, the kernel never sends a loopback source out of a veth."""
    if not ipv6_networks_here(snap):
        return
    published = sorted(
        (b, str(ep.ip6))
        for ep in local_endpoints(snap)
        if ep.joined and ep.ip6 is not None
        for b in ep.ports
        if (b.host_ip is None or b.host_ip.version == 6)
        and snap.held_ports.get((b.proto, str(b.host_ip or ANY6), b.host_port)) == ep.id
    )
    if not published:
        return
    state.chains6[("nat", DNAT)] = ["-m addrtype ! --dst-type LOCAL -j RETURN"] + [
        f"{f'-d {b.host_ip}/128 ' if b.host_ip is not None and not b.host_ip.is_unspecified else ''}"
        f"-p {b.proto} -m {b.proto} --dport {b.host_port} -j DNAT --to-destination [{ip}]:{b.port}"
        for b, ip in published
    ]
    state.jumps6 += [Jump("nat", "PREROUTING", DNAT), Jump("nat", "OUTPUT", DNAT)]
    # A container to its own published port (hairpin) answers the host end of its veth.
    state.chains6[("nat", POSTROUTING)] = sorted({
        f"-s {ip}/128 -d {ip}/128 -p {b.proto} -m {b.proto} --dport {b.port} -j MASQUERADE" for b, ip in published})
    state.jumps6.append(Jump("nat", "POSTROUTING", POSTROUTING))


ANY6 = "::"  # the IPv6 half of a binding on every address is held as [::]:PORT


def ipv6_networks_here(snap: Snapshot) -> bool:
    """Whether any canal network of this host was created with --ipv6."""
    return any(n.host == snap.host and n.ipv6 for n in snap.networks.values())


def cluster_nets6(snap: Snapshot) -> frozenset[str]:
    """Members of CLUSTER_SET6: the cluster's IPv6 network and every canal IPv6 pool."""
    nets = {snap.cluster_network6} if snap.cluster_network6 else set()
    for network in snap.networks.values():
        nets.update(p for p in network.pools6 if p != ANY_NET6)
    return frozenset(nets)


def _ipv6_firewall(snap: Snapshot, state: FirewallState) -> None:
    """ip6tables' half. Without an --ipv6 network on this host, nothing IPv6 comes from or goes
    to a workload (their veths also have IPv6 disabled: no link-local way to the host). With
    one, the same policy as IPv4 (compile_filter6) for endpoints with an IPv6 address, and the
    raw table's drops as for IPv4; IPv6 from every other veth still dropped there first."""
    if not ipv6_networks_here(snap):
        state.chains6[("raw", PREROUTING)] = [f"-i {WORKLOADS} -j DROP"]
        state.jumps6.append(Jump("raw", "PREROUTING", PREROUTING, match=f"-i {WORKLOADS}"))
        state.chains6[("filter", "CANAL-FORWARD")] = [f"-i {WORKLOADS} -j DROP", f"-o {WORKLOADS} -j DROP"]
        state.jumps6.append(Jump("filter", "FORWARD", "CANAL-FORWARD"))
        return
    infos, policies, host, networks, broken, protection, _ = _compiler_inputs(snap)
    filter6 = compile_filter6(infos, policies, host, networks, broken, protection, CLUSTER_SET6, snap.index)
    state.chains6.update(filter6.chains)
    state.jumps6.extend(filter6.jumps)
    state.ipsets += filter6.ipsets
    state.ipsets.append(IpSet(CLUSTER_SET6, "hash:net", cluster_nets6(snap), family="inet6"))
    open6 = sorted(host_ifname(ep.id) for ep in local_endpoints(snap) if ep.ip6 is not None)
    state.chains6[("raw", PREROUTING)] = [
        f"-i {WORKLOADS} -m rpfilter --invert -j DROP",
        f"-i {WORKLOADS} -p udp -m udp --dport {snap.settings.vxlan_port} -j DROP",
        f"-i {WORKLOADS} -p {protocol_name(4)} -j DROP",
        f"-i {WORKLOADS} -p {protocol_name(41)} -j DROP",
        f"-i {WORKLOADS} -p {protocol_name(50)} -j DROP",
        f"-s ::1/128 -i {WORKLOADS} -j DROP",
        f"-d ::1/128 -i {WORKLOADS} -j DROP",
        *(f"-i {name} -j RETURN" for name in open6),
        f"-i {WORKLOADS} -j DROP",  # IPv6 of endpoints on networks without --ipv6: closed
    ]
    state.jumps6.append(Jump("raw", "PREROUTING", PREROUTING, match=f"-i {WORKLOADS}"))  # every rule is -i cnl+


def encrypted_ips(snap: Snapshot) -> AbstractSet[str]:
    """Addresses of the endpoints whose traffic between hosts must be encrypted (their
    network's record on their own host says so, or the whole cluster runs wireguard)."""
    if snap.index is not None:
        return snap.index.encrypted()
    out = set()
    for ep in snap.endpoints.values():
        if not (ep.joined or ep.host == snap.host):
            continue
        network = network_of(snap, ep)
        if snap.encrypt_all or (network is not None and network.encrypted):
            out.add(ep.ip_text)
    return frozenset(out)


def encrypted_ips6(snap: Snapshot) -> AbstractSet[str]:
    """The IPv6 addresses of the same endpoints (encrypted networks created with --ipv6)."""
    if snap.index is not None:
        return snap.index.encrypted6()
    out = set()
    for ep in snap.endpoints.values():
        if ep.ip6 is None or not (ep.joined or ep.host == snap.host):
            continue
        network = network_of(snap, ep)
        if snap.encrypt_all or (network is not None and network.encrypted):
            out.add(str(ep.ip6))
    return frozenset(out)


def _encryption(snap: Snapshot, state: FirewallState) -> None:
    """Fail closed for encrypted networks: what must cross hosts through WireGuard may leave
    only through it (or to a local workload, or out of the cluster), and what is addressed to
    a local encrypted endpoint may arrive only from it (or from a local workload, or from
    outside the cluster). Routing sends their packets through the tunnel (the mark picks the
    WireGuard table); these rules make sure nothing else ever carries them (a peer without a
    key yet, the device gone, a route missing): dropped, never plaintext, not even an
    established flow's. Scoped by interface and mark, so the host's other traffic pays an
    interface check, not a set lookup. The same rules in ip6tables for their IPv6 addresses
    (the cluster's IPv6 networks as the cluster)."""
    members = encrypted_ips(snap)
    if not members:
        return
    members6 = encrypted_ips6(snap)
    local_eps = [ep for ep in local_endpoints(snap) if ep.ip_text in members]
    _encryption_family(snap, state.chains, state.jumps, ENCRYPTED_SET, CLUSTER_SET, local_eps)
    state.ipsets.append(IpSet(ENCRYPTED_SET, "hash:ip", members))
    if members6:
        _encryption_family(snap, state.chains6, state.jumps6, ENCRYPTED_SET6, CLUSTER_SET6,
                           [ep for ep in local_eps if ep.ip6 is not None])
        state.ipsets.append(IpSet(ENCRYPTED_SET6, "hash:ip", members6, family="inet6"))
        if not any(s.name == CLUSTER_SET6 for s in state.ipsets):
            state.ipsets.append(IpSet(CLUSTER_SET6, "hash:net", cluster_nets6(snap), family="inet6"))


def _encryption_family(snap: Snapshot, chains: dict[tuple[str, str], list[str]], jumps: list[Jump], enc: str,
                       nets: str, local_eps: list[EndpointRecord]) -> None:
    """One family's rules (iptables or ip6tables), `enc` its encrypted set, `nets` its cluster set."""
    wl = WORKLOADS
    out, into = f"{ENCRYPT_CHAIN}-OUT", f"{ENCRYPT_CHAIN}-IN"
    chains[("filter", out)] = [
        f"-o {WG_DEVICE} -j RETURN", f"-o {wl} -j RETURN", "-o lo -j RETURN",
        f"-m set ! --match-set {nets} dst -j RETURN", "-j DROP",
    ]
    chains[("filter", into)] = [
        f"-i {WG_DEVICE} -j RETURN", f"-i {wl} -j RETURN", f"-m set ! --match-set {nets} src -j RETURN", "-j DROP",
    ]
    mark = f"{ENCRYPT_MARK:#x}/{ENCRYPT_MARK:#x}"
    if snap.encrypt_all:  # every workload, routed through the tunnel by the main table
        checks = [f"-i {wl} -j {out}", f"-o {wl} -j {into}"]
        output = [f"-m set --match-set {enc} dst -j {out}"]
    else:
        local = sorted(host_ifname(ep.id) for ep in local_eps)
        checks = [f"-m mark --mark {mark} -j {out}"] + [f"-o {ifname} -j {into}" for ifname in local]
        output = [f"-m mark --mark {mark} -j {out}"]
        set_mark = f"-j MARK --set-xmark {mark}"
        # From a local encrypted endpoint, and from any workload to an encrypted one elsewhere
        # (its reply comes back through the tunnel: it must go the same way).
        chains[("mangle", MARK_CHAIN)] = [f"-i {ifname} {set_mark}" for ifname in local] + [
            f"-m set --match-set {enc} dst -m set --match-set {nets} src {set_mark}",
        ]
        chains[("mangle", f"{MARK_CHAIN}-OUT")] = [f"-m set --match-set {enc} dst {set_mark}"]
        jumps += [Jump("mangle", "PREROUTING", MARK_CHAIN, match=f"-i {wl}"),
                  Jump("mangle", "OUTPUT", f"{MARK_CHAIN}-OUT")]
    forward = chains.get(("filter", "CANAL-FORWARD"), [])
    chains[("filter", "CANAL-FORWARD")] = checks + forward
    # The host's own packets to an encrypted endpoint: the tunnel, a local veth, or nothing.
    chains[("filter", "CANAL-OUTPUT")] = output
    jumps.append(Jump("filter", "OUTPUT", "CANAL-OUTPUT"))


def desired_route_records(snap: Snapshot) -> dict[str, RouteRecord]:
    """ip -> record for our joined endpoints outside our subnet (a --ip from elsewhere, a
    Swarm task address): peers route those /32s to our VTEP instead of the subnet's owner."""
    if snap.own_subnet is None:
        return {}
    return {
        ep.ip_text: RouteRecord(ep.ip, snap.host, snap.own_subnet)
        for ep in local_endpoints(snap)
        if ep.joined and ep.ip not in snap.own_subnet
    }


def desired_route_records6(snap: Snapshot) -> dict[str, RouteRecord]:
    """ip6 -> record for our joined endpoints with an IPv6 address outside our lease's IPv6
    subnet (the /32 rule): a --subnet pool's, a --ip6 from elsewhere, an address drawn from the
    cluster-wide network before leases were dual stack. Peers route each /128 to our VTEP."""
    if snap.own_subnet is None:
        return {}
    return {
        str(ep.ip6): RouteRecord(ep.ip6, snap.host, snap.own_subnet)
        for ep in local_endpoints(snap)
        if ep.joined and ep.ip6 is not None and (snap.own_subnet6 is None or ep.ip6 not in snap.own_subnet6)
    }


def remote_routes6(snap: Snapshot, exclude: AbstractSet[ipaddress.IPv4Network] = frozenset()
                   ) -> list[tuple[ipaddress.IPv6Address, str]]:
    """(remote /128, VtepMAC of its host's lease) for other hosts' IPv6 route records whose
    lease is known (canal.dataplane.routes6 turns them into routes); `exclude`: peers (by
    lease subnet) whose IPv6 is routed directly instead."""
    macs = {lease.subnet: lease.vtep_mac for lease in snap.leases if lease.vtep_mac and lease.subnet not in exclude}
    out = []
    for record in snap.routes6.values():
        mac = macs.get(record.subnet)
        if record.host != snap.host and isinstance(record.ip, ipaddress.IPv6Address) and mac:
            out.append((record.ip, mac))
    return sorted(out)


def desired_vxlan(snap: Snapshot) -> VxlanState:
    peers = [
        Peer(lease.subnet, lease.public_ip, lease.vtep_mac)
        for lease in snap.leases
        if lease.subnet != snap.own_subnet
    ]
    host_routes = [HostRoute(record.ip, record.subnet) for record in snap.routes.values()
                   if record.host != snap.host and isinstance(record.ip, ipaddress.IPv4Address)]
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
        info = _info(ep, *_naming(snap, ep))
        rows.append({
            "endpoint": ep.id[:12],
            "container": ep.container_name,
            "container_id": ep.container[:12],
            "network": info.network,
            "host": ep.host,
            "ip": ep.ip_text,
            "ip6": str(ep.ip6) if ep.ip6 is not None else None,
            "labels": dict(ep.labels) if ep.labels is not None else None,
            # pending: labels or network name unknown, so closed until learned
            "state": "pending" if info.labels is None else "joined" if ep.joined else "created",
            "policies": applied_policies(info, list(snap.policies)) if ep.joined else [],
            "ports": _port_lines(ep),
        })
    return rows


def _port_lines(ep: EndpointRecord) -> list[str]:
    """As `docker port` prints them: a binding on every address of a dual-stack container is
    published over IPv6 too (held as [::]:PORT), so it is listed twice, as Docker lists it."""
    lines = []
    for b in ep.ports:
        lines.append(str(b))
        if b.host_ip is None and ep.ip6 is not None:
            lines.append(f"{b.port}/{b.proto} -> [{ANY6}]:{b.host_port}")
    return lines
