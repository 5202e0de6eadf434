#!/usr/bin/env python3
"""Micro-benchmark: one collection of the forgotten-endpoint GC (DockerWatch.collect) over a
mirror of N endpoints and N address records of 100 hosts, no Docker and no kernel; two trees
side by side, interleaved, each in a fresh process.

    .venv/bin/python bench/micro/gc_cost.py --trees NEW_TREE,OLD_TREE [--sizes 10000,100000] [--rounds 5]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _interleave import compare, options  # noqa: E402

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
    compare(CHILD, options("10000,100000", 5, 2), "one collection", netns=False)


if __name__ == "__main__":
    main()
