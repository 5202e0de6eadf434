"""Docker's --ipv6 conversation replayed through the Flask app: a dual-stack network's whole
life, replays, and IPv6 input that must be refused (naming the field)."""

from __future__ import annotations

import ipaddress
import json

from test_protocol import EP, NET, SANDBOX, call, ok

from canal.records import NetworkRecord

GATEWAY6 = "fe80::ecee:eeff:feee:eeee"


def create_dual_stack(client, pool6=""):
    pool4 = ok(client, "IpamDriver.RequestPool", {"AddressSpace": "CanalLocal", "Pool": "", "SubPool": "", "Options": {}, "V6": False})
    pool6_ans = ok(client, "IpamDriver.RequestPool", {"AddressSpace": "CanalLocal", "Pool": pool6, "SubPool": "", "Options": {}, "V6": True})
    ok(client, "NetworkDriver.CreateNetwork", {
        "NetworkID": NET,
        "Options": {"com.docker.network.enable_ipv6": True, "com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": "CanalLocal", "Pool": pool4["Pool"], "Gateway": "0.0.0.0/0"}],
        "IPv6Data": [{"AddressSpace": "CanalLocal", "Pool": pool6_ans["Pool"],
                      "Gateway": pool6_ans["Data"].get("com.docker.network.gateway", "")}],
    })
    return pool6_ans


def test_dual_stack_lifecycle(client, plugin):
    pool6 = create_dual_stack(client)
    assert pool6 == {"PoolID": "canal-default6", "Pool": "::/0", "Data": {"com.docker.network.gateway": "::/0"}}
    assert plugin.networks.network(NET).pools6 == ("::/0",)
    addr = ok(client, "IpamDriver.RequestAddress", {"PoolID": "canal-default"})["Address"]
    addr6 = ok(client, "IpamDriver.RequestAddress", {"PoolID": "canal-default6"})["Address"]
    ip6 = ipaddress.IPv6Interface(addr6)
    assert ip6.network.prefixlen == 128 and ip6.ip in ipaddress.IPv6Network("fd00:c0a1::/48")
    body = {"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": addr, "AddressIPv6": addr6, "MacAddress": ""}}
    answer = ok(client, "NetworkDriver.CreateEndpoint", body)
    assert ok(client, "NetworkDriver.CreateEndpoint", body) == answer  # replay: same answer
    record = plugin.networks.endpoint(NET, EP)
    assert record.ip6 == ip6.ip
    join = ok(client, "NetworkDriver.Join", {"NetworkID": NET, "EndpointID": EP, "SandboxKey": SANDBOX})
    assert join["GatewayIPv6"] == GATEWAY6 and join["Gateway"] == "169.254.1.1"
    assert plugin.links.veths["cnl" + EP[:12]].ip6 == ip6.ip
    info = ok(client, "NetworkDriver.EndpointOperInfo", {"NetworkID": NET, "EndpointID": EP})
    assert info["Value"]["ip6"] == str(ip6.ip)
    # The address is bound: releasing it while the endpoint lives keeps it.
    ok(client, "IpamDriver.ReleaseAddress", {"PoolID": "canal-default6", "Address": str(ip6.ip)})
    status, answer = call(client, "IpamDriver.RequestAddress", {"PoolID": "canal-default6", "Address": str(ip6.ip)})
    assert status == 409 and "already in use by endpoint" in answer["Err"]
    ok(client, "NetworkDriver.Leave", {"NetworkID": NET, "EndpointID": EP})
    ok(client, "NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": EP})
    ok(client, "IpamDriver.ReleaseAddress", {"PoolID": "canal-default", "Address": addr.split("/")[0]})
    ok(client, "IpamDriver.ReleaseAddress", {"PoolID": "canal-default6", "Address": str(ip6.ip)})
    ok(client, "NetworkDriver.DeleteNetwork", {"NetworkID": NET})
    ok(client, "IpamDriver.ReleasePool", {"PoolID": "canal-default6"})
    ok(client, "IpamDriver.ReleasePool", {"PoolID": "canal-default"})
    assert plugin.store.list("")[0] == []


def test_user_v6_subnet_gateway_and_static_ip6(client, plugin):
    pool6 = create_dual_stack(client, "fd00:70::/64")
    assert pool6["PoolID"] == "canal-pool6:fd00:70::/64"
    gw = ok(client, "IpamDriver.RequestAddress", {"PoolID": pool6["PoolID"], "Address": "fd00:70::1",
                                                  "Options": {"RequestAddressType": "com.docker.network.gateway"}})
    assert gw["Address"] == "fd00:70::1/64"
    assert ok(client, "IpamDriver.RequestAddress", {"PoolID": pool6["PoolID"], "Address": "fd00:70::5"})["Address"] == "fd00:70::5/128"
    status, answer = call(client, "IpamDriver.RequestAddress", {"PoolID": pool6["PoolID"], "Address": "fd00:70::5"})
    assert status == 409 and "fd00:70::5 is already in use" in answer["Err"]


def test_an_ipv6_address_not_from_canal_ipam_is_refused(client, plugin):
    create_dual_stack(client)
    addr = ok(client, "IpamDriver.RequestAddress", {"PoolID": "canal-default"})["Address"]
    body = {"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": addr, "AddressIPv6": "fd00:c0a1::99/128"}}
    status, answer = call(client, "NetworkDriver.CreateEndpoint", body)
    assert status == 409 and "fd00:c0a1::99 was not allocated by canal IPAM" in answer["Err"]
    assert plugin.store.get(plugin.keys.endpoint(EP)) is None  # nothing written


def test_bad_ipv6_input_names_the_field(client):
    cases = [
        ("IpamDriver.RequestAddress", {"PoolID": "canal-default6", "Address": "fd00::1%eth0"}, "field Address must be an IPv6 address"),
        ("IpamDriver.RequestAddress", {"PoolID": "canal-default6", "Address": "FD00::1"}, "field Address must be an IPv6 address in canonical form"),
        ("IpamDriver.RequestPool", {"Pool": "fd00::/64\n", "V6": True}, "field Pool"),
        ("NetworkDriver.CreateNetwork", {"NetworkID": NET, "IPv4Data": [{"AddressSpace": "CanalLocal", "Pool": "0.0.0.0/0"}],
                                         "IPv6Data": [{"AddressSpace": "CanalLocal", "Pool": "fd00::1/64"}]},
         "field IPv6Data[0].Pool must be an IPv6 network in canonical form"),
        ("NetworkDriver.CreateNetwork", {"NetworkID": NET, "IPv4Data": [{"AddressSpace": "CanalLocal", "Pool": "0.0.0.0/0"}],
                                         "IPv6Data": [{"AddressSpace": "LocalDefault", "Pool": "fd00::/64"}]},
         "IPv6 address space 'LocalDefault' is not canal's"),
        ("NetworkDriver.CreateEndpoint", {"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": "100.64.7.2/32", "AddressIPv6": "fd00::x/128"}},
         "field Interface.AddressIPv6 must be an IPv6 CIDR"),
    ]
    for name, body, message in cases:
        status, answer = call(client, name, body)
        assert 400 <= status < 500 and message in answer["Err"], (name, answer)


def test_ipv6_address_on_a_v4_only_network_is_refused(client):
    from test_protocol import create_network

    create_network(client)
    addr = ok(client, "IpamDriver.RequestAddress", {"PoolID": "canal-default"})["Address"]
    body = {"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": addr, "AddressIPv6": "fd00:c0a1::5/128"}}
    status, answer = call(client, "NetworkDriver.CreateEndpoint", body)
    assert status == 400 and "not created with --ipv6" in answer["Err"]


def test_an_encrypted_network_can_have_ipv6(client, plugin):
    """Its IPv6 crosses hosts through WireGuard as its IPv4 does (one tunnel, both families)."""
    pool6 = ok(client, "IpamDriver.RequestPool", {"AddressSpace": "CanalLocal", "Pool": "", "SubPool": "", "Options": {}, "V6": True})
    ok(client, "NetworkDriver.CreateNetwork", {
        "NetworkID": NET,
        "Options": {"com.docker.network.enable_ipv6": True, "com.docker.network.generic": {"encrypted": ""}},
        "IPv4Data": [{"AddressSpace": "CanalLocal", "Pool": "0.0.0.0/0", "Gateway": "0.0.0.0/0"}],
        "IPv6Data": [{"AddressSpace": "CanalLocal", "Pool": pool6["Pool"], "Gateway": "::/0"}],
    })
    record = NetworkRecord.parse(json.loads(plugin.store.get(plugin.keys.network("h1", NET)).value))
    assert record.encrypted and record.ipv6
