#!/usr/bin/env python3
"""Benchmark: the compute half of one reconcile pass (mirror -> snapshot -> desired firewall)
with N synthetic remote endpoints, no kernel. Compare two trees side by side, interleaved:

    .venv/bin/python bench/pass_cost.py --sizes 1000,5000 [--other /path/to/older/checkout]
                                        [--json bench/results/pass_cost.json]

Each round runs every (tree, N) in a fresh process, alternating trees; medians per tree.
Writes them as JSON and a plot next to it (.png): snapshot and compile time against N, per tree.

--join: the event-driven pass after ONE remote endpoint joins (10 policies with selectors in
force): the pass snapshot (a tree with canal.agent.index refreshes the endpoint view and updates
the index; an older one re-reads every record), desired_firewall, and the ipset restore script
(written to a fake `run`, no kernel). Reported as snapshot_ms (snapshot) + compile_ms (compile and
ipset script), so both modes share the table and plot.
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

# One remote endpoint joins, then one event-driven pass: what remote join -> local ipset costs.
JOIN = CHILD.split("desired.desired_firewall(snapshot())  #")[0] + r'''
import dataclasses
from canal import records
from canal.dataplane import ipset as ipsetmod
from canal.policy.model import load_documents
policies = tuple(sorted((load_documents(
    f"apiVersion: canal/v1\nkind: GlobalNetworkPolicy\nmetadata: {{name: p{k}}}\nspec:\n  selector: role == 'c{k}'\n"
    f"  ingress:\n    - action: Allow\n      source: {{selector: \"role == 'c{(k + 1) % 10}'\"}}\n")[0] for k in range(10)),
    key=lambda p: p.sort_key))
written = []
ipsetmod.run = lambda argv, input="", **kw: written.append(input)
ipsets = ipsetmod.Ipsets()
ipsets.current = lambda: {}
incremental = hasattr(mirror, "view")
if incremental:
    from canal.agent.index import MembershipIndex
    view = mirror.view(root + "/endpoints/", records.endpoint_entry)
    index = MembershipIndex("h1")

def pass_snapshot():
    if not incremental:
        return dataclasses.replace(snapshot(), policies=policies)
    networks = mirror.records(root + "/networks/", records.network_entry)
    index.update(view, view.refresh(), networks, False)
    return desired.Snapshot("h1", "100.64.0.0/16", networks, view, policies=policies, index=index)

ipsets.apply(desired.desired_firewall(pass_snapshot()).ipsets, read_back=True)
local = f"{2**255:064x}"
store.txn([], [Put(f"{root}/endpoints/{local}", dumps({"id": local, "network": net, "host": "h1",
    "ip": "100.64.0.2", "mac": "02:42:00:00:00:00", "mtu": 1450, "joined": True, "labels": {"role": "c3"},
    "created": 1.0}))])
ipsets.apply(desired.desired_firewall(pass_snapshot()).ipsets, read_back=False)
snaps, compiles, lines = [], [], []
for j in range(20):
    ep = f"{2**254 + j:064x}"
    store.txn([], [Put(f"{root}/endpoints/{ep}", dumps({"id": ep, "network": net, "host": "synthetic1",
        "ip": str(ipaddress.IPv4Address(base + n + j)), "mac": "02:42:00:00:00:00", "mtu": 1450, "joined": True,
        "labels": {"role": f"c{j % 10}"}, "created": 1.0}))])
    written.clear()
    t0 = time.perf_counter(); s = pass_snapshot(); t1 = time.perf_counter()
    ipsets.apply(desired.desired_firewall(s).ipsets, read_back=False); t2 = time.perf_counter()
    snaps.append(t1 - t0); compiles.append(t2 - t1); lines.append(sum(w.count("\n") for w in written))
full_ms = 0.0
if incremental:  # the timer's pass also computes from scratch and compares (canal.agent.agent._checked)
    from canal.agent.agent import Agent
    checks = []
    for _ in range(5):
        state = desired.desired_firewall(s)
        t0 = time.perf_counter()
        assert Agent._checked(None, s, state) is state, "incremental state differs from the full computation"
        checks.append(time.perf_counter() - t0)
    full_ms = statistics.median(checks) * 1000
mirror.stop()
print(json.dumps({"snapshot_ms": statistics.median(snaps) * 1000, "compile_ms": statistics.median(compiles) * 1000,
                  "ipset_lines": statistics.median(lines), "full_check_ms": full_ms}))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,5000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--other", help="another checkout to compare with (e.g. a git worktree of an older commit)")
    parser.add_argument("--join", action="store_true", help="measure one remote join's event-driven pass instead")
    _results.add_json_option(parser, "pass_cost")
    args = parser.parse_args()
    trees = {"this": ROOT} | ({"other": args.other} if args.other else {})
    results: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.rounds):
        for n in [int(s) for s in args.sizes.split(",")]:
            for name, tree in trees.items():
                out = subprocess.run([sys.executable, "-c", JOIN if args.join else CHILD, tree, str(n)], capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{name} N={n} failed:\n{out.stderr[-3000:]}")
                results.setdefault((name, n), []).append(json.loads(out.stdout))
    rows = []
    for (name, n), runs in sorted(results.items(), key=lambda item: (item[0][1], item[0][0])):
        row = {"tree": name, "endpoints": n,
               "snapshot_ms": round(statistics.median(r["snapshot_ms"] for r in runs), 2),
               "compile_ms": round(statistics.median(r["compile_ms"] for r in runs), 2)}
        rows.append(row)
        if "ipset_lines" in runs[0]:
            row["ipset_lines"] = statistics.median(r["ipset_lines"] for r in runs)
            row["full_check_ms"] = round(statistics.median(r["full_check_ms"] for r in runs), 2)
        print(f"{name:>6} N={n:<6} snapshot {row['snapshot_ms']:6.2f} ms  compile {row['compile_ms']:6.2f} ms"
              + (f"  ipset restore lines {row['ipset_lines']}  (full pass check {row['full_check_ms']:.1f} ms)"
                 if "ipset_lines" in row else ""))
    print(json.dumps(rows))
    sizes = sorted({n for _, n in results})
    series = {f"{phase} ({name})" if len(trees) > 1 else phase:
              [next(r[f"{phase}_ms"] for r in rows if r["tree"] == name and r["endpoints"] == n) for n in sizes]
              for name in trees for phase in ("snapshot", "compile")}
    _results.save({
        "benchmark": "pass_cost", "params": {"sizes": args.sizes, "rounds": args.rounds, "trees": list(trees),
                                             "join": args.join},
        "headline": [_results.headline(f"{r['tree']} N={r['endpoints']} snapshot+compile",
                                       r["snapshot_ms"] + r["compile_ms"], "ms") for r in rows],
        "rows": rows,
        "panels": [{"kind": "line", "title": "compute half of a pass (median per run, median of runs)",
                    "xlabel": "remote endpoints", "ylabel": "ms", "x": sizes, "series": series, "logx": True}],
    }, args.json)


if __name__ == "__main__":
    main()
