"""The contract tier's plugin double (shared by tests/contract and tests/fuzz): the real
services, datastore and Flask app; the kernel replaced by stateful fakes that check what
would reach it.

Every change runs what the agent runs, inline: veths reconciled with the records, and the
firewall compiled from them and "applied" to fake iptables/ipsets that first pass the text
through the same input checks as the real tools (canal.dataplane.iptables.check_restore,
ipset.restore_script). A hostile value that got past the API and into a chain name or an
ipset member shows up as an error here, not silently in a kernel.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from fakes import FakeIpsets, FakeIptables, FakeLinks, FakeReservations

from canal import config
from canal.agent.desired import Snapshot, desired_firewall, desired_links, endpoint_rows
from canal.api.app import create_app
from canal.dataplane.firewall import Firewall
from canal.dataplane.iptables import check_restore
from canal.dataplane.ipset import IpSet, restore_script, valid_member
from canal.datastore.keys import Keys
from canal.datastore.local import LocalDatastore
from canal.services.ipam import Ipam
from canal.services.networks import Networks
from canal.records import EndpointRecord, NetworkRecord
from canal.services.introspect import PolicyIntrospection
from canal.services.policies import Policies
from canal.services.ports import Ports

HOST_SUBNET = "100.64.7.0/24"
CLUSTER = "100.64.0.0/16"
CLUSTER6 = "fd00:c0a1::/48"


class CheckedIptables(FakeIptables):
    def restore(self, text: str) -> None:
        check_restore(text)
        super().restore(text)


class CheckedIpsets(FakeIpsets):
    def apply(self, desired, read_back: bool = True) -> None:
        """As the real Ipsets: the restore script is built (bad names refused) and only members
        it would write end up in the kernel (bad members dropped)."""
        restore_script(desired, self.current())
        super().apply([IpSet(s.name, s.kind, frozenset(m for m in s.members if valid_member(m, s.family)), s.family)
                       for s in desired], read_back)


class ContractPlugin:
    """The real services and datastore; the kernel replaced by stateful fakes."""

    def __init__(self, path: str, scope: str = "local", docker_ipam_allowed: bool = False):
        self.config = config.load({"scope": scope}, {})
        self.store = LocalDatastore(path)
        keys = self.keys = Keys(self.config.etcd_prefix, self.config.flannel_prefix)
        self.links = FakeLinks()
        self.iptables = CheckedIptables()
        self.ipsets = CheckedIpsets(self.iptables)
        self.firewall = Firewall(self.iptables, self.ipsets)  # type: ignore[arg-type]
        self.changes = 0
        self.ipam = Ipam(self.store, keys, "h1", lambda: ipaddress.IPv4Network(HOST_SUBNET),
                         cluster_network6=lambda: ipaddress.IPv6Network(CLUSTER6))
        self.networks = Networks(self.store, keys, self.ipam, self.links, "h1", lambda: 1450, self._changed,
                                 docker_ipam_allowed=docker_ipam_allowed)
        self.policies = Policies(self.store, keys, self._changed)
        self.introspection = PolicyIntrospection(self.snapshot, self.iptables.save_counters)
        self.reservations = FakeReservations()
        self.ports = Ports(self.networks.endpoint, self.networks.update_endpoint, self.reservations, self._changed)

    def snapshot(self) -> Snapshot:
        return Snapshot(
            "h1",
            CLUSTER,
            {k: NetworkRecord.parse(v, k) for k, v in self.store.list_json(self.keys.networks).items()},
            {k: EndpointRecord.parse(v, k) for k, v in self.store.list_json(self.keys.endpoints).items()},
            policies=tuple(self.policies.list()),
            held_ports={(k.proto, str(k.ip or ""), k.port): e for k, e in self.reservations.held().items()},
        )

    def _changed(self, sync: bool) -> None:
        """What the agent does on a change, run inline: veths and firewall from the records."""
        self.changes += 1
        snap = self.snapshot()
        links = desired_links(snap)
        self.links.reconcile(links, self.links.orphans(links))
        self.firewall.apply(desired_firewall(snap))

    def status(self) -> dict:
        return {"host": "h1"}

    def endpoint_list(self) -> list[dict[str, Any]]:
        return endpoint_rows(self.snapshot())

    def dump(self) -> list[tuple[str, bytes]]:
        """Every key and value in the datastore, to compare before and after a call."""
        return [(e.key, e.value) for e in self.store.list("")[0]]

    def app(self):
        return create_app(self)

    def close(self) -> None:
        self.store.close()
