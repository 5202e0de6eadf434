#!/usr/bin/env python3
"""Micro-benchmark (issue 12, local scale): Links.reconcile(full=True) over N existing veths, in netns lsx-lnk (made and removed here).
Usage: links_full_pass.py N TREE [TREE...]   (trees alternate, 3 rounds)"""
import os
import subprocess
import sys
NS = "lsx-lnk"
n, trees = int(sys.argv[1]), sys.argv[2:]
CHILD = open(os.environ["CHILD"]).read() if os.environ.get("CHILD") else r'''
import ipaddress, json, sys, time
sys.path.insert(0, sys.argv[1] + "/plugin")
from canal.dataplane.links import Links, EndpointLink
n = int(sys.argv[2])
links = Links("/proc/sys", submit=lambda work: work())
desired = [EndpointLink(f"{i:012x}" + "0" * 52, ipaddress.IPv4Address(int(ipaddress.IPv4Address("100.64.0.2")) + i), "02:42:00:00:00:01", 1500) for i in range(n)]
t = time.perf_counter(); links.reconcile(desired, set(), full=True); first = time.perf_counter() - t  # configures all
runs = []
for _ in range(3):
    t = time.perf_counter(); links.reconcile(desired, set(), full=True); runs.append(time.perf_counter() - t)
t = time.perf_counter(); links.reconcile(desired, set(), full=False); event = time.perf_counter() - t
print(json.dumps({"first_ms": first * 1000, "full_ms": sorted(runs)[1] * 1000, "event_ms": event * 1000}))
'''
subprocess.run(["ip", "netns", "add", NS], check=True)
try:
    batch = "".join(f"link add cnl{i:012x} type veth peer name cnp{i:012x}\n" for i in range(n))
    subprocess.run(["ip", "-n", NS, "-batch", "-"], input=batch, text=True, check=True)
    for _round in range(3):
        for tree in trees:
            out = subprocess.run(["nsenter", f"--net=/run/netns/{NS}", "unshare", "-m", "--propagation", "private", "sh", "-c",
                                  'mount -t sysfs lsx-sys /sys && exec "$0" "$@"', sys.executable, "-c", CHILD, tree, str(n)],
                                 capture_output=True, text=True)
            print(os.path.basename(tree), out.stdout.strip() or out.stderr[-800:], flush=True)
finally:
    subprocess.run(["ip", "netns", "delete", NS])
