#!/usr/bin/env python3
"""Benchmark (issue 9): the label window. An endpoint is closed (its egress chain ends in a bare
DROP) until the plugin has learned its container's labels and network name from Docker's API,
which lists a container only once it has started. This measures how long that lasts after
`docker run -d` returns: from the CLI's return to the endpoint's CANAL-FW-<id12> chain leaving
the pending state in the kernel (iptables-nft-save polled every 5 ms, read the way
tests/e2e/e2e_support.is_open reads it).

One simulated host (tests/testbed), one canal network, one container at a time (removed, and its
chains gone, before the next round), nothing else interleaved.

    .venv/bin/python bench/label_window.py [-n 100] [--json bench/results/label_window.json]

Prints a text summary and one JSON line (p50/p99/max in ms); writes the summary and every
round's window as JSON and a plot next to it (.png).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..", "tests", "e2e"), os.path.join(HERE, "..", "plugin")]

import _results  # noqa: E402
from e2e_support import chain_open  # noqa: E402
from testbed import IMAGE, SimHost, Underlay, enter_netns, wait_until  # noqa: E402

NETWORK = "lwnet"
POLL = 0.005


def fw_chains() -> dict[str, list[str]]:
    """Rules of every endpoint egress chain CANAL-FW-<id12>, by id12."""
    saved = subprocess.run(["iptables-nft-save", "-t", "filter"], capture_output=True, text=True,
                           check=True, timeout=10).stdout
    chains: dict[str, list[str]] = {}
    for line in saved.splitlines():
        if line.startswith("-A CANAL-FW-"):
            chains.setdefault(line.split()[1][len("CANAL-FW-"):], []).append(line)
    return chains


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def one_round(host: SimHost, i: int) -> dict[str, float | bool | str]:
    name = f"lw{i}"
    started = time.perf_counter()
    host.docker("run", "-d", "--name", name, "--network", NETWORK, "--label", f"round={i}",
                IMAGE, "sleep", "100000")
    returned = time.perf_counter()
    polls, pending_seen, found = 0, False, ""
    while True:
        tick = time.perf_counter()
        chains = fw_chains()
        polls += 1
        opened = [c for c, rules in chains.items() if chain_open(rules)]
        pending_seen = pending_seen or (bool(chains) and not opened)
        if opened:
            found = opened[0]
            break
        if tick - returned > 30:
            raise RuntimeError(f"{name}: endpoint not open 30 s after docker run returned")
        time.sleep(max(0.0, POLL - (time.perf_counter() - tick)))
    window = time.perf_counter() - returned
    # Afterwards (not in the window): the chain seen open is this container's endpoint.
    networks = host.docker_json("inspect", name)[0]["NetworkSettings"]["Networks"]
    endpoint = networks[NETWORK]["EndpointID"]
    if endpoint[:12] != found:
        raise RuntimeError(f"{name}: the open chain CANAL-FW-{found} is not its endpoint {endpoint[:12]}")
    host.docker("rm", "-f", name)
    wait_until(lambda: not fw_chains(), timeout=15, what=f"{name}'s chains removed")
    return {"window": window, "docker_run": returned - started, "polls": polls,
            "open_at_first_poll": polls == 1, "pending_seen": pending_seen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=100, help="rounds (one container each)")
    _results.add_json_option(parser, "label_window")
    args = parser.parse_args()
    ul = Underlay()
    try:
        host = SimHost(ul, "lw1", "198.18.0.1")
        host.start_dockerd(["-H", "unix:///run/docker.sock"])  # where the plugin reads Docker's API
        host.load_image()
        host.start_plugin(["--network", "100.64.0.0/16", "--log-level", "info"])
        host.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", NETWORK)
        enter_netns(host.netns_path)
        one_round(host, 0)  # warm-up (image, first endpoint): not counted
        results = [one_round(host, i) for i in range(1, args.n + 1)]
        windows = [float(r["window"]) * 1000 for r in results]
        runs = [float(r["docker_run"]) * 1000 for r in results]
        summary = {
            "benchmark": "label_window", "rounds": len(results), "poll_ms": POLL * 1000,
            "p50_ms": round(pct(windows, 0.50), 1), "p90_ms": round(pct(windows, 0.90), 1), "p99_ms": round(pct(windows, 0.99), 1),
            "max_ms": round(max(windows), 1), "min_ms": round(min(windows), 1),
            "mean_ms": round(statistics.mean(windows), 1),
            "over_100_ms": sorted(round(w) for w in windows if w > 100),
            "open_at_first_poll": sum(bool(r["open_at_first_poll"]) for r in results),
            "pending_seen": sum(bool(r["pending_seen"]) for r in results),
            "docker_run_p50_ms": round(pct(runs, 0.50), 1),
        }
        print(f"label window (docker run -d returned -> endpoint open in the kernel), {len(results)} rounds:")
        print(f"  p50 {summary['p50_ms']} ms   p90 {summary['p90_ms']} ms   p99 {summary['p99_ms']} ms   max {summary['max_ms']} ms"
              f"   (min {summary['min_ms']} ms, mean {summary['mean_ms']} ms; poll every {POLL * 1000:.0f} ms)")
        print(f"  rounds over 100 ms: {summary['over_100_ms']}")
        print(f"  already open at the first poll: {summary['open_at_first_poll']}; seen pending first: "
              f"{summary['pending_seen']}; docker run -d itself p50 {summary['docker_run_p50_ms']} ms")
        print(json.dumps(summary))
        _results.save({
            **summary, "params": {"n": args.n, "poll_ms": POLL * 1000},
            "headline": [_results.headline("window p50", summary["p50_ms"], "ms"),
                         _results.headline("window p99", summary["p99_ms"], "ms"),
                         _results.headline("seen pending first", summary["pending_seen"], f"of {len(results)}")],
            "panels": [
                {"kind": "box", "title": "docker run -d returned -> endpoint open", "ylabel": "ms",
                 "series": {"label window": [round(w, 2) for w in windows]}},
                {"kind": "box", "title": "docker run -d itself", "ylabel": "ms",
                 "series": {"docker run -d": [round(r, 2) for r in runs]}},
            ],
        }, args.json)
    finally:
        ul.close()


if __name__ == "__main__":
    main()
