"""Host identities: one record per host name, checked at start, and collected once the host is
gone for good.

A host record (`<prefix>/hosts/<name>`) keeps what must survive restarts (the VTEP MAC, as
flanneld keeps it, and the last subnet) and says who holds the name (underlay address, last
lease renewal). Two machines with one name would overwrite each other's records and silently
break cross-host traffic; the second one is refused instead.
"""

from __future__ import annotations

import json
import logging
import random
import time
from typing import Any, Callable, Iterable

from canal.datastore.base import Datastore, Delete, Guard
from canal.datastore.keys import Keys
from canal.errors import CanalError, Conflict
from canal.records import (
    AddressRecord,
    HostRecord,
    Lease,
    RecordError,
    address_entry,
    endpoint_entry,
    host_entry,
    network_entry,
    replace,
    route_entry,
)

log = logging.getLogger(__name__)

TXN_OPS = 100  # etcd refuses transactions of more than 128 operations by default
# A host away for less than this is coming back (a reboot, a partition, a plugin upgrade): its
# containers still run, and collecting their records would cut them off and free their
# addresses for others. Past it, and past two lease TTLs, the host is gone for good.
MIN_ABSENCE = 24 * 3600.0

Records = Callable[[str, Callable[[str, Any], Any]], dict[str, Any]]


def random_mac() -> str:
    """A locally administered unicast MAC, as flannel gives its VXLAN device."""
    octets = [random.randint(0, 255) for _ in range(6)]
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{o:02x}" for o in octets)


def v6_mac(mac: str) -> str:
    """The MAC of flannel-v6.<VNI>, derived from the host's VTEP MAC (kept across restarts with
    it, no second record field): the fourth octet flipped, still locally administered unicast."""
    octets = mac.split(":")
    octets[3] = f"{int(octets[3], 16) ^ 0x66:02x}"
    return ":".join(octets)


class Hosts:
    def __init__(self, store: Datastore, keys: Keys, host: str, public_ip: str, clock: Callable[[], float] = time.time,
                 ttl: float = 86400.0):
        self.store = store
        self.keys = keys
        self.host = host
        self.public_ip = public_ip
        self.clock = clock  # wall clock: renewals are compared across hosts
        self.ttl = ttl  # our lease's: a longer gap between our own renewals is an outage
        # Since when we have seen the datastore without a gap longer than a lease TTL: a peer's
        # absence counts only from then. Every host's renewal is stale after an outage of the
        # datastore (or of our own link to it); that is not proof that any of them is gone.
        self._watching_since: float | None = None
        self._last_seen: float | None = None

    def read(self) -> HostRecord | None:
        raw = self.store.get_json(self.keys.host(self.host))
        if raw is None:
            return None
        try:
            return HostRecord.parse(raw, self.host)
        except RecordError as err:
            log.error("host record %s is malformed (%s); a new one will be written", self.keys.host(self.host), err)
            return None

    def check_identity(self) -> None:
        """Refuse when a live host (its lease still held at its address) has our name."""
        record = self.read()
        if record is None or not record.public_ip or record.public_ip == self.public_ip:
            return
        alive = False
        if record.subnet is not None:
            # Its key may be v4-only or dual stack (`a.b.c.d-len&<v6>-len`): found by its IPv4 subnet.
            for entry in self.store.list(self.keys.leases)[0]:
                try:
                    lease = Lease.parse(entry.key[len(self.keys.leases):], json.loads(entry.value))
                except (ValueError, CanalError):
                    continue
                if lease.subnet == record.subnet and lease.public_ip == record.public_ip:
                    alive = True
        if alive:
            raise Conflict(
                f"host name {self.host!r} is already used by a live host at {record.public_ip} "
                f"(subnet {record.subnet}, VTEP {record.vtep_mac}); this host is {self.public_ip}. "
                "Give each host its own name with --hostname (CANAL_HOSTNAME)"
            )

    def ensure(self) -> HostRecord:
        """Our record, created with a fresh VTEP MAC on first start; checks the identity first."""
        self.check_identity()
        now = self.clock()

        def fill(raw: Any) -> Any:
            try:
                record = HostRecord.parse(raw, self.host) if raw is not None else None
            except RecordError:
                record = None
            if record is None:
                record = HostRecord(self.host, random_mac())
            return replace(record, public_ip=self.public_ip, renewed=now).to_json()

        record = HostRecord.parse(self.store.update(self.keys.host(self.host), fill), self.host)
        self._seen(now)
        return record

    def _seen(self, now: float) -> None:
        """We reached the datastore at `now` (our own renewal went through)."""
        if self._watching_since is None or self._last_seen is None or not 0 <= now - self._last_seen <= self.ttl:
            self._watching_since = now  # first contact, or back after a gap (or a clock jump)
        self._last_seen = now

    def update(self, change: Callable[[HostRecord], HostRecord]) -> None:
        def apply(raw: Any) -> Any:
            try:
                record = HostRecord.parse(raw, self.host) if raw is not None else None
            except RecordError:
                record = None
            return raw if record is None else change(record).to_json()

        self.store.update(self.keys.host(self.host), apply)

    def touch(self) -> None:
        """Record a lease renewal: the collector's proof that this host is alive."""
        now = self.clock()
        self.update(lambda r: replace(r, renewed=now))
        self._seen(now)

    def collect_departed(
        self, records: Records, leases: Iterable[Lease], ttl: float, min_absence: float = MIN_ABSENCE
    ) -> list[str]:
        """Remove the records of hosts gone for good: no live lease at their address and no
        renewal for two lease TTLs (two, so clock skew between hosts cannot collect a live
        one) nor for `min_absence`, counted only while we ourselves saw the datastore (after an
        outage every renewal is stale). Any host may do it; every step is idempotent. Returns
        the collected names."""
        now = self.clock()
        if self._watching_since is None:
            return []  # not renewed ourselves yet: we cannot tell who is gone
        live = {lease.public_ip for lease in leases}
        hosts = records(self.keys.root + "/hosts/", host_entry)
        gone = []
        for name, record in sorted(hosts.items()):
            if name == self.host or not record.public_ip or record.public_ip in live or not record.renewed:
                continue
            if now - max(record.renewed, self._watching_since) < max(2 * ttl, min_absence):
                continue
            log.warning("host %s (%s) is gone: no lease, last renewal %.0f s ago; removing its records",
                        name, record.public_ip, now - record.renewed)
            self._collect(name, records)
            gone.append(name)
        return gone

    def _addresses(self) -> list[AddressRecord]:
        """Every address record, from the datastore: the mirror holds this host's only (the
        cluster's were ~40 MB at 100,000), and a host is collected rarely. Malformed ones are
        skipped: they cannot name an endpoint of the departed host."""
        out = []
        for key, raw in self.store.list_json(self.keys.addresses).items():
            try:
                out.append(address_entry(key, raw))
            except CanalError:
                continue
        return out

    def _collect(self, name: str, records: Records) -> None:
        endpoints = records(self.keys.endpoints, endpoint_entry)
        theirs = {ep_id for ep_id, ep in endpoints.items() if ep.host == name}
        networks = records(self.keys.networks, network_entry)
        routes = records(self.keys.routes, route_entry)
        ops = [Delete(self.keys.endpoint(ep_id)) for ep_id in sorted(theirs)]
        ops += [Delete(self.keys.network(name, net.id)) for net in networks.values() if net.host == name]
        ops += [Delete(self.keys.route(r.ip)) for r in routes.values() if r.host == name]
        ops += [
            Delete(self.keys.address(a.ip))
            for a in self._addresses()
            if a.endpoint in theirs or (a.host == name and a.kind == "endpoint" and not a.endpoint)
        ]
        for start in range(0, len(ops), TXN_OPS):
            self.store.txn([], ops[start:start + TXN_OPS])
        entry = self.store.get(self.keys.host(name))
        if entry is not None:  # guarded: a host that came back meanwhile keeps its record
            self.store.txn([Guard(entry.key, entry.mod_revision)], [Delete(entry.key)])
