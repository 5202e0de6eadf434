"""explain / dry-run / stats: the iptables-rule evaluator walking the compiled chains, checked
against an independent reading of the policy model (Calico's semantics) over many random and
adversarial cases, plus the counters mapping and the evaluator's refusal of unknown rules."""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from typing import Optional

import pytest

from canal.agent import explain as ex
from canal.agent.desired import Snapshot, network_name
from canal.errors import BadRequest, NotFound
from canal.policy import selector as selectors
from canal.policy.compiler import effective_labels, endpoint_chain, scoped_selector
from canal.policy.evaluate import EvaluationError, Packet, walk
from canal.policy.model import EGRESS, GLOBAL, INGRESS, NETWORK, PROTOCOLS, EntityRule, IcmpMatch, Policy, Rule
from canal.records import EndpointRecord, NetworkRecord, PortBinding

A = ipaddress.IPv4Address
CLUSTER = "100.64.0.0/16"
EXTERNAL = ["198.18.5.5", "10.1.2.3"]
NETS = {"a": "front", "b": "back", "c": "vault"}
SELECTORS = ["all()", "role == 'db'", "role == 'web'", "has(tier)", "role in {'web', 'batch'}", "!has(role)",
             "canal.network == 'front'", "tier != 'gold'"]
PORTS = [80, 443, 5432, 8080, 9000, 40000]


def network(i: str, host: str, internal: bool = False) -> NetworkRecord:
    return NetworkRecord(id=i * 64, host=host, pools=("0.0.0.0/0",), name=NETS[i], internal=internal)


def endpoint(n: int, i: str, host: str, labels, name: str, ports=()) -> EndpointRecord:
    return EndpointRecord(
        id=f"{n:02x}" * 32, network=i * 64, host=host, ip=A(f"100.64.{1 if host == 'h1' else 2}.{n}"),
        mac="02:42:64:40:01:01", mtu=1450, joined=True, labels=labels, container=f"c{n:02x}" * 21 + "c",
        container_name=name, ports=tuple(ports),
    )


def snapshot(endpoints, policies=(), internal=False) -> Snapshot:
    nets = [network(i, h, internal and i == "c") for i in NETS for h in ("h1", "h2")]
    return Snapshot("h1", CLUSTER, {f"{n.host}/{n.id}": n for n in nets}, {e.id: e for e in endpoints},
                    policies=tuple(sorted(policies, key=lambda p: p.sort_key)))


# --------------------------------------------------------------------------------------------------
# The oracle: the policy model read directly, Calico's semantics, no iptables.


def _labels_of(snap: Snapshot, address: str):
    for ep in snap.endpoints.values():
        if ep.ip_text == address:
            return ep, ex.Cluster(snap).party(ep).network
    return None, None


def _entity_matches(snap, policy: Policy, entity: EntityRule, address: str, port: Optional[int]) -> bool:
    ip = A(address)
    if entity.nets and not any(ip in ipaddress.IPv4Network(n) for n in entity.nets):
        return False
    if any(ip in ipaddress.IPv4Network(n) for n in entity.not_nets):
        return False
    ep, _ = _labels_of(snap, address)
    labels = None
    if ep is not None:
        labels = effective_labels(ex.Cluster(snap).party(ep) and _info(snap, ep))
    scope = None if policy.kind == GLOBAL else policy.network
    if entity.selector is not None and not (labels is not None and scoped_selector(entity.selector, scope).matches(labels)):
        return False
    if entity.not_selector is not None and labels is not None and scoped_selector(entity.not_selector, scope).matches(labels):
        return False
    if entity.ports and not (port is not None and any(a <= port <= b for a, b in entity.ports)):
        return False
    if entity.not_ports and port is not None and any(a <= port <= b for a, b in entity.not_ports):
        return False
    if entity.not_ports and port is None:
        return False  # `! --dports` needs a port protocol (the model only allows ports with one)
    return True


def _info(snap, ep):
    from canal.agent.desired import _info as info_of, _naming
    return info_of(ep, *_naming(snap, ep))


def _rule_matches(snap, policy: Policy, rule: Rule, pkt: Packet) -> bool:
    def number(p):
        return p if isinstance(p, int) else PROTOCOLS[p]
    if rule.protocol is not None and number(rule.protocol) != pkt.protocol:
        return False
    if rule.not_protocol is not None and number(rule.not_protocol) == pkt.protocol:
        return False
    for match, want in ((rule.icmp, True), (rule.not_icmp, False)):
        if match is not None:
            hit = pkt.icmp_type == match.type and (match.code is None or match.code == pkt.icmp_code)
            if hit != want:
                return False
    return (_entity_matches(snap, policy, rule.source, pkt.src, pkt.sport if pkt.dport is not None else None)
            and _entity_matches(snap, policy, rule.destination, pkt.dst, pkt.dport))


def oracle(snap: Snapshot, ep: EndpointRecord, direction: str, pkt: Packet):
    """(allow?, reason, policy key, rule index) for one endpoint and direction."""
    info = _info(snap, ep)
    labels = effective_labels(info)
    if direction == EGRESS:
        net = next(n for n in snap.networks.values() if n.id == ep.network and n.host == ep.host)
        if net.internal:
            members = {e.ip_text for e in snap.endpoints.values() if network_name(snap, e) == info.network}
            if pkt.dst not in members:
                return False, "internal-fence", None, None
    if labels is None:
        return False, "labels-pending", None, None
    applied = [p for p in snap.policies if direction in p.types and (p.kind == GLOBAL or p.network == info.network)
               and selectors.parse(p.selector).matches(labels)]
    passed = False
    for policy in applied:
        for index, rule in enumerate(policy.rules(direction)):
            if not _rule_matches(snap, policy, rule, pkt):
                continue
            if rule.action == "Allow":
                return True, "rule", policy.key, index
            if rule.action == "Deny":
                return False, "rule", policy.key, index
            if rule.action == "Pass":
                passed = True
                break
        if passed:
            break
    if applied and not passed:
        return False, "default-deny", None, None
    if direction == EGRESS:
        return True, "profile-egress", None, None
    members = {e.ip_text for e in snap.endpoints.values() if network_name(snap, e) == info.network}
    if pkt.src in members:
        return True, "profile-network", None, None
    proto = {6: "tcp", 17: "udp"}.get(pkt.protocol)
    if "DNAT" in pkt.ctstate and any(b.proto == proto and b.port == pkt.dport for b in ep.ports):
        return True, "profile-published", None, None
    return False, "profile-deny", None, None


# --------------------------------------------------------------------------------------------------
# Random cases


def random_entity(rng: random.Random, ports_ok: bool) -> EntityRule:
    kw: dict = {}
    if rng.random() < 0.25:
        kw["nets"] = tuple(rng.sample(["100.64.1.0/24", "100.64.2.0/25", "10.0.0.0/8", "0.0.0.0/0", "100.64.1.3/32"],
                                      rng.randint(1, 2)))
    if rng.random() < 0.15:
        kw["not_nets"] = (rng.choice(["100.64.2.0/24", "198.18.0.0/15", "100.64.1.1/32"]),)
    if rng.random() < 0.4:
        kw["selector"] = rng.choice(SELECTORS)
    if rng.random() < 0.15:
        kw["not_selector"] = rng.choice(SELECTORS)
    if ports_ok and rng.random() < 0.5:
        kw["ports"] = tuple(sorted({(p, p) for p in rng.sample(PORTS, rng.randint(1, 3))} | (
            {(8000, 8100)} if rng.random() < 0.3 else set())))
    if ports_ok and rng.random() < 0.15:
        kw["not_ports"] = ((rng.choice(PORTS),) * 2,)
    return EntityRule(**kw)


def random_rule(rng: random.Random) -> Rule:
    action = rng.choice(["Allow", "Allow", "Deny", "Pass", "Log"])
    protocol = rng.choice([None, None, "TCP", "UDP", "ICMP", 6])
    not_protocol = rng.choice([None, None, None, "UDP", "TCP"]) if protocol is None or rng.random() < 0.1 else None
    ports_ok = protocol in ("TCP", "UDP", 6)
    icmp = not_icmp = None
    if protocol == "ICMP" and rng.random() < 0.5:
        icmp = IcmpMatch(rng.choice([8, 0]), rng.choice([None, 0, 1]))
    if protocol == "ICMP" and rng.random() < 0.2:
        not_icmp = IcmpMatch(3)
    return Rule(action, protocol, not_protocol, icmp, not_icmp, random_entity(rng, ports_ok and rng.random() < 0.3),
                random_entity(rng, ports_ok))


def random_policy(rng: random.Random, i: int) -> Policy:
    kind = rng.choice([NETWORK, NETWORK, GLOBAL])
    types = rng.choice([(INGRESS,), (EGRESS,), (INGRESS, EGRESS)])
    return Policy(
        kind, f"p{i}", rng.choice(list(NETS.values())) if kind == NETWORK else None,
        rng.choice([None, 1.0, 10.0, 10.0, 50.0]), rng.choice(SELECTORS), types,
        tuple(random_rule(rng) for _ in range(rng.randint(0, 4))) if INGRESS in types else (),
        tuple(random_rule(rng) for _ in range(rng.randint(0, 4))) if EGRESS in types else (),
    )


def random_snapshot(rng: random.Random) -> Snapshot:
    endpoints = []
    for n in range(1, rng.randint(3, 8)):
        labels = rng.choice([None, {}, {"role": "db"}, {"role": "web", "tier": "gold"}, {"role": "batch"},
                             {"tier": "silver"}, {"canal.network": "front"}])  # last: a forged built-in
        ports = [PortBinding("tcp", 80, 8080)] if rng.random() < 0.3 else []
        endpoints.append(endpoint(n, rng.choice(list(NETS)), rng.choice(["h1", "h2"]), labels, f"e{n}", ports))
    policies = [random_policy(rng, i) for i in range(rng.randint(0, 5))]
    return snapshot(endpoints, policies, internal=rng.random() < 0.3)


@pytest.mark.parametrize("seed", range(150))
def test_evaluator_agrees_with_the_model(seed):
    rng = random.Random(seed)
    snap = random_snapshot(rng)
    cluster = ex.Cluster(snap)
    eps = list(snap.endpoints.values())
    parties = [cluster.party(e) for e in eps] + [ex.Party(a) for a in EXTERNAL]
    for _ in range(40):
        src, dst = rng.choice(parties), rng.choice(parties)
        if src.address == dst.address or (src.endpoint is None and dst.endpoint is None):
            continue
        protocol = rng.choice(["tcp", "udp", "icmp"])
        port = rng.choice(PORTS) if protocol != "icmp" else None
        published = dst.endpoint is not None and rng.random() < 0.3
        flow = ex._flow(cluster, src, dst, protocol, port, published)
        pkt = ex._packet(protocol, port, src.address, dst.address, published)
        expected = True
        for side, direction, key in ((src, EGRESS, "egress"), (dst, INGRESS, "ingress")):
            if side.endpoint is None:
                assert flow[key]["evaluated"] is False
                continue
            allow, reason, policy, index = oracle(snap, side.endpoint, direction, pkt)
            got = flow[key]
            case = (seed, src.address, dst.address, protocol, port, published, direction, got)
            assert (got["verdict"] == "allow") == allow, case
            assert got["reason"] == reason, case
            assert (got.get("policy"), got.get("rule")) == (policy, index), case
            expected = expected and allow
        assert (flow["verdict"] == "allowed") == expected
        assert flow["consistent"]


# --------------------------------------------------------------------------------------------------
# Fixed cases: the implicit outcomes and explain's inputs


def fixed():
    eps = [
        endpoint(1, "a", "h1", {"role": "web"}, "web"),
        endpoint(2, "a", "h1", {"role": "db"}, "db", [PortBinding("tcp", 5432, 15432)]),
        endpoint(3, "a", "h2", {}, "far"),
        endpoint(4, "b", "h1", {}, "dual"),
        endpoint(5, "a", "h1", {}, "dual"),
        endpoint(6, "b", "h1", None, "pending"),
    ]
    db = Policy(NETWORK, "db", "front", 10.0, "role == 'db'", (INGRESS,), (
        Rule("Allow", "TCP", source=EntityRule(selector="role == 'web'"), destination=EntityRule(ports=((5432, 5432),))),))
    return eps, [db]


def test_explain_reasons_and_resolution():
    eps, pols = fixed()
    snap = snapshot(eps, pols)
    a = ex.explain(snap, "web", "db", "tcp", 5432)
    assert a["verdict"] == "allowed" and (a["ingress"]["policy"], a["ingress"]["rule"]) == ("front/db", 0)
    assert "MARK" in a["ingress"]["rule_text"]
    assert ex.explain(snap, "far", "db", "tcp", 5432)["ingress"]["reason"] == "default-deny"
    p = ex.explain(snap, "198.18.5.5", "db", "tcp", 5432, published=True)
    assert p["egress"]["evaluated"] is False and p["ingress"]["reason"] == "default-deny"
    # A name with two endpoints: narrowed by the shared network, or refused when still ambiguous.
    d = ex.explain(snap, "web", "dual")
    assert d["destination"]["address"] == "100.64.1.5" and "2 canal endpoints" in d["destination"]["note"]
    with pytest.raises(BadRequest, match="several canal endpoints"):
        ex.explain(snap, "198.18.5.5", "dual")
    assert ex.explain(snap, "198.18.5.5", "100.64.1.4")["ingress"]["reason"] == "profile-deny"
    assert ex.explain(snap, "pending", "web")["egress"]["reason"] == "labels-pending"
    assert ex.explain(snap, "web", "pending")["ingress"]["reason"] == "labels-pending"
    with pytest.raises(NotFound):
        ex.explain(snap, "nosuch", "web")
    with pytest.raises(BadRequest, match="neither"):
        ex.explain(snap, "10.0.0.1", "10.0.0.2")
    with pytest.raises(BadRequest, match="--port is required"):
        ex.explain(snap, "web", "db", "tcp")
    with pytest.raises(BadRequest, match="ICMP has no ports"):
        ex.explain(snap, "web", "db", "icmp", 5)
    # Published port, no policy on the destination: the DNAT profile lets outsiders in.
    open_snap = snapshot(eps, [])
    assert ex.explain(open_snap, "198.18.5.5", "db", "tcp", 5432, published=True)["ingress"]["reason"] == "profile-published"
    plain = ex.explain(open_snap, "198.18.5.5", "db", "tcp", 5432)
    assert plain["ingress"]["reason"] == "profile-deny" and "--published" in plain["hint"]


def test_internal_network_fence_and_broken_scope():
    eps = [endpoint(1, "c", "h1", {}, "safe"), endpoint(2, "c", "h2", {}, "peer"), endpoint(3, "a", "h1", {}, "out")]
    snap = snapshot(eps, internal=True)
    assert ex.explain(snap, "safe", "peer")["verdict"] == "allowed"
    fenced = ex.explain(snap, "safe", "198.18.5.5")
    assert fenced["verdict"] == "denied" and fenced["egress"]["reason"] == "internal-fence"
    broken = dataclasses.replace(snap, broken_policy_scopes=frozenset({"vault"}))
    assert ex.explain(broken, "safe", "peer")["egress"]["reason"] == "broken-policy"


def test_dry_run_reports_selection_and_changed_flows():
    eps, pols = fixed()
    snap = snapshot(eps)
    report = ex.dry_run(snap, pols)
    assert report["results"] == [{"policy": "front/db", "kind": NETWORK, "result": "created"}]
    assert [r["container"] for r in report["selection"]] == ["db"]
    assert report["selection"][0]["ingress_now_selected_by"] == ["front/db"]
    lost = {(f["source"], f["protocol"], f["port"]) for f in report["flows"]}
    assert ("web (100.64.1.1)", "icmp", None) in lost and ("far (100.64.2.3)", "tcp", 5432) in lost
    assert ("web (100.64.1.1)", "tcp", 5432) not in lost  # still allowed, by the new rule
    assert report["summary"]["flows_gained"] == 0 and report["summary"]["flows_lost"] == len(report["flows"])
    # Applying the same again changes nothing; removing selection shows "no longer".
    same = ex.dry_run(snapshot(eps, pols), pols)
    assert same["results"][0]["result"] == "unchanged" and same["flows"] == [] and same["selection"] == []
    other = dataclasses.replace(pols[0], selector="role == 'nobody'")
    back = ex.dry_run(snapshot(eps, pols), [other])
    assert back["selection"][0]["ingress_no_longer_selected_by"] == ["front/db"]
    assert back["summary"]["flows_gained"] > 0
    capped = ex.dry_run(snap, pols, limit_flows=1, limit_evaluations=3)
    assert len(capped["flows"]) <= 1 and capped["summary"]["truncated"]


def test_dry_run_agrees_with_explain_before_and_after():
    rng = random.Random(7)
    for _ in range(20):
        snap = random_snapshot(rng)
        new = [random_policy(rng, i) for i in range(rng.randint(1, 3))]
        report = ex.dry_run(snap, new)
        after = dataclasses.replace(snap, policies=tuple(sorted(
            {**{p.key: p for p in snap.policies}, **{p.key: p for p in new}}.values(), key=lambda p: p.sort_key)))
        for flow in report["flows"]:
            src = flow["source"].split("(")[1].rstrip(")")
            dst = flow["destination"].split("(")[1].rstrip(")")
            old = ex.explain(snap, src, dst, flow["protocol"], flow["port"])["verdict"]
            now = ex.explain(after, src, dst, flow["protocol"], flow["port"])["verdict"]
            assert old == flow["before"]["verdict"] and now == flow["after"]["verdict"] and old != now


# --------------------------------------------------------------------------------------------------
# Evaluator and stats


def test_evaluator_refuses_what_it_cannot_read():
    chains = {"X": ["-m string --string foo -j DROP"]}
    with pytest.raises(EvaluationError, match="cannot evaluate"):
        walk(chains, [], "X", Packet("1.1.1.1", "2.2.2.2", 6, dport=1))
    with pytest.raises(EvaluationError, match="does not hold"):
        walk({"X": ["-j NOPE"]}, [], "X", Packet("1.1.1.1", "2.2.2.2", 6))
    with pytest.raises(EvaluationError, match="ipset"):
        walk({"X": ["-m set --match-set nope src -j DROP"]}, [], "X", Packet("1.1.1.1", "2.2.2.2", 6))


def test_goto_returns_to_the_callers_caller():
    chains = {"A": ["-j B", "-j ACCEPT"], "B": ["-g C", "-j DROP"], "C": ["-j RETURN"]}
    assert walk(chains, [], "A", Packet("1.1.1.1", "2.2.2.2", 6)).verdict == "ACCEPT"


def test_stats_map_kernel_counters_to_policy_rules():
    eps, pols = fixed()
    snap = snapshot(eps, pols)
    table, notes = ex.Cluster(snap).host("h1")
    lines = ["*filter"]
    for chain, rules in table.chains.items():
        for i, rule in enumerate(rules):
            lines.append(f"[{i + 1}:{(i + 1) * 100}] -A {chain} {rule}")
    lines.append("COMMIT")
    stats = ex.policy_stats(snap, "\n".join(lines))
    assert stats["stale"] == []
    db_rule = [r for r in stats["rules"] if r["policy"] == "front/db"]
    assert db_rule == [{"policy": "front/db", "direction": INGRESS, "rule": 0, "action": "Allow",
                        "packets": 1, "bytes": 100}]  # the MARK rule; not its RETURN
    chain = endpoint_chain(eps[1].id, INGRESS)
    deny_at = [i for i, n in enumerate(notes[chain]) if n.kind == "default-deny"][0]
    row = [r for r in stats["implicit"] if r["container"] == "db" and r["outcome"] == "default-deny"]
    assert row[0]["packets"] == deny_at + 1
    # A kernel chain that differs from the compiled one is reported, not misattributed.
    tampered = "\n".join(line for line in lines if not line.endswith("-j DROP") or chain not in line)
    assert chain in ex.policy_stats(snap, tampered)["stale"]


def test_workload_to_its_own_host_meets_the_workload_to_host_setting():
    from canal.agent.desired import DataplaneSettings
    from canal.policy.compiler import HostProtection

    eps, _ = fixed()
    for action, verdict in (("drop", "denied"), ("accept", "allowed")):
        settings = DataplaneSettings(host=HostProtection(action, dns=("192.0.2.1",)))
        snap = dataclasses.replace(snapshot(eps), settings=settings)
        own = frozenset({"192.0.2.1", "192.0.2.9"})
        a = ex.explain(snap, "web", "192.0.2.9", host_addresses=own)
        assert a["verdict"] == verdict and "workload-to-host" in a["ingress"]["explanation"]
        assert ex.explain(snap, "web", "192.0.2.1", "udp", 53, host_addresses=own)["verdict"] == "allowed"  # DNS
        # Not this host's address: forwarded, the egress profile decides.
        assert ex.explain(snap, "web", "192.0.2.9")["verdict"] == "allowed"


def test_interface_dispatch_shortcut_walks_as_a_full_scan(monkeypatch):
    from canal.dataplane.links import host_ifname
    from canal.policy.evaluate import Table

    rng = random.Random(3)
    eps = [endpoint(n, rng.choice("ab"), "h1", rng.choice([{}, {"role": "db"}, None]), f"e{n}") for n in range(1, 30)]
    snap = snapshot(eps, [random_policy(rng, i) for i in range(4)])
    fast, _ = ex.Cluster(snap).host("h1")
    for chain in fast.chains:  # parsed (and indexed) now: parsing is lazy
        fast.rules(chain)
    monkeypatch.setattr(Table, "_index_dispatch", lambda self, chain, parsed: None)
    slow, _ = ex.Cluster(snap).host("h1")
    assert fast.chains == slow.chains
    ifaces = [host_ifname(e.id) for e in eps] + ["underlay", "cnl0000nosuch"]
    for _ in range(400):
        pkt = Packet(rng.choice([e.ip_text for e in eps] + EXTERNAL), rng.choice([e.ip_text for e in eps]), 6,
                     dport=rng.choice(PORTS), iif=rng.choice(ifaces), oif=rng.choice(ifaces))
        a, b = fast.walk("CANAL-FORWARD", pkt), slow.walk("CANAL-FORWARD", pkt)
        assert (a.verdict, [(s.chain, s.index) for s in a.steps]) == (b.verdict, [(s.chain, s.index) for s in b.steps])
    assert fast._dispatch and not slow._dispatch
