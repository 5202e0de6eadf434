"""Typed records: valid records round-trip; hostile or malformed ones are refused naming the field."""

from __future__ import annotations

import ipaddress

import pytest

from canal.records import (
    AddressRecord,
    EndpointRecord,
    HostRecord,
    Lease,
    NetworkRecord,
    PoolRecord,
    RecordError,
    RouteRecord,
    endpoint_id,
    network_id,
    safe,
)

EP_ID, NET_ID = "e" * 64, "a" * 64
EP = {"id": EP_ID, "network": NET_ID, "host": "h1", "ip": "100.64.3.2", "mac": "02:42:64:40:03:02",
      "mtu": 1450, "joined": True, "sandbox": "/var/run/docker/netns/1", "options": {}, "created": 1.5,
      "labels": {"app": "web"}, "container": "c" * 64, "container_name": "web1"}
NET = {"id": NET_ID, "host": "h1", "pools": ["100.64.0.0/16"], "internal": False, "nat": True, "mtu": 0,
       "name": "appnet", "explicit_name": False}


def test_valid_records_round_trip():
    assert EndpointRecord.parse(EndpointRecord.parse(EP).to_json()) == EndpointRecord.parse(EP)
    assert EndpointRecord.parse(EP).to_json() == EP
    assert NetworkRecord.parse(NET).to_json() == NET
    addr = {"ip": "100.64.3.2", "pool": "canal-pool:100.64.3.0/24", "kind": "endpoint", "host": "h1",
            "endpoint": EP_ID, "network": NET_ID, "time": 7}
    assert AddressRecord.parse(addr).to_json() == addr
    assert PoolRecord.parse({"cidr": "100.64.3.0/24", "gateway": "100.64.3.1", "shared": True}).shared
    route = {"ip": "100.64.9.9", "host": "h2", "subnet": "100.64.4.0/24"}
    assert RouteRecord.parse(route).to_json() == route
    host = HostRecord.parse({"vtep_mac": "02:AA:bb:cc:dd:ee", "subnet": "100.64.3.0/24"}, "h1")
    assert host.vtep_mac == "02:aa:bb:cc:dd:ee" and host.public_ip == "" and host.renewed == 0.0
    # A Swarm network ID (25 base-36 characters) is a network ID too.
    assert network_id("q2w3e4r5t6y7u8i9o0p1a2s3d") == "q2w3e4r5t6y7u8i9o0p1a2s3d"


def test_records_of_earlier_versions_still_parse():
    old = {k: v for k, v in EP.items() if k not in ("sandbox", "labels", "container", "container_name")}
    record = EndpointRecord.parse(old)
    assert record.labels is None and record.sandbox == ""


@pytest.mark.parametrize(
    "change, field",
    [
        ({"ip": None}, "field ip is missing"),
        ({"ip": "100.64.3.2\nadd canal-nets 0.0.0.0/1"}, "field ip"),
        ({"ip": 12}, "field ip"),
        ({"id": "e" * 63 + "\n"}, "field id"),
        ({"id": "-A FORWARD -j ACCEPT"}, "field id"),
        ({"network": "n1 -j ACCEPT"}, "field network"),
        ({"labels": ["app=web"]}, "field labels"),
        ({"labels": {"app": 1}}, "labels value"),
        ({"labels": {"a\nb": "c"}}, "labels key"),
        ({"mac": 5}, "field mac"),
        ({"mac": "zz:zz:zz:zz:zz:zz"}, "field mac"),
        ({"mtu": "1450"}, "field mtu"),
        ({"mtu": 1e308}, "field mtu"),
        ({"joined": "yes"}, "field joined"),
        ({"host": "h1/../../x"}, "field host"),
        ({"sandbox": "/x\n-A INPUT"}, "field sandbox"),
        ({"created": float("nan")}, "field created"),
    ],
)
def test_malformed_endpoint_records_are_refused_naming_the_field(change, field):
    with pytest.raises(RecordError, match=field.replace("(", r"\(")):
        EndpointRecord.parse({**EP, **change})


def test_an_endpoint_stored_under_another_key_is_refused():
    with pytest.raises(RecordError, match="another endpoint's key"):
        EndpointRecord.parse(EP, key_id="f" * 64)


@pytest.mark.parametrize(
    "pools", [["10.9.0.0/24\nadd canal-nets 0.0.0.0/1"], [12], "10.0.0.0/8", ["10.0.0.1/8"], [None]]
)
def test_network_pools_must_be_cidrs(pools):
    with pytest.raises(RecordError, match="pool|pools"):
        NetworkRecord.parse({**NET, "pools": pools})


def test_network_names_cannot_carry_rule_text():
    with pytest.raises(RecordError, match="field name"):
        NetworkRecord.parse({**NET, "name": "x -j ACCEPT"})


def test_route_and_lease_records_need_their_addresses():
    with pytest.raises(RecordError, match="field subnet is missing"):
        RouteRecord.parse({"ip": "100.64.9.9", "host": "h2"})
    with pytest.raises(RecordError, match="PublicIP"):
        Lease.parse("100.64.3.0-24", {"BackendType": "vxlan"})
    with pytest.raises(RecordError, match="VtepMAC"):
        Lease.parse("100.64.3.0-24", {"PublicIP": "198.18.0.1", "BackendData": {"VtepMAC": "\n"}})
    with pytest.raises(RecordError, match="lease key"):
        Lease.parse("100.64.3.0-33", {"PublicIP": "198.18.0.1"})
    # A reservation (no VtepMAC yet) is a valid lease: the subnet is taken.
    lease = Lease.parse("100.64.3.0-24", {"PublicIP": "198.18.0.1", "BackendType": "vxlan", "BackendData": None})
    assert lease.subnet == ipaddress.IPv4Network("100.64.3.0/24") and lease.vtep_mac == ""


def test_identifiers_in_dockers_forms_only():
    assert endpoint_id("0123456789abcdef" * 4)
    for bad in ("0123456789ABCDEF" * 4, "e" * 65, "", "e" * 63 + "\n", None, 7):
        with pytest.raises(RecordError):
            endpoint_id(bad)


def test_messages_never_carry_the_whole_hostile_value():
    hostile = "x" * 10_000 + "\n-A INPUT -j ACCEPT"
    with pytest.raises(RecordError) as err:
        endpoint_id(hostile)
    assert len(str(err.value)) < 200 and "\n" not in str(err.value)
    assert safe("a\nb") == "'a\\nb'"


def test_an_entry_must_be_stored_under_its_own_key():
    from canal.records import address_entry, pool_entry, route_entry

    route = {"ip": "100.64.9.9", "host": "h2", "subnet": "100.64.4.0/24"}
    assert route_entry("64400909", route).ip == ipaddress.IPv4Address("100.64.9.9")  # 100.64.9.9 in hex
    with pytest.raises(RecordError, match="stored under the key of 100.64.9.10"):
        route_entry("6440090a", route)
    with pytest.raises(RecordError, match=r"not 8 \(IPv4\) or 32 \(IPv6\) hex digits"):
        route_entry("6440090\n", route)
    addr = {"ip": "100.64.3.2", "pool": "canal-default", "kind": "endpoint", "host": "h1"}
    assert address_entry("64400302", addr).ip == ipaddress.IPv4Address("100.64.3.2")
    with pytest.raises(RecordError):
        address_entry("64400303", addr)
    pool = {"cidr": "100.64.3.0/24"}
    assert pool_entry("100.64.3.0-24", pool).cidr == ipaddress.IPv4Network("100.64.3.0/24")
    with pytest.raises(RecordError, match="another key"):
        pool_entry("10.0.0.0-8", pool)


def test_ipv4_accepts_exactly_what_ipaddress_accepts():
    """records.ipv4 parses without ipaddress's per-octet code (restart speed); it must agree
    with it on every input, leading zeros, out-of-range octets and odd characters included."""
    import ipaddress
    import random

    from canal.records import ipv4

    rnd = random.Random(12)
    candidates = ["0.0.0.0", "255.255.255.255", "01.2.3.4", "1.2.3.04", "256.1.1.1", "1.2.3", "1.2.3.4.5",
                  " 1.2.3.4", "1.2.3.4\n", "\u0661.2.3.4", "0x1.2.3.4", "1..2.3", "", "1.2.3.-1", "00.0.0.0", "+1.2.3.4"]
    for _ in range(20000):
        octets = [rnd.choice([str(rnd.randint(0, 300)), "0" + str(rnd.randint(0, 99)), str(rnd.randint(0, 255))])
                  for _ in range(rnd.choice([3, 4, 4, 4, 5]))]
        candidates.append(".".join(octets))
    for text in candidates:
        try:
            want = ipaddress.IPv4Address(text)
        except ValueError:
            want = None
        try:
            got = ipv4(text)
        except RecordError:
            got = None
        assert got == want, text
