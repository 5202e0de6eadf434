"""An in-memory copy of the datastore prefixes the agent computes from, kept current by
watches and by this process's own commits — so a reconcile pass reads memory, not etcd.

Every key carries the revision of its last change; an update (watch event, own commit,
re-list) only lands if it is newer, so the three sources may arrive in any order. A watch
that fell behind compaction re-lists: flannel's LeaseWatcher.Reset. Any change asks the agent
for a pass (on_change).

Directories given as `held` are parsed once on arrival and kept only typed (their text is
dropped; records another host owns may be dropped whole): at 100,000 endpoints the text of
every endpoint and address record was ~100 MB beside the parsed records.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Generic, ItemsView, Iterator, KeysView, Mapping, Optional, Sequence, TypeVar, ValuesView

from canal import metrics
from canal.datastore.base import Datastore, Op, Put
from canal.errors import CanalError, Unavailable
from canal.records import safe

log = logging.getLogger(__name__)

T = TypeVar("T")
_FAILED = object()  # cached parse failure: re-parsed only when the record changes


def _split(key: str) -> tuple[str, str]:
    """(directory with its trailing slash, name): how the mirror files a key."""
    cut = key.rfind("/") + 1
    return key[:cut], key[cut:]


def _name(name: str) -> str:
    """A held record's name, interned: the mirror, its views and the record's own ID (which
    canal.records interns) share one string instead of a copy each."""
    return sys.intern(name)


def _as_is(rel: str, raw: Any) -> Any:
    return raw


@dataclass(frozen=True)
class Held:
    """A directory kept typed only: `parse` (the same function every reader passes) runs when
    a record arrives; `wanted`, on the JSON before it is parsed, keeps only what it accepts
    (e.g. this host's address records: the cluster's are read from the datastore when a
    departed host is collected). Malformed records keep their revision only; refused ones are
    kept as a deletion is, until the watch has passed it (at 100,000 endpoints the other hosts'
    address records' keys and revisions were ~20 MB)."""

    parse: Callable[[str, Any], Any]
    wanted: Optional[Callable[[Any], bool]] = None


class Mirror:
    def __init__(self, store: Datastore, prefixes: list[str], on_change: Callable[[], object], timeout: float = 5.0,
                 quiet: tuple[str, ...] = (), held: Optional[Mapping[str, Held]] = None):
        self.store = store
        self.held = dict(held or {})  # directory prefix -> how its records are kept
        self.prefixes = prefixes
        self.on_change = on_change
        # Kept current but no reason for a pass: records no pass reads (every host's 30 s
        # renewal touches its host record; with N hosts that was N/30 passes a second, idle).
        self.quiet = quiet
        self.timeout = timeout
        self._lock = threading.Lock()
        # directory -> name -> (revision, value; None = deleted): a pass reads the few
        # directories it needs (endpoints, policies, ...), never the IPAM records. In a held
        # directory the value is the parsed record (or _FAILED), never text.
        self._dirs: dict[str, dict[str, tuple[int, Any]]] = {}
        # prefix -> (parser, key -> (revision, record or _FAILED)); another parser for the same
        # prefix starts the cache afresh (never hands out another parser's types, never grows)
        self._typed: dict[str, tuple[Callable[[str, Any], Any], dict[str, tuple[int, Any]]]] = {}
        # key -> (revision, why): records that did not parse, skipped until they change.
        self.quarantined: dict[str, tuple[int, str]] = {}
        self.quarantined_total = 0  # how many (key, revision) pairs were ever quarantined
        self._views: list["RecordView[Any]"] = []  # live typed views with their change journals
        self._deleted: dict[str, int] = {}  # key -> revision of the deletion still remembered
        self._listed: set[str] = set()
        self._ready = threading.Condition(self._lock)
        self._stopping = threading.Event()
        store.on_commit(self._commit)

    def start(self) -> None:
        for prefix in self.prefixes:
            threading.Thread(target=self._run, args=(prefix,), name=f"canal-watch{prefix}", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()

    def wait_ready(self, timeout: float) -> bool:
        with self._ready:
            return self._ready.wait_for(lambda: self._listed >= set(self.prefixes), timeout)

    # Reads ----------------------------------------------------------------------------------

    def json(self, prefix: str) -> dict[str, Any]:
        """key (relative to prefix) -> parsed JSON, for every live key under prefix."""
        return self.records(prefix, _as_is)

    def records(self, prefix: str, parse: Callable[[str, Any], T]) -> dict[str, T]:
        """key (relative to prefix) -> typed record; parse(relative key, json) raises CanalError
        for a malformed record, which is then quarantined: skipped, logged once per revision,
        counted and listed by `canal status` — one bad record never stops a pass.

        Parsed once per revision and cached per prefix for one parser: pass the same function
        each time (the `*_entry` functions of canal.records), so a pass over an unchanged
        directory costs one dict lookup per key; a new lambda each call re-parses everything."""
        if not any(prefix.startswith(p) for p in self._listed):
            raise Unavailable(f"datastore not read yet under {prefix}")
        out: dict[str, T] = {}
        cut = len(prefix)
        held = self._held_under(prefix, parse)
        if held is not None:
            with self._lock:
                for directory, entries in self._dirs.items():
                    if directory.startswith(prefix):
                        head = directory[cut:]
                        for name, (_revision, value) in entries.items():
                            if value is not None and value is not _FAILED:
                                out[head + name] = value  # name itself when the directory is the prefix
            return out
        with self._lock:
            cache = self._typed.get(prefix)
            if cache is None or cache[0] is not parse:
                cache = self._typed[prefix] = (parse, {})
            typed = cache[1]
            for directory, entries in self._dirs.items():
                if not directory.startswith(prefix):
                    continue
                for name, (revision, value) in entries.items():
                    if value is None:
                        continue
                    key = directory + name
                    cached = typed.get(key)
                    if cached is None or cached[0] != revision:
                        cached = (revision, self._parse_typed(key, revision, value, key[cut:], parse))
                        typed[key] = cached
                    if cached[1] is not _FAILED:
                        out[key[cut:]] = cached[1]
        return out

    def view(self, prefix: str, parse: Callable[[str, Any], T],
             keep: Optional[Callable[[T], bool]] = None) -> "RecordView[T]":
        """A live typed mapping of one prefix with a change journal (RecordView): each refresh()
        costs work in proportion to the keys changed since the last, not to the prefix's size.
        `keep`: hold only the records it accepts (e.g. this host's), in memory too."""
        view: RecordView[T] = RecordView(self, prefix, parse, keep)
        with self._lock:
            self._views.append(view)
            for directory, entries in self._dirs.items():
                if directory.startswith(prefix):
                    view._dirty.update(directory + name for name in entries)
        return view

    def _held_under(self, prefix: str, parse: Callable[[str, Any], Any]) -> Optional[Held]:
        """The Held of `prefix` when it is one (checked: read with its own parser); None when
        no held directory is under it."""
        for where, held in self.held.items():
            if prefix == where:
                if parse is not held.parse:
                    raise ValueError(f"{prefix} is held typed by {held.parse.__name__}; read it with that parser")
                return held
            if where.startswith(prefix) or prefix.startswith(where):
                raise ValueError(f"{prefix} overlaps the held directory {where}: read that one by itself")
        return None

    def _held_of(self, key: str) -> Optional[tuple[str, Held]]:
        for where, held in self.held.items():
            if key.startswith(where):
                return where, held
        return None

    def _hold(self, key: str, revision: int, value: str, where: str, held: Held) -> Any:
        """What a held directory keeps of one record: parsed, _FAILED, or None (refused by
        `wanted`: kept as a deletion is). The JSON is decoded once, for `wanted` and the
        parser alike."""
        try:
            raw = json.loads(value)
        except ValueError:
            self._quarantine(key, revision, "not JSON")
            return _FAILED
        if held.wanted is not None and not held.wanted(raw):
            self.quarantined.pop(key, None)
            return None
        return self._parse_raw(key, revision, raw, key[len(where):], held.parse)

    def _parse_typed(self, key: str, revision: int, value: str, rel: str, parse: Callable[[str, Any], T]) -> Any:
        try:
            raw = json.loads(value)
        except ValueError:
            self._quarantine(key, revision, "not JSON")
            return _FAILED
        return self._parse_raw(key, revision, raw, rel, parse)

    def _parse_raw(self, key: str, revision: int, raw: Any, rel: str, parse: Callable[[str, Any], T]) -> Any:
        try:
            record = parse(rel, raw)
        except (CanalError, ValueError, TypeError) as err:
            self._quarantine(key, revision, str(err))
            return _FAILED
        if self.quarantined.get(key, (revision,))[0] != revision:
            del self.quarantined[key]  # an older revision's fault, since fixed
        return record

    def _quarantine(self, key: str, revision: int, why: str) -> None:
        if self.quarantined.get(key, (None,))[0] == revision:
            return
        self.quarantined[key] = (revision, why)
        self.quarantined_total += 1
        log.error("datastore record %s (revision %d) quarantined, skipped until it changes: %s",
                  safe(key, 200), revision, why)

    # Updates --------------------------------------------------------------------------------

    def _set(self, key: str, revision: int, value: str | None) -> bool:
        directory, name = _split(key)
        entries = self._dirs.setdefault(directory, {})
        current = entries.get(name)
        if current is not None and current[0] >= revision:
            return False
        held = self._held_of(key) if self.held else None
        kept: Any = value if held is None or value is None else self._hold(key, revision, value, *held)
        if held is not None and current is None:
            name = _name(name)
        entries[name] = (revision, kept)
        self._mark(key)
        self._tombstone(key, revision, kept)
        if kept is None:
            for _parse, typed in self._typed.values():
                typed.pop(key, None)
            self.quarantined.pop(key, None)
        return True

    def _tombstone(self, key: str, revision: int, value: str | None) -> None:
        """Keep the set of deletions current (what _prune visits; the caller holds the lock)."""
        if value is None:
            self._deleted[key] = revision
        else:
            self._deleted.pop(key, None)

    def _mark(self, key: str) -> None:
        """Journal a changed key for every view it belongs to (the caller holds the lock)."""
        for view in self._views:
            if key.startswith(view.prefix):
                view._dirty.add(key)

    def _prune(self, prefix: str, below: int) -> None:
        """Forget deletions older than the watch position: no older event can arrive now. Only
        the deletions are visited (after every batch of watch events; scanning every key of
        200,000 for them was the plugin's busiest loop in bench/scale.py)."""
        with self._lock:
            for key, rev in [(k, r) for k, r in self._deleted.items() if r < below and k.startswith(prefix)]:
                del self._deleted[key]
                directory, name = _split(key)
                entries = self._dirs.get(directory, {})
                current = entries.get(name)
                if current is not None and current[1] is None and current[0] == rev:
                    del entries[name]

    def _commit(self, revision: int, ops: Sequence[Op]) -> None:
        changed = False
        with self._lock:
            for op in ops:
                if any(op.key.startswith(p) for p in self.prefixes):
                    changed |= self._set(op.key, revision, op.value if isinstance(op, Put) else None) \
                        and not op.key.startswith(self.quiet)
        if changed:
            self.on_change()

    def _relist(self, prefix: str) -> int:
        entries, revision = self.store.list(prefix)
        live = {e.key for e in entries}
        with self._ready:
            for entry in entries:
                self._set(entry.key, entry.mod_revision, entry.value)
            for directory, dir_entries in self._dirs.items():
                if not directory.startswith(prefix):
                    continue
                for name, (rev, value) in list(dir_entries.items()):
                    key = directory + name
                    # Gone at the listed revision (unless changed after it: a newer own commit).
                    if key not in live and value is not None and rev <= revision:
                        dir_entries[name] = (revision, None)
                        self._mark(key)
                        self._tombstone(key, revision, None)
            self._listed.add(prefix)
            self._ready.notify_all()
        self._prune(prefix, revision + 1)  # as the watch does: nothing older arrives now
        return revision

    def _run(self, prefix: str) -> None:
        start = 0
        failing = False
        while not self._stopping.is_set():
            try:
                if start == 0:
                    start = self._relist(prefix) + 1
                    self.on_change()
                # One stream per timeout, each batch applied as it comes (etcd's stays open).
                for result in self.store.watch_stream(prefix, start, self.timeout):
                    if failing:
                        log.info("watch on %s works again", prefix)
                        failing = False
                    if result.compacted:
                        metrics.WATCH_RESTARTS.labels("compacted").inc()
                        log.info("watch on %s fell behind compaction; re-listing", prefix)
                        start = 0
                        break
                    changed = False
                    with self._lock:
                        for event in result.events:
                            changed |= self._set(event.key, event.revision,
                                                 event.value if event.kind == "put" else None) \
                                and not event.key.startswith(self.quiet)
                    if result.events:
                        start = result.events[-1].revision + 1
                        self._prune(prefix, start)
                    if changed:
                        self.on_change()
                    if self._stopping.is_set():
                        break
            except Exception as err:  # datastore down: keep trying, re-list when back
                if not failing:
                    log.warning("watch on %s failed: %s", prefix, err)
                metrics.WATCH_RESTARTS.labels("error").inc()
                failing = True
                start = 0
                self._stopping.wait(1.0)


class RecordView(Mapping[str, T], Generic[T]):
    """Relative key -> typed record for one prefix, kept by the Mirror's updates: each update
    only journals its key; refresh() parses the journalled keys and returns which changed.

    Read and refreshed by one thread (the agent's): between refreshes it does not change, so a
    pass sees one consistent state. Malformed records are quarantined as by Mirror.records()."""

    def __init__(self, mirror: Mirror, prefix: str, parse: Callable[[str, Any], T],
                 keep: Optional[Callable[[T], bool]] = None):
        self.mirror = mirror
        self.prefix = prefix
        self.parse = parse
        self.keep = keep
        self._held = mirror._held_under(prefix, parse)  # raises for a held directory's wrong parser
        self._dirty: set[str] = set()  # full keys changed since the last refresh (mirror's lock)
        self._records: dict[str, T] = {}
        self._revisions: dict[str, int] = {}

    def refresh(self) -> set[str]:
        """Bring the view up to date; returns the relative keys whose record changed (added,
        replaced or gone): the change journal an incremental pass consumes."""
        mirror, cut = self.mirror, len(self.prefix)
        if not any(self.prefix.startswith(p) for p in mirror._listed):
            raise Unavailable(f"datastore not read yet under {self.prefix}")
        changed: set[str] = set()
        held = self._held
        with mirror._lock:
            # The parse cache records() uses: both hand out the same objects, so a record is
            # held parsed once however many readers there are (at 20,000 endpoints a second
            # copy for status and metrics was 27 MB). A held directory is that cache itself.
            cache = mirror._typed.get(self.prefix) if held is None else None
            if held is None and (cache is None or cache[0] is not self.parse):
                cache = mirror._typed[self.prefix] = (self.parse, {})
            typed = cache[1] if cache is not None else {}
            dirty, self._dirty = self._dirty, set()
            for key in dirty:
                rel = key[cut:] if held is None else _name(key[cut:])
                directory, name = _split(key)
                entry = mirror._dirs.get(directory, {}).get(name)
                revision, value = entry if entry is not None else (0, None)
                if value is None:
                    if self._records.pop(rel, None) is not None:
                        changed.add(rel)
                    self._revisions.pop(rel, None)
                    continue
                if self._revisions.get(rel) == revision:
                    continue
                cached = typed.get(key)
                record: Any
                if held is not None:
                    record = value
                elif cached is not None and cached[0] == revision:
                    record = cached[1]
                else:
                    record = mirror._parse_typed(key, revision, value, rel, self.parse)
                    if record is not _FAILED and (self.keep is None or self.keep(record)):
                        typed[key] = (revision, record)  # what a kept view drops is not held either
                if record is _FAILED or (self.keep is not None and not self.keep(record)):
                    # Nothing of it stays (a view of this host's records sees the cluster's
                    # go by: their keys and revisions were ~25 MB at 100,000 endpoints).
                    self._revisions.pop(rel, None)
                    if self._records.pop(rel, None) is not None:
                        changed.add(rel)
                else:
                    self._revisions[rel] = revision
                    self._records[rel] = record
                    changed.add(rel)
        return changed

    def __getitem__(self, key: str) -> T:
        return self._records[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    # The dict's own views and lookups (Mapping's generic ones go through __getitem__ per key).
    def __contains__(self, key: object) -> bool:
        return key in self._records

    def get(self, key: str, default: Any = None) -> Any:
        return self._records.get(key, default)

    def keys(self) -> KeysView[str]:
        return self._records.keys()

    def values(self) -> ValuesView[T]:
        return self._records.values()

    def items(self) -> ItemsView[str, T]:
        return self._records.items()
