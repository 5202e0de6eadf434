#!/usr/bin/env python3
"""Micro-benchmark (issue 12, local scale): Time Ipam.request_address at N addresses already allocated (LocalDatastore), one tree."""
import ipaddress
import json
import os
import statistics
import sys
import tempfile
import time
sys.path.insert(0, os.path.join(sys.argv[1], "plugin"))
from canal.datastore.keys import Keys
from canal.datastore.local import LocalDatastore
from canal.services.ipam import Ipam, LOCAL_SPACE
n = int(sys.argv[2])
store = LocalDatastore(os.path.join(tempfile.mkdtemp(prefix="lsx-ipam-"), "db"))
net = ipaddress.IPv4Network("100.64.64.0/21")
ipam = Ipam(store, Keys("/canal/v1", "/coreos.com/network"), "h1", lambda: net)
pool_id, _, _ = ipam.request_pool(LOCAL_SPACE, "", "", {}, False)
for _ in range(n):
    ipam.request_address(pool_id, "", {})
times = []
for _ in range(30):
    t0 = time.perf_counter()
    ip, _ = ipam.request_address(pool_id, "", {})
    times.append(time.perf_counter() - t0)
    ipam.release_address(pool_id, ip.split("/")[0])
print(json.dumps({"p50_ms": statistics.median(times) * 1000, "max_ms": max(times) * 1000}))
