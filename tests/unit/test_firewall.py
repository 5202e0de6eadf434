"""Compute (desired.py) and apply (firewall.py) against stateful fakes of iptables and ipset."""

from __future__ import annotations

import hashlib
import random

from fakes import FakeIpsets, FakeIptables

from canal.agent.desired import (
    CLUSTER_SET,
    MASQ_SET,
    POSTROUTING,
    Snapshot,
    desired_firewall,
    desired_links,
    endpoint_infos,
    network_infos,
)
from canal.policy.compiler import FORWARD, network_members_set
from canal.dataplane.firewall import Firewall, FirewallState, restore_text, tables_of
from canal.records import EndpointRecord, NetworkRecord

DOCKER_SAVE = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A DOCKER-USER -j RETURN
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
COMMIT
"""


def hid(name: str) -> str:
    """A libnetwork-shaped ID (64 lowercase hex) for a short test name."""
    return hashlib.sha256(name.encode()).hexdigest()


N1, N2, SWARM_ID = hid("n1"), hid("n2"), "swarmid" + "0" * 18


def snap(networks=None, endpoints=None):
    """Typed records from raw dicts, keyed as the mirror keys them."""
    nets = {f"{n['host']}/{n['id']}": NetworkRecord.parse(n) for n in (networks or {}).values()}
    eps = {e["id"]: EndpointRecord.parse(e) for e in (endpoints or {}).values()}
    return Snapshot("h1", "100.64.0.0/16", nets, eps)


NET = {"id": N1, "pools": ["0.0.0.0/0"], "internal": False, "nat": True, "mtu": 0, "host": "h1", "name": "appnet"}
EP = {"id": "e1" * 32, "network": N1, "host": "h1", "ip": "100.64.3.2", "mac": "02:42:64:40:03:02", "mtu": 1450, "joined": True,
      "labels": {}}


def firewall():
    ipt = FakeIptables(DOCKER_SAVE)
    return Firewall(ipt, FakeIpsets(ipt)), ipt


def test_no_networks_means_no_trace():
    assert desired_firewall(snap()) == FirewallState()


def test_routed_endpoints_pass_dockers_forward_drop():
    state = desired_firewall(snap({"h1/n1": NET}, {"e1": EP}))
    assert state.chains[("filter", FORWARD)][-2:] == ["-i cnl+ -j ACCEPT", "-o cnl+ -j ACCEPT"]
    assert ("filter", "FORWARD", FORWARD) in [(j.table, j.builtin, j.chain) for j in state.jumps]
    sets = {s.name: s for s in state.ipsets}
    assert sets[MASQ_SET].members == {"100.64.3.2"}
    assert sets[CLUSTER_SET].members == {"100.64.0.0/16"}
    assert sets[network_members_set("appnet")].members == {"100.64.3.2"}


def test_nat_off_and_internal_networks_are_not_masqueraded():
    nets = {
        "h1/n1": {**NET, "nat": False},
        "h1/n2": {**NET, "id": N2, "internal": True, "nat": False, "pools": ["100.70.0.0/24"], "name": "secret"},
    }
    eps = {"e1": EP, "e2": {**EP, "id": "e2" * 32, "network": N2, "ip": "100.70.0.5"}}
    state = desired_firewall(snap(nets, eps))
    sets = {s.name: s for s in state.ipsets}
    assert sets[MASQ_SET].members == frozenset()
    assert sets[CLUSTER_SET].members == {"100.64.0.0/16", "100.70.0.0/24"}
    assert network_infos(snap(nets, eps))["secret"].internal


def test_networks_are_one_across_hosts_by_learned_name():
    nets = {
        "h1/id-on-h1": {**NET, "id": hid("on-h1"), "name": "appnet"},
        "h2/id-on-h2": {**NET, "id": hid("on-h2"), "host": "h2", "name": "appnet"},
    }
    eps = {
        "e1": {**EP, "network": hid("on-h1"), "labels": {}},
        "e2": {**EP, "id": "e2" * 32, "host": "h2", "network": hid("on-h2"), "ip": "100.64.4.2", "labels": {"a": "b"}},
        "e3": {**EP, "id": "e3" * 32, "network": hid("on-h1"), "joined": False, "ip": "100.64.3.9", "labels": None},
        "e4": {**EP, "id": "e4" * 32, "host": "h2", "joined": False, "ip": "100.64.4.9"},
    }
    infos = {e.ip: e for e in endpoint_infos(snap(nets, eps))}
    # Remote endpoints count once joined; ours from creation on (chains ready before Join).
    assert set(infos) == {"100.64.3.2", "100.64.4.2", "100.64.3.9"}
    assert infos["100.64.4.2"].network == "appnet" and infos["100.64.4.2"].labels == {"a": "b"}
    assert infos["100.64.3.9"].labels is None  # not learned yet: the compiler fails closed
    sets = {s.name: s for s in desired_firewall(snap(nets, eps)).ipsets}
    assert sets[network_members_set("appnet")].members == {"100.64.3.2", "100.64.4.2", "100.64.3.9"}


def test_apply_programs_then_is_a_no_op():
    fw, ipt = firewall()
    state = desired_firewall(snap({"h1/n1": NET}, {"e1": EP}))
    assert fw.apply(state) is True
    saved = ipt.save()
    # Ahead of Docker's chains, after the user's DOCKER-USER (Docker re-inserts it on top).
    assert saved["filter"].rules["FORWARD"][:2] == ["-j DOCKER-USER", f"-j {FORWARD}"]
    assert saved["nat"].rules["POSTROUTING"][0] == f"-j {POSTROUTING}"
    assert saved["nat"].rules[POSTROUTING][-1] == "-j MASQUERADE"
    assert fw.apply(state) is False  # nothing drifted: no iptables-restore at all
    assert len(ipt.restores) == 1


def test_apply_repairs_tampering():
    fw, ipt = firewall()
    state = desired_firewall(snap({"h1/n1": NET}, {"e1": EP}))
    fw.apply(state)
    ipt.tables["filter"].rules["FORWARD"].remove(f"-j {FORWARD}")
    ipt.tables["filter"].rules[FORWARD] = ["-j DROP"]
    assert fw.apply(state) is True
    assert ipt.save()["filter"].rules[FORWARD] == state.chains[("filter", FORWARD)]
    assert ipt.save()["filter"].rules["FORWARD"].count(f"-j {FORWARD}") == 1


def test_duplicate_jumps_are_removed():
    fw, ipt = firewall()
    state = desired_firewall(snap({"h1/n1": NET}, {"e1": EP}))
    fw.apply(state)
    ipt.tables["filter"].rules["FORWARD"].append(f"-j {FORWARD}")
    fw.apply(state)
    assert ipt.save()["filter"].rules["FORWARD"].count(f"-j {FORWARD}") == 1


def test_removing_everything_leaves_dockers_rules_untouched():
    fw, ipt = firewall()
    before = ipt.save()
    fw.apply(desired_firewall(snap({"h1/n1": NET}, {"e1": EP})))
    fw.apply(FirewallState())  # the last network gone
    after = ipt.save()
    for name in ("filter", "nat"):
        assert after[name].rules == before[name].rules
        assert not any(c.startswith("CANAL-") for c in after[name].chains)
    assert fw.ipsets.current() == {}


def test_desired_links_are_the_joined_local_endpoints():
    eps = {
        "e1": EP,
        "e2": {**EP, "id": "e2" * 32, "joined": False, "ip": "100.64.3.3"},
        "e3": {**EP, "id": "e3" * 32, "host": "h2", "ip": "100.64.4.3"},
    }
    assert [link.endpoint_id for link in desired_links(snap({"h1/n1": NET}, eps))] == [EP["id"]]


def test_ipset_script_changes_members_in_place_or_swaps():
    from canal.dataplane.ipset import IpSet, restore_script

    big = IpSet("canal-x", "hash:ip", frozenset(f"10.0.{i // 250}.{i % 250}" for i in range(200)))
    present = {"canal-x": set(big.members) - {"10.0.0.7"} | {"10.9.9.9"}}
    script = restore_script([big], present)
    assert script == "del canal-x 10.9.9.9 -exist\nadd canal-x 10.0.0.7 -exist\n"
    assert restore_script([big], {"canal-x": set(big.members)}) == ""
    fresh = restore_script([big], {})
    assert fresh.splitlines()[0].startswith("create canal-x-tmp hash:ip")
    assert "swap canal-x-tmp canal-x" in fresh and fresh.count("\nadd canal-x-tmp ") == 200
    net = IpSet("canal-n", "hash:net", frozenset({"10.0.0.1/32"}))
    assert restore_script([net], {"canal-n": {"10.0.0.1"}}) == ""  # ipset prints /32 bare
    bare = IpSet("canal-n", "hash:net", frozenset({"10.0.0.1", "10.1.0.0/16"}))
    assert restore_script([bare], {"canal-n": {"10.0.0.1/32", "10.1.0.0/16"}}) == ""  # as last written
    assert restore_script([bare], {"canal-n": {"10.0.0.2/32", "10.1.0.0/16"}}).splitlines() == [
        "del canal-n 10.0.0.2 -exist", "add canal-n 10.0.0.1 -exist"]
    # A live set is never declared again (another maxelem would be refused): it is swapped;
    # a temporary set left by a failed restore goes first; `rewrite` swaps even small changes.
    swapped = restore_script([big], {"canal-x": set(), "canal-x-tmp": set()}).splitlines()
    assert swapped[0] == "destroy canal-x-tmp" and not any(l.startswith("create canal-x ") for l in swapped)
    assert "swap canal-x-tmp canal-x" in restore_script([big], present, rewrite=True)


def test_event_passes_diff_against_memory_and_read_back_repairs():
    fw, ipt = firewall()
    state = desired_firewall(snap({"h1/n1": NET}, {"e1": EP}))
    assert fw.apply(state, read_back=False) is True
    ipt.tables["filter"].rules[FORWARD] = []  # tampering
    assert fw.apply(state, read_back=False) is False  # memory says all is well
    assert fw.apply(state, read_back=True) is True  # the timer's pass reads the kernel
    assert ipt.save()["filter"].rules[FORWARD] == state.chains[("filter", FORWARD)]


def test_a_swarm_network_has_one_id_and_a_record_per_node():
    nets = {
        "h1/swarmid": {**NET, "id": SWARM_ID, "name": "svcnet"},
        "h2/swarmid": {**NET, "id": SWARM_ID, "host": "h2", "name": "svcnet"},
    }
    eps = {"e1": {**EP, "network": SWARM_ID}, "e2": {**EP, "id": "e2" * 32, "host": "h2", "network": SWARM_ID, "ip": "100.64.0.9"}}
    state = desired_firewall(snap(nets, eps))  # h1 still has its own record: chains stay
    assert state.chains and {e.network for e in endpoint_infos(snap(nets, eps))} == {"svcnet"}
    del nets["h2/swarmid"]  # h2 left the network: h1 keeps its own view
    assert desired_firewall(snap(nets, eps)).chains


def test_bare_jumps_of_an_older_release_are_replaced_by_the_interface_scoped_ones():
    """Upgrade: `-j CANAL-INPUT` / raw `-j CANAL-PREROUTING` (before the jumps carried -i cnl+)
    are deleted and the scoped jumps inserted first, in the same restore."""
    fw, ipt = firewall()
    state = desired_firewall(snap({"h1/n1": NET}, {"e1": EP}))
    fw.apply(state)
    ipt.tables["filter"].rules["INPUT"][0] = "-j CANAL-INPUT"
    ipt.tables["raw"].rules["PREROUTING"][0] = "-j CANAL-PREROUTING"
    assert fw.apply(state, read_back=True) is True
    assert ipt.tables["filter"].rules["INPUT"] == ["-i cnl+ -j CANAL-INPUT"]
    assert ipt.tables["raw"].rules["PREROUTING"] == ["-i cnl+ -j CANAL-PREROUTING"]
    assert fw.apply(state, read_back=True) is False


def test_jumps_are_put_back_first_when_another_tool_inserts_ahead_of_them():
    fw, ipt = firewall()
    state = desired_firewall(snap({"h1/n1": NET}, {"e1": EP}))
    fw.apply(state)
    forward = ipt.tables["filter"].rules["FORWARD"]
    forward.insert(0, "-i eth0 -j DROP")  # ufw, a script, ...
    ipt.tables["filter"].rules["INPUT"].insert(0, "-j ACCEPT")
    assert fw.apply(state, read_back=True) is True
    assert ipt.tables["filter"].rules["FORWARD"][:2] == [f"-j {FORWARD}", "-i eth0 -j DROP"]
    assert ipt.tables["filter"].rules["INPUT"][0] == "-i cnl+ -j CANAL-INPUT"
    # Docker re-inserting DOCKER-USER on top (every network create) is accepted as it is: no
    # fight over the first slot.
    forward = ipt.tables["filter"].rules["FORWARD"]
    forward.remove("-j DOCKER-USER")
    forward.insert(0, "-j DOCKER-USER")
    assert fw.apply(state, read_back=True) is False
    forward.remove("-j DOCKER-USER")
    forward.insert(1, "-j DOCKER-USER")  # ours first, then DOCKER-USER: also fine
    assert fw.apply(state, read_back=True) is False


def test_an_endpoint_is_closed_until_its_network_name_is_known():
    from canal.policy.compiler import endpoint_chain

    unnamed = {**NET, "name": ""}
    state = desired_firewall(snap({"h1/n1": unnamed}, {"e1": EP}))
    assert state.chains[("filter", endpoint_chain(EP["id"], "Egress"))][-1] == "-j DROP"
    assert state.chains[("filter", endpoint_chain(EP["id"], "Ingress"))][-1] == "-j DROP"
    # Positive control: named, the same endpoint follows its network's profile.
    state = desired_firewall(snap({"h1/n1": NET}, {"e1": EP}))
    assert state.chains[("filter", endpoint_chain(EP["id"], "Egress"))][-1] == "-j RETURN"


def test_raw_table_drops_spoofed_sources_and_tunnels_from_workloads_and_all_ipv6():
    from canal.agent.desired import PREROUTING, DataplaneSettings

    s = snap({"h1/n1": NET}, {"e1": EP})
    s = Snapshot(s.host, s.cluster_network, s.networks, s.endpoints, settings=DataplaneSettings(vxlan_port=4789))
    state = desired_firewall(s)
    raw = state.chains[("raw", PREROUTING)]
    assert raw[0] == "-i cnl+ -m rpfilter --invert -j DROP"  # before conntrack, before anything
    assert "-i cnl+ -p udp -m udp --dport 4789 -j DROP" in raw
    assert any("-p 4 " in r or "-p ipencap " in r for r in raw) and any("-p esp " in r for r in raw)
    assert ("raw", "PREROUTING", PREROUTING) in [(j.table, j.builtin, j.chain) for j in state.jumps]
    assert state.chains6[("raw", PREROUTING)] == ["-i cnl+ -j DROP"]
    assert state.chains6[("filter", "CANAL-FORWARD")] == ["-i cnl+ -j DROP", "-o cnl+ -j DROP"]
    # Programmed through the v6 applier too, and removed with everything else.
    ipt, ipt6 = FakeIptables(DOCKER_SAVE), FakeIptables()
    fw = Firewall(ipt, FakeIpsets(ipt), ip6tables=ipt6)
    assert fw.apply(state) is True
    assert ipt6.save()["raw"].rules["PREROUTING"] == [f"-i cnl+ -j {PREROUTING}"]
    assert fw.apply(state) is False
    fw.apply(FirewallState())
    assert not any(c.startswith("CANAL-") for t in ipt6.save().values() for c in t.chains)


def _replay(have: list[str], edits: list[str], chain: str = "CANAL-X") -> list[str]:
    rules = list(have)
    for line in edits:
        op, name, rest = line.split(" ", 2)
        assert name == chain
        if op == "-D":
            rules.remove(rest)
        else:
            position, spec = rest.split(" ", 1)
            assert op == "-I" and 1 <= int(position) <= len(rules) + 1
            rules.insert(int(position) - 1, spec)
    return rules


def test_a_long_chain_with_a_few_changes_is_edited_not_rewritten():
    from canal.dataplane.firewall import _edits

    have = [f"-i cnl{i:04d} -g CANAL-FW-{i:04d}" for i in range(1500)]
    joined = have[:700] + ["-i cnlnew -g CANAL-FW-new"] + have[700:]
    assert _edits("CANAL-X", have, joined) == ["-I CANAL-X 701 -i cnlnew -g CANAL-FW-new"]
    assert _edits("CANAL-X", joined, have) == ["-D CANAL-X -i cnlnew -g CANAL-FW-new"]
    assert _edits("CANAL-X", have, have[:10]) is None  # most of it gone: a rewrite is smaller
    # A rule to delete that is not unique: a delete by spec would take the first one.
    assert _edits("CANAL-X", ["-j A", "-j B", "-j A"], ["-j B", "-j A"]) is None
    # Whatever the changes, replaying the edits gives exactly the wanted chain, in order.
    rng = random.Random(7)
    for _ in range(500):
        pool = [f"-s 10.0.0.{i} -j DROP" for i in range(60)]
        have = rng.sample(pool, rng.randint(0, 40))
        want = list(have)
        for _ in range(rng.randint(0, 6)):
            choice = rng.random()
            if choice < 0.4 and want:
                want.pop(rng.randrange(len(want)))
            elif choice < 0.8:
                want.insert(rng.randint(0, len(want)), rng.choice(pool))
            elif want:
                want[rng.randrange(len(want))] = rng.choice(pool)
        edits = _edits("CANAL-X", have, want)
        if edits is not None:
            assert _replay(have, edits) == want, (have, want, edits)


def test_restore_text_edits_changed_chains_in_place():
    chain = [f"-i cnl{i:04d} -g CANAL-FW-{i:04d}" for i in range(100)]
    before = FirewallState(chains={("filter", "CANAL-X"): chain})
    after = FirewallState(chains={("filter", "CANAL-X"): chain[:50] + ["-i cnlnew -j DROP"] + chain[50:]})
    text = restore_text(after, tables_of(before))
    assert text == "*filter\n-I CANAL-X 51 -i cnlnew -j DROP\nCOMMIT\n"


def test_ipset_members_are_checked_exactly_as_ipaddress_would():
    """valid_member checks IPv4 members with one regex (a restart writes 175,000 of them); it
    must accept exactly what the dotted-quad pattern plus ipaddress.IPv4Network accepted."""
    import ipaddress
    import random
    import re

    from canal.dataplane.ipset import valid_member

    def reference(member):
        if not re.fullmatch(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?:/[0-9]{1,2})?", member):
            return False
        try:
            ipaddress.IPv4Network(member, strict=False)
        except ValueError:
            return False
        return True

    rnd = random.Random(7)
    candidates = ["1.2.3.4/33", "1.2.3.4/032", "1.2.3.4/00", "1.2.3.4/0", "1.2.3.4/", "01.2.3.4", "1.2.3.4/32",
                  "1.2.3.4\n", "1.2.3.4/3\n", "\u0661.2.3.4", " 1.2.3.4", "255.255.255.255/32", "256.0.0.0"]
    for _ in range(20000):
        member = ".".join(rnd.choice([str(rnd.randint(0, 300)), "0" + str(rnd.randint(0, 99)), str(rnd.randint(0, 255))])
                          for _ in range(rnd.choice([3, 4, 4, 4, 5])))
        if rnd.random() < 0.5:
            member += "/" + rnd.choice([str(rnd.randint(0, 40)), "0" + str(rnd.randint(0, 9))])
        candidates.append(member)
    for member in candidates:
        assert valid_member(member) == reference(member), member
