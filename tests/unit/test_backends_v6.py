"""IPv6 over host-gw, vxlan DirectRouting and WireGuard: the backends' desired state from
dual-stack leases (subnet6, PublicIPv6) and /128 route records, and the ip6tables half of an
encrypted network's fail-closed rules. Pure, no root."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address as A, IPv4Network as N, IPv6Address as A6, IPv6Network as N6

import pytest
from test_firewall import EP, NET, snap

from canal.agent.desired import (
    CLUSTER_SET6, ENCRYPT_CHAIN, ENCRYPTED_SET, ENCRYPTED_SET6, MARK_CHAIN, desired_firewall, encrypted_ips6,
    remote_routes6,
)
from canal.backends import hostgw, vxlan, wireguard
from canal.backends.base import BackendConfig, HostRoute6, destinations6, on_link
from canal.backends.manager import desired_state
from canal.dataplane.links import host_ifname
from canal.dataplane.wireguard import RT_TABLE_MAIN, WG_TABLE, WgPeer
from canal.errors import BadRequest
from canal.records import Lease, RouteRecord

K1 = "YPrMx+AOvB5f/aqi9Wk22FhdeRCkc1Z4tHh8LrWR+hk="
K2 = "LR5eRhAAA39PgpT7Erc4uAyDZPzzquVKcb/hAS8EX3s="
OWN = N("10.1.1.0/24")
UNDERLAY = (N("198.18.0.0/24"), N6("2001:2::/64"))
ME = Lease(OWN, "198.18.0.1", "aa:bb:cc:00:00:01", subnet6=N6("fd00:1:0:1::/64"), public_ip6="2001:2::1")
# vxlan peers: v6 on-link, v6 elsewhere, no PublicIPv6, no IPv6 at all
VX = Lease(N("10.1.2.0/24"), "198.18.0.2", "aa:bb:cc:00:00:02", subnet6=N6("fd00:1:0:2::/64"), public_ip6="2001:2::2")
VX_FAR6 = Lease(N("10.1.3.0/24"), "198.18.0.3", "aa:bb:cc:00:00:03", subnet6=N6("fd00:1:0:3::/64"),
                public_ip6="2001:2:0:9::3")
VX_NO6 = Lease(N("10.1.4.0/24"), "198.18.0.4", "aa:bb:cc:00:00:04", subnet6=N6("fd00:1:0:4::/64"))
VX_V4 = Lease(N("10.1.5.0/24"), "198.18.0.5", "aa:bb:cc:00:00:05")
GW = dataclasses.replace(VX, vtep_mac="", backend_type="host-gw")
GW_FAR6 = dataclasses.replace(VX_FAR6, vtep_mac="", backend_type="host-gw")
GW_NO6 = dataclasses.replace(VX_NO6, vtep_mac="", backend_type="host-gw")


def test_on_link_checks_each_family_against_its_own_prefixes():
    assert on_link("2001:2::9", UNDERLAY) and not on_link("2001:2:0:9::3", UNDERLAY)
    assert on_link("198.18.0.9", UNDERLAY) and not on_link("2001:2::9", (N("198.18.0.0/24"),))


def test_destinations6_are_the_subnet6_and_the_128s_outside_it():
    owned = [A6("fd00:1:0:2::5"), A6("fd00:9::7")]
    assert destinations6(VX, owned) == [N6("fd00:1:0:2::/64"), N6("fd00:9::7/128")]
    # A lease without subnet6 (cluster-wide IPv6 pools): every /128 it owns
    assert destinations6(VX_V4, owned) == [N6("fd00:1:0:2::5/128"), N6("fd00:9::7/128")]
    assert destinations6(VX_V4, []) == []


def test_host_gw_routes_v6_via_public_ipv6_on_link_and_names_the_others():
    routes6 = [HostRoute6(A6("fd00:9::7"), GW.subnet), HostRoute6(A6("fd00:1:0:2::5"), GW.subnet),
               HostRoute6(A6("fd00:9::8"), GW_FAR6.subnet), HostRoute6(A6("fd00:9::99"), N("10.1.99.0/24"))]
    desired = hostgw.desired(BackendConfig("host-gw"), [ME, GW, GW_FAR6, GW_NO6], [], OWN, UNDERLAY, routes6)
    assert desired.direct == {
        GW.subnet: A("198.18.0.2"), GW_FAR6.subnet: A("198.18.0.3"), GW_NO6.subnet: A("198.18.0.4"),
        N6("fd00:1:0:2::/64"): A6("2001:2::2"), N6("fd00:9::7/128"): A6("2001:2::2"),  # the /128 inside subnet6: not
    }
    problems = "\n".join(desired.problems)
    # IPv4 of the off-link-v6 peer is still routed; its IPv6 is named as not routed
    assert "2001:2:0:9::3 is not on the same L2 segment" in problems and "2001:2::/64" in problems
    assert "peer 198.18.0.4" in problems and "no PublicIPv6" in problems
    assert "host route fd00:9::99 via subnet 10.1.99.0/24: no routable peer" in problems
    assert desired.direct6_peers == {GW.subnet}
    # Without any IPv6 prefix on the underlay, nothing IPv6 is routed, every peer named
    v4_only = hostgw.desired(BackendConfig("host-gw"), [ME, GW], [], OWN, (N("198.18.0.0/24"),), routes6[:1])
    assert set(v4_only.direct) == {GW.subnet} and "IPv6 prefixes: none" in v4_only.problems[0]


def test_host_gw_v4_only_peers_need_nothing_v6():
    desired = hostgw.desired(BackendConfig("host-gw"), [ME, dataclasses.replace(VX_V4, backend_type="host-gw")],
                             [], OWN, UNDERLAY)
    assert desired.direct == {VX_V4.subnet: A("198.18.0.5")} and desired.problems == ()


def test_vxlan_direct_routing_v6_per_peer_others_over_the_tunnel():
    routes6 = [HostRoute6(A6("fd00:9::7"), VX.subnet), HostRoute6(A6("fd00:9::8"), VX_FAR6.subnet)]
    leases = [ME, VX, VX_FAR6, VX_NO6]
    plain = vxlan.desired(BackendConfig("vxlan"), leases, [], OWN, UNDERLAY, routes6)
    assert plain.direct == {} and plain.direct6_peers == frozenset() and plain.problems == ()
    direct = vxlan.desired(BackendConfig("vxlan", direct_routing=True), leases, [], OWN, UNDERLAY, routes6)
    assert {k: v for k, v in direct.direct.items() if k.version == 6} == {
        N6("fd00:1:0:2::/64"): A6("2001:2::2"), N6("fd00:9::7/128"): A6("2001:2::2")}
    assert direct.direct6_peers == {VX.subnet}  # VX_FAR6 and VX_NO6: their IPv6 over the tunnel
    assert direct.problems == ()  # not being on-link is no problem for a vxlan peer: the tunnel carries it
    # a host-gw peer in a vxlan cluster: IPv6 only directly, else named
    mixed = vxlan.desired(BackendConfig("vxlan"), [ME, GW, GW_FAR6], [], OWN, UNDERLAY)
    assert mixed.direct[N6("fd00:1:0:2::/64")] == A6("2001:2::2") and mixed.direct6_peers == {GW.subnet}
    assert any("2001:2:0:9::3 is not on the same L2 segment" in p for p in mixed.problems)


def test_the_v6_tunnel_leaves_directly_routed_peers_alone():
    records = {str(ip): RouteRecord(ip, host, subnet) for ip, host, subnet in [
        (A6("fd00:9::7"), "h2", VX.subnet), (A6("fd00:9::8"), "h3", VX_FAR6.subnet)]}
    s = dataclasses.replace(snap(), own_subnet=OWN, leases=(ME, VX, VX_FAR6), routes6=records)
    assert remote_routes6(s) == [(A6("fd00:9::7"), VX.vtep_mac), (A6("fd00:9::8"), VX_FAR6.vtep_mac)]
    assert remote_routes6(s, exclude=frozenset({VX.subnet})) == [(A6("fd00:9::8"), VX_FAR6.vtep_mac)]
    desired = desired_state(BackendConfig("vxlan", direct_routing=True), s, UNDERLAY)
    assert desired.direct6_peers == {VX.subnet}
    assert desired.direct[N6("fd00:9::7/128")] == A6("2001:2::2") and N6("fd00:9::8/128") not in desired.direct


WG_ME = dataclasses.replace(ME, vtep_mac="", backend_type="wireguard", public_key=K1, wg_port=51820)
WG_P2 = dataclasses.replace(VX, vtep_mac="", backend_type="wireguard", public_key=K2, public_key6=K2)
WG_NOKEY = dataclasses.replace(VX_FAR6, vtep_mac="", backend_type="wireguard")


def test_wireguard_peers_carry_both_families_in_one_tunnel():
    routes = [wireguard.HostRoute(A("10.9.0.7"), WG_P2.subnet)]
    routes6 = [HostRoute6(A6("fd00:9::7"), WG_P2.subnet), HostRoute6(A6("fd00:1:0:2::5"), WG_P2.subnet),
               HostRoute6(A6("fd00:9::8"), WG_NOKEY.subnet)]
    found, dsts, problems = wireguard.peers([WG_ME, WG_P2, WG_NOKEY], routes, OWN, 51820, routes6)
    allowed = (N("10.1.2.0/24"), N("10.9.0.7/32"), N6("fd00:1:0:2::/64"), N6("fd00:9::7/128"))
    assert found == (WgPeer(K2, "198.18.0.2:51820", allowed),)  # the IPv4 endpoint, as today
    assert dsts == allowed  # a keyless peer's IPv6 is not routed through the tunnel either
    assert any("198.18.0.3" in p and "no WireGuard key" in p for p in problems)
    state, _ = wireguard.state(BackendConfig("wireguard"), [WG_ME, WG_P2], routes, OWN, RT_TABLE_MAIN,
                               host_routes6=routes6)
    assert (state.address, state.address6) == (A("10.1.1.0"), A6("fd00:1:0:1::"))


def test_wireguard_leaves_out_the_v6_of_a_flanneld_separate_mode_peer():
    separate = dataclasses.replace(WG_P2, public_key6=K1[:-2] + "B=")  # flannel-wg-v6's own key
    found, dsts, problems = wireguard.peers([WG_ME, separate], [], OWN, 51820)
    assert found == (WgPeer(K2, "198.18.0.2:51820", (N("10.1.2.0/24"),)),) and dsts == (N("10.1.2.0/24"),)
    assert any("Mode \"separate\"" in p and "198.18.0.2" in p for p in problems)


def test_encrypted_network_on_a_vxlan_cluster_routes_v6_in_the_marked_table_with_throws():
    state, _ = wireguard.state(BackendConfig("vxlan"), [WG_ME, WG_P2], [], OWN, WG_TABLE,
                               [A("10.1.1.5"), A6("fd00:1:0:2::77"), A6("fd00:1:0:1::5")])
    assert state.table == WG_TABLE and N6("fd00:1:0:2::/64") in state.routes
    assert state.throws == (N6("fd00:1:0:2::77/128"),)  # a local address inside the peer's v6 subnet


EP6 = {**EP, "ip6": "fd00:1:0:1::2"}
NET6 = {**NET, "pools6": ["::/0"]}


def encrypted_snap6(encrypt_all=False, ipv6_here=True):
    nets = {"n1": {**(NET6 if ipv6_here else NET), "encrypted": True}}
    eps = {"e1": EP6 if ipv6_here else EP,
           "e3": {**EP, "id": "e3" * 32, "host": "h2", "ip": "100.64.9.2", "mac": "02:42:64:40:09:02",
                  "ip6": "fd00:1:0:2::2"}}
    nets["n3"] = {**NET6, "host": "h2", "encrypted": True}
    return dataclasses.replace(snap(nets, eps), encrypt_all=encrypt_all, cluster_network6="fd00:1::/48")


def test_encrypted_v6_fails_closed_in_ip6tables_exactly_as_v4():
    s = encrypted_snap6()
    assert encrypted_ips6(s) == {"fd00:1:0:1::2", "fd00:1:0:2::2"}
    state = desired_firewall(s)
    sets = {x.name: x for x in state.ipsets}
    assert sets[ENCRYPTED_SET6].members == frozenset({"fd00:1:0:1::2", "fd00:1:0:2::2"})
    assert sets[ENCRYPTED_SET6].family == "inet6" and CLUSTER_SET6 in sets and ENCRYPTED_SET in sets
    veth = host_ifname(EP["id"])
    for chains in (state.chains, state.chains6):  # the same rules in both families
        forward = chains[("filter", "CANAL-FORWARD")]
        assert forward[:2] == [f"-m mark --mark 0x100000/0x100000 -j {ENCRYPT_CHAIN}-OUT",
                               f"-o {veth} -j {ENCRYPT_CHAIN}-IN"]
        assert chains[("filter", f"{ENCRYPT_CHAIN}-OUT")][0] == "-o flannel-wg -j RETURN"
        assert chains[("filter", f"{ENCRYPT_CHAIN}-OUT")][-1] == "-j DROP"
        assert chains[("filter", f"{ENCRYPT_CHAIN}-IN")][-1] == "-j DROP"
        assert chains[("mangle", MARK_CHAIN)][0] == f"-i {veth} -j MARK --set-xmark 0x100000/0x100000"
        assert chains[("filter", "CANAL-OUTPUT")] == ["-m mark --mark 0x100000/0x100000 -j CANAL-ENCRYPT-OUT"]
    assert f"-m set ! --match-set {CLUSTER_SET6} dst -j RETURN" in state.chains6[("filter", f"{ENCRYPT_CHAIN}-OUT")]
    assert f"-m set --match-set {ENCRYPTED_SET6} dst -j MARK --set-xmark 0x100000/0x100000" in \
        state.chains6[("mangle", f"{MARK_CHAIN}-OUT")]
    assert {(j.table, j.chain) for j in state.jumps6} >= {("mangle", MARK_CHAIN), ("filter", "CANAL-OUTPUT")}
    # Cluster-wide wireguard: every workload's IPv6 too
    everything = desired_firewall(encrypted_snap6(encrypt_all=True))
    assert everything.chains6[("filter", "CANAL-FORWARD")][:2] == [
        f"-i cnl+ -j {ENCRYPT_CHAIN}-OUT", f"-o cnl+ -j {ENCRYPT_CHAIN}-IN"]


def test_no_v6_encryption_rules_without_encrypted_v6_endpoints():
    plain = desired_firewall(dataclasses.replace(snap({"n1": NET6}, {"e1": EP6}), cluster_network6="fd00:1::/48"))
    assert ENCRYPTED_SET6 not in {x.name for x in plain.ipsets}
    assert not any(ENCRYPT_CHAIN in r for r in plain.chains6[("filter", "CANAL-FORWARD")])
    # An encrypted IPv4-only network here, a remote one with IPv6: the host's v6 path to it is still guarded
    s = encrypted_snap6(ipv6_here=False)
    state = desired_firewall(s)
    assert state.chains6[("filter", "CANAL-OUTPUT")] == ["-m mark --mark 0x100000/0x100000 -j CANAL-ENCRYPT-OUT"]
    assert state.chains6[("filter", "CANAL-FORWARD")][-2:] == ["-i cnl+ -j DROP", "-o cnl+ -j DROP"]


def test_a_dual_stack_lease_publishes_the_wireguard_key_for_both_families(store):
    """flanneld's Mode "auto" reads a dual-stack peer's key from BackendV6Data: the same key."""
    from test_lease_dual_stack_write import DUAL, lease_entries, manager

    mgr = manager(store, {**DUAL, "Backend": {"Type": "wireguard"}})
    lease = mgr.acquire("198.18.0.1", "", wg=(K1, 51820), public_ip6="2001:2::1")
    value = lease_entries(store)[lease.name]
    assert value["BackendData"] == {"PublicKey": K1, "Port": 51820}
    assert value["BackendV6Data"] == {"PublicKey": K1, "Port": 51820} and value["PublicIPv6"] == "2001:2::1"
    parsed = Lease.parse(lease.name, value)
    assert (parsed.public_key, parsed.public_key6) == (K1, K1)
    # a vxlan lease with an encrypted network here: the VTEP's data and the key side by side
    vx = manager(store).acquire("198.18.0.2", "02:00:00:00:00:02", wg=(K2, 51820), public_ip6="2001:2::2",
                                vtep_mac6="02:00:00:00:01:02")
    assert lease_entries(store)[vx.name]["BackendV6Data"] == {"VNI": 1, "VtepMAC": "02:00:00:00:01:02",
                                                               "PublicKey": K2, "Port": 51820}
    # without an IPv6 underlay: no BackendV6Data at all
    v4 = manager(store).acquire("198.18.0.3", "02:00:00:00:00:03", wg=(K2, 51820))
    assert "BackendV6Data" not in lease_entries(store)[v4.name]


def test_wireguard_mode_is_flannels_and_ipv6_mode_uses_the_public_ipv6_endpoints():
    from canal.backends.base import parse_backend

    assert parse_backend({"Type": "wireguard"}).mode == "auto"
    assert parse_backend({"Type": "wireguard", "mode": "separate"}).mode == "separate"
    with pytest.raises(BadRequest, match="Backend Mode 'both' is not one of auto, separate, ipv4, ipv6"):
        parse_backend({"Type": "wireguard", "Mode": "both"})
    found, _dsts, _problems = wireguard.peers([WG_ME, WG_P2, WG_NOKEY], [], OWN, 51820, mode="ipv6")
    assert [p.endpoint for p in found] == ["[2001:2::2]:51820"]
    v4_only = dataclasses.replace(WG_P2, public_ip6="")  # no PublicIPv6: its IPv4 endpoint still
    assert [p.endpoint for p in wireguard.peers([WG_ME, v4_only], [], OWN, 51820, mode="ipv6")[0]] == \
        ["198.18.0.2:51820"]
    assert [p.endpoint for p in wireguard.peers([WG_ME, WG_P2], [], OWN, 51820, mode="separate")[0]] == \
        ["198.18.0.2:51820"]
