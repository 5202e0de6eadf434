"""An in-memory copy of the datastore prefixes the agent computes from, kept current by
watches and by this process's own commits — so a reconcile pass reads memory, not etcd.

Every key carries the revision of its last change; an update (watch event, own commit,
re-list) only lands if it is newer, so the three sources may arrive in any order. A watch
that fell behind compaction re-lists: flannel's LeaseWatcher.Reset. Any change asks the agent
for a pass (on_change).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Callable, Sequence

from canal.datastore.base import Datastore, Op, Put
from canal.errors import Unavailable

log = logging.getLogger(__name__)


class Mirror:
    def __init__(self, store: Datastore, prefixes: list[str], on_change: Callable[[], None], timeout: float = 5.0):
        self.store = store
        self.prefixes = prefixes
        self.on_change = on_change
        self.timeout = timeout
        self._lock = threading.Lock()
        # directory -> key -> (revision, value; None = deleted): a pass reads the few
        # directories it needs (endpoints, policies, ...), never the IPAM records.
        self._dirs: dict[str, dict[str, tuple[int, str | None]]] = {}
        self._parsed: dict[str, tuple[int, Any]] = {}
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
        """key (relative to prefix) -> parsed value, for every live key under prefix."""
        if not any(prefix.startswith(p) for p in self._listed):
            raise Unavailable(f"datastore not read yet under {prefix}")
        out = {}
        with self._lock:
            for directory, entries in self._dirs.items():
                if not directory.startswith(prefix):
                    continue
                for key, (revision, value) in entries.items():
                    if value is None:
                        continue
                    cached = self._parsed.get(key)
                    if cached is None or cached[0] != revision:
                        try:
                            cached = (revision, json.loads(value))
                        except ValueError:
                            log.warning("ignoring %s: not JSON", key)
                            continue
                        self._parsed[key] = cached
                    out[key[len(prefix):]] = cached[1]
        return out

    # Updates --------------------------------------------------------------------------------

    def _set(self, key: str, revision: int, value: str | None) -> bool:
        entries = self._dirs.setdefault(key.rsplit("/", 1)[0] + "/", {})
        current = entries.get(key)
        if current is not None and current[0] >= revision:
            return False
        entries[key] = (revision, value)
        if value is None:
            self._parsed.pop(key, None)
        return True

    def _prune(self, prefix: str, below: int) -> None:
        """Forget deletions older than the watch position: no older event can arrive now."""
        with self._lock:
            for directory, entries in self._dirs.items():
                if directory.startswith(prefix):
                    for key in [k for k, (rev, v) in entries.items() if v is None and rev < below]:
                        del entries[key]

    def _commit(self, revision: int, ops: Sequence[Op]) -> None:
        changed = False
        with self._lock:
            for op in ops:
                if any(op.key.startswith(p) for p in self.prefixes):
                    changed |= self._set(op.key, revision, op.value if isinstance(op, Put) else None)
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
                for key, (rev, value) in list(dir_entries.items()):
                    # Gone at the listed revision (unless changed after it: a newer own commit).
                    if key not in live and value is not None and rev <= revision:
                        dir_entries[key] = (revision, None)
            self._listed.add(prefix)
            self._ready.notify_all()
        return revision

    def _run(self, prefix: str) -> None:
        start = 0
        failing = False
        while not self._stopping.is_set():
            try:
                if start == 0:
                    start = self._relist(prefix) + 1
                    self.on_change()
                result = self.store.watch(prefix, start, self.timeout)
                if failing:
                    log.info("watch on %s works again", prefix)
                    failing = False
                if result.compacted:
                    log.info("watch on %s fell behind compaction; re-listing", prefix)
                    start = 0
                    continue
                changed = False
                with self._lock:
                    for event in result.events:
                        changed |= self._set(event.key, event.revision, event.value if event.kind == "put" else None)
                if result.events:
                    start = result.events[-1].revision + 1
                    self._prune(prefix, start)
                if changed:
                    self.on_change()
            except Exception as err:  # datastore down: keep trying, re-list when back
                if not failing:
                    log.warning("watch on %s failed: %s", prefix, err)
                failing = True
                start = 0
                self._stopping.wait(1.0)
