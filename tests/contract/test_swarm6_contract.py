"""Docker 20.10's Swarm allocator on a dual-stack (`--ipv6 --subnet V4 --subnet V6`) network,
replayed: it requests every pool with V6 false and lists the IPv6 pool in AllocateNetwork's
IPv4Data. The CIDR's family decides; the local address space keeps refusing the mix."""

from __future__ import annotations

from test_protocol import call, ok

SWARM_NET = "0123456789abcdefghijklmno"  # a Swarm network ID (25 characters, [0-9a-z])


def pool(client, cidr: str, v6: bool, space: str = "CanalGlobal") -> tuple[int, dict]:
    return call(client, "IpamDriver.RequestPool", {"AddressSpace": space, "Pool": cidr, "SubPool": "", "Options": {},
                                                   "V6": v6})


def test_the_managers_ipv6_pool_requested_as_ipv4_is_taken_as_ipv6(client, plugin):
    status, manager = pool(client, "fd00:6574::/64", v6=False)
    assert status == 200 and manager["PoolID"] == "canal-pool6:fd00:6574::/64" and manager["Pool"] == "fd00:6574::/64"
    status, node = pool(client, "fd00:6574::/64", v6=True)  # each node asks again, as IPv6
    assert (status, node["PoolID"]) == (200, manager["PoolID"])
    address = ok(client, "IpamDriver.RequestAddress", {"PoolID": manager["PoolID"], "Address": "fd00:6574::9"})
    assert address["Address"] == "fd00:6574::9/128"
    # The local space (docker network create without Swarm) still names the mistake.
    status, answer = pool(client, "fd00:6575::/64", v6=False, space="CanalLocal")
    assert status == 400 and "is IPv6: create the network with --ipv6" in answer["Err"]


def test_allocate_network_takes_the_ipv6_pool_in_ipv4data(client):
    body = {"NetworkID": SWARM_NET, "Options": {"com.docker.network.enable_ipv6": "true"}, "IPv6Data": [],
            "IPv4Data": [{"AddressSpace": "CanalGlobal", "Pool": "fd00:6574::/64", "Gateway": "fd00:6574::10/64"},
                         {"AddressSpace": "CanalGlobal", "Pool": "100.64.0.0/16", "Gateway": "100.64.0.11/16"}]}
    assert call(client, "NetworkDriver.AllocateNetwork", body) == (200, {"Options": body["Options"]})
    bad = dict(body, IPv4Data=[{"AddressSpace": "CanalGlobal", "Pool": "fd00:6574::1/64"}])  # not canonical
    status, answer = call(client, "NetworkDriver.AllocateNetwork", bad)
    assert status == 400 and "IPv4Data[0].Pool" in answer["Err"] and "canonical" in answer["Err"], answer
    bad4 = dict(body, IPv4Data=[{"AddressSpace": "CanalGlobal", "Pool": "100.64.0.1/16"}])
    assert call(client, "NetworkDriver.AllocateNetwork", bad4)[0] == 400
