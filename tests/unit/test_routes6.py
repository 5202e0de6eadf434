"""IPv6 across hosts over the IPv4 VXLAN device: /128 route records and what peers program."""

from __future__ import annotations

import ipaddress

from canal.agent.desired import Snapshot, desired_route_records6, remote_routes6
from canal.dataplane.routes6 import desired_routes6, link_local
from canal.records import EndpointRecord, Lease, RouteRecord, route_entry

from canal.datastore.keys import ip_hex

SUBNET1 = ipaddress.IPv4Network("100.64.1.0/24")
SUBNET2 = ipaddress.IPv4Network("100.64.2.0/24")


def test_link_local_is_the_eui64_of_the_mac():
    # The host veth's MAC gives the address the kernel gives it (and Calico documents).
    assert link_local("ee:ee:ee:ee:ee:ee") == ipaddress.IPv6Address("fe80::ecee:eeff:feee:eeee")
    assert link_local("02:42:ac:11:00:02") == ipaddress.IPv6Address("fe80::42:acff:fe11:2")


def endpoint(n: int, host: str, ip6: str | None, joined: bool = True) -> EndpointRecord:
    return EndpointRecord(id=str(n) * 64, network="e" * 64, host=host, ip=ipaddress.IPv4Address(f"100.64.1.{n}"),
                          mac=f"02:42:00:00:00:0{n}", mtu=1450, joined=joined,
                          ip6=ipaddress.IPv6Address(ip6) if ip6 else None)


def test_each_joined_local_ipv6_endpoint_is_published_as_a_128():
    eps = [endpoint(1, "h1", "fd00::1"), endpoint(2, "h1", None), endpoint(3, "h1", "fd00::3", joined=False),
           endpoint(4, "h2", "fd00::4")]
    snap = Snapshot("h1", "100.64.0.0/16", {}, {e.id: e for e in eps}, own_subnet=SUBNET1)
    assert desired_route_records6(snap) == {"fd00::1": RouteRecord(ipaddress.IPv6Address("fd00::1"), "h1", SUBNET1)}
    record = RouteRecord(ipaddress.IPv6Address("fd00::1"), "h1", SUBNET1)
    assert route_entry(ip_hex("fd00::1"), record.to_json()) == record


def test_peers_route_other_hosts_128s_via_their_vtep():
    routes6 = {
        "fd00::1": RouteRecord(ipaddress.IPv6Address("fd00::1"), "h1", SUBNET1),  # ours: skipped
        "fd00::4": RouteRecord(ipaddress.IPv6Address("fd00::4"), "h2", SUBNET2),
        "fd00::5": RouteRecord(ipaddress.IPv6Address("fd00::5"), "h3", ipaddress.IPv4Network("100.64.3.0/24")),
    }
    leases = (Lease(SUBNET1, "198.18.0.1", "aa:00:00:00:00:01"), Lease(SUBNET2, "198.18.0.2", "aa:00:00:00:00:02"))
    snap = Snapshot("h1", "100.64.0.0/16", {}, {}, own_subnet=SUBNET1, leases=leases, routes6=routes6)
    pairs = remote_routes6(snap)  # h3 has no lease (yet): nothing to route to
    assert pairs == [(ipaddress.IPv6Address("fd00::4"), "aa:00:00:00:00:02")]
    state = desired_routes6(pairs)
    hop = ipaddress.IPv6Address("fe80::a800:ff:fe00:2")
    assert state.neighbours == {hop: "aa:00:00:00:00:02"}
    assert state.routes == {ipaddress.IPv6Network("fd00::4/128"): hop}


def test_only_addresses_outside_the_hosts_v6_subnet_get_a_record():
    """The /32 rule for /128s: inside our leased IPv6 subnet the subnet route carries it."""
    own6 = ipaddress.IPv6Network("fd00:64:0:1::/64")
    eps = [endpoint(1, "h1", "fd00:64:0:1::5"), endpoint(2, "h1", "fd00:c0a1::2")]
    snap = Snapshot("h1", "100.64.0.0/16", {}, {e.id: e for e in eps}, own_subnet=SUBNET1, own_subnet6=own6)
    assert list(desired_route_records6(snap)) == ["fd00:c0a1::2"]


def test_direct_routes_with_none_wanted_add_dumps_nothing(monkeypatch):
    """A plain VXLAN cluster wants no direct routes: the add step must not dump the main table
    (5,000 routes at 100,000 endpoints) on every full pass; removing leftovers still reads it."""
    from canal.dataplane import routes

    class FakeIpr:
        def link_lookup(self, ifname):
            return [7]

    dumps: list[int] = []
    monkeypatch.setattr(routes, "open_socket", FakeIpr)
    monkeypatch.setattr(routes.routedump, "dump", lambda family, table: dumps.append(family) or [])
    monkeypatch.setattr(routes, "_ipv6", lambda: False)
    direct = routes.DirectRoutes("u0")
    assert direct.add({}) == [] and dumps == []
    direct.remove_stale({})
    assert len(dumps) == 1  # control: the leftovers' check reads it
    monkeypatch.setattr(direct, "_route", lambda *a, **k: None)
    assert direct.add({ipaddress.IPv4Network("100.64.2.0/24"): ipaddress.IPv4Address("198.18.0.2")}) == []
    assert len(dumps) == 2  # control: a wanted route is checked against the kernel
