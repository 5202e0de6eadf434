"""Embedded datastore: SQLite (standard library) in WAL mode, durable, no extra service.

It mirrors etcd's revision model — one global revision bumped per transaction, per-key
create/mod revisions, leases with TTL, and a bounded event history for watches — so the
services above cannot tell it from etcd. SQLite's own locking keeps it correct across
processes (the plugin and a CLI reading the file); a lock keeps one connection safe across
the plugin's threads.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from typing import Callable, Sequence

from canal import metrics
from canal.datastore.base import (
    Datastore,
    Delete,
    Entry,
    Event,
    Guard,
    Op,
    Put,
    WatchResult,
)
from canal.errors import Unavailable

HISTORY = 10000  # events kept for watchers; older ones are compacted away

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value TEXT NOT NULL,
    create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL, lease INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS kv_lease ON kv(lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY AUTOINCREMENT, ttl INTEGER NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    rev INTEGER NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL,
    value TEXT NOT NULL, PRIMARY KEY (rev, seq));
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 1), ('compacted', 0);
CREATE TABLE IF NOT EXISTS clock (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def boot_clock() -> float:
    """Seconds since boot, suspend included (CLOCK_BOOTTIME): one clock for every process of
    the machine that never jumps with the wall clock (NTP steps, a wrong RTC, an admin's date)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def boot_id(path: str = "/proc/sys/kernel/random/boot_id") -> str:
    """This boot's identity: lease expiries on the boot clock mean nothing after a reboot."""
    try:
        with open(path, encoding="ascii") as source:
            return source.read().strip()
    except OSError:
        return ""


class LocalDatastore(Datastore):
    metrics_backend = "local"

    def __init__(self, path: str, busy_timeout: float = 5.0, clock: Callable[[], float] = boot_clock,
                 boot: Callable[[], str] = boot_id):
        # Lease expiries are kept on `clock` (the boot clock), not the wall clock: a clock
        # stepped forward would expire every lease at once, one stepped back would keep dead
        # ones. After a reboot (another boot id) every lease gets its full TTL again, as etcd
        # gives them on a new leader: their holders have as long to come back and renew.
        self._clock = clock
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        self.path = path
        try:
            self._db = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as err:
            raise Unavailable(f"cannot open the embedded datastore {path}: {err}") from err
        os.chmod(path, 0o600)
        self._busy_timeout = busy_timeout
        self._revision = 0  # of this process's last committed write
        self._lock = threading.RLock()  # serialises writers on the one write connection
        self._changed = threading.Condition(self._lock)
        self._readers = threading.local()  # WAL readers never wait for a writer's fsync
        self._rebase(boot())

    def _rebase(self, boot: str) -> None:
        """Leases written in another boot (or by a version keeping wall-clock expiries, which
        wrote no boot id) restart their TTL on this boot's clock."""
        def body(cur: sqlite3.Cursor, events: list[tuple[str, str, str]]) -> None:
            row = cur.execute("SELECT value FROM clock WHERE name='boot'").fetchone()
            if row is None or row[0] != boot:
                cur.execute("UPDATE leases SET expires = ? + ttl", (self._clock(),))
                cur.execute("INSERT OR REPLACE INTO clock VALUES ('boot', ?)", (boot,))

        self._write(body, expire=False)

    # Transactions -------------------------------------------------------------------------

    def _write(self, body, expire: bool = True):  # type: ignore[no-untyped-def]
        """Run body(cursor, next_revision) in one IMMEDIATE transaction; expire leases first."""
        with self._lock:
            try:
                cur = self._db.cursor()
                cur.execute("BEGIN IMMEDIATE")
                try:
                    rev = cur.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0]
                    events: list[tuple[str, str, str]] = []
                    if expire:
                        self._expire(cur, events)
                    result = body(cur, events)
                    if events:
                        rev += 1
                        cur.executemany(
                            "INSERT INTO events VALUES (?,?,?,?,?)",
                            [(rev, i, k, key, v) for i, (k, key, v) in enumerate(events)],
                        )
                        cur.execute(
                            "UPDATE kv SET mod_rev=? WHERE mod_rev=-1", (rev,)
                        )
                        cur.execute("UPDATE kv SET create_rev=? WHERE create_rev=-1", (rev,))
                        cur.execute("UPDATE meta SET value=? WHERE name='revision'", (rev,))
                        if rev % 500 == 0:
                            floor = rev - HISTORY
                            cur.execute("DELETE FROM events WHERE rev <= ?", (floor,))
                            cur.execute(
                                "UPDATE meta SET value=max(value, ?) WHERE name='compacted'", (floor,)
                            )
                    cur.execute("COMMIT")
                    self._revision = rev
                except BaseException:
                    # SQLite rolls some failures back by itself (a full disk): a second
                    # ROLLBACK would fail and hide why the write failed.
                    if self._db.in_transaction:
                        cur.execute("ROLLBACK")
                    raise
            except sqlite3.Error as err:
                hint = f" (free space on the filesystem of {os.path.dirname(os.path.abspath(self.path))})" \
                    if isinstance(err, sqlite3.OperationalError) and "full" in str(err) else ""
                raise Unavailable(f"embedded datastore {self.path}: {err}{hint}") from err
            if events:
                self._changed.notify_all()
            return result

    def _expire(self, cur: sqlite3.Cursor, events: list[tuple[str, str, str]]) -> None:
        expired = [r[0] for r in cur.execute("SELECT id FROM leases WHERE expires < ?", (self._clock(),))]
        for lease in expired:
            LocalDatastore._drop_lease(cur, lease, events)

    @staticmethod
    def _drop_lease(cur: sqlite3.Cursor, lease: int, events: list[tuple[str, str, str]]) -> None:
        for (key,) in cur.execute("SELECT key FROM kv WHERE lease=?", (lease,)).fetchall():
            events.append(("delete", key, ""))
        cur.execute("DELETE FROM kv WHERE lease=?", (lease,))
        cur.execute("DELETE FROM leases WHERE id=?", (lease,))

    @metrics.datastore_request("txn")
    def txn(self, guards: Sequence[Guard], ops: Sequence[Op]) -> bool:
        def body(cur: sqlite3.Cursor, events: list[tuple[str, str, str]]) -> bool:
            for guard in guards:
                row = cur.execute("SELECT mod_rev FROM kv WHERE key=?", (guard.key,)).fetchone()
                if (row[0] if row else 0) != guard.mod_revision:
                    return False
            for op in ops:
                if isinstance(op, Put):
                    if op.lease and not cur.execute(
                        "SELECT 1 FROM leases WHERE id=?", (op.lease,)
                    ).fetchone():
                        raise Unavailable(f"lease {op.lease} for {op.key} has expired")
                    cur.execute(
                        "INSERT INTO kv VALUES (?,?,-1,-1,?) ON CONFLICT(key) DO UPDATE SET "
                        "value=excluded.value, mod_rev=-1, lease=excluded.lease",
                        (op.key, op.value, op.lease),
                    )
                    events.append(("put", op.key, op.value))
                elif isinstance(op, Delete):
                    if cur.execute("DELETE FROM kv WHERE key=?", (op.key,)).rowcount:
                        events.append(("delete", op.key, ""))
            return True

        with self._lock:
            applied = self._write(body)
            if applied and ops:
                self._committed(self._revision, ops)
        return applied

    # Reads --------------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._readers, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
            self._readers.conn = conn
        return conn

    def _read(self, sql: str, args: tuple) -> list[tuple]:
        try:
            return self._reader().execute(sql, args).fetchall()
        except sqlite3.Error as err:
            raise Unavailable(f"embedded datastore {self.path}: {err}") from err

    def _live(self) -> str:
        # Keys of expired-but-not-yet-purged leases are already gone, as in etcd.
        return "(lease = 0 OR lease IN (SELECT id FROM leases WHERE expires >= %r))" % self._clock()

    @metrics.datastore_request("get")
    def get(self, key: str) -> Entry | None:
        rows = self._read(
            "SELECT key, value, mod_rev, create_rev, lease FROM kv WHERE key=? AND " + self._live(),
            (key,),
        )
        return Entry(*rows[0]) if rows else None

    @metrics.datastore_request("list")
    def list(self, prefix: str) -> tuple[list[Entry], int]:
        conn = self._reader()
        try:
            conn.execute("BEGIN")  # one snapshot: the revision matches the rows
            try:
                rows = conn.execute(
                    "SELECT key, value, mod_rev, create_rev, lease FROM kv WHERE key >= ? AND key < ? AND "
                    + self._live()
                    + " ORDER BY key",
                    (prefix, prefix + "\uffff"),
                ).fetchall()
                rev = conn.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0]
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as err:
            raise Unavailable(f"embedded datastore {self.path}: {err}") from err
        return [Entry(*r) for r in rows], rev

    @metrics.datastore_request("list_keys")
    def list_keys(self, prefix: str) -> tuple[str, ...]:
        rows = self._read("SELECT key FROM kv WHERE key >= ? AND key < ? AND " + self._live() + " ORDER BY key",
                          (prefix, prefix + "\uffff"))
        return tuple(row[0] for row in rows)

    # Leases -------------------------------------------------------------------------------

    @metrics.datastore_request("grant")
    def grant(self, ttl: int) -> int:
        def body(cur: sqlite3.Cursor, events: list) -> int:
            cur.execute("INSERT INTO leases (ttl, expires) VALUES (?, ?)", (ttl, self._clock() + ttl))
            return int(cur.lastrowid or 0)

        return self._write(body)

    @metrics.datastore_request("keepalive")
    def keepalive(self, lease: int) -> bool:
        def body(cur: sqlite3.Cursor, events: list) -> bool:
            return bool(
                cur.execute(
                    "UPDATE leases SET expires = ? + ttl WHERE id=?", (self._clock(), lease)
                ).rowcount
            )

        return self._write(body)

    @metrics.datastore_request("revoke")
    def revoke(self, lease: int) -> None:
        self._write(lambda cur, events: self._drop_lease(cur, lease, events))

    # Watch --------------------------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int, timeout: float) -> WatchResult:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                compacted = self._read("SELECT value FROM meta WHERE name='compacted'", ())[0][0]
                if start_revision <= compacted:
                    rev = self._read("SELECT value FROM meta WHERE name='revision'", ())[0][0]
                    return WatchResult([], rev, compacted=True)
                rows = self._read(
                    "SELECT rev, kind, key, value FROM events WHERE rev >= ? AND key >= ? AND key < ? "
                    "ORDER BY rev, seq",
                    (start_revision, prefix, prefix + "\uffff"),
                )
                rev = self._read("SELECT value FROM meta WHERE name='revision'", ())[0][0]
                remaining = deadline - time.monotonic()
                if rows or remaining <= 0:
                    events = [Event(kind, key, value, r) for r, kind, key, value in rows]
                    return WatchResult(events, rev)
                # Other processes may write too: wake up periodically to look.
                self._changed.wait(min(remaining, 0.5))

    def close(self) -> None:
        with self._lock:
            self._db.close()
        conn = getattr(self._readers, "conn", None)
        if conn is not None:
            conn.close()
            self._readers.conn = None
