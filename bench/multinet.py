#!/usr/bin/env python3
"""Benchmark (issues 14 and 15): what several canal networks per container and published ports
cost, each next to its baseline, interleaved in one run on a simulated host (namespaces only).

    .venv/bin/python bench/multinet.py [-n 15] [--json bench/results/multinet.json]

- `docker network connect` of a second canal network vs of a bridge network (the container
  already on a canal network);
- `docker run -d` with `-p` vs without, on a canal network;
- a new member of `back` started -> first TCP answer from a container on front+back, vs from a
  container on back only (routes in the sandbox vs none needed).

Writes the samples as JSON and a plot next to it (.png): each pair side by side.
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
from e2e_support import start_host, wait_open  # noqa: E402

from testbed import IMAGE, Underlay  # noqa: E402

SERVER = "while true; do echo hi | nc -l -p 80; done & sleep 100000"


def ms(values: list[float]) -> str:
    ordered = sorted(values)
    return f"median {statistics.median(values) * 1000:7.1f} ms   p90 {ordered[int(0.9 * len(ordered))] * 1000:7.1f} ms"


def elapsed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=15, help="rounds (each measures every variant once)")
    _results.add_json_option(parser, "multinet")
    args = parser.parse_args()
    ul = Underlay()
    try:
        h = start_host(ul, "b1", "198.18.0.1", ["--network", "100.64.0.0/16"])
        for name in ("front", "back"):
            h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", name)
        h.docker("network", "create", "-d", "bridge", "br")
        h.docker("run", "-d", "--name", "multi", "--network", "front", IMAGE, "sleep", "100000")
        h.docker("network", "connect", "back", "multi")
        h.docker("run", "-d", "--name", "single", "--network", "back", IMAGE, "sleep", "100000")
        wait_open(h, "multi")
        wait_open(h, "single")
        connect_canal, connect_bridge, run_p, run_plain, reach_multi, reach_single = [], [], [], [], [], []
        for i in range(args.n):
            for network, out in (("back", connect_canal), ("br", connect_bridge)):
                h.docker("run", "-d", "--name", f"c{i}{network}", "--network", "front", IMAGE, "sleep", "100000")
                out.append(elapsed(lambda n=network, c=f"c{i}{network}": h.docker("network", "connect", n, c)))
                h.docker("rm", "-f", f"c{i}{network}")
            for opts, out in ((["-p", f"{20000 + i}:80"], run_p), ([], run_plain)):
                name = f"p{i}{len(opts)}"
                out.append(elapsed(lambda c=name, o=opts: h.docker("run", "-d", "--name", c, "--network", "front", *o,
                                                                   IMAGE, "sleep", "100000")))
                h.docker("rm", "-f", name)
            # A new member of back, then the first answer it gives to each client.
            for client, out in (("multi", reach_multi), ("single", reach_single)):
                name = f"m{i}{client}"
                started = time.perf_counter()
                h.docker("run", "-d", "--name", name, "--network", "back", IMAGE, "sh", "-c", SERVER)
                ip = h.docker("inspect", "-f", "{{.NetworkSettings.Networks.back.IPAddress}}", name).stdout.strip()
                while h.docker("exec", client, "nc", "-w", "1", ip, "80", check=False).stdout.strip() != "hi":
                    if time.perf_counter() - started > 30:
                        raise SystemExit(f"{client} never reached {name}")
                out.append(time.perf_counter() - started)
                h.docker("rm", "-f", name)
        print(f"n={args.n} rounds, variants interleaved")
        print(f"docker network connect, 2nd canal network  {ms(connect_canal)}")
        print(f"docker network connect, bridge network     {ms(connect_bridge)}")
        print(f"  ratio canal/bridge {statistics.median(connect_canal) / statistics.median(connect_bridge):.2f}")
        print(f"docker run -d -p PORT:80 (canal)           {ms(run_p)}")
        print(f"docker run -d (canal)                      {ms(run_plain)}")
        print(f"  ratio -p/plain {statistics.median(run_p) / statistics.median(run_plain):.2f}")
        print(f"new member -> answer, multi-network client  {ms(reach_multi)}")
        print(f"new member -> answer, single-network client {ms(reach_single)}")
        print(f"  ratio multi/single {statistics.median(reach_multi) / statistics.median(reach_single):.2f}")

        def ratio(a: list[float], b: list[float]) -> float:
            return statistics.median(a) / statistics.median(b)
        _results.save({
            "benchmark": "multinet", "params": {"n": args.n},
            "headline": [_results.headline("connect 2nd canal / bridge", ratio(connect_canal, connect_bridge), ""),
                         _results.headline("run -p / plain", ratio(run_p, run_plain), ""),
                         _results.headline("new member -> answer, multi / single", ratio(reach_multi, reach_single), "")],
            "panels": [
                {"kind": "box", "title": "docker network connect", "ylabel": "ms",
                 "series": {"2nd canal net": _results.ms(connect_canal), "bridge": _results.ms(connect_bridge)}},
                {"kind": "box", "title": "docker run -d on canal", "ylabel": "ms",
                 "series": {"-p PORT:80": _results.ms(run_p), "no -p": _results.ms(run_plain)}},
                {"kind": "box", "title": "new member of back -> first answer", "ylabel": "ms",
                 "series": {"front+back client": _results.ms(reach_multi), "back-only client": _results.ms(reach_single)}},
            ],
        }, args.json)
    finally:
        ul.close()


if __name__ == "__main__":
    main()
