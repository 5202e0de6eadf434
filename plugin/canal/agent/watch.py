"""Datastore watches as triggers: any change under a prefix asks the agent for a pass.

The agent always recomputes from a fresh list, so a watch that fell behind compaction needs
no replay: it re-lists (by triggering a pass) and resumes from the current revision —
flannel's LeaseWatcher.Reset, without the bookkeeping.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from canal.datastore.base import Datastore

log = logging.getLogger(__name__)


class StoreWatch:
    def __init__(self, store: Datastore, prefixes: list[str], on_change: Callable[[], None], timeout: float = 5.0):
        self.store = store
        self.prefixes = prefixes
        self.on_change = on_change
        self.timeout = timeout
        self._stopping = threading.Event()

    def start(self) -> None:
        for prefix in self.prefixes:
            threading.Thread(target=self._run, args=(prefix,), name=f"canal-watch{prefix}", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()

    def _run(self, prefix: str) -> None:
        start = 0
        failing = False
        while not self._stopping.is_set():
            try:
                if start == 0:
                    _, revision = self.store.list(prefix)
                    start = revision + 1
                    self.on_change()
                result = self.store.watch(prefix, start, self.timeout)
                if failing:
                    log.info("watch on %s works again", prefix)
                    failing = False
                if result.compacted:
                    log.info("watch on %s fell behind compaction; re-listing", prefix)
                    start = 0
                elif result.events:
                    start = result.events[-1].revision + 1
                    self.on_change()
            except Exception as err:  # datastore down: keep trying, re-list when back
                if not failing:
                    log.warning("watch on %s failed: %s", prefix, err)
                failing = True
                start = 0
                self._stopping.wait(1.0)
