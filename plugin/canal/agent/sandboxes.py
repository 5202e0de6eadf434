"""Containers on several canal networks: which destinations each of their interfaces carries.

All canal networks of a host draw from its leased subnet (and, across hosts, from the one
cluster network), so a destination prefix does not tell a container's networks apart. In a
sandbox with two or more canal interfaces, each network gets explicit routes via its own
interface and gateway: its pools where they overlap no other canal network's there (distinct
--subnet networks), else a /32 per member (networks sharing the cluster network). Traffic to a network's members is thus
sourced from that network's address and enters its policy there; the default route stays
Docker's (it decides which network reaches the outside). A sandbox with one canal interface
is left exactly as Docker set it up.

Pure: `plans(snapshot)` computes; `SandboxStep` applies changed plans through the dataplane.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
from collections import defaultdict
from typing import Callable, Iterable, Mapping, Sequence

from canal.agent.desired import Snapshot, local_endpoints, network_name, network_of
from canal.dataplane.sandbox import SandboxIface, SandboxPlan, Sandboxes, free_gateway
from canal.errors import CanalError
from canal.records import ANY_NET, DEFAULT_GATEWAY, EndpointRecord

log = logging.getLogger(__name__)

Net = ipaddress.IPv4Network


def sandboxes(snap: Snapshot) -> dict[str, list[EndpointRecord]]:
    """Local joined endpoints by sandbox."""
    out: dict[str, list[EndpointRecord]] = defaultdict(list)
    for ep in local_endpoints(snap):
        if ep.joined and ep.sandbox:
            out[ep.sandbox].append(ep)
    return out


def _pools(snap: Snapshot, ep: EndpointRecord) -> tuple[Net, ...]:
    network = network_of(snap, ep)
    pools = network.pools if network is not None else (ANY_NET,)
    return tuple(Net(snap.cluster_network if p == ANY_NET else p) for p in pools)


def plan_for(
    snap: Snapshot, key: str, members: Iterable[EndpointRecord], index: Mapping[str, list[EndpointRecord]]
) -> SandboxPlan:
    """The routes of one sandbox with two or more canal interfaces. `index`: endpoints by
    logical network name (see members_by_network).

    A network whose pools overlap no other canal network's in the sandbox is routed by its
    pools; the others by a /32 per member. Never a prefix holding another interface's
    address: Docker refuses to add an interface whose address an existing route contains."""
    ordered = sorted(members, key=lambda ep: (network_name(snap, ep), ep.id))
    pools = {ep.id: _pools(snap, ep) for ep in ordered}
    ifaces = []
    for ep in ordered:
        mine = pools[ep.id]
        shared = any(p.overlaps(q) for other in ordered if other.id != ep.id for q in pools[other.id] for p in mine)
        if not shared:
            destinations = tuple(sorted(mine))
        else:
            destinations = tuple(sorted(Net(f"{m.ip_text}/32") for m in index.get(network_name(snap, ep), ())))
        ifaces.append(SandboxIface(ep.id, ep.mac, ep.ip, ep.gateway, destinations))
    return SandboxPlan(key, tuple(ifaces))


def members_by_network(snap: Snapshot, networks: Iterable[str] = ()) -> dict[str, list[EndpointRecord]]:
    """Endpoints a container may talk to, by logical network name: joined ones anywhere, and
    our own from their creation on (as the policy compiler sees them). With the agent's index,
    only `networks` are read (the sandboxes' own), never every endpoint."""
    if snap.index is not None:
        return {name: snap.index.network_records(name) for name in networks}
    out: dict[str, list[EndpointRecord]] = defaultdict(list)
    for ep in snap.endpoints.values():
        if ep.joined or ep.host == snap.host:
            out[network_name(snap, ep)].append(ep)
    return out


def plans(snap: Snapshot) -> dict[str, SandboxPlan]:
    """Plans of every local sandbox with two or more canal interfaces."""
    multi = {key: eps for key, eps in sandboxes(snap).items() if len(eps) > 1}
    if not multi:
        return {}
    index = members_by_network(snap, {network_name(snap, ep) for eps in multi.values() for ep in eps})
    return {key: plan_for(snap, key, eps, index) for key, eps in multi.items()}


class SandboxStep:
    """An agent step: programs the plans that changed (all of them on a full pass). A sandbox
    that drops to one canal interface gets an empty plan once (Canal's routes and rules go);
    one whose new interface is not there yet is retried through `retry`."""

    # Retries for an interface Docker has not moved in yet (or a sandbox not made yet: a created
    # container starts when its user says): quick ones first, then once a second for a minute;
    # then the timer's full passes.
    QUICK, SLOW = 100, 60

    def __init__(self, apply: Callable[[SandboxPlan], set[str]], retry: Callable[[float], None]):
        self.apply = apply
        self.retry = retry
        self.applied: dict[str, SandboxPlan] = {}
        self.incomplete: dict[str, int] = {}  # sandbox -> quick retries so far

    def __call__(self, snap: Snapshot, full: bool) -> None:
        desired = plans(snap)
        failures: list[str] = []
        for key in set(self.applied) - set(desired):
            try:
                self.apply(SandboxPlan(key, ()))
            except FileNotFoundError:
                pass  # the container is gone, and its namespace with it
            except CanalError as err:
                failures.append(f"{key}: {err}")
                continue
            self.applied.pop(key, None)
            self.incomplete.pop(key, None)
        delay = 0.0
        for key, plan in desired.items():
            if not full and self.applied.get(key) == plan and key not in self.incomplete:
                continue
            try:
                missing = self.apply(plan)
            except FileNotFoundError:
                # Not there yet (a Join's sandbox before Docker made it) or gone: retry while
                # the records say it is joined.
                missing = {iface.endpoint_id for iface in plan.ifaces}
            except CanalError as err:
                failures.append(f"{key}: {err}")
                continue
            self.applied[key] = plan
            if missing:
                tries = self.incomplete.get(key, 0) + 1
                self.incomplete[key] = tries
                if tries <= self.QUICK + self.SLOW:
                    wait = 0.05 if tries <= self.QUICK else 1.0
                    delay = min(delay, wait) if delay else wait
            else:
                self.incomplete.pop(key, None)
        if delay:
            self.retry(delay)
        if failures:
            log.warning("routes of %d multi-network sandbox(es) not programmed: %s",
                        len(failures), "; ".join(failures)[:1000])


class SandboxRouting:
    """What a Join needs: a free gateway in the sandbox, and the routes of the joining
    interface (handed to Docker as StaticRoutes, so they exist before the container runs),
    after re-planning the interfaces already there: a pool route of theirs that now overlaps
    the new network becomes /32s, as Docker refuses an address inside an existing route."""

    def __init__(self, snapshot: Callable[[], Snapshot], dataplane: Sandboxes,
                 local: Callable[[], Sequence[EndpointRecord] | None] = lambda: None):
        self.snapshot = snapshot
        # This host's endpoints as the agent last saw them (None: not yet): a Join's gateway
        # needs those only, not a snapshot of every endpoint of the cluster.
        self.local = local
        self.dataplane = dataplane
        self._warned: set[str] = set()
        # Sandboxes whose Join found no other canal interface, seen or recorded: their routes()
        # is () without a second snapshot (the common, single-network Join).
        self._alone: set[str] = set()

    def gateway(self, key: str, record: EndpointRecord) -> ipaddress.IPv4Address:
        if record.joined and record.sandbox == key:
            return record.gateway  # a replayed Join
        where = os.path.realpath(os.path.dirname(key))
        if where != os.path.realpath(self.dataplane.netns_dir) and where not in self._warned:
            self._warned.add(where)
            log.warning("Docker's sandboxes are in %s, not in --netns-dir %s: containers on several "
                        "canal networks need --netns-dir %s (CANAL_NETNS_DIR)",
                        where, self.dataplane.netns_dir, where)
        try:
            taken = self.dataplane.gateways(key)
        except FileNotFoundError:
            # Not made yet: Docker joins a created container's networks before it starts it
            # (`docker create` + `network connect`, Compose). The records know the others.
            taken = set()
        except CanalError as err:
            # Unreadable (e.g. the managed plugin without CAP_SYS_ADMIN): the first interface's
            # gateway, as before multi-network support; a second canal interface then fails.
            log.warning("endpoint %s: cannot read sandbox %s (%s); gateway %s",
                        record.id[:12], key, err, DEFAULT_GATEWAY)
            return DEFAULT_GATEWAY
        local = self.local()
        here = (sandboxes(self.snapshot()).get(key, []) if local is None
                else [ep for ep in local if ep.joined and ep.sandbox == key])
        taken.update(ep.gateway for ep in here if ep.id != record.id)
        if taken:
            self._alone.discard(key)
        else:
            self._alone.add(key)
        return free_gateway(taken)

    def routes(self, record: EndpointRecord) -> tuple[Net, ...]:
        """The joining interface's destinations (none when it is the sandbox's only one)."""
        if record.sandbox in self._alone:
            self._alone.discard(record.sandbox)
            return ()
        snap = self.snapshot()
        endpoints = dict(snap.endpoints)
        endpoints[record.id] = record
        snap = dataclasses.replace(snap, endpoints=endpoints)
        members = sandboxes(snap).get(record.sandbox, [])
        if len(members) < 2:
            return ()
        plan = plan_for(snap, record.sandbox, members, members_by_network(snap))
        try:
            self.dataplane.apply(plan)  # the interfaces already there; this one is not yet
        except FileNotFoundError:
            pass  # no sandbox yet (a created container): the agent programs it once it exists
        except CanalError as err:
            log.warning("endpoint %s: routes of sandbox %s not updated yet (%s); the agent retries",
                        record.id[:12], record.sandbox, err)
        own = {str(ep.ip) for ep in members}
        mine = next(iface for iface in plan.ifaces if iface.endpoint_id == record.id)
        return tuple(d for d in mine.destinations if not (d.prefixlen == 32 and str(d.network_address) in own))
