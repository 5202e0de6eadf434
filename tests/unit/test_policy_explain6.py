"""`canal policy explain` over IPv6 (issue 13): the ip6tables rules walked as the IPv4 ones.

The same policies decide a flow identically over both families (what compile_filter6 promises),
so for random snapshots of dual-stack endpoints explain's IPv6 answer must equal its IPv4 one,
each of which test_policy_explain checks against an independent oracle of the policy model.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random

import pytest
from test_policy_explain import EXTERNAL, NETS, PORTS, endpoint, fixed, random_policy, snapshot

from canal.agent import explain as ex
from canal.errors import BadRequest
from canal.policy.model import INGRESS, NETWORK, EntityRule, Policy, Rule

EXTERNAL6 = ["2001:2::5", "2001:2:0:1::3"]  # EXTERNAL's counterparts


def v6(address: str) -> str:
    """100.64.H.N -> fd00:64::H:N (each endpoint's /128 mirrors its /32)."""
    octets = address.split(".")
    return str(ipaddress.IPv6Address(f"fd00:64::{octets[2]}:{octets[3]}"))


def dual(snap, without=()):
    """The snapshot with every network --ipv6 and every endpoint (but `without`) dual-stack."""
    nets = {k: dataclasses.replace(n, pools6=("fd00:64::/48",)) for k, n in snap.networks.items()}
    eps = {i: e if e.container_name in without else dataclasses.replace(e, ip6=ipaddress.IPv6Address(v6(e.ip_text)))
           for i, e in snap.endpoints.items()}
    return dataclasses.replace(snap, networks=nets, endpoints=eps, cluster_network6="fd00:64::/48")


def family_neutral(policy: Policy) -> Policy:
    """No nets (a v4 CIDR matches nothing over IPv6) and no ICMP types (8 is echo only in v4)."""
    def entity(e: EntityRule) -> EntityRule:
        return dataclasses.replace(e, nets=(), not_nets=())

    def rules(rs):
        return tuple(dataclasses.replace(r, icmp=None, not_icmp=None, source=entity(r.source),
                                         destination=entity(r.destination)) for r in rs)
    return dataclasses.replace(policy, ingress=rules(policy.ingress), egress=rules(policy.egress))


def icmp6(policy: Policy) -> Policy:
    """The policy as written for IPv6: protocol ICMP is IPv4's, ICMPv6 its IPv6 counterpart (Calico)."""
    def rules(rs):
        return tuple(dataclasses.replace(r, protocol="ICMPv6") if r.protocol == "ICMP" else r for r in rs)
    return dataclasses.replace(policy, ingress=rules(policy.ingress), egress=rules(policy.egress))


def brief(direction: dict) -> tuple:
    return tuple(direction.get(k) for k in ("evaluated", "verdict", "reason", "policy", "rule", "action"))


@pytest.mark.parametrize("seed", range(60))
def test_ipv6_decisions_equal_ipv4_ones(seed):
    rng = random.Random(1000 + seed)
    eps = [endpoint(n, rng.choice(list(NETS)), rng.choice(["h1", "h2"]),
                    rng.choice([None, {}, {"role": "db"}, {"role": "web", "tier": "gold"}, {"role": "batch"}]), f"e{n}")
           for n in range(1, rng.randint(3, 7))]
    policies = [family_neutral(random_policy(rng, i)) for i in range(rng.randint(0, 4))]
    internal = rng.random() < 0.3
    snap = dual(snapshot(eps, policies, internal=internal))
    four, six = ex.Cluster(snap, 4), ex.Cluster(dual(snapshot(eps, [icmp6(p) for p in policies], internal=internal)), 6)
    outside = list(zip(EXTERNAL, EXTERNAL6))
    for _ in range(30):
        src, dst = rng.choice(eps + outside), rng.choice(eps + outside)  # type: ignore[operator]
        if src == dst or (isinstance(src, tuple) and isinstance(dst, tuple)):
            continue
        protocol = rng.choice(["tcp", "udp", "icmp"])
        port = rng.choice(PORTS) if protocol != "icmp" else None
        published = False

        def party(cluster, side, index):
            return ex.Party(side[index]) if isinstance(side, tuple) else cluster.party(snap.endpoints[side.id])
        a = ex._flow(four, party(four, src, 0), party(four, dst, 0), protocol, port, published)
        b = ex._flow(six, party(six, src, 1), party(six, dst, 1), protocol, port, published)
        case = (seed, src, dst, protocol, port)
        assert a["verdict"] == b["verdict"], (case, a, b)
        assert brief(a["egress"]) == brief(b["egress"]) and brief(a["ingress"]) == brief(b["ingress"]), case
        assert b["consistent"]


def test_family_from_the_addresses_or_the_flag():
    eps, pols = fixed()
    snap = dual(snapshot(eps, pols), without=("far",))
    db6 = v6("100.64.1.2")
    a = ex.explain(snap, "web", db6, "tcp", 5432)
    assert a["flow"]["family"] == 6 and a["verdict"] == "allowed"
    assert a["destination"]["address"] == db6 and a["ingress"]["policy"] == "front/db"
    assert "-m set --match-set canal-6" in a["ingress"]["rule_text"]  # the ip6tables rule, v6 set
    # The same address written another way resolves to the same endpoint.
    assert ex.explain(snap, "web", db6.replace("::", ":0::").upper(), "tcp", 5432)["destination"]["container"] == "db"
    by_name = ex.explain(snap, "web", "db", "tcp", 5432, family=6)
    assert by_name["flow"]["family"] == 6 and by_name["source"]["address"] == v6("100.64.1.1")
    assert ex.explain(snap, "web", "db", "tcp", 5432)["flow"]["family"] == 4  # default
    icmp = ex.explain(snap, "db", "web", family=6)
    assert icmp["flow"]["protocol"] == "icmpv6" and icmp["verdict"] == "allowed"  # echo, same network
    with pytest.raises(BadRequest, match="different families"):
        ex.explain(snap, "100.64.1.1", db6)
    with pytest.raises(BadRequest, match="does not match"):
        ex.explain(snap, "web", db6, family=4)
    with pytest.raises(BadRequest, match="expected 4 or 6"):
        ex.explain(snap, "web", "db", family=5)
    # A policy's default deny holds over IPv6 as over IPv4.
    assert ex.explain(snap, "dual", "db", "tcp", 5432)["ingress"]["reason"] == "default-deny"
    assert ex.explain(snap, "dual", "db", "tcp", 5432, family=6)["ingress"]["reason"] == "default-deny"


def test_ipv6_of_an_endpoint_without_ipv6_is_closed():
    eps, pols = fixed()
    snap = dual(snapshot(eps, pols), without=("far",))
    a = ex.explain(snap, "far", "db", "tcp", 5432, family=6)
    assert a["verdict"] == "denied" and a["egress"]["reason"] == "no-ipv6" and a["source"]["address"] is None
    b = ex.explain(snap, "2001:2::5", "far", "tcp", 80, published=False)
    assert b["verdict"] == "denied" and b["ingress"]["reason"] == "no-ipv6"
    # A dual-stack endpoint on a host whose networks are not --ipv6 is closed too (desired.py drops it).
    plain = dataclasses.replace(snap, networks={k: dataclasses.replace(n, pools6=()) for k, n in snap.networks.items()})
    c = ex.explain(plain, "web", "db", "tcp", 5432, family=6)
    assert c["verdict"] == "denied" and c["egress"]["reason"] == "no-ipv6"
    # Control: over IPv4 the same pair is decided by policy.
    assert ex.explain(snap, "far", "db", "tcp", 5432)["ingress"]["reason"] == "default-deny"


def test_ipv6_host_addresses_meet_the_workload_to_host_setting():
    from canal.agent.desired import DataplaneSettings
    from canal.policy.compiler import HostProtection

    eps, _ = fixed()
    for action, verdict in (("drop", "denied"), ("accept", "allowed")):
        snap = dataclasses.replace(dual(snapshot(eps)), settings=DataplaneSettings(host=HostProtection(action)))
        own = frozenset({"192.0.2.9", "2001:2::9"})
        a = ex.explain(snap, "web", "2001:2::9", host_addresses=own)
        assert a["verdict"] == verdict and "workload-to-host" in a["ingress"]["explanation"], a
        assert a["flow"]["family"] == 6


def _saved(table) -> str:
    lines = ["*filter"]
    for chain, rules in table.chains.items():
        for i, rule in enumerate(rules):
            lines.append(f"[{i + 1}:{(i + 1) * 100}] -A {chain} {rule}")
    return "\n".join(lines + ["COMMIT"])


def test_stats_of_both_families_are_summed_per_rule():
    eps, pols = fixed()
    snap = dual(snapshot(eps, pols), without=("far",))
    four = ex.policy_stats(snap, _saved(ex.Cluster(snap, 4).host("h1")[0]))
    six = ex.policy_stats(snap, _saved(ex.Cluster(snap, 6).host("h1")[0]), family=6)
    assert four["stale"] == [] and six["stale"] == []
    (r4,) = [r for r in four["rules"] if r["policy"] == "front/db"]
    (r6,) = [r for r in six["rules"] if r["policy"] == "front/db"]
    both = ex.merge_stats(four, six)
    (r,) = [r for r in both["rules"] if r["policy"] == "front/db"]
    assert r["packets"] == r4["packets"] + r6["packets"] and r["bytes"] == r4["bytes"] + r6["bytes"]
    assert len(both["implicit"]) == len(four["implicit"])  # same endpoints and outcomes, counted once each
    # An IPv6 chain not programmed as compiled is named as IPv6's.
    assert any(c.startswith("ip6:CANAL-") for c in ex.policy_stats(snap, "", family=6)["stale"])


def test_introspection_reads_ip6tables_counters_only_with_an_ipv6_network():
    from canal.services.introspect import PolicyIntrospection

    eps, pols = fixed()
    plain = snapshot(eps, pols)
    snap = dual(plain)
    v4 = _saved(ex.Cluster(snap, 4).host("h1")[0])
    v6 = _saved(ex.Cluster(snap, 6).host("h1")[0])
    read = []
    stats = PolicyIntrospection(lambda: snap, lambda: v4, counters6=lambda: read.append(6) or v6).stats()
    assert read == [6] and stats["stale"] == []
    PolicyIntrospection(lambda: plain, lambda: _saved(ex.Cluster(plain, 4).host("h1")[0]),
                        counters6=lambda: read.append(6) or "").stats()
    assert read == [6]  # not read again: no --ipv6 network, no IPv6 policy chains


def test_dry_run_finds_a_flow_only_ipv6_nets_change():
    """A rule on an IPv6 CIDR changes IPv6 flows only: the dry run lists them (family 6), and
    what it predicts is what explain says after the change."""
    eps, _ = fixed()
    snap = dual(snapshot(eps), without=("far",))
    deny6 = Policy(NETWORK, "no-v6-web", "front", 5.0, "role == 'db'", (INGRESS,), (
        Rule("Deny", source=EntityRule(nets=(v6("100.64.1.1") + "/128",))), Rule("Allow")))
    report = ex.dry_run(snap, [deny6])
    lost = [(f["source"].split(" ")[0], f["destination"].split(" ")[0], f["family"]) for f in report["flows"]
            if f["after"]["verdict"] == "denied"]
    assert ("web", "db", 6) in lost and ("web", "db", 4) not in lost, report["flows"]
    after = dataclasses.replace(snap, policies=(deny6,))
    assert ex.explain(after, "web", "db", "tcp", 5432, family=6)["verdict"] == "denied"
    assert ex.explain(after, "web", "db", "tcp", 5432)["verdict"] == "allowed"  # IPv4 untouched
