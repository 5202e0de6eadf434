"""Dual-stack leases written by Canal in flannel's exact format: key, value, conflicts, upgrade."""

from __future__ import annotations

import ipaddress
import json

import pytest

from canal.datastore.base import Put
from canal.datastore.keys import Keys
from canal.errors import BadRequest
from canal.records import Lease, lease_key, lease_name
from canal.services.subnets import SubnetManager, parse_network_config

KEYS = Keys("/canal/v1", "/coreos.com/network")
DUAL = {"Network": "100.64.0.0/16", "SubnetLen": 24, "EnableIPv6": True, "IPv6Network": "fd00:64::/48",
        "Backend": {"Type": "vxlan", "VNI": 1}}


def manager(store, config=DUAL, **kw):
    store.put(KEYS.flannel_config, config)
    return SubnetManager(store, KEYS, config["Network"], 24, vni=1, port=8472, **kw)


def lease_entries(store):
    entries, _ = store.list(KEYS.leases)
    return {e.key[len(KEYS.leases):]: json.loads(e.value) for e in entries}


def test_key_is_flannels_make_subnet_key():
    v4, v6 = ipaddress.IPv4Network("100.64.1.0/24"), ipaddress.IPv6Network("fd00:64:0:1::/64")
    assert lease_name(v4) == "100.64.1.0-24"
    assert lease_name(v4, v6) == "100.64.1.0-24&fd00:64:0:1::-64"  # colons kept, compressed as Go prints
    assert KEYS.lease(v4, v6) == "/coreos.com/network/subnets/100.64.1.0-24&fd00:64:0:1::-64"
    assert lease_key(lease_name(v4, v6)) == (v4, v6)
    full = ipaddress.IPv6Network("2001:2:0:1:0:0:0:0/64")
    assert lease_name(v4, full) == "100.64.1.0-24&2001:2:0:1::-64"


def test_flannel_ipv6_defaults_and_bounds():
    cfg = parse_network_config(DUAL)
    assert cfg.ipv6_subnet_len == 64
    assert cfg.ipv6_subnet_min == ipaddress.IPv6Network("fd00:64:0:1::/64")  # the first is skipped
    assert cfg.ipv6_subnet_max == ipaddress.IPv6Network("fd00:64:0:ffff::/64")
    small = parse_network_config({**DUAL, "IPv6Network": "fd00:64::/120"})
    assert small.ipv6_subnet_len == 122
    given = parse_network_config({**DUAL, "IPv6SubnetLen": 80, "IPv6SubnetMin": "fd00:64:0:2::",
                                  "IPv6SubnetMax": "fd00:64:0:3::"})
    assert (given.ipv6_subnet_len, str(given.ipv6_subnet_min), str(given.ipv6_subnet_max)) == (
        80, "fd00:64:0:2::/80", "fd00:64:0:3::/80")


@pytest.mark.parametrize("extra, message", [
    ({"IPv6SubnetLen": 49}, "IPv6SubnetLen 49"),
    ({"IPv6SubnetLen": 127}, "IPv6SubnetLen 127"),
    ({"IPv6SubnetMin": "fd00:65::"}, "IPv6SubnetMin fd00:65:: is not in"),
    ({"IPv6SubnetMax": "fd00:64:0:1::1"}, "IPv6SubnetMax fd00:64:0:1::1 is not on"),
    ({"IPv6SubnetMin": "nope"}, "IPv6SubnetMin 'nope'"),
    ({"IPv6SubnetMin": "fd00:64:0:9::", "IPv6SubnetMax": "fd00:64:0:2::"}, "above IPv6SubnetMax"),
])
def test_bad_ipv6_config_names_the_field(extra, message):
    with pytest.raises(BadRequest, match=message):
        parse_network_config({**DUAL, **extra})


def test_dual_stack_lease_value_as_flanneld_writes_it(store):
    mgr = manager(store)
    lease = mgr.acquire("198.18.0.1", "02:00:00:00:00:01", public_ip6="2001:2::1", vtep_mac6="02:00:00:00:01:01")
    assert lease.subnet6 is not None and lease.subnet6.prefixlen == 64
    assert lease.subnet6.subnet_of(ipaddress.IPv6Network("fd00:64::/48"))
    assert lease.subnet6 != ipaddress.IPv6Network("fd00:64::/64")  # flannel skips the first subnet
    assert lease_entries(store) == {lease.name: {
        "PublicIP": "198.18.0.1", "PublicIPv6": "2001:2::1", "BackendType": "vxlan",
        "BackendData": {"VNI": 1, "VtepMAC": "02:00:00:00:00:01"},
        "BackendV6Data": {"VNI": 1, "VtepMAC": "02:00:00:00:01:01"}}}
    assert "&" in lease.name
    # Read back as any reader (the mirror, flanneld) parses it.
    parsed = Lease.parse(lease.name, lease_entries(store)[lease.name])
    assert (parsed.subnet6, parsed.public_ip6, parsed.vtep_mac6) == (lease.subnet6, "2001:2::1", "02:00:00:00:01:01")


def test_without_an_ipv6_underlay_public_ipv6_and_v6_data_are_left_out(store):
    lease = manager(store).acquire("198.18.0.1", "02:00:00:00:00:01")
    assert lease.subnet6 is not None
    assert lease_entries(store)[lease.name] == {
        "PublicIP": "198.18.0.1", "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": "02:00:00:00:00:01"}}


def test_v4_only_cluster_writes_v4_only_keys(store):
    config = {k: v for k, v in DUAL.items() if k not in ("EnableIPv6", "IPv6Network")}
    lease = manager(store, config).acquire("198.18.0.1", "02:00:00:00:00:01", public_ip6="2001:2::1")
    assert lease.subnet6 is None and "&" not in lease.name
    assert "PublicIPv6" not in lease_entries(store)[lease.name]


def test_embedded_network6_gives_each_host_a_64(store):
    config = {k: v for k, v in DUAL.items() if k not in ("EnableIPv6", "IPv6Network")}
    lease = manager(store, config, network6="fd00:c0a1::/48").acquire("198.18.0.1", "02:00:00:00:00:01")
    assert lease.subnet6 is not None and lease.subnet6.prefixlen == 64
    assert lease.subnet6.subnet_of(ipaddress.IPv6Network("fd00:c0a1::/48"))


def test_renewal_keeps_the_dual_stack_key(store):
    mgr = manager(store)
    lease = mgr.acquire("198.18.0.1", "02:00:00:00:00:01", public_ip6="2001:2::1", vtep_mac6="02:00:00:00:01:01")
    assert mgr.renew(lease) == lease
    again = mgr.acquire("198.18.0.1", "02:00:00:00:00:01", public_ip6="2001:2::1", vtep_mac6="02:00:00:00:01:01")
    assert (again.subnet, again.subnet6) == (lease.subnet, lease.subnet6)
    assert list(lease_entries(store)) == [lease.name]


def test_a_lost_lease_comes_back_with_both_subnets(store):
    mgr = manager(store)
    lease = mgr.acquire("198.18.0.1", "02:00:00:00:00:01")
    store.delete(KEYS.leases + lease.name)
    back = mgr.renew(lease)
    assert (back.subnet, back.subnet6) == (lease.subnet, lease.subnet6)


def test_ipv6_subnets_never_collide_with_any_lease(store):
    """Every v6 subnet but one taken (by flanneld-style and Canal keys): the free one is chosen;
    none left: a clear error."""
    config = {**DUAL, "IPv6Network": "fd00:64::/60", "IPv6SubnetLen": 62}  # min :4::, max :c:: -> 4, 8, c
    mgr = manager(store, config)
    store.put(KEYS.leases + "100.64.9.0-24&fd00:64:0:4::-62", {"PublicIP": "198.18.0.9"})
    store.put(KEYS.leases + "100.64.8.0-24&fd00:64:0:c::-62", {"PublicIP": "198.18.0.8"})
    lease = mgr.acquire("198.18.0.1", "02:00:00:00:00:01")
    assert lease.subnet6 == ipaddress.IPv6Network("fd00:64:0:8::/62")
    assert lease.subnet not in (ipaddress.IPv4Network("100.64.9.0/24"), ipaddress.IPv4Network("100.64.8.0/24"))
    with pytest.raises(Exception, match="no free /62 IPv6 subnet"):
        mgr.acquire("198.18.0.2", "02:00:00:00:00:02")


def test_a_later_key_of_a_taken_subnet_yields(store):
    """Keys guard only their exact text: another host's key for the same v6 (or v4) subnet
    written first wins; the later writer notices and takes another subnet."""
    config = {**DUAL, "IPv6Network": "fd00:64::/60"}
    mgr = manager(store, config)
    real_txn = store.txn
    raced = []

    def txn(guards, ops):
        # Just before our write lands, a flanneld host writes a key with the same v6 subnet.
        if not raced and ops and isinstance(ops[0], Put) and "&" in ops[0].key:
            v6 = ops[0].key.split("&")[1]
            real_txn([], [Put(KEYS.leases + "100.64.200.0-24&" + v6, json.dumps({"PublicIP": "198.18.0.9"}))])
            raced.append(v6)
        return real_txn(guards, ops)

    store.txn = txn
    try:
        lease = mgr.acquire("198.18.0.1", "02:00:00:00:00:01")
    finally:
        store.txn = real_txn
    assert raced and lease.name.split("&")[1] != raced[0]
    names = list(lease_entries(store))
    assert sorted(names) == sorted([lease.name, "100.64.200.0-24&" + raced[0]])  # ours withdrawn, theirs kept


def test_v4_only_lease_is_upgraded_new_key_first(store):
    config = {k: v for k, v in DUAL.items() if k not in ("EnableIPv6", "IPv6Network")}
    mgr = manager(store, config)
    old = mgr.acquire("198.18.0.1", "02:00:00:00:00:01", public_ip6="2001:2::1", vtep_mac6="02:00:00:00:01:01")
    assert old.subnet6 is None and "PublicIPv6" not in lease_entries(store)[old.name]
    store.put(KEYS.flannel_config, DUAL)  # the cluster gains IPv6
    writes = []
    real_txn = store.txn

    def txn(guards, ops):
        writes.extend((type(op).__name__, op.key[len(KEYS.leases):]) for op in ops)
        return real_txn(guards, ops)

    store.txn = txn
    try:
        new = mgr.renew(old)
    finally:
        store.txn = real_txn
    assert new.subnet == old.subnet and new.subnet6 is not None
    assert list(lease_entries(store)) == [new.name]
    assert lease_entries(store)[new.name]["PublicIPv6"] == "2001:2::1"  # the IPv6 underlay published now
    assert lease_entries(store)[new.name]["BackendV6Data"] == {"VNI": 1, "VtepMAC": "02:00:00:00:01:01"}
    assert writes.index(("Put", new.name)) < writes.index(("Delete", old.name))  # crash-safe order
    assert mgr.renew(new) == new  # idempotent afterwards


def test_interrupted_upgrade_is_finished_on_restart(store):
    """A crash after the dual-stack key was written but before the old one was removed: the
    next start keeps the dual-stack key (same subnets) and removes the old one."""
    mgr = manager(store)
    dual_name = "100.64.7.0-24&fd00:64:0:7::-64"
    store.put(KEYS.leases + "100.64.7.0-24", {"PublicIP": "198.18.0.1", "BackendType": "vxlan"})
    store.put(KEYS.leases + dual_name, {"PublicIP": "198.18.0.1", "BackendType": "vxlan"})
    lease = mgr.acquire("198.18.0.1", "02:00:00:00:00:01", public_ip6="2001:2::1", vtep_mac6="02:00:00:00:01:01")
    assert lease.name == dual_name
    assert list(lease_entries(store)) == [dual_name]
    assert lease_entries(store)[dual_name]["BackendV6Data"]["VtepMAC"] == "02:00:00:00:01:01"


def test_downgrade_when_the_cluster_drops_ipv6(store):
    mgr = manager(store)
    lease = mgr.acquire("198.18.0.1", "02:00:00:00:00:01")
    store.put(KEYS.flannel_config, {k: v for k, v in DUAL.items() if k not in ("EnableIPv6", "IPv6Network")})
    back = mgr.renew(lease)
    assert back.subnet == lease.subnet and back.subnet6 is None
    assert list(lease_entries(store)) == [str(lease.subnet).replace("/", "-")]


def test_reservation_upgrade_stays_lease_less(store):
    """An admin's reservation (a key without a datastore lease) keeps that property when moved."""
    config = {k: v for k, v in DUAL.items() if k not in ("EnableIPv6", "IPv6Network")}
    mgr = manager(store, config)
    store.put(KEYS.leases + "100.64.5.0-24", {"PublicIP": "198.18.0.1", "BackendType": "vxlan"})
    store.put(KEYS.flannel_config, DUAL)
    lease = mgr.acquire("198.18.0.1", "02:00:00:00:00:01")
    assert lease.lease_id == 0 and lease.subnet6 is not None
    assert store.get(KEYS.leases + lease.name).lease == 0


def test_host_identity_check_finds_a_dual_stack_lease(store):
    from canal.errors import Conflict
    from canal.services.hosts import Hosts
    mgr = manager(store)
    first = Hosts(store, KEYS, "h1", "198.18.0.1")
    record = first.ensure()
    lease = mgr.acquire("198.18.0.1", record.vtep_mac)
    first.update(lambda r: r.__class__(r.name, r.vtep_mac, lease.subnet, r.public_ip, r.renewed))
    with pytest.raises(Conflict, match="already used by a live host"):
        Hosts(store, KEYS, "h1", "198.18.0.2").check_identity()


def test_subnet_env_has_flannels_ipv6_pair(tmp_path):
    from canal.backends.manager import read_subnet_env, write_subnet_env
    path = str(tmp_path / "subnet.env")
    write_subnet_env("100.64.0.0/16", ipaddress.IPv4Network("100.64.3.0/24"), 1450, path,
                     network6="fd00:64::/48", subnet6=ipaddress.IPv6Network("fd00:64:0:3::/64"))
    with open(path) as handle:
        assert handle.read() == (  # flannel's WriteSubnetFile: v4 pair, v6 pair, MTU, IPMASQ
            "FLANNEL_NETWORK=100.64.0.0/16\nFLANNEL_SUBNET=100.64.3.1/24\n"
            "FLANNEL_IPV6_NETWORK=fd00:64::/48\nFLANNEL_IPV6_SUBNET=fd00:64:0:3::1/64\n"
            "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
    write_subnet_env("100.64.0.0/16", ipaddress.IPv4Network("100.64.3.0/24"), 1450, path)
    assert "FLANNEL_IPV6_SUBNET" not in read_subnet_env(path)


def test_v6_vtep_mac_is_stable_and_distinct():
    from canal.services.hosts import v6_mac
    assert v6_mac("02:aa:bb:cc:dd:ee") == v6_mac("02:aa:bb:cc:dd:ee") != "02:aa:bb:cc:dd:ee"
    assert int(v6_mac("02:aa:bb:cc:dd:ee").split(":")[0], 16) & 0x03 == 0x02  # local, unicast
