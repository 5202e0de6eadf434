#!/usr/bin/env python3
"""Benchmark: the compute half of one reconcile pass (mirror -> snapshot -> desired firewall)
with N synthetic remote endpoints, no kernel. Compare two trees side by side, interleaved:

    .venv/bin/python bench/pass_cost.py --sizes 1000,5000 [--other /path/to/older/checkout]
                                        [--json bench/results/pass_cost.json]

Each round runs every (tree, N) in a fresh process, alternating trees; medians per tree.
Writes them as JSON and a plot next to it (.png): snapshot and compile time against N, per tree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

import _results  # noqa: E402

CHILD = r'''
import ipaddress, json, os, statistics, sys, tempfile, time
sys.path.insert(0, os.path.join(sys.argv[1], "plugin"))
from canal.agent import desired
from canal.agent.mirror import Mirror
from canal.datastore.base import Put, dumps
from canal.datastore.local import LocalDatastore

n = int(sys.argv[2])
store = LocalDatastore(os.path.join(tempfile.mkdtemp(prefix="canal-pass-"), "db"))
root, net = "/canal/v1", "5" * 64
ops = [Put(f"{root}/networks/{h}/{net}", dumps({"id": net, "pools": ["0.0.0.0/0"], "internal": False, "nat": True,
       "mtu": 0, "host": h, "name": "appnet"})) for h in ["h1"] + [f"synthetic{i}" for i in range(20)]]
base = int(ipaddress.IPv4Address("100.64.128.0"))
for i in range(n):
    ep = f"{i:064x}"
    ops.append(Put(f"{root}/endpoints/{ep}", dumps({"id": ep, "network": net, "host": f"synthetic{i % 20}",
        "ip": str(ipaddress.IPv4Address(base + i)), "mac": "02:42:00:00:00:00", "mtu": 1450, "joined": True,
        "labels": {"role": f"c{i % 10}"}, "created": 1.0})))
for s in range(0, len(ops), 100):
    store.txn([], ops[s:s + 100])
mirror = Mirror(store, [root + "/"], lambda: None)
mirror.start()
mirror.wait_ready(30)
typed = hasattr(desired, "identity_known")

def snapshot():
    if typed:
        from canal import records
        if hasattr(records, "endpoint_entry"):  # the parsers the plugin passes
            parse_network, parse_endpoint = records.network_entry, records.endpoint_entry
        else:
            parse_network = lambda k, r: records.NetworkRecord.parse(r, k)  # noqa: E731
            parse_endpoint = lambda k, r: records.EndpointRecord.parse(r, k)  # noqa: E731
        return desired.Snapshot("h1", "100.64.0.0/16", mirror.records(root + "/networks/", parse_network),
                                mirror.records(root + "/endpoints/", parse_endpoint))
    return desired.Snapshot("h1", "100.64.0.0/16", mirror.json(root + "/networks/"), mirror.json(root + "/endpoints/"))

desired.desired_firewall(snapshot())  # first pass parses everything; the rest hit the caches
snaps, compiles = [], []
for _ in range(20):
    t0 = time.perf_counter(); s = snapshot(); t1 = time.perf_counter(); desired.desired_firewall(s); t2 = time.perf_counter()
    snaps.append(t1 - t0); compiles.append(t2 - t1)
mirror.stop()
print(json.dumps({"snapshot_ms": statistics.median(snaps) * 1000, "compile_ms": statistics.median(compiles) * 1000}))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,5000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--other", help="another checkout to compare with (e.g. a git worktree of an older commit)")
    _results.add_json_option(parser, "pass_cost")
    args = parser.parse_args()
    trees = {"this": ROOT} | ({"other": args.other} if args.other else {})
    results: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.rounds):
        for n in [int(s) for s in args.sizes.split(",")]:
            for name, tree in trees.items():
                out = subprocess.run([sys.executable, "-c", CHILD, tree, str(n)], capture_output=True, text=True, check=True)
                results.setdefault((name, n), []).append(json.loads(out.stdout))
    rows = []
    for (name, n), runs in sorted(results.items(), key=lambda item: (item[0][1], item[0][0])):
        row = {"tree": name, "endpoints": n,
               "snapshot_ms": round(statistics.median(r["snapshot_ms"] for r in runs), 2),
               "compile_ms": round(statistics.median(r["compile_ms"] for r in runs), 2)}
        rows.append(row)
        print(f"{name:>6} N={n:<6} snapshot {row['snapshot_ms']:6.2f} ms  compile {row['compile_ms']:6.2f} ms")
    print(json.dumps(rows))
    sizes = sorted({n for _, n in results})
    series = {f"{phase} ({name})" if len(trees) > 1 else phase:
              [next(r[f"{phase}_ms"] for r in rows if r["tree"] == name and r["endpoints"] == n) for n in sizes]
              for name in trees for phase in ("snapshot", "compile")}
    _results.save({
        "benchmark": "pass_cost", "params": {"sizes": args.sizes, "rounds": args.rounds, "trees": list(trees)},
        "headline": [_results.headline(f"{r['tree']} N={r['endpoints']} snapshot+compile",
                                       r["snapshot_ms"] + r["compile_ms"], "ms") for r in rows],
        "rows": rows,
        "panels": [{"kind": "line", "title": "compute half of a pass (median per run, median of runs)",
                    "xlabel": "remote endpoints", "ylabel": "ms", "x": sizes, "series": series, "logx": True}],
    }, args.json)


if __name__ == "__main__":
    main()
