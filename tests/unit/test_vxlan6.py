"""IPv6 between vxlan hosts (canal.backends.vxlan6): the pure desired state per peer kind."""

from __future__ import annotations

import ipaddress

from canal.backends.vxlan6 import desired6, public6
from canal.dataplane.routes6 import link_local
from canal.dataplane.vxlan6 import vxlan6_mtu
from canal.records import Lease

N6 = ipaddress.IPv6Network("fd00:64::/48")
V4 = {i: ipaddress.IPv4Network(f"100.64.{i}.0/24") for i in range(1, 8)}
V6 = {i: ipaddress.IPv6Network(f"fd00:64:0:{i}::/64") for i in range(1, 8)}


def lease(i: int, public6: str = "", mac6: str = "", v6: bool = True, mac: str | None = None) -> Lease:
    return Lease(V4[i], f"198.18.0.{i}", mac if mac is not None else f"02:00:00:00:00:0{i}", 0, "vxlan",
                 subnet6=V6[i] if v6 else None, public_ip6=public6, vtep_mac6=mac6)


OWN = lease(1, "2001:2::1", "02:00:00:66:00:01")
CANAL = frozenset(f"198.18.0.{i}" for i in (1, 2, 3))  # hosts 4+ are flanneld


def test_both_with_a_v6_underlay_use_flannel_v6_as_flanneld():
    peer = lease(2, "2001:2::2", "02:00:00:66:00:02")
    flanneld = lease(4, "2001:2::4", "02:00:00:66:00:04")
    d = desired6([OWN, peer, flanneld], OWN, "2001:2::1", N6, CANAL)
    assert d.device is not None and d.device.address == ipaddress.IPv6Address("fd00:64:0:1::")
    hop2, hop4 = V6[2].network_address, V6[4].network_address
    assert d.device.neighbours == {hop2: "02:00:00:66:00:02", hop4: "02:00:00:66:00:04"}
    assert d.device.fdb == {"02:00:00:66:00:02": ipaddress.IPv6Address("2001:2::2"),
                            "02:00:00:66:00:04": ipaddress.IPv6Address("2001:2::4")}
    assert d.device.routes == {V6[2]: hop2, V6[4]: hop4}
    assert not d.tunnel4.routes and not d.problems


def test_a_canal_peer_without_v6_underlay_goes_into_flannel_v4_per_subnet():
    peer = lease(2)  # no PublicIPv6
    d = desired6([OWN, peer], OWN, "2001:2::1", N6, CANAL)
    hop = link_local("02:00:00:00:00:02")
    assert d.tunnel4.routes == {V6[2]: hop} and d.tunnel4.neighbours == {hop: "02:00:00:00:00:02"}
    assert d.device is not None and not d.device.routes  # our device still there for others
    # The peer's view of us, symmetric: we have a v6 underlay, it has none -> flannel.1 too.
    back = desired6([OWN, peer], peer, "", N6, CANAL)
    assert back.device is None and back.tunnel4.routes == {V6[1]: link_local("02:00:00:00:00:01")}


def test_flanneld_peers_that_cannot_carry_v6_are_named():
    no_public6 = lease(4)
    d = desired6([OWN, no_public6], OWN, "2001:2::1", N6, CANAL)
    assert not d.tunnel4.routes and len(d.problems) == 1
    assert "198.18.0.4" in d.problems[0] and "no usable PublicIPv6" in d.problems[0]
    # We without a v6 underlay, a flanneld peer with one: it speaks only flannel-v6.
    own4 = lease(1)
    d = desired6([own4, lease(5, "2001:2::5", "02:00:00:66:00:05")], own4, "", N6, CANAL)
    assert d.device is None and not d.tunnel4.routes
    assert len(d.problems) == 1 and "198.18.0.5" in d.problems[0] and "no IPv6 underlay" in d.problems[0]
    # A v4-only lease in a dual-stack cluster.
    d = desired6([OWN, lease(6, v6=False)], OWN, "2001:2::1", N6, CANAL)
    assert "198.18.0.6" in d.problems[0] and "no IPv6 subnet" in d.problems[0]


def test_lease_input_is_validated():
    bad = [
        Lease(V4[2], "198.18.0.2", "02:00:00:00:00:02", 0, "vxlan", subnet6=ipaddress.IPv6Network("fd01::/64"),
              public_ip6="2001:2::2", vtep_mac6="02:00:00:66:00:02"),  # outside the cluster's network
        Lease(V4[3], "198.18.0.3", "02:00:00:00:00:03", 0, "vxlan", subnet6=V6[1],
              public_ip6="2001:2::3", vtep_mac6="02:00:00:66:00:03"),  # our own v6 subnet
        Lease(V4[4], "198.18.0.4", "02:00:00:00:00:04", 0, "vxlan", subnet6=V6[4],
              public_ip6="fe80::4", vtep_mac6="02:00:00:66:00:04"),  # link-local underlay: flanneld, unusable
    ]
    d = desired6([OWN, *bad], OWN, "2001:2::1", N6, CANAL)
    assert d.device is not None and not d.device.routes and not d.tunnel4.routes
    assert len(d.problems) == 3
    text = "\n".join(d.problems)
    assert "outside the cluster's IPv6 network" in text and "overlaps the one of this host" in text
    assert "198.18.0.4" in text and "no IPv6 underlay" not in text
    # Two peers on one v6 subnet: the first (by subnet order) wins on every host; the other is named.
    twin_a = lease(2, "2001:2::2", "02:00:00:66:00:02")
    twin_b = Lease(V4[3], "198.18.0.3", "02:00:00:00:00:03", 0, "vxlan", subnet6=V6[2],
                   public_ip6="2001:2::3", vtep_mac6="02:00:00:66:00:03")
    d = desired6([OWN, twin_b, twin_a], OWN, "2001:2::1", N6, CANAL)
    assert d.device is not None and d.device.fdb == {"02:00:00:66:00:02": ipaddress.IPv6Address("2001:2::2")}
    assert len(d.problems) == 1 and "198.18.0.3" in d.problems[0]
    assert public6("::ffff:198.18.0.1") is None and public6("ff02::1") is None and public6("2001:2::1") is not None


def test_route_records_follow_their_hosts_path_and_never_claim_ours():
    v6peer, v4peer = lease(2, "2001:2::2", "02:00:00:66:00:02"), lease(3)
    records = [(ipaddress.IPv6Address("fd00:c0a1::2"), V4[2]), (ipaddress.IPv6Address("fd00:c0a1::3"), V4[3]),
               (ipaddress.IPv6Address("fd00:64:0:1::9"), V4[3]),  # forged: inside our subnet
               (ipaddress.IPv6Address("fd00:c0a1::7"), V4[7])]  # no lease: skipped
    d = desired6([OWN, v6peer, v4peer], OWN, "2001:2::1", N6, CANAL, records)
    assert d.device is not None
    assert d.device.routes[ipaddress.IPv6Network("fd00:c0a1::2/128")] == V6[2].network_address
    assert d.tunnel4.routes[ipaddress.IPv6Network("fd00:c0a1::3/128")] == link_local("02:00:00:00:00:03")
    assert ipaddress.IPv6Network("fd00:64:0:1::9/128") not in d.tunnel4.routes
    assert ipaddress.IPv6Network("fd00:c0a1::7/128") not in {**d.tunnel4.routes, **d.device.routes}


def test_without_v6_subnets_only_records_are_routed_as_before():
    own, peer = lease(1, v6=False), lease(2, v6=False)
    d = desired6([own, peer], own, "", None, CANAL, [(ipaddress.IPv6Address("fd00:6568::5"), V4[2])])
    assert d.device is None and not d.problems
    assert d.tunnel4.routes == {ipaddress.IPv6Network("fd00:6568::5/128"): link_local("02:00:00:00:00:02")}


def test_mtu_is_underlay_minus_70():
    assert vxlan6_mtu(1500) == 1430


def test_the_endpoint_mtu_fits_flannel_v6_when_ipv6_crosses_an_ipv6_underlay():
    """One MTU for both families: with an IPv6 underlay and the cluster's IPv6 network, IPv6
    goes through flannel-v6.<VNI> (outer IPv6, 70 bytes), so no packet relies on PMTU."""
    import ipaddress

    from canal.backends.base import BackendConfig
    from canal.backends.manager import BackendManager
    from canal.config import Config
    from canal.services.subnets import NetworkConfig

    def manager(public_ip6, ipv6_network, kind="vxlan"):
        net = ipaddress.IPv4Network("100.64.0.0/16")
        cfg = NetworkConfig(net, 24, net, net, {"Type": kind}, BackendConfig(kind),
                            ipaddress.IPv6Network(ipv6_network) if ipv6_network else None)
        return BackendManager(Config(), None, None, lambda: cfg, "eth0", "198.18.0.1", 1500, public_ip6=public_ip6)

    assert manager("", None).default_mtu() == 1450
    assert manager("", "fd00:64::/48").default_mtu() == 1450  # v6 rides flannel.<VNI>'s IPv4 outer header
    assert manager("2001:2::1", None).default_mtu() == 1450  # no IPv6 in the cluster
    assert manager("2001:2::1", "fd00:64::/48").default_mtu() == 1430
    assert manager("2001:2::1", "fd00:64::/48", "host-gw").default_mtu() == 1500
