"""Each backend's desired state from the leases: pure, no root."""

from __future__ import annotations

from ipaddress import IPv4Address as A, IPv4Network as N

import pytest

from canal.backends import hostgw, vxlan
from canal.backends.base import BackendConfig, on_link, parse_backend
from canal.dataplane.vxlan import HostRoute
from canal.errors import BadRequest, CanalError
from canal.records import Lease
from canal.services.subnets import parse_network_config

OWN = N("10.1.1.0/24")
UNDERLAY = (N("198.18.0.0/24"),)
ME = Lease(OWN, "198.18.0.1", "aa:bb:cc:00:00:01")
VX = Lease(N("10.1.2.0/24"), "198.18.0.2", "aa:bb:cc:00:00:02")  # vxlan, on-link
VX_FAR = Lease(N("10.1.3.0/24"), "203.0.113.3", "aa:bb:cc:00:00:03")  # vxlan, elsewhere
GW = Lease(N("10.1.4.0/24"), "198.18.0.4", "", backend_type="host-gw")
GW_FAR = Lease(N("10.1.5.0/24"), "203.0.113.5", "", backend_type="host-gw")
UDP = Lease(N("10.1.6.0/24"), "198.18.0.6", "", backend_type="udp")


def test_parse_backend_types_and_defaults():
    assert parse_backend(None) == BackendConfig(type="udp")  # flannel's default
    assert parse_backend({"Type": "vxlan"}) == BackendConfig("vxlan", 1, 0, False)
    assert parse_backend({"type": "vxlan", "vni": 7, "port": 4789, "directrouting": True}) == \
        BackendConfig("vxlan", 7, 4789, True)
    assert parse_backend({"Type": "host-gw"}).type == "host-gw"
    assert parse_network_config({"Network": "10.1.0.0/16", "Backend": {"Type": "host-gw"}}).backend_config.type == "host-gw"


@pytest.mark.parametrize("raw, message", [
    ([], "is not an object"),
    ({"Type": 3}, "Type 3 is not a backend name"),
    ({"Type": "Host GW"}, "is not a backend name"),
    ({"Type": "vxlan", "DirectRouting": "yes"}, "DirectRouting 'yes' is not true or false"),
    ({"Type": "vxlan", "VNI": 0}, "VNI 0 is not an integer"),
    ({"Type": "vxlan", "Port": 70000}, "Port 70000"),
])
def test_parse_backend_refuses_bad_fields(raw, message):
    with pytest.raises(BadRequest, match=message):
        parse_backend(raw)
    with pytest.raises(BadRequest, match=message):
        parse_network_config({"Network": "10.1.0.0/16", "Backend": raw})


def test_unsupported_backend_is_named():
    with pytest.raises(CanalError, match="Backend Type 'udp' is not supported by Canal"):
        BackendConfig(type="udp").require_supported()


def test_on_link():
    assert on_link("198.18.0.9", UNDERLAY) and not on_link("203.0.113.3", UNDERLAY)
    assert not on_link("nonsense", UNDERLAY)


def test_vxlan_without_direct_routing_tunnels_every_vxlan_peer():
    d = vxlan.desired(BackendConfig("vxlan"), [ME, VX, VX_FAR], [], OWN, UNDERLAY)
    assert d.vxlan is not None and set(d.vxlan.routes) == {VX.subnet, VX_FAR.subnet}
    assert d.direct == {} and d.problems == ()


def test_vxlan_direct_routing_decides_per_peer():
    routes = [HostRoute(A("10.9.0.7"), VX.subnet), HostRoute(A("10.9.0.8"), VX_FAR.subnet)]
    d = vxlan.desired(BackendConfig("vxlan", direct_routing=True), [ME, VX, VX_FAR, GW], routes, OWN, UNDERLAY)
    assert d.direct == {VX.subnet: A("198.18.0.2"), GW.subnet: A("198.18.0.4"), N("10.9.0.7/32"): A("198.18.0.2")}
    assert d.vxlan is not None
    assert d.vxlan.routes == {VX_FAR.subnet: A("10.1.3.0"), N("10.9.0.8/32"): A("10.1.3.0")}
    assert d.vxlan.fdb == {"aa:bb:cc:00:00:03": "203.0.113.3"}
    assert d.problems == ()


def test_vxlan_host_reaches_host_gw_peers_only_on_link_and_names_the_others():
    d = vxlan.desired(BackendConfig("vxlan"), [GW, GW_FAR, UDP], [], OWN, UNDERLAY)
    assert d.direct == {GW.subnet: A("198.18.0.4")}
    assert len(d.problems) == 2
    assert "peer 203.0.113.5 (subnet 10.1.5.0/24, host-gw)" in d.problems[0]
    assert "not on the same L2 segment" in d.problems[0] and "198.18.0.0/24" in d.problems[0]
    assert "uses backend udp" in d.problems[1]


def test_host_gw_routes_on_link_peers_and_refuses_the_others_by_name():
    routes = [HostRoute(A("10.9.0.7"), GW.subnet), HostRoute(A("10.9.0.8"), GW_FAR.subnet)]
    d = hostgw.desired(BackendConfig("host-gw"), [ME, GW, GW_FAR, VX, UDP], routes, OWN, UNDERLAY)
    assert d.vxlan is None
    assert d.direct == {GW.subnet: A("198.18.0.4"), VX.subnet: A("198.18.0.2"), N("10.9.0.7/32"): A("198.18.0.4")}
    text = "\n".join(d.problems)
    assert "peer 203.0.113.5 (subnet 10.1.5.0/24, host-gw)" in text and "not on the same L2 segment" in text
    assert "uses backend udp" in text and "host route 10.9.0.8" in text


def test_host_gw_is_independent_of_lease_order():
    leases = [GW, GW_FAR, VX, ME]
    assert hostgw.desired(BackendConfig("host-gw"), leases, [], OWN, UNDERLAY) == \
        hostgw.desired(BackendConfig("host-gw"), leases[::-1], [], OWN, UNDERLAY)


def test_bad_lease_data_is_refused_at_parse():
    with pytest.raises(CanalError):
        Lease.parse("10.1.4.0-24", {"PublicIP": "not-an-ip", "BackendType": "host-gw"})
    with pytest.raises(CanalError):
        Lease.parse("10.1.4.0-24", {"PublicIP": "198.18.0.4", "BackendType": "Host GW!"})
    lease = Lease.parse("10.1.4.0-24", {"PublicIP": "198.18.0.4", "BackendType": "host-gw"})
    assert lease.backend_type == "host-gw" and lease.vtep_mac == ""


def test_leases_outside_the_cluster_network_or_overlapping_genuine_ones_are_never_routed():
    """A lease key any host can write must neither divert traffic nor knock out genuine peers:
    0.0.0.0/1 (half of everything), a /25 inside a peer's /24 (more specific than the peer's
    route), the whole cluster network as one lease, a /23 over our own /24."""
    import dataclasses

    from canal.agent.desired import Snapshot
    from canal.backends.manager import desired_state, routable_leases

    half = Lease(N("0.0.0.0/1"), "198.18.0.66", "aa:bb:cc:00:00:66")
    inside_peer = Lease(N("10.1.2.128/25"), "198.18.0.67", "aa:bb:cc:00:00:67")
    everything = Lease(N("10.1.0.0/16"), "198.18.0.68", "aa:bb:cc:00:00:68")
    over_us = Lease(N("10.1.0.0/23"), "198.18.0.69", "aa:bb:cc:00:00:69")
    far = Lease(N("10.1.9.0/24"), "198.18.0.9", "aa:bb:cc:00:00:09")
    hostile = (half, inside_peer, everything, over_us)
    snap = Snapshot("h1", "10.1.0.0/16", {}, {}, own_subnet=OWN, subnet_len=24, leases=(ME, VX, far, *hostile))
    # Positive control: the backend alone, given every lease, routes the hostile ones.
    raw = vxlan.desired(BackendConfig("vxlan"), snap.leases, [], OWN, ())
    assert {N("0.0.0.0/1"), N("10.1.2.128/25"), N("10.1.0.0/16")} <= set(raw.vxlan.routes)
    kept, problems = routable_leases(snap.leases, snap.cluster_network, OWN, 24)
    assert sorted(kept, key=lambda x: x.subnet) == [ME, VX, far]
    assert len(problems) == 4
    assert any("198.18.0.66" in p and "outside the cluster network 10.1.0.0/16" in p for p in problems)
    assert any("198.18.0.67" in p and "overlaps the lease 10.1.2.0/24" in p for p in problems)
    assert any("198.18.0.68" in p and "overlaps" in p for p in problems)
    assert any("198.18.0.69" in p and "overlaps this host's subnet" in p for p in problems)
    desired = desired_state(BackendConfig("vxlan"), snap, ())
    assert set(desired.vxlan.routes) == {N("10.1.2.0/24"), N("10.1.9.0/24")} and len(desired.problems) == 4
    # SubnetLen unknown: overlapping leases are all left out (none diverts traffic).
    kept, _ = routable_leases((ME, VX, inside_peer), "10.1.0.0/16", OWN)
    assert kept == [ME]
    unknown = dataclasses.replace(snap, subnet_len=0, leases=(ME, VX, far, inside_peer))
    assert set(desired_state(BackendConfig("vxlan"), unknown, ()).vxlan.routes) == {N("10.1.9.0/24")}
