#!/usr/bin/env python3
"""Micro-benchmark: one endpoint joining (its two chains and two dispatch gotos) on a host with
N endpoints, programmed through canal.dataplane.firewall of two trees, interleaved, each in a
network namespace of its own (`unshare -n`: everything dies with it).

    sudo .venv/bin/python bench/micro/dispatch_edit.py --trees NEW_TREE,OLD_TREE [--sizes 150,1500] [--rounds 20]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _interleave import compare, options  # noqa: E402

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
    compare(CHILD, options("150,1500", 20, 3), "join (firewall apply)", netns=True)


if __name__ == "__main__":
    main()
