"""Admin routes of policy introspection (explain, apply dry run, per-rule stats) through the
Flask app: answers, refusals naming the bad field, and a dry run that writes nothing."""

from __future__ import annotations

import json

from test_ports_contract import endpoint, learned
from test_protocol import EP, create_network

EP2 = "b7d2" * 16
POLICY = {"apiVersion": "canal/v1", "kind": "NetworkPolicy", "metadata": {"name": "only-80", "network": "web"},
          "spec": {"selector": "app == 'srv'", "ingress": [{"action": "Allow", "protocol": "TCP",
                                                             "destination": {"ports": [80]}}]}}


def two_endpoints(client, plugin):
    create_network(client)
    a, b = endpoint(client, EP), endpoint(client, EP2)
    learned(plugin, EP)
    learned(plugin, EP2)
    return a, b


def test_explain_answers_from_the_compiled_rules(client, plugin):
    a, b = two_endpoints(client, plugin)
    resp = client.post("/canal/v1/explain", data=json.dumps({"src": a, "dst": b, "protocol": "tcp", "port": 81}))
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["verdict"] == "allowed" and body["ingress"]["reason"] == "profile-network"
    plugin.policies.apply(json.dumps(POLICY))
    body = client.post("/canal/v1/explain", data=json.dumps({"src": a, "dst": b, "port": 81})).get_json()
    assert body["verdict"] == "denied" and body["ingress"]["reason"] == "default-deny"
    body = client.post("/canal/v1/explain", data=json.dumps({"src": a, "dst": b, "port": 80})).get_json()
    assert (body["ingress"]["policy"], body["ingress"]["rule"]) == ("web/only-80", 0)


def test_explain_refuses_bad_requests_by_name(client, plugin):
    a, b = two_endpoints(client, plugin)
    cases = [
        ({"src": a}, "dst must be"),
        ({"src": a, "dst": b, "port": "80"}, "port must be an integer"),
        ({"src": a, "dst": b, "port": 70000}, "0-65535"),
        ({"src": a, "dst": b, "protocol": "sctp", "port": 1}, "expected tcp, udp or icmp"),
        ({"src": a, "dst": b, "bogus": 1}, "unknown field(s) bogus"),
        ({"src": a, "dst": b, "published": "yes"}, "published must be"),
        ([a, b], "body must be an object"),
    ]
    for body, message in cases:
        resp = client.post("/canal/v1/explain", data=json.dumps(body))
        assert resp.status_code == 400 and message in resp.get_json()["Err"], (body, resp.get_json())
    resp = client.post("/canal/v1/explain", data=json.dumps({"src": "nosuch", "dst": b}))
    assert resp.status_code == 404 and "'nosuch'" in resp.get_json()["Err"]


def test_dry_run_reports_and_writes_nothing(client, plugin):
    a, b = two_endpoints(client, plugin)
    before, changes = plugin.dump(), plugin.changes
    restores = len(plugin.iptables.restores)
    resp = client.post("/canal/v1/policies/dry-run", data=json.dumps({"documents": json.dumps(POLICY)}))
    assert resp.status_code == 200, resp.get_json()
    report = resp.get_json()
    assert report["results"] == [{"policy": "web/only-80", "kind": "NetworkPolicy", "result": "created"}]
    assert {r["address"] for r in report["selection"]} == {a, b}
    assert report["summary"]["flows_lost"] > 0 and report["summary"]["flows_gained"] == 0
    assert all(f["after"]["ingress"]["reason"] == "default-deny" for f in report["flows"])
    assert plugin.dump() == before and plugin.changes == changes and len(plugin.iptables.restores) == restores
    # Invalid input: refused as apply refuses it, and still nothing written.
    bad = dict(POLICY, spec={"selectr": "all()"})
    resp = client.post("/canal/v1/policies/dry-run", data=json.dumps({"documents": json.dumps(bad)}))
    assert resp.status_code == 400 and "selectr" in resp.get_json()["Err"]
    resp = client.post("/canal/v1/policies/dry-run", data=json.dumps({"documents": json.dumps([POLICY, POLICY])}))
    assert resp.status_code == 400 and "already defined by document 1" in resp.get_json()["Err"]
    resp = client.post("/canal/v1/policies/dry-run", data=json.dumps({"docs": ""}))
    assert resp.status_code == 400 and "documents" in resp.get_json()["Err"]
    assert plugin.dump() == before


def test_policy_stats_map_counters_to_rules(client, plugin):
    two_endpoints(client, plugin)
    plugin.policies.apply(json.dumps(POLICY))
    rules = plugin.iptables.tables["filter"].rules
    chain = next(c for c in rules if c.startswith("CANAL-PI-"))
    plugin.iptables.counters = {(chain, 0): (7, 420)}  # the Allow rule's MARK
    tw = f"CANAL-TW-{EP[:12]}"
    deny = next(i for i, r in enumerate(rules[tw]) if r == "-j DROP")
    plugin.iptables.counters[(tw, deny)] = (3, 180)
    resp = client.get("/canal/v1/policy-stats")
    assert resp.status_code == 200
    stats = resp.get_json()
    assert stats["stale"] == []
    assert stats["rules"] == [{"policy": "web/only-80", "direction": "Ingress", "rule": 0, "action": "Allow",
                               "packets": 7, "bytes": 420}]
    implicit = [r for r in stats["implicit"] if r["packets"]]
    assert implicit == [{"endpoint": EP[:12], "container": None, "address": implicit[0]["address"],
                         "direction": "Ingress", "outcome": "default-deny", "action": "Deny", "packets": 3, "bytes": 180}]
