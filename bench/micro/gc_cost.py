#!/usr/bin/env python3
"""Micro-benchmark: one collection of the forgotten-endpoint GC (DockerWatch.collect) over a
mirror of N endpoints and N address records of 100 hosts, no Docker and no kernel; two trees
side by side, interleaved, each in a fresh process.

    .venv/bin/python bench/micro/gc_cost.py --trees NEW_TREE,OLD_TREE [--sizes 10000,100000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r'''
import ipaddress, json, os, sys, tempfile, time
sys.path.insert(0, sys.argv[1] + "/plugin")
from canal.agent.docker_watch import DockerWatch
from canal.agent.mirror import Mirror
from canal.datastore.base import Put, dumps
from canal.datastore.keys import Keys
from canal.datastore.local import LocalDatastore

n, rounds = int(sys.argv[2]), int(sys.argv[3])
keys = Keys("/canal/v1", "/coreos.com/network")
store = LocalDatastore(os.path.join(tempfile.mkdtemp(prefix="canal-gc-"), "db"))
base = int(ipaddress.IPv4Address("100.64.0.2"))
ops = []
for i in range(n):
    ip, host, ep = str(ipaddress.IPv4Address(base + i)), f"h{i % 100}", f"{i:064x}"
    ops.append(Put(keys.endpoint(ep), dumps({"id": ep, "network": "5" * 64, "host": host, "ip": ip,
               "mac": "02:42:00:00:00:01", "mtu": 1450, "joined": True, "created": 1.0})))
    ops.append(Put(keys.address(ip), dumps({"ip": ip, "pool": "canal-default", "host": host, "kind": "endpoint",
               "endpoint": ep, "network": "5" * 64, "time": 1.0})))
for start in range(0, len(ops), 5000):
    store.txn([], ops[start:start + 5000])
mirror = Mirror(store, ["/canal/v1/"], lambda: None)
mirror.start()
assert mirror.wait_ready(120)

class Client:
    class api:
        @staticmethod
        def inspect_network(_):
            return {"Containers": {}}

watch = DockerWatch(store, keys, "h0", "unix:///nowhere", records=mirror.records, client_factory=lambda: Client,
                    collect_endpoint=lambda n, e: None, collect_address=lambda p, ip: None, grace=1e12)
known = {f"{i:064x}" for i in range(0, n, 100)}  # h0's endpoints, all known to Docker
watch.collect(known, [])  # warm the mirror's parse caches
times = []
for _ in range(rounds):
    start = time.perf_counter()
    watch.collect(known, [])
    times.append(time.perf_counter() - start)
mirror.stop()
print(json.dumps(times))
'''


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trees", required=True)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    trees = args.trees.split(",")
    for size in [int(s) for s in args.sizes.split(",")]:
        samples: dict[str, list[float]] = {t: [] for t in trees}
        for repeat in range(args.repeats):
            for tree in trees if repeat % 2 == 0 else trees[::-1]:
                out = subprocess.run([sys.executable, "-c", CHILD, tree, str(size), str(args.rounds)],
                                     capture_output=True, text=True, check=True).stdout
                samples[tree] += json.loads(out)
        for tree in trees:
            print(f"N={size} {tree}: one collection p50 {1000 * statistics.median(samples[tree]):.1f} ms "
                  f"({len(samples[tree])} runs)")


if __name__ == "__main__":
    main()
