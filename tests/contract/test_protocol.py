"""Docker's JSON, replayed through the Flask app: the whole conversation, then every kind of
bad input. Errors must be 4xx with {"Err": ...} naming the problem, and must change nothing."""

from __future__ import annotations

import json

import pytest

from canal.api.protocol import CONTENT_TYPE

NET = "7a3d" * 16
EP = "e9c1" * 16
SANDBOX = "/var/run/docker/netns/5f3a2b1c"


def call(client, name, body=None, raw=None):
    data = raw if raw is not None else ("" if body is None else json.dumps(body))
    # Docker sends its plugin Accept header and no Content-Type.
    resp = client.post("/" + name, data=data, headers={"Accept": CONTENT_TYPE})
    return resp.status_code, resp.get_json()


def ok(client, name, body=None):
    status, answer = call(client, name, body)
    assert status == 200, (name, answer)
    assert "Err" not in answer
    return answer


def create_network(client, generic=None, pool=""):
    pool_ans = ok(client, "IpamDriver.RequestPool", {"AddressSpace": "CanalLocal", "Pool": pool, "SubPool": "", "Options": {}, "V6": False})
    ipv4 = {"AddressSpace": "CanalLocal", "Pool": pool_ans["Pool"], "Gateway": pool_ans["Data"].get("com.docker.network.gateway", "")}
    ok(client, "NetworkDriver.CreateNetwork", {
        "NetworkID": NET,
        "Options": {"com.docker.network.enable_ipv6": False, "com.docker.network.generic": generic or {}},
        "IPv4Data": [ipv4],
        "IPv6Data": [],
    })
    return pool_ans


def test_handshake(client):
    assert ok(client, "Plugin.Activate") == {"Implements": ["NetworkDriver", "IpamDriver"]}
    assert ok(client, "NetworkDriver.GetCapabilities") == {"Scope": "local", "ConnectivityScope": "local"}
    assert ok(client, "IpamDriver.GetCapabilities") == {"RequiresMACAddress": False, "RequiresRequestReplay": False}
    assert ok(client, "IpamDriver.GetDefaultAddressSpaces") == {
        "LocalDefaultAddressSpace": "CanalLocal",
        "GlobalDefaultAddressSpace": "CanalGlobal",
    }


def test_content_type_is_dockers(client):
    resp = client.post("/Plugin.Activate")
    assert resp.headers["Content-Type"] == CONTENT_TYPE


def test_container_lifecycle(client, plugin):
    pool = create_network(client)
    assert pool == {"PoolID": "canal-default", "Pool": "0.0.0.0/0", "Data": {"com.docker.network.gateway": "0.0.0.0/0"}}
    addr = ok(client, "IpamDriver.RequestAddress", {"PoolID": "canal-default", "Address": "", "Options": None})["Address"]
    assert addr.startswith("100.64.7.") and addr.endswith("/32")
    answer = ok(client, "NetworkDriver.CreateEndpoint", {
        "NetworkID": NET, "EndpointID": EP,
        "Interface": {"Address": addr, "AddressIPv6": "", "MacAddress": ""},
        "Options": {"com.docker.network.endpoint.exposedports": [], "com.docker.network.portmap": []},
    })
    ip = addr.split("/")[0]
    assert answer == {"Interface": {"MacAddress": "02:42:" + ":".join(f"{int(b):02x}" for b in ip.split("."))}}
    # The pair is started at CreateEndpoint (the kernel's add overlaps with Docker's own work), not configured.
    assert set(plugin.links.prepared) == {"cnl" + EP[:12]} and plugin.links.veths == {}
    join = ok(client, "NetworkDriver.Join", {"NetworkID": NET, "EndpointID": EP, "SandboxKey": SANDBOX, "Options": {}})
    assert join == {
        "InterfaceName": {"SrcName": "cnp" + EP[:12], "DstPrefix": "eth"},
        "Gateway": "169.254.1.1",
        "StaticRoutes": [{"Destination": "169.254.1.1/32", "RouteType": 1, "NextHop": ""}],
        "DisableGatewayService": False,
    }
    assert set(plugin.links.veths) == {"cnl" + EP[:12]} and plugin.links.prepared == {}
    assert plugin.links.veths["cnl" + EP[:12]].mtu == 1450
    ok(client, "NetworkDriver.ProgramExternalConnectivity", {"NetworkID": NET, "EndpointID": EP, "Options": {}})
    info = ok(client, "NetworkDriver.EndpointOperInfo", {"NetworkID": NET, "EndpointID": EP})
    assert info["Value"]["ip"] == ip
    ok(client, "NetworkDriver.RevokeExternalConnectivity", {"NetworkID": NET, "EndpointID": EP})
    ok(client, "NetworkDriver.Leave", {"NetworkID": NET, "EndpointID": EP})
    assert plugin.networks.endpoint(NET, EP).joined is False
    assert plugin.links.veths == {}  # removed by the agent pass Leave asked for
    ok(client, "NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": EP})
    ok(client, "IpamDriver.ReleaseAddress", {"PoolID": "canal-default", "Address": ip})
    ok(client, "IpamDriver.ReleaseAddress", {"PoolID": "canal-default", "Address": "0.0.0.0"})
    ok(client, "NetworkDriver.DeleteNetwork", {"NetworkID": NET})
    ok(client, "IpamDriver.ReleasePool", {"PoolID": "canal-default"})
    assert plugin.store.list("")[0] == []


def test_an_endpoint_deleted_without_join_leaves_no_prepared_pair(client, plugin):
    create_network(client)
    addr = ok(client, "IpamDriver.RequestAddress", {"PoolID": "canal-default", "Address": "", "Options": None})["Address"]
    ok(client, "NetworkDriver.CreateEndpoint", {"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": addr}})
    assert set(plugin.links.prepared) == {"cnl" + EP[:12]}
    ok(client, "NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": EP})
    assert plugin.links.prepared == {} and plugin.links.veths == {}


def test_user_subnet_with_gateway_aux_and_static_ip(client, plugin):
    pool = create_network(client, pool="100.70.0.0/24")
    assert pool["PoolID"] == "canal-pool:100.70.0.0/24" and pool["Data"] == {}
    gw = ok(client, "IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "100.70.0.1", "Options": {"RequestAddressType": "com.docker.network.gateway"}})
    assert gw["Address"] == "100.70.0.1/24"
    assert ok(client, "IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "100.70.0.5", "Options": None})["Address"] == "100.70.0.5/32"
    status, answer = call(client, "IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "100.70.0.5"})
    assert status == 409 and "100.70.0.5 is already in use" in answer["Err"]


def test_endpoint_replay_is_idempotent(client):
    create_network(client)
    addr = ok(client, "IpamDriver.RequestAddress", {"PoolID": "canal-default"})["Address"]
    body = {"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": addr, "MacAddress": "02:42:00:00:00:01"}}
    assert ok(client, "NetworkDriver.CreateEndpoint", body) == {}
    assert ok(client, "NetworkDriver.CreateEndpoint", body) == {}
    join = {"NetworkID": NET, "EndpointID": EP, "SandboxKey": SANDBOX}
    assert ok(client, "NetworkDriver.Join", join) == ok(client, "NetworkDriver.Join", join)


def test_network_options(client, plugin):
    create_network(client, generic={"nat": "false", "com.docker.network.driver.mtu": "1400"})
    record = plugin.networks.network(NET)
    assert record.nat is False and record.mtu == 1400


def test_swarm_allocate_network_echoes_options(client):
    body = {"NetworkID": NET, "Options": {"com.docker.network.generic": "x", "nat": "false"}, "IPv4Data": [], "IPv6Data": []}
    assert ok(client, "NetworkDriver.AllocateNetwork", body) == {"Options": body["Options"]}
    assert ok(client, "NetworkDriver.FreeNetwork", {"NetworkID": NET}) == {}


def test_discovery_is_accepted(client):
    body = {"DiscoveryType": 1, "DiscoveryData": {"Address": "198.18.0.1", "BindAddress": "", "Self": True}}
    assert ok(client, "NetworkDriver.DiscoverNew", body) == {}
    assert ok(client, "NetworkDriver.DiscoverDelete", body) == {}


def test_admin_stats_count_calls(client):
    ok(client, "Plugin.Activate")
    stats = client.get("/canal/v1/stats").get_json()
    assert stats["Plugin.Activate"]["count"] == 1 and stats["Plugin.Activate"]["p99_ms"] >= 0


def test_admin_stats_window_of_last_calls(client):
    for _ in range(3):
        ok(client, "Plugin.Activate")
    window = client.get("/canal/v1/stats?last=1").get_json()["Plugin.Activate"]
    assert window["count"] == 3  # the total count; the quantiles are over the window
    assert window["p50_ms"] == window["p99_ms"] == window["max_ms"]  # one sample
    bad = client.get("/canal/v1/stats?last=-1")
    assert bad.status_code == 400 and "last must be a non-negative integer" in bad.get_json()["Err"]


# Bad input: every call, every way ------------------------------------------------------

CALLS_WITH_REQUIRED = {
    "NetworkDriver.CreateNetwork": "NetworkID",
    "NetworkDriver.DeleteNetwork": "NetworkID",
    "NetworkDriver.AllocateNetwork": "NetworkID",
    "NetworkDriver.FreeNetwork": "NetworkID",
    "NetworkDriver.CreateEndpoint": "NetworkID",
    "NetworkDriver.EndpointOperInfo": "NetworkID",
    "NetworkDriver.DeleteEndpoint": "NetworkID",
    "NetworkDriver.Join": "NetworkID",
    "NetworkDriver.Leave": "NetworkID",
    "NetworkDriver.ProgramExternalConnectivity": "NetworkID",
    "NetworkDriver.RevokeExternalConnectivity": "NetworkID",
    "IpamDriver.ReleasePool": "PoolID",
    "IpamDriver.RequestAddress": "PoolID",
    "IpamDriver.ReleaseAddress": "PoolID",
}


@pytest.fixture
def unchanged(plugin):
    before = plugin.store.list("")[0]
    yield
    assert [(e.key, e.value) for e in plugin.store.list("")[0]] == [(e.key, e.value) for e in before]


@pytest.mark.parametrize("name", sorted(CALLS_WITH_REQUIRED))
def test_malformed_json_is_a_clear_400(client, unchanged, name):
    status, answer = call(client, name, raw="{not json")
    assert status == 400 and answer == {"Err": f"{name}: request body is not valid JSON"}


@pytest.mark.parametrize("name", sorted(CALLS_WITH_REQUIRED))
def test_non_object_body_is_a_clear_400(client, unchanged, name):
    status, answer = call(client, name, raw="[1, 2]")
    assert status == 400 and answer == {"Err": f"{name}: request body must be a JSON object"}


@pytest.mark.parametrize("name, field", sorted(CALLS_WITH_REQUIRED.items()))
def test_missing_field_is_named(client, unchanged, name, field):
    status, answer = call(client, name, {})
    assert status == 400 and answer == {"Err": f"{name}: missing field {field}"}


@pytest.mark.parametrize(
    "name, body, message",
    [
        ("NetworkDriver.CreateNetwork", {"NetworkID": 5}, "field NetworkID must be a string, got int"),
        ("NetworkDriver.CreateNetwork", {"NetworkID": NET, "Options": []}, "field Options must be an object, got list"),
        ("NetworkDriver.CreateNetwork", {"NetworkID": NET, "IPv4Data": {}}, "field IPv4Data must be an array, got dict"),
        ("NetworkDriver.CreateNetwork", {"NetworkID": ""}, "field NetworkID is empty"),
        ("NetworkDriver.CreateNetwork", {"NetworkID": NET, "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": "172.18.0.0/16"}]}, "--ipam-driver canal"),
        ("NetworkDriver.CreateNetwork", {"NetworkID": NET, "IPv4Data": [{"AddressSpace": "CanalLocal", "Pool": "0.0.0.0/0"}], "Options": {"com.docker.network.generic": {"bogus": "1"}}}, "unknown option 'bogus'"),
        ("NetworkDriver.CreateNetwork", {"NetworkID": NET, "IPv4Data": [{"AddressSpace": "CanalLocal", "Pool": "0.0.0.0/0"}], "Options": {"com.docker.network.generic": {"mtu": "9"}}}, "MTU must be between"),
        ("NetworkDriver.CreateNetwork", {"NetworkID": NET, "IPv4Data": [{"AddressSpace": "CanalLocal", "Pool": "0.0.0.0/0"}], "Options": {"com.docker.network.generic": {"nat": "maybe"}}}, "nat='maybe': expected true or false"),
        ("NetworkDriver.CreateNetwork", {"NetworkID": NET, "IPv4Data": [{"AddressSpace": "CanalLocal", "Pool": "0.0.0.0/0"}], "Options": {"com.docker.network.enable_ipv6": True}}, "--ipv6 without an IPv6 pool"),
        ("NetworkDriver.CreateNetwork", {"NetworkID": NET}, "no IPv4 pool"),
        ("IpamDriver.RequestPool", {"Pool": 10}, "field Pool must be a string"),
        ("IpamDriver.RequestPool", {"V6": "yes"}, "field V6 must be a boolean"),
        ("IpamDriver.RequestPool", {"AddressSpace": "CanalLocal", "Pool": "300.1.0.0/16"}, "not an IPv4 CIDR"),
        ("NetworkDriver.DiscoverNew", {"DiscoveryType": "one"}, "field DiscoveryType must be a number"),
    ],
)
def test_mistyped_and_invalid_fields_are_named(client, unchanged, name, body, message):
    status, answer = call(client, name, body)
    assert status == 400 and message in answer["Err"], answer


@pytest.mark.parametrize(
    "name, body",
    [
        ("NetworkDriver.DeleteNetwork", {"NetworkID": NET}),
        ("NetworkDriver.CreateEndpoint", {"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": "100.64.7.2/32"}}),
        ("NetworkDriver.EndpointOperInfo", {"NetworkID": NET, "EndpointID": EP}),
        ("NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": EP}),
        ("NetworkDriver.Join", {"NetworkID": NET, "EndpointID": EP, "SandboxKey": SANDBOX}),
        ("NetworkDriver.Leave", {"NetworkID": NET, "EndpointID": EP}),
        ("IpamDriver.RequestAddress", {"PoolID": "someone-elses-pool"}),
        ("IpamDriver.ReleasePool", {"PoolID": "someone-elses-pool"}),
    ],
)
def test_unknown_ids_are_404(client, unchanged, name, body):
    status, answer = call(client, name, body)
    assert status == 404 and answer["Err"]


def test_endpoint_without_address_or_with_ipv6_is_refused(client):
    create_network(client)
    for iface, message in (({}, "no IPv4 address"), ({"Address": "x"}, "bad address 'x'"), ({"AddressIPv6": "fd00::2/64"}, "not created with --ipv6")):
        status, answer = call(client, "NetworkDriver.CreateEndpoint", {"NetworkID": NET, "EndpointID": EP, "Interface": iface})
        assert status == 400 and message in answer["Err"]


def test_address_bound_to_another_endpoint_is_refused(client):
    create_network(client)
    addr = ok(client, "IpamDriver.RequestAddress", {"PoolID": "canal-default"})["Address"]
    ok(client, "NetworkDriver.CreateEndpoint", {"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": addr}})
    status, answer = call(client, "NetworkDriver.CreateEndpoint", {"NetworkID": NET, "EndpointID": "f" * 64, "Interface": {"Address": addr}})
    assert status == 409 and f"already used by endpoint {EP[:12]}" in answer["Err"]


def test_unknown_uri_and_wrong_method_answer_json(client):
    resp = client.post("/NetworkDriver.Nope", data="{}")
    assert resp.status_code == 404 and resp.get_json() == {"Err": "unknown call '/NetworkDriver.Nope'"}
    resp = client.get("/NetworkDriver.CreateNetwork")
    assert resp.status_code == 405 and "Method Not Allowed" in resp.get_json()["Err"]
