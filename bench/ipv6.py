#!/usr/bin/env python3
"""Benchmark (issue 13): TCP throughput and ping latency between two containers of one
dual-stack canal network on two hosts (etcd, vxlan, flannel's EnableIPv6: every host leases an
IPv6 /64 beside its IPv4 subnet), in one run, interleaved:

  - ipv4: the IPv4 addresses, through flannel.1;
  - ipv6 (flannel.1): hosts without an IPv6 underlay: IPv6 rides the IPv4 VXLAN tunnel (Canal
    peers route each other's /64 into flannel.1 via the VTEP's link-local address);
  - ipv6 (flannel-v6.1): a second pair of hosts with an IPv6 underlay (2001:2::/64): flannel's
    own dual stack, VXLAN over IPv6.

Namespaces only. .venv/bin/python bench/ipv6.py [--seconds 5] [--repeat 3] [--json bench/results/ipv6.json]

Target: IPv6 >= 0.9 x IPv4 throughput (20 more header bytes per packet; flannel-v6 also 20
more outer bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..", "tests", "e2e"), os.path.join(HERE, "..", "plugin"), HERE]

import _results  # noqa: E402
from multihost import iperf, netns_of, ping_ms  # noqa: E402
from e2e_support import add_ipv6_underlay  # noqa: E402
from testbed import IMAGE, Etcd, SimHost, Underlay, wait_until  # noqa: E402

FLANNEL_CONFIG = {"Network": "100.64.0.0/16", "SubnetLen": 24, "EnableIPv6": True, "IPv6Network": "fd00:6570::/48",
                  "Backend": {"Type": "vxlan", "VNI": 1}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    _results.add_json_option(parser, "ipv6")
    args = parser.parse_args()
    ul = Underlay()
    try:
        etcd = Etcd(ul)
        etcd.etcdctl("put", "/coreos.com/network/config", json.dumps(FLANNEL_CONFIG))
        hosts = [SimHost(ul, f"s{i}", f"198.18.0.{i}") for i in (1, 2, 3, 4)]
        for i, h in enumerate(hosts):
            if i >= 2:
                add_ipv6_underlay(h)  # before the plugin starts: it reads its PublicIPv6 then
            h.start_dockerd()
            h.load_image()
            h.start_plugin(["--datastore", "etcd", "--etcd-endpoints", etcd.endpoint,
                            "--docker-host", f"unix://{h.docker_sock}"])
            h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "--ipv6", "dual")
        targets: dict[str, tuple[SimHost, str]] = {}
        for server, client, v6_name in ((hosts[0], hosts[1], "ipv6 (flannel.1)"), (hosts[2], hosts[3], "ipv6 (flannel-v6.1)")):
            server.docker("run", "-d", "--name", "srv", "--network", "dual", IMAGE, "sleep", "100000")
            client.docker("run", "-d", "--name", "cli", "--network", "dual", IMAGE, "sleep", "100000")
            data = server.docker_json("inspect", "srv")[0]["NetworkSettings"]["Networks"]["dual"]
            if server is hosts[0]:
                targets["ipv4"] = (client, data["IPAddress"])
            targets[v6_name] = (client, data["GlobalIPv6Address"])
            server.exec(["nsenter", netns_of(server, "srv"), "iperf3", "-s", "-D"])  # listens on both families
        for client, target in targets.values():
            wait_until(lambda c=client, t=target: c.exec(["nsenter", netns_of(c, "cli"), "ping", "-c1", "-W1", t],
                                                         check=False).returncode == 0, timeout=30)
        tunnel = hosts[3].ip("-j", "-6", "route", "get", targets["ipv6 (flannel-v6.1)"][1]).stdout
        assert "flannel-v6.1" in tunnel, f"the IPv6-underlay pair does not route via flannel-v6.1: {tunnel}"
        gbps: dict[str, list[float]] = {k: [] for k in targets}
        for _ in range(args.repeat):  # interleaved, so drift hits every path alike
            for name, (client, target) in targets.items():
                gbps[name].append(iperf(client, [netns_of(client, "cli")], target, args.seconds))
        rtts = {name: ping_ms(client, [netns_of(client, "cli")], target) for name, (client, target) in targets.items()}
        lat = {name: statistics.mean(values) for name, values in rtts.items()}
        print(f"TCP throughput (iperf3, {args.seconds}s x {args.repeat}, median) and ping rtt (mean of 20):")
        for name in targets:
            print(f"  {name:20} {statistics.median(gbps[name]):7.2f} Gbit/s   {lat[name]:.3f} ms")
        ratios = {name: statistics.median(gbps[name]) / statistics.median(gbps["ipv4"]) for name in targets if name != "ipv4"}
        for name, ratio in ratios.items():
            print(f"  {name}/ipv4 throughput {ratio:.3f} (target >= 0.9)")
        _results.save({
            "benchmark": "ipv6", "params": {"seconds": args.seconds, "repeat": args.repeat},
            "headline": [
                *(_results.headline(f"{k} throughput median", statistics.median(gbps[k]), "Gbit/s") for k in targets),
                *(_results.headline(f"{k}/ipv4 throughput", r, "", ">= 0.9") for k, r in ratios.items()),
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
