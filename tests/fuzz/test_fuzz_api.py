"""Hostile bodies for every route (see conftest for the invariants checked on each)."""

from __future__ import annotations

import json
import string

import pytest
import yaml
from fuzz_support import BODIES, EP, NET, POLICY
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

SETTINGS = settings(
    derandomize=True,  # the same bodies on every run: a CI failure reproduces locally
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)

# Values that break naive parsers or reach kernel tools' line-oriented input.
NASTY = [
    "", " ", "\n", "\r\n", "\t", "\x00", "\x7f", "\u2028", "\ud800", "'", '"', "\\", "`id`", "$(reboot)", "; rm -rf /",
    "-A INPUT -j ACCEPT", "\n-A INPUT -j ACCEPT", "COMMIT", "*filter", "add canal-nets 0.0.0.0/1", "\nadd canal-nets 0.0.0.0/1",
    "²", "٣", "１", "é", "💥", "null", "true", "0", "-1", "1e999", "NaN",
    "0.0.0.0/0", "255.255.255.255/32", "100.64.7.5", "100.64.7.5/32", "100.70.0.0/24", "100.70.0.1/24", "100.70.0.7",
    "10.9.0.0/24\nadd canal-nets 0.0.0.0/1", "010.1.1.1/8", "1.2.3.4/33", "fd00::/64", "::1", "02:42:00:00:00:01",
    "02:42:AB:00:00:01", "01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff", "02:42:00:00:00:01\n",
    NET, EP, NET.upper(), EP + "\n", EP[:-1] + "\n", "k3n9x0q2w8e7r6t5y4u1i0o9p", "canal-default", "canal-cluster",
    "canal-pool:100.70.0.0/24", "canal-pool:100.70.0.0/24:100.70.0.128/25", "canal-pool:999.0.0.0/8", "canal-pool:",
    "CanalLocal", "CanalGlobal", "LocalDefault", "com.docker.network.gateway", "/var/run/docker/netns/x", "/x\n/y",
]
LONG = [("a", 300), ("b", 70_000), ("1", 5000), ("\n", 1000)]
nasty = st.one_of(st.sampled_from(NASTY), st.sampled_from(LONG).map(lambda cn: cn[0] * cn[1]))
hostile_text = st.one_of(
    nasty,
    st.text(max_size=40),
    st.text(alphabet=string.printable, max_size=80),
    st.builds(lambda a, b: a + b, nasty, nasty),
)
numbers = st.one_of(
    st.integers(),
    st.sampled_from([0, -1, 1 << 31, 1 << 63, -(1 << 63), 10 ** 19, 10 ** 30, 10 ** 300]),
    st.floats(allow_nan=True, allow_infinity=True),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, hostile_text)


def deep(depth: int, leaf: object = 1) -> object:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"a": value}
    return value


# Two levels of lists/maps (cheap to generate); deeper nesting comes from deep() and the raw bodies.
_flat = st.one_of(st.lists(scalars, max_size=4), st.dictionaries(hostile_text, scalars, max_size=4))
json_values = st.one_of(
    scalars,
    _flat,
    st.lists(_flat, max_size=3),
    st.dictionaries(hostile_text, _flat, max_size=3),
    st.integers(1, 40).map(deep),
)


def field_values(valid: list) -> st.SearchStrategy:
    """Mostly plausible values for a field, with hostile ones and any JSON mixed in."""
    return st.one_of(st.sampled_from(valid), hostile_text, json_values, st.builds(lambda v, n: str(v) + n, st.sampled_from(valid), nasty))


IDS = {
    "NetworkID": field_values([NET, "k3n9x0q2w8e7r6t5y4u1i0o9p", "5" * 64]),
    "EndpointID": field_values([EP, "6" * 64]),
    "PoolID": field_values(["canal-default", "canal-cluster", "canal-pool:100.70.0.0/24", "canal-pool:100.70.0.0/24:100.70.0.128/25"]),
}
generic_options = st.dictionaries(
    st.sampled_from(["nat", "mtu", "network", "com.docker.network.driver.mtu", "canal.nat", "bogus"]),
    st.one_of(st.sampled_from(["true", "false", "1400", "65536", "appnet", "x y"]), scalars, json_values),
    max_size=3,
)
options = st.one_of(
    st.dictionaries(hostile_text, json_values, max_size=4),
    st.fixed_dictionaries({}, optional={
        "com.docker.network.generic": st.one_of(generic_options, json_values),
        "com.docker.network.enable_ipv6": st.one_of(st.booleans(), scalars),
        "com.docker.network.internal": st.one_of(st.booleans(), scalars),
        "RequestAddressType": st.one_of(st.just("com.docker.network.gateway"), hostile_text),
    }),
    json_values,
)
pools = field_values(["0.0.0.0/0", "100.70.0.0/24", "100.64.0.0/16", "100.71.0.0/30", "100.72.0.0/16"])
ipv4_entry = st.fixed_dictionaries({}, optional={
    "AddressSpace": field_values(["CanalLocal", "CanalGlobal", ""]),
    "Pool": pools,
    "Gateway": field_values(["", "100.70.0.1/24", "0.0.0.0/0"]),
    "AuxAddresses": st.one_of(st.dictionaries(hostile_text, field_values(["100.70.0.5/24"]), max_size=3), json_values),
})
FIELDS = {
    **IDS,
    "Options": options,
    "IPv4Data": st.one_of(st.lists(st.one_of(ipv4_entry, json_values), max_size=3), json_values),
    "IPv6Data": st.one_of(st.just([]), json_values),
    "Interface": st.one_of(
        st.fixed_dictionaries({}, optional={
            "Address": field_values(["", "100.70.0.9/24", "100.64.7.9/32", "100.70.0.2/32"]),
            "AddressIPv6": field_values(["", "fd00::2/64"]),
            "MacAddress": field_values(["", "02:42:00:00:00:01", "02:AB:cd:00:00:01"]),
        }),
        json_values,
    ),
    "SandboxKey": field_values(["", "/var/run/docker/netns/5f3a"]),
    "DiscoveryType": st.one_of(numbers, json_values),
    "DiscoveryData": json_values,
    "AddressSpace": field_values(["", "CanalLocal", "CanalGlobal"]),
    "Pool": field_values(["", "100.73.0.0/24", "100.70.0.0/24", "100.64.0.0/16", "100.70.0.1/24"]),
    "SubPool": field_values(["", "100.73.0.128/25", "100.70.0.128/25"]),
    "V6": st.one_of(st.booleans(), scalars),
    "Address": field_values(["", "100.70.0.7", "100.64.7.8", "0.0.0.0", "100.70.0.255"]),
}
CALLS = {
    "Plugin.Activate": [],
    "NetworkDriver.GetCapabilities": [],
    "NetworkDriver.CreateNetwork": ["NetworkID", "Options", "IPv4Data", "IPv6Data"],
    "NetworkDriver.AllocateNetwork": ["NetworkID", "Options", "IPv4Data", "IPv6Data"],
    "NetworkDriver.DeleteNetwork": ["NetworkID"],
    "NetworkDriver.FreeNetwork": ["NetworkID"],
    "NetworkDriver.CreateEndpoint": ["NetworkID", "EndpointID", "Interface", "Options"],
    "NetworkDriver.EndpointOperInfo": ["NetworkID", "EndpointID"],
    "NetworkDriver.DeleteEndpoint": ["NetworkID", "EndpointID"],
    "NetworkDriver.Join": ["NetworkID", "EndpointID", "SandboxKey", "Options"],
    "NetworkDriver.Leave": ["NetworkID", "EndpointID"],
    "NetworkDriver.DiscoverNew": ["DiscoveryType", "DiscoveryData"],
    "NetworkDriver.DiscoverDelete": ["DiscoveryType", "DiscoveryData"],
    "NetworkDriver.ProgramExternalConnectivity": ["NetworkID", "EndpointID", "Options"],
    "NetworkDriver.RevokeExternalConnectivity": ["NetworkID", "EndpointID", "Options"],
    "IpamDriver.GetCapabilities": [],
    "IpamDriver.GetDefaultAddressSpaces": [],
    "IpamDriver.RequestPool": ["AddressSpace", "Pool", "SubPool", "Options", "V6"],
    "IpamDriver.ReleasePool": ["PoolID"],
    "IpamDriver.RequestAddress": ["PoolID", "Address", "Options"],
    "IpamDriver.ReleaseAddress": ["PoolID", "Address"],
}


VALID = {
    "NetworkDriver.CreateNetwork": {"NetworkID": "5" * 64, "Options": {"com.docker.network.generic": {"mtu": "1400"}},
                                    "IPv4Data": [{"AddressSpace": "CanalLocal", "Pool": "100.70.0.0/24", "Gateway": "100.70.0.1/24"}], "IPv6Data": []},
    "NetworkDriver.AllocateNetwork": {"NetworkID": "k3n9x0q2w8e7r6t5y4u1i0o9p", "Options": {"nat": "false"},
                                      "IPv4Data": [{"AddressSpace": "CanalGlobal", "Pool": "100.64.0.0/16"}], "IPv6Data": []},
    "NetworkDriver.CreateEndpoint": {"NetworkID": NET, "EndpointID": "6" * 64,
                                     "Interface": {"Address": "100.70.0.9/24", "AddressIPv6": "", "MacAddress": ""}, "Options": {}},
    "NetworkDriver.Join": {"NetworkID": NET, "EndpointID": EP, "SandboxKey": "/var/run/docker/netns/5f3a", "Options": {}},
    "NetworkDriver.DiscoverNew": {"DiscoveryType": 1, "DiscoveryData": {"Address": "198.18.0.1", "Self": True}},
    "NetworkDriver.DiscoverDelete": {"DiscoveryType": 1, "DiscoveryData": {"Address": "198.18.0.1", "Self": True}},
    "IpamDriver.RequestPool": {"AddressSpace": "CanalLocal", "Pool": "100.73.0.0/24", "SubPool": "100.73.0.128/25", "Options": {}, "V6": False},
    "IpamDriver.ReleasePool": {"PoolID": "canal-pool:100.73.0.0/24"},
    "IpamDriver.RequestAddress": {"PoolID": "canal-pool:100.70.0.0/24", "Address": "100.70.0.7", "Options": {}},
    "IpamDriver.ReleaseAddress": {"PoolID": "canal-pool:100.70.0.0/24", "Address": "100.70.0.7"},
}
for _call in ("DeleteNetwork", "FreeNetwork"):
    VALID[f"NetworkDriver.{_call}"] = {"NetworkID": "5" * 64}
for _call in ("EndpointOperInfo", "DeleteEndpoint", "Leave", "ProgramExternalConnectivity", "RevokeExternalConnectivity"):
    VALID[f"NetworkDriver.{_call}"] = {"NetworkID": NET, "EndpointID": EP, "Options": {}}


def mutated(call: str) -> st.SearchStrategy:
    """A valid body with one or two fields replaced or removed: gets past the other checks, so
    the hostile value meets the deepest code that reads it."""
    valid = VALID.get(call)
    if not valid or not CALLS[call]:
        return st.just(valid or {})
    names = st.sampled_from(CALLS[call])

    def change(body: dict, name: str, value: object, drop: bool) -> dict:
        out = dict(body)
        if drop:
            out.pop(name, None)
        else:
            out[name] = value
        return out

    one = names.flatmap(lambda n: st.builds(change, st.just(valid), st.just(n), FIELDS[n], st.booleans().map(lambda b: b and False)))
    return st.one_of(st.just(valid), one, st.builds(change, st.just(valid), names, st.none(), st.just(True)),
                     one.flatmap(lambda b: names.flatmap(lambda n: st.builds(change, st.just(b), st.just(n), FIELDS[n], st.just(False)))))


def bodies(fields: list[str], call: str = "") -> st.SearchStrategy:
    """A JSON object with each field present or not, plus stray fields; sometimes not an object."""
    stray = {"Stray": json_values, "networkid": FIELDS["NetworkID"], "": scalars}
    obj = st.fixed_dictionaries({}, optional={**{f: FIELDS[f] for f in fields}, **stray})
    if call:
        return st.one_of(mutated(call), mutated(call), obj, json_values)
    return st.one_of(obj, obj, obj, json_values)


def encoded(value: object) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


PER_ROUTE = 400
RAW_EXAMPLES = 1200


def test_every_route_is_fuzzed(sender):
    """The route list above is the app's: a new route must be fuzzed too."""
    routes = {r.rule.lstrip("/") for r in sender.client.application.url_map.iter_rules() if "." in r.rule and "canal/v1" not in r.rule}
    routes.discard("static/<path:filename>")
    assert routes == set(CALLS)


@pytest.mark.parametrize("call", sorted(CALLS))
def test_structured_bodies(sender, call):
    start = BODIES[call]

    @settings(SETTINGS, max_examples=PER_ROUTE)
    @given(body=bodies(CALLS[call], call))
    def run(body):
        sender.send("POST", "/" + call, encoded(body), call)

    run()
    assert BODIES[call] - start >= PER_ROUTE * 0.9, BODIES[call] - start


RAW = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.integers(1, 100_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 3000).map(lambda n: b'{"NetworkID": ' * n),
    st.integers(30, 40).map(lambda n: encoded({"NetworkID": NET, "Options": deep(n)})),
    st.integers(19, 6000).map(lambda n: b'{"DiscoveryType": ' + b"9" * n + b"}"),
    st.sampled_from([b"NaN", b"Infinity", b'{"V6": NaN}', b'{"Pool": 1e99999}', b"\xff\xfe{}", b'{"a": "\\ud800"}', b"{}" * 3,
                     b'{"NetworkID": "' + NET.encode() + b'"', b"\x00", b"null", b'"str"', b"[]", b"12"]),
    st.integers(1 << 20, (1 << 20) + 4096).map(lambda n: b'{"x": "' + b"a" * n + b'"}'),
)


def test_raw_bodies(sender):
    calls = sorted(CALLS)
    start = sum(BODIES.values())

    @settings(SETTINGS, max_examples=RAW_EXAMPLES)
    @given(call=st.sampled_from(calls + ["canal/v1/policies"]), raw=RAW, chunked=st.booleans())
    def run(call, raw, chunked):
        status, _ = sender.send("POST", "/" + call, raw, "raw:" + call, chunked)
        if len(raw) > 1 << 20:
            assert status == 413

    run()
    assert sum(BODIES.values()) - start >= RAW_EXAMPLES * 0.9


# Admin API ----------------------------------------------------------------------------------

RULE = st.fixed_dictionaries({"action": field_values(["Allow", "Deny", "Log", "Pass"])}, optional={
    "protocol": field_values(["TCP", "UDP", "ICMP", 6, 255, "²", "٣", "1" * 30]),
    "notProtocol": field_values(["UDP", 17]),
    "icmp": st.one_of(st.fixed_dictionaries({"type": st.one_of(numbers, hostile_text)}, optional={"code": numbers}), json_values),
    "source": st.fixed_dictionaries({}, optional={
        "selector": field_values(["role == 'web'", "has(x)", "all()", "(" * 500 + "a == 'b'" + ")" * 500, "a == '\n'"]),
        "nets": st.one_of(st.lists(field_values(["10.0.0.0/8", "100.64.0.0/10"]), max_size=3), json_values),
        "notNets": st.lists(field_values(["10.0.0.0/8"]), max_size=2),
    }),
    "destination": st.fixed_dictionaries({}, optional={
        "ports": st.one_of(st.lists(field_values([80, "8000:8080", "9" * 30, "٣", 65536]), max_size=3), json_values),
        "notSelector": field_values(["role == 'db'"]),
    }),
})
POLICY_DOC = st.fixed_dictionaries({
    "apiVersion": field_values(["canal/v1"]),
    "kind": field_values(["NetworkPolicy", "GlobalNetworkPolicy"]),
    "metadata": st.one_of(st.fixed_dictionaries({"name": field_values(["web", "a.b-c"])}, optional={"network": field_values(["appnet"])}), json_values),
}, optional={
    "spec": st.one_of(st.fixed_dictionaries({}, optional={
        "order": st.one_of(numbers, hostile_text),
        "selector": field_values(["role == 'web'", "all()"]),
        "types": st.one_of(st.lists(field_values(["Ingress", "Egress"]), max_size=3), json_values),
        "ingress": st.lists(st.one_of(RULE, json_values), max_size=3),
        "egress": st.lists(RULE, max_size=2),
    }), json_values),
})


def _yaml(docs: list) -> str:
    try:
        return yaml.safe_dump_all(docs, allow_unicode=True)
    except (yaml.YAMLError, UnicodeError):
        return json.dumps(docs)


YAML_ATTACKS = st.sampled_from([
    "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: [*c,*c,*c,*c,*c,*c]\n",
    "!!python/object/apply:os.system ['id']\n", "a: !!binary AAAA\n", "{" * 5000, "[" * 5000 + "]" * 5000, "- " * 200 + "x",
    "a: " + "9" * 5000 + "\n", "a: 1:30\n", "---\n" * 300, "a: b\na: c\n", "? [a]\n: b\n", "<<: {a: 1}\n", "%YAML 9.9\n---\na\n",
    "\t- x", "a: '\x00'", json.dumps(POLICY),
]) | st.just(256 * 1024 + 1).map(lambda n: "x" * n)
DOCUMENTS = st.one_of(
    st.lists(POLICY_DOC, min_size=1, max_size=3).map(_yaml),
    st.lists(POLICY_DOC, min_size=1, max_size=3).map(lambda d: json.dumps(d, allow_nan=True)),
    YAML_ATTACKS,
    hostile_text,
)
ADMIN_EXAMPLES = 1200
REF_EXAMPLES = 500


def test_admin_policy_apply(sender):
    start = sum(BODIES.values())

    @settings(SETTINGS, max_examples=ADMIN_EXAMPLES)
    @given(body=st.one_of(st.fixed_dictionaries({"documents": DOCUMENTS}), st.fixed_dictionaries({"documents": json_values}), json_values))
    def run(body):
        sender.send("POST", "/canal/v1/policies", encoded(body), "POST /canal/v1/policies")

    run()
    assert sum(BODIES.values()) - start >= ADMIN_EXAMPLES * 0.9


def test_admin_reads_and_deletes(sender):
    start = sum(BODIES.values())
    refs = st.one_of(hostile_text, st.sampled_from(["web", "appnet/web", "global/web", "a/b/c", "..", "%0a", "%00", "%ff"]))

    @settings(SETTINGS, max_examples=REF_EXAMPLES)
    @given(method=st.sampled_from(["GET", "DELETE", "POST", "PUT"]), ref=refs,
           base=st.sampled_from(["/canal/v1/policies/", "/canal/v1/", "/canal/v1/endpoints", "/canal/v1/status", "/canal/v1/stats"]))
    def run(method, ref, base):
        path = base + ref if base.endswith("/") else base
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            return
        sender.send(method, path, None, f"{method} {base}")

    run()
    assert sum(BODIES.values()) - start >= REF_EXAMPLES * 0.5


# Positive controls: the same machinery catches the bugs it is meant to catch ---------------------


def _naive_decode(what, data):
    """The edge as it was: json.loads without depth or number limits."""
    try:
        return json.loads(data) if data.strip() else None
    except ValueError:
        from canal.errors import BadRequest

        raise BadRequest(f"{what}: request body is not valid JSON") from None


def test_positive_control_fuzzing_finds_a_500(sender, monkeypatch):
    monkeypatch.setattr("canal.api.protocol.decode", _naive_decode)

    found = []

    @settings(SETTINGS, max_examples=300, phases=[Phase.generate])
    @given(raw=RAW)
    def run(raw):
        try:
            sender.send("POST", "/NetworkDriver.Join", raw, "control:500")
        except AssertionError as err:  # collected, not raised: hypothesis would replay it
            found.append(str(err))

    run()
    monkeypatch.undo()
    assert any("RecursionError" in f for f in found), found[:3]


def test_positive_control_fuzzing_finds_a_refusal_that_wrote(sender, monkeypatch):
    """A service that stores, then refuses: the before/after dump comparison sees it."""
    from canal.errors import BadRequest

    networks = sender.plugin.networks
    original = networks.create_network

    def create_then_refuse(req):
        original(req)
        raise BadRequest("refused after writing")

    monkeypatch.setattr(networks, "create_network", create_then_refuse)

    found = []

    @settings(SETTINGS, max_examples=300, phases=[Phase.generate])
    @given(body=bodies(CALLS["NetworkDriver.CreateNetwork"], "NetworkDriver.CreateNetwork"))
    def run(body):
        try:
            sender.send("POST", "/NetworkDriver.CreateNetwork", encoded(body), "control:write")
        except AssertionError as err:
            found.append(str(err))

    run()
    monkeypatch.undo()
    assert any("refused call changed the datastore" in f for f in found), found[:3]


def test_enough_bodies_in_total(request):
    """Guards against a vacuous pass: runs last in this module and, when the whole module ran,
    asserts the bodies sent by all of it."""
    mine = [item for item in request.session.items if item.module is request.module]
    if len(mine) < len(list(_tests_in_module())):
        pytest.skip("only part of the fuzz module was selected")
    total = sum(n for route, n in BODIES.items() if not route.startswith("control:"))
    print(f"fuzz: {total} bodies in total")
    assert total >= 10_000, total


def _tests_in_module():
    count = 0
    for name, value in globals().items():
        if name.startswith("test_") and callable(value):
            marks = getattr(value, "pytestmark", [])
            params = [m for m in marks if m.name == "parametrize"]
            count += len(params[0].args[1]) if params else 1
    return range(count)
