"""Prometheus metrics (prometheus-client): names after Felix's, under `canal_`.

Two kinds, kept apart so the hot path stays cheap:
- counters and histograms updated where things happen (protocol calls, reconcile passes,
  datastore requests, watch restarts): module-level objects, each update one prometheus-client
  child (its own lock, nothing of ours); label children bound once where the label is fixed;
- gauges that describe state (endpoints by state, policies, ipset members, peers, lease expiry,
  quarantined records, published ports): computed at scrape time from the plugin's snapshot by
  `StateCollector`, so nothing on the hot path keeps them up to date.

`registry_for(plugin)` gives the registry one plugin exposes (its socket route and the optional
`--metrics-addr` listener). No label carries a record key, an address or a secret.
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from canal.errors import BadRequest

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# No `*_created` series: Felix has none, and they double the exposition for no query we need.
disable_created_metrics()

# Docker's calls take 0.1 ms (EndpointOperInfo) to a second (a Join waiting for its pass).
_CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_PASS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Not in prometheus_client's default registry: a second plugin in one process (tests) and the
# library's own defaults must not collide; registry_for() adds these to each plugin's registry.
API_CALL_SECONDS = Histogram(
    "canal_api_call_duration_seconds", "handling time of Docker's plugin protocol calls (NetworkDriver.*, "
    "IpamDriver.*), errors included", ["call"], buckets=_CALL_BUCKETS, registry=None,
)
API_CALL_ERRORS = Counter(
    "canal_api_call_errors", "protocol calls answered with an error, by HTTP status and error class",
    ["call", "status", "kind"], registry=None,
)
RECONCILE_SECONDS = Histogram(
    "canal_reconcile_duration_seconds", "one reconcile pass, failed ones included "
    "(full: the pass read the kernel back)", ["full"], buckets=_PASS_BUCKETS, registry=None,
)
RECONCILE_PHASE_SECONDS = Histogram(
    "canal_reconcile_phase_duration_seconds", "one phase of a completed reconcile pass: snapshot, steps "
    "(veths, VXLAN peers, route records, sandboxes), compile (the rules), firewall (iptables/ipset apply)",
    ["phase"], buckets=_PASS_BUCKETS, registry=None,
)
RECONCILE_FAILURES = Counter(
    "canal_reconcile_failures", "reconcile passes that failed (retried with backoff)", ["kind"], registry=None,
)
RECONCILE_LAST_SUCCESS = Gauge(
    "canal_reconcile_last_success_timestamp_seconds", "Unix time the last reconcile pass succeeded",
    registry=None,
)
IPTABLES_RESTORES = Counter(
    "canal_iptables_restore_calls", "iptables-restore runs (a pass that changed nothing runs none)",
    ["family"], registry=None,
)
IPTABLES_RESTORE_ERRORS = Counter(
    "canal_iptables_restore_errors", "iptables-restore runs that failed", ["family"], registry=None,
)
DATASTORE_SECONDS = Histogram(
    "canal_datastore_request_duration_seconds", "datastore requests (not watches: they long-poll)",
    ["backend", "op"], buckets=_CALL_BUCKETS, registry=None,
)
DATASTORE_ERRORS = Counter(
    "canal_datastore_request_errors", "datastore requests that failed, by error class",
    ["backend", "op", "kind"], registry=None,
)
WATCH_RESTARTS = Counter(
    "canal_datastore_watch_restarts", "datastore watches re-listed: after an error, or fallen behind "
    "compaction", ["reason"], registry=None,
)

HOT_PATH = (
    API_CALL_SECONDS, API_CALL_ERRORS, RECONCILE_SECONDS, RECONCILE_PHASE_SECONDS, RECONCILE_FAILURES,
    RECONCILE_LAST_SUCCESS, IPTABLES_RESTORES, IPTABLES_RESTORE_ERRORS, DATASTORE_SECONDS, DATASTORE_ERRORS,
    WATCH_RESTARTS,
)

F = TypeVar("F", bound=Callable[..., Any])


def datastore_request(op: str) -> Callable[[F], F]:
    """Decorate a datastore method: its latency and failures, labelled by the instance's
    `metrics_backend` and `op`."""

    def decorate(method: F) -> F:
        @functools.wraps(method)
        def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            except Exception as err:
                DATASTORE_ERRORS.labels(self.metrics_backend, op, type(err).__name__).inc()
                raise
            finally:
                DATASTORE_SECONDS.labels(self.metrics_backend, op).observe(time.perf_counter() - started)

        return timed  # type: ignore[return-value]

    return decorate


def error_kind(err: BaseException) -> tuple[str, str]:
    """(HTTP status, error class) of an exception a handler raised, as the app answers it."""
    status = getattr(err, "status", None) or getattr(err, "code", None) or 500
    return str(status), type(err).__name__


class StateCollector(Collector):
    """Gauges computed at scrape time from the plugin's current state (memory: the mirror,
    the last applied firewall state), never kept up to date on the hot path."""

    def __init__(self, plugin: Any):
        self.plugin = plugin

    def describe(self) -> Iterable[Any]:
        return []  # computed per scrape; no fixed set to check at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from canal.agent.desired import identity_known

        plugin = self.plugin
        ready = GaugeMetricFamily("canal_datastore_ready", "1 when the datastore has been read (the "
                                  "snapshot-based metrics below are present only then)")
        try:
            snap = plugin.snapshot()
        except Exception as err:  # noqa: BLE001 - a scrape never fails: the datastore may be down
            log.debug("metrics: no snapshot: %s", err)
            ready.add_metric([], 0)
            yield ready
            snap = None
        if snap is not None:
            ready.add_metric([], 1)
            yield ready
            local = [ep for ep in snap.endpoints.values() if ep.host == snap.host]
            states = {"pending": 0, "created": 0, "joined": 0}
            for ep in local:
                states["pending" if not identity_known(snap, ep) else "joined" if ep.joined else "created"] += 1
            by_state = GaugeMetricFamily(
                "canal_active_local_endpoints", "this host's endpoints by state: pending (labels or network "
                "name not known yet: closed), created (not joined yet), joined", labels=["state"])
            for state, count in states.items():
                by_state.add_metric([state], count)
            yield by_state
            yield _gauge("canal_cluster_num_workload_endpoints", "endpoints of every host", len(snap.endpoints))
            yield _gauge("canal_active_policies", "stored policies in force (quarantined ones excluded)",
                         len(snap.policies))
            yield _gauge("canal_published_ports", "published port bindings of this host's endpoints",
                         sum(len(ep.ports) for ep in local))
            yield _gauge("canal_ipv6_local_endpoints", "this host's endpoints with an IPv6 address (--ipv6 networks)",
                         sum(1 for ep in local if ep.ip6 is not None))
            yield _gauge("canal_cluster_num_ipv6_workload_endpoints", "endpoints of every host with an IPv6 address",
                         sum(1 for ep in snap.endpoints.values() if ep.ip6 is not None))
            own = str(snap.own_subnet) if snap.own_subnet else None
            yield _gauge("canal_cluster_num_hosts", "hosts holding a subnet lease (multi-host)", len(snap.leases))
            yield _gauge("canal_peers", "other hosts' leases this host tunnels to (multi-host)",
                         sum(1 for lease in snap.leases if str(lease.subnet) != own))
        applied = _applied_firewall(plugin)
        if applied is not None:
            yield _gauge("canal_ipsets", "Canal's ipsets programmed", len(applied.ipsets))
            yield _gauge("canal_ipset_members", "members of Canal's ipsets, in total",
                         sum(len(s.members) for s in applied.ipsets))
            # Per family: the IPv6 sets (canal-6*, `family inet6`) mirror the IPv4 ones.
            sets = GaugeMetricFamily("canal_ipsets_by_family", "Canal's ipsets programmed, per family "
                                     "(inet: IPv4, inet6: the canal-6* sets)", labels=["family"])
            members = GaugeMetricFamily("canal_ipset_members_by_family", "members of Canal's ipsets, per family",
                                        labels=["family"])
            for family in ("inet", "inet6"):
                mine = [s for s in applied.ipsets if s.family == family]
                sets.add_metric([family], len(mine))
                members.add_metric([family], sum(len(s.members) for s in mine))
            yield sets
            yield members
            yield _gauge("canal_iptables_rules", "rules in Canal's IPv4 chains",
                         sum(len(rules) for rules in applied.chains.values()))
            yield _gauge("canal_ip6tables_rules", "rules in Canal's IPv6 chains",
                         sum(len(rules) for rules in applied.chains6.values()))
        mirror = getattr(plugin, "mirror", None)
        if mirror is not None:
            yield _gauge("canal_quarantined_records", "datastore records skipped as malformed until they change",
                         len(mirror.quarantined))
            total = GaugeMetricFamily("canal_quarantined_records_seen", "records quarantined since start "
                                      "(counted once per key and revision)")
            total.add_metric([], mirror.quarantined_total)
            yield total
        yield from _rule_counters(plugin)
        yield from _wireguard(plugin)
        expiry = lease_expiry(plugin)
        if expiry is not None:
            yield _gauge("canal_lease_expiry_timestamp_seconds", "Unix time this host's subnet lease expires "
                         "unless renewed", expiry)


def _rule_counters(plugin: Any) -> Iterator[Any]:
    """Packets and bytes per policy rule (`canal policy stats`, the kernel's counters read at
    scrape time), and per implicit outcome summed over endpoints (no endpoint labels: bounded)."""
    introspection = getattr(plugin, "introspection", None)
    if introspection is None:
        return
    try:
        stats = introspection.stats()
    except Exception as err:  # noqa: BLE001 - a scrape never fails for want of counters
        log.debug("metrics: no rule counters: %s", err)
        return
    labels = ["policy", "direction", "rule", "action"]
    packets = CounterMetricFamily("canal_policy_rule_packets", "packets that hit a policy rule on this host", labels=labels)
    octets = CounterMetricFamily("canal_policy_rule_bytes", "bytes that hit a policy rule on this host", labels=labels)
    for row in stats["rules"]:
        values = [row["policy"], row["direction"] or "", str(row["rule"]), row["action"] or ""]
        packets.add_metric(values, row["packets"])
        octets.add_metric(values, row["bytes"])
    implicit: dict[tuple[str, str], int] = {}
    for row in stats["implicit"]:
        key = (row["direction"] or "", row["outcome"])
        implicit[key] = implicit.get(key, 0) + row["packets"]
    outcomes = CounterMetricFamily("canal_implicit_outcome_packets", "packets decided by a built-in outcome "
                                   "(isolation, default deny, pending labels, ...) on this host",
                                   labels=["direction", "outcome"])
    for (direction, outcome), count in sorted(implicit.items()):
        outcomes.add_metric([direction, outcome], count)
    yield packets
    yield octets
    yield outcomes


def _wireguard(plugin: Any) -> Iterator[Any]:
    """Felix's WireGuard metrics, per peer (labels: the peer's public key and endpoint, one
    series per host of the cluster): last handshake, bytes each way; read from `wg show` at
    scrape time. Absent where this host has no WireGuard device."""
    backend = getattr(plugin, "backend", None)
    try:
        status = backend.encryption_status() if backend is not None else None
    except Exception as err:  # noqa: BLE001 - a scrape never fails for want of wg
        log.debug("metrics: no wireguard status: %s", err)
        return
    if status is None:
        return
    labels = ["public_key", "peer_endpoint"]
    handshake = GaugeMetricFamily("canal_wireguard_latest_handshake_seconds",
                                  "Unix time of the last handshake with a peer (0: none yet)", labels=labels)
    sent = CounterMetricFamily("canal_wireguard_bytes_sent", "bytes sent to a peer through WireGuard", labels=labels)
    rcvd = CounterMetricFamily("canal_wireguard_bytes_rcvd", "bytes received from a peer through WireGuard",
                               labels=labels)
    for peer in status["peers"]:
        values = [peer["public_key"], peer["endpoint"]]
        handshake.add_metric(values, peer["latest_handshake"])
        sent.add_metric(values, peer["tx_bytes"])
        rcvd.add_metric(values, peer["rx_bytes"])
    yield _gauge("canal_wireguard_peers", "WireGuard peers configured on this host", len(status["peers"]))
    yield handshake
    yield sent
    yield rcvd


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc)
    family.add_metric([], value)
    return family


def _applied_firewall(plugin: Any) -> Any:
    agent = getattr(plugin, "agent", None)
    firewall = getattr(agent, "firewall", None) or getattr(plugin, "firewall", None)
    return getattr(firewall, "applied", None)


def lease_expiry(plugin: Any) -> Optional[float]:
    """When this host's lease expires: its last renewal plus the TTL; None without a datastore
    lease (a reservation, flanneld's own lease, or none yet)."""
    lease = getattr(plugin, "lease", None)
    renewed = getattr(plugin, "lease_renewed_at", None)
    if lease is None or not lease.lease_id or renewed is None:
        return None
    return float(renewed + plugin.config.lease_ttl)


def registry_for(plugin: Any, process: bool = True) -> CollectorRegistry:
    """The registry one plugin exposes: the hot-path metrics, its state, and process_*/python_*."""
    registry = CollectorRegistry(auto_describe=False)
    for metric in HOT_PATH:
        registry.register(metric)
    registry.register(StateCollector(plugin))
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def parse_addr(value: str) -> str:
    """`HOST:PORT` (`[v6]:PORT` for IPv6), or "" for off; HOST must be given (no silent 0.0.0.0)."""
    if not value:
        return ""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9091 (0.0.0.0:9091 for every address)")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} is not a number from 1 to 65535")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"unbalanced brackets in {host!r}")
        host = host[1:-1]
    if not host or any(c.isspace() or c in "/[]" for c in host):
        raise ValueError(f"{host!r} is not a host name or address")
    return value


def split_addr(value: str) -> tuple[str, int]:
    host, _sep, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def check_listen(value: str) -> None:
    """Refuse a --metrics-addr that cannot be listened on, before the plugin starts serving."""
    host, port = split_addr(value)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _name, address = infos[0]
        probe = socket.socket(family, kind, proto)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
        finally:
            probe.close()
    except OSError as err:
        raise BadRequest(f"--metrics-addr {value}: cannot listen there: {err.strerror or err}") from None


def serve(registry: CollectorRegistry, value: str) -> None:
    """Expose `registry` over HTTP on `value` (HOST:PORT), in a daemon thread."""
    from prometheus_client import start_http_server

    host, port = split_addr(value)
    start_http_server(port, host, registry=registry)
    log.info("metrics served on http://%s/metrics", value)
