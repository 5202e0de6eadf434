#!/usr/bin/env python3
"""Micro-benchmark: one endpoint joining (its two chains and two dispatch gotos) on a host with
N endpoints, programmed through canal.dataplane.firewall of two trees, interleaved, each in a
network namespace of its own (`unshare -n`: everything dies with it).

    sudo .venv/bin/python bench/micro/dispatch_edit.py --trees NEW_TREE,OLD_TREE [--sizes 150,1500] [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r'''
import json, sys, time
sys.path.insert(0, sys.argv[1] + "/plugin")
from canal.dataplane.firewall import Firewall, FirewallState
from canal.dataplane.ipset import Ipsets
from canal.dataplane.iptables import Iptables

n, rounds = int(sys.argv[2]), int(sys.argv[3])

def state(ids):
    chains = {("filter", "CANAL-FROM-WL"): [f"-i cnl{i:012x} -g CANAL-FW-{i:012x}" for i in ids] + ["-j DROP"],
              ("filter", "CANAL-TO-WL"): [f"-o cnl{i:012x} -g CANAL-TW-{i:012x}" for i in ids] + ["-j DROP"]}
    for i in ids:
        ip = f"100.64.{i // 250}.{i % 250 + 2}"
        chains[("filter", f"CANAL-FW-{i:012x}")] = ["-j MARK --set-xmark 0x0/0x30000", f"! -s {ip}/32 -j DROP", "-j ACCEPT"]
        chains[("filter", f"CANAL-TW-{i:012x}")] = ["-j MARK --set-xmark 0x0/0x30000", "-j ACCEPT"]
    return FirewallState(chains=chains)

fw = Firewall(Iptables("nft"), Ipsets())
base = list(range(n))
fw.apply(state(base))
times = []
for r in range(rounds):
    joined = base[: n // 2] + [n + r] + base[n // 2:]
    start = time.perf_counter()
    fw.apply(state(joined), read_back=False)
    times.append(time.perf_counter() - start)
    fw.apply(state(base), read_back=False)  # and it leaves again
print(json.dumps(times))
'''


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trees", required=True)
    parser.add_argument("--sizes", default="150,1500")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    trees = args.trees.split(",")
    results: dict[str, dict[int, list[float]]] = {t: {} for t in trees}
    for size in [int(s) for s in args.sizes.split(",")]:
        for repeat in range(args.repeats):
            for tree in trees if repeat % 2 == 0 else trees[::-1]:
                out = subprocess.run(["unshare", "-n", sys.executable, "-c", CHILD, tree, str(size), str(args.rounds)],
                                     capture_output=True, text=True, check=True).stdout
                results[tree].setdefault(size, []).extend(json.loads(out))
        for tree in trees:
            t = sorted(results[tree][size])
            print(f"N={size} {tree}: join p50 {1000 * statistics.median(t):.1f} ms, "
                  f"p90 {1000 * t[int(len(t) * 0.9)]:.1f} ms ({len(t)} joins)")


if __name__ == "__main__":
    main()
