"""The datastore contract: what every backend must do, asserted on resulting state."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from canal.config import Config
from canal.datastore.base import Delete, Guard, Put, open_datastore
from canal.datastore.etcd import EtcdDatastore
from canal.datastore.local import LocalDatastore
from canal.errors import Unavailable


def test_put_get_list_sorted_by_key(store):
    store.put("/a/2", {"n": 2})
    store.put("/a/1", {"n": 1})
    store.put("/b/1", {"n": 3})
    entries, rev = store.list("/a/")
    assert [e.key for e in entries] == ["/a/1", "/a/2"]
    assert [e.json()["n"] for e in entries] == [1, 2]
    assert rev >= max(e.mod_revision for e in entries)
    assert store.get_json("/b/1") == {"n": 3}
    assert store.get("/missing") is None


def test_list_keys_sorted_without_values_and_expired_leases(store):
    store.put("/a/2", {"n": 2})
    store.put("/a/1", {"n": 1})
    store.put("/ab", {"n": 0})  # shares the text prefix "/a" but not the directory
    lease = store.grant(1)
    store.put("/a/3", {"n": 3}, lease=lease)
    assert store.list_keys("/a/") == ("/a/1", "/a/2", "/a/3")
    assert store.list_keys("/a/") == tuple(e.key for e in store.list("/a/")[0])  # the same keys as list()
    store.revoke(lease)
    assert store.list_keys("/a/") == ("/a/1", "/a/2")
    assert store.list_keys("/none/") == ()


def test_create_only_if_absent(store):
    assert store.create("/k", 1) is True
    assert store.create("/k", 2) is False
    assert store.get_json("/k") == 1


def test_txn_is_all_or_nothing(store):
    store.put("/x", "old")
    rev = store.get("/x").mod_revision
    assert not store.txn([Guard("/x", rev + 100)], [Put("/x", '"new"'), Put("/y", '"y"')])
    assert store.get_json("/x") == "old" and store.get("/y") is None
    assert store.txn([Guard("/x", rev)], [Put("/x", '"new"'), Delete("/missing"), Put("/y", '"y"')])
    assert store.get_json("/x") == "new" and store.get_json("/y") == "y"


def test_revisions_grow_and_create_revision_sticks(store):
    store.put("/k", 1)
    first = store.get("/k")
    store.put("/k", 2)
    second = store.get("/k")
    assert second.mod_revision > first.mod_revision
    assert second.create_revision == first.create_revision


def test_update_is_atomic_under_contention(store):
    store.put("/counter", 0)

    def bump():
        for _ in range(20):
            store.update("/counter", lambda n: n + 1)

    threads = [threading.Thread(target=bump) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get_json("/counter") == 100


def test_update_returning_none_deletes(store):
    store.put("/k", 1)
    store.update("/k", lambda old: None)
    assert store.get("/k") is None
    store.update("/absent", lambda old: None)  # no-op, no error


def test_lease_expiry_removes_keys(store):
    lease = store.grant(1)
    store.put("/leased", "v", lease=lease)
    store.put("/kept", "v")
    assert store.get("/leased") is not None
    # etcd revokes expired leases from a 500 ms loop: the key goes between 1.0 and ~1.5 s.
    time.sleep(1.0)
    deadline = time.monotonic() + 1.5
    while store.get("/leased") is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.get("/leased") is None
    assert store.keepalive(lease) is False
    assert store.get("/kept") is not None


def test_keepalive_extends_lease(store):
    lease = store.grant(2)
    store.put("/leased", "v", lease=lease)
    for _ in range(3):
        time.sleep(0.8)
        assert store.keepalive(lease) is True
    assert store.get("/leased") is not None
    store.revoke(lease)
    assert store.get("/leased") is None


def test_watch_sees_puts_and_deletes_in_order(store):
    _, rev = store.list("/w/")
    store.put("/w/a", 1)
    store.delete("/w/a")
    store.put("/other", 1)
    result = store.watch("/w/", rev + 1, timeout=1)
    assert [(e.kind, e.key) for e in result.events] == [("put", "/w/a"), ("delete", "/w/a")]
    assert not result.compacted


def test_watch_waits_for_a_change(store):
    _, rev = store.list("/w/")
    threading.Timer(0.2, lambda: store.put("/w/late", 1)).start()
    started = time.monotonic()
    result = store.watch("/w/", rev + 1, timeout=5)
    assert [e.key for e in result.events] == ["/w/late"]
    assert time.monotonic() - started < 4


def test_watch_times_out_empty(store):
    _, rev = store.list("/w/")
    result = store.watch("/w/", rev + 1, timeout=0.2)
    assert result.events == [] and not result.compacted


def test_watch_resumed_from_its_revision_sees_every_event_once(store):
    _, rev = store.list("/r/")
    expected = []
    for i in range(12):
        store.put(f"/r/{i % 3}", i)
        expected.append(("put", f"/r/{i % 3}", str(i)))
        store.put("/elsewhere", i)
        if i % 4 == 3:
            store.delete(f"/r/{i % 3}")
            expected.append(("delete", f"/r/{i % 3}", ""))
    seen = []
    empty_rounds = 0
    while empty_rounds < 2:  # an empty answer must not skip anything either
        result = store.watch("/r/", rev + 1, timeout=0.3)
        assert not result.compacted
        seen += [(e.kind, e.key, e.value) for e in result.events]
        empty_rounds += not result.events
        assert result.revision >= rev
        rev = result.revision
    store.put("/r/late", "x")
    late = store.watch("/r/", rev + 1, timeout=2)
    assert seen == expected
    assert [(e.kind, e.key) for e in late.events] == [("put", "/r/late")]


def test_local_store_survives_reopen(tmp_path):
    path = str(tmp_path / "db")
    first = LocalDatastore(path)
    first.put("/durable", {"x": 1})
    first.close()
    second = LocalDatastore(path)
    assert second.get_json("/durable") == {"x": 1}
    second.close()


def test_local_leases_ignore_wall_clock_jumps(tmp_path, monkeypatch):
    """The host clock stepped a day forward, then a day back: no lease expires early, and
    renewals keep working (expiries are on the boot clock, not time.time())."""
    boot = [100.0]
    store = LocalDatastore(str(tmp_path / "db"), clock=lambda: boot[0], boot=lambda: "boot-1")
    lease = store.grant(10)
    store.put("/leased", "v", lease=lease)
    wall = time.time()
    monkeypatch.setattr(time, "time", lambda: wall + 86400)  # forward a day
    store.put("/other", "v")  # a write runs the expiry
    assert store.get("/leased") is not None
    boot[0] += 6
    assert store.keepalive(lease) is True
    monkeypatch.setattr(time, "time", lambda: wall - 86400)  # back a day
    boot[0] += 9  # 15 s after the grant, 9 s after the renewal: alive
    store.put("/other", "w")
    assert store.get("/leased") is not None
    # Positive control: unrenewed past its TTL on the boot clock, it goes.
    boot[0] += 2
    store.put("/other", "x")
    assert store.get("/leased") is None and store.keepalive(lease) is False
    store.close()


def test_local_leases_get_a_full_ttl_after_a_reboot(tmp_path):
    """Expiries on the boot clock mean nothing in the next boot: reopened under another boot id
    (or a file from a version with wall-clock expiries), every lease restarts its TTL."""
    path = str(tmp_path / "db")
    first = LocalDatastore(path, clock=lambda: 5000.0, boot=lambda: "boot-1")
    lease = first.grant(10)
    first.put("/leased", "v", lease=lease)
    first.close()
    same = LocalDatastore(path, clock=lambda: 5009.0, boot=lambda: "boot-1")  # same boot: no rebase
    assert same.get("/leased") is not None
    same.close()
    again = LocalDatastore(path, clock=lambda: 3.0, boot=lambda: "boot-2")  # rebooted: clock near 0
    assert again.get("/leased") is not None
    assert again.keepalive(lease) is True
    again.close()
    late = LocalDatastore(path, clock=lambda: 14.0, boot=lambda: "boot-2")
    late.put("/other", "v")
    assert late.get("/leased") is None  # 11 s unrenewed on this boot's clock: expired
    late.close()


def test_local_store_full_says_so_and_recovers(tmp_path):
    """Regression (found by tests/e2e/test_faults.py, the state dir's disk full): SQLite rolls a
    transaction that hit a full disk back by itself, and our second ROLLBACK failed with "cannot
    rollback - no transaction is active", which Docker then showed instead of the reason."""
    store = LocalDatastore(str(tmp_path / "db"))
    store.put("/a", "x")
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count={pages + 1}")  # the disk is full
    with pytest.raises(Unavailable, match="database or disk is full \\(free space on the filesystem of ") as err:
        store.put("/big", "y" * 100000)
    assert "rollback" not in str(err.value)
    assert store.get("/big") is None and store.get_json("/a") == "x"  # nothing half-written
    store._db.execute("PRAGMA max_page_count=1073741823")  # space freed
    store.put("/big", "y" * 100000)
    assert store.get("/big") is not None
    store.close()


def test_local_watch_behind_compaction_reports_it(tmp_path):
    import canal.datastore.local as local

    ds = LocalDatastore(str(tmp_path / "db"))
    old = local.HISTORY
    local.HISTORY = 10
    try:
        for i in range(600):
            ds.put("/c/k", i)
        assert ds.watch("/c/", 1, timeout=0).compacted
    finally:
        local.HISTORY = old
        ds.close()


# etcd only: what the shared contract cannot show — compaction, outages, failover. ---------


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(call):
    """(exception raised by call, seconds it took)."""
    started = time.monotonic()
    with pytest.raises(Unavailable) as err:
        call()
    return err.value, time.monotonic() - started


def test_open_datastore_builds_the_etcd_backend():
    ds = open_datastore(Config(datastore="etcd", etcd_endpoints="http://a:1,http://b:2", etcd_timeout=2.5))
    assert isinstance(ds, EtcdDatastore)
    assert ds.endpoints == ["http://a:1", "http://b:2"] and ds.timeout == 2.5
    ds.close()


def test_etcd_watch_behind_compaction_reports_it(etcd_server, monkeypatch):
    etcd_server.wipe()
    ds = EtcdDatastore(etcd_server.endpoint, timeout=2)
    try:
        ds.put("/c/k", 0)
        first = ds.get("/c/k").mod_revision
        for i in range(1, 5):
            ds.put("/c/k", i)
        _, rev = ds.list("/c/")
        etcd_server.etcdctl("compact", str(rev))
        result = ds.watch("/c/", first, timeout=0)
        assert result.compacted and result.events == [] and result.revision == rev
        # The compaction revision itself is still in history.
        kept = ds.watch("/c/", rev, timeout=2)
        assert not kept.compacted and [(e.revision, e.value) for e in kept.events] == [(rev, "4")]
        # etcd's own notice (sent from its watcher-sync loop) is understood as well, for a
        # compaction that lands between the range check and the watch.
        monkeypatch.setattr(ds, "_compacted_at", lambda key, revision: None)
        late = ds.watch("/c/", first, timeout=2)
        assert late.compacted and late.events == [] and late.revision == rev
    finally:
        ds.close()


def test_etcd_watch_stream_delivers_every_batch_on_one_watch(etcd_server, monkeypatch):
    """The mirror's stream stays open across batches: one watch request per stream, however
    many batches (re-creating it after each was two requests and a round trip per batch)."""
    etcd_server.wipe()
    ds = EtcdDatastore(etcd_server.endpoint, timeout=2)
    posts = []
    post = ds._session.post
    monkeypatch.setattr(ds._session, "post", lambda url, **kw: (posts.append(url), post(url, **kw))[1])
    try:
        ds.put("/s/a", 1)
        start = ds.get("/s/a").mod_revision
        stream = ds.watch_stream("/s/", start, timeout=3)
        first = next(stream)
        assert [(e.key, e.value) for e in first.events] == [("/s/a", "1")]
        ds.put("/s/b", 2)  # written after the first batch was handed out: same stream
        second = next(stream)
        assert [(e.key, e.value) for e in second.events] == [("/s/b", "2")]
        ds.delete("/s/a")
        third = next(stream)
        assert [(e.kind, e.key) for e in third.events] == [("delete", "/s/a")]
        assert list(stream) == []  # the deadline ends it, nothing more to say
        assert sum(url.endswith("/v3/watch") for url in posts) == 1
        # control: watch() is one batch per request
        before = sum(url.endswith("/v3/watch") for url in posts)
        ds.put("/s/c", 3)
        assert ds.watch("/s/", third.revision + 1, timeout=2).events[0].key == "/s/c"
        assert sum(url.endswith("/v3/watch") for url in posts) == before + 1
        # nothing at all: one empty result at the deadline, as watch() gives
        idle = list(ds.watch_stream("/s/", third.revision + 2, timeout=0.3))
        assert len(idle) == 1 and idle[0].events == [] and not idle[0].compacted
    finally:
        ds.close()


def test_etcd_stopped_raises_unavailable_fast_then_recovers(make_etcd):
    server = make_etcd()
    ds = EtcdDatastore(server.endpoint, timeout=1.0)
    ds.put("/durable", {"x": 1})
    lease = ds.grant(60)
    _, rev = ds.list("/")
    killer = threading.Timer(0.3, server.stop)  # dies while a watch is waiting
    killer.start()
    err, took = timed(lambda: ds.watch("/", rev + 1, timeout=10))
    # Until stop() has reaped etcd, Popen.poll() from this thread says "running" (the waitpid
    # lock is held) and start() below would return at once: CI saw that race.
    killer.join()
    assert took < 5 and f"etcd {server.endpoint} unreachable during watch" in str(err)  # not the watch's 10 s
    calls = {
        "get": lambda: ds.get("/durable"),
        "list": lambda: ds.list("/"),
        "txn": lambda: ds.put("/new", 1),
        "grant": lambda: ds.grant(10),
        "keepalive": lambda: ds.keepalive(lease),
        "revoke": lambda: ds.revoke(lease + 1),
        "watch": lambda: ds.watch("/", rev + 1, timeout=10),
    }
    for op, call in calls.items():
        err, took = timed(call)
        assert took < 5, (op, took)  # refused at once, not waited out (margin: a loaded 2-core CI)
        assert str(err).startswith(f"etcd {server.endpoint} unreachable during {op}: "), str(err)
        # A pooled connection to the stopped etcd may see a reset before later ones are refused.
        assert "Connection refused" in str(err) or "Connection reset by peer" in str(err), str(err)
    server.start()  # same data dir, same EtcdDatastore object
    assert ds.get_json("/durable") == {"x": 1}
    assert ds.keepalive(lease) is True
    ds.put("/after", 2)
    assert [e.key for e in ds.watch("/", rev + 1, timeout=2).events] == ["/after"]
    ds.close()


def test_etcd_hung_times_out_then_recovers(make_etcd):
    server = make_etcd()
    ds = EtcdDatastore(server.endpoint, timeout=0.5)
    ds.put("/k", 1)  # leaves a pooled connection to a server about to hang
    _, rev = ds.list("/")
    server.pause()
    try:
        for op, call in (
            ("get", lambda: ds.get("/k")),
            ("txn", lambda: ds.put("/k", 2)),
            ("watch", lambda: ds.watch("/", rev + 1, timeout=10)),
        ):
            err, took = timed(call)
            # Bounded by the 0.5 s timeout, not by the hung server (forever) nor the watch's 10 s;
            # the margin is for a loaded 2-core machine (a 1.5 s bound failed there).
            assert took < 5, (op, took)
            assert f"etcd {server.endpoint} unreachable during {op}: no answer within 0.5 s" in str(err)
        assert "may or may not have been applied" in str(timed(lambda: ds.put("/k", 3))[0])
    finally:
        server.resume()
    assert ds.get_json("/k") in (1, 2, 3)  # the timed-out txns may have landed after all
    ds.put("/k", 4)
    assert ds.get_json("/k") == 4
    ds.close()


def test_etcd_fails_over_past_a_dead_endpoint(etcd_server):
    etcd_server.wipe()
    dead = f"http://127.0.0.1:{unused_port()}"
    ds = EtcdDatastore(f"{dead},{etcd_server.endpoint}", timeout=1.0)
    ds.put("/counter", 0)  # a refused txn was never sent, so it moves on too

    def bump():
        for _ in range(10):
            ds.update("/counter", lambda n: n + 1)

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ds.get_json("/counter") == 80
    ds.close()


def test_etcd_fails_over_past_a_hung_endpoint(etcd_server):
    etcd_server.wipe()
    with socket.socket() as hole:  # accepts connections (kernel backlog), never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        endpoints = f"http://127.0.0.1:{hole.getsockname()[1]},{etcd_server.endpoint}"
        reads = EtcdDatastore(endpoints, timeout=0.5)
        started = time.monotonic()
        assert reads.get("/x") is None  # one timeout, then the next endpoint, same call
        assert 0.5 <= time.monotonic() - started < 5
        started = time.monotonic()
        reads.put("/x", 1)  # later calls start from the endpoint that worked
        assert time.monotonic() - started < 0.5  # the silent endpoint first would cost its 0.5 s
        reads.close()
        # A txn that reached a silent endpoint is not replayed elsewhere (it might have
        # been applied): the caller hears the outcome is unknown, and the next call works.
        writes = EtcdDatastore(endpoints, timeout=0.5)
        err, took = timed(lambda: writes.put("/y", 1))
        assert "may or may not have been applied" in str(err) and took < 5
        assert writes.get("/y") is None
        writes.put("/y", 2)
        assert writes.get_json("/y") == 2
        writes.close()


def test_etcd_all_endpoints_down_names_each():
    endpoints = [f"http://127.0.0.1:{unused_port()}" for _ in range(2)]
    ds = EtcdDatastore(",".join(endpoints), timeout=1.0)
    err, took = timed(lambda: ds.get("/k"))
    assert took < 2  # refused by both at once; waiting out each 1 s timeout would take 2 s
    for endpoint in endpoints:
        assert f"etcd {endpoint} unreachable during get: Connection refused" in str(err)
    ds.close()


def test_etcd_lists_in_pages_pinned_to_one_revision(etcd_server):
    """A big directory is read in pages (one range of 100,000 records outlasts the timeout);
    a write landing between two pages is not in the list, whose revision predates it."""
    etcd_server.wipe()
    ds = EtcdDatastore(etcd_server.endpoint, timeout=5.0)
    try:
        for i in range(23):
            ds.put(f"/p/{i:03d}", i)
        ranges = []
        call = ds._call

        def counting(op, path, body, *args, **kwargs):
            if path == "/v3/kv/range" and "limit" in body:
                ranges.append(body)
                if len(ranges) == 2:  # between the first and second page
                    ds.put("/p/999", "late")
                    ds.delete("/p/020")
            return call(op, path, body, *args, **kwargs)

        ds._call = counting  # type: ignore[method-assign]
        entries, revision = ds.list("/p/", page=5)
        assert [e.key for e in entries] == [f"/p/{i:03d}" for i in range(23)]
        assert len(ranges) == 5 and all(r.get("revision") == str(revision) for r in ranges[1:])
        ds._call = call  # type: ignore[method-assign]
        assert [e.key for e in ds.list("/p/")[0]][-2:] == ["/p/022", "/p/999"]  # one page, current
    finally:
        ds.close()
