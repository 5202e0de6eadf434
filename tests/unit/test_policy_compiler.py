"""The policy compiler, tested by behaviour: a small packet simulator walks the compiled rules.

The simulator parses the rendered rule text itself (independently of the compiler's internals),
evaluates matches against the compiled ipsets, and follows -j/-g/RETURN like the kernel, so the
tests say what traffic passes, not which strings were emitted. Any option the simulator does not
understand fails the test, so the compiler cannot emit something unchecked.
"""

from __future__ import annotations

import ipaddress
import random
import shlex
import socket
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence

from fakes import FakeIpsets, FakeIptables

from canal.dataplane.firewall import Firewall, FirewallState, Jump
from canal.dataplane.links import host_ifname
from canal.policy import selector as selectors
from canal.policy.compiler import (
    FORWARD,
    FROM_WL,
    INPUT,
    TO_WL,
    WL_TO_HOST,
    EndpointInfo,
    HostProtection,
    NetworkInfo,
    compile_filter,
    endpoint_chain,
    network_members_set,
    policy_chain,
    protocol_name,
    scoped_selector,
    selector_set,
)
from canal.policy.model import Policy, load_documents

HOST = "h1"
UNDERLAY = "flannel.1"
NETWORKS = {
    "appnet": NetworkInfo("appnet", False),
    "othernet": NetworkInfo("othernet", False),
    "secret": NetworkInfo("secret", True),
}


def ep(name: str, ip: str, network: str = "appnet", host: str = HOST, **labels: str) -> EndpointInfo:
    return EndpointInfo(id=(name * 64)[:64], ip=ip, network=network, host=host, labels=labels)


WEB = ep("a", "10.1.0.2", role="web")
DB = ep("b", "10.1.0.3", role="db")
PLAIN = ep("c", "10.1.0.4")
WEB2 = ep("d", "10.1.1.2", host="h2", role="web")  # remote, same network
OTHER = ep("e", "10.2.0.2", network="othernet", role="web")  # local, other network
OTHER2 = ep("f", "10.2.1.2", network="othernet", host="h2", role="web")
SECRET = ep("1", "10.3.0.2", network="secret", role="vault")
SECRET2 = ep("2", "10.3.1.2", network="secret", host="h2")
ALL = [WEB, DB, PLAIN, WEB2, OTHER, OTHER2, SECRET, SECRET2]


# --------------------------------------------------------------------------------------------------
# Packet simulator


@dataclass
class Packet:
    src: str
    dst: str
    iif: str
    oif: Optional[str]  # None: delivered to this host (INPUT)
    proto: int = 6
    sport: int = 40000
    dport: int = 80
    icmp_type: Optional[int] = None
    icmp_code: Optional[int] = None
    ctstate: str = "NEW"
    mark: int = 0
    logs: List[str] = field(default_factory=list)


def _proto_number(name: str) -> int:
    fixed = {"tcp": 6, "udp": 17, "icmp": 1, "sctp": 132, "udplite": 136}
    if name in fixed:
        return fixed[name]
    if name.isdigit():
        return int(name)
    return socket.getprotobyname(name)


def _iface_match(pattern: str, iface: Optional[str]) -> bool:
    if iface is None:
        return False
    if pattern.endswith("+"):
        return iface.startswith(pattern[:-1])
    return iface == pattern


def _ports_match(spec: str, port: int) -> bool:
    for item in spec.split(","):
        low, _, high = item.partition(":")
        if int(low) <= port <= int(high or low):
            return True
    return False


class Simulator:
    """Walks a FirewallState's filter table like netfilter; builtin chains fall through to DROP."""

    def __init__(self, state: FirewallState) -> None:
        self.chains = {chain: rules for (table, chain), rules in state.chains.items() if table == "filter"}
        self.sets = {s.name: s for s in state.ipsets}
        self.jumps = state.jumps

    def _in_set(self, name: str, address: str) -> bool:
        ipset = self.sets[name]  # KeyError: a rule references a set that is not programmed
        if ipset.kind == "hash:ip":
            return address in ipset.members
        assert ipset.kind == "hash:net"
        return any(ipaddress.ip_address(address) in ipaddress.ip_network(m) for m in ipset.members)

    def _matches(self, tokens: List[str], p: Packet) -> tuple:
        """(all matches true?, remaining tokens = the target part)."""
        i, ok = 0, True
        module = None
        while i < len(tokens):
            neg = tokens[i] == "!"
            if neg:
                i += 1
            tok = tokens[i]
            if tok in ("-j", "-g"):
                assert not neg
                return ok, tokens[i:]
            arg = tokens[i + 1]
            if tok == "-m":
                module = arg
                i += 2
                continue
            if tok == "-s":
                result = ipaddress.ip_address(p.src) in ipaddress.ip_network(arg)
            elif tok == "-d":
                result = ipaddress.ip_address(p.dst) in ipaddress.ip_network(arg)
            elif tok == "-i":
                result = _iface_match(arg, p.iif)
            elif tok == "-o":
                result = _iface_match(arg, p.oif)
            elif tok == "-p":
                result = p.proto == _proto_number(arg)
            elif tok == "--ctstate" and module == "conntrack":
                result = p.ctstate in arg.split(",")
            elif tok == "--match-set" and module == "set":
                direction = tokens[i + 2]
                result = self._in_set(arg, p.src if direction == "src" else p.dst)
                i += 1
            elif tok in ("--dports", "--sports") and module == "multiport":
                result = _ports_match(arg, p.dport if tok == "--dports" else p.sport)
            elif tok == "--icmp-type" and module == "icmp":
                want_type, _, want_code = arg.partition("/")
                result = p.icmp_type == int(want_type) and (not want_code or p.icmp_code == int(want_code))
            elif tok == "--mark" and module == "mark":
                value, mask = (int(x, 16) for x in arg.split("/"))
                result = p.mark & mask == value
            else:
                raise AssertionError(f"simulator does not understand {tok} in {' '.join(tokens)}")
            ok = ok and (result != neg)
            i += 2
        return ok, []

    def run(self, p: Packet, hook: str = "FORWARD") -> str:
        for jump in self.jumps:
            if jump.table != "filter" or jump.builtin != hook:
                continue
            verdict = self._walk(jump.chain, p)
            if verdict is not None:
                return verdict
        return "DROP"  # Docker sets FORWARD's policy to DROP; treat INPUT the same so tests are strict

    def _walk(self, start: str, p: Packet) -> Optional[str]:
        stack = [[start, 0]]
        steps = 0
        while stack:
            frame = stack[-1]
            chain, index = frame
            rules = self.chains[chain]
            if index >= len(rules):
                stack.pop()
                continue
            frame[1] += 1
            steps += 1
            assert steps < 10000, "rule loop"
            check_rule(rules[index])
            ok, target = self._matches(shlex.split(rules[index]), p)
            if not ok or not target:
                continue
            kind, name, *args = target
            if name in ("ACCEPT", "DROP"):
                return name
            if name == "RETURN":
                stack.pop()
            elif name == "MARK":
                assert args[0] == "--set-xmark"
                value, mask = (int(x, 16) for x in args[1].split("/"))
                p.mark = (p.mark & ~mask) ^ value
            elif name == "LOG":
                assert args[0] == "--log-prefix"
                p.logs.append(args[1])
            elif kind == "-g":
                stack[-1] = [name, 0]
            else:
                assert name in self.chains, f"jump to unknown chain {name}"
                stack.append([name, 0])
        return None


def check_rule(rule: str) -> None:
    """What iptables itself would refuse: port/icmp matches without their protocol, >15 port slots."""
    tokens = shlex.split(rule)
    protocol = tokens[tokens.index("-p") + 1] if "-p" in tokens and tokens[tokens.index("-p") - 1] != "!" else None
    if "multiport" in tokens:
        assert protocol in ("tcp", "udp", "sctp", "udplite"), rule
        for i, tok in enumerate(tokens):
            if tok in ("--dports", "--sports"):
                assert sum(2 if ":" in x else 1 for x in tokens[i + 1].split(",")) <= 15, rule
    if "icmp" in tokens[tokens.index("-m") + 1 :] if "-m" in tokens else False:
        assert protocol == "icmp", rule
    if "LOG" in tokens:
        assert len(tokens[tokens.index("--log-prefix") + 1]) <= 29, rule


def packet(src: EndpointInfo | str, dst: EndpointInfo | str, **kw) -> Packet:
    """A packet as this host sees it: local endpoints sit behind their veth, the rest behind flannel."""

    def side(x):
        if isinstance(x, EndpointInfo):
            return x.ip, (host_ifname(x.id) if x.host == HOST else UNDERLAY)
        return x, "eth0"

    src_ip, iif = side(src)
    dst_ip, oif = side(dst)
    kw.setdefault("iif", iif)
    kw.setdefault("oif", oif)
    return Packet(src_ip, dst_ip, **kw)


def verdict(state: FirewallState, src, dst, **kw) -> str:
    return Simulator(state).run(packet(src, dst, **kw))


def compile_(policies: Sequence[Policy] | str = (), endpoints=ALL, networks=NETWORKS,
             host: HostProtection = HostProtection()) -> FirewallState:
    if isinstance(policies, str):
        policies = load_documents(policies)
    return compile_filter(endpoints, policies, HOST, networks, host=host)


def gnp(name: str, spec: str, order: str = "") -> str:
    return f"apiVersion: canal/v1\nkind: GlobalNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n{_indent(spec, order)}"


def np_(name: str, network: str, spec: str, order: str = "") -> str:
    return (
        f"apiVersion: canal/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, network: {network}}}\n"
        f"spec:\n{_indent(spec, order)}"
    )


def _indent(spec: str, order: str) -> str:
    lines = ([f"order: {order}"] if order else []) + spec.strip("\n").splitlines()
    return "\n".join("  " + line for line in lines) + "\n"


def docs(*texts: str) -> str:
    return "---\n".join(texts)


# --------------------------------------------------------------------------------------------------
# Default profile


def test_same_network_allowed_cross_network_dropped():
    state = compile_()
    assert verdict(state, WEB, DB) == "ACCEPT"
    assert verdict(state, WEB2, DB) == "ACCEPT"  # remote, same network
    assert verdict(state, DB, WEB2) == "ACCEPT"  # leaves through the underlay
    assert verdict(state, OTHER, DB) == "DROP"
    assert verdict(state, OTHER2, DB) == "DROP"
    assert verdict(state, WEB, OTHER) == "DROP"
    assert verdict(state, "192.0.2.1", DB) == "DROP"  # outside world to a container


def test_egress_to_outside_allowed_and_replies_pass_conntrack():
    state = compile_()
    assert verdict(state, WEB, "8.8.8.8", dport=53, proto=17) == "ACCEPT"
    assert verdict(state, "8.8.8.8", WEB, ctstate="ESTABLISHED") == "ACCEPT"
    assert verdict(state, "8.8.8.8", WEB, ctstate="INVALID") == "DROP"
    assert verdict(state, WEB, DB, ctstate="INVALID") == "DROP"


def test_profile_set_really_holds_the_members():
    # libnetwork-plugin#190: Calico's profile selector produced an EMPTY set and dropped everything.
    state = compile_()
    sets = {s.name: s for s in state.ipsets}
    assert sets[network_members_set("appnet")].members == {"10.1.0.2", "10.1.0.3", "10.1.0.4", "10.1.1.2"}
    assert sets[network_members_set("othernet")].members == {"10.2.0.2", "10.2.1.2"}


def test_profile_includes_endpoints_whose_labels_are_unknown():
    unknown = replace(WEB2, labels=None)
    state = compile_(endpoints=[WEB, DB, unknown])
    assert verdict(state, unknown, DB) == "ACCEPT"


def test_unknown_workload_interface_fails_closed():
    state = compile_()
    assert verdict(state, "10.1.0.9", DB, iif="cnl999999999999") == "DROP"
    assert verdict(state, WEB, "10.1.0.9", oif="cnl999999999999") == "DROP"


def test_anti_spoofing():
    state = compile_()
    sim = Simulator(state)
    assert sim.run(replace(packet(WEB, DB), src=DB.ip)) == "DROP"
    assert sim.run(replace(packet(WEB, "8.8.8.8"), src="10.1.0.200")) == "DROP"
    assert sim.run(replace(packet(WEB, "10.1.0.1", oif=None), src="10.9.9.9"), hook="INPUT") == "DROP"
    assert sim.run(packet(WEB, "8.8.8.8")) == "ACCEPT"


def test_workload_to_host_is_dropped_by_default_after_egress_policy():
    state = compile_()
    sim = Simulator(state)
    # Felix's DefaultEndpointToHostAction: with no policy at all, a workload reaches no host port.
    assert sim.run(packet(WEB, "10.1.0.1", oif=None), hook="INPUT") == "DROP"
    # Host traffic that is not from a workload is none of our business: no verdict from our chain.
    assert sim._walk(INPUT, Packet("192.0.2.1", "192.0.2.2", iif="eth0", oif=None, ctstate="INVALID")) is None
    assert sim._walk(INPUT, Packet("192.0.2.1", "192.0.2.2", iif="eth0", oif=None)) is None
    # accept: the host is open to workloads their egress policy lets out...
    opened = HostProtection(workload_to_host="accept")
    assert Simulator(compile_(host=opened)).run(packet(WEB, "10.1.0.1", oif=None), hook="INPUT") == "ACCEPT"
    deny = gnp("no-host", "selector: role == 'web'\negress:\n  - action: Deny\n    destination: {nets: [10.1.0.1/32]}\n  - action: Allow")
    sim = Simulator(compile_(deny, host=opened))
    assert sim.run(packet(WEB, "10.1.0.1", oif=None), hook="INPUT") == "DROP"  # ...egress policy first
    assert sim.run(packet(DB, "10.1.0.1", oif=None), hook="INPUT") == "ACCEPT"
    # return: the host's own INPUT rules decide (our chain gives no verdict), egress policy first.
    returned = compile_(deny, host=HostProtection(workload_to_host="return"))
    assert Simulator(returned)._walk(INPUT, packet(DB, "10.1.0.1", oif=None)) is None
    assert Simulator(returned)._walk(INPUT, packet(WEB, "10.1.0.1", oif=None)) == "DROP"


def test_dns_to_the_hosts_own_resolver_stays_open():
    state = compile_(host=HostProtection(dns=("10.1.0.1",)))
    sim = Simulator(state)
    for proto in (6, 17):
        assert sim.run(packet(WEB, "10.1.0.1", oif=None, proto=proto, dport=53), hook="INPUT") == "ACCEPT"
    assert sim.run(packet(WEB, "10.1.0.1", oif=None, dport=22), hook="INPUT") == "DROP"
    assert sim.run(packet(WEB, "198.18.0.1", oif=None, proto=17, dport=53), hook="INPUT") == "DROP"


def test_the_datastore_is_closed_to_workloads_unless_a_policy_allows_it():
    guarded = HostProtection(workload_to_host="accept", datastore=(("198.18.0.254", 2379),))
    state = compile_(host=guarded)
    assert verdict(state, WEB, "198.18.0.254", dport=2379) == "DROP"  # through the host (FORWARD)
    assert Simulator(state).run(packet(WEB, "198.18.0.254", oif=None, dport=2379), hook="INPUT") == "DROP"
    assert verdict(state, WEB, "198.18.0.254", dport=80) == "ACCEPT"
    allow = gnp("etcd", "selector: role == 'web'\negress:\n  - action: Allow\n    protocol: TCP\n"
                        "    destination: {nets: [198.18.0.254/32], ports: [2379]}")
    state = compile_(allow, host=guarded)
    assert verdict(state, WEB, "198.18.0.254", dport=2379) == "ACCEPT"  # explicitly allowed
    assert verdict(state, DB, "198.18.0.254", dport=2379) == "DROP"


def test_internal_network_reaches_only_its_members():
    state = compile_()
    assert verdict(state, SECRET, SECRET2) == "ACCEPT"
    assert verdict(state, SECRET2, SECRET) == "ACCEPT"
    assert verdict(state, SECRET, "8.8.8.8") == "DROP"
    assert verdict(state, SECRET, DB) == "DROP"
    opened = Simulator(compile_(host=HostProtection(workload_to_host="accept")))
    assert opened.run(packet(SECRET, "10.3.0.1", oif=None), hook="INPUT") == "DROP"
    # Even a policy allowing everything does not open an internal network to the outside.
    open_all = compile_(gnp("allow-all", "egress:\n  - action: Allow"))
    assert verdict(open_all, SECRET, "8.8.8.8") == "DROP"
    assert verdict(open_all, SECRET, SECRET2) == "ACCEPT"


# --------------------------------------------------------------------------------------------------
# Policies


ALLOW_DB_FROM_WEB = """\
selector: role == 'db'
ingress:
  - action: Allow
    source: {selector: role == 'web'}
"""


def test_global_policy_allows_cross_network():
    state = compile_(gnp("db-from-web", ALLOW_DB_FROM_WEB))
    assert verdict(state, OTHER, DB) == "ACCEPT"  # other network, role=web
    assert verdict(state, OTHER2, DB) == "ACCEPT"
    assert verdict(state, WEB, DB) == "ACCEPT"
    assert verdict(state, PLAIN, DB) == "DROP"  # same network, but the policy now selects DB
    assert verdict(state, DB, WEB) == "ACCEPT"  # WEB is not selected: profile still applies


def test_network_policy_selectors_are_scoped_to_its_network():
    state = compile_(np_("db-from-web", "appnet", ALLOW_DB_FROM_WEB))
    assert verdict(state, WEB, DB) == "ACCEPT"
    assert verdict(state, WEB2, DB) == "ACCEPT"
    assert verdict(state, OTHER, DB) == "DROP"  # role=web, but in othernet
    assert verdict(state, PLAIN, DB) == "DROP"
    # ...and a NetworkPolicy of another network never selects appnet's endpoints.
    elsewhere = compile_(np_("db-from-web", "othernet", "selector: all()\ningress: []"))
    assert verdict(elsewhere, PLAIN, DB) == "ACCEPT"
    assert verdict(elsewhere, WEB, OTHER) == "DROP"  # cross network anyway
    assert verdict(elsewhere, OTHER2, OTHER) == "DROP"  # selected, default deny


def test_default_deny_once_selected_even_by_an_empty_policy():
    state = compile_(gnp("lock-db", "selector: role == 'db'\ntypes: [Ingress]"))
    assert verdict(state, WEB, DB) == "DROP"
    assert verdict(state, DB, WEB) == "ACCEPT"  # egress not covered by the policy's types


def test_egress_policy_default_deny():
    spec = """\
selector: role == 'web'
egress:
  - action: Allow
    protocol: TCP
    destination: {selector: role == 'db', ports: [5432]}
"""
    state = compile_(np_("web-out", "appnet", spec))
    assert load_documents(np_("web-out", "appnet", spec))[0].types == ("Egress",)
    assert verdict(state, WEB, DB, dport=5432) == "ACCEPT"
    assert verdict(state, WEB, DB, dport=80) == "DROP"
    assert verdict(state, WEB, "8.8.8.8", dport=5432) == "DROP"
    assert verdict(state, WEB, PLAIN) == "DROP"
    assert verdict(state, PLAIN, DB) == "ACCEPT"  # PLAIN is not selected
    assert verdict(state, WEB2, DB) == "ACCEPT"  # WEB2 is remote: its own host enforces its egress


def test_order_decides_between_deny_and_allow():
    deny_ssh = "selector: role == 'db'\ningress:\n  - action: Deny\n    protocol: TCP\n    destination: {ports: [22]}"
    allow_all = "selector: role == 'db'\ningress:\n  - action: Allow"
    state = compile_(docs(gnp("deny-ssh", deny_ssh, "10"), gnp("allow-all", allow_all, "20")))
    assert verdict(state, WEB, DB, dport=22) == "DROP"
    assert verdict(state, WEB, DB, dport=80) == "ACCEPT"
    assert verdict(state, OTHER, DB, dport=80) == "ACCEPT"
    swapped = compile_(docs(gnp("deny-ssh", deny_ssh, "30"), gnp("allow-all", allow_all, "20")))
    assert verdict(swapped, WEB, DB, dport=22) == "ACCEPT"
    # No order = +inf: after any ordered policy; equal order: by name.
    unordered = compile_(docs(gnp("deny-ssh", deny_ssh), gnp("allow-all", allow_all, "1000000000")))
    assert verdict(unordered, WEB, DB, dport=22) == "ACCEPT"
    tie = compile_(docs(gnp("b-allow", allow_all, "5"), gnp("a-deny", deny_ssh, "5")))
    assert verdict(tie, WEB, DB, dport=22) == "DROP"


def test_pass_skips_remaining_policies_and_goes_to_profile():
    pass_same = "selector: role == 'db'\ningress:\n  - action: Pass\n    source: {selector: canal.network == 'appnet'}"
    deny_all = "selector: role == 'db'\ningress:\n  - action: Deny"
    allow_all = "selector: role == 'db'\ningress:\n  - action: Allow"
    state = compile_(docs(gnp("pass", pass_same, "1"), gnp("deny", deny_all, "2")))
    assert verdict(state, WEB, DB) == "ACCEPT"  # passed: profile allows the same network
    assert verdict(state, OTHER, DB) == "DROP"  # not passed: the Deny policy
    state = compile_(docs(gnp("pass", pass_same, "1"), gnp("allow", allow_all, "2")))
    assert verdict(state, OTHER, DB) == "ACCEPT"  # not passed: allowed by the second policy
    # Pass from the other network: skips the allow, and the profile refuses cross-network traffic.
    pass_other = "selector: role == 'db'\ningress:\n  - action: Pass\n    source: {selector: canal.network == 'othernet'}"
    state = compile_(docs(gnp("pass", pass_other, "1"), gnp("allow", allow_all, "2")))
    assert verdict(state, OTHER, DB) == "DROP"
    assert verdict(state, WEB, DB) == "ACCEPT"


def test_pass_in_the_last_policy_reaches_the_profile_not_the_default_deny():
    state = compile_(gnp("pass", "selector: role == 'db'\ningress:\n  - action: Pass"))
    assert verdict(state, WEB, DB) == "ACCEPT"
    assert verdict(state, OTHER, DB) == "DROP"


def test_allow_is_final_and_deny_is_final():
    spec = "selector: role == 'db'\ningress:\n  - action: Allow\n    source: {selector: role == 'web'}\n  - action: Deny\n  - action: Allow"
    state = compile_(gnp("p", spec))
    assert verdict(state, WEB, DB) == "ACCEPT"
    assert verdict(state, PLAIN, DB) == "DROP"


def test_log_continues():
    spec = "selector: role == 'db'\ningress:\n  - action: Log\n    protocol: TCP\n  - action: Allow\n    protocol: TCP"
    state = compile_(np_("audit-db", "appnet", spec))
    p = packet(WEB, DB)
    assert Simulator(state).run(p) == "ACCEPT"
    assert p.logs == ["canal audit-db "]
    p = packet(WEB, DB, proto=17)
    assert Simulator(state).run(p) == "DROP" and p.logs == []


def test_ports_ranges_and_not_ports():
    spec = """\
selector: role == 'db'
ingress:
  - action: Allow
    protocol: TCP
    destination: {ports: [80, "8000:8080"], notPorts: [8001]}
  - action: Allow
    protocol: UDP
    source: {ports: [53]}
"""
    state = compile_(gnp("ports", spec))
    assert verdict(state, WEB, DB, dport=80) == "ACCEPT"
    assert verdict(state, WEB, DB, dport=8000) == "ACCEPT"
    assert verdict(state, WEB, DB, dport=8080) == "ACCEPT"
    assert verdict(state, WEB, DB, dport=8001) == "DROP"
    assert verdict(state, WEB, DB, dport=8081) == "DROP"
    assert verdict(state, WEB, DB, dport=81) == "DROP"
    assert verdict(state, WEB, DB, proto=17, dport=80) == "DROP"  # UDP
    assert verdict(state, WEB, DB, proto=17, sport=53, dport=9999) == "ACCEPT"
    assert verdict(state, WEB, DB, proto=17, sport=54, dport=9999) == "DROP"


def test_many_ports_are_split_into_multiport_groups():
    ports = list(range(1000, 1040, 2)) + ["2000:2010", "3000:3010", "5000:5001"] * 3
    spec = f"selector: role == 'db'\ningress:\n  - action: Allow\n    protocol: TCP\n    destination: {{ports: {ports}}}"
    state = compile_(gnp("many", spec))
    for port in (1000, 1038, 2005, 3010, 5001):
        assert verdict(state, WEB, DB, dport=port) == "ACCEPT", port
    for port in (1001, 1040, 2011, 4000):
        assert verdict(state, WEB, DB, dport=port) == "DROP", port
    chain = state.chains[("filter", policy_chain(load_documents(gnp("many", "selector: all()"))[0], "Ingress"))]
    assert len([r for r in chain if "--dports" in r]) == 2  # 20 singles + 3 merged ranges = 26 slots


def test_not_ports_groups_are_all_applied():
    not_ports = list(range(100, 140))
    spec = f"selector: role == 'db'\ningress:\n  - action: Allow\n    protocol: TCP\n    destination: {{notPorts: {not_ports}}}"
    state = compile_(gnp("np", spec))
    assert verdict(state, WEB, DB, dport=139) == "DROP"
    assert verdict(state, WEB, DB, dport=100) == "DROP"
    assert verdict(state, WEB, DB, dport=140) == "ACCEPT"


def test_nets_and_not_nets():
    spec = """\
selector: role == 'db'
ingress:
  - action: Allow
    source: {nets: [192.0.2.0/24], notNets: [192.0.2.128/25]}
  - action: Allow
    source: {nets: [198.51.100.0/24, 203.0.113.7/32]}
  - action: Allow
    source: {notNets: [10.0.0.0/8, 172.16.0.0/12, 192.0.0.0/3]}
"""
    state = compile_(gnp("nets", spec))
    assert verdict(state, "192.0.2.1", DB) == "ACCEPT"
    assert verdict(state, "192.0.2.200", DB) == "DROP"
    assert verdict(state, "198.51.100.9", DB) == "ACCEPT"
    assert verdict(state, "203.0.113.7", DB) == "ACCEPT"
    assert verdict(state, "203.0.113.8", DB) == "DROP"
    assert verdict(state, "100.64.0.1", DB) == "ACCEPT"  # in none of the notNets
    assert verdict(state, WEB, DB) == "DROP"  # 10.0.0.0/8
    kinds = {s.kind for s in state.ipsets if s.name.startswith("canal-cidr-")}
    assert kinds == {"hash:net"}


def test_all_addresses_in_nets_and_not_nets():
    spec = """\
selector: role == 'db'
ingress:
  - action: Deny
    source: {notNets: [0.0.0.0/0]}
  - action: Allow
    source: {nets: [0.0.0.0/0, 10.0.0.0/8]}
"""
    state = compile_(gnp("zero", spec))
    assert verdict(state, "192.0.2.1", DB) == "ACCEPT"  # the never-matching Deny is left out


def test_destination_nets_on_egress():
    spec = "selector: role == 'web'\negress:\n  - action: Allow\n    destination: {nets: [8.8.8.8/32]}"
    state = compile_(gnp("dns-only", spec))
    assert verdict(state, WEB, "8.8.8.8") == "ACCEPT"
    assert verdict(state, WEB, "8.8.4.4") == "DROP"


def test_not_protocol():
    spec = "selector: role == 'db'\ningress:\n  - action: Deny\n    notProtocol: TCP\n  - action: Allow"
    state = compile_(gnp("tcp-only", spec))
    assert verdict(state, WEB, DB, proto=6) == "ACCEPT"
    assert verdict(state, WEB, DB, proto=17) == "DROP"
    assert verdict(state, WEB, DB, proto=1, icmp_type=8, icmp_code=0) == "DROP"


def test_protocol_and_same_not_protocol_never_matches():
    spec = "selector: role == 'db'\ningress:\n  - action: Allow\n    protocol: TCP\n    notProtocol: 6\n  - action: Allow\n    protocol: 47"
    state = compile_(gnp("odd", spec))
    assert verdict(state, WEB, DB, proto=6) == "DROP"
    assert verdict(state, WEB, DB, proto=47) == "ACCEPT"


def test_icmp_type_and_code():
    spec = """\
selector: role == 'db'
ingress:
  - action: Allow
    protocol: ICMP
    icmp: {type: 8, code: 0}
  - action: Allow
    protocol: ICMP
    icmp: {type: 3}
    notICMP: {type: 3, code: 4}
"""
    state = compile_(gnp("ping", spec))
    assert verdict(state, OTHER, DB, proto=1, icmp_type=8, icmp_code=0) == "ACCEPT"
    assert verdict(state, OTHER, DB, proto=1, icmp_type=8, icmp_code=1) == "DROP"
    assert verdict(state, OTHER, DB, proto=1, icmp_type=13, icmp_code=0) == "DROP"
    assert verdict(state, OTHER, DB, proto=1, icmp_type=3, icmp_code=1) == "ACCEPT"
    assert verdict(state, OTHER, DB, proto=1, icmp_type=3, icmp_code=4) == "DROP"
    assert verdict(state, OTHER, DB, proto=6) == "DROP"


def test_not_selector():
    spec = "selector: role == 'db'\ningress:\n  - action: Allow\n    source: {notSelector: role == 'web'}"
    state = compile_(np_("not-web", "appnet", spec))
    assert verdict(state, PLAIN, DB) == "ACCEPT"
    assert verdict(state, WEB, DB) == "DROP"
    # Scoped to appnet: othernet's web is not "role == 'web' in appnet", so notSelector matches it;
    # the profile does not get a say because the Allow is final.
    assert verdict(state, OTHER, DB) == "ACCEPT"


def test_destination_selector_on_ingress_limits_which_local_endpoint():
    spec = "selector: all()\ningress:\n  - action: Allow\n    destination: {selector: role == 'db'}"
    state = compile_(np_("to-db", "appnet", spec))
    assert verdict(state, WEB, DB) == "ACCEPT"
    assert verdict(state, DB, WEB) == "DROP"


# --------------------------------------------------------------------------------------------------
# Labels not known yet: fail closed


def test_unknown_labels_fail_closed_always():
    """Not only when a policy could apply: any policy's Deny may name it as a source."""
    blind = replace(DB, labels=None)
    endpoints = [WEB, blind, PLAIN, OTHER]
    allow_everything = gnp("allow-all", "ingress:\n  - action: Allow\negress:\n  - action: Allow")
    for policies in (allow_everything, gnp("i", "selector: role == 'nothing'"), np_("x", "othernet", "selector: all()"), ()):
        state = compile_(policies, endpoints=endpoints)
        assert verdict(state, WEB, blind) == "DROP"
        assert verdict(state, blind, WEB) == "DROP"
        assert verdict(state, blind, "8.8.8.8") == "DROP"
        assert verdict(state, WEB, PLAIN) == "ACCEPT"  # positive control: known endpoints talk
    # Once known, the same endpoint talks.
    assert verdict(compile_(endpoints=[WEB, DB, PLAIN, OTHER]), WEB, DB) == "ACCEPT"


def test_unknown_labels_are_in_no_selector_set():
    blind = replace(WEB2, labels=None)
    state = compile_(gnp("db-from-web", ALLOW_DB_FROM_WEB), endpoints=[WEB, DB, blind])
    name = selector_set(scoped_selector("role == 'web'", None))
    members = {s.name: s.members for s in state.ipsets}[name]
    assert members == {WEB.ip}
    assert verdict(state, blind, DB) == "DROP"


def test_builtin_network_label_wins_over_a_container_label():
    liar = ep("9", "10.2.0.9", network="othernet", **{"canal.network": "appnet"})
    spec = "selector: role == 'db'\ningress:\n  - action: Allow\n    source: {selector: canal.network == 'appnet'}"
    state = compile_(gnp("from-appnet", spec), endpoints=[DB, liar])
    assert verdict(state, liar, DB) == "DROP"


# --------------------------------------------------------------------------------------------------
# Structure


def _rule_count(state: FirewallState) -> int:
    return sum(len(rules) for rules in state.chains.values())


POLICY_SET = docs(
    gnp("db-from-web", ALLOW_DB_FROM_WEB, "10"),
    np_("web-out", "appnet", "selector: role == 'web'\negress:\n  - action: Allow\n    destination: {selector: \"role in {'db', 'cache'}\"}"),
    gnp("ops", "selector: all()\ningress:\n  - action: Log\n    source: {nets: [10.0.0.0/8, 192.168.0.0/16]}\n  - action: Pass", "5"),
)


def _remote(count: int) -> List[EndpointInfo]:
    out = []
    for i in range(count):
        network = ("appnet", "othernet", "secret")[i % 3]
        role = ("web", "db", "cache", "batch")[i % 4]
        ip = str(ipaddress.ip_address("10.100.0.0") + i)
        out.append(EndpointInfo(f"{i:064x}", ip, network, f"h{i % 50 + 2}", {"role": role} if i % 7 else None))
    return out


def test_rule_count_does_not_grow_with_remote_endpoints():
    local = [WEB, DB, PLAIN, OTHER, SECRET]
    small = compile_(POLICY_SET, endpoints=local + _remote(10))
    large = compile_(POLICY_SET, endpoints=local + _remote(5000))
    assert _rule_count(small) == _rule_count(large)
    assert small.chains == large.chains  # identical rules; only set members differ
    assert [s.name for s in small.ipsets] == [s.name for s in large.ipsets]
    assert sum(len(s.members) for s in large.ipsets) > 5000


def test_deterministic_output():
    endpoints = [WEB, DB, PLAIN, OTHER, SECRET] + _remote(300)
    policies = load_documents(POLICY_SET)
    first = compile_filter(endpoints, policies, HOST, NETWORKS)
    shuffled_eps, shuffled_pols = endpoints[:], policies[:]
    random.Random(7).shuffle(shuffled_eps)
    random.Random(7).shuffle(shuffled_pols)
    second = compile_filter(shuffled_eps, shuffled_pols, HOST, dict(reversed(list(NETWORKS.items()))))
    assert first == second
    assert list(first.chains) == list(second.chains)
    assert [s.name for s in first.ipsets] == sorted(s.name for s in first.ipsets)


def test_name_lengths():
    long_name = "p" + "-x" * 126  # 253 characters
    long_net = "n" * 200
    endpoints = ALL + [ep("7", "10.7.0.2", network=long_net, role="db")]
    networks = {**NETWORKS, long_net: NetworkInfo(long_net)}
    spec = "selector: role == 'db'\ningress:\n  - action: Log\n    source: {selector: role == 'web', nets: [1.0.0.0/8, 2.0.0.0/8]}\negress:\n  - action: Allow"
    state = compile_(docs(np_(long_name, long_net, spec), gnp(long_name, spec)), endpoints, networks)
    assert state.chains
    for _, chain in state.chains:
        assert len(chain) <= 28 and chain.startswith("CANAL-"), chain
    for ipset in state.ipsets:
        assert len(ipset.name) <= 31 and ipset.name.startswith("canal-"), ipset.name
    logs = [r for rules in state.chains.values() for r in rules if "--log-prefix" in r]
    assert logs and all(len(shlex.split(r)[-1]) <= 29 for r in logs)
    # NetworkPolicy and GlobalNetworkPolicy of the same name get different chains.
    assert len({c for _, c in state.chains if c.startswith("CANAL-PI-")}) == 2


def test_equal_selectors_share_one_ipset():
    a = np_("a", "appnet", "selector: role == 'db'\ningress:\n  - action: Allow\n    source: {selector: role == 'web'}")
    b = gnp("b", 'selector: role == "db"\ningress:\n  - action: Allow\n    source: {selector: "(role==\\"web\\") && canal.network == \'appnet\'"}')
    state = compile_(docs(a, b))
    sel = [s for s in state.ipsets if s.name.startswith("canal-sel-")]
    assert len(sel) == 1 and sel[0].members == {WEB.ip, WEB2.ip}


def test_only_policies_selecting_local_endpoints_are_rendered():
    unused = np_("far", "appnet", "selector: role == 'nowhere'\ningress:\n  - action: Allow\n    source: {selector: role == 'x'}")
    state = compile_(unused)
    assert not [c for _, c in state.chains if c.startswith("CANAL-P")]
    assert not [s for s in state.ipsets if s.name.startswith("canal-sel-")]


def test_layout_of_shared_chains():
    state = compile_()
    chains = {c: r for (_, c), r in state.chains.items()}
    assert state.jumps == [
        Jump("filter", "FORWARD", FORWARD, after=frozenset({"-j DOCKER-USER"})),
        Jump("filter", "INPUT", INPUT, match="-i cnl+"),
    ]
    # Every rule scoped to Canal's interfaces.
    assert chains[FORWARD] == [
        "-i cnl+ -m conntrack --ctstate ESTABLISHED -j ACCEPT",
        "-o cnl+ -m conntrack --ctstate ESTABLISHED -j ACCEPT",
        "-i cnl+ -m conntrack --ctstate INVALID -j DROP",
        "-o cnl+ -m conntrack --ctstate INVALID -j DROP",
        "! -i cnl+ -o cnl+ -m conntrack --ctstate RELATED -j ACCEPT",
        f"-i cnl+ -j {FROM_WL}",
        f"-o cnl+ -j {TO_WL}",
        "-i cnl+ -j ACCEPT",
        "-o cnl+ -j ACCEPT",
    ]
    assert chains[INPUT] == [
        "-i cnl+ -m conntrack --ctstate INVALID -j DROP",
        "-i cnl+ -m conntrack --ctstate ESTABLISHED -j ACCEPT",
        f"-i cnl+ -g {WL_TO_HOST}",
    ]
    assert chains[WL_TO_HOST] == [f"-j {FROM_WL}", "-j DROP"]
    local = sorted([WEB, DB, PLAIN, OTHER, SECRET], key=lambda e: host_ifname(e.id))
    assert chains[FROM_WL] == [f"-i {host_ifname(e.id)} -g {endpoint_chain(e.id, 'Egress')}" for e in local] + ["-j DROP"]
    assert chains[TO_WL] == [f"-o {host_ifname(e.id)} -g {endpoint_chain(e.id, 'Ingress')}" for e in local] + ["-j DROP"]


def test_sample_layout_for_one_endpoint_and_one_policy():
    state = compile_(
        np_("db-from-web", "appnet", ALLOW_DB_FROM_WEB.replace("Allow\n", "Allow\n    protocol: TCP\n    destination: {ports: [5432]}\n"), "100"),
        endpoints=[DB, WEB2],
    )
    policy = load_documents(np_("db-from-web", "appnet", "selector: all()"))[0]
    pi = policy_chain(policy, "Ingress")
    net = network_members_set("appnet")
    web = selector_set(selectors.parse("role == 'web' && canal.network == 'appnet'"))
    chains = {c: r for (_, c), r in state.chains.items()}
    assert chains[endpoint_chain(DB.id, "Egress")] == [
        "-j MARK --set-xmark 0x0/0x30000",
        f"! -s {DB.ip}/32 -j DROP",
        "-j RETURN",
    ]
    assert chains[endpoint_chain(DB.id, "Ingress")] == [
        "-j MARK --set-xmark 0x0/0x30000",
        f"-j {pi}",
        "-m mark --mark 0x10000/0x10000 -j RETURN",
        "-j DROP",
        f"-m set --match-set {net} src -j RETURN",
        "-j DROP",
    ]
    assert chains[pi] == [
        f"-p tcp -m set --match-set {web} src -m multiport --dports 5432 -j MARK --set-xmark 0x10000/0x10000",
        "-m mark --mark 0x10000/0x10000 -j RETURN",
    ]
    assert {s.name: s.members for s in state.ipsets} == {net: {DB.ip, WEB2.ip}, web: {WEB2.ip}}


def test_pass_marks_guard_later_policies():
    state = compile_(docs(gnp("a", "selector: role == 'db'\ningress:\n  - action: Pass", "1"), gnp("b", "selector: role == 'db'", "2")))
    rules = state.chains[("filter", endpoint_chain(DB.id, "Ingress"))]
    assert rules[3].startswith("-m mark --mark 0x0/0x20000 -j CANAL-PI-")
    assert rules[5] == "-m mark --mark 0x0/0x20000 -j DROP"


def test_protocol_numbers_render_as_iptables_save_prints_them():
    # iptables-save names protocols through getprotobynumber (/etc/protocols), else its own table.
    assert protocol_name(6) == "tcp" and protocol_name(136) == "udplite"
    assert protocol_name(255) == "255"
    try:
        expected = "gre" if socket.getprotobyname("gre") == 47 else "47"
    except OSError:
        expected = "47"
    assert protocol_name(47) == expected


def test_no_networks_and_no_local_endpoints_leaves_no_trace():
    assert compile_filter([WEB2], [], HOST, {}) == FirewallState()
    assert compile_filter([], load_documents(POLICY_SET), HOST, {}) == FirewallState()


def test_applier_is_a_no_op_on_the_second_apply():
    ipt = FakeIptables()
    fw = Firewall(ipt, FakeIpsets(ipt))
    state = compile_(POLICY_SET)
    assert fw.apply(state) is True
    assert fw.apply(compile_(POLICY_SET)) is False
    saved = ipt.save()["filter"]
    assert saved.rules["FORWARD"] == [f"-j {FORWARD}"] and saved.rules["INPUT"] == [f"-i cnl+ -j {INPUT}"]
    fw.apply(FirewallState())  # nothing of ours left on the host
    assert not any(c.startswith("CANAL-") for c in ipt.save()["filter"].chains)
    assert fw.ipsets.current() == {}


def test_every_rendered_rule_is_understood_by_the_simulator():
    state = compile_(POLICY_SET + "---\n" + gnp("misc", """\
selector: all()
ingress:
  - action: Allow
    protocol: ICMP
    icmp: {type: 8}
  - action: Deny
    notProtocol: 47
    source: {notNets: [10.0.0.0/8], notSelector: has(x), notPorts: []}
egress:
  - action: Allow
    protocol: SCTP
    source: {ports: [1, "2:3"]}
    destination: {notPorts: ["4:5"], nets: [1.2.3.4/32], notNets: [1.2.3.5]}
""", "1"))
    sim = Simulator(state)
    probe = Packet("10.1.0.2", "10.1.0.3", iif="x", oif="y", proto=1, icmp_type=0, icmp_code=0)
    for rules in state.chains.values():
        for rule in rules:
            check_rule(rule)
            sim._matches(shlex.split(rule), probe)  # raises on any option it does not know


def test_related_packets_from_workloads_go_through_policy():
    """An ICMP error is RELATED to the flow it quotes: any workload can send one, unspoofed,
    into a neighbour's flow or the host's. Only ESTABLISHED skips policy."""
    deny_b = gnp("db-only-web", "selector: role == 'db'\ningress:\n  - action: Allow\n    source: {selector: role == 'web'}")
    state = compile_(deny_b)
    error = dict(proto=1, icmp_type=3, icmp_code=3, ctstate="RELATED")
    assert verdict(state, PLAIN, DB, **error) == "DROP"  # PLAIN may not send to DB: nor errors
    assert verdict(state, WEB, DB, **error) == "ACCEPT"  # WEB may
    assert verdict(state, PLAIN, DB, ctstate="ESTABLISHED") == "ACCEPT"  # replies skip policy
    # Into the host's flows: through the workload-to-host path (default drop).
    assert Simulator(state).run(packet(PLAIN, "10.1.0.1", oif=None, **error), hook="INPUT") == "DROP"
    # From a router outside: accepted (path MTU discovery keeps working).
    assert verdict(state, "192.0.2.1", DB, **error) == "ACCEPT"


def test_related_packets_from_the_cluster_networks_go_through_policy():
    from canal.dataplane.ipset import IpSet

    deny_b = gnp("db-only-web", "selector: role == 'db'\ningress:\n  - action: Allow\n    source: {selector: role == 'web'}")
    remote_batch = ep("g", "10.1.1.9", host="h2", role="batch")
    state = compile_filter(ALL + [remote_batch], load_documents(deny_b), HOST, NETWORKS, cluster_set="canal-nets")
    state.ipsets.append(IpSet("canal-nets", "hash:net", frozenset({"10.0.0.0/8"})))
    error = dict(proto=1, icmp_type=3, icmp_code=3, ctstate="RELATED")
    assert verdict(state, WEB2, DB, **error) == "ACCEPT"  # a remote web may
    assert verdict(state, remote_batch, DB, **error) == "DROP"  # a remote batch may not
    assert verdict(state, "192.0.2.1", DB, **error) == "ACCEPT"  # a router outside may
    # Positive control: without the cluster set, errors from other hosts' workloads skip policy.
    loose = compile_(deny_b, endpoints=ALL + [remote_batch])
    assert verdict(loose, remote_batch, DB, **error) == "ACCEPT"
