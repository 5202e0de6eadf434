#!/usr/bin/env python3
"""Benchmark (issue 12, local scale): Felix's anchor of 1,500 workloads on one node. One real
test-bed host (dockerd, kernel, plugin in namespaces); containers are started PARALLEL at a time up
to COUNT on a canal network and, interleaved batch by batch (the order alternating), as many on
Docker's bridge driver, so both are measured at the same count on the same machine state.

    .venv/bin/python bench/local_scale.py [--count 1500] [--parallel 10] [--checkpoints 150,500,1000,1500]
                                          [--json bench/results/local_scale.json]

Per window between checkpoints: `docker run -d` latency p50/p99 per driver, the plugin's Join and
CreateEndpoint handling time p50/p99 (`/canal/v1/stats?last=N`), the reconcile passes that changed
the firewall (from the plugin's "pass:" log lines: total and per phase), plugin CPU; at each
checkpoint: Canal rules (`-A CANAL*` lines), plugin RSS, machine MemAvailable.

The bridge side, --bridge:
- probe (default): each batch of bridge containers is removed again after it was timed, so the host
  holds COUNT canal containers plus at most PARALLEL bridge ones: dockerd's own per-container costs
  (which grow with the count) are the same for both, at half the memory. Measured here: ~7.5 MB per
  running container (shim + sleep), so 2 x 1,500 would need ~22 GiB of the machine's 23.
- keep: the bridge containers stay (COUNT of each). Linux bridges take at most 1,024 ports
  (BR_MAX_PORTS), so they are spread over bridge networks of at most --per-bridge containers each.
Canal's endpoints are routed veths without a bridge: one network holds them all.

Targets at 1,500: Join p99 <= 20 ms, pass <= 50 ms, docker run canal/bridge median <= 1.10.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..", "plugin")]

import _results  # noqa: E402
from _proc import cpu_seconds, group_pids, pct, rss_bytes  # noqa: E402
from canal.cli.client import AdminClient  # noqa: E402
from testbed import IMAGE, SimHost, Underlay  # noqa: E402

PASS_LINE = re.compile(r"pass: snapshot ([\d.]+)ms steps ([\d.]+)ms compile ([\d.]+)ms firewall ([\d.]+)ms")
PHASES = ("snapshot", "steps", "compile", "firewall")
MIN_AVAILABLE = 2 << 30  # stop starting containers below 2 GiB available: the machine is shared


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def rule_count(host: SimHost) -> int:
    save = host.exec(["iptables-nft-save"], timeout=120).stdout
    return sum(1 for line in save.splitlines() if line.startswith("-A CANAL"))


class PassLog:
    """The plugin's "pass:" lines (passes that changed the firewall), read incrementally."""

    def __init__(self, path: str):
        self.path, self.offset = path, 0

    def read(self) -> list[dict[str, float]]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        cut = data.rfind(b"\n") + 1
        self.offset += cut
        out = []
        for line in data[:cut].decode(errors="replace").splitlines():
            m = PASS_LINE.search(line)
            if m:
                phases = dict(zip(PHASES, map(float, m.groups())))
                out.append({**phases, "total": sum(phases.values())})
        return out


def start_one(host: SimHost, name: str, network: str) -> float:
    started = time.perf_counter()
    host.docker("run", "-d", "--name", name, "--network", network, IMAGE, "sleep", "1000000", timeout=300)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1500, help="containers per driver")
    parser.add_argument("--parallel", type=int, default=10, help="containers started at once")
    parser.add_argument("--checkpoints", default="150,500,1000,1500", help="counts at which to report")
    parser.add_argument("--per-bridge", type=int, default=1000, help="containers per bridge network (< 1,024)")
    parser.add_argument("--bridge", choices=("probe", "keep", "none"), default="probe",
                        help="bridge containers removed after each timed batch, kept, or none (profiling)")
    parser.add_argument("--plugin-arg", action="append", default=[], help="extra plugin argument (repeatable)")
    parser.add_argument("--keep-going", action="store_true", help="stop at the first failed docker run otherwise")
    parser.add_argument("--profile", metavar="PATH", help="py-spy the plugin (collapsed stacks to PATH)")
    parser.add_argument("--profile-from", type=int, default=0, help="start py-spy at this count")
    _results.add_json_option(parser, "local_scale")
    args = parser.parse_args()
    checkpoints = sorted({int(c) for c in args.checkpoints.split(",") if int(c) <= args.count} | {args.count})
    ul = Underlay()
    pool = ThreadPoolExecutor(args.parallel)
    spy: subprocess.Popen | None = None
    try:
        host = SimHost(ul, "b1", "198.18.0.1")
        host.start_dockerd()
        host.load_image()
        # The default lease (/24) holds 253 containers: a host of COUNT needs a bigger one.
        subnet_len = 32 - (args.count + 16).bit_length()
        host.start_plugin(["--network", "100.64.0.0/16", "--subnet-len", str(subnet_len), *args.plugin_arg])
        assert host.plugin is not None
        plugin_pids = group_pids(host.plugin.pid)
        host.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "canalnet")
        bridges = {"none": [], "probe": ["bridgenet0"],
                   "keep": [f"bridgenet{i}" for i in range(-(-args.count // args.per_bridge))]}[args.bridge]
        for i, name in enumerate(bridges):  # /22 each, inside the benchmark range, off Docker's pools
            host.docker("network", "create", "-d", "bridge", "--subnet", f"198.19.{64 + 4 * i}.0/22", name)
        for network in ["canalnet", *bridges[:1]]:  # warm caches
            host.docker("run", "--rm", "--network", network, IMAGE, "true")
        admin = AdminClient(host.plugin_socket)
        print(f"plugin: --subnet-len {subnet_len}; status: "
              f"{ {k: v for k, v in admin.get('/canal/v1/status').items() if 'lease' in k or 'subnet' in k} }")
        passes = PassLog(str(host.plugin_log))
        passes.read()
        calls0 = {c: r["count"] for c, r in admin.get("/canal/v1/stats").items()}
        rows: list[dict[str, Any]] = []
        runs: dict[str, list[float]] = {"canal": [], "bridge": []}
        window: dict[str, list[float]] = {"canal": [], "bridge": []}
        window_passes: list[dict[str, float]] = []
        cpu0, wall0 = cpu_seconds(plugin_pids), time.perf_counter()
        failures = 0
        n = 0
        print(f"{'count':>6} {'canal p50/p99 s':>16} {'bridge p50/p99 s':>17} {'ratio':>6} {'Join p50/p99 ms':>16} "
              f"{'CrEP p50/p99 ms':>16} {'pass p50/p99 ms':>16} {'rules':>6} {'RSS MB':>7} {'CPU %':>6} {'avail GB':>8}")
        while n < args.count:
            if args.profile and spy is None and n >= args.profile_from:
                spy = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--pid",
                                        str(host.plugin.pid), "--subprocesses", "--rate", "50", "--format", "raw",
                                        "--output", args.profile], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if mem_available() < MIN_AVAILABLE:
                print(f"stopping at {n}: MemAvailable {mem_available() >> 20} MiB < {MIN_AVAILABLE >> 20} MiB")
                break
            size = min(args.parallel, args.count - n)
            order = ["canal", "bridge"] if not bridges else (["canal", "bridge"] if (n // args.parallel) % 2 == 0
                                                            else ["bridge", "canal"])
            for driver in order:
                if driver == "bridge" and not bridges:
                    continue
                network = "canalnet" if driver == "canal" else bridges[n // args.per_bridge if args.bridge == "keep" else 0]
                names = [f"{driver[0]}{n + k}" for k in range(size)]
                futures = [pool.submit(start_one, host, name, network) for name in names]
                for future in futures:
                    try:
                        window[driver].append(future.result())
                    except Exception as err:  # noqa: BLE001 - counted and reported; --keep-going decides
                        failures += 1
                        print(f"docker run failed ({driver}): {str(err)[-300:]}")
                        if not args.keep_going:
                            raise
                if driver == "bridge" and args.bridge == "probe":
                    host.docker("rm", "-f", *names, check=False, timeout=300)
            n += size
            window_passes += passes.read()
            if n in checkpoints:
                stats = admin.get("/canal/v1/stats")
                span = {c: r["count"] - calls0.get(c, 0) for c, r in stats.items()}
                calls0 = {c: r["count"] for c, r in stats.items()}
                windowed = {c: admin.get(f"/canal/v1/stats?last={span[c]}")[c] for c in span if span[c]}
                cpu1, wall1 = cpu_seconds(plugin_pids), time.perf_counter()
                totals = [p["total"] for p in window_passes]
                row = {
                    "count": n,
                    "canal_p50_s": pct(window["canal"], 0.5), "canal_p99_s": pct(window["canal"], 0.99),
                    "bridge_p50_s": pct(window["bridge"], 0.5), "bridge_p99_s": pct(window["bridge"], 0.99),
                    "join_p50_ms": windowed.get("NetworkDriver.Join", {}).get("p50_ms", float("nan")),
                    "join_p99_ms": windowed.get("NetworkDriver.Join", {}).get("p99_ms", float("nan")),
                    "create_p50_ms": windowed.get("NetworkDriver.CreateEndpoint", {}).get("p50_ms", float("nan")),
                    "create_p99_ms": windowed.get("NetworkDriver.CreateEndpoint", {}).get("p99_ms", float("nan")),
                    "passes": len(totals), "pass_p50_ms": pct(totals, 0.5), "pass_p99_ms": pct(totals, 0.99),
                    "pass_phase_p50_ms": {ph: pct([p[ph] for p in window_passes], 0.5) for ph in PHASES},
                    "rules": rule_count(host), "rss_mb": rss_bytes(plugin_pids) / 2**20,
                    "cpu_pct": 100 * (cpu1 - cpu0) / (wall1 - wall0), "mem_available_gb": mem_available() / 2**30,
                    "canal_runs_s": [round(x, 4) for x in window["canal"]],
                    "bridge_runs_s": [round(x, 4) for x in window["bridge"]],
                    "pass_samples_ms": [round(x, 2) for x in totals],
                    "calls": windowed, "failures": failures,
                }
                row["ratio"] = row["canal_p50_s"] / row["bridge_p50_s"] if window["bridge"] else float("nan")
                rows.append(row)
                print(f"{n:6d} {row['canal_p50_s']:7.3f}/{row['canal_p99_s']:7.3f}  {row['bridge_p50_s']:7.3f}/"
                      f"{row['bridge_p99_s']:7.3f} {row['ratio']:6.3f} {row['join_p50_ms']:7.1f}/{row['join_p99_ms']:7.1f} "
                      f"{row['create_p50_ms']:7.1f}/{row['create_p99_ms']:7.1f} {row['pass_p50_ms']:7.1f}/"
                      f"{row['pass_p99_ms']:7.1f} {row['rules']:6d} {row['rss_mb']:7.1f} {row['cpu_pct']:6.1f} "
                      f"{row['mem_available_gb']:8.1f}", flush=True)
                print("        pass phases p50 (ms): " + "  ".join(f"{ph} {row['pass_phase_p50_ms'][ph]:.1f}"
                                                                     for ph in PHASES), flush=True)
                report(args, rows, bool(bridges), failures, table=False)
                for driver in runs:
                    runs[driver] += window[driver]
                    window[driver] = []
                window_passes = []
                cpu0, wall0 = cpu1, wall1
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
            spy.wait(60)
            spy = None
        if not rows:
            raise SystemExit("no checkpoint reached")
        report(args, rows, bool(bridges), failures, table=True)
    finally:
        if spy is not None:
            spy.kill()
            spy.wait()
        pool.shutdown(wait=True, cancel_futures=True)
        keep_logs(ul, os.path.splitext(args.json)[0] + "-logs")
        cleanup(ul)


def report(args: argparse.Namespace, rows: list[dict[str, Any]], bridges: bool, failures: int, table: bool) -> None:
    """The README table (at the end) and the JSON + plot (at every checkpoint: a run cut short
    still leaves its figures)."""
    if table:
        print("\nREADME table:")
        print("| containers | `docker run` canal p50 / p99 | bridge p50 / p99 | canal/bridge | Join p50 / p99 | "
              "CreateEndpoint p50 / p99 | pass p50 / p99 | Canal rules | plugin RSS | plugin CPU |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['count']:,} | {r['canal_p50_s'] * 1000:.0f} / {r['canal_p99_s'] * 1000:.0f} ms | "
                  f"{r['bridge_p50_s'] * 1000:.0f} / {r['bridge_p99_s'] * 1000:.0f} ms | {r['ratio']:.2f} | "
                  f"{r['join_p50_ms']:.1f} / {r['join_p99_ms']:.1f} ms | {r['create_p50_ms']:.1f} / {r['create_p99_ms']:.1f} ms | "
                  f"{r['pass_p50_ms']:.1f} / {r['pass_p99_ms']:.1f} ms | {r['rules']:,} | {r['rss_mb']:.0f} MB | "
                  f"{r['cpu_pct']:.0f} % |")
    last = rows[-1]
    counts = [r["count"] for r in rows]
    _results.save({
        "benchmark": "local_scale",
        "params": {"count": args.count, "parallel": args.parallel, "per_bridge": args.per_bridge,
                   "bridge": args.bridge, "plugin_args": args.plugin_arg},
        "headline": [
            _results.headline(f"Join p99 at {last['count']}", last["join_p99_ms"], "ms", "<= 20"),
            _results.headline(f"pass p99 at {last['count']}", last["pass_p99_ms"], "ms", "<= 50"),
            _results.headline(f"docker run canal/bridge median at {last['count']}", last["ratio"], "", "<= 1.10"),
            _results.headline(f"Canal rules at {last['count']}", last["rules"], ""),
            _results.headline(f"plugin RSS at {last['count']}", last["rss_mb"], "MB"),
        ],
        "failures": failures,
        "rows": rows,
        "panels": [
            {"kind": "line", "title": "docker run -d (p50 per window)", "xlabel": "containers per driver",
             "ylabel": "ms", "x": counts,
             "series": {"canal": [r["canal_p50_s"] * 1000 for r in rows],
                        **({"bridge": [r["bridge_p50_s"] * 1000 for r in rows]} if bridges else {})}},
            {"kind": "line", "title": "plugin calls and passes (p99 per window)", "xlabel": "containers",
             "ylabel": "ms", "x": counts, "target": 20,
             "series": {"Join": [r["join_p99_ms"] for r in rows],
                        "CreateEndpoint": [r["create_p99_ms"] for r in rows],
                        "pass": [r["pass_p99_ms"] for r in rows]}},
            {"kind": "line", "title": "pass phases (p50 per window)", "xlabel": "containers", "ylabel": "ms",
             "x": counts, "series": {ph: [r["pass_phase_p50_ms"][ph] for r in rows] for ph in PHASES}},
        ],
    }, args.json)


def keep_logs(ul: Underlay, where: str) -> None:
    """The plugin's and dockerd's logs, kept next to the JSON (the host's workdir goes)."""
    os.makedirs(where, exist_ok=True)
    for host in ul.hosts:
        for path in (host.plugin_log, host.dockerd_log):
            if os.path.exists(path):
                shutil.copy(path, os.path.join(where, os.path.basename(path)))


def cleanup(ul: Underlay) -> None:
    """Remove the containers through dockerd (chunks, in parallel), then the host and underlay;
    close() sweeps whatever a failed or slow removal left."""
    for host in list(ul.hosts):
        try:
            if host.dockerd_running():
                ids = host.docker("ps", "-aq", timeout=120).stdout.split()
                started = time.perf_counter()
                with ThreadPoolExecutor(4) as rm:
                    list(rm.map(lambda chunk, h=host: h.docker("rm", "-f", *chunk, check=False, timeout=600),
                                [ids[i:i + 50] for i in range(0, len(ids), 50)]))
                print(f"removed {len(ids)} containers in {time.perf_counter() - started:.0f} s")
        except Exception as err:  # noqa: BLE001 - close() below still sweeps everything
            print(f"container removal failed ({err}); sweeping")
    ul.close()


if __name__ == "__main__":
    main()
