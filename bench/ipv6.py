#!/usr/bin/env python3
"""Benchmark (issue 13): TCP throughput and ping latency between two containers of one
dual-stack canal network on two simulated hosts (etcd, vxlan), over IPv4 and over IPv6 in one
run, interleaved (IPv6 rides the same VXLAN tunnel, routed by /128). Namespaces only.

    .venv/bin/python bench/ipv6.py [--seconds 5] [--repeat 3] [--json bench/results/ipv6.json]

Target: IPv6 >= 0.9 x IPv4 throughput (the same tunnel; 20 more header bytes per packet).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..", "plugin"), HERE]

import _results  # noqa: E402
from multihost import iperf, netns_of, ping_ms  # noqa: E402
from testbed import IMAGE, Etcd, SimHost, Underlay, wait_until  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    _results.add_json_option(parser, "ipv6")
    args = parser.parse_args()
    ul = Underlay()
    try:
        etcd = Etcd(ul)
        h1, h2 = (SimHost(ul, f"s{i}", f"198.18.0.{i}") for i in (1, 2))
        for h in (h1, h2):
            h.start_dockerd()
            h.load_image()
            h.start_plugin(["--datastore", "etcd", "--etcd-endpoints", etcd.endpoint,
                            "--network", "100.64.0.0/16", "--docker-host", f"unix://{h.docker_sock}"])
            h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "--ipv6",
                     "--subnet", "fd00:6570::/64", "dual")
        h1.docker("run", "-d", "--name", "srv", "--network", "dual", IMAGE, "sleep", "100000")
        h2.docker("run", "-d", "--name", "cli", "--network", "dual", IMAGE, "sleep", "100000")
        data = h1.docker_json("inspect", "srv")[0]["NetworkSettings"]["Networks"]["dual"]
        targets = {"ipv4": data["IPAddress"], "ipv6": data["GlobalIPv6Address"]}
        h1.exec(["nsenter", netns_of(h1, "srv"), "iperf3", "-s", "-D"])  # listens on both families
        for target in targets.values():
            wait_until(lambda t=target: h2.exec(["nsenter", netns_of(h2, "cli"), "ping", "-c1", "-W1", t],
                                                check=False).returncode == 0, timeout=30)
        gbps: dict[str, list[float]] = {k: [] for k in targets}
        for _ in range(args.repeat):  # interleaved, so drift hits both families alike
            for name, target in targets.items():
                gbps[name].append(iperf(h2, [netns_of(h2, "cli")], target, args.seconds))
        rtts = {name: ping_ms(h2, [netns_of(h2, "cli")], target) for name, target in targets.items()}
        lat = {name: statistics.mean(values) for name, values in rtts.items()}
        print(f"TCP throughput (iperf3, {args.seconds}s x {args.repeat}, median) and ping rtt (mean of 20):")
        for name in targets:
            print(f"  {name:5} {statistics.median(gbps[name]):7.2f} Gbit/s   {lat[name]:.3f} ms")
        ratio = statistics.median(gbps["ipv6"]) / statistics.median(gbps["ipv4"])
        print(f"  ipv6/ipv4 throughput {ratio:.3f} (target >= 0.9)")
        _results.save({
            "benchmark": "ipv6", "params": {"seconds": args.seconds, "repeat": args.repeat},
            "headline": [
                *(_results.headline(f"{k} throughput median", statistics.median(gbps[k]), "Gbit/s") for k in targets),
                _results.headline("ipv6/ipv4 throughput", ratio, "", ">= 0.9"),
                *(_results.headline(f"{k} rtt mean", lat[k], "ms") for k in targets),
            ],
            "panels": [
                {"kind": "box", "title": f"TCP throughput across hosts (iperf3, {args.seconds} s runs)",
                 "ylabel": "Gbit/s", "series": {k: [round(v, 3) for v in gbps[k]] for k in targets}},
                {"kind": "box", "title": "ping rtt across hosts, every reply", "ylabel": "ms", "series": rtts},
            ],
        }, args.json)
    finally:
        ul.close()


if __name__ == "__main__":
    main()
