"""Host subnet leases in flannel's schema."""

from __future__ import annotations

import ipaddress
import json

import pytest

from canal.datastore.keys import Keys
from canal.errors import BadRequest, CanalError, Exhausted
from canal.services.subnets import SubnetManager, parse_network_config

KEYS = Keys("/canal/v1", "/coreos.com/network")


def manager(store, network="100.64.0.0/16", subnet_len=24):
    return SubnetManager(store, KEYS, network, subnet_len, vni=1, port=8472)


def test_flannel_defaults():
    cfg = parse_network_config({"Network": "10.5.0.0/16"})
    assert cfg.subnet_len == 24
    assert str(cfg.subnet_min) == "10.5.1.0/24"  # flannel skips the first subnet
    assert str(cfg.subnet_max) == "10.5.255.0/24"
    assert cfg.backend == {"Type": "udp"}  # flannel's code default when Backend is absent
    small = parse_network_config({"Network": "10.5.0.0/24"})
    assert small.subnet_len == 26


@pytest.mark.parametrize(
    "raw, message",
    [
        ({}, "no Network"),
        ({"Network": "nope"}, "Network 'nope'"),
        ({"Network": "10.0.0.0/29"}, "smaller than /28"),
        ({"Network": "10.0.0.0/16", "SubnetLen": 12}, "SubnetLen 12"),
    ],
)
def test_bad_flannel_config_names_the_field(raw, message):
    with pytest.raises(BadRequest, match=message):
        parse_network_config(raw)


def test_config_created_if_absent_and_read_if_present(store):
    mgr = manager(store)
    assert str(mgr.network_config().network) == "100.64.0.0/16"
    stored = store.get_json(KEYS.flannel_config)
    assert stored["Backend"] == {"Type": "vxlan", "VNI": 1, "Port": 8472}
    other = manager(store, network="100.80.0.0/16")
    assert str(other.network_config().network) == "100.64.0.0/16"  # etcd's config wins


def test_lease_value_is_flannels_json(store):
    lease = manager(store).acquire("198.18.0.1", "aa:bb:cc:dd:ee:01")
    value = json.loads(store.get(KEYS.lease(lease.subnet)).value)
    assert value == {
        "PublicIP": "198.18.0.1",
        "BackendType": "vxlan",
        "BackendData": {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:01"},
    }
    assert store.get(KEYS.lease(lease.subnet)).lease == lease.lease_id != 0
    assert KEYS.lease(lease.subnet).startswith("/coreos.com/network/subnets/100.64.")


def test_same_public_ip_gets_its_lease_back(store):
    first = manager(store).acquire("198.18.0.1", "aa:bb:cc:dd:ee:01")
    again = manager(store).acquire("198.18.0.1", "aa:bb:cc:dd:ee:01")
    assert again.subnet == first.subnet
    assert len(store.list("/coreos.com/network/subnets/")[0]) == 1


def test_hosts_get_distinct_subnets(store):
    subnets = {manager(store).acquire(f"198.18.0.{i}", "aa:bb:cc:dd:ee:01").subnet for i in range(1, 11)}
    assert len(subnets) == 10


def test_previous_subnet_is_preferred_after_expiry(store):
    mgr = manager(store)
    first = mgr.acquire("198.18.0.1", "aa:bb:cc:dd:ee:01")
    store.revoke(first.lease_id)
    again = mgr.acquire("198.18.0.1", "aa:bb:cc:dd:ee:01", previous=str(first.subnet))
    assert again.subnet == first.subnet


def test_reservations_are_honoured(store):
    mgr = manager(store, network="100.64.0.0/22")  # subnets .1, .2, .3 (the first is skipped)
    mgr.network_config()
    store.put(KEYS.lease("100.64.1.0/24"), {"PublicIP": "198.18.0.9", "BackendType": "vxlan", "BackendData": {}})
    store.put(KEYS.lease("100.64.2.0/24"), {"PublicIP": "198.18.0.8", "BackendType": "vxlan", "BackendData": {}})
    lease = mgr.acquire("198.18.0.1", "aa:bb:cc:dd:ee:01")
    assert lease.subnet == ipaddress.IPv4Network("100.64.3.0/24")
    with pytest.raises(Exhausted, match="no free /24 subnet"):
        mgr.acquire("198.18.0.2", "aa:bb:cc:dd:ee:02")
    # The reserved host itself gets its reservation, still without a TTL.
    reserved = mgr.acquire("198.18.0.9", "aa:bb:cc:dd:ee:09")
    assert str(reserved.subnet) == "100.64.1.0/24" and reserved.lease_id == 0
    assert store.get(KEYS.lease("100.64.1.0/24")).lease == 0


def test_renew_keeps_or_recovers_the_subnet(store):
    mgr = manager(store)
    lease = mgr.acquire("198.18.0.1", "aa:bb:cc:dd:ee:01")
    assert mgr.renew(lease) == lease
    store.revoke(lease.lease_id)
    renewed = mgr.renew(lease)
    assert renewed.subnet == lease.subnet and renewed.lease_id != lease.lease_id


def test_malformed_foreign_leases_are_skipped(store):
    mgr = manager(store)
    store.txn([], [])
    from canal.datastore.base import Put

    store.txn([], [Put(KEYS.leases + "garbage", "not json")])
    assert mgr.leases() == []


def test_host_gw_lease_has_flannels_json_without_backend_data(store):
    mgr = SubnetManager(store, KEYS, "10.5.0.0/16", 24, 1, 8472, backend="host-gw")
    lease = mgr.acquire("198.18.0.1", "aa:bb:cc:dd:ee:01")
    assert lease.backend_type == "host-gw"
    assert store.get_json(KEYS.lease(lease.subnet)) == {"PublicIP": "198.18.0.1", "BackendType": "host-gw"}
    assert store.get_json(KEYS.flannel_config)["Backend"] == {"Type": "host-gw"}


def test_switching_the_backend_rewrites_our_lease_with_the_new_type_on_restart(store):
    """flannel's rule: every host restarts with the new config; each keeps its subnet."""
    first = manager(store).acquire("198.18.0.1", "aa:bb:cc:dd:ee:01")
    assert first.backend_type == "vxlan"
    store.put(KEYS.flannel_config, {"Network": "100.64.0.0/16", "Backend": {"Type": "host-gw"}})
    again = manager(store).acquire("198.18.0.1", "aa:bb:cc:dd:ee:01")
    assert again.subnet == first.subnet and again.backend_type == "host-gw"
    assert store.get_json(KEYS.lease(first.subnet)) == {"PublicIP": "198.18.0.1", "BackendType": "host-gw"}


def test_an_unsupported_backend_is_refused_by_name_before_leasing(store):
    store.put(KEYS.flannel_config, {"Network": "100.64.0.0/16", "Backend": {"Type": "udp"}})
    with pytest.raises(CanalError, match="Backend Type 'udp' is not supported by Canal"):
        manager(store).acquire("198.18.0.1", "aa:bb:cc:dd:ee:01")


def test_wireguard_key_rides_in_the_lease_as_flannel_writes_it(store):
    key, new = "YPrMx+AOvB5f/aqi9Wk22FhdeRCkc1Z4tHh8LrWR+hk=", "LR5eRhAAA39PgpT7Erc4uAyDZPzzquVKcb/hAS8EX3s="
    wg = SubnetManager(store, KEYS, "100.64.0.0/16", 24, vni=1, port=8472, backend="wireguard")
    lease = wg.acquire("198.18.0.1", "", wg=(key, 51820))
    raw = store.get_json(KEYS.lease(lease.subnet))
    assert raw == {"PublicIP": "198.18.0.1", "BackendType": "wireguard", "BackendData": {"PublicKey": key, "Port": 51820}}
    assert (lease.public_key, lease.wg_port) == (key, 51820)
    rotated = wg.publish_key(lease, (new, 51820))
    assert rotated.subnet == lease.subnet and store.get_json(KEYS.lease(lease.subnet))["BackendData"]["PublicKey"] == new
    assert wg.renew(rotated).public_key == new  # renewal keeps the published key
    # Someone rewrote our lease without the key: force puts it back although ours says it is there.
    store.put(KEYS.lease(lease.subnet), {"PublicIP": "198.18.0.1", "BackendType": "wireguard"})
    wg.publish_key(rotated, (new, 51820), force=True)
    assert store.get_json(KEYS.lease(lease.subnet))["BackendData"]["PublicKey"] == new


def test_vxlan_lease_carries_a_key_beside_flannels_fields(store):
    key = "YPrMx+AOvB5f/aqi9Wk22FhdeRCkc1Z4tHh8LrWR+hk="
    lease = manager(store).acquire("198.18.0.1", "aa:bb:cc:00:00:01")
    assert "PublicKey" not in store.get_json(KEYS.lease(lease.subnet))["BackendData"]
    lease = manager(store).publish_key(lease, (key, 51820))
    assert store.get_json(KEYS.lease(lease.subnet))["BackendData"] == {
        "VNI": 1, "VtepMAC": "aa:bb:cc:00:00:01", "PublicKey": key, "Port": 51820}
