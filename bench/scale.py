#!/usr/bin/env python3
"""Benchmark (issue 12): one real host among N simulated hosts, all on one real etcd.

The real host is the test bed's (bench/policy.py's): its own network and mount namespaces, a
real dockerd, the real kernel and the Canal plugin. The N simulated hosts run in one child
process (bench/_simcluster.py) and do, through the plugin's own services and record types,
what plugins do against etcd: hold and renew a flannel lease, write endpoint, address and
route records, start and stop containers (churn), and watch the policies and leases.

Per size (hosts, endpoints), measured on the real host:
  - idle: plugin CPU over --idle seconds (from the first 5 s the plugin is quiet after the
    population is in force) and RSS; etcd requests/s (etcd's own /metrics);
  - under churn (--churn starts+stops per second across the cluster):
      policy change in force (`canal policy apply` returns once programmed) p50/p99,
      remote join -> local ipset (a simulated endpoint record written until this host's
      selector ipset holds it) p50/p99, `docker run -d` -> labels in force p50/p99,
      reconcile pass time (the plugin's canal_reconcile_duration_seconds), plugin CPU and RSS,
      etcd requests/s, watchers per host;
  - restart: the plugin killed (-9), its ipsets emptied, the plugin started again;
    seconds until every canal ipset and CANAL rule equals the state before the kill.

    .venv/bin/python bench/scale.py [--hosts 20,100,500] [--endpoints 1000,10000,100000]
        [--churn 100] [--idle 60] [--runs 20] [--policies 10] [--json bench/results/scale.json]

--hosts and --endpoints pair up by position (a single value applies to every size). The
default is a quick run (20 hosts, 2,000 endpoints, 20 s idle). Writes JSON + PNG via
bench/_results.py and prints a README-ready table. Everything is removed at the end, also on
failure or Ctrl-C (the test bed's registry).

Targets at 100,000 endpoints (issue 12): remote join -> local ipset <= 50 ms p99; policy change
in force <= 500 ms p99; docker run -> labels in force <= 100 ms p99; RSS <= 300 MB; idle CPU
<= 2 %; restart to programmed <= 10 s.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..", "plugin")]

import requests  # noqa: E402

from canal.cli.client import AdminClient  # noqa: E402
from canal.datastore.base import Delete, Guard, Put, dumps  # noqa: E402
from canal.datastore.etcd import EtcdDatastore  # noqa: E402
from canal.datastore.keys import Keys  # noqa: E402
from canal.errors import Unavailable  # noqa: E402
from canal.policy.compiler import scoped_selector, selector_set  # noqa: E402
import _results  # noqa: E402
from _proc import cpu_seconds, group_pids, pct, pss_bytes, rss_bytes  # noqa: E402
import _simcluster as sim  # noqa: E402
from policy import policy  # noqa: E402  (bench/policy.py's policies: the same 10 here)
from testbed import IMAGE, Etcd, SimHost, Underlay, enter_netns  # noqa: E402

NETWORK = sim.NETWORK_NAME
CLUSTER = ipaddress.IPv4Network("100.64.0.0/10")
ROUTED_BLOCK = ipaddress.IPv4Network("100.112.0.0/12")  # above SubnetMax: no host subnet holds it


# Observations ------------------------------------------------------------------------------


def in_set(name: str, ip: str) -> bool:
    """The bench process lives in the real host's network namespace: ipset directly."""
    return subprocess.run(["ipset", "test", name, ip], capture_output=True).returncode == 0


def wait_for(check: Callable[[], bool], what: str, timeout: float = 300, pause: float = 0.0) -> float:
    started = time.perf_counter()
    while not check():
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"{what}: not after {timeout} s")
        if pause:
            time.sleep(pause)
    return time.perf_counter() - started


def plugin_pids(host: SimHost) -> list[int]:
    """The plugin's process group (gunicorn's master and worker)."""
    assert host.plugin is not None
    return group_pids(host.plugin.pid)


def settled(host: SimHost, window: float = 5.0, busy: float = 0.05, timeout: float = 120.0) -> float:
    """Seconds until one `window` in which the plugin used less than `busy` of a core (a timer
    pass in the window makes it wait for the next)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        cpu = CpuWindow(host)
        time.sleep(window)
        if cpu.percent() < 100 * busy:
            break
    return time.monotonic() - started


class CpuWindow:
    def __init__(self, host: SimHost):
        self.pids = plugin_pids(host)
        self.cpu0, self.t0 = cpu_seconds(self.pids), time.monotonic()

    def percent(self) -> float:
        """% of one core over the window."""
        return 100 * (cpu_seconds(self.pids) - self.cpu0) / max(1e-9, time.monotonic() - self.t0)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def prom(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            try:
                out[match[1] + (match[2] or "")] = float(match[3])
            except ValueError:
                continue
    return out


def total(samples: dict[str, float], name: str, contains: str = "") -> float:
    return sum(v for k, v in samples.items() if k.split("{")[0] == name and contains in k)


class Counters:
    """etcd's and the plugin's counters at one moment; `rates(later)` per second between."""

    def __init__(self, etcd: Etcd, admin: AdminClient):
        self.t = time.monotonic()
        self.etcd = prom(requests.get(etcd.endpoint + "/metrics", timeout=10).text)
        self.plugin = prom(admin.text("/canal/v1/metrics"))

    def rates(self, later: "Counters") -> dict[str, float]:
        dt = max(1e-9, later.t - self.t)

        def etcd(name: str, contains: str = "") -> float:
            return (total(later.etcd, name, contains) - total(self.etcd, name, contains)) / dt

        def plugin(name: str, contains: str = "") -> float:
            return total(later.plugin, name, contains) - total(self.plugin, name, contains)

        passes = plugin("canal_reconcile_duration_seconds_count")
        out = {
            "etcd_requests_per_s": etcd("grpc_server_handled_total", 'grpc_type="unary"'),
            "etcd_watch_streams_per_s": etcd("grpc_server_started_total", 'grpc_method="Watch"'),
            "etcd_puts_per_s": etcd("etcd_debugging_mvcc_put_total"),
            "etcd_ranges_per_s": etcd("etcd_debugging_mvcc_range_total"),
            "etcd_txns_per_s": etcd("etcd_debugging_mvcc_txn_total"),
            "etcd_watchers": total(later.etcd, "etcd_debugging_mvcc_watcher_total"),
            "etcd_db_mb": total(later.etcd, "etcd_mvcc_db_total_size_in_bytes") / 2**20,
            "etcd_keys": total(later.etcd, "etcd_debugging_mvcc_keys_total"),
            "plugin_datastore_requests_per_s": plugin("canal_datastore_request_duration_seconds_count") / dt,
            "passes": passes,
            "passes_per_s": passes / dt,
            "pass_mean_ms": 1000 * plugin("canal_reconcile_duration_seconds_sum") / passes if passes else 0.0,
        }
        by_le: dict[float, float] = {}  # every pass, full (timer) or not: summed over the label
        for k, v in later.plugin.items():
            if k.startswith("canal_reconcile_duration_seconds_bucket"):
                le = float(re.search(r'le="([^"]+)"', k)[1])  # type: ignore[index]
                by_le[le] = by_le.get(le, 0.0) + v - self.plugin.get(k, 0.0)
        buckets = sorted(by_le.items())
        out["pass_p99_le_ms"] = _bucket_quantile(buckets, 0.99)
        out["pass_p50_le_ms"] = _bucket_quantile(buckets, 0.5)
        return out


def _bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Upper bound (ms) of the histogram bucket holding quantile q (cumulative buckets)."""
    if not buckets or buckets[-1][1] <= 0:
        return 0.0
    wanted = q * buckets[-1][1]
    for le, count in buckets:
        if count >= wanted:
            return le * 1000
    return float("inf")


def remote_joins(store: EtcdDatastore, keys: Keys, runs: int, selector: str) -> list[float]:
    """A container started on simulated host 0 (its address, endpoint record: one txn, as
    CreateEndpoint writes them; already joined and labelled role=c0) until this host's ipset of
    `role == 'c0'` holds it; then removed again and its removal awaited (one change at a time).
    Addresses from the top of that host's subnet, taken with a guard so churn's never collide."""
    probe_host = sim.host_name(0)
    subnet = ipaddress.IPv4Network(store.get_json(keys.host(probe_host))["subnet"])
    out = []
    candidate = subnet.broadcast_address - 1
    for run in range(runs):
        ep_id, cid = sim.endpoint_id(0xFFFFFF, run), sim.container_id(0xFFFFFF, run)
        while True:
            ip = candidate
            candidate -= 1
            items = sim.joined_records(keys, probe_host, subnet, ep_id, cid, ip, {"role": "c0"}, time.time())
            started = time.perf_counter()
            if store.txn([Guard(keys.address(ip), 0)], [Put(k, dumps(v)) for k, v in items]):
                break
        wait_for(lambda ip=ip: in_set(selector, str(ip)), "remote join in ipset")
        out.append(time.perf_counter() - started)  # from before the write
        store.txn([], [Delete(k) for k, _ in items])
        wait_for(lambda ip=ip: not in_set(selector, str(ip)), "remote leave from ipset", pause=0.005)
    return out


_COUNTERS = re.compile(r"\[\d+:\d+\]")


def canal_state(host: SimHost) -> tuple[str, str]:
    """Every canal ipset with its members, and every CANAL rule: what a restart must restore."""
    sets = subprocess.run(["ipset", "save"], capture_output=True, text=True, check=True).stdout
    ours = []
    for line in sets.splitlines():
        words = line.split()
        if len(words) >= 2 and words[1].startswith("canal-"):
            # a create line's initval and hashsize differ between equal sets (swapped in anew)
            ours.append(" ".join(words[:3]) if words[0] == "create" else line)
    ours.sort()
    rules = host.exec(["iptables-nft-save"]).stdout
    chains = sorted(_COUNTERS.sub("", line) for line in rules.splitlines() if "CANAL" in line and not line.startswith("#"))
    return "\n".join(ours), "\n".join(chains)


def canal_sets() -> list[str]:
    out = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True, check=True).stdout
    return [name for name in out.split() if name.startswith("canal-")]


# The simulated cluster (child process) -------------------------------------------------------


class Simulator:
    def __init__(self, etcd: str, hosts: int, endpoints: int, policies: int, subnet_len: int, workers: int,
                 log_path: str, watch: bool = True):
        self.log = open(log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "_simcluster.py"), "--etcd", etcd, "--hosts", str(hosts),
             "--endpoints", str(endpoints), "--policies", str(policies), "--network", str(CLUSTER),
             "--subnet-len", str(subnet_len), "--routed-block", str(ROUTED_BLOCK), "--workers", str(workers)]
            + ([] if watch else ["--no-watch"]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, start_new_session=True)

    def ask(self, cmd: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"simulator exited ({self.proc.poll()}); see {self.log.name}")
        answer: dict[str, Any] = json.loads(line)
        if answer.get("ok") is False:
            raise RuntimeError(f"simulator: {answer.get('error')}")
        return answer

    def close(self) -> dict[str, Any]:
        """Stop it; it removes every record it wrote. Killed if it does not finish in time."""
        answer: dict[str, Any] = {}
        try:
            if self.proc.poll() is None:
                answer = self.ask({"cmd": "stop"})
                self.proc.wait(timeout=120)
        except Exception as err:  # noqa: BLE001 - reported; the kill below still cleans the process
            print(f"simulator stop: {err}", file=sys.stderr)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.log.close()
        return answer


# One size ------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, host: SimHost, etcd: Etcd, store: EtcdDatastore, admin: AdminClient,
            hosts: int, endpoints: int, subnet_len: int, plugin_args: list[str]) -> dict[str, Any]:
    keys = Keys(sim.PREFIX, sim.FLANNEL_PREFIX)
    began = time.monotonic()
    row: dict[str, Any] = {"hosts": hosts, "endpoints": endpoints, "runs": args.runs, "churn_target": args.churn}
    last: tuple[str, str] | None = None
    set0 = selector_set(scoped_selector("role == 'c0'", NETWORK))
    simulator = Simulator(etcd.endpoint, hosts, endpoints, args.policies, subnet_len, args.workers,
                          str(host.workdir / f"sim-{hosts}-{endpoints}.log"), watch=not args.no_sim_watches)
    try:
        populated = simulator.ask({"cmd": "populate"})
        # the last bulk endpoint in force on the real host: the population is programmed
        per_host, extra = divmod(endpoints, hosts)
        record = store.get_json(keys.endpoint(sim.endpoint_id(hosts - 1, per_host + (hosts - 1 < extra) - 1)))
        last = (selector_set(scoped_selector(f"role == '{record['labels']['role']}'", NETWORK)), record["ip"])
        last_set = last[0]
        settle = wait_for(lambda: in_set(last_set, record["ip"]), "population in force", timeout=1800, pause=0.05)
        row["populate_s"] = round(populated["seconds"], 1)
        row["population_in_force_s"] = round(settle, 1)
        print(f"  populated {endpoints} endpoints on {hosts} hosts in {populated['seconds']:.1f} s; "
              f"in force on the real host {settle:.1f} s later", flush=True)

        # Idle: renewals and watches only, once the plugin has finished programming the
        # population (its routes, the last batches): the window opened 2 s after the last
        # member was in force took in a tail of up to a second of CPU.
        row["settled_s"] = round(settled(host), 1)
        cpu, before = CpuWindow(host), Counters(etcd, admin)
        time.sleep(args.idle)
        idle = before.rates(Counters(etcd, admin))
        row["idle_cpu_pct"] = round(cpu.percent(), 2)
        row["idle_rss_mb"] = round(rss_bytes(cpu.pids) / 2**20, 1)
        row["idle_pss_mb"] = round(pss_bytes(cpu.pids) / 2**20, 1)
        row["idle"] = idle
        print(f"  idle {args.idle:.0f} s: plugin CPU {row['idle_cpu_pct']:.1f} %, RSS {row['idle_rss_mb']:.0f} MB (PSS {row['idle_pss_mb']:.0f}), "
              f"etcd {idle['etcd_requests_per_s']:.0f} req/s, {idle['passes_per_s']:.2f} passes/s "
              f"(window opened once settled, {row['settled_s']:.0f} s after)", flush=True)

        row["idle_join_ms"] = _results.ms(remote_joins(store, keys, args.runs, set0))
        row["idle_join_p50_ms"] = round(statistics.median(row["idle_join_ms"]), 1)

        # Churn on; latencies measured while it runs.
        simulator.ask({"cmd": "churn", "rate": args.churn})
        time.sleep(3)
        stats0 = simulator.ask({"cmd": "stats"})
        cpu, before = CpuWindow(host), Counters(etcd, admin)
        applies, joins, labels_in_force = [], [], []
        apply_timeouts = 0
        for run in range(args.runs):
            started = time.perf_counter()
            try:
                admin.post("/canal/v1/policies", {"documents": json.dumps(policy(run % args.policies, extra=run + endpoints))})
            except Unavailable:  # stored, but not in force within the plugin's 10 s: the sample is a lower bound
                apply_timeouts += 1
            applies.append(time.perf_counter() - started)
        row["apply_timeouts"] = apply_timeouts
        joins = remote_joins(store, keys, args.runs, set0)
        for run in range(args.runs):
            name = f"lbl{run}"
            ran = host.docker("run", "-d", "--name", name, "--network", NETWORK, "--label", "role=c0", IMAGE, "sleep",
                              "100000", check=False)
            if ran.returncode != 0:  # Join waits 10 s for its pass, then Docker gives up: counted, not sampled
                row["run_failures"] = row.get("run_failures", 0) + 1
                row["run_failure"] = (ran.stderr or "")[-300:]
                host.docker("rm", "-f", name, check=False)
                continue
            started = time.perf_counter()
            address = host.docker_json("inspect", name)[0]["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]
            wait_for(lambda a=address: in_set(set0, a), "docker run labels in force")
            labels_in_force.append(time.perf_counter() - started)
            host.docker("rm", "-f", name)
        churn = before.rates(Counters(etcd, admin))
        stats1 = simulator.ask({"cmd": "stats"})
        window = churn_seconds = time.monotonic() - cpu.t0
        row["churn_cpu_pct"] = round(cpu.percent(), 2)
        row["churn_rss_mb"] = round(rss_bytes(cpu.pids) / 2**20, 1)
        row["churn_pss_mb"] = round(pss_bytes(cpu.pids) / 2**20, 1)
        simulator.ask({"cmd": "churn", "rate": 0})
        ops = (stats1["starts"] + stats1["stops"]) - (stats0["starts"] + stats0["stops"])
        row["churn_achieved_per_s"] = round(ops / window, 1)
        row["churn_errors"] = stats1["errors"] - stats0["errors"]
        row["churn_last_error"] = stats1["last_error"]
        row["churn_window_s"] = round(churn_seconds, 1)
        row["simulator_cpu_pct"] = round(100 * (stats1["cpu_seconds"] - stats0["cpu_seconds"]) / window, 1)
        row["churn"] = churn
        row["watchers_per_host"] = round(churn["etcd_watchers"] / (hosts + 1), 2)
        for name, samples in (("apply", applies), ("join", joins), ("labels", labels_in_force or [float("nan")])):
            row[f"{name}_p50_ms"] = round(statistics.median(samples) * 1000, 1)
            row[f"{name}_p99_ms"] = round(pct(samples, 0.99) * 1000, 1)
            row[f"{name}_ms"] = _results.ms(samples)
        print(f"  churn {row['churn_achieved_per_s']:.0f}/s ({row['churn_errors']} errors) over {churn_seconds:.0f} s: "
              f"apply p50/p99 {row['apply_p50_ms']:.0f}/{row['apply_p99_ms']:.0f} ms, "
              f"join {row['join_p50_ms']:.0f}/{row['join_p99_ms']:.0f} ms, "
              f"labels {row['labels_p50_ms']:.0f}/{row['labels_p99_ms']:.0f} ms, "
              f"pass mean {churn['pass_mean_ms']:.0f} ms, CPU {row['churn_cpu_pct']:.0f} %, "
              f"etcd {churn['etcd_requests_per_s']:.0f} req/s; simulator CPU {row['simulator_cpu_pct']:.0f} %", flush=True)

        # Restart: same state expected after kill -9, with the selector sets emptied meanwhile.
        time.sleep(2)
        wait_for(lambda: canal_state(host) == canal_state(host), "state settled", pause=0.5)
        expected = canal_state(host)
        host.stop_plugin(signal.SIGKILL)
        for name in canal_sets():
            subprocess.run(["ipset", "flush", name], check=True)
        started = time.perf_counter()
        host.start_plugin(plugin_args)
        admin_ready = time.perf_counter() - started
        wait_for(lambda: canal_state(host) == expected, "restart to programmed", timeout=600, pause=0.2)
        row["restart_s"] = round(time.perf_counter() - started, 2)
        row["restart_answering_s"] = round(admin_ready, 2)
        row["restart_rss_mb"] = round(rss_bytes(plugin_pids(host)) / 2**20, 1)
        print(f"  restart: answering {admin_ready:.1f} s, programmed {row['restart_s']:.1f} s", flush=True)
    finally:
        removed = simulator.close()
    row["removed_records"] = removed.get("removed")
    row["size_minutes"] = round((time.monotonic() - began) / 60, 1)
    # the real host lets go of the population before the next size
    if last is not None:
        gone = last
        wait_for(lambda: not in_set(*gone), "population removed", timeout=600, pause=0.2)
    return row


def subnet_len_for(per_host: int) -> int:
    """Host subnets on nibble boundaries (/24, /20, /16), so each one's addresses are one key prefix."""
    for length in (24, 20, 16):
        if per_host + 20 <= 2 ** (32 - length) - 3:
            return length
    raise SystemExit(f"{per_host} endpoints per host do not fit a /16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", default="20", help="simulated hosts per size (comma list)")
    parser.add_argument("--endpoints", default="2000", help="simulated endpoints per size (comma list)")
    parser.add_argument("--churn", type=float, default=100, help="container starts+stops per second, cluster-wide")
    parser.add_argument("--idle", type=float, default=20, help="seconds of the idle CPU window (60: an idle minute)")
    parser.add_argument("--runs", type=int, default=20, help="samples of each latency per size")
    parser.add_argument("--policies", type=int, default=10)
    parser.add_argument("--no-sim-watches", action="store_true",
                        help="simulated hosts hold no watches (their 2 long-polls each saturate one Python "
                             "process at a few hundred hosts); etcd's watch load is then the real host's only")
    parser.add_argument("--workers", type=int, default=32, help="simulator threads doing the churn")
    _results.add_json_option(parser, "scale")
    args = parser.parse_args()
    host_list = [int(s) for s in args.hosts.split(",")]
    ep_list = [int(s) for s in args.endpoints.split(",")]
    n = max(len(host_list), len(ep_list))
    if {len(host_list), len(ep_list)} - {1, n}:
        parser.error("--hosts and --endpoints need as many values, or one of them a single value")
    sizes = list(zip(host_list * (n if len(host_list) == 1 else 1), ep_list * (n if len(ep_list) == 1 else 1)))
    subnet_len = subnet_len_for(max(-(-e // h) for h, e in sizes))
    subnet_max = ROUTED_BLOCK.network_address - 2 ** (32 - subnet_len)
    plugin_args: list[str] = []
    rows: list[dict[str, Any]] = []
    ul = Underlay()
    try:
        etcd = Etcd(ul)
        host = SimHost(ul, "sc1", "198.18.0.1")
        enter_netns(host.netns_path)
        store = EtcdDatastore(etcd.endpoint, timeout=10)
        # The cluster config first: room for every simulated host below SubnetMax, the routed
        # block above it (no lease ever covers it).
        store.put(sim.FLANNEL_PREFIX + "/config", {
            "Network": str(CLUSTER), "SubnetLen": subnet_len, "SubnetMax": str(subnet_max),
            "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472}})
        host.start_dockerd(["-H", "unix:///run/docker.sock"])
        host.load_image()
        plugin_args = ["--datastore", "etcd", "--etcd-endpoints", etcd.endpoint, "--network", str(CLUSTER),
                       "--subnet-len", str(subnet_len)]
        host.start_plugin(plugin_args)
        admin = AdminClient(host.plugin_socket)
        host.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", NETWORK)
        for i in range(args.policies):  # one local container selected by each policy
            host.docker("run", "-d", "--name", f"r{i}", "--network", NETWORK, "--label", f"role=r{i}", IMAGE,
                        "sleep", "100000")
        admin.post("/canal/v1/policies", {"documents": "\n---\n".join(json.dumps(policy(i)) for i in range(args.policies))})
        print(f"real host + {args.policies} policies, {args.policies} local containers; churn {args.churn:.0f}/s; "
              f"host subnets /{subnet_len}", flush=True)
        for hosts, endpoints in sizes:
            print(f"size: {hosts} simulated hosts, {endpoints} endpoints", flush=True)
            rows.append(measure(args, host, etcd, store, admin, hosts, endpoints, subnet_len, plugin_args))
            print(f"  took {rows[-1]['size_minutes']:.1f} min", flush=True)
            report(args, rows)  # after every size: a later size failing keeps the earlier ones
    finally:
        ul.close()


TABLE = [  # (column, row key, format)
    ("hosts", "hosts", "{:,}"), ("endpoints", "endpoints", "{:,}"),
    ("policy apply → in force p50 / p99", ("apply_p50_ms", "apply_p99_ms"), "{:.0f} / {:.0f} ms"),
    ("remote join → ipset p50 / p99", ("join_p50_ms", "join_p99_ms"), "{:.0f} / {:.0f} ms"),
    ("`docker run` → labels p50 / p99", ("labels_p50_ms", "labels_p99_ms"), "{:.0f} / {:.0f} ms"),
    ("pass mean (churn)", ("churn", "pass_mean_ms"), "{:.0f} ms"),
    ("CPU idle / churn", ("idle_cpu_pct", "churn_cpu_pct"), "{:.1f} / {:.0f} %"),
    ("RSS (PSS)", ("churn_rss_mb", "churn_pss_mb"), "{:.0f} ({:.0f}) MB"),
    ("etcd req/s idle / churn", (("idle", "etcd_requests_per_s"), ("churn", "etcd_requests_per_s")), "{:.0f} / {:.0f}"),
    ("watchers per host", "watchers_per_host", "{:.1f}"),
    ("churn achieved", "churn_achieved_per_s", "{:.0f}/s"),
    ("restart → programmed", "restart_s", "{:.1f} s"),
]


def _value(row: dict[str, Any], key: Any) -> Any:
    if isinstance(key, str):
        return row[key]
    if isinstance(key[0], tuple):
        return tuple(_value(row, k) for k in key)
    if key[0] in ("churn", "idle"):
        return row[key[0]][key[1]]
    return tuple(row[k] for k in key)


def report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    lines = ["| " + " | ".join(c for c, _, _ in TABLE) + " |", "|" + "---|" * len(TABLE)]
    for row in rows:
        cells = []
        for _, key, fmt in TABLE:
            value = _value(row, key)
            cells.append(fmt.format(*value) if isinstance(value, tuple) else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    last = rows[-1]
    x = [r["endpoints"] for r in rows]

    def curve(key: Any) -> list[float]:
        return [float(_value(r, key)) for r in rows]

    _results.save({
        "benchmark": "scale",
        "params": {"hosts": args.hosts, "endpoints": args.endpoints, "churn": args.churn, "idle": args.idle,
                   "runs": args.runs, "policies": args.policies},
        "headline": [
            _results.headline(f"remote join -> ipset p99 (N={last['endpoints']})", last["join_p99_ms"], "ms", "<= 50"),
            _results.headline(f"policy apply -> in force p99 (N={last['endpoints']})", last["apply_p99_ms"], "ms",
                              "<= 500"),
            _results.headline(f"docker run -> labels p99 (N={last['endpoints']})", last["labels_p99_ms"], "ms",
                              "<= 100"),
            _results.headline(f"plugin RSS (N={last['endpoints']})", last["churn_rss_mb"], "MB", "<= 300"),
            _results.headline(f"plugin idle CPU (N={last['endpoints']})", last["idle_cpu_pct"], "%", "<= 2"),
            _results.headline(f"restart -> programmed (N={last['endpoints']})", last["restart_s"], "s", "<= 10"),
        ],
        "rows": rows, "table": lines,
        "panels": [
            {"kind": "line", "title": "latency under churn against N", "xlabel": "simulated endpoints", "ylabel": "ms",
             "x": x, "logx": len(x) > 1, "series": {
                 "apply p99": curve("apply_p99_ms"), "join p99": curve("join_p99_ms"),
                 "labels p99": curve("labels_p99_ms"), "pass mean": curve(("churn", "pass_mean_ms"))}},
            {"kind": "line", "title": "plugin CPU (% of a core) and RSS (MB)", "xlabel": "simulated endpoints",
             "ylabel": "", "x": x, "logx": len(x) > 1, "series": {
                 "CPU idle": curve("idle_cpu_pct"), "CPU churn": curve("churn_cpu_pct"), "RSS MB": curve("churn_rss_mb")}},
            {"kind": "line", "title": "etcd requests/s", "xlabel": "simulated endpoints", "ylabel": "req/s", "x": x,
             "logx": len(x) > 1, "series": {"idle": curve(("idle", "etcd_requests_per_s")),
                                            "churn": curve(("churn", "etcd_requests_per_s"))}},
            {"kind": "box", "title": f"latencies under churn (N={last['endpoints']})", "ylabel": "ms", "series": {
                "apply": last["apply_ms"], "join": last["join_ms"], "labels": last["labels_ms"]}},
        ],
    }, args.json)


if __name__ == "__main__":
    main()
