"""IPv6 IPAM (--ipv6) against the real datastores: pools, /128 addresses, replays, refusals."""

from __future__ import annotations

import ipaddress

import pytest

from canal.datastore.keys import Keys, ip_hex
from canal.errors import BadRequest, Conflict, NotFound
from canal.records import AddressRecord, PoolRecord, address_entry
from canal.services.ipam import DEFAULT6_POOL_ID, GATEWAY_OPTION, Ipam, PoolRef

GW = {"RequestAddressType": GATEWAY_OPTION}
CLUSTER6 = ipaddress.IPv6Network("fd00:c0a1::/48")
KEYS = Keys("/canal/v1", "/coreos.com/network")


@pytest.fixture
def ipam(store):
    return Ipam(store, KEYS, "host1", lambda: ipaddress.IPv4Network("100.64.3.0/24"),
                cluster_network6=lambda: CLUSTER6)


def test_default_v6_pool_is_any_and_names_its_gateway(ipam):
    pool_id, pool, data = ipam.request_pool("CanalLocal", "", "", {}, True)
    assert (pool_id, pool, data) == (DEFAULT6_POOL_ID, "::/0", {GATEWAY_OPTION: "::/0"})
    assert ipam.request_pool("CanalLocal", "", "", {}, True) == (pool_id, pool, data)  # replay


def test_default_v6_addresses_are_slash_128_in_the_cluster_network(ipam, store):
    first, _ = ipam.request_address(DEFAULT6_POOL_ID, "", None)
    second, _ = ipam.request_address(DEFAULT6_POOL_ID, "", None)
    a, b = ipaddress.IPv6Interface(first), ipaddress.IPv6Interface(second)
    assert a.network.prefixlen == b.network.prefixlen == 128
    assert a.ip in CLUSTER6 and b.ip in CLUSTER6 and a.ip != b.ip
    assert a.ip != CLUSTER6.network_address  # the subnet-router anycast address is never handed out
    record = AddressRecord.parse(store.get_json(KEYS.address(a.ip)), a.ip)
    assert record.pool == DEFAULT6_POOL_ID and record.kind == "endpoint" and record.host == "host1"
    assert KEYS.address(a.ip).endswith("/" + "%032x" % int(a.ip))


def test_v6_and_v4_address_keys_never_collide():
    assert len(ip_hex("100.64.3.2")) == 8 and len(ip_hex("fd00::6440:302")) == 32
    raw = {"ip": "fd00:c0a1::5", "pool": DEFAULT6_POOL_ID, "kind": "endpoint", "host": "h1"}
    assert address_entry(ip_hex("fd00:c0a1::5"), raw).ip == ipaddress.IPv6Address("fd00:c0a1::5")


def test_subnet_gateway_aux_and_static_ip6(ipam, store):
    pool_id, pool, data = ipam.request_pool("CanalLocal", "fd00:70::/64", "", {}, True)
    assert (pool_id, pool, data) == ("canal-pool6:fd00:70::/64", "fd00:70::/64", {})
    assert PoolRecord.parse(store.get_json(KEYS.pool(ipaddress.IPv6Network(pool)))).cidr.version == 6
    assert ipam.request_address(pool_id, "fd00:70::1", GW)[0] == "fd00:70::1/64"
    assert ipam.request_address(pool_id, "fd00:70::1", GW)[0] == "fd00:70::1/64"  # gateway replay
    assert ipam.request_address(pool_id, "fd00:70::5", None)[0] == "fd00:70::5/128"  # --ip6
    assert ipam.request_address(pool_id, "fd00:70::6", None)[0] == "fd00:70::6/128"  # an aux address
    with pytest.raises(Conflict, match="fd00:70::5 is already in use"):
        ipam.request_address(pool_id, "fd00:70::5", None)
    allocated = {ipam.request_address(pool_id, "", None)[0] for _ in range(3)}
    assert not allocated & {"fd00:70::1/128", "fd00:70::5/128", "fd00:70::6/128", "fd00:70::/128"}
    ipam.release_address(pool_id, "fd00:70::5")
    assert ipam.request_address(pool_id, "fd00:70::5", None)[0] == "fd00:70::5/128"  # free again


def test_ip_range_and_release_pool(ipam, store):
    pool_id, _, _ = ipam.request_pool("CanalLocal", "fd00:71::/64", "fd00:71::100/120", {}, True)
    assert pool_id == "canal-pool6:fd00:71::/64+fd00:71::100/120"
    assert PoolRef.parse(pool_id) == PoolRef(ipaddress.IPv6Network("fd00:71::/64"),
                                             ipaddress.IPv6Network("fd00:71::100/120"), v6=True)
    ip = ipaddress.IPv6Interface(ipam.request_address(pool_id, "", None)[0]).ip
    assert ip in ipaddress.IPv6Network("fd00:71::100/120")
    ipam.release_pool(pool_id)  # still in use: kept
    assert store.get(KEYS.pool(ipaddress.IPv6Network("fd00:71::/64"))) is not None
    ipam.release_address(pool_id, str(ip))
    ipam.release_pool(pool_id)
    assert store.get(KEYS.pool(ipaddress.IPv6Network("fd00:71::/64"))) is None


def test_overlapping_v6_subnets_conflict_but_not_with_v4(ipam):
    ipam.request_pool("CanalLocal", "100.70.0.0/24", "", {}, False)
    ipam.request_pool("CanalLocal", "fd00:72::/64", "", {}, True)
    with pytest.raises(Conflict, match="overlaps subnet fd00:72::/64"):
        ipam.request_pool("CanalLocal", "fd00:72::/56", "", {}, True)


@pytest.mark.parametrize(
    "pool, sub, message",
    [
        ("100.70.0.0/24", "", "is IPv4, but it was requested as the IPv6 pool"),
        ("bogus:", "", "'bogus:' is not an IPv6 CIDR"),
        ("fd00:73::1/64", "", "has host bits set; did you mean fd00:73::/64"),
        ("fd00:73::/127", "", "too small"),
        ("fd00:73::/64", "fd00:74::/80", "IPv6 ip-range fd00:74::/80 is not inside subnet fd00:73::/64"),
        ("", "fd00:73::/80", "--ip-range needs --subnet"),
    ],
)
def test_bad_v6_pool_requests_name_the_problem(ipam, pool, sub, message):
    with pytest.raises(BadRequest, match=message):
        ipam.request_pool("CanalLocal", pool, sub, {}, True)


def test_v6_addresses_are_checked_against_the_pool(ipam):
    pool_id, _, _ = ipam.request_pool("CanalLocal", "fd00:75::/64", "", {}, True)
    with pytest.raises(BadRequest, match="not an IPv6 address"):
        ipam.request_address(pool_id, "100.70.0.9", None)
    with pytest.raises(BadRequest, match="outside the network's subnet fd00:75::/64"):
        ipam.request_address(pool_id, "fd00:76::9", None)
    with pytest.raises(BadRequest, match="network or broadcast address"):
        ipam.request_address(pool_id, "fd00:75::", None)
    with pytest.raises(BadRequest, match="--gateway needs --subnet"):
        ipam.request_address(DEFAULT6_POOL_ID, "", GW)
    with pytest.raises(NotFound, match="malformed"):
        ipam.request_address("canal-pool6:nonsense", "", None)


def test_without_a_cluster_v6_network_ipv6_needs_a_subnet(store):
    ipam = Ipam(store, KEYS, "host1", lambda: ipaddress.IPv4Network("100.64.3.0/24"))
    with pytest.raises(BadRequest, match="IPv6Network in flannel's config .etcd., or --network6"):
        ipam.request_pool("CanalLocal", "", "", {}, True)
    assert ipam.request_pool("CanalLocal", "fd00:77::/64", "", {}, True)[0] == "canal-pool6:fd00:77::/64"


SUBNET6 = ipaddress.IPv6Network("fd00:c0a1:0:7::/64")


@pytest.fixture
def ipam_leased(store):
    return Ipam(store, KEYS, "host1", lambda: ipaddress.IPv4Network("100.64.3.0/24"),
                cluster_network6=lambda: CLUSTER6, host_subnet6=lambda: SUBNET6)


def test_default_v6_addresses_come_from_the_hosts_leased_subnet(ipam_leased):
    """As v4's default pool draws from the host subnet; never its network (anycast) address."""
    got = {ipaddress.IPv6Interface(ipam_leased.request_address(DEFAULT6_POOL_ID, "", None)[0]) for _ in range(5)}
    assert len(got) == 5
    assert all(a.network.prefixlen == 128 and a.ip in SUBNET6 and a.ip != SUBNET6.network_address for a in got)


def test_ip6_elsewhere_in_the_cluster_network_is_still_accepted(ipam_leased):
    """--ip6 outside this host's subnet: taken (its route record carries it), not refused."""
    elsewhere = "fd00:c0a1:0:9::5"
    assert ipam_leased.request_address(DEFAULT6_POOL_ID, elsewhere, None)[0] == f"{elsewhere}/128"
    with pytest.raises(BadRequest, match="outside"):
        ipam_leased.request_address(DEFAULT6_POOL_ID, "fd00:ffff::5", None)


def test_without_a_leased_v6_subnet_the_cluster_network_serves(store):
    def no_lease():
        raise RuntimeError("datastore down")
    ipam = Ipam(store, KEYS, "host1", lambda: ipaddress.IPv4Network("100.64.3.0/24"),
                cluster_network6=lambda: CLUSTER6, host_subnet6=no_lease)
    assert ipaddress.IPv6Interface(ipam.request_address(DEFAULT6_POOL_ID, "", None)[0]).ip in CLUSTER6
