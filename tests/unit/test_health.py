"""The health rules of `canal status` (canal.health): each rule moves the verdict, each
warning does not."""

from __future__ import annotations

from canal import health


def good(**over):
    status = {
        "datastore": "etcd", "flannel_mode": "embedded", "datastore_reachable": True, "datastore_error": "",
        "last_error": "", "last_pass_age": 2.0, "resync_interval": 5.0,
        "lease": {"subnet": "100.64.3.0/24", "ttl": 30, "expires_in": 25.0},
        "quarantined": {}, "pending_endpoints": [], "docker_error": "", "peers": [],
    }
    status.update(over)
    return status


def test_healthy_host_exits_zero():
    annotated = health.annotate(good())
    assert annotated["health"] == "healthy" and annotated["problems"] == []
    assert health.exit_code(annotated) == health.HEALTHY == 0


def test_each_problem_makes_it_unhealthy_and_is_named():
    cases = {
        "unreachable": good(datastore_reachable=False, datastore_error="etcd http://x: connection refused"),
        "pass failed": good(last_error="Unavailable: etcd down"),
        "succeeded yet": good(last_pass_age=None),
        "no successful reconcile pass for 16s": good(last_pass_age=16.0),
        "holds no subnet lease": good(lease=None),
        "renewals are late": good(lease={"subnet": "100.64.3.0/24", "ttl": 30, "expires_in": 9.0}),
        "expired": good(lease={"subnet": "100.64.3.0/24", "ttl": 30, "expires_in": -4.0}),
        "quarantined": good(quarantined={"/canal/v1/endpoints/x": "bad ip"}),
    }
    for words, status in cases.items():
        annotated = health.annotate(status)
        assert annotated["health"] == "unhealthy", words
        assert any(words in p for p in annotated["problems"]), (words, annotated["problems"])
        assert health.exit_code(annotated) == health.UNHEALTHY == 1


def test_warnings_keep_it_healthy():
    annotated = health.annotate(good(pending_endpoints=["abc"], docker_error="refused",
                                     peers=[{"host": "h2", "last_contact_age": 100.0}]))
    assert annotated["health"] == "healthy"
    assert len(annotated["warnings"]) == 3


def test_lease_rules_only_where_canal_holds_a_lease():
    assert health.annotate(good(datastore="local", lease=None))["health"] == "healthy"
    assert health.annotate(good(flannel_mode="external", lease=None))["health"] == "healthy"


def test_pass_age_within_three_intervals_is_fine():
    assert health.annotate(good(last_pass_age=14.9))["health"] == "healthy"


def test_an_unannotated_status_is_judged_by_the_cli():
    assert health.exit_code(good(last_error="x")) == 1


def test_a_peer_the_backend_cannot_route_is_a_problem_naming_it():
    status = good(backend={"type": "host-gw", "direct_routing": False,
                           "problems": ["peer 203.0.113.9 (subnet 10.1.5.0/24, host-gw): off-link"]})
    problems, _ = health.evaluate(status)
    assert health.evaluate(good(backend={"type": "host-gw", "direct_routing": False, "problems": []}))[0] == []
    assert problems == ["backend: peer 203.0.113.9 (subnet 10.1.5.0/24, host-gw): off-link"]
