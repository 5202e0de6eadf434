"""The datastore contract: what every backend must do, asserted on resulting state."""

from __future__ import annotations

import threading
import time

from canal.datastore.base import Delete, Guard, Put
from canal.datastore.local import LocalDatastore


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
    time.sleep(1.3)
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


def test_local_store_survives_reopen(tmp_path):
    path = str(tmp_path / "db")
    first = LocalDatastore(path)
    first.put("/durable", {"x": 1})
    first.close()
    second = LocalDatastore(path)
    assert second.get_json("/durable") == {"x": 1}
    second.close()


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
