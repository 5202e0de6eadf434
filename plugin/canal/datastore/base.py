"""The datastore interface: a revisioned key-value store with guarded transactions and leases.

It is etcd's v3 model on purpose: the embedded SQLite store and the etcd store implement the
same small interface, so every service above (IPAM, subnet leases, endpoints, policies) is
written once, with compare-and-swap transactions as its only concurrency tool, and the same
test suite runs against both backends.
"""

from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, Union

from canal.errors import Conflict, Unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    key: str
    value: str
    mod_revision: int
    create_revision: int
    lease: int = 0

    def json(self) -> Any:
        return json.loads(self.value)


@dataclass(frozen=True)
class Guard:
    """The transaction applies only if `key` is at `mod_revision` (0: the key must be absent)."""

    key: str
    mod_revision: int


@dataclass(frozen=True)
class Put:
    key: str
    value: str
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str


Op = Union[Put, Delete]


@dataclass(frozen=True)
class Event:
    kind: str  # "put" or "delete"
    key: str
    value: str
    revision: int


@dataclass(frozen=True)
class WatchResult:
    events: list[Event]
    revision: int  # resume the next watch from revision + 1
    compacted: bool = False  # history before start_revision is gone: re-list and diff


class Datastore(ABC):
    """Backends raise `Unavailable` for transport failures and timeouts, never hang."""

    # Called as hook(revision, ops) after each successful txn of this process, so an
    # in-memory mirror sees our own writes at once, before their watch events arrive.
    commit_hooks: list[Callable[[int, Sequence[Op]], None]]

    def on_commit(self, hook: Callable[[int, Sequence[Op]], None]) -> None:
        self.__dict__.setdefault("commit_hooks", []).append(hook)

    def _committed(self, revision: int, ops: Sequence[Op]) -> None:
        for hook in self.__dict__.get("commit_hooks", ()):
            hook(revision, ops)

    @abstractmethod
    def get(self, key: str) -> Entry | None: ...

    @abstractmethod
    def list(self, prefix: str) -> tuple[list[Entry], int]:
        """Entries under prefix, sorted by key, and the store revision they were read at."""

    def list_keys(self, prefix: str) -> tuple[str, ...]:
        """The keys under prefix, sorted, without their values: for callers that only ask
        what exists (IPAM's free-address scan reads ~1,500 keys per request on a full host)."""
        return tuple(entry.key for entry in self.list(prefix)[0])

    @abstractmethod
    def txn(self, guards: Sequence[Guard], ops: Sequence[Op]) -> bool:
        """Apply all ops atomically iff every guard holds; False (and nothing done) otherwise."""

    @abstractmethod
    def grant(self, ttl: int) -> int:
        """A new lease; keys put with it vanish `ttl` seconds after its last keepalive."""

    @abstractmethod
    def keepalive(self, lease: int) -> bool:
        """Renew a lease; False if it already expired (its keys are gone)."""

    @abstractmethod
    def revoke(self, lease: int) -> None: ...

    @abstractmethod
    def watch(self, prefix: str, start_revision: int, timeout: float) -> WatchResult:
        """Events under prefix from start_revision on, waiting up to timeout for the first."""

    def watch_stream(self, prefix: str, start_revision: int, timeout: float) -> Iterator[WatchResult]:
        """Batches of events under prefix from start_revision on, as they come, for up to
        `timeout` seconds (a batch resumes after its last event's revision); a compacted start
        ends it with that result. The default: one watch() (at most one batch)."""
        yield self.watch(prefix, start_revision, timeout)

    def close(self) -> None:  # noqa: B027 - a default, not an abstract method
        """Release connections; the default has none."""

    # Helpers shared by every backend, built on the primitives above.

    def get_json(self, key: str) -> Any:
        entry = self.get(key)
        return None if entry is None else entry.json()

    def list_json(self, prefix: str) -> dict[str, Any]:
        """key (relative) -> JSON value; a value that is not JSON is skipped (and logged): one
        bad record must not fail every caller that lists its directory."""
        entries, _ = self.list(prefix)
        out = {}
        for e in entries:
            try:
                out[e.key[len(prefix):]] = e.json()
            except ValueError:
                log.warning("datastore record %r is not JSON; skipped", e.key[:200])
        return out

    def create(self, key: str, value: Any, lease: int = 0) -> bool:
        """Put iff absent: the one primitive that makes allocations unique cluster-wide."""
        return self.txn([Guard(key, 0)], [Put(key, dumps(value), lease)])

    def put(self, key: str, value: Any, lease: int = 0) -> None:
        self.txn([], [Put(key, dumps(value), lease)])

    def delete(self, key: str) -> None:
        self.txn([], [Delete(key)])

    def update(
        self,
        key: str,
        change: Callable[[Any], Any],
        attempts: int = 20,
    ) -> Any:
        """Read-modify-write with compare-and-swap, retried on races.

        `change(old)` gets None when the key is absent and returns the new value, or None to
        delete the key. Returns the new value.
        """
        for attempt in range(attempts):
            entry = self.get(key)
            old = None if entry is None else entry.json()
            new = change(old)
            guard = Guard(key, 0 if entry is None else entry.mod_revision)
            if new is None:
                ops: list[Op] = [Delete(key)] if entry is not None else []
            else:
                ops = [Put(key, dumps(new), entry.lease if entry else 0)]
            if not ops or self.txn([guard], ops):
                return new
            time.sleep(min(0.001 * 2**attempt, 0.05))
        raise Conflict(f"datastore key {key} changed concurrently {attempts} times; try again")


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def open_datastore(config: "Any", check: bool = True) -> Datastore:
    """The backend named by config.datastore; imported lazily so `local` needs no etcd client.

    For etcd, `check` first asks every endpoint once: TLS or credentials etcd refuses raise
    EtcdAccessDenied (a BadRequest naming the setting), so a plugin that could never work
    refuses to start; an etcd that is merely unreachable is only logged (the plugin retries).
    """
    if config.datastore == "etcd":
        from canal.datastore.etcd import EtcdDatastore

        store = EtcdDatastore(
            config.etcd_endpoints,
            timeout=config.etcd_timeout,
            cafile=config.etcd_cafile,
            certfile=config.etcd_certfile,
            keyfile=config.etcd_keyfile,
            username=config.etcd_username,
            password=config.etcd_password_value() if config.etcd_username else "",
        )
        if check:
            try:
                store.check([config.etcd_prefix, config.flannel_prefix])
            except BaseException:
                store.close()
                raise
        return store
    from canal.datastore.local import LocalDatastore

    return LocalDatastore(config.db_path)


__all__ = [
    "Datastore",
    "Delete",
    "Entry",
    "Event",
    "Guard",
    "Op",
    "Put",
    "Unavailable",
    "WatchResult",
    "dumps",
    "open_datastore",
]
