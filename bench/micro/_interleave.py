"""Shared by the micro-benchmarks that compare trees: every (tree, size) runs a child script in
a fresh process (optionally under `unshare -n`), trees alternating order each repeat, and the
samples (a JSON list of seconds the child prints) are pooled per tree and size."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys


def options(sizes: str, rounds: int, repeats: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trees", required=True, help="comma-separated checkouts to compare")
    parser.add_argument("--sizes", default=sizes)
    parser.add_argument("--rounds", type=int, default=rounds, help="samples per child run")
    parser.add_argument("--repeats", type=int, default=repeats, help="child runs per tree and size")
    return parser.parse_args()


def compare(child: str, args: argparse.Namespace, what: str, netns: bool = False) -> None:
    trees = args.trees.split(",")
    prefix = ["unshare", "-n"] if netns else []
    for size in [int(s) for s in args.sizes.split(",")]:
        samples: dict[str, list[float]] = {t: [] for t in trees}
        for repeat in range(args.repeats):
            for tree in trees if repeat % 2 == 0 else trees[::-1]:
                out = subprocess.run([*prefix, sys.executable, "-c", child, tree, str(size), str(args.rounds)],
                                     capture_output=True, text=True, check=True).stdout
                samples[tree] += json.loads(out)
        for tree in trees:
            t = sorted(samples[tree])
            print(f"N={size} {tree}: {what} p50 {1000 * statistics.median(t):.1f} ms, "
                  f"p90 {1000 * t[int(len(t) * 0.9)]:.1f} ms ({len(t)} samples)")
