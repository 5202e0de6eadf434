"""Hostile input at the HTTP edge: each attack from the issue is refused with a 400/413 that
names the call and field, changes nothing, and has a positive control showing what the same
value did (or would do) without the protection."""

from __future__ import annotations

import ipaddress
import io
import json

import pytest
import yaml

from canal.agent.desired import Snapshot, desired_firewall
from canal.api import protocol
from canal.dataplane.iptables import check_restore
from canal.dataplane.firewall import restore_text
from canal.errors import BadRequest, UnsafeInput
from canal.records import EndpointRecord, NetworkRecord, RecordError
from contract_support import CLUSTER

NET = "7a3d" * 16
EP = "e9c1" * 16
SWARM_NET = "k3n9x0q2w8e7r6t5y4u1i0o9p"
HOSTILE_POOL = "10.9.0.0/24\nadd canal-nets 0.0.0.0/1"
HOSTILE_EP = "abc\n-A INPUT -j ACCEPT\n" + "0" * 42


def call(client, name, body=None, raw=None):
    data = raw if raw is not None else json.dumps(body)
    resp = client.post("/" + name, data=data, headers={"Accept": protocol.CONTENT_TYPE})
    return resp.status_code, resp.get_json()


def refused(client, plugin, name, body=None, raw=None, status=400):
    before = plugin.dump()
    got, answer = call(client, name, body, raw)
    assert got == status, (got, answer)
    assert set(answer) == {"Err"} and answer["Err"]
    assert plugin.dump() == before
    return answer["Err"]


def network(client, pool="100.70.0.0/24"):
    ans = call(client, "IpamDriver.RequestPool", {"AddressSpace": "CanalLocal", "Pool": pool})[1]
    status, answer = call(client, "NetworkDriver.CreateNetwork", {
        "NetworkID": NET, "IPv4Data": [{"AddressSpace": "CanalLocal", "Pool": ans["Pool"], "Gateway": ""}],
    })
    assert status == 200, answer
    return ans["PoolID"]


# Pool with a newline: would have landed in `ipset restore` input ---------------------------


def test_pool_with_newline_is_refused_before_the_datastore(client, plugin):
    err = refused(client, plugin, "NetworkDriver.CreateNetwork", {
        "NetworkID": NET, "IPv4Data": [{"AddressSpace": "CanalLocal", "Pool": HOSTILE_POOL}],
    })
    assert err.startswith("NetworkDriver.CreateNetwork: field IPv4Data[0].Pool ") and "\\nadd canal-nets" in err
    assert "canal-nets" not in plugin.ipsets.sets


def test_positive_control_pool_bypassing_the_edge_reaches_the_ipset_members(plugin):
    """Without the protocol edge, the service's own parse and the record types (every layer
    bypassed: records built directly), the pool becomes an ipset member: exactly the line
    `ipset restore` would have split in two. Each layer refuses it on its own."""
    raw = protocol.CreateNetwork(NET, {}, [{"AddressSpace": "CanalLocal", "Pool": HOSTILE_POOL}])
    with pytest.raises(BadRequest, match="not an IPv4 CIDR"):
        plugin.networks.create_network(raw)  # the service's parse, behind the edge
    with pytest.raises(RecordError, match="pool"):
        NetworkRecord.parse({"id": NET, "host": "h1", "pools": [HOSTILE_POOL]})  # the record type
    record = NetworkRecord(id=NET, host="h1", pools=(HOSTILE_POOL,))
    members = {m for s in desired_firewall(Snapshot("h1", CLUSTER, {f"h1/{NET}": record}, {})).ipsets for m in s.members}
    assert HOSTILE_POOL in members
    plugin.firewall.apply(desired_firewall(Snapshot("h1", CLUSTER, {f"h1/{NET}": record}, {})))
    assert HOSTILE_POOL not in plugin.ipsets.sets["canal-nets"]  # the last layer (ipset.py) drops it


@pytest.mark.parametrize("pool", [12, "10.9.0.1/24", "10.9.0.0", "010.9.0.0/24", "10.9.0.0/33", "fd00::/64", "10.9.0.0/24 ", "１0.9.0.0/24"])
def test_pool_must_be_a_canonical_ipv4_network(client, plugin, pool):
    err = refused(client, plugin, "NetworkDriver.CreateNetwork", {
        "NetworkID": NET, "IPv4Data": [{"AddressSpace": "CanalLocal", "Pool": pool}],
    })
    assert "field IPv4Data[0].Pool must be" in err


@pytest.mark.parametrize("entry, field", [
    ({"AddressSpace": "CanalLocal", "Pool": "100.70.0.0/24", "Gateway": "100.70.0.1"}, "IPv4Data[0].Gateway"),
    ({"AddressSpace": "CanalLocal", "Pool": "100.70.0.0/24", "Gateway": 7}, "IPv4Data[0].Gateway"),
    ({"AddressSpace": "CanalLocal", "Pool": "100.70.0.0/24", "AuxAddresses": {"p": "100.70.0.5\n"}}, "IPv4Data[0].AuxAddresses.p"),
    ({"AddressSpace": "CanalLocal", "Pool": "100.70.0.0/24", "AuxAddresses": []}, "IPv4Data[0].AuxAddresses"),
    ({"AddressSpace": ["CanalLocal"], "Pool": "100.70.0.0/24"}, "IPv4Data[0].AddressSpace"),
    ({"AddressSpace": "CanalLocal"}, "IPv4Data[0].Pool is missing"),
    ("100.70.0.0/24", "IPv4Data[0] must be an object"),
])
def test_ipv4_data_fields_are_checked(client, plugin, entry, field):
    err = refused(client, plugin, "NetworkDriver.CreateNetwork", {"NetworkID": NET, "IPv4Data": [entry]})
    assert f"field {field}" in err


def test_gateway_and_aux_addresses_in_dockers_form_are_accepted(client, plugin):
    status, answer = call(client, "NetworkDriver.CreateNetwork", {"NetworkID": NET, "IPv4Data": [{
        "AddressSpace": "CanalLocal", "Pool": "100.70.0.0/24", "Gateway": "100.70.0.1/24",
        "AuxAddresses": {"printer": "100.70.0.5/24"},
    }]})
    assert status == 200, answer
    assert plugin.networks.network(NET).pools == ("100.70.0.0/24",)


# IDs: an EndpointID with a newline split an iptables chain declaration ------------------------


@pytest.mark.parametrize("name", ["NetworkDriver.CreateEndpoint", "NetworkDriver.Join", "NetworkDriver.Leave",
                                  "NetworkDriver.DeleteEndpoint", "NetworkDriver.EndpointOperInfo"])
@pytest.mark.parametrize("endpoint", [HOSTILE_EP, EP.upper(), EP[:-1], EP + "0", "-A " + EP[3:], 64])
def test_endpoint_id_must_be_64_lowercase_hex(client, plugin, name, endpoint):
    network(client)
    err = refused(client, plugin, name, {"NetworkID": NET, "EndpointID": endpoint, "Interface": {"Address": "100.70.0.9/32"}})
    assert err.startswith(f"{name}: field EndpointID must be")


def test_positive_control_endpoint_id_bypassing_the_edge_breaks_the_restore_grammar(plugin):
    """Stored without the edge check, a record with such an ID is quarantined by the record
    type; built directly (every layer bypassed), the ID's first 12 characters become a chain
    name whose newline splits the `:CHAIN - [0:0]` declaration; the restore check refuses it."""
    with pytest.raises(RecordError, match="field id"):
        EndpointRecord.parse({"id": HOSTILE_EP, "network": NET, "host": "h1", "ip": "100.70.0.9",
                              "mac": "02:42:64:46:00:09", "mtu": 1450, "joined": True, "labels": {}})
    network = NetworkRecord(id=NET, host="h1", pools=("100.70.0.0/24",), name="n")
    endpoint = EndpointRecord(id=HOSTILE_EP, network=NET, host="h1", ip=ipaddress.IPv4Address("100.70.0.9"),
                              mac="02:42:64:46:00:09", mtu=1450, joined=True, labels={})
    snap = Snapshot("h1", CLUSTER, {f"h1/{NET}": network}, {HOSTILE_EP: endpoint})
    text = restore_text(desired_firewall(snap), {})
    assert ":CANAL-FW-abc\n-A INPUT - [0:0]\n" in text  # the declaration, split in two
    with pytest.raises(UnsafeInput, match="malformed"):
        check_restore(text)


@pytest.mark.parametrize("network_id", ["7A3D" * 16, NET[:-1], NET + "\n", SWARM_NET.upper(), SWARM_NET + "a", "", " " * 64])
def test_network_id_must_be_dockers_or_swarms(client, plugin, network_id):
    err = refused(client, plugin, "NetworkDriver.DeleteNetwork", {"NetworkID": network_id})
    assert "field NetworkID" in err


def test_swarm_network_ids_are_accepted(client):
    body = {"NetworkID": SWARM_NET, "Options": {}, "IPv4Data": [{"AddressSpace": "CanalGlobal", "Pool": "100.64.0.0/16"}]}
    assert call(client, "NetworkDriver.AllocateNetwork", body) == (200, {"Options": {}})
    assert call(client, "NetworkDriver.CreateNetwork", body)[0] == 200
    assert call(client, "NetworkDriver.DeleteNetwork", {"NetworkID": SWARM_NET})[0] == 200


# MacAddress: any type used to be stored --------------------------------------------------


@pytest.mark.parametrize("mac", [5, ["02:42:00:00:00:01"], {"a": 1}, True, "02:42:00:00:00", "02-42-00-00-00-01",
                                 "02:42:00:00:00:01\n", "01:00:5e:00:00:01", "00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff"])
def test_mac_address_must_be_a_unicast_mac(client, plugin, mac):
    pool = network(client)
    addr = call(client, "IpamDriver.RequestAddress", {"PoolID": pool})[1]["Address"]
    err = refused(client, plugin, "NetworkDriver.CreateEndpoint",
                  {"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": addr, "MacAddress": mac}})
    assert "field Interface.MacAddress must be" in err


def test_mac_address_is_stored_in_lower_case(client, plugin):
    pool = network(client)
    addr = call(client, "IpamDriver.RequestAddress", {"PoolID": pool})[1]["Address"]
    body = {"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": addr, "MacAddress": "02:AB:cd:00:00:01"}}
    assert call(client, "NetworkDriver.CreateEndpoint", body) == (200, {})
    assert plugin.networks.endpoint(NET, EP).mac == "02:ab:cd:00:00:01"


@pytest.mark.parametrize("name, body, field", [
    ("NetworkDriver.Join", {"NetworkID": NET, "EndpointID": EP, "SandboxKey": "/var/run/docker/netns/x\n"}, "SandboxKey"),
    ("NetworkDriver.Join", {"NetworkID": NET, "EndpointID": EP, "SandboxKey": "netns/x"}, "SandboxKey"),
    ("NetworkDriver.Join", {"NetworkID": NET, "EndpointID": EP, "Options": {"k\n": 1}}, "Options"),
    ("NetworkDriver.CreateEndpoint", {"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": "100.70.0.9"}}, "Interface.Address"),
    ("NetworkDriver.CreateEndpoint", {"NetworkID": NET, "EndpointID": EP, "Interface": {"AddressIPv6": 6}}, "Interface.AddressIPv6"),
    ("IpamDriver.RequestAddress", {"PoolID": "canal-default", "Address": "100.64.7.9/32"}, "Address"),
    ("IpamDriver.RequestAddress", {"PoolID": "canal default"}, "PoolID"),
    ("IpamDriver.ReleaseAddress", {"PoolID": "canal-default", "Address": "100.64.7.９"}, "Address"),
    ("IpamDriver.RequestPool", {"Pool": "100.70.0.0/24\n"}, "Pool"),
    ("IpamDriver.RequestPool", {"SubPool": "x"}, "SubPool"),
    ("IpamDriver.RequestPool", {"AddressSpace": "Canal Local"}, "AddressSpace"),
    ("NetworkDriver.DiscoverNew", {"DiscoveryType": -1}, "DiscoveryType"),
])
def test_other_fields_are_checked(client, plugin, name, body, field):
    err = refused(client, plugin, name, body)
    assert err.startswith(f"{name}: field {field}")


# Limits: nesting, size, numbers ------------------------------------------------------------


DEEP = "[" * 100_000 + "]" * 100_000


def test_positive_control_deep_json_overflows_pythons_parser():
    with pytest.raises(RecursionError):
        json.loads(DEEP)


@pytest.mark.parametrize("name", ["NetworkDriver.CreateNetwork", "NetworkDriver.Join", "IpamDriver.RequestPool",
                                  "Plugin.Activate", "NetworkDriver.DiscoverNew"])
@pytest.mark.parametrize("raw", [DEEP, '{"Options": ' + '{"a": ' * 33 + "1" + "}" * 34])
def test_deep_nesting_is_a_400(client, plugin, name, raw):
    assert "nested deeper than 32 levels" in refused(client, plugin, name, raw=raw)


def test_deep_nesting_is_a_400_on_the_admin_api(client, plugin):
    resp = client.post("/canal/v1/policies", data=DEEP)
    assert resp.status_code == 400 and "nested deeper" in resp.get_json()["Err"]


def test_body_over_one_mib_is_a_413(client, plugin):
    padding = "x" * protocol.MAX_BODY
    before = plugin.dump()
    status, answer = call(client, "NetworkDriver.CreateNetwork", raw=json.dumps({"NetworkID": NET, "Pad": padding}))
    assert status == 413 and "larger than 1048576 bytes" in answer["Err"]
    resp = client.post("/canal/v1/policies", data=json.dumps({"documents": padding}))
    assert resp.status_code == 413 and resp.get_json()["Err"]
    assert plugin.dump() == before


def test_body_just_under_the_limit_is_read(client):
    """Control for the 413: the limit is the body size, not something smaller."""
    body = json.dumps({"NetworkID": NET, "Pad": "x" * (protocol.MAX_BODY - 100)})
    status, answer = call(client, "NetworkDriver.DeleteNetwork", raw=body)
    assert status == 404, answer  # parsed and handled: the network does not exist


@pytest.mark.parametrize("raw, message", [
    ('{"DiscoveryType": ' + "1" * 5000 + "}", "more than 20 digits"),
    ('{"DiscoveryType": 1e999}', "out of range"),
    ('{"DiscoveryType": NaN}', "NaN"),
    ('{"DiscoveryType": -Infinity}', "-Infinity"),
    ('{"DiscoveryData": 99999999999999999999}', "out of range"),
])
def test_huge_and_non_finite_numbers_are_a_400(client, plugin, raw, message):
    assert message in refused(client, plugin, "NetworkDriver.DiscoverNew", raw=raw)


def test_positive_control_python_refuses_huge_int_strings():
    with pytest.raises(ValueError, match="4300"):
        int("1" * 5000)


def test_body_that_is_not_utf8_is_a_400(client, plugin):
    assert "not UTF-8" in refused(client, plugin, "NetworkDriver.Join", raw=b'{"NetworkID": "\xff"}')


# Policies through the admin API ----------------------------------------------------------


POLICY = "apiVersion: canal/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: p%d}\nspec:\n  ingress:\n  - action: Allow\n    protocol: %s\n"
LAUGHS = "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(6)
)


def apply(client, documents):
    resp = client.post("/canal/v1/policies", data=json.dumps({"documents": documents}))
    return resp.status_code, resp.get_json()


def test_positive_control_yaml_aliases_expand():
    """Eight lines of aliases are ten million strings once expanded (here counted lazily)."""
    doc = yaml.safe_load(LAUGHS)
    size, level = 10, doc["a"]
    for key in "bcdefg":
        level = doc[key]
        size *= len(level)
    assert len(LAUGHS) < 320 and size == 10_000_000


def test_yaml_aliases_and_anchors_are_refused(client, plugin):
    before = plugin.dump()
    status, answer = apply(client, LAUGHS)
    assert status == 400 and "anchor &a is not allowed" in answer["Err"]
    aliased = POLICY % (1, "TCP") + "    destination: &d {ports: [80]}\n  - action: Allow\n    protocol: TCP\n    destination: *d\n"
    status, answer = apply(client, aliased)
    assert status == 400 and "not allowed in policy input" in answer["Err"]
    assert plugin.dump() == before


@pytest.mark.parametrize("protocol_text", ['"²"', "²", "1" * 5000, '"' + "1" * 5000 + '"', "1e999", '"' + "9" * 30 + '"'])
def test_odd_numbers_in_a_policy_are_a_400(client, plugin, protocol_text):
    before = plugin.dump()
    status, answer = apply(client, POLICY % (1, protocol_text))
    assert status == 400 and answer["Err"], answer
    assert plugin.dump() == before


def test_policy_limits_size_and_documents(client, plugin):
    before = plugin.dump()
    status, answer = apply(client, POLICY % (1, "TCP") + "#" * (256 * 1024))
    assert status == 400 and "larger than 256 KiB" in answer["Err"]
    status, answer = apply(client, "---\n".join(POLICY % (i, "TCP") for i in range(129)))
    assert status == 400 and "at most 128 per apply" in answer["Err"]
    assert plugin.dump() == before
    status, answer = apply(client, "---\n".join(POLICY % (i, "TCP") for i in range(128)))
    assert status == 200 and len(answer["results"]) == 128  # the limit itself is allowed


def test_valid_input_does_change_state(client, plugin):
    """Control for the refusals above: accepted calls do reach the store and the fake kernel,
    so "unchanged" in those tests is a finding, not a blind comparison."""
    before = plugin.dump()
    network(client)
    assert "CANAL-FORWARD" in plugin.iptables.tables["filter"].chains
    assert plugin.ipsets.sets["canal-nets"] == {"100.64.0.0/16", "100.70.0.0/24"}
    status, answer = apply(client, POLICY % (1, "TCP"))
    assert status == 200, answer
    after = dict(plugin.dump())
    assert len(after) == len(before) + 3 and any("/policies/" in k for k in after)


# Chunked bodies: no Content-Length for Flask to refuse up front ------------------------------


def chunked_post(client, path, data):
    return client.post(path, input_stream=io.BytesIO(data), headers={"Transfer-Encoding": "chunked"},
                       environ_overrides={"wsgi.input_terminated": True})


PREFIX_ATTACK = json.dumps({"NetworkID": NET}).encode() + b" " * (protocol.MAX_BODY + 10)


def test_positive_control_werkzeug_cuts_chunked_bodies_silently():
    """What the app would see reading a chunked body through werkzeug: a valid 1 MiB prefix of
    a 2 MiB request, i.e. a different request than the one sent."""
    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Request

    env = EnvironBuilder(method="POST", input_stream=io.BytesIO(PREFIX_ATTACK)).get_environ()
    env.pop("CONTENT_LENGTH", None)
    env["wsgi.input_terminated"] = True
    req = Request(env)
    req.max_content_length = protocol.MAX_BODY
    assert json.loads(req.get_data()) == {"NetworkID": NET}


def test_chunked_body_over_the_limit_is_a_413_not_its_prefix(client, plugin):
    before = plugin.dump()
    resp = chunked_post(client, "/NetworkDriver.DeleteNetwork", PREFIX_ATTACK)
    assert resp.status_code == 413 and "larger than" in resp.get_json()["Err"]
    resp = chunked_post(client, "/canal/v1/policies", b'{"documents": ""}' + b" " * (protocol.MAX_BODY + 10))
    assert resp.status_code == 413
    assert plugin.dump() == before


def test_chunked_body_under_the_limit_is_read(client):
    resp = chunked_post(client, "/NetworkDriver.DeleteNetwork", json.dumps({"NetworkID": NET}).encode())
    assert resp.status_code == 404, resp.get_json()  # parsed and handled: no such network
