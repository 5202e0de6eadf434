"""A process group's CPU time and memory, from /proc: the plugin under gunicorn is a master and a
worker, and benchmarks charge both to the plugin."""

from __future__ import annotations

import os

TICK = os.sysconf("SC_CLK_TCK")


def group_pids(pgid: int) -> list[int]:
    """Every live process of the process group `pgid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes so far, with that of the children they reaped
    (the ipset, iptables-restore and ip commands the plugin runs); processes gone meanwhile
    count nothing."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp ...
            total += sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
        except OSError:
            continue
    return total / TICK


def _kb_sum(pids: list[int], path: str, field: str) -> int:
    """The sum over the processes of one "Field: N kB" line of /proc/PID/<path>, in bytes."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/{path}") as f:
                for line in f:
                    if line.startswith(field):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of the processes together."""
    return _kb_sum(pids, "status", "VmRSS:")


def pss_bytes(pids: list[int]) -> int:
    """Proportional set size of the processes together: a page shared by gunicorn's master and
    worker (forked, copy on write) or with other processes counts once in the sum, where the
    sum of RSSes counts it in each."""
    return _kb_sum(pids, "smaps_rollup", "Pss:")


def pct(values: list[float], q: float) -> float:
    """The q-quantile of the samples (nearest rank), NaN for none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")
