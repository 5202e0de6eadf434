"""Metrics: the --metrics-addr setting, the scrape-time state collector (from a snapshot, no
datastore round trip), and the hot-path counters of reconcile passes and datastore requests."""

from __future__ import annotations

import ipaddress
import socket
import time
from types import SimpleNamespace

import pytest
from fakes import FakeIpsets, FakeIptables, FakeLinks
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from canal import config, metrics
from canal.agent.agent import Agent
from canal.agent.desired import Snapshot
from canal.agent.mirror import Mirror
from canal.dataplane.firewall import Firewall
from canal.datastore.local import LocalDatastore
from canal.errors import BadRequest, Unavailable
from canal.records import EndpointRecord, Lease, NetworkRecord

NET = NetworkRecord(id="a" * 64, host="h1", pools=("0.0.0.0/0",), name="web")


def values(registry: CollectorRegistry) -> dict:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def hot(name: str, **labels: str) -> float:
    registry = CollectorRegistry()
    for metric in metrics.HOT_PATH:
        registry.register(metric)
    return values(registry).get((name, tuple(sorted(labels.items()))), 0.0)


# ------------------------------------------------------------------------------ setting


@pytest.mark.parametrize("addr", ["127.0.0.1:9091", "0.0.0.0:9091", "[::1]:9091", "node-1.example:9100"])
def test_metrics_addr_accepts_host_port(addr):
    assert config.load({"metrics_addr": addr}, {}).metrics_addr == addr
    assert config.load({}, {"CANAL_METRICS_ADDR": addr}).metrics_addr == addr


def test_metrics_addr_is_off_by_default():
    assert config.load({}, {}).metrics_addr == ""


@pytest.mark.parametrize(
    "addr,why",
    [("9091", "expected HOST:PORT"), (":9091", "expected HOST:PORT"), ("127.0.0.1:0", "from 1 to 65535"),
     ("127.0.0.1:http", "'http' is not a number"), ("127.0.0.1:70000", "from 1 to 65535"),
     ("[::1:9091", "unbalanced"), ("a b:9091", "not a host name")],
)
def test_bad_metrics_addr_names_setting_source_and_problem(addr, why):
    with pytest.raises(BadRequest, match=f"invalid metrics_addr .* from environment CANAL_METRICS_ADDR: .*{why}"):
        config.load({}, {"CANAL_METRICS_ADDR": addr})


def test_check_listen_refuses_a_taken_port_and_accepts_a_free_one():
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    try:
        port = held.getsockname()[1]
        with pytest.raises(BadRequest, match=f"--metrics-addr 127.0.0.1:{port}: cannot listen there"):
            metrics.check_listen(f"127.0.0.1:{port}")
    finally:
        held.close()
    metrics.check_listen("127.0.0.1:0".replace(":0", f":{port}"))  # positive control: free again


# ------------------------------------------------------------------------------ state collector


def endpoint(n: int, host: str = "h1", joined: bool = True, labels=None) -> EndpointRecord:
    return EndpointRecord(id=f"{n:064x}", network=NET.id, host=host, ip=ipaddress.IPv4Address(f"100.64.7.{n}"),
                          mac="02:42:00:00:00:01", mtu=1450, joined=joined, labels=labels)


def snapshot() -> Snapshot:
    eps = [endpoint(1, labels={"app": "web"}), endpoint(2, labels=None), endpoint(3, joined=False, labels={}),
           endpoint(4, host="h2", labels={})]
    leases = (Lease(ipaddress.IPv4Network("100.64.7.0/24"), "198.18.0.1", "", 7),
              Lease(ipaddress.IPv4Network("100.64.8.0/24"), "198.18.0.2", "", 8))
    return Snapshot("h1", "100.64.0.0/16", {f"h1/{NET.id}": NET}, {e.id: e for e in eps},
                    own_subnet=ipaddress.IPv4Network("100.64.7.0/24"), leases=leases)


def plugin_double(snap=None, fail: Exception | None = None):
    def snap_of() -> Snapshot:
        if fail:
            raise fail
        return snap or snapshot()

    ipt = FakeIptables()
    firewall = Firewall(ipt, FakeIpsets(ipt))
    from canal.agent.desired import desired_firewall

    firewall.apply(desired_firewall(snap_of()) if not fail else desired_firewall(snapshot()))
    mirror = SimpleNamespace(quarantined={"/canal/v1/policies/global/x": (3, "bad")}, quarantined_total=2)
    stats = {"rules": [{"policy": "appnet/db", "direction": "Ingress", "rule": 0, "action": "Deny", "packets": 5,
                        "bytes": 420}],
             "implicit": [{"direction": "Ingress", "outcome": "profile-deny", "packets": 3},
                          {"direction": "Ingress", "outcome": "profile-deny", "packets": 4}]}
    return SimpleNamespace(
        snapshot=snap_of, agent=SimpleNamespace(firewall=firewall), mirror=mirror,
        introspection=SimpleNamespace(stats=lambda: stats),
        lease=Lease(ipaddress.IPv4Network("100.64.7.0/24"), "198.18.0.1", "", 7), lease_renewed_at=1000.0,
        config=config.load({"lease_ttl": "600"}, {}),
        backend=SimpleNamespace(encryption_status=lambda: WG_STATUS),
    )


WG_STATUS = {"peers": [{"public_key": "LR5eRhAAA39PgpT7Erc4uAyDZPzzquVKcb/hAS8EX3s=", "endpoint": "198.18.0.2:51820",
                        "latest_handshake": 1700, "rx_bytes": 10, "tx_bytes": 20}]}


def test_wireguard_metrics_per_peer():
    got = collected(plugin_double())
    labels = (("peer_endpoint", "198.18.0.2:51820"), ("public_key", WG_STATUS["peers"][0]["public_key"]))
    assert got[("canal_wireguard_peers", ())] == 1
    assert got[("canal_wireguard_latest_handshake_seconds", labels)] == 1700
    assert got[("canal_wireguard_bytes_sent_total", labels)] == 20
    assert got[("canal_wireguard_bytes_rcvd_total", labels)] == 10
    plugin = plugin_double()
    plugin.backend = SimpleNamespace(encryption_status=lambda: None)  # no device: no series
    assert not any(name.startswith("canal_wireguard") for name, _ in collected(plugin))


def collected(plugin) -> dict:
    registry = CollectorRegistry()
    registry.register(metrics.StateCollector(plugin))
    return values(registry)


def test_rule_counters_come_from_policy_stats_and_outcomes_are_summed():
    got = collected(plugin_double())
    labels = (("action", "Deny"), ("direction", "Ingress"), ("policy", "appnet/db"), ("rule", "0"))
    assert got[("canal_policy_rule_packets_total", labels)] == 5
    assert got[("canal_policy_rule_bytes_total", labels)] == 420
    assert got[("canal_implicit_outcome_packets_total", (("direction", "Ingress"), ("outcome", "profile-deny")))] == 7


def test_state_gauges_come_from_the_snapshot():
    got = collected(plugin_double())
    assert got[("canal_active_local_endpoints", (("state", "joined"),))] == 1
    assert got[("canal_active_local_endpoints", (("state", "pending"),))] == 1  # labels unknown
    assert got[("canal_active_local_endpoints", (("state", "created"),))] == 1  # not joined yet
    assert got[("canal_cluster_num_workload_endpoints", ())] == 4
    assert got[("canal_cluster_num_hosts", ())] == 2 and got[("canal_peers", ())] == 1
    assert got[("canal_quarantined_records", ())] == 1 and got[("canal_quarantined_records_seen", ())] == 2
    assert got[("canal_lease_expiry_timestamp_seconds", ())] == 1600.0
    assert got[("canal_ipset_members", ())] >= 1 and got[("canal_iptables_rules", ())] > 0
    assert got[("canal_datastore_ready", ())] == 1


def test_a_scrape_survives_an_unread_datastore():
    got = collected(plugin_double(fail=Unavailable("etcd down")))
    assert got[("canal_datastore_ready", ())] == 0
    assert ("canal_active_local_endpoints", (("state", "joined"),)) not in got  # unknown is not zero
    assert got[("canal_ipset_members", ())] >= 1  # what was programmed is still known


def test_no_lease_expiry_without_a_datastore_lease():
    plugin = plugin_double()
    plugin.lease = Lease(ipaddress.IPv4Network("100.64.7.0/24"), "198.18.0.1", "", 0)  # flanneld's, or a reservation
    assert ("canal_lease_expiry_timestamp_seconds", ()) not in collected(plugin)


# ------------------------------------------------------------------------------ hot path


def agent(step=None) -> Agent:
    ipt = FakeIptables()
    snap = Snapshot("h1", "100.64.0.0/16", {f"h1/{NET.id}": NET}, {})
    return Agent(lambda: snap, FakeLinks(), Firewall(ipt, FakeIpsets(ipt)), 30, steps=[step] if step else [])


def test_a_pass_times_each_phase_and_a_failed_pass_is_counted():
    before = {p: hot("canal_reconcile_phase_duration_seconds_count", phase=p)
              for p in ("snapshot", "steps", "compile", "firewall")}
    restores = hot("canal_iptables_restore_calls_total", family="iptables")
    agent().reconcile(full=True)
    for phase, count in before.items():
        assert hot("canal_reconcile_phase_duration_seconds_count", phase=phase) == count + 1
    assert hot("canal_iptables_restore_calls_total", family="iptables") == restores + 1

    def broken(snap, full):
        raise Unavailable("etcd down")

    failing = agent(broken)
    failures = hot("canal_reconcile_failures_total", kind="Unavailable")
    passes = hot("canal_reconcile_duration_seconds_count", full="true")
    failing.start()
    try:
        assert failing.trigger(wait=10) is False
    finally:
        failing.stop()
    assert hot("canal_reconcile_failures_total", kind="Unavailable") >= failures + 1
    assert hot("canal_reconcile_duration_seconds_count", full="true") >= passes + 1


def test_a_good_pass_sets_the_last_success_time():
    ok = agent()
    ok.start()
    try:
        assert ok.trigger(wait=10) is True
    finally:
        ok.stop()
    assert hot("canal_reconcile_last_success_timestamp_seconds") >= time.time() - 60


def test_datastore_requests_are_timed_and_failures_counted_by_kind(tmp_path, monkeypatch):
    store = LocalDatastore(str(tmp_path / "canal.db"))
    gets = hot("canal_datastore_request_duration_seconds_count", backend="local", op="get")
    store.put("/k", {"a": 1})
    assert store.get_json("/k") == {"a": 1}
    assert hot("canal_datastore_request_duration_seconds_count", backend="local", op="get") == gets + 1
    errors = hot("canal_datastore_request_errors_total", backend="local", op="get", kind="Unavailable")

    def broken(sql, args):
        raise Unavailable("disk gone")

    monkeypatch.setattr(store, "_read", broken)
    with pytest.raises(Unavailable):
        store.get("/k")
    assert hot("canal_datastore_request_errors_total", backend="local", op="get", kind="Unavailable") == errors + 1
    assert hot("canal_datastore_request_duration_seconds_count", backend="local", op="get") == gets + 2
    store.close()


def test_a_failing_watch_counts_a_restart():
    class Down(LocalDatastore):
        def __init__(self):
            pass

        def list(self, prefix):
            raise Unavailable("down")

    restarts = hot("canal_datastore_watch_restarts_total", reason="error")
    mirror = Mirror(Down(), ["/p/"], lambda: None)
    mirror.start()
    try:
        deadline = time.monotonic() + 10
        while hot("canal_datastore_watch_restarts_total", reason="error") == restarts and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        mirror.stop()
    assert hot("canal_datastore_watch_restarts_total", reason="error") >= restarts + 1


def test_the_dashboard_and_the_readme_use_only_metrics_the_plugin_exposes():
    import json
    import re

    from testbed import REPO

    registry = metrics.registry_for(plugin_double(), process=False)
    exposed = {s.name for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    exposed |= {f.name + suffix for m in metrics.HOT_PATH for f in m.describe() for suffix in suffixes[f.type]}
    dashboard = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    used = {name for panel in dashboard["panels"] for t in panel.get("targets", [])
            for name in re.findall(r"canal_[a-z0-9_]+", t["expr"])}
    assert used and used <= exposed, used - exposed
    readme = (REPO / "README.md").read_text()
    families = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in exposed}
    documented = set(re.findall(r"`(canal_[a-z0-9_]+)", readme.split("## Metrics", 1)[1].split("\n## ", 1)[0]))
    assert {re.sub(r"_total$", "", n) for n in documented} == families


def test_both_families_in_the_gauges():
    """A dual-stack network: IPv6 endpoints counted here and cluster-wide, and the canal-6* sets
    (family inet6) counted apart from the IPv4 ones, the selector set holding the /128s."""
    import dataclasses

    from canal.policy.model import INGRESS, NETWORK, Policy, Rule

    base = snapshot()
    net6 = dataclasses.replace(NET, pools6=("fd00:64::/48",))
    eps = {i: dataclasses.replace(e, ip6=ipaddress.IPv6Address(f"fd00:64::{n}"))
           for n, (i, e) in enumerate(base.endpoints.items(), 1) if e.labels is not None}
    eps.update({i: e for i, e in base.endpoints.items() if i not in eps})  # one without IPv6
    web = Policy(NETWORK, "web", "web", 10.0, "app == 'web'", (INGRESS,), (Rule("Allow"),))
    snap = dataclasses.replace(base, networks={f"h1/{NET.id}": net6}, endpoints=eps, policies=(web,),
                               cluster_network6="fd00:64::/48")
    got = collected(plugin_double(snap))
    assert got[("canal_ipv6_local_endpoints", ())] == 2  # joined web and the created one, on h1
    assert got[("canal_cluster_num_ipv6_workload_endpoints", ())] == 3
    six = got[("canal_ipsets_by_family", (("family", "inet6"),))]
    four = got[("canal_ipsets_by_family", (("family", "inet"),))]
    assert six >= 2 and four >= 2 and six + four == got[("canal_ipsets", ())]
    members6 = got[("canal_ipset_members_by_family", (("family", "inet6"),))]
    assert members6 >= 2  # canal-6nets' pool and the selector set's /128
    assert members6 + got[("canal_ipset_members_by_family", (("family", "inet"),))] == got[("canal_ipset_members", ())]
    plain = collected(plugin_double())
    assert plain[("canal_ipsets_by_family", (("family", "inet6"),))] == 0
    assert plain[("canal_cluster_num_ipv6_workload_endpoints", ())] == 0
