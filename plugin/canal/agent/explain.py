"""Policy introspection from the compiled rules: `canal policy explain`, `apply --dry-run`, `stats`.

Pure functions of a Snapshot. Each host's filter chains are compiled exactly as the agent
compiles them (canal.agent.desired.filter_inputs -> compile_filter_annotated) and a packet is
walked through them (canal.policy.evaluate); the deciding rule is read off the compiler's Note
for the rule where the walk ended. Nothing here re-evaluates policy on its own, so the answer is
what the kernel does with the rules the agent programs.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from canal.agent.desired import (
    CLUSTER_SET,
    CLUSTER_SET6,
    Snapshot,
    cluster_nets,
    cluster_nets6,
    filter_inputs,
    ipv6_networks_here,
    network_name,
)
from canal.dataplane.ipset import IpSet
from canal.dataplane.links import host_ifname
from canal.errors import BadRequest, NotFound
from canal.policy.compiler import (
    FROM_WL,
    INPUT,
    TO_WL,
    WL_TO_HOST,
    Note,
    compile_filter6_annotated,
    compile_filter_annotated,
    endpoint_chain,
)
from canal.policy.evaluate import EvaluationError, Packet, Table, Walk
from canal.policy.model import EGRESS, INGRESS, PORT_PROTOCOLS, PROTOCOLS, Policy
from canal.records import EndpointRecord

__all__ = ["Cluster", "Party", "dry_run", "explain", "policy_stats", "resolve_pair"]

UNDERLAY = "underlay"  # stands for any non-workload interface (another host, the outside)
PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1}
ICMP = {4: (1, 8), 6: (58, 128)}  # family -> (protocol number, echo request type) of its ICMP
FAMILIES = (4, 6)
MAX_FLOWS = 200  # changed flows listed by a dry run; the rest are counted
MAX_EVALUATIONS = 5000  # packets walked by one dry run before it summarises instead

REASONS = {
    "rule": "{action} by policy {policy} {dir} rule {index}",
    "labels-pending": "the endpoint's labels or network name are not learned yet: closed until they are (fail closed)",
    "broken-policy": "a stored policy of the endpoint's scope does not parse: closed (fail closed)",
    "anti-spoof": "source address is not the endpoint's own (anti-spoofing)",
    "internal-fence": "internal network: the destination is not a member of the endpoint's network",
    "datastore": "the datastore's port is closed to workloads unless a policy allows it",
    "default-deny": "selected by {selected} for {dir}, and none of them allowed it (default deny)",
    "profile-egress": "no policy decided {dir}: allowed by the network profile (egress open)",
    "profile-network": "no policy decided {dir}: source is on the same network, allowed by the network profile",
    "profile-published": "no policy decided {dir}: arrives through a published port (DNAT), allowed by the profile",
    "profile-deny": "no policy decided {dir}: source is outside the endpoint's network and not through a "
                    "published port (network isolation profile)",
    "unknown-interface": "the endpoint has no chains on {host} (not joined there)",
    "no-ipv6": "{who} has no IPv6 address (its network was created without --ipv6): IPv6 to and from its "
               "interface is dropped (closed)",
}


@dataclass(frozen=True)
class Party:
    """One end of a flow: a canal endpoint, or just an address outside Canal."""

    address: str
    endpoint: Optional[EndpointRecord] = None
    network: Optional[str] = None  # logical network name, for endpoints
    note: str = ""  # how a container with several endpoints was narrowed to this one

    def describe(self) -> Dict[str, Any]:
        if self.endpoint is None:
            return {"address": self.address, "endpoint": None}
        ep = self.endpoint
        out = {"address": self.address or None, "endpoint": ep.id[:12], "container": ep.container_name or None,
               "container_id": ep.container[:12] or None, "network": self.network, "host": ep.host,
               "address4": ep.ip_text}
        if ep.ip6 is not None:  # policy decides its IPv6 flows as its IPv4 ones (compile_filter6)
            out["address6"] = str(ep.ip6)
        if self.note:
            out["note"] = self.note
        return out


class Cluster:
    """Every host's compiled filter table of one family (iptables for 4, ip6tables for 6) for
    one snapshot, compiled on first use exactly as canal.agent.desired compiles it."""

    def __init__(self, snap: Snapshot, family: int = 4):
        self.snap = snap
        self.family = family
        self._tables: Dict[str, Tuple[Table, Dict[str, List[Note]]]] = {}
        self.cluster_set = (IpSet(CLUSTER_SET, "hash:net", cluster_nets(snap)) if family == 4
                            else IpSet(CLUSTER_SET6, "hash:net", cluster_nets6(snap), family="inet6"))

    def host(self, host: str) -> Tuple[Table, Dict[str, List[Note]]]:
        if host not in self._tables:
            snap = dataclasses.replace(self.snap, host=host)
            if self.family == 4:
                state, notes = compile_filter_annotated(*filter_inputs(snap))
            else:
                inputs = list(filter_inputs(snap))
                inputs[-1] = CLUSTER_SET6  # the cluster set is the last argument: its IPv6 twin
                state, notes = compile_filter6_annotated(*inputs)
            chains = {name: rules for (table, name), rules in state.chains.items() if table == "filter"}
            self._tables[host] = (Table(chains, [*state.ipsets, self.cluster_set]), notes)
        return self._tables[host]

    def ipv6_open(self, endpoint: EndpointRecord) -> bool:
        """IPv6 is open on the endpoint's interface: it has an IPv6 address, and its host has an
        --ipv6 network (without one, desired.py drops all workload IPv6 before any policy)."""
        return endpoint.ip6 is not None and ipv6_networks_here(dataclasses.replace(self.snap, host=endpoint.host))

    def address(self, endpoint: EndpointRecord) -> str:
        """The endpoint's address in this family ("" when it has none)."""
        if self.family == 4:
            return endpoint.ip_text
        return str(endpoint.ip6) if endpoint.ip6 is not None else ""

    def party(self, endpoint: EndpointRecord, note: str = "") -> Party:
        return Party(self.address(endpoint), endpoint, network_name(self.snap, endpoint), note)


# --------------------------------------------------------------------------------------------------
# Resolving SRC / DST


def _candidates(snap: Snapshot, ref: str) -> List[EndpointRecord]:
    ref = ref.strip()
    out = []
    for ep in snap.endpoints.values():
        if ref in (ep.container_name, ep.ip_text, ep.container, ep.id) or (ep.ip6 is not None and ref == str(ep.ip6)) or (
            len(ref) >= 3 and (ep.container.startswith(ref) or ep.id.startswith(ref))
        ):
            out.append(ep)
    joined = [ep for ep in out if ep.joined]
    return sorted(joined or out, key=lambda e: (e.ip_text, e.id))


def _family_of(ref: str) -> Optional[int]:
    """4 or 6 when `ref` is an IP address, else None (a container name or ID)."""
    try:
        return ipaddress.ip_address(ref.strip()).version
    except ValueError:
        return None


def flow_family(src: str, dst: str, family: Optional[int] = None) -> int:
    """The family a flow is explained in: the one of the addresses given, else `family`, else 4.
    An IPv4 address on one side and an IPv6 one on the other is no flow at all."""
    if family is not None and family not in FAMILIES:
        raise BadRequest(f"family {family!r}: expected 4 or 6")
    given = {f for f in (_family_of(src), _family_of(dst)) if f is not None}
    if len(given) > 1:
        raise BadRequest(f"{src!r} and {dst!r} are addresses of different families: a flow has one")
    if given and family is not None and given != {family}:
        raise BadRequest(f"--family {family} does not match the IPv{given.pop()} address given")
    return given.pop() if given else family or 4


def _normalised(ref: str) -> str:
    """An IPv6 address written any way (fd00:0::1, upper case) as the records hold it."""
    return str(ipaddress.ip_address(ref.strip())) if _family_of(ref) is not None else ref


def resolve_pair(cluster: Cluster, src: str, dst: str) -> Tuple[Party, Party]:
    """SRC and DST as endpoints (by container name, ID prefix, endpoint ID or address) or
    plain addresses. A container on several networks is narrowed to the endpoint sharing a
    network with the other side; if that is still ambiguous the caller must give an ADDRESS."""
    snap = cluster.snap
    found = {}
    for side, ref in (("SRC", src), ("DST", dst)):
        if not ref or len(ref) > 256:
            raise BadRequest(f"{side}: expected a container name or ID, or an IPv4 or IPv6 address")
        found[side] = _candidates(snap, _normalised(ref))
        if not found[side] and _family_of(ref) is None:
            raise NotFound(f"{side} {ref!r}: no canal endpoint of that container, and not an IP address")

    def pick(side: str, ref: str, other: List[EndpointRecord]) -> Party:
        options = found[side]
        if not options:
            return Party(_normalised(ref))
        if len(options) == 1:
            return cluster.party(options[0])
        networks = {network_name(snap, ep) for ep in other}
        shared = [ep for ep in options if network_name(snap, ep) in networks]
        if len(shared) == 1:
            return cluster.party(shared[0], f"{ref} has {len(options)} canal endpoints; using {shared[0].ip_text} "
                                            "on the network it shares with the other side (give an ADDRESS to choose)")
        listing = ", ".join(f"{ep.ip_text} ({network_name(snap, ep)})" for ep in options)
        raise BadRequest(f"{side} {ref!r} has several canal endpoints: {listing}; give one ADDRESS instead")

    return pick("SRC", src, found["DST"]), pick("DST", dst, found["SRC"])


# --------------------------------------------------------------------------------------------------
# Explain


def _packet(protocol: str, port: Optional[int], src: str, dst: str, published: bool, family: int = 4) -> Packet:
    number = PROTOCOL_NUMBERS[protocol]
    icmp_number, echo = ICMP[family]
    if number == PROTOCOLS["ICMP"]:
        number = icmp_number  # ICMPv6 (58) for an IPv6 flow: ip6tables' rules match that
    return Packet(
        src, dst, number,
        dport=port if number in PORT_PROTOCOLS else None,
        icmp_type=echo if number == icmp_number else None,
        ctstate=frozenset({"NEW", "DNAT"}) if published else frozenset({"NEW"}),
    )


def _chain_direction(chain: str) -> Optional[str]:
    if chain.startswith(("CANAL-FW-", "CANAL-PO-")):
        return EGRESS
    if chain.startswith(("CANAL-TW-", "CANAL-PI-")):
        return INGRESS
    return None


def _decision(walk: Walk, notes: Mapping[str, List[Note]], direction: str, host: str,
              start: str) -> Dict[str, Any]:
    """The deciding rule of one direction, read off the notes of the rules the walk took."""
    mine = [s for s in walk.steps if _chain_direction(s.chain) == direction]
    allowed = walk.verdict != "DROP"
    out: Dict[str, Any] = {"evaluated": True, "host": host, "verdict": "allow" if allowed else "deny"}
    if not mine:
        last = walk.steps[-1] if walk.steps else None
        out.update(reason="unknown-interface", explanation=REASONS["unknown-interface"].format(host=host),
                   rule_text=last.rule if last else None, chain=last.chain if last else start)
        return out
    last = mine[-1]
    note = notes.get(last.chain, [])[last.index] if last.index < len(notes.get(last.chain, [])) else None
    if note is None:
        raise EvaluationError(f"no note for {last.chain} rule {last.index}")  # compiler and evaluator disagree
    deciding = note
    deciding_step = last
    if note.kind == "accepted":  # the Allow rule that set the mark is the decision
        for step in reversed(mine):
            n = notes[step.chain][step.index]
            if n.kind == "rule" and n.action == "Allow" and step.target == "MARK":
                deciding, deciding_step = n, step
                break
    selected = [n.policy for s in mine if (n := notes[s.chain][s.index]).kind == "policy" and n.policy]
    matched = [
        {"policy": n.policy, "rule": n.index, "action": n.action}
        for s in mine if (n := notes[s.chain][s.index]).kind == "rule" and n.action in ("Log", "Pass")
    ]
    out.update(
        reason=deciding.kind,
        policy=deciding.policy,
        rule=deciding.index,
        action=deciding.action,
        chain=deciding_step.chain,
        rule_text=deciding_step.rule,
        evaluated_policies=selected,
        explanation=REASONS.get(deciding.kind, deciding.kind).format(
            action=deciding.action, policy=deciding.policy, dir=direction.lower(), index=deciding.index,
            selected=", ".join(selected) or "policies", host=host),
    )
    if matched:
        out["matched_on_the_way"] = matched  # Log and Pass rules the packet went through
    return out


def _to_host(cluster: Cluster, src: Party, packet: Packet) -> Dict[str, Any]:
    """A workload addressing its own host: its egress policy, then the workload-to-host setting
    (CANAL-INPUT -> CANAL-WL-TO-HOST), not the forward path."""
    assert src.endpoint is not None
    host = src.endpoint.host
    table, notes = cluster.host(host)
    p = dataclasses.replace(packet, iif=host_ifname(src.endpoint.id), oif="")
    result: Dict[str, Any] = {"egress": _decision(table.walk(FROM_WL, p), notes, EGRESS, host, FROM_WL)}
    walk = table.walk(INPUT, p)
    last = walk.steps[-1] if walk.steps else None
    result["ingress"] = {
        "evaluated": False,
        "explanation": f"{packet.dst} is {host}'s own address: the workload-to-host setting decides"
                       + (f" ({last.rule} in {last.chain})" if last is not None and last.chain == WL_TO_HOST else ""),
    }
    result["verdict"] = "denied" if walk.verdict == "DROP" else "allowed"
    result["consistent"] = result["verdict"] == "denied" or result["egress"]["verdict"] == "allow"
    return result


def _closed6(cluster: Cluster, src: Party, dst: Party) -> Optional[Dict[str, Any]]:
    """An IPv6 flow from or to an endpoint whose interface is closed to IPv6 (no --ipv6 on its
    network): denied before any policy (desired.py's raw and filter drops), said so."""
    if cluster.family != 6:
        return None
    result: Dict[str, Any] = {}
    for direction, party in (("egress", src), ("ingress", dst)):
        ep = party.endpoint
        if ep is None:
            result[direction] = {"evaluated": False, "explanation": f"{party.address} is not a canal endpoint: no "
                                                                   f"{direction} policy"}
        elif not cluster.ipv6_open(ep):
            who = ep.container_name or ep.id[:12]
            result[direction] = {"evaluated": True, "host": ep.host, "verdict": "deny", "reason": "no-ipv6",
                                 "explanation": REASONS["no-ipv6"].format(who=who), "chain": None, "rule_text": None}
        else:
            result[direction] = {"evaluated": False, "explanation": "not evaluated: the other side is closed to IPv6"}
    if all(r.get("reason") != "no-ipv6" for r in result.values()):
        return None
    result["verdict"] = "denied"
    result["consistent"] = True
    return result


def _flow(cluster: Cluster, src: Party, dst: Party, protocol: str, port: Optional[int],
          published: bool, host_addresses: frozenset[str] = frozenset()) -> Dict[str, Any]:
    """Both directions and the overall verdict of one flow's first packet. `host_addresses`:
    this host's own addresses (traffic to them takes INPUT, not FORWARD)."""
    closed = _closed6(cluster, src, dst)
    if closed is not None:
        return closed
    packet = _packet(protocol, port, src.address, dst.address, published, cluster.family)
    if (src.endpoint is not None and dst.endpoint is None and dst.address in host_addresses
            and src.endpoint.host == cluster.snap.host):
        return _to_host(cluster, src, packet)
    result: Dict[str, Any] = {}
    verdicts = []
    same_host = src.endpoint is not None and dst.endpoint is not None and src.endpoint.host == dst.endpoint.host
    src_if = host_ifname(src.endpoint.id) if src.endpoint is not None else UNDERLAY
    dst_if = host_ifname(dst.endpoint.id) if dst.endpoint is not None else UNDERLAY
    if src.endpoint is not None:
        host = src.endpoint.host
        table, notes = cluster.host(host)
        p = dataclasses.replace(packet, iif=src_if, oif=dst_if if same_host else UNDERLAY)
        walk = table.walk(FROM_WL, p)
        result["egress"] = _decision(walk, notes, EGRESS, host, FROM_WL)
        verdicts.append(table.walk("CANAL-FORWARD", p).verdict)
    else:
        result["egress"] = {"evaluated": False, "explanation": f"{src.address} is not a canal endpoint: no egress policy"}
    if dst.endpoint is not None:
        host = dst.endpoint.host
        table, notes = cluster.host(host)
        p = dataclasses.replace(packet, iif=src_if if same_host else UNDERLAY, oif=dst_if)
        walk = table.walk(TO_WL, p)
        result["ingress"] = _decision(walk, notes, INGRESS, host, TO_WL)
        if not same_host:
            verdicts.append(table.walk("CANAL-FORWARD", p).verdict)
    else:
        result["ingress"] = {"evaluated": False, "explanation": f"{dst.address} is not a canal endpoint: no ingress policy"}
    # The whole FORWARD path (same answer as the two directions; walked to prove it).
    result["verdict"] = "denied" if "DROP" in verdicts else "allowed"
    directions = [result[d]["verdict"] for d in ("egress", "ingress") if result[d]["evaluated"]]
    result["consistent"] = (result["verdict"] == "allowed") == all(v == "allow" for v in directions)
    return result


def _flow_args(protocol: Optional[str], port: Optional[int]) -> Tuple[str, Optional[int]]:
    if protocol is None:
        protocol = "icmp" if port is None else "tcp"
    protocol = protocol.lower()
    if protocol not in PROTOCOL_NUMBERS:
        raise BadRequest(f"protocol {protocol!r}: expected tcp, udp or icmp")
    if protocol == "icmp":
        if port is not None:
            raise BadRequest("--port: ICMP has no ports")
        return protocol, None
    if port is None:
        raise BadRequest(f"--port is required for {protocol}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise BadRequest(f"port {port!r}: expected an integer 0-65535")
    return protocol, port


def explain(snap: Snapshot, src: str, dst: str, protocol: Optional[str] = None, port: Optional[int] = None,
            published: bool = False, host_addresses: frozenset[str] = frozenset(),
            family: Optional[int] = None) -> Dict[str, Any]:
    """The verdict for a flow's first packet from SRC to DST, with the deciding rule each way.
    `host_addresses`: this host's own addresses (a workload addressing them meets the
    workload-to-host setting); other hosts' addresses are treated as outside destinations.
    `family`: 4 or 6 for containers given by name (an address given decides it): IPv6 flows
    walk the ip6tables rules (compile_filter6) the agent programs."""
    protocol, port = _flow_args(protocol, port)
    family = flow_family(src, dst, family)
    cluster = Cluster(snap, family)
    source, destination = resolve_pair(cluster, src, dst)
    if source.endpoint is None and destination.endpoint is None:
        raise BadRequest(f"neither {src!r} nor {dst!r} is a canal endpoint: Canal's policy decides nothing here")
    out = _flow(cluster, source, destination, protocol, port, published, host_addresses)
    out["source"] = source.describe()
    out["destination"] = destination.describe()
    out["flow"] = {"protocol": protocol if family == 4 or protocol != "icmp" else "icmpv6", "port": port,
                   "published": published, "family": family}
    if (destination.endpoint is not None and port is not None and not published
            and any(b.proto == protocol and b.port == port for b in destination.endpoint.ports)):
        out["hint"] = f"{port}/{protocol} is published by the destination: add --published for a client of the host port"
    return out


# --------------------------------------------------------------------------------------------------
# Dry run


def _selection(cluster: Cluster, ep: EndpointRecord) -> Dict[str, List[str]]:
    """Policies the compiled chains of `ep` jump to, per direction (its host's view)."""
    _, notes = cluster.host(ep.host)
    out = {}
    for direction in (EGRESS, INGRESS):
        chain_notes = notes.get(endpoint_chain(ep.id, direction), [])
        out[direction] = [n.policy for n in chain_notes if n.kind == "policy" and n.policy]
    return out


def _probes(policies: Iterable[Policy], endpoints: Iterable[EndpointRecord]) -> List[Tuple[str, Optional[int]]]:
    """Protocol/port pairs worth testing: ICMP echo, each port the changed rules name (first and
    last of ranges, and the port after), each published port, and one port nobody names."""
    probes: set[Tuple[str, Optional[int]]] = {("icmp", None)}
    named = set()
    for policy in policies:
        for direction in (EGRESS, INGRESS):
            for rule in policy.rules(direction):
                protos = [rule.protocol] if rule.protocol in ("TCP", "UDP") else ["TCP", "UDP"] if rule.protocol is None else []
                for entity in (rule.destination,):
                    for start, end in (*entity.ports, *entity.not_ports):
                        for proto in protos:
                            for port in {start, end, min(end + 1, 65535)}:
                                probes.add((str(proto).lower(), port))
                                named.add(port)
    for ep in endpoints:
        for binding in ep.ports:
            if binding.proto in ("tcp", "udp"):
                probes.add((binding.proto, binding.port))
                named.add(binding.port)
    unnamed = next(p for p in range(40001, 65535) if p not in named)
    probes.add(("tcp", unnamed))
    return sorted(probes, key=lambda pr: (pr[0], pr[1] or 0))


def dry_run(snap: Snapshot, new: Sequence[Policy], limit_flows: int = MAX_FLOWS,
            limit_evaluations: int = MAX_EVALUATIONS) -> Dict[str, Any]:
    """What applying `new` would change, computed from the compiled rules before and after
    (iptables' and, for endpoints with IPv6, ip6tables')."""
    by_key = {p.key: p for p in snap.policies}
    results, changed = [], []
    for policy in new:
        old = by_key.get(policy.key)
        result = "unchanged" if old == policy else ("configured" if old else "created")
        results.append({"policy": policy.key, "kind": policy.kind, "result": result})
        if result != "unchanged":
            changed.append(policy)
            if old is not None:
                changed.append(old)
        by_key[policy.key] = policy
    after_snap = dataclasses.replace(snap, policies=tuple(sorted(by_key.values(), key=lambda p: p.sort_key)))
    before, after = Cluster(snap), Cluster(after_snap)
    endpoints = sorted((ep for ep in snap.endpoints.values() if ep.joined), key=lambda e: (e.host, e.ip_text))

    selection = []
    affected: Dict[str, set] = {EGRESS: set(), INGRESS: set()}
    changed_keys = {p.key for p in changed}
    for ep in endpoints:
        was, now = _selection(before, ep), _selection(after, ep)
        row: Dict[str, Any] = {}
        for direction in (EGRESS, INGRESS):
            gained = [k for k in now[direction] if k not in was[direction]]
            lost = [k for k in was[direction] if k not in now[direction]]
            if gained:
                row[f"{direction.lower()}_now_selected_by"] = gained
            if lost:
                row[f"{direction.lower()}_no_longer_selected_by"] = lost
            if gained or lost or changed_keys & (set(now[direction]) | set(was[direction])):
                affected[direction].add(ep.id)
        if row:
            selection.append({**before.party(ep).describe(), **row})

    probes = _probes(changed, endpoints)
    flows: List[Dict[str, Any]] = []
    counted = {"gained": 0, "lost": 0}
    evaluations = 0
    truncated = False
    # IPv6 flows too, between endpoints both open to IPv6: a rule's nets or ICMP types may
    # decide one family and not the other.
    families = [(before, after)]
    if any(before.family == 4 and Cluster(snap, 6).ipv6_open(ep) for ep in endpoints):
        families.append((Cluster(snap, 6), Cluster(after_snap, 6)))
    for was_c, now_c in families:
        for src in endpoints:
            for dst in endpoints:
                if src.id == dst.id or not (src.id in affected[EGRESS] or dst.id in affected[INGRESS]):
                    continue
                if was_c.family == 6 and not (was_c.ipv6_open(src) and was_c.ipv6_open(dst)):
                    continue
                for protocol, port in probes:
                    if evaluations >= limit_evaluations:
                        truncated = True
                        break
                    evaluations += 1
                    a, b = was_c.party(src), was_c.party(dst)
                    old_flow = _flow(was_c, a, b, protocol, port, False)
                    new_flow = _flow(now_c, a, b, protocol, port, False)
                    if old_flow["verdict"] == new_flow["verdict"]:
                        continue
                    counted["gained" if new_flow["verdict"] == "allowed" else "lost"] += 1
                    if len(flows) < limit_flows:
                        flows.append({
                            "source": _label(a), "destination": _label(b),
                            "protocol": protocol, "port": port, "family": was_c.family,
                            "before": _brief(old_flow), "after": _brief(new_flow),
                        })
    return {
        "results": results,
        "selection": selection,
        "flows": flows,
        "summary": {
            "endpoints": len(endpoints),
            "flows_gained": counted["gained"],
            "flows_lost": counted["lost"],
            "listed": len(flows),
            "probes": [f"{p}/{port}" if port is not None else p for p, port in probes],
            "evaluations": evaluations,
            "truncated": truncated,
        },
    }


def _label(party: Party) -> str:
    ep = party.endpoint
    return f"{ep.container_name or ep.id[:12]} ({party.address})" if ep is not None else party.address


def _brief(flow: Dict[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {"verdict": flow["verdict"]}
    for direction in ("egress", "ingress"):
        d = flow[direction]
        if d.get("evaluated"):
            out[direction] = {k: d.get(k) for k in ("verdict", "reason", "policy", "rule") if d.get(k) is not None}
    return out


# --------------------------------------------------------------------------------------------------
# Stats


def parse_counters(text: str) -> Dict[str, List[Tuple[int, int, str]]]:
    """`iptables-save -c -t filter` -> chain -> [(packets, bytes, rule spec)] in order."""
    out: Dict[str, List[Tuple[int, int, str]]] = {}
    for line in text.splitlines():
        if not line.startswith("["):
            continue
        counters, _, rest = line.partition("] ")
        if not rest.startswith("-A "):
            continue
        packets, _, octets = counters[1:].partition(":")
        _, chain, spec = rest.split(" ", 2)
        out.setdefault(chain, []).append((int(packets), int(octets), spec))
    return out


def policy_stats(snap: Snapshot, saved: str, family: int = 4) -> Dict[str, Any]:
    """Packets and bytes per policy rule and per implicit outcome on this host, from the kernel's
    counters (`saved`: iptables-save -c, ip6tables-save -c for family 6), mapped to policies
    through the notes of the same compiled chains. A kernel chain that differs from the compiled
    one (a pass not applied yet) is reported as stale, not guessed."""
    kernel = parse_counters(saved)
    cluster = Cluster(snap, family)
    table, notes = cluster.host(snap.host)
    rules: Dict[Tuple[str, str, int], Dict[str, Any]] = {}
    implicit: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
    stale = []
    local = {endpoint_chain(ep.id, d): ep for ep in snap.endpoints.values() if ep.host == snap.host
             for d in (EGRESS, INGRESS)}
    for chain, compiled in sorted(table.chains.items()):
        if chain not in notes:
            continue
        lines = kernel.get(chain)
        if lines is None or [spec for _, _, spec in lines] != list(compiled):
            stale.append(chain)
            continue
        for (packets, octets, _), note in zip(lines, notes[chain]):
            if note.kind == "rule" and note.policy is not None and note.index is not None:
                key = (note.policy, note.direction or "", note.index)
                row = rules.setdefault(key, {"policy": note.policy, "direction": note.direction, "rule": note.index,
                                             "action": note.action, "packets": 0, "bytes": 0})
            elif chain in local and note.kind not in ("clear-marks", "policy", "accepted"):
                ep = local[chain]
                key2 = (ep.id, note.direction or "", note.kind)
                row = implicit.setdefault(key2, {
                    "endpoint": ep.id[:12], "container": ep.container_name or None, "address": ep.ip_text,
                    "direction": note.direction, "outcome": note.kind, "action": note.action, "packets": 0, "bytes": 0})
            else:
                continue
            row["packets"] += packets
            row["bytes"] += octets
    return {
        "host": snap.host,
        "rules": sorted(rules.values(), key=lambda r: (r["policy"], r["direction"], r["rule"])),
        "implicit": sorted(implicit.values(), key=lambda r: (r["address"], r["direction"], r["outcome"])),
        "stale": stale if family == 4 else [f"ip6:{c}" for c in stale],
    }


def merge_stats(four: Dict[str, Any], six: Dict[str, Any]) -> Dict[str, Any]:
    """policy_stats of both families as one: a rule's packets over IPv4 and IPv6 summed (one
    policy rule renders into both tables); IPv6's stale chains listed as ip6:CHAIN."""
    def summed(a: List[Dict[str, Any]], b: List[Dict[str, Any]], key: Tuple[str, ...]) -> List[Dict[str, Any]]:
        out: Dict[Tuple[Any, ...], Dict[str, Any]] = {}
        for row in [*a, *b]:
            k = tuple(row[f] for f in key)
            if k in out:
                out[k] = {**out[k], "packets": out[k]["packets"] + row["packets"], "bytes": out[k]["bytes"] + row["bytes"]}
            else:
                out[k] = dict(row)
        return [out[k] for k in sorted(out, key=lambda k: tuple(str(x) for x in k))]
    return {
        "host": four["host"],
        "rules": summed(four["rules"], six["rules"], ("policy", "direction", "rule")),
        "implicit": summed(four["implicit"], six["implicit"], ("endpoint", "direction", "outcome")),
        "stale": [*four["stale"], *six["stale"]],
    }
