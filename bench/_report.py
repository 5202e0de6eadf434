"""What bench/report runs, with the venv's Python, once the shell wrapper has installed what the
test bed needs.

Run every benchmark in a quick but meaningful configuration, one after the other (they share
the machine's cores: never in parallel), regenerate bench/results/<name>.json and .png, and print
a summary table of their headline figures. Needs root (the benchmarks build simulated hosts in
namespaces); run it on an otherwise idle machine.

    bench/report [--only NAME,...] [--skip NAME,...] [--replot] [--python PATH]

A failing benchmark does not stop the others; the exit status is 1 if any failed (its previous
JSON and PNG, if any, stay as they were).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _results  # noqa: E402

# name -> (arguments, why these, minutes measured on 2 cores; 6.2 in all, swarm's plugin rebuild included). In this order: cheap and
# kernel-free first, the managed-plugin build (swarm) last.
PLAN: dict[str, tuple[list[str], str, float]] = {
    "pass_cost": (["--sizes", "500,1000,2000,5000", "--rounds", "3"], "compute half of a pass, 4 sizes", 0.2),
    "single_host": (["-n", "20"], "20 docker runs per network, interleaved", 0.4),
    "label_window": (["-n", "50"], "50 rounds, one container each", 0.6),
    "multinet": (["-n", "10"], "10 rounds of the three pairs", 0.8),
    "policy": (["--sizes", "100,1000,5000", "--policies", "10", "--runs", "10"],
               "N = 100, 1,000, 5,000 synthetic endpoints, 10 policies, 10 runs per figure", 0.5),
    "multihost": (["--seconds", "3", "--repeat", "3"], "iperf3 3 s x 3 per path, interleaved; 20 pings", 1.1),
    "ipv6": (["--seconds", "3", "--repeat", "3"], "iperf3 3 s x 3 per family, interleaved; 20 pings", 0.6),
    "swarm": (["--replicas", "20", "--rounds", "2"],
              "20 replicas, 2 rounds per network (+ plugin build when the tree changed)", 2.7),
}


def plan_text() -> str:
    lines = [f"benchmarks and their parameters (about {sum(m for _, _, m in PLAN.values()):.0f} minutes on 2 cores,"
             " swarm's rebuild of the managed plugin after a change of the tree included):"]
    for name, (argv, why, _) in PLAN.items():
        lines.append(f"  {name + '.py':16} {' '.join(argv):45} {why}")
    return "\n".join(lines)


def names(value: str) -> list[str]:
    chosen = [n for n in value.split(",") if n]
    unknown = [n for n in chosen if n not in PLAN]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown benchmark {', '.join(unknown)} (known: {', '.join(PLAN)})")
    return chosen


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def summary(selected: list[str], took: dict[str, float], failed: dict[str, str]) -> str:
    rows = [["benchmark", "metric", "value", "target", "run time"]]
    for name in selected:
        spent = f"{took[name]:.0f} s" if name in took else ""
        if name in failed:
            rows.append([name, f"FAILED: {failed[name]}", "", "", spent])
            continue
        path = _results.default_path(name)
        if not os.path.exists(path):
            rows.append([name, "(no results yet)", "", "", spent])
            continue
        for i, h in enumerate(_results.load(path)["headline"]):
            value = f"{h['value']:g} {h['unit']}".strip()
            rows.append([name if i == 0 else "", h["metric"], value, h.get("target", ""), spent if i == 0 else ""])
    return table(rows)


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/report", description=__doc__.split("\n\n", 1)[1], epilog=plan_text(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=names, default=list(PLAN), help="comma-separated benchmarks to run")
    parser.add_argument("--skip", type=names, default=[], help="comma-separated benchmarks to leave out")
    parser.add_argument("--replot", action="store_true", help="redraw the PNGs from the existing JSON; measure nothing")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the benchmarks (default: this one)")
    args = parser.parse_args()
    selected = [n for n in PLAN if n in args.only and n not in args.skip]
    took: dict[str, float] = {}
    failed: dict[str, str] = {}
    if args.replot:
        for name in selected:
            path = _results.default_path(name)
            if os.path.exists(path):
                _results.render(_results.load(path), _results.png_path(path))
                print(f"redrew {_results.png_path(path)}")
    else:
        if os.geteuid() != 0:
            parser.error("the benchmarks need root (namespaces, dockerd, iptables)")
        started = time.perf_counter()
        for name in selected:
            argv, _, _ = PLAN[name]
            command = [args.python, os.path.join(HERE, f"{name}.py"), *argv, "--json", _results.default_path(name)]
            print(f"=== {name}: {' '.join(command[1:])}", flush=True)
            t0 = time.perf_counter()
            rc = subprocess.run(command).returncode
            took[name] = time.perf_counter() - t0
            if rc != 0:
                failed[name] = f"exit status {rc}"
            print(f"=== {name}: {'failed' if rc else 'done'} in {took[name]:.0f} s", flush=True)
        print(f"\nall benchmarks: {time.perf_counter() - started:.0f} s\n")
    print(summary(selected, took, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
