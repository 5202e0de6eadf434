"""Metrics through the plugin's socket: the exposition parses with Prometheus' own parser, and
its values follow the calls replayed through the app (counters move by exactly what was done)."""

from __future__ import annotations

import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_protocol import EP, NET, SANDBOX, call, create_network, ok
from werkzeug.serving import make_server

from canal.cli.client import AdminClient
from canal.errors import NotFound
from canal.records import replace


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def scrape(client) -> dict:
    resp = client.get("/canal/v1/metrics")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return samples(resp.get_data(as_text=True))


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def join_one(client, generic=None) -> str:
    create_network(client, generic)
    addr = ok(client, "IpamDriver.RequestAddress", {"PoolID": "canal-default", "Address": "", "Options": None})["Address"]
    ok(client, "NetworkDriver.CreateEndpoint", {
        "NetworkID": NET, "EndpointID": EP,
        "Interface": {"Address": addr, "AddressIPv6": "", "MacAddress": ""},
        "Options": {"com.docker.network.endpoint.exposedports": [], "com.docker.network.portmap": []},
    })
    ok(client, "NetworkDriver.Join", {"NetworkID": NET, "EndpointID": EP, "SandboxKey": SANDBOX, "Options": {}})
    return addr.split("/")[0]


def test_calls_move_the_call_histogram_and_the_endpoint_gauges(client):
    before = scrape(client)
    ip = join_one(client)
    after = scrape(client)
    count = "canal_api_call_duration_seconds_count"
    # Counters are process-wide (tests share them): compare deltas, never absolute values.
    assert value(after, count, call="NetworkDriver.Join") - value(before, count, call="NetworkDriver.Join") == 1
    assert value(after, count, call="NetworkDriver.CreateEndpoint") - value(before, count, call="NetworkDriver.CreateEndpoint") == 1
    assert value(after, "canal_api_call_duration_seconds_sum", call="NetworkDriver.Join") > value(
        before, "canal_api_call_duration_seconds_sum", call="NetworkDriver.Join")
    # State gauges are this plugin's own: absolute values.
    states = {s: value(after, "canal_active_local_endpoints", state=s) for s in ("pending", "created", "joined")}
    assert sum(states.values()) == 1 and value(before, "canal_active_local_endpoints", state="joined") == 0
    assert value(after, "canal_cluster_num_workload_endpoints") == 1
    assert value(after, "canal_datastore_ready") == 1
    assert value(after, "canal_ipset_members") >= 1  # the cluster set at least
    ok(client, "NetworkDriver.Leave", {"NetworkID": NET, "EndpointID": EP})
    left = scrape(client)
    assert value(left, "canal_active_local_endpoints", state="joined") == 0
    assert sum(value(left, "canal_active_local_endpoints", state=s) for s in ("pending", "created", "joined")) == 1
    assert ip


def test_a_known_identity_counts_as_joined(client, plugin):
    join_one(client, {"network": "web"})  # the network's name given, the labels learned below
    assert value(scrape(client), "canal_active_local_endpoints", state="pending") == 1
    plugin.networks.update_endpoint(NET, EP, lambda r: replace(r, labels={"app": "web"}))
    metrics = scrape(client)
    assert value(metrics, "canal_active_local_endpoints", state="joined") == 1
    assert value(metrics, "canal_active_local_endpoints", state="pending") == 0


def test_errors_are_counted_by_status_and_kind(client):
    errors = "canal_api_call_errors_total"
    before = scrape(client)
    status, _ = call(client, "NetworkDriver.Join", raw="{not json")
    assert status == 400
    status, _ = call(client, "NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": EP})
    after = scrape(client)
    bad = dict(call="NetworkDriver.Join", status="400", kind="BadRequest")
    assert value(after, errors, **bad) - value(before, errors, **bad) == 1
    # The failed call is still timed, and a successful call is no error (positive control).
    assert value(after, "canal_api_call_duration_seconds_count", call="NetworkDriver.Join") - value(
        before, "canal_api_call_duration_seconds_count", call="NetworkDriver.Join") == 1
    def activate_errors(metrics: dict) -> float:
        return sum(v for k, v in metrics.items() if k[0] == errors and ("call", "Plugin.Activate") in k[1])

    quiet = scrape(client)
    ok(client, "Plugin.Activate")
    assert activate_errors(scrape(client)) == activate_errors(quiet)
    assert status == 404  # the unknown endpoint's DeleteEndpoint
    missing = dict(call="NetworkDriver.DeleteEndpoint", status="404", kind="NotFound")
    assert value(after, errors, **missing) - value(before, errors, **missing) == 1


def test_policies_count_and_datastore_latency(client, plugin):
    before = scrape(client)
    plugin.policies.apply(
        "apiVersion: canal/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: web}\nspec:\n  ingress:\n  - action: Allow\n")
    after = scrape(client)
    assert value(before, "canal_active_policies") == 0 and value(after, "canal_active_policies") == 1
    txn = "canal_datastore_request_duration_seconds_count"
    assert value(after, txn, backend="local", op="txn") > value(before, txn, backend="local", op="txn")


def test_no_record_key_or_address_becomes_a_label(client):
    ip = join_one(client)
    text = client.get("/canal/v1/metrics").get_data(as_text=True)
    assert ip not in text and EP[:12] not in text and NET[:12] not in text
    assert "canal_api_call_duration_seconds_bucket" in text  # positive control: the metrics are there


@pytest.fixture
def admin(plugin, tmp_path):
    path = str(tmp_path / "canal.sock")
    server = make_server("unix://" + path, 0, plugin.app(), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield AdminClient(path, timeout=10)
    finally:
        server.shutdown()
        thread.join()


def test_cli_client_reads_the_exposition_over_the_socket(admin):
    text = admin.text("/canal/v1/metrics")
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"canal_api_call_duration_seconds", "canal_active_local_endpoints", "process_cpu_seconds"} <= names
    with pytest.raises(NotFound, match="unknown call"):
        admin.text("/canal/v1/nope")
