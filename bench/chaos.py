#!/usr/bin/env python3
"""Chaos campaign (issue 12, faults under load): the long forms of tests/e2e/test_faults.py.
Two etcd-backed hosts (real dockerd, kernel, plugin) plus, for the disk-full rounds, one host on
the embedded datastore; every fault is followed by the invariant checker of
tests/e2e/chaos_support.py until it finds nothing (the recovery time) or gives up (violations).

    .venv/bin/python bench/chaos.py [--kill-rounds 20] [--containers 50] [--rounds 3] [--outage 60]
                                    [--seed N] [--json bench/results/chaos.json]

Every round's seed is printed and kept in the JSON: `--only SCENARIO --seed S --kill-rounds 1`
replays one. The results table (scenario, rounds, violations, recovery) is printed as Markdown
for the README.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..", "tests", "e2e"),
                os.path.join(HERE, "..", "plugin")]

import _results  # noqa: E402
from chaos_support import (  # noqa: E402
    Bed,
    Outcome,
    scenario_disk_full,
    scenario_dockerd,
    scenario_etcd_stop,
    scenario_host_gone,
    scenario_kill,
    scenario_partition,
)

from testbed import IMAGE, Etcd, SimHost, Underlay  # noqa: E402

CLUSTER = "100.64.0.0/16"
TTL, GRACE = 10, 5


def etcd_args(host: SimHost, etcd: Etcd, absence: float) -> list[str]:
    """--host-absence beyond the outages: a host cut off for them is away, not gone."""
    return ["--datastore", "etcd", "--etcd-endpoints", etcd.endpoint, "--etcd-timeout", "2", "--network", CLUSTER,
            "--lease-ttl", str(TTL), "--resync-interval", "5", "--gc-grace", str(GRACE),
            "--host-absence", f"{absence:g}", "--docker-host", f"unix://{host.docker_sock}"]


def local_host(ul: Underlay) -> tuple[SimHost, str, list[str]]:
    """A host on the embedded datastore whose state dir is a 3 MB tmpfs in its own mount ns."""
    host = SimHost(ul, "s1", "198.18.0.20")
    state = str(host.workdir / "canal")
    host.exec(["mkdir", "-p", state])
    host.exec(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "cnlt-state", state])
    host.start_dockerd()
    host.load_image()
    args = ["--network", CLUSTER, "--resync-interval", "5", "--gc-grace", str(GRACE),
            "--docker-host", f"unix://{host.docker_sock}"]
    host.start_plugin(args)
    host.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "chaos")
    for i in range(3):
        host.docker("run", "-d", "--name", f"pre{i}", "--network", "chaos", IMAGE, "sleep", "100000")
    return host, state, args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kill-rounds", type=int, default=20, help="rounds of kill -9 during runs/removals")
    parser.add_argument("--containers", type=int, default=50, help="containers started per kill round (all hosts)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every other scenario")
    parser.add_argument("--outage", type=float, default=60, help="seconds etcd is frozen / a host is partitioned")
    parser.add_argument("--seed", type=int, default=None, help="master seed (default: random, printed)")
    parser.add_argument("--only", default="", help="comma-separated scenario keys: kill,dockerd,etcd,partition,gone,disk")
    _results.add_json_option(parser, "chaos")
    args = parser.parse_args()
    master = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"master seed {master}", flush=True)
    rng = random.Random(master)
    only = set(filter(None, args.only.split(",")))
    outcomes: list[Outcome] = []
    started = time.monotonic()
    absence = max(30.0, 2 * args.outage)
    ul = Underlay()
    try:
        etcd = Etcd(ul)
        hosts = []
        for i in (1, 2):
            h = SimHost(ul, f"c{i}", f"198.18.0.{i}")
            h.start_dockerd()
            h.load_image()
            h.start_plugin(etcd_args(h, etcd, absence))
            hosts.append(h)
        bed = Bed(etcd, hosts, lambda h: etcd_args(h, etcd, absence), grace=GRACE, underlay=ul)
        bed.setup()
        found, took = bed.settle(90)
        if found:
            raise SystemExit("not consistent before any fault:\n" + "\n".join(map(str, found)))
        plan: list[tuple[str, int, Callable[[int], Outcome]]] = [
            ("kill", args.kill_rounds, lambda s: scenario_kill(bed, s, count=args.containers)),
            ("dockerd", args.rounds, lambda s: scenario_dockerd(bed, s, live_restore=True)),
            ("dockerd", args.rounds, lambda s: scenario_dockerd(bed, s, live_restore=False)),
            ("etcd", args.rounds, lambda s: scenario_etcd_stop(bed, s, outage=args.outage)),
            ("partition", args.rounds, lambda s: scenario_partition(bed, s, outage=args.outage)),
            ("gone", args.rounds, lambda s: scenario_host_gone(bed, s)),
        ]
        for key, rounds, run in plan:
            if only and key not in only:
                continue
            for _ in range(rounds):
                seed = rng.randrange(1 << 30) if args.seed is None or rounds > 1 else args.seed
                outcome = run(seed)
                report(outcome)
                outcomes.append(outcome)
                bed.ensure_up()
                bed.clear_churn()
        if not only or "disk" in only:
            local, state, local_args = local_host(ul)
            for _ in range(args.rounds):
                seed = rng.randrange(1 << 30)
                outcome = scenario_disk_full(local, seed, state, local_args, GRACE)
                report(outcome)
                outcomes.append(outcome)
    finally:
        ul.close()
    table = summarize(outcomes)
    print(f"\n{len(outcomes)} rounds in {time.monotonic() - started:.0f} s, master seed {master}\n")
    print("| scenario | rounds | invariant violations | recovery p50 / max |\n|---|---|---|---|")
    for row in table:
        print(f"| {row['scenario']} | {row['rounds']} | {row['violations']} | "
              f"{row['recovery_p50']:.1f} / {row['recovery_max']:.1f} s |")
    _results.save({
        "benchmark": "chaos",
        "params": {"kill_rounds": args.kill_rounds, "containers": args.containers, "rounds": args.rounds,
                   "outage": args.outage, "seed": master},
        "headline": [h for row in table for h in (
            _results.headline(f"{row['scenario']}: violations", row["violations"], "", "0"),
            _results.headline(f"{row['scenario']}: recovery p50", row["recovery_p50"], "s"))],
        "panels": [
            {"kind": "bars", "title": "recovery after the fault (p50, max)", "ylabel": "s",
             "categories": [r["scenario"] for r in table],
             "series": {"p50": [r["recovery_p50"] for r in table], "max": [r["recovery_max"] for r in table]}},
            {"kind": "bars", "title": "invariant violations left", "ylabel": "count",
             "categories": [r["scenario"] for r in table], "series": {"violations": [r["violations"] for r in table]}},
        ],
        "table": table,
        "rounds": [{"scenario": o.scenario, "seed": o.seed, "violations": [str(v) for v in o.violations],
                    "recovery": round(o.recovery, 2), "note": o.note} for o in outcomes],
    }, args.json)


def report(o: Outcome) -> None:
    print(f"{o.scenario:36} seed {o.seed:>10}  violations {len(o.violations):2}  recovery {o.recovery:6.1f} s  {o.note}",
          flush=True)
    for v in o.violations[:10]:
        print(f"    {v}", flush=True)


def summarize(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    rows = []
    for name in dict.fromkeys(o.scenario for o in outcomes):
        mine = [o for o in outcomes if o.scenario == name]
        recoveries = [o.recovery for o in mine]
        rows.append({"scenario": name, "rounds": len(mine), "violations": sum(len(o.violations) for o in mine),
                     "recovery_p50": round(statistics.median(recoveries), 1), "recovery_max": round(max(recoveries), 1)})
    return rows


if __name__ == "__main__":
    main()
