"""Policy documents: strict validation (every field, with its path), YAML and JSON input, defaults.

Policy is security configuration: anything not understood must be refused loudly, never ignored,
so most of this file is a table of bad inputs and the exact place the error must point at.
"""

from __future__ import annotations

import copy
import json
import math

import pytest

from canal.errors import BadRequest
from canal.policy.model import (
    GLOBAL,
    NETWORK,
    EntityRule,
    IcmpMatch,
    Policy,
    Rule,
    load_documents,
)

BASE = {
    "apiVersion": "canal/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "db-from-web", "network": "appnet"},
    "spec": {
        "order": 100,
        "selector": "role == 'db'",
        "types": ["Ingress"],
        "ingress": [
            {
                "action": "Allow",
                "protocol": "TCP",
                "source": {"selector": "role == 'web'"},
                "destination": {"ports": [5432, "8000:8080"]},
            }
        ],
    },
}


def doc(**changes):
    """BASE with dotted-path changes; a value of DELETE removes the field."""
    out = copy.deepcopy(BASE)
    for path, value in changes.items():
        node = out
        parts = path.split("__")
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = value
        elif value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return out


DELETE = object()


def load_one(document) -> Policy:
    (policy,) = load_documents(json.dumps(document))
    return policy


# --------------------------------------------------------------------------------------------------
# Valid documents


YAML_TWO = """\
apiVersion: canal/v1
kind: NetworkPolicy          # applies within one canal network
metadata: {name: db-from-web, network: appnet}
spec:
  order: 100
  selector: role == 'db'
  types: [Ingress]
  ingress:
    - action: Allow
      protocol: TCP
      source: {selector: role == 'web', nets: [10.0.0.0/8], notNets: [10.9.0.0/16]}
      destination: {ports: [5432, "8000:8080"], notPorts: [8001]}
    - action: Log
    - action: Deny
      protocol: ICMP
      icmp: {type: 8, code: 0}
      notICMP: {type: 3}
---
apiVersion: canal/v1
kind: GlobalNetworkPolicy
metadata:
  name: egress-lockdown
spec:
  selector: has(locked)
  egress:
    - action: Pass
      notProtocol: UDP
      destination: {notSelector: "tier in {'a', 'b'}"}
"""


def test_yaml_multi_document():
    db, lock = load_documents(YAML_TWO)
    assert (db.kind, db.name, db.network, db.key) == (NETWORK, "db-from-web", "appnet", "appnet/db-from-web")
    assert db.order == 100.0 and db.selector == "role == 'db'" and db.types == ("Ingress",)
    allow, log, deny = db.ingress
    assert allow == Rule(
        "Allow",
        protocol="TCP",
        source=EntityRule(nets=("10.0.0.0/8",), not_nets=("10.9.0.0/16",), selector="role == 'web'"),
        destination=EntityRule(ports=((5432, 5432), (8000, 8080)), not_ports=((8001, 8001),)),
    )
    assert log == Rule("Log")
    assert deny.icmp == IcmpMatch(8, 0) and deny.not_icmp == IcmpMatch(3)
    assert (lock.kind, lock.network, lock.key) == (GLOBAL, None, "global/egress-lockdown")
    assert lock.types == ("Egress",) and lock.order is None
    assert lock.egress[0].not_protocol == "UDP"
    assert lock.egress[0].destination.not_selector == "tier in {'a', 'b'}"


def test_json_object_and_list():
    assert load_documents(json.dumps(BASE)) == [load_one(BASE)]
    other = doc(metadata__name="second")
    policies = load_documents(json.dumps([BASE, other]))
    assert [p.name for p in policies] == ["db-from-web", "second"]


def test_yaml_list_and_flow_style():
    assert load_documents("- " + json.dumps(BASE)) == [load_one(BASE)]
    flow = "{apiVersion: canal/v1, kind: GlobalNetworkPolicy, metadata: {name: g}}"
    assert load_documents(flow)[0].key == "global/g"


def test_empty_input_and_empty_yaml_documents():
    assert load_documents("") == []
    assert load_documents("# nothing\n---\n") == []
    text = "---\n" + YAML_TWO + "---\n# trailing\n"
    assert len(load_documents(text)) == 2


def test_round_trip_through_stored_json():
    for policy in load_documents(YAML_TWO):
        stored = json.loads(json.dumps(policy.to_dict()))
        assert Policy.from_dict(stored) == policy
        assert Policy.from_dict(stored).to_dict() == stored


def test_to_dict_is_explicit():
    stored = load_one(doc(spec__types=DELETE, spec__order=DELETE)).to_dict()
    assert stored["spec"]["types"] == ["Ingress"]
    assert "order" not in stored["spec"]
    assert stored["spec"]["ingress"][0]["destination"]["ports"] == [5432, "8000:8080"]


@pytest.mark.parametrize(
    "ingress, egress, expected",
    [
        (None, None, ("Ingress",)),
        ([{"action": "Allow"}], None, ("Ingress",)),
        (None, [{"action": "Allow"}], ("Egress",)),
        ([{"action": "Allow"}], [{"action": "Deny"}], ("Ingress", "Egress")),
        ([], [], ("Ingress",)),
    ],
)
def test_default_types(ingress, egress, expected):
    spec = {"selector": "all()"}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    assert load_one(doc(spec=spec)).types == expected


def test_types_are_canonically_ordered():
    assert load_one(doc(spec__types=["Egress", "Ingress"])).types == ("Ingress", "Egress")


def test_order_defaults_to_infinity_and_ties_break_by_name():
    first = load_one(doc(spec__order=5, metadata__name="z"))
    unordered = load_one(doc(spec__order=DELETE, metadata__name="a"))
    tie_a = load_one(doc(spec__order=10, metadata__name="a"))
    tie_b = load_one(doc(spec__order=10, metadata__name="b"))
    assert unordered.order is None and unordered.sort_key[0] == math.inf
    ordered = sorted([unordered, tie_b, first, tie_a], key=lambda p: p.sort_key)
    assert [p.name for p in ordered] == ["z", "a", "b", "a"]
    assert load_one(doc(spec__order=1.5)).order == 1.5


def test_missing_spec_means_ingress_default_deny_for_all():
    policy = load_one({"apiVersion": "canal/v1", "kind": "GlobalNetworkPolicy", "metadata": {"name": "deny"}})
    assert (policy.selector, policy.types, policy.ingress) == ("", ("Ingress",), ())


@pytest.mark.parametrize(
    "value, expected",
    [("TCP", "TCP"), ("tcp", "TCP"), ("udplite", "UDPLite"), ("Sctp", "SCTP"), ("icmp", "ICMP"), (6, 6), ("47", 47), (255, 255)],
)
def test_protocol_forms(value, expected):
    rule = {"action": "Allow", "protocol": value}
    assert load_one(doc(spec__ingress=[rule])).ingress[0].protocol == expected


@pytest.mark.parametrize("protocol", ["TCP", "UDP", "SCTP", "UDPLite", 6, 17, 132, 136])
def test_ports_allowed_with_port_protocols(protocol):
    rule = {"action": "Allow", "protocol": protocol, "source": {"notPorts": [1]}}
    assert load_one(doc(spec__ingress=[rule])).ingress[0].source.not_ports == ((1, 1),)


def test_nets_normalised():
    rule = {"action": "Allow", "source": {"nets": ["10.0.0.1", "0.0.0.0/0", "192.168.0.0/16"]}}
    nets = load_one(doc(spec__ingress=[rule])).ingress[0].source.nets
    assert nets == ("10.0.0.1/32", "0.0.0.0/0", "192.168.0.0/16")


def test_yaml_sexagesimal_port_range_stays_a_range():
    # YAML 1.1 reads an unquoted 1:30 as the integer 90; that must never become port 90.
    text = YAML_TWO.replace('"8000:8080"', "1:30")
    assert load_documents(text)[0].ingress[0].destination.ports == ((5432, 5432), (1, 30))


def test_policy_names_and_keys():
    assert load_one(doc(metadata__name="a")).key == "appnet/a"
    assert load_one(doc(metadata__name="a.b-c.1")).name == "a.b-c.1"
    assert load_one(doc(metadata__name="x" * 253)).name == "x" * 253
    assert load_one(doc(metadata__network="My_Net.1")).key == "My_Net.1/db-from-web"


# --------------------------------------------------------------------------------------------------
# Invalid documents: every field, and the exact path the error must name


R = "document 1 (db-from-web): "
RULE = R + "spec.ingress[0]"


def rule(**fields):
    return {"spec__ingress": [{"action": "Allow", **fields}]}


BAD = [
    # top level
    ({"apiVersion": "projectcalico.org/v3"}, R + "apiVersion: expected 'canal/v1', got 'projectcalico.org/v3'"),
    ({"apiVersion": DELETE}, R + "apiVersion: required field is missing"),
    ({"apiVersion": 1}, R + "apiVersion: expected a string, got a number"),
    ({"kind": "Policy"}, R + "kind: expected NetworkPolicy or GlobalNetworkPolicy, got 'Policy'"),
    ({"kind": DELETE}, R + "kind: required field is missing"),
    ({"status": {}}, R + "status: unknown field; expected one of: apiVersion, kind, metadata, spec"),
    ({"metadata": DELETE}, "document 1: metadata: required field is missing"),
    ({"metadata": "x"}, "document 1: metadata: expected an object, got a string"),
    ({"spec": [1]}, R + "spec: expected an object, got a list"),
    # metadata
    ({"metadata__name": DELETE}, "document 1: metadata.name: required field is missing"),
    ({"metadata__name": "DB"}, "document 1: metadata.name: invalid name 'DB'"),
    ({"metadata__name": "-db"}, "document 1: metadata.name: invalid name '-db'"),
    ({"metadata__name": "db-"}, "document 1: metadata.name: invalid name 'db-'"),
    ({"metadata__name": "d_b"}, "document 1: metadata.name: invalid name 'd_b'"),
    ({"metadata__name": "x" * 254}, "document 1: metadata.name: invalid name 'xxxx"),
    ({"metadata__name": 7}, "document 1: metadata.name: expected a string, got a number"),
    ({"metadata__network": DELETE}, R + "metadata.network: required field is missing"),
    ({"metadata__network": "a b"}, R + "metadata.network: invalid network name 'a b'"),
    ({"metadata__network": "_x"}, R + "metadata.network: invalid network name '_x'"),
    ({"metadata__namespace": "default"}, R + "metadata.namespace: unknown field; expected one of: name, network"),
    ({"kind": "GlobalNetworkPolicy"}, R + "metadata.network: a GlobalNetworkPolicy spans all networks"),
    # spec
    ({"spec__order": "1"}, R + "spec.order: expected a number, got a string"),
    ({"spec__order": True}, R + "spec.order: expected a number, got a boolean"),
    ({"spec__selector": 5}, R + "spec.selector: expected a string, got a number"),
    ({"spec__selector": "role = 'db'"}, R + "spec.selector: selector \"role = 'db'\" column 6: expected an operator"),
    ({"spec__selector": "has(role"}, R + "spec.selector: selector \"has(role\" column 9: expected ')'"),
    ({"spec__types": "Ingress"}, R + "spec.types: expected a list, got a string"),
    ({"spec__types": []}, R + "spec.types: expected at least one of Ingress, Egress"),
    ({"spec__types": ["ingress"]}, R + "spec.types[0]: expected Ingress or Egress, got 'ingress'"),
    ({"spec__types": ["Ingress", "Ingress"]}, R + "spec.types[1]: Ingress listed twice"),
    ({"spec__types": ["Egress"]}, R + "spec.ingress: ingress rules given but spec.types does not include Ingress"),
    ({"spec__types": ["Ingress"], "spec__egress": [{"action": "Allow"}]}, R + "spec.egress: egress rules given but spec.types does not include Egress"),
    ({"spec__ingres": []}, R + "spec.ingres: unknown field; expected one of: order, selector, types, ingress, egress"),
    ({"spec__doNotTrack": True}, R + "spec.doNotTrack: unknown field"),
    ({"spec__ingress": {"action": "Allow"}}, R + "spec.ingress: expected a list, got an object"),
    ({"spec__ingress": ["Allow"]}, RULE + ": expected an object, got a string"),
    # rule
    ({"spec__ingress": [{}]}, RULE + ".action: required field is missing"),
    (rule(action="allow"), RULE + ".action: expected one of Allow, Deny, Log, Pass, got 'allow'"),
    (rule(action="Accept"), RULE + ".action: expected one of Allow, Deny, Log, Pass, got 'Accept'"),
    (rule(ipVersion=4), RULE + ".ipVersion: unknown field; expected one of: action, protocol, notProtocol, icmp, notICMP, source, destination"),
    (rule(protocol="GRE"), RULE + ".protocol: unknown protocol 'GRE'"),
    (rule(protocol="ICMPv4"), RULE + ".protocol: unknown protocol 'ICMPv4'"),
    (rule(protocol=0), RULE + ".protocol: protocol number 0 out of range 1-255"),
    (rule(protocol=256), RULE + ".protocol: protocol number 256 out of range 1-255"),
    (rule(protocol=True), RULE + ".protocol: expected a protocol name or number, got a boolean"),
    (rule(protocol=6.0), RULE + ".protocol: expected a protocol name or number, got 6.0"),
    (rule(notProtocol="tcpp"), RULE + ".notProtocol: unknown protocol 'tcpp'"),
    # icmp
    (rule(icmp={"type": 8}), RULE + ".icmp: ICMP type/code need protocol ICMP or ICMPv6"),
    (rule(protocol="TCP", notICMP={"type": 8}), RULE + ".notICMP: ICMP type/code need protocol ICMP"),
    (rule(protocol="ICMP", icmp={"code": 0}), RULE + ".icmp.type: required when code is given"),
    (rule(protocol="ICMP", icmp={}), RULE + ".icmp.type: required field is missing"),
    (rule(protocol="ICMP", icmp={"type": 255}), RULE + ".icmp.type: ICMP type 255 out of range 0-254"),
    (rule(protocol="ICMP", icmp={"type": 8, "code": 256}), RULE + ".icmp.code: ICMP code 256 out of range 0-255"),
    (rule(protocol="ICMP", icmp={"type": "8"}), RULE + ".icmp.type: expected ICMP type (an integer 0-254), got a string"),
    (rule(protocol="ICMP", notICMP={"type": 8, "cod": 1}), RULE + ".notICMP.cod: unknown field; expected one of: type, code"),
    (rule(protocol="ICMP", icmp=[8]), RULE + ".icmp: expected an object, got a list"),
    # source / destination
    (rule(source="web"), RULE + ".source: expected an object, got a string"),
    (rule(source={"namespaceSelector": "x"}), RULE + ".source.namespaceSelector: unknown field; expected one of: nets, notNets, selector, notSelector, ports, notPorts"),
    (rule(destination={"selecter": "a == 'b'"}), RULE + ".destination.selecter: unknown field"),
    (rule(source={"selector": "role == web"}), RULE + ".source.selector: selector \"role == web\" column 9: expected a string literal after '=='"),
    (rule(destination={"notSelector": "a &&"}), RULE + ".destination.notSelector: selector \"a &&\""),
    (rule(source={"selector": ["a"]}), RULE + ".source.selector: expected a string, got a list"),
    (rule(source={"nets": "10.0.0.0/8"}), RULE + ".source.nets: expected a list, got a string"),
    (rule(source={"nets": ["10.0.0.0/33"]}), RULE + ".source.nets[0]: invalid CIDR '10.0.0.0/33'"),
    (rule(source={"nets": ["10.0.0.0/8", "bogus"]}), RULE + ".source.nets[1]: invalid CIDR 'bogus'"),
    (rule(source={"nets": [" 10.0.0.0/8"]}), RULE + ".source.nets[0]: invalid CIDR ' 10.0.0.0/8'"),
    (rule(source={"nets": ["10.0.0.1/8"]}), RULE + ".source.nets[0]: 10.0.0.1/8 has host bits set; write 10.0.0.0/8 for the network or 10.0.0.1/32 for the host"),
    (rule(destination={"notNets": ["fd00::1/8"]}), RULE + ".destination.notNets[0]: fd00::1/8 has host bits set; write fd00::/8 for the network or fd00::1/128 for the host"),
    (rule(destination={"notNets": [10]}), RULE + ".destination.notNets[0]: expected a string, got a number"),
    # ports
    (rule(destination={"ports": [80]}), RULE + ".destination.ports: ports need protocol TCP, UDP, SCTP or UDPLite"),
    (rule(protocol="ICMP", source={"notPorts": [80]}), RULE + ".source.notPorts: ports need protocol TCP, UDP, SCTP or UDPLite"),
    (rule(notProtocol="TCP", destination={"ports": [80]}), RULE + ".destination.ports: ports need protocol"),
    (rule(protocol="TCP", destination={"ports": [5432, "9000:80"]}), RULE + ".destination.ports[1]: port range '9000:80' has start > end"),
    (rule(protocol="TCP", destination={"ports": [65536]}), RULE + ".destination.ports[0]: port 65536 out of range 0-65535"),
    (rule(protocol="TCP", destination={"ports": [-1]}), RULE + ".destination.ports[0]: port -1 out of range 0-65535"),
    (rule(protocol="TCP", destination={"ports": ["1:70000"]}), RULE + ".destination.ports[0]: port 70000 in '1:70000' out of range 0-65535"),
    (rule(protocol="TCP", destination={"ports": ["http"]}), RULE + ".destination.ports[0]: named port 'http' is not supported"),
    (rule(protocol="TCP", destination={"ports": ["80-90"]}), RULE + ".destination.ports[0]: invalid port '80-90'"),
    (rule(protocol="TCP", destination={"ports": ["80:"]}), RULE + ".destination.ports[0]: invalid port '80:'"),
    (rule(protocol="TCP", destination={"ports": [80.5]}), RULE + ".destination.ports[0]: expected a port number or \"start:end\" range, got 80.5"),
    (rule(protocol="TCP", destination={"ports": [True]}), RULE + ".destination.ports[0]: expected a port number or \"start:end\" range, got a boolean"),
    (rule(protocol="TCP", source={"notPorts": 80}), RULE + ".source.notPorts: expected a list, got a number"),
]


@pytest.mark.parametrize("changes, message", BAD, ids=[m.split(": ", 1)[1][:60] for _, m in BAD])
def test_invalid_documents(changes, message):
    document = doc(**changes)
    with pytest.raises(BadRequest) as err:
        load_documents(json.dumps(document))
    assert str(err.value).startswith(message), str(err.value)


def test_from_dict_reports_path_without_document_prefix():
    with pytest.raises(BadRequest, match=r"^spec\.ingress\[0\]\.action: required field is missing$"):
        Policy.from_dict(doc(spec__ingress=[{}]))


def test_whole_input_refused_on_first_error_naming_document_index():
    bad = doc(metadata__name="second", spec__ingress=[{"action": "Allow", "protocol": "TCP", "destination": {"ports": [1, "9000:80"]}}])
    text = "\n---\n".join(json.dumps(d) for d in (BASE, bad, doc(spec__order="x")))
    with pytest.raises(BadRequest) as err:
        load_documents(text)
    assert str(err.value) == (
        "document 2 (second): spec.ingress[0].destination.ports[1]: port range '9000:80' has start > end"
    )
    with pytest.raises(BadRequest, match=r"^document 3 \(db-from-web\): spec.order"):
        load_documents(json.dumps([BASE, doc(metadata__name="other"), doc(spec__order="x")]))


def test_json_list_entries_must_be_objects():
    with pytest.raises(BadRequest, match=r"^document 2: expected an object, got null$"):
        load_documents(json.dumps([BASE, None]))
    with pytest.raises(BadRequest, match=r"^document 1: expected an object, got a number$"):
        load_documents("5")


def test_duplicate_policy_in_one_input():
    with pytest.raises(BadRequest, match=r"^document 2 \(db-from-web\): metadata.name: NetworkPolicy 'appnet/db-from-web' already defined by document 1$"):
        load_documents(json.dumps([BASE, BASE]))
    # Same name in another network, or as a global policy, is a different policy.
    other = doc(metadata__network="othernet")
    glob = doc(kind="GlobalNetworkPolicy", metadata={"name": "db-from-web"})
    assert len(load_documents(json.dumps([BASE, other, glob]))) == 3


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"apiVersion": "canal/v1", "apiVersion": "canal/v1"}', "invalid JSON: duplicate key 'apiVersion'"),
        ('{"apiVersion": ', "invalid JSON: Expecting value"),
        ('[{"spec": {"order": NaN}}]', "invalid JSON: NaN is not a number"),
        ("kind: A\nkind: B\n", "invalid YAML: line 2 column 1: duplicate key 'kind'"),
        ("spec:\n  selector: a\n  selector: b\n", "invalid YAML: line 3 column 3: duplicate key 'selector'"),
        ("a: [\n", "invalid YAML: line 2 column 1:"),
        ("a: *unknown\n", "invalid YAML"),
    ],
)
def test_syntax_errors(text, message):
    with pytest.raises(BadRequest) as err:
        load_documents(text)
    assert str(err.value).startswith(message), str(err.value)


def test_yaml_tags_beyond_safe_load_are_refused():
    with pytest.raises(BadRequest, match="invalid YAML"):
        load_documents("!!python/object/apply:os.system ['true']\n")


def test_non_text_input():
    with pytest.raises(BadRequest, match="must be text"):
        load_documents(b"{}")  # type: ignore[arg-type]


def test_errors_are_bad_requests_with_status_400():
    with pytest.raises(BadRequest) as err:
        load_documents(json.dumps(doc(kind="x")))
    assert err.value.status == 400
