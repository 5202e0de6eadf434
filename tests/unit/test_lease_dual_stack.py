"""flannel's dual-stack leases (flanneld with EnableIPv6): read, and never leased twice."""

from __future__ import annotations

import ipaddress

import pytest

from canal.datastore.keys import Keys
from canal.records import Lease, RecordError, lease_key
from canal.services.subnets import SubnetManager, parse_network_config

KEYS = Keys("/canal/v1", "/coreos.com/network")
# As flanneld v0.2x writes it (MakeSubnetKey: the IPv6 address keeps its colons).
DUAL_KEY = "100.64.1.0-24&fd00:64:0:1::-64"
DUAL_VALUE = {
    "PublicIP": "198.18.0.9", "PublicIPv6": "fd00:198:18::9", "BackendType": "vxlan",
    "BackendData": {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:09"},
    "BackendV6Data": {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:19"},
}


def test_dual_stack_lease_is_parsed():
    lease = Lease.parse(DUAL_KEY, DUAL_VALUE)
    assert lease.subnet == ipaddress.IPv4Network("100.64.1.0/24")
    assert lease.subnet6 == ipaddress.IPv6Network("fd00:64:0:1::/64")
    assert (lease.public_ip, lease.vtep_mac) == ("198.18.0.9", "aa:bb:cc:dd:ee:09")
    assert (lease.public_ip6, lease.vtep_mac6) == ("fd00:198:18::9", "aa:bb:cc:dd:ee:19")
    plain = Lease.parse("100.64.2.0-24", {"PublicIP": "198.18.0.8"})
    assert plain.subnet6 is None and plain.public_ip6 == "" and plain.vtep_mac6 == ""


@pytest.mark.parametrize("name", ["100.64.1.0-24&", "100.64.1.0-24&fd00::-129", "100.64.1.0-24&fd00::1-64",
                                  "100.64.1.0/24", "100.64.1.0-24&FD00::-64", "100.64.1.0-24&fd00::-64\n"])
def test_bad_lease_keys_name_the_key(name):
    with pytest.raises(RecordError, match="flannel lease key"):
        lease_key(name)


def test_bad_ipv6_fields_name_the_field():
    with pytest.raises(RecordError, match="PublicIPv6"):
        Lease.parse(DUAL_KEY, {**DUAL_VALUE, "PublicIPv6": "198.18.0.9"})
    with pytest.raises(RecordError, match="BackendV6Data VtepMAC"):
        Lease.parse(DUAL_KEY, {**DUAL_VALUE, "BackendV6Data": {"VtepMAC": "ff:ff:ff:ff:ff:ff"}})


def test_a_dual_stack_leases_ipv4_subnet_is_never_leased_again(store):
    mgr = SubnetManager(store, KEYS, "100.64.0.0/22", 24, vni=1, port=8472)  # subnets .1, .2, .3
    mgr.network_config()
    store.put(KEYS.leases + DUAL_KEY, DUAL_VALUE)
    store.put(KEYS.lease("100.64.2.0/24"), {"PublicIP": "198.18.0.8", "BackendType": "vxlan", "BackendData": {}})
    assert mgr.acquire("198.18.0.1", "aa:bb:cc:dd:ee:01").subnet == ipaddress.IPv4Network("100.64.3.0/24")
    assert {str(lease.subnet) for lease in mgr.leases()} == {"100.64.1.0/24", "100.64.2.0/24", "100.64.3.0/24"}


def test_flannel_config_ipv6_network():
    raw = {"Network": "100.64.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:64::/48"}
    assert parse_network_config(raw).ipv6_network == ipaddress.IPv6Network("fd00:64::/48")
    assert parse_network_config({**raw, "EnableIPv6": False}).ipv6_network is None
    with pytest.raises(Exception, match="IPv6Network"):
        parse_network_config({**raw, "IPv6Network": None})
    with pytest.raises(Exception, match="EnableIPv6"):
        parse_network_config({**raw, "EnableIPv6": "yes"})
