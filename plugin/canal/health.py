"""Health rules of `canal status`: pure functions of the status dict, so they are unit-tested
and the plugin, the CLI and the docs share one definition.

Exit codes of `canal status` (for scripts and systemd):
  0  healthy: no problem (warnings may be listed)
  1  unhealthy: at least one problem, each listed
  2  the plugin cannot be reached (not running, wrong --socket) or answered an error

Problems (exit 1):
  - the datastore does not answer (status probes it with one read);
  - no reconcile pass has succeeded yet, the last pass failed, or the last good pass is older
    than STALE_PASSES resync intervals (the agent is stuck);
  - multi-host with Canal's own lease: no lease, or its renewal is late (less than a third of
    the TTL left: renewals, every min(resync interval, TTL/3), have failed that long) or it expired;
  - quarantined records (records that failed validation and are ignored until fixed);
  - peers the backend cannot route (a host-gw peer off our L2 segment, an unknown lease type).
Warnings (exit 0): endpoints pending their labels, Docker's API unreachable, peers whose last
renewal is older than two TTLs (the collector removes such hosts).
"""

from __future__ import annotations

from typing import Any

HEALTHY, UNHEALTHY, UNREACHABLE = 0, 1, 2
STALE_PASSES = 3


def evaluate(status: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(problems, warnings) of a status dict as Plugin.status() builds it."""
    problems: list[str] = []
    warnings: list[str] = []
    if status.get("datastore_reachable") is False:
        problems.append(f"datastore {status.get('datastore')} unreachable: {status.get('datastore_error') or 'no answer'}")
    age = status.get("last_pass_age")
    interval = float(status.get("resync_interval") or 30)
    if status.get("last_error"):
        problems.append(f"last reconcile pass failed: {status['last_error']}")
    if age is None:
        if not status.get("last_error"):
            problems.append("no reconcile pass has succeeded yet")
    elif age > STALE_PASSES * interval:
        problems.append(f"no successful reconcile pass for {age:.0f}s (resync every {interval:g}s)")
    lease = status.get("lease")
    if status.get("datastore") == "etcd" and status.get("flannel_mode") != "external":
        if not lease or not lease.get("subnet"):
            problems.append("this host holds no subnet lease")
        elif lease.get("expires_in") is not None:
            ttl = float(lease.get("ttl") or 0)
            left = float(lease["expires_in"])
            if left <= 0:
                problems.append(f"the subnet lease {lease['subnet']} expired {-left:.0f}s ago (renewals failing)")
            elif ttl and left < ttl / 3:
                problems.append(f"the subnet lease {lease['subnet']} expires in {left:.0f}s: renewals are late")
    quarantined = status.get("quarantined") or {}
    if quarantined:
        problems.append(f"{len(quarantined)} datastore record(s) quarantined (ignored until fixed): "
                        + ", ".join(sorted(quarantined)[:5]))
    for problem in (status.get("backend") or {}).get("problems") or []:
        problems.append(f"backend: {problem}")
    pending = status.get("pending_endpoints") or []
    if pending:
        warnings.append(f"{len(pending)} endpoint(s) pending their labels (closed): {', '.join(pending[:5])}")
    if status.get("docker_error"):
        warnings.append(f"Docker's API: {status['docker_error']}")
    ttl = float((lease or {}).get("ttl") or 0)
    for peer in status.get("peers") or []:
        contact = peer.get("last_contact_age")
        if ttl and contact is not None and contact > 2 * ttl:
            warnings.append(f"peer {peer.get('host')} last renewed {contact:.0f}s ago")
    return problems, warnings


def annotate(status: dict[str, Any]) -> dict[str, Any]:
    """The status with its verdict: `health` (healthy/unhealthy), `problems`, `warnings`."""
    problems, warnings = evaluate(status)
    return {**status, "health": "unhealthy" if problems else "healthy", "problems": problems, "warnings": warnings}


def exit_code(status: dict[str, Any]) -> int:
    """From an annotated status (an older plugin without `health`: judged here)."""
    if "health" not in status:
        status = annotate(status)
    return UNHEALTHY if status["health"] != "healthy" else HEALTHY
