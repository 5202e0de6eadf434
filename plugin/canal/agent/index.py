"""Incremental memberships: Felix's calculation graph for the sets that grow with the cluster.

Which endpoints each selector ipset, each network's members set and the encrypted set hold is
the only part of the desired firewall that grows with the whole cluster (rules depend on the
policies and the LOCAL endpoints only; see canal.policy.compiler). This index keeps those
memberships current from the mirror's change journal:

- an endpoint changed (joined, left, relabelled, moved network): only that endpoint is evaluated,
  against the selectors in use that could match it (a label index files each selector under the
  labels it requires, e.g. `role == 'web'` or a NetworkPolicy's network; all(), has(), != and
  negations are evaluated for every changed endpoint): O(those selectors), not O(cluster);
- a network record changed (its logical name learned, -o encrypted): only the endpoints of that
  host's network are re-evaluated;
- a selector used for the first time (a new or changed policy): evaluated once per distinct
  label set of the cluster (replicas share theirs), only those carrying a label it requires when
  it has some; selectors no pass used any more are dropped.

Each set is a TrackedSet whose journal feeds the ipset applier per-set deltas. The compiler reads
the sets through Members views (canal.policy.compiler's `memberships`); its output must equal the
full computation's from the same records: tests/unit/test_incremental.py checks that on random
histories, and every full (timer) pass compares them again (canal.agent.agent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Set, Tuple

from canal.agent.desired import endpoint_info
from canal.dataplane.ipset import Members, TrackedSet
from canal.policy import selector as selectors
from canal.policy.compiler import EndpointInfo, effective_labels
from canal.records import EndpointRecord, NetworkRecord

LabelKey = Tuple[Tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class _Entry:
    """What one endpoint put into the sets, as of its last update: its removal takes exactly
    that back, whatever its record or network says now."""

    record: EndpointRecord
    info: Optional[EndpointInfo]  # None: not in the compiler's view (a remote one not joined)
    label_key: Optional[LabelKey]  # effective labels, sorted; None = identity unknown
    encrypted: bool


def naming(networks: Mapping[str, NetworkRecord], ep: EndpointRecord) -> tuple[str, bool]:
    """(logical network name, whether learned): canal.agent.desired._naming, from a mapping."""
    network = networks.get(f"{ep.host}/{ep.network}")
    return (network.logical_name, bool(network.name)) if network is not None else (ep.network, False)


def required_labels(selector: selectors.Selector) -> Optional[frozenset[tuple[str, str]]]:
    """(key, value) pairs of which every endpoint `selector` matches carries at least one (the
    label index files the selector under them); None: no such pairs (evaluated for every endpoint)."""
    if isinstance(selector, selectors.Compare) and selector.op == "==":
        return frozenset({(selector.key, selector.value)})
    if isinstance(selector, selectors.InSet) and not selector.negated:
        return frozenset((selector.key, value) for value in selector.values)
    if isinstance(selector, selectors.And):
        options = [r for r in map(required_labels, selector.operands) if r is not None]
        return min(options, key=lambda r: (len(r), sorted(r))) if options else None
    if isinstance(selector, selectors.Or):
        parts = [required_labels(operand) for operand in selector.operands]
        return frozenset().union(*parts) if all(p is not None for p in parts) else None  # type: ignore[arg-type]
    return None


class _Selector:
    """One selector in use (scoped, parsed) and its members per family; `used`: read by a
    compile since the last update (unused ones are dropped there)."""

    def __init__(self, parsed: selectors.Selector):
        self.parsed = parsed
        self.required = required_labels(parsed)
        self.sets = (TrackedSet(), TrackedSet())  # IPv4, IPv6 members
        self.used = True


class MembershipIndex:
    """Selector / network / encrypted memberships for one host's view of the cluster. Updated
    and read by the agent's thread only (between updates it does not change)."""

    def __init__(self, host: str):
        self.host = host
        # This host's endpoints as of the last completed update, for readers on other threads
        # (a Join choosing its gateway reads them instead of a snapshot of the whole cluster):
        # None until the first update. Replaced, never mutated.
        self.published_local: tuple[EndpointRecord, ...] | None = None
        self._local_changes = 0
        self.rebuilt = False  # the last update() built everything from the whole mapping
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next update() rebuilds from the whole mapping (a full pass
        found the index disagreeing with the full computation, or the first update)."""
        self._built = False
        self._entries: Dict[str, _Entry] = {}
        self._by_hostnet: Dict[tuple[str, str], Set[str]] = {}
        self._groups: Dict[LabelKey, Dict[str, _Entry]] = {}  # label set -> endpoints with it
        self._label_keys: Dict[LabelKey, LabelKey] = {}  # each label set's one key object
        self._groups_by_label: Dict[tuple[str, str], Set[LabelKey]] = {}  # (key, value) -> label sets
        self._selectors: Dict[str, _Selector] = {}  # canonical text -> tracked sets
        # The label index: (key, value) -> selectors only endpoints with that label can match;
        # the rest (all(), has(), !=, negations) are evaluated for every endpoint changed.
        self._by_label: Dict[tuple[str, str], Dict[str, _Selector]] = {}
        self._unindexed: Dict[str, _Selector] = {}
        self._networks_sets: Dict[str, tuple[TrackedSet, TrackedSet]] = {}
        self._encrypted = TrackedSet()
        self._encrypted6 = TrackedSet()
        self._local: Dict[str, EndpointRecord] = {}
        self._by_name: Dict[str, Dict[str, EndpointRecord]] = {}  # logical network -> in view
        self._networks: Mapping[str, NetworkRecord] = {}
        self._encrypt_all = False
        self.evaluations = 0  # selector evaluations so far (what the tests and bench count)

    # -- updates -------------------------------------------------------------------------------

    def update(self, endpoints: Mapping[str, EndpointRecord], changed: Iterable[str],
               networks: Mapping[str, NetworkRecord], encrypt_all: bool) -> None:
        """Bring the sets to `endpoints` (the full mapping, read only for `changed` ids, or
        whole on the first update) under `networks`; drops selectors unused since the last."""
        for key in [k for k, s in self._selectors.items() if not s.used]:
            self._unfile(key, self._selectors.pop(key))
        for tracked in self._selectors.values():
            tracked.used = False
        if not self._built or encrypt_all != self._encrypt_all:
            selectors_in_use = self._selectors
            self.reset()
            for key, tracked in selectors_in_use.items():
                self._file(key, _Selector(tracked.parsed))
            self._built, self._encrypt_all, self._networks = True, encrypt_all, dict(networks)
            self.rebuilt = True
            todo: Iterable[str] = list(endpoints)
        else:
            self.rebuilt = False
            todo = set(changed)
            if networks != self._networks:
                for key in set(networks) | set(self._networks):
                    if networks.get(key) != self._networks.get(key):
                        host, _, network = key.partition("/")
                        todo |= self._by_hostnet.get((host, network), set())
                self._networks = dict(networks)
        local_before = len(self._local), self._local_changes
        for endpoint_id in todo:
            self._remove(endpoint_id)
            record = endpoints.get(endpoint_id)
            if record is not None:
                self._add(record)
        if (len(self._local), self._local_changes) != local_before or self.published_local is None:
            # One reference, replaced whole once complete: what other threads read (a Join).
            self.published_local = tuple(self._local.values())

    def _file(self, key: str, tracked: _Selector) -> None:
        self._selectors[key] = tracked
        if tracked.required is None:
            self._unindexed[key] = tracked
        for pair in tracked.required or ():
            self._by_label.setdefault(pair, {})[key] = tracked

    def _unfile(self, key: str, tracked: _Selector) -> None:
        self._unindexed.pop(key, None)
        for pair in tracked.required or ():
            filed = self._by_label[pair]
            del filed[key]
            if not filed:
                del self._by_label[pair]

    def _candidates(self, labels: Mapping[str, str]) -> List[_Selector]:
        """The selectors that could match `labels`: a superset of those that do."""
        found = dict(self._unindexed)
        for pair in labels.items():
            found.update(self._by_label.get(pair, {}))
        return list(found.values())

    def _add(self, ep: EndpointRecord) -> None:
        name, named = naming(self._networks, ep)
        in_view = ep.joined or ep.host == self.host
        info = None
        if in_view:
            info = endpoint_info(ep, name, named)
        labels = effective_labels(info) if info is not None else None
        label_key = tuple(sorted(labels.items())) if labels is not None else None
        if label_key is not None:  # replicas share one key object (its tuples: ~170 bytes each)
            label_key = self._label_keys.setdefault(label_key, label_key)
        network = self._networks.get(f"{ep.host}/{ep.network}")
        encrypted = in_view and (self._encrypt_all or (network is not None and network.encrypted))
        entry = _Entry(ep, info, label_key, encrypted)
        self._entries[ep.id] = entry
        self._by_hostnet.setdefault((ep.host, ep.network), set()).add(ep.id)
        if ep.host == self.host:
            self._local[ep.id] = ep
            self._local_changes += 1
        if info is None:
            return
        addresses = (ep.ip_text, info.ip6)
        self._by_name.setdefault(info.network, {})[ep.id] = ep
        sets = self._network_sets(info.network)
        for family in (0, 1):
            if addresses[family] is not None:
                sets[family].add(addresses[family])  # type: ignore[arg-type]
        if encrypted:
            self._encrypted.add(ep.ip_text)
            if info.ip6 is not None:
                self._encrypted6.add(info.ip6)
        if label_key is not None and labels is not None:
            if label_key not in self._groups:
                self._groups[label_key] = {}
                for pair in label_key:
                    self._groups_by_label.setdefault(pair, set()).add(label_key)
            self._groups[label_key][ep.id] = entry
            for tracked in self._candidates(labels):
                self.evaluations += 1
                if tracked.parsed.matches(labels):
                    for family in (0, 1):
                        if addresses[family] is not None:
                            tracked.sets[family].add(addresses[family])  # type: ignore[arg-type]

    def _remove(self, endpoint_id: str) -> None:
        entry = self._entries.pop(endpoint_id, None)
        if entry is None:
            return
        ep, info = entry.record, entry.info
        hostnet = self._by_hostnet[(ep.host, ep.network)]
        hostnet.discard(endpoint_id)
        if not hostnet:
            del self._by_hostnet[(ep.host, ep.network)]
        if self._local.pop(endpoint_id, None) is not None:
            self._local_changes += 1
        if info is None:
            return
        addresses = (ep.ip_text, info.ip6)
        members = self._by_name[info.network]
        del members[endpoint_id]
        if not members:
            del self._by_name[info.network]
        if entry.label_key is not None:
            group = self._groups[entry.label_key]
            del group[endpoint_id]
            if not group:
                del self._groups[entry.label_key]
                del self._label_keys[entry.label_key]
                for pair in entry.label_key:
                    keys = self._groups_by_label[pair]
                    keys.discard(entry.label_key)
                    if not keys:
                        del self._groups_by_label[pair]
        sets = self._network_sets(info.network)
        for family in (0, 1):
            if addresses[family] is not None:
                sets[family].discard(addresses[family])  # type: ignore[arg-type]
        if entry.encrypted:
            self._encrypted.discard(ep.ip_text)
            if info.ip6 is not None:
                self._encrypted6.discard(info.ip6)
        if entry.label_key is not None:
            # The selectors in use now are exactly those that took this endpoint in: each was
            # in use when it was added, or evaluated it since (selector_members).
            labels = dict(entry.label_key)
            for tracked in self._candidates(labels):
                self.evaluations += 1
                if tracked.parsed.matches(labels):
                    for family in (0, 1):
                        if addresses[family] is not None:
                            tracked.sets[family].discard(addresses[family])  # type: ignore[arg-type]

    # -- reads (the compiler's memberships) ------------------------------------------------------

    def _network_sets(self, network: str) -> tuple[TrackedSet, TrackedSet]:
        sets = self._networks_sets.get(network)
        if sets is None:
            sets = self._networks_sets[network] = (TrackedSet(), TrackedSet())
        return sets

    def selector_members(self, scoped: selectors.Selector, family: int) -> Members:
        """Members (addresses of `family`) of the endpoints with known identity that `scoped`
        selects; a selector seen for the first time is evaluated once per distinct label set
        (only those carrying one of its required labels, when it has some)."""
        key = scoped.canonical()
        tracked = self._selectors.get(key)
        if tracked is None:
            tracked = _Selector(scoped)
            self._file(key, tracked)
            label_keys: Iterable[LabelKey] = self._groups
            if tracked.required is not None:
                label_keys = set().union(*(self._groups_by_label.get(pair, ()) for pair in tracked.required))
            for label_key in label_keys:
                self.evaluations += 1
                if scoped.matches(dict(label_key)):
                    for entry in self._groups[label_key].values():
                        assert entry.info is not None
                        tracked.sets[0].add(entry.record.ip_text)
                        if entry.info.ip6 is not None:
                            tracked.sets[1].add(entry.info.ip6)
        tracked.used = True
        return tracked.sets[family == 6].view()

    def network_members(self, network: str, family: int) -> Members:
        """Members (addresses of `family`) of every endpoint in view of logical network `network`."""
        return self._network_sets(network)[family == 6].view()

    def encrypted(self) -> Members:
        """IPv4 addresses of the endpoints in view whose traffic between hosts is encrypted."""
        return self._encrypted.view()

    def encrypted6(self) -> Members:
        """The IPv6 addresses of the same endpoints (those of --ipv6 networks)."""
        return self._encrypted6.view()

    def local_records(self) -> List[EndpointRecord]:
        """This host's endpoints (joined or not), by id (the order records are listed in)."""
        return [self._local[i] for i in sorted(self._local)]

    def network_records(self, network: str) -> List[EndpointRecord]:
        """The endpoints in view (joined anywhere, or ours) of logical network `network`."""
        return list(self._by_name.get(network, {}).values())

    def local_infos(self) -> List[EndpointInfo]:
        """The compiler's view of this host's endpoints (all are in view)."""
        return [e.info for e in (self._entries[i] for i in self._local) if e.info is not None]


__all__ = ["MembershipIndex", "naming"]
