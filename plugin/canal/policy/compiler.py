"""Compile endpoints + policies into this host's whole filter-table state, the way Felix renders it.

Pure: no kernel, no datastore. The output is a FirewallState the applier diffs against
iptables-save, so every rule is written exactly as iptables-save prints it back (option order
`-s -d -i -o -p`, then matches, then target); a mismatch would make every apply a rewrite.

Layout (filter table):

    FORWARD -j CANAL-FORWARD (first, or right after DOCKER-USER)   INPUT -i cnl+ -j CANAL-INPUT (first)
    CANAL-FORWARD: every rule scoped to -i/-o cnl+ (Docker's bridges and other forwarded
                   traffic are not Canal's to decide): ESTABLISHED accept, INVALID drop,
                   RELATED accepted only from outside the cluster's networks,
                   -i cnl+ -> CANAL-FROM-WL, -o cnl+ -> CANAL-TO-WL, accept what they returned
    CANAL-INPUT:   -i cnl+: INVALID drop, ESTABLISHED (not RELATED) accept, goto CANAL-WL-TO-HOST
    CANAL-WL-TO-HOST: the workload's egress policy first (CANAL-FROM-WL), DNS to the host's
                   own resolvers, then the workload-to-host action (drop, return or accept)
    CANAL-FROM-WL / CANAL-TO-WL: -i/-o <iface> -g CANAL-FW-/CANAL-TW-<id12>; unknown iface: DROP
    CANAL-FW-<id12> / CANAL-TW-<id12>: clear marks, [anti-spoof, internal-network fence],
                   identity unknown (labels or network name not learned) or a policy of its
                   scope unparsable: DROP; policies in order (-j CANAL-PO-/CANAL-PI-<hash>,
                   RETURN on the accept mark, later policies skipped on the pass mark), the
                   datastore's endpoints dropped unless a policy allowed them, default deny if
                   any policy applied, then the network profile (egress: allow; ingress: allow
                   from own network, and to its published ports from anywhere: DNATed by
                   canal.agent.desired, with the client's address for policies to see).
    CANAL-PI-/CANAL-PO-<hash>: one policy's rules for one direction.

Spoofed sources and encapsulated packets from workloads are dropped earlier still, in the raw
table, before conntrack could match them to anyone's flow (canal.agent.desired).

Endpoint chains DROP what is denied and RETURN what is allowed, so a packet between two local
containers passes the sender's egress chain and then the receiver's ingress chain.

Scale: the number of rules depends only on the policies and the LOCAL endpoints; which remote
endpoints a selector matches lives in ipsets (membership changes never rewrite rules).

IPv6 (compile_filter6, for ip6tables): the same chains from the same policies, for endpoints
with an IPv6 address (networks created with --ipv6): selectors fill `family inet6` sets of
their /128s, a rule's nets/notNets count in the family they belong to (a rule whose nets are
all of the other family never matches), ICMP rules are IPv4's and ICMPv6 rules IPv6's, anti-
spoofing allows only the endpoint's /128, and neighbour discovery (ICMPv6 130-136, untracked by
conntrack) between a workload and its host veth is accepted before any policy, as Felix does.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import ipaddress
from dataclasses import dataclass, field
from typing import AbstractSet, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence

from canal.dataplane.firewall import FirewallState, Jump
from canal.dataplane.ipset import MAX_NAME as MAX_IPSET_NAME
from canal.dataplane.ipset import IpSet
from canal.dataplane.links import HOST_PREFIX, host_ifname
from canal.policy import selector as selectors
from canal.policy.model import EGRESS, INGRESS, PROTOCOLS, IcmpMatch, Policy, PortRange, Rule

__all__ = [
    "ACCEPT_MARK",
    "FORWARD",
    "FROM_WL",
    "INPUT",
    "MAX_CHAIN_NAME",
    "NETWORK_LABEL",
    "PASS_MARK",
    "TO_WL",
    "EndpointInfo",
    "HostProtection",
    "NetworkInfo",
    "Note",
    "WL_TO_HOST",
    "compile_filter",
    "compile_filter_annotated",
    "compile_filter6",
    "effective_labels",
    "endpoint_chain",
    "network_members_set",
    "policy_chain",
    "protocol_name",
    "scoped_selector",
    "selector_set",
]

TABLE = "filter"
FORWARD = "CANAL-FORWARD"
INPUT = "CANAL-INPUT"
FROM_WL = "CANAL-FROM-WL"
TO_WL = "CANAL-TO-WL"
WL_TO_HOST = "CANAL-WL-TO-HOST"
DOCKER_USER_JUMP = "-j DOCKER-USER"
WORKLOAD_TO_HOST_ACTIONS = {"drop": "DROP", "return": "RETURN", "accept": "ACCEPT"}
MAX_CHAIN_NAME = 28  # Felix's limit; iptables allows 28 usable characters
NETWORK_LABEL = "canal.network"  # built-in label; wins over a container label of the same key

ACCEPT_MARK = 0x10000
PASS_MARK = 0x20000
_MARKS = ACCEPT_MARK | PASS_MARK
CLEAR_MARKS = f"-j MARK --set-xmark 0x0/{_MARKS:#x}"
RETURN_IF_ACCEPTED = f"-m mark --mark {ACCEPT_MARK:#x}/{ACCEPT_MARK:#x} -j RETURN"
RETURN_IF_PASSED = f"-m mark --mark {PASS_MARK:#x}/{PASS_MARK:#x} -j RETURN"
UNLESS_PASSED = f"-m mark --mark 0x0/{PASS_MARK:#x}"

MULTIPORT_SLOTS = 15  # xt_multiport: 15 entries, a range takes two
LOG_PREFIX_MAX = 29  # xt_LOG (legacy) refuses longer prefixes
_PORT_NAMES = {6: "tcp", 17: "udp", 132: "sctp", 136: "udplite"}
# iptables' own table, used when /etc/protocols lacks a number (iptables does the same fallback).
_BUILTIN_PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 50: "esp", 51: "ah", 58: "icmpv6", 132: "sctp", 135: "mh", 136: "udplite"}


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """One endpoint anywhere in the cluster; `labels` None = container labels not known yet."""

    id: str
    ip: str
    network: str  # logical network name
    host: str
    labels: Optional[Mapping[str, str]] = None
    published: tuple[tuple[str, int], ...] = ()  # (proto, container port) published on its host
    ip6: Optional[str] = None  # its IPv6 address (networks created with --ipv6)
    named: bool = field(default=True, compare=False)  # `network` is the name learned (False: its ID, for now)


@dataclass(frozen=True)
class Note:
    """Why one emitted rule exists: `kind` is "rule" (a policy's rule `index`; "rule-return" for
    the RETURN after an Allow or Pass rule's MARK), "policy" (the
    jump to a policy's chain), "accepted" (return once it allowed), or an implicit outcome
    (labels-pending, broken-policy, anti-spoof, internal-fence, datastore, default-deny,
    profile-egress, profile-network, profile-published, profile-deny, clear-marks)."""

    kind: str
    policy: Optional[str] = None  # policy key
    direction: Optional[str] = None
    index: Optional[int] = None
    action: Optional[str] = None


# The implicit outcomes' notes, shared (built once: the agent compiles on every pass).
_IMPLICIT_ACTIONS = {
    "clear-marks": None, "anti-spoof": "Deny", "internal-fence": "Deny", "broken-policy": "Deny",
    "labels-pending": "Deny", "datastore": "Deny", "default-deny": "Deny", "profile-egress": "Allow",
    "profile-network": "Allow", "profile-published": "Allow", "profile-deny": "Deny",
}
_IMPLICIT = {(kind, d): Note(kind, direction=d, action=action) for kind, action in _IMPLICIT_ACTIONS.items()
             for d in (INGRESS, EGRESS)}


@dataclass(frozen=True)
class NetworkInfo:
    name: str
    internal: bool = False


@dataclass(frozen=True)
class HostProtection:
    """What containers may reach on (or through) the host regardless of policy."""

    workload_to_host: str = "drop"  # drop | return | accept: after the workload's egress policy
    dns: tuple[str, ...] = ()  # this host's own addresses serving DNS to containers (port 53)
    datastore: tuple[tuple[str, int], ...] = ()  # (address, TCP port): closed unless a policy allows


def effective_labels(endpoint: EndpointInfo) -> Optional[Dict[str, str]]:
    """Container labels plus built-ins (built-ins win, so a container cannot claim another network)."""
    if endpoint.labels is None:
        return None
    labels = dict(endpoint.labels)
    labels[NETWORK_LABEL] = endpoint.network
    return labels


def _digest(text: str, length: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def endpoint_chain(endpoint_id: str, direction: str) -> str:
    """CANAL-FW-<id12> (egress: from the workload) or CANAL-TW-<id12> (ingress: to it)."""
    return ("CANAL-TW-" if direction == INGRESS else "CANAL-FW-") + endpoint_id[:12]


def policy_chain(policy: Policy, direction: str) -> str:
    """CANAL-PI-/CANAL-PO-<hash>; hashed from kind + key since names repeat across networks."""
    prefix = "CANAL-PI-" if direction == INGRESS else "CANAL-PO-"
    return prefix + _digest(f"{policy.kind}:{policy.key}")


def scoped_selector(text: str, network: Optional[str]) -> selectors.Selector:
    """A policy's selector as an AST; a NetworkPolicy's is ANDed with `canal.network == <network>`."""
    parsed = selectors.parse(text)
    if network is None:
        return parsed
    scope = selectors.Compare(NETWORK_LABEL, "==", network)
    if isinstance(parsed, selectors.All):
        return scope
    return selectors.And((parsed, scope))


def selector_set(selector: selectors.Selector) -> str:
    """ipset of endpoint IPs matching `selector`; named by its canonical text, so equal selectors share."""
    return "canal-sel-" + _digest(selector.canonical())


def network_members_set(network: str) -> str:
    """ipset of every endpoint IP of `network` cluster-wide (labels known or not): the profile's set."""
    return "canal-net-" + _digest(network)


def _cidr_set(nets: Sequence[str]) -> str:
    return "canal-cidr-" + _digest(",".join(nets))


class Memberships(Protocol):
    """The members of the sets that grow with the cluster, kept incrementally
    (canal.agent.index.MembershipIndex): the compiler then needs only the local endpoints."""

    def selector_members(self, scoped: selectors.Selector, family: int) -> AbstractSet[str]: ...

    def network_members(self, network: str, family: int) -> AbstractSet[str]: ...


@functools.lru_cache(maxsize=1)
def _system_protocol_names() -> Dict[int, str]:
    """number -> name from /etc/protocols: iptables-save prints `-p` through getprotobynumber()."""
    names: Dict[int, str] = {}
    try:
        with open("/etc/protocols", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                fields = line.split("#", 1)[0].split()
                if len(fields) >= 2 and fields[1].isdigit():
                    names.setdefault(int(fields[1]), fields[0])
    except OSError:
        pass
    return names


def protocol_name(number: int) -> str:
    """How iptables-save prints protocol `number` on this host."""
    return _system_protocol_names().get(number) or _BUILTIN_PROTOCOL_NAMES.get(number) or str(number)


def _protocol_number(protocol) -> int:
    return protocol if isinstance(protocol, int) else PROTOCOLS[protocol]


# --------------------------------------------------------------------------------------------------
# Rule rendering


def _merge_ports(ports: Iterable[PortRange]) -> List[PortRange]:
    """Sorted, overlapping/adjacent ranges merged: fewer multiport slots, and no packet matches two groups."""
    merged: List[PortRange] = []
    for start, end in sorted(ports):
        if merged and start <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _port_groups(ports: Iterable[PortRange]) -> List[str]:
    """Comma lists for `--dports`, each fitting multiport's 15 slots (a range counts two)."""
    groups: List[str] = []
    current: List[str] = []
    used = 0
    for start, end in _merge_ports(ports):
        cost = 1 if start == end else 2
        if used + cost > MULTIPORT_SLOTS:
            groups.append(",".join(current))
            current, used = [], 0
        current.append(str(start) if start == end else f"{start}:{end}")
        used += cost
    if current:
        groups.append(",".join(current))
    return groups


def _icmp_spec(match: IcmpMatch) -> str:
    return str(match.type) if match.code is None else f"{match.type}/{match.code}"


def _collapse(nets: Sequence[str]) -> List[str]:
    """Nets of one family, merged (callers pass one family's: see _Compiler._own)."""
    if any(":" in n for n in nets):
        return [str(n) for n in ipaddress.collapse_addresses(ipaddress.IPv6Network(n, strict=False) for n in nets)]
    return [str(n) for n in ipaddress.collapse_addresses(ipaddress.IPv4Network(n, strict=False) for n in nets)]


class _Compiler:
    family = 4
    any_net = "0.0.0.0/0"
    host_bits = 32
    icmp = (1, "-m icmp --icmp-type")  # (protocol number, match) of this family's ICMP

    def _address(self, endpoint: EndpointInfo) -> Optional[str]:
        """The endpoint's address in this family (None: it has none, so no rules or set entries)."""
        return _bare_ip(endpoint.ip)

    def _set_name(self, name: str) -> str:
        return name

    def _ipset(self, name: str, kind: str, members: AbstractSet[str]) -> IpSet:
        return IpSet(name, kind, members)

    def _own(self, nets: Sequence[str]) -> List[str]:
        """The nets of this family."""
        return [n for n in nets if (":" in n) == (self.family == 6)]

    def _ndp(self) -> List[str]:
        """Rules accepting what the family needs between a workload and its host veth."""
        return []

    spoofed = "DROP"  # where a source other than the endpoint's own address goes

    def _extra_chains(self) -> None:
        """Chains of this family only."""

    def __init__(
        self,
        endpoints: Sequence[EndpointInfo],
        policies: Sequence[Policy],
        local_host: str,
        networks: Mapping[str, NetworkInfo],
        broken_scopes: AbstractSet[Optional[str]] = frozenset(),
        host: HostProtection = HostProtection(),
        cluster_set: Optional[str] = None,
        memberships: Optional[Memberships] = None,
    ) -> None:
        """memberships: where the selector and network sets' members come from; then
        `endpoints` need only hold the local ones (None: computed from `endpoints`, all)."""
        self.memberships = memberships
        self.broken_scopes = broken_scopes
        self.host = host
        self.cluster_set = cluster_set
        self.endpoints = endpoints
        self.policies = sorted(policies, key=lambda p: p.sort_key)
        self.local = sorted((e for e in endpoints if e.host == local_host), key=lambda e: host_ifname(e.id))
        self.networks = networks
        self.labels = {e.id: effective_labels(e) for e in endpoints}
        # Endpoints grouped by identical labels (a service's replicas share them): each
        # selector is evaluated once per distinct label set, not once per endpoint.
        groups: Dict[tuple, List[str]] = {}
        for e in endpoints if memberships is None else ():
            labels = self.labels[e.id]
            address = self._address(e)
            if labels is not None and address is not None:
                groups.setdefault(tuple(sorted(labels.items())), []).append(address)
        self.groups = [(dict(key), ips) for key, ips in groups.items()]
        self.chains: Dict[str, List[str]] = {}
        self.sets: Dict[str, IpSet] = {}
        # Why each rule is there, one Note per rule of self.chains[name]: what `canal policy
        # explain` and `stats` report, taken from the rules as emitted (never re-derived).
        self.notes: Dict[str, List[Note]] = {}
        self._jump_note_cache: Dict[tuple[str, str], tuple[Note, Note]] = {}

    # -- ipsets --------------------------------------------------------------------------------------

    def _selector_match(self, text: str, network: Optional[str], direction: str, negated: bool) -> str:
        scoped = scoped_selector(text, network)
        name = self._set_name(selector_set(scoped))
        if name not in self.sets:
            members: AbstractSet[str]
            if self.memberships is not None:
                members = self.memberships.selector_members(scoped, self.family)
            else:
                members = frozenset(ip for labels, ips in self.groups if scoped.matches(labels) for ip in ips)
            self.sets[name] = self._ipset(name, "hash:ip", members)
        return f"-m set {'! ' if negated else ''}--match-set {name} {direction}"

    def _network_set(self, network: str) -> str:
        name = self._set_name(network_members_set(network))
        if name not in self.sets:
            members: AbstractSet[str]
            if self.memberships is not None:
                members = self.memberships.network_members(network, self.family)
            else:
                addresses = (self._address(e) for e in self.endpoints if e.network == network)
                members = frozenset(a for a in addresses if a is not None)
            self.sets[name] = self._ipset(name, "hash:ip", members)
        return name

    def _cidr_match(self, nets: List[str], direction: str, negated: bool) -> str:
        name = self._set_name(_cidr_set(nets))
        self.sets.setdefault(name, self._ipset(name, "hash:net", frozenset(nets)))
        return f"-m set {'! ' if negated else ''}--match-set {name} {direction}"

    # -- policy chains -------------------------------------------------------------------------------

    def _rule(self, policy: Policy, rule: Rule) -> List[str]:
        """iptables rules for one policy rule; [] if it can never match."""
        head: List[str] = []  # -s / -d / -p, in iptables-save's order
        matches: List[str] = []
        network = None if policy.is_global else policy.network
        for flag, direction, entity in (("-s", "src", rule.source), ("-d", "dst", rule.destination)):
            own = self._own(entity.nets)
            if entity.nets and not own:
                return []  # every net is of the other family: matches nothing in this one
            nets = [] if self.any_net in own else _collapse(own)
            not_nets = _collapse(self._own(entity.not_nets))
            if self.any_net in not_nets:
                return []  # excludes every address
            single = len(nets) == 1
            if single:
                head.append(f"{flag} {nets[0]}")
            elif nets:
                matches.append(self._cidr_match(nets, direction, False))
            if len(not_nets) == 1 and not single:
                head.append(f"! {flag} {not_nets[0]}")
            elif not_nets:
                matches.append(self._cidr_match(not_nets, direction, True))
            if entity.selector is not None:
                matches.append(self._selector_match(entity.selector, network, direction, False))
            if entity.not_selector is not None:
                matches.append(self._selector_match(entity.not_selector, network, direction, True))

        if rule.protocol is not None:
            number = _protocol_number(rule.protocol)
            if number in (1, 58) and number != self.icmp[0]:
                return []  # ICMP rules are IPv4's, ICMPv6 rules IPv6's (as in Calico)
            if rule.not_protocol is not None and _protocol_number(rule.not_protocol) == number:
                return []  # "protocol X and not X"
            head.append(f"-p {protocol_name(number)}")
        elif rule.not_protocol is not None:
            head.append(f"! -p {protocol_name(_protocol_number(rule.not_protocol))}")

        # Positive port lists may need several multiport groups: one iptables rule per combination
        # (OR); negative groups all go into every rule (AND).
        negative: List[str] = []
        for option, entity in (("--sports", rule.source), ("--dports", rule.destination)):
            negative += [f"-m multiport ! {option} {group}" for group in _port_groups(entity.not_ports)]
        icmp: List[str] = []
        module, option = self.icmp[1].rsplit(" ", 1)
        if rule.icmp is not None:
            icmp.append(f"{module} {option} {_icmp_spec(rule.icmp)}")
        if rule.not_icmp is not None:
            icmp.append(f"{module} ! {option} {_icmp_spec(rule.not_icmp)}")
        sports = [f"-m multiport --sports {g}" for g in _port_groups(rule.source.ports)] or [""]
        dports = [f"-m multiport --dports {g}" for g in _port_groups(rule.destination.ports)] or [""]

        target = {
            "Allow": f"-j MARK --set-xmark {ACCEPT_MARK:#x}/{ACCEPT_MARK:#x}",
            "Pass": f"-j MARK --set-xmark {PASS_MARK:#x}/{PASS_MARK:#x}",
            "Deny": "-j DROP",
            "Log": f'-j LOG --log-prefix "{_log_prefix(policy)}"',
        }[rule.action]
        out = []
        for sport in sports:
            for dport in dports:
                parts = head + matches + [p for p in (sport, dport) if p] + negative + icmp + [target]
                out.append(" ".join(parts))
        if rule.action == "Allow":
            out.append(RETURN_IF_ACCEPTED)
        elif rule.action == "Pass":
            out.append(RETURN_IF_PASSED)
        return out

    def _policy_chain(self, policy: Policy, direction: str) -> str:
        name = policy_chain(policy, direction)
        if name not in self.chains:
            rules: List[str] = []
            notes: List[Note] = []
            for index, rule in enumerate(policy.rules(direction)):
                lines = self._rule(policy, rule)
                rules += lines
                note = Note("rule", policy.key, direction, index, rule.action)
                notes += [note] * len(lines)
                if rule.action in ("Allow", "Pass") and lines:  # the last line returns on the mark
                    notes[-1] = dataclasses.replace(note, kind="rule-return")
            self.chains[name] = rules
            self.notes[name] = notes
        return name

    # -- endpoint chains -----------------------------------------------------------------------------

    def _could_apply(self, policy: Policy, endpoint: EndpointInfo, direction: str) -> bool:
        return direction in policy.types and (policy.is_global or policy.network == endpoint.network)

    def _selects(self, policy: Policy, endpoint: EndpointInfo, direction: str) -> bool:
        labels = self.labels[endpoint.id]
        if labels is None or not self._could_apply(policy, endpoint, direction):
            return False
        return selectors.parse(policy.selector).matches(labels)

    def _jump_notes(self, policy: Policy, direction: str) -> tuple[Note, Note]:
        key = (policy.key, direction)
        if key not in self._jump_note_cache:
            self._jump_note_cache[key] = (Note("policy", policy.key, direction),
                                          Note("accepted", policy.key, direction, action="Allow"))
        return self._jump_note_cache[key]

    def _endpoint_chain(self, endpoint: EndpointInfo, direction: str) -> tuple[List[str], List[Note]]:
        ip = self._address(endpoint)
        rules = [CLEAR_MARKS]
        notes = [_IMPLICIT[("clear-marks", direction)]]

        def add(rule: str, note: Note) -> None:
            rules.append(rule)
            notes.append(note)

        if direction == EGRESS:
            add(f"! -s {ip}/{self.host_bits} -j {self.spoofed}", _IMPLICIT[("anti-spoof", direction)])
            network = self.networks.get(endpoint.network)
            if network is not None and network.internal:
                members = self._network_set(endpoint.network)
                add(f"-m set ! --match-set {members} dst -j DROP", _IMPLICIT[("internal-fence", direction)])
        if None in self.broken_scopes or endpoint.network in self.broken_scopes:
            # a stored policy of its scope does not parse: fail closed
            add("-j DROP", _IMPLICIT[("broken-policy", direction)])
            return rules, notes
        if self.labels[endpoint.id] is None:
            # Identity unknown: any policy's Deny could name it as a source, so it neither
            # sends nor receives anything until its labels and network name are learned.
            add("-j DROP", _IMPLICIT[("labels-pending", direction)])
            return rules, notes
        applied = [p for p in self.policies if self._selects(p, endpoint, direction)]
        may_have_passed = False
        for policy in applied:
            chain = self._policy_chain(policy, direction)
            jump_note, accepted_note = self._jump_notes(policy, direction)
            add(f"{UNLESS_PASSED} -j {chain}" if may_have_passed else f"-j {chain}", jump_note)
            add(RETURN_IF_ACCEPTED, accepted_note)
            may_have_passed = may_have_passed or any(r.action == "Pass" for r in policy.rules(direction))
        if direction == EGRESS:
            # The datastore is every host's trust root: closed unless a policy allowed it above.
            for address, port in self.host.datastore:
                if self._own([address]) == []:
                    continue
                add(f"-d {address}/{self.host_bits} -p tcp -m multiport --dports {port} -j DROP",
                    _IMPLICIT[("datastore", direction)])
        if applied:
            # Default deny once any policy selects the endpoint, unless one of them passed.
            add(f"{UNLESS_PASSED} -j DROP" if may_have_passed else "-j DROP",
                _IMPLICIT[("default-deny", direction)])
        if direction == EGRESS:
            add("-j RETURN", _IMPLICIT[("profile-egress", direction)])  # profile: egress allowed
        else:
            members = self._network_set(endpoint.network)
            add(f"-m set --match-set {members} src -j RETURN",  # profile: own network
                _IMPLICIT[("profile-network", direction)])
            for proto, port in endpoint.published:  # profile: its published ports, from anywhere
                add(f"-p {proto} -m {proto} --dport {port} -m conntrack --ctstate DNAT -j RETURN",
                    _IMPLICIT[("profile-published", direction)])
            add("-j DROP", _IMPLICIT[("profile-deny", direction)])
        return rules, notes

    # -- whole table ---------------------------------------------------------------------------------

    def compile(self) -> FirewallState:
        wl = f"{HOST_PREFIX}+"
        # Only ESTABLISHED skips policy. A RELATED packet (an ICMP error quoting someone's flow)
        # can be sent by any workload, unspoofed, into any flow it can name: from workloads, and
        # from the cluster's own networks, it goes through the policy chains like new traffic;
        # errors from routers and hosts outside them (path MTU, unreachables) are accepted.
        outside = f"-m set ! --match-set {self.cluster_set} src " if self.cluster_set else ""
        # ESTABLISHED first: it and INVALID never both match, and nearly every forwarded packet
        # is ESTABLISHED, so it leaves after one conntrack match, not two (measured: bench/multihost.py).
        self.chains[FORWARD] = [
            f"-i {wl} -m conntrack --ctstate ESTABLISHED -j ACCEPT",
            f"-o {wl} -m conntrack --ctstate ESTABLISHED -j ACCEPT",
            f"-i {wl} -m conntrack --ctstate INVALID -j DROP",
            f"-o {wl} -m conntrack --ctstate INVALID -j DROP",
            f"! -i {wl} -o {wl} {outside}-m conntrack --ctstate RELATED -j ACCEPT",
            f"-i {wl} -j {FROM_WL}",
            f"-o {wl} -j {TO_WL}",
            f"-i {wl} -j ACCEPT",
            f"-o {wl} -j ACCEPT",
        ]
        # Scoped to workload interfaces: an unscoped ESTABLISHED accept at the top of INPUT would
        # bypass the host's own INPUT rules for all of its traffic.
        self.chains[INPUT] = [
            f"-i {wl} -m conntrack --ctstate INVALID -j DROP",
            *self._ndp(),
            f"-i {wl} -m conntrack --ctstate ESTABLISHED -j ACCEPT",
            f"-i {wl} -g {WL_TO_HOST}",
        ]
        to_host = [f"-j {FROM_WL}"]  # the workload's egress policy applies first, in every mode
        for address in self._own(self.host.dns):
            to_host += [f"-d {address}/{self.host_bits} -p {proto} -m multiport --dports 53 -j ACCEPT" for proto in ("tcp", "udp")]
        to_host.append(f"-j {WORKLOAD_TO_HOST_ACTIONS[self.host.workload_to_host]}")
        self.chains[WL_TO_HOST] = to_host
        from_wl: List[str] = []
        to_wl: List[str] = []
        for endpoint in self.local:
            if self._address(endpoint) is None:
                continue  # no address of this family: its interface falls to the DROP below
            ifname = host_ifname(endpoint.id)
            egress, ingress = endpoint_chain(endpoint.id, EGRESS), endpoint_chain(endpoint.id, INGRESS)
            from_wl.append(f"-i {ifname} -g {egress}")
            to_wl.append(f"-o {ifname} -g {ingress}")
            self.chains[egress], self.notes[egress] = self._endpoint_chain(endpoint, EGRESS)
            self.chains[ingress], self.notes[ingress] = self._endpoint_chain(endpoint, INGRESS)
        self.chains[FROM_WL] = from_wl + ["-j DROP"]  # unknown workload interface: fail closed
        self.chains[TO_WL] = to_wl + ["-j DROP"]
        self._extra_chains()

        for name in self.chains:
            assert len(name) <= MAX_CHAIN_NAME, name
        for name in self.sets:
            assert len(name) <= MAX_IPSET_NAME, name
        return FirewallState(
            chains={(TABLE, name): rules for name, rules in sorted(self.chains.items())},
            jumps=[
                Jump(TABLE, "FORWARD", FORWARD, after=frozenset({DOCKER_USER_JUMP})),
                Jump(TABLE, "INPUT", INPUT, match=f"-i {wl}"),  # every rule of INPUT is -i wl
            ],
            ipsets=[self.sets[name] for name in sorted(self.sets)],
        )


SPOOF6 = "CANAL-SPOOF6"


class _Compiler6(_Compiler):
    """The IPv6 filter table (ip6tables): see the module docstring."""

    family = 6
    any_net = "::/0"
    host_bits = 128
    icmp = (58, "-m icmp6 --icmpv6-type")

    def _address(self, endpoint: EndpointInfo) -> Optional[str]:
        return endpoint.ip6

    def _set_name(self, name: str) -> str:
        return "canal-6" + name[len("canal-"):]  # still canal-*: ours to read back and remove

    def _ipset(self, name: str, kind: str, members: AbstractSet[str]) -> IpSet:
        return IpSet(name, kind, members, family="inet6")

    # Besides its /128, a workload may send from its link-local address (to its host veth: the
    # kernel never forwards link-local sources); anything else is dropped.
    spoofed = SPOOF6

    def _extra_chains(self) -> None:
        self.chains[SPOOF6] = ["-s fe80::/10 -j RETURN", "-j DROP"]

    def _ndp(self) -> List[str]:
        # Router/neighbour solicitations and advertisements, MLD: untracked by conntrack, sent
        # from link-local (or unspecified) sources the anti-spoofing rule would drop.
        proto = protocol_name(58)
        return [f"-i {HOST_PREFIX}+ -p {proto} -m icmp6 --icmpv6-type {t} -j ACCEPT" for t in range(130, 137)]


def compile_filter6(
    endpoints: Iterable[EndpointInfo],
    policies: Iterable[Policy],
    local_host: str,
    networks: Mapping[str, NetworkInfo],
    broken_scopes: AbstractSet[Optional[str]] = frozenset(),
    host: HostProtection = HostProtection(),
    cluster_set: Optional[str] = None,
    memberships: Optional[Memberships] = None,
) -> FirewallState:
    """compile_filter for ip6tables: the same policies over the endpoints' IPv6 addresses
    (`family inet6` ipsets named canal-6*); endpoints without one are closed to IPv6."""
    return compile_filter6_annotated(endpoints, policies, local_host, networks, broken_scopes, host, cluster_set,
                                     memberships)[0]


def compile_filter6_annotated(
    endpoints: Iterable[EndpointInfo],
    policies: Iterable[Policy],
    local_host: str,
    networks: Mapping[str, NetworkInfo],
    broken_scopes: AbstractSet[Optional[str]] = frozenset(),
    host: HostProtection = HostProtection(),
    cluster_set: Optional[str] = None,
    memberships: Optional[Memberships] = None,
) -> tuple[FirewallState, Dict[str, List[Note]]]:
    """compile_filter6, plus the notes (`canal policy explain` over IPv6 reads them)."""
    compiler = _Compiler6(list(endpoints), list(policies), local_host, networks, broken_scopes, host, cluster_set,
                          memberships)
    return compiler.compile(), compiler.notes


def _bare_ip(ip: str) -> str:
    return ip.split("/", 1)[0]


def _log_prefix(policy: Policy) -> str:
    """`canal <name> ` cut to the LOG target's limit (names are [a-z0-9.-]: nothing to quote)."""
    room = LOG_PREFIX_MAX - len("canal  ")
    return f"canal {policy.name[:room]} "


def compile_filter(
    endpoints: Iterable[EndpointInfo],
    policies: Iterable[Policy],
    local_host: str,
    networks: Mapping[str, NetworkInfo],
    broken_scopes: AbstractSet[Optional[str]] = frozenset(),
    host: HostProtection = HostProtection(),
    cluster_set: Optional[str] = None,
    memberships: Optional[Memberships] = None,
) -> FirewallState:
    """The whole filter-table state for `local_host`: chains, the two built-in jumps, and ipsets.

    `broken_scopes`: policy scopes (None = global, else a network name) holding a stored policy
    that does not parse; every endpoint such a policy could select is closed. `cluster_set`:
    the ipset (hash:net, programmed by the caller) of the cluster's networks, whose RELATED
    packets to workloads go through policy (None: only workloads' own do).
    Deterministic (same input -> equal state, sorted everywhere) so the applier's diff is a no-op
    when nothing changed. Returns an empty state when there is nothing of ours on this host.
    `memberships`: the selector and network sets' members kept incrementally; `endpoints` then
    need only be the local ones (canal.agent.index).
    """
    return compile_filter_annotated(endpoints, policies, local_host, networks, broken_scopes, host, cluster_set,
                                    memberships)[0]


def compile_filter_annotated(
    endpoints: Iterable[EndpointInfo],
    policies: Iterable[Policy],
    local_host: str,
    networks: Mapping[str, NetworkInfo],
    broken_scopes: AbstractSet[Optional[str]] = frozenset(),
    host: HostProtection = HostProtection(),
    cluster_set: Optional[str] = None,
    memberships: Optional[Memberships] = None,
) -> tuple[FirewallState, Dict[str, List[Note]]]:
    """compile_filter, plus a Note per rule of each endpoint and policy chain (chain name -> notes)."""
    endpoints = list(endpoints)
    policies = list(policies)
    if not networks and not any(e.host == local_host for e in endpoints):
        return FirewallState(), {}
    compiler = _Compiler(endpoints, policies, local_host, networks, broken_scopes, host, cluster_set, memberships)
    return compiler.compile(), compiler.notes
