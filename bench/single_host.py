#!/usr/bin/env python3
"""Benchmark (issue 2): container start time on a canal network vs Docker's bridge, and the
plugin's own handling time per protocol call. Runs in a simulated host (namespaces only).

    .venv/bin/python bench/single_host.py [-n 30] [--json bench/results/single_host.json]

Writes the samples as JSON and a plot next to it (.png): start times side by side, and the
plugin's p50/p99 per call.

Targets: median(canal) / median(bridge) <= 1.10; p99 per call <= 20 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..", "plugin")]

import _results  # noqa: E402
from canal.cli.client import AdminClient  # noqa: E402
from testbed import IMAGE, SimHost, Underlay  # noqa: E402


def timed(host: SimHost, network: str) -> float:
    started = time.perf_counter()
    host.docker("run", "--rm", "--network", network, IMAGE, "true")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=30, help="runs per network (interleaved)")
    _results.add_json_option(parser, "single_host")
    args = parser.parse_args()
    ul = Underlay()
    try:
        host = SimHost(ul, "b1", "198.18.0.1")
        host.start_dockerd()
        host.load_image()
        host.start_plugin(["--network", "100.64.0.0/16"])
        host.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "canalnet")
        host.docker("network", "create", "-d", "bridge", "bridgenet")
        for network in ("canalnet", "bridgenet"):  # warm caches
            timed(host, network)
        host.plugin_post("Plugin.Activate")
        canal, bridge = [], []
        for _ in range(args.n):
            canal.append(timed(host, "canalnet"))
            bridge.append(timed(host, "bridgenet"))
        mc, mb = statistics.median(canal), statistics.median(bridge)
        print(f"docker run --rm true, n={args.n} each, interleaved")
        print(f"  canal  median {mc * 1000:7.1f} ms   p90 {sorted(canal)[int(0.9 * len(canal))] * 1000:7.1f} ms")
        print(f"  bridge median {mb * 1000:7.1f} ms   p90 {sorted(bridge)[int(0.9 * len(bridge))] * 1000:7.1f} ms")
        print(f"  ratio canal/bridge {mc / mb:.3f}  (target <= 1.10)")
        stats = AdminClient(host.plugin_socket).get("/canal/v1/stats")
        print("plugin handling time per call (ms):")
        print(f"  {'call':42} {'count':>6} {'p50':>8} {'p99':>8} {'max':>8}")
        for call, row in sorted(stats.items()):
            print(f"  {call:42} {row['count']:6d} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} {row['max_ms']:8.2f}")
        worst = max(row["p99_ms"] for row in stats.values())
        print(f"  worst p99 {worst:.2f} ms (target <= 20 ms)")
        calls = sorted(stats, key=lambda call: -stats[call]["p99_ms"])
        _results.save({
            "benchmark": "single_host", "params": {"n": args.n},
            "headline": [
                _results.headline("docker run canal median", mc * 1000, "ms"),
                _results.headline("docker run bridge median", mb * 1000, "ms"),
                _results.headline("ratio canal/bridge", mc / mb, "", "<= 1.10"),
                _results.headline("worst p99 per call", worst, "ms", "<= 20"),
            ],
            "calls": stats,
            "panels": [
                {"kind": "box", "title": "docker run --rm IMAGE true (interleaved)", "ylabel": "ms",
                 "series": {"canal": _results.ms(canal), "bridge": _results.ms(bridge)}},
                {"kind": "bars", "title": "plugin handling time per call", "ylabel": "ms",
                 "categories": [c.split(".")[-1] for c in calls],
                 "series": {"p50": [stats[c]["p50_ms"] for c in calls], "p99": [stats[c]["p99_ms"] for c in calls]},
                 "target": 20},
            ],
        }, args.json)
    finally:
        ul.close()


if __name__ == "__main__":
    main()
