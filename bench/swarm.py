#!/usr/bin/env python3
"""Benchmark (issue 5): time for a 20-replica service to converge — all tasks running and
reachable from a task on each node — on a canal network vs Docker's overlay network, same two
swarm nodes, same run, interleaved. The managed plugin is built (cached), pushed to a registry
on the underlay and installed on both nodes. Namespaces only.

    .venv/bin/python bench/swarm.py [--replicas 20] [--rounds 2] [--json bench/results/swarm.json]

Writes the convergence times as JSON and a plot next to it (.png).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..", "tests", "e2e"), os.path.join(HERE, "..", "plugin")]

import _results  # noqa: E402
from test_managed_plugin import Registry, plugin_host  # noqa: E402

from testbed import IMAGE, REPO, Etcd, SimHost, Underlay, wait_until  # noqa: E402
from testbed._util import cgroup_dirs, remove_cgroups, run  # noqa: E402


def converge(manager: SimHost, nodes: list[SimHost], network: str, replicas: int, name: str) -> float:
    started = time.perf_counter()
    manager.docker("service", "create", "--detach", "--name", name, "--network", network, "--endpoint-mode", "dnsrr",
                   "--replicas", str(replicas), IMAGE, "sleep", "100000", timeout=120)

    def running() -> list[tuple[SimHost, str, str]]:
        out = []
        for h in nodes:
            for cid in h.docker("ps", "-q", "--filter", f"label=com.docker.swarm.service.name={name}").stdout.split():
                nets = h.docker_json("inspect", cid)[0]["NetworkSettings"]["Networks"]
                out.append((h, cid, nets[network]["IPAddress"]))
        return out if len(out) == replicas else []

    tasks = wait_until(running, timeout=300, interval=0.2, what=f"{replicas} tasks")
    ips = [ip for _, _, ip in tasks]
    probes = {h.name: (h, cid) for h, cid, _ in tasks}.values()  # one task per node
    for h, cid in probes:
        script = " && ".join(f"ping -c1 -W1 {ip} >/dev/null" for ip in ips)
        wait_until(lambda h=h, cid=cid, script=script: h.container_exec(cid, "sh", "-c", script, check=False, timeout=60).returncode == 0,
                   timeout=120, interval=0.2, what="all tasks reachable")
    took = time.perf_counter() - started
    manager.docker("service", "rm", name)
    for h in nodes:
        wait_until(lambda h=h: not h.docker("ps", "-aq").stdout.split(), timeout=120, what="tasks gone")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    _results.add_json_option(parser, "swarm")
    args = parser.parse_args()
    plugin_ids: list[str] = []
    ul = Underlay()
    registry = None
    try:
        etcd = Etcd(ul)
        registry = Registry(ul)
        ref = f"{registry.address}/canal:bench"
        nodes = [plugin_host(ul, f"w{i}", f"198.18.0.{i}", registry) for i in (1, 2)]
        manager, worker = nodes
        run([str(REPO / "scripts" / "build-plugin"), ref], timeout=1800,
            env={"DOCKER_HOST": f"unix://{manager.docker_sock}", "DOCKER_CONFIG": str(manager.workdir / "cli")})
        manager.docker("plugin", "push", ref, timeout=600)
        manager.docker("plugin", "rm", ref)
        for h in nodes:
            h.docker("plugin", "install", "--grant-all-permissions", ref, f"CANAL_ETCD_ENDPOINTS={etcd.endpoint}",
                     "CANAL_DATASTORE=etcd", "CANAL_NETWORK=100.64.0.0/16", "CANAL_SCOPE=global", timeout=600)
            plugin_ids.append(h.docker("plugin", "inspect", "-f", "{{.Id}}", ref).stdout.strip())
        manager.docker("swarm", "init", "--advertise-addr", manager.address)
        token = manager.docker("swarm", "join-token", "-q", "worker").stdout.strip()
        worker.docker("swarm", "join", "--token", token, f"{manager.address}:2377")
        manager.docker("network", "create", "-d", ref, "--ipam-driver", ref, "--attachable", "canalnet")
        manager.docker("network", "create", "-d", "overlay", "--attachable", "--subnet", "100.96.0.0/24", "ovl")
        results: dict[str, list[float]] = {"canal": [], "overlay": []}
        for round_ in range(args.rounds):
            for kind, network in (("canal", "canalnet"), ("overlay", "ovl")):
                results[kind].append(converge(manager, nodes, network, args.replicas, f"{kind}{round_}"))
        c, o = statistics.median(results["canal"]), statistics.median(results["overlay"])
        print(f"{args.replicas}-replica service, create -> all running and reachable from each node "
              f"(median of {args.rounds}):")
        print(f"  canal   {c:6.1f} s   {[round(x, 1) for x in results['canal']]}")
        print(f"  overlay {o:6.1f} s   {[round(x, 1) for x in results['overlay']]}")
        print(f"  ratio canal/overlay {c / o:.2f}")
        _results.save({
            "benchmark": "swarm", "params": {"replicas": args.replicas, "rounds": args.rounds},
            "headline": [_results.headline("canal converge median", c, "s"),
                         _results.headline("overlay converge median", o, "s"),
                         _results.headline("ratio canal/overlay", c / o, "")],
            "panels": [{"kind": "box", "title": f"{args.replicas}-replica service: create -> running and reachable",
                        "ylabel": "s", "series": {k: [round(x, 2) for x in v] for k, v in results.items()}}],
        }, args.json)
    finally:
        for h in list(ul.hosts):
            if h.dockerd_running():
                for svc in h.docker("service", "ls", "-q", check=False).stdout.split():
                    h.docker("service", "rm", svc, check=False)
                h.docker("rm", "-f", *h.docker("ps", "-aq").stdout.split(), check=False)
                h.docker("plugin", "rm", "-f", ref, check=False)
        if registry is not None:
            registry.close()
        ul.close()
        for plugin_id in plugin_ids:
            remove_cgroups(cgroup_dirs(plugin_id))


if __name__ == "__main__":
    main()
