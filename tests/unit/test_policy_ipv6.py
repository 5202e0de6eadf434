"""Policy in both families: the IPv6 rules (compile_filter6, desired_firewall's ip6tables half)
are IPv4's, per family; IPv6 stays closed where no network was created with --ipv6."""

from __future__ import annotations

import ipaddress

from canal.agent.desired import CLUSTER_SET6, Snapshot, desired_firewall
from canal.policy.compiler import EndpointInfo, NetworkInfo, compile_filter, compile_filter6
from canal.policy.model import load_documents
from canal.records import EndpointRecord, NetworkRecord

NETWORKS = {"n": NetworkInfo("n")}
WEB = EndpointInfo("a" * 64, "100.64.7.2", "n", "h1", {"app": "web"}, ip6="fd00::2")
DB = EndpointInfo("b" * 64, "100.64.7.3", "n", "h1", {"app": "db"}, ip6="fd00::3")
V4ONLY = EndpointInfo("c" * 64, "100.64.7.4", "n", "h1", {"app": "db"})
REMOTE = EndpointInfo("d" * 64, "100.64.8.2", "n", "h2", {"app": "web"}, ip6="fd00::8:2")
ALL = [WEB, DB, V4ONLY, REMOTE]

POLICY = """
apiVersion: canal/v1
kind: GlobalNetworkPolicy
metadata: {name: db}
spec:
  selector: app == 'db'
  ingress:
  - action: Allow
    protocol: TCP
    source: {selector: app == 'web'}
    destination: {ports: [5432]}
  - action: Allow
    protocol: ICMP
  - action: Allow
    protocol: ICMPv6
    icmp: {type: 128}
  - action: Deny
    source: {nets: [fd00:bad::/64]}
  - action: Deny
    source: {nets: [10.9.0.0/16]}
  - action: Allow
    source: {nets: [fd00::/64, 100.64.0.0/10], notNets: [fd00::99/128, 100.64.9.9/32]}
"""


def both():
    policies = load_documents(POLICY)
    v4 = compile_filter(ALL, policies, "h1", NETWORKS)
    v6 = compile_filter6(ALL, policies, "h1", NETWORKS)
    return v4, v6


def policy_rules(state):
    (chain,) = [c for (_, c) in state.chains if c.startswith("CANAL-PI-")]
    return state.chains[("filter", chain)]


def test_selectors_fill_a_set_per_family():
    v4, v6 = both()
    sets4 = {s.name: s for s in v4.ipsets}
    sets6 = {s.name: s for s in v6.ipsets}
    web4 = [s for s in sets4.values() if s.members == {"100.64.7.2", "100.64.8.2"}]
    web6 = [s for s in sets6.values() if s.members == {"fd00::2", "fd00::8:2"}]
    assert len(web4) == 1 and len(web6) == 1
    assert web4[0].family == "inet" and web6[0].family == "inet6"
    assert web6[0].name == "canal-6" + web4[0].name[len("canal-"):]  # same selector, other family
    assert all(s.name.startswith("canal-6") and s.family == "inet6" for s in v6.ipsets)


def test_rules_keep_only_their_familys_nets_and_icmp():
    v4, v6 = both()
    text4, text6 = "\n".join(policy_rules(v4)), "\n".join(policy_rules(v6))
    assert "-p icmp -j MARK" in text4 and "icmp6" not in text4
    assert "-p ipv6-icmp -m icmp6 --icmpv6-type 128 -j MARK" in text6 and "-p icmp " not in text6
    assert "-s 10.9.0.0/16 -j DROP" in text4 and "fd00:bad" not in text4
    assert "-s fd00:bad::/64 -j DROP" in text6 and "10.9.0.0" not in text6
    assert "-s 100.64.0.0/10 ! -s 100.64.9.9/32" not in text4  # single net + single notNet: a set for notNets
    assert any("-s 100.64.0.0/10" in r and "fd00" not in r for r in policy_rules(v4))
    assert any("-s fd00::/64" in r and "100.64" not in r for r in policy_rules(v6))


def test_anti_spoofing_and_neighbour_discovery():
    _, v6 = both()
    assert ("filter", "CANAL-FW-" + WEB.id[:12]) in v6.chains
    assert "! -s fd00::2/128 -j CANAL-SPOOF6" in v6.chains[("filter", "CANAL-FW-" + WEB.id[:12])]
    # Its own /128, or its link-local address (to its host veth; never forwarded): else dropped.
    assert v6.chains[("filter", "CANAL-SPOOF6")] == ["-s fe80::/10 -j RETURN", "-j DROP"]
    input6 = v6.chains[("filter", "CANAL-INPUT")]
    ndp = [r for r in input6 if "icmpv6-type" in r]
    assert ndp == [f"-i cnl+ -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j ACCEPT" for t in range(130, 137)]
    assert input6.index(ndp[-1]) < input6.index("-i cnl+ -g CANAL-WL-TO-HOST")


def test_an_endpoint_without_ipv6_is_closed_to_ipv6():
    _, v6 = both()
    from_wl = v6.chains[("filter", "CANAL-FROM-WL")]
    assert not any(V4ONLY.id[:12] in r for r in from_wl) and from_wl[-1] == "-j DROP"
    assert ("filter", "CANAL-FW-" + V4ONLY.id[:12]) not in v6.chains


def test_same_decision_structure_in_both_families():
    """The endpoint chains differ only in addresses and set names: policy order, default deny and
    profile are the same, so a flow is decided the same way over IPv4 and IPv6."""
    v4, v6 = both()
    for name in ("CANAL-TW-" + DB.id[:12], "CANAL-FW-" + WEB.id[:12]):
        r4 = [r.replace("/32", "") for r in v4.chains[("filter", name)]]
        r6 = [r.replace("/128", "").replace("canal-6", "canal-").replace("CANAL-SPOOF6", "DROP")
              for r in v6.chains[("filter", name)]]
        r6 = [r.replace("fd00::2", "100.64.7.2") for r in r6]
        assert r4 == r6


NET_ID = "e" * 64


def snapshot(ipv6: bool, ip6: str | None = "fd00::2") -> Snapshot:
    network = NetworkRecord(id=NET_ID, host="h1", pools=("0.0.0.0/0",), name="n", pools6=("::/0",) if ipv6 else ())
    endpoint = EndpointRecord(id="a" * 64, network=NET_ID, host="h1", ip=ipaddress.IPv4Address("100.64.7.2"),
                              mac="02:42:64:40:07:02", mtu=1450, joined=True, labels={},
                              ip6=ipaddress.IPv6Address(ip6) if ipv6 and ip6 else None)
    other = EndpointRecord(id="c" * 64, network="f" * 64, host="h1", ip=ipaddress.IPv4Address("100.64.7.9"),
                           mac="02:42:64:40:07:09", mtu=1450, joined=True, labels={})
    v4net = NetworkRecord(id="f" * 64, host="h1", pools=("0.0.0.0/0",), name="v4")
    return Snapshot("h1", "100.64.0.0/16", {f"h1/{NET_ID}": network, "h1/" + "f" * 64: v4net},
                    {endpoint.id: endpoint, other.id: other}, cluster_network6="fd00:c0a1::/48")


def test_without_an_ipv6_network_ipv6_stays_locked_down():
    state = desired_firewall(snapshot(ipv6=False))
    assert state.chains6 == {
        ("raw", "CANAL-PREROUTING"): ["-i cnl+ -j DROP"],
        ("filter", "CANAL-FORWARD"): ["-i cnl+ -j DROP", "-o cnl+ -j DROP"],
    }
    assert not any(s.family == "inet6" for s in state.ipsets)


def test_with_an_ipv6_network_only_its_endpoints_are_open():
    state = desired_firewall(snapshot(ipv6=True))
    raw = state.chains6[("raw", "CANAL-PREROUTING")]
    assert raw[0] == "-i cnl+ -m rpfilter --invert -j DROP"
    assert "-i cnlaaaaaaaaaaaa -j RETURN" in raw and "-i cnlcccccccccccc -j RETURN" not in raw
    assert raw[-1] == "-i cnl+ -j DROP"  # the v4-only network's endpoint: closed
    assert {"-i cnl+ -p ipencap -j DROP", "-i cnl+ -p ipv6 -j DROP", "-i cnl+ -p esp -j DROP",
            "-i cnl+ -p udp -m udp --dport 8472 -j DROP", "-s ::1/128 -i cnl+ -j DROP"} <= set(raw)
    cluster = [s for s in state.ipsets if s.name == CLUSTER_SET6]
    assert cluster and cluster[0].members == {"fd00:c0a1::/48"} and cluster[0].family == "inet6"
    assert ("filter", "CANAL-FW-aaaaaaaaaaaa") in state.chains6


def test_endpoint_list_and_explain_show_the_ipv6_address():
    from canal.agent.desired import endpoint_rows
    from canal.agent.explain import Cluster, resolve_pair

    snap = snapshot(ipv6=True)
    rows = {r["endpoint"]: r for r in endpoint_rows(snap)}
    assert rows["aaaaaaaaaaaa"]["ip6"] == "fd00::2" and rows["cccccccccccc"]["ip6"] is None
    src, dst = resolve_pair(Cluster(snap), "fd00::2", "100.64.7.9")  # a container by its IPv6 address
    assert src.describe()["address6"] == "fd00::2" and src.describe()["address"] == "100.64.7.2"
    assert "address6" not in dst.describe()
