#!/usr/bin/env python3
"""Benchmark (issue 4): policy at scale, on a real host with etcd, in namespaces only.

With N synthetic endpoints on other (simulated) hosts written to etcd (100, 1,000, 5,000 by
default) and P policies:
  - apply -> in force: `canal policy apply` round trip (it returns once this host's rules are
    programmed), p50/max over repeated applies that change a policy;
  - join -> peer ipset: a new remote endpoint record until this host's selector ipset holds it;
  - iptables rules of ours as N grows (must stay flat);
and, with real containers, `docker run -d` returning -> the container's labels in force (its
address in the selector ipset of the policy that allows it).

    .venv/bin/python bench/policy.py [--sizes 100,1000,5000] [--policies 10] [--runs 20]
                                     [--json bench/results/policy.json]

Writes the figures per N as JSON and a plot next to it (.png): the scaling curves, the rule
count, and the labels-in-force distribution.

Targets at 1,000 endpoints: apply in force <= 200 ms; join -> peer ipset <= 100 ms.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..", "plugin")]

from canal.cli.client import AdminClient  # noqa: E402
from canal.datastore.base import Put, dumps  # noqa: E402
from canal.datastore.etcd import EtcdDatastore  # noqa: E402
from canal.policy.compiler import scoped_selector, selector_set  # noqa: E402
import _results  # noqa: E402
from testbed import IMAGE, Etcd, SimHost, Underlay, enter_netns  # noqa: E402

NETWORK = "appnet"
SYNTHETIC_NET = "5" * 64  # the synthetic hosts' Docker network ID (a libnetwork-shaped ID)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def policy(i: int, extra: int = 0) -> dict:
    return {
        "apiVersion": "canal/v1", "kind": "NetworkPolicy",
        "metadata": {"name": f"p{i}", "network": NETWORK},
        "spec": {"order": 100 + i + extra, "selector": f"role == 'r{i}'", "ingress": [
            {"action": "Allow", "protocol": "TCP", "source": {"selector": f"role == 'c{i}'"},
             "destination": {"ports": [8000 + i]}}]},
    }


def synthetic(n_from: int, n_to: int, policies: int) -> list[tuple[str, dict]]:
    out = []
    base = int(ipaddress.IPv4Address("100.64.128.0"))
    for i in range(n_from, n_to):
        ep_id = f"{i:064x}"
        out.append((f"/canal/v1/endpoints/{ep_id}", {
            "id": ep_id, "network": SYNTHETIC_NET, "host": f"synthetic{i % 20}",
            "ip": str(ipaddress.IPv4Address(base + i)), "mac": "02:42:00:00:00:00", "mtu": 1450,
            "joined": True, "labels": {"role": f"c{i % policies}"},
        }))
    return out


def write(store: EtcdDatastore, items: list[tuple[str, dict]]) -> None:
    for start in range(0, len(items), 100):
        store.txn([], [Put(k, dumps(v)) for k, v in items[start:start + 100]])


def in_set(host: SimHost, name: str, ip: str) -> bool:
    return host.exec(["ipset", "test", name, ip], check=False).returncode == 0


def wait_in_set(host: SimHost, name: str, ip: str, timeout: float = 30) -> float:
    started = time.perf_counter()
    while not in_set(host, name, ip):
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"{ip} never reached ipset {name}")
    return time.perf_counter() - started


def rule_count(host: SimHost) -> int:
    save = host.exec(["iptables-nft-save"]).stdout
    return sum(1 for line in save.splitlines() if line.startswith("-A CANAL"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,5000")
    parser.add_argument("--policies", type=int, default=10)
    parser.add_argument("--runs", type=int, default=20)
    _results.add_json_option(parser, "policy")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    ul = Underlay()
    try:
        etcd = Etcd(ul)
        host = SimHost(ul, "b1", "198.18.0.1")
        host.start_dockerd(["-H", "unix:///run/docker.sock"])
        host.load_image()
        host.start_plugin(["--datastore", "etcd", "--etcd-endpoints", etcd.endpoint, "--network", "100.64.0.0/16"])
        enter_netns(host.netns_path)
        store = EtcdDatastore(etcd.endpoint)
        admin = AdminClient(host.plugin_socket)
        host.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", NETWORK)
        # The synthetic endpoints belong to a network of the same name on each synthetic host.
        for h in range(20):
            store.put(f"/canal/v1/networks/synthetic{h}/{SYNTHETIC_NET}", {
                "id": SYNTHETIC_NET, "pools": ["0.0.0.0/0"], "internal": False, "nat": True, "mtu": 0,
                "host": f"synthetic{h}", "name": NETWORK})
        for i in range(args.policies):  # one local container selected by each policy
            host.docker("run", "-d", "--name", f"r{i}", "--network", NETWORK, "--label", f"role=r{i}", IMAGE, "sleep", "100000")
        admin.post("/canal/v1/policies", {"documents": "\n---\n".join(json.dumps(policy(i)) for i in range(args.policies))})
        written = 0
        rows: list[dict] = []
        print(f"P={args.policies} policies, {args.policies} local containers; synthetic endpoints on 20 other hosts")
        print(f"{'N':>6} {'apply p50':>10} {'apply max':>10} {'join p50':>9} {'join p99':>9} {'rules':>6}")
        for n in sizes:
            write(store, synthetic(written, n, args.policies))
            written = n
            set0 = selector_set(scoped_selector("role == 'c0'", NETWORK))
            _, last = synthetic(n - 1, n, args.policies)[0]
            wait_in_set(host, selector_set(scoped_selector(f"role == '{last['labels']['role']}'", NETWORK)), last["ip"])
            applies = []
            for run in range(args.runs):
                started = time.perf_counter()
                admin.post("/canal/v1/policies", {"documents": json.dumps(policy(run % args.policies, extra=run + n))})
                applies.append(time.perf_counter() - started)
            joins = []
            for run in range(args.runs):
                key, record = synthetic(100000 + run, 100001 + run, args.policies)[0]
                record["ip"] = str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("100.65.0.0")) + n + run))
                record["labels"] = {"role": "c0"}
                started = time.perf_counter()
                store.put(key, record)
                joins.append(wait_in_set(host, set0, record["ip"]))
                store.delete(key)
                while in_set(host, set0, record["ip"]):  # one change at a time: settle first
                    time.sleep(0.005)
            rows.append({"endpoints": n, "apply_p50_ms": round(statistics.median(applies) * 1000, 2),
                         "apply_max_ms": round(max(applies) * 1000, 2),
                         "join_p50_ms": round(statistics.median(joins) * 1000, 2),
                         "join_p99_ms": round(pct(joins, 0.99) * 1000, 2), "rules": rule_count(host),
                         "apply_ms": _results.ms(applies), "join_ms": _results.ms(joins)})
            row = rows[-1]
            print(f"{n:6d} {row['apply_p50_ms']:8.1f}ms {row['apply_max_ms']:8.1f}ms "
                  f"{row['join_p50_ms']:7.1f}ms {row['join_p99_ms']:7.1f}ms {row['rules']:6d}")
        # docker run -d returning -> the new container's labels in force.
        label_set = selector_set(scoped_selector("role == 'c0'", NETWORK))
        waits = []
        for run in range(args.runs):
            name = f"lbl{run}"
            host.docker("run", "-d", "--name", name, "--network", NETWORK, "--label", "role=c0", IMAGE, "sleep", "100000")
            started = time.perf_counter()
            address = host.docker_json("inspect", name)[0]["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]
            wait_in_set(host, label_set, address)
            waits.append(time.perf_counter() - started)
            host.docker("rm", "-f", name)
        print(f"docker run -d -> labels in force: p50 {statistics.median(waits) * 1000:.0f} ms, "
              f"p99 {pct(waits, 0.99) * 1000:.0f} ms (n={len(waits)})")
        print("targets at 1,000 endpoints: apply <= 200 ms, join -> peer ipset <= 100 ms")
        at, last = max(sizes), rows[-1]
        ref = next((r for r in rows if r["endpoints"] == 1000), last)  # the targets are set at 1,000

        def curve(key: str) -> list[float]:
            return [r[key] for r in rows]
        _results.save({
            "benchmark": "policy", "params": {"sizes": args.sizes, "policies": args.policies, "runs": args.runs},
            "headline": [
                _results.headline(f"apply -> in force p50 (N={ref['endpoints']})", ref["apply_p50_ms"], "ms",
                                  "<= 200 at N=1000"),
                _results.headline(f"remote join -> ipset p50 (N={ref['endpoints']})", ref["join_p50_ms"], "ms",
                                  "<= 100 at N=1000"),
                _results.headline(f"apply -> in force p50 (N={at})", last["apply_p50_ms"], "ms"),
                _results.headline(f"remote join -> ipset p50 (N={at})", last["join_p50_ms"], "ms"),
                _results.headline(f"CANAL rules added from N={sizes[0]} to N={at}", last["rules"] - rows[0]["rules"], "",
                                  "0 (flat)"),
                _results.headline(f"docker run -> labels in force p50 (N={at})", statistics.median(waits) * 1000, "ms"),
            ],
            "rows": rows, "labels_in_force_ms": _results.ms(waits),
            "panels": [
                {"kind": "line", "title": "policy latency against N", "xlabel": "synthetic remote endpoints",
                 "ylabel": "ms", "x": sizes, "logx": True, "series": {
                     "apply p50": curve("apply_p50_ms"), "apply max": curve("apply_max_ms"),
                     "join -> ipset p50": curve("join_p50_ms"), "join -> ipset p99": curve("join_p99_ms")}},
                {"kind": "line", "title": "CANAL iptables rules against N", "xlabel": "synthetic remote endpoints",
                 "ylabel": "rules", "x": sizes, "logx": True, "series": {"rules": [r["rules"] for r in rows]}},
                {"kind": "box", "title": f"docker run -d -> labels in force (N={at})", "ylabel": "ms",
                 "series": {"labels in force": _results.ms(waits)}},
            ],
        }, args.json)
    finally:
        ul.close()


if __name__ == "__main__":
    main()
