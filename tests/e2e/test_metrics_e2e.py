"""Issue 11, metrics end to end: the plugin serves Prometheus metrics on --metrics-addr (the
host's underlay address, inside its namespace) and through its socket (`canal metrics`); the
text parses with Prometheus' own parser, and the values move with what Docker does."""

from __future__ import annotations

import subprocess
import sys
from typing import Iterator

import pytest
from e2e_support import PLUGIN_ARGS, IMAGE, clear, start_host, wait_open
from prometheus_client.parser import text_string_to_metric_families

from testbed import REPO, SimHost, wait_until

ADDR = "198.18.0.1:9464"
SCRAPE = (
    "import sys, urllib.request\n"
    "with urllib.request.urlopen(sys.argv[1], timeout=10) as r:\n"
    "    sys.stdout.write(r.headers.get('Content-Type', '') + '\\n' + r.read().decode())\n"
)


@pytest.fixture(scope="module")
def mhost(underlay) -> Iterator[SimHost]:
    h = start_host(underlay, "h1", "198.18.0.1", [*PLUGIN_ARGS, "--metrics-addr", ADDR])
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def h1(mhost) -> Iterator[SimHost]:
    yield mhost
    clear(mhost)


def parse(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(h: SimHost) -> dict:
    """GET /metrics over HTTP from inside the host's network namespace (as Prometheus on the host would)."""
    res = h.exec(["python3", "-c", SCRAPE, f"http://{ADDR}/metrics"])
    content_type, _, text = res.stdout.partition("\n")
    assert content_type.startswith("text/plain; version=0.0.4")
    return parse(text)


def value(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_a_docker_run_moves_the_join_count_and_the_joined_gauge(h1):
    h1.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "mnet")
    before = scrape(h1)
    assert value(before, "canal_active_local_endpoints", state="joined") == 0
    h1.docker("run", "-d", "--name", "m1", "--label", "app=web", "--network", "mnet", IMAGE, "sleep", "1000")
    wait_open(h1, "m1")
    # Labels and the network's name are learned from Docker after the Join: pending until then.
    after = wait_until(lambda: (m := scrape(h1)) and value(m, "canal_active_local_endpoints", state="joined") == 1
                       and m, 20, 0.2, "the joined gauge to count m1")
    count = "canal_api_call_duration_seconds_count"
    for call in ("NetworkDriver.Join", "NetworkDriver.CreateEndpoint", "IpamDriver.RequestAddress"):
        assert value(after, count, call=call) - value(before, count, call=call) == 1, call
    assert value(after, "canal_cluster_num_workload_endpoints") == 1
    assert value(after, "canal_ipset_members") > value(before, "canal_ipset_members")  # m1's address
    assert value(after, "canal_reconcile_duration_seconds_count", full="false") > value(
        before, "canal_reconcile_duration_seconds_count", full="false")
    assert value(after, "canal_datastore_request_duration_seconds_count", backend="local", op="txn") > value(
        before, "canal_datastore_request_duration_seconds_count", backend="local", op="txn")
    h1.docker("rm", "-f", "m1")
    gone = wait_until(lambda: (m := scrape(h1)) and sum(
        value(m, "canal_active_local_endpoints", state=s) for s in ("pending", "created", "joined")) == 0 and m,
        20, 0.2, "the endpoint gauges to drop m1")
    assert value(gone, count, call="NetworkDriver.Leave") - value(after, count, call="NetworkDriver.Leave") == 1


def test_a_bad_request_raises_the_error_counter(h1):
    errors = "canal_api_call_errors_total"
    labels = {"call": "NetworkDriver.Join", "status": "400", "kind": "BadRequest"}
    before = scrape(h1)
    status, answer = h1.plugin_post("NetworkDriver.Join", {"NetworkID": "not-an-id"})
    assert status == 400 and "Err" in answer
    after = scrape(h1)
    assert value(after, errors, **labels) - value(before, errors, **labels) == 1
    # Positive control: a good call moves its count and no error counter.
    assert h1.plugin_post("Plugin.Activate")[0] == 200
    again = scrape(h1)
    assert value(again, "canal_api_call_duration_seconds_count", call="Plugin.Activate") - value(
        after, "canal_api_call_duration_seconds_count", call="Plugin.Activate") == 1
    assert sum(v for k, v in again.items() if k[0] == errors) == sum(v for k, v in after.items() if k[0] == errors)


def test_canal_metrics_prints_the_same_exposition_through_the_socket(h1):
    res = subprocess.run([sys.executable, "-m", "canal", "metrics", "--socket", h1.plugin_socket],
                         capture_output=True, text=True, timeout=30, check=True,
                         env={"PYTHONPATH": str(REPO / "plugin"), "PATH": "/usr/bin:/bin"})
    m = parse(res.stdout)
    assert value(m, "canal_datastore_ready") == 1
    assert ("canal_api_call_duration_seconds_count", (("call", "Plugin.Activate"),)) in m
    assert any(k[0] == "process_resident_memory_bytes" for k in m)


def test_metrics_are_only_on_the_configured_address(h1):
    """Opt-in and bound where told: nothing answers on the host's loopback (positive control:
    the configured address does)."""
    probe = "import socket, sys\ns = socket.socket()\ns.settimeout(3)\nprint(s.connect_ex((sys.argv[1], int(sys.argv[2]))))"
    host, port = ADDR.split(":")
    assert int(h1.exec(["python3", "-c", probe, "127.0.0.1", port]).stdout) != 0
    assert int(h1.exec(["python3", "-c", probe, host, port]).stdout) == 0


def test_policy_rule_counters_are_exported(h1):
    """A Deny rule's packets show in canal_policy_rule_packets_total, as `canal policy stats`
    counts them; traffic the rule does not match leaves it at 0 (the control)."""
    import json

    h1.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "mnet")
    h1.docker("run", "-d", "--name", "srv", "--label", "app=srv", "--network", "mnet", IMAGE, "sh", "-c",
              "while true; do echo hi | nc -l -p 80; done")
    h1.docker("run", "-d", "--name", "cli", "--label", "app=cli", "--network", "mnet", IMAGE, "sleep", "1000")
    wait_open(h1, "srv")
    wait_open(h1, "cli")
    srv = h1.docker("inspect", "-f", "{{.NetworkSettings.Networks.mnet.IPAddress}}", "srv").stdout.strip()
    policy = {"apiVersion": "canal/v1", "kind": "NetworkPolicy", "metadata": {"name": "no-ping", "network": "mnet"},
              "spec": {"selector": "app == 'srv'", "types": ["Ingress"], "ingress": [
                  {"action": "Deny", "protocol": "icmp"}, {"action": "Allow"}]}}
    h1.exec([sys.executable, "-m", "canal", "policy", "apply", "-f", "-"], input=json.dumps(policy),
            env={"PYTHONPATH": str(REPO / "plugin")})
    key = dict(policy="mnet/no-ping", direction="Ingress", rule="0", action="Deny")
    wait_until(lambda: ("canal_policy_rule_packets_total", tuple(sorted(key.items()))) in scrape(h1), 10, 0.2,
               "the rule's counter exported")
    assert value(scrape(h1), "canal_policy_rule_packets_total", **key) == 0
    assert h1.docker("exec", "cli", "nc", "-w", "2", srv, "80", check=False).stdout.strip() == "hi"
    assert value(scrape(h1), "canal_policy_rule_packets_total", **key) == 0  # TCP is not the Deny's
    h1.docker("exec", "cli", "ping", "-c", "2", "-W", "1", srv, check=False)
    assert value(scrape(h1), "canal_policy_rule_packets_total", **key) >= 2
    h1.exec([sys.executable, "-m", "canal", "policy", "delete", "mnet/no-ping"], env={"PYTHONPATH": str(REPO / "plugin")})
