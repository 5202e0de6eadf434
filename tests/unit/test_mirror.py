"""The agent's in-memory mirror: own commits, watch events and re-lists in any order."""

from __future__ import annotations

import dataclasses
import sys

import threading
import time

import pytest

from canal.agent.mirror import Held, Mirror
from canal.datastore.base import Delete, Put
from canal.records import RecordError


def mirror(store, prefixes=("/c/",)):
    changes = threading.Event()
    m = Mirror(store, list(prefixes), changes.set, timeout=0.2)
    m.start()
    assert m.wait_ready(5)
    return m, changes


def until(check, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_initial_list_and_own_commits_are_seen_at_once(store):
    store.put("/c/a/1", {"v": 1})
    m, changes = mirror(store)
    try:
        assert m.json("/c/a/") == {"1": {"v": 1}}
        changes.clear()
        store.put("/c/a/2", {"v": 2})  # visible without waiting for the watch
        assert m.json("/c/a/") == {"1": {"v": 1}, "2": {"v": 2}}
        assert changes.is_set()
        store.delete("/c/a/1")
        assert m.json("/c/a/") == {"2": {"v": 2}}
    finally:
        m.stop()


def test_writes_from_elsewhere_arrive_by_watch(store, tmp_path):
    m, _ = mirror(store)
    try:
        # A second writer that the mirror's hook does not see (another host, another process).
        other = type(store).__new__(type(store))
        other.__dict__.update({k: v for k, v in store.__dict__.items() if k != "commit_hooks"})
        other.txn([], [Put("/c/b/x", '"remote"')])
        until(lambda: m.json("/c/b/") == {"x": "remote"})
        other.txn([], [Delete("/c/b/x")])
        until(lambda: m.json("/c/b/") == {})
    finally:
        m.stop()


def test_older_updates_never_overwrite_newer(store):
    m, _ = mirror(store)
    try:
        m._commit(100, [Put("/c/k/1", '"new"')])
        m._commit(50, [Put("/c/k/1", '"old"')])  # a late watch event of an earlier write
        assert m.json("/c/k/") == {"1": "new"}
        m._commit(40, [Delete("/c/k/1")])
        assert m.json("/c/k/") == {"1": "new"}
        m._commit(101, [Delete("/c/k/1")])
        assert m.json("/c/k/") == {}
    finally:
        m.stop()


def test_keys_outside_the_prefixes_are_ignored_and_reads_are_per_directory(store):
    m, _ = mirror(store)
    try:
        store.put("/elsewhere/x", 1)
        store.put("/c/ipam/addresses/0a000001", {"ip": "10.0.0.1"})
        store.put("/c/endpoints/e1", {"id": "e1"})
        assert m.json("/c/endpoints/") == {"e1": {"id": "e1"}}
        assert "0a000001" not in str(m.json("/c/endpoints/"))
        assert m.json("/c/").keys() == {"ipam/addresses/0a000001", "endpoints/e1"}
    finally:
        m.stop()


def test_relist_drops_keys_deleted_while_not_watching(store):
    m, _ = mirror(store)
    try:
        m._commit(10 ** 9, [Put("/c/z/newer", '"mine"')])  # an own commit newer than any list
        m._set("/c/z/ghost", 1, '"stale"')
        m._relist("/c/")
        assert m.json("/c/z/") == {"newer": "mine"}
    finally:
        m.stop()


def test_two_parsers_of_one_directory_never_get_each_others_records(store):
    store.put("/c/d/1", {"v": 1})
    m, _ = mirror(store)
    try:
        def as_int(rel, raw):
            return raw["v"]

        def as_text(rel, raw):
            return str(raw["v"])

        assert m.records("/c/d/", as_int) == {"1": 1}
        assert m.records("/c/d/", as_text) == {"1": "1"}  # not the other parser's cached int
        assert m.records("/c/d/", as_int) == {"1": 1}
        assert m.json("/c/d/") == {"1": {"v": 1}}
    finally:
        m.stop()


def test_view_journals_only_the_keys_that_changed(store):
    store.put("/c/e/1", {"v": 1})
    store.put("/c/e/2", {"v": 2})
    m, _ = mirror(store)
    try:
        def parse(rel, raw):
            if "v" not in raw:
                raise RecordError("no v")
            return raw["v"]

        view = m.view("/c/e/", parse)
        assert view.refresh() == {"1", "2"} and dict(view) == {"1": 1, "2": 2}
        assert view.refresh() == set()  # nothing changed: nothing to do
        store.put("/c/e/3", {"v": 3})
        store.delete("/c/e/1")
        m._commit(10**9, [Put("/c/e/2", '{"v": 2}')])  # a newer revision, same value: journalled
        store.put("/c/other/9", {"v": 9})  # outside the view
        assert view.refresh() == {"1", "2", "3"}
        assert dict(view) == {"2": 2, "3": 3}
        m._commit(10**9 + 1, [Put("/c/e/4", '{"no v": 1}')])  # malformed: quarantined, absent
        assert view.refresh() == set() and "/c/e/4" in m.quarantined and "4" not in view
        m._commit(10**9 + 2, [Put("/c/e/3", "not json")])  # a good record turning bad: gone
        assert view.refresh() == {"3"} and dict(view) == {"2": 2}
    finally:
        m.stop()


def test_a_kept_view_holds_only_what_keep_accepts_and_journals_what_leaves(store):
    store.put("/c/e/1", {"host": "h1"})
    store.put("/c/e/2", {"host": "h2"})
    m, _ = mirror(store)
    try:
        view = m.view("/c/e/", lambda rel, raw: raw["host"], keep=lambda host: host == "h1")
        assert view.refresh() == {"1"} and dict(view) == {"1": "h1"}  # h2's never held
        store.put("/c/e/1", {"host": "h2"})  # moved away: leaves the view, journalled
        store.put("/c/e/2", {"host": "h1"})  # moved here: enters it
        assert view.refresh() == {"1", "2"} and dict(view) == {"2": "h1"}
        store.put("/c/e/3", {"host": "h2"})  # another host's new record: no change here
        assert view.refresh() == set() and dict(view) == {"2": "h1"}
    finally:
        m.stop()


def test_quiet_directories_are_kept_current_without_asking_for_a_pass(store):
    changes = threading.Event()
    m = Mirror(store, ["/c/"], changes.set, timeout=0.2, quiet=("/c/hosts/",))
    m.start()
    try:
        assert m.wait_ready(5)
        until(changes.is_set)  # the first list asks for one
        changes.clear()
        m._commit(100, [Put("/c/hosts/h1", '"renewed"')])  # a host's renewal
        assert m.json("/c/hosts/") == {"h1": "renewed"} and not changes.is_set()
        m._commit(101, [Put("/c/endpoints/e1", '"joined"')])  # control: a record a pass reads
        assert changes.is_set()
    finally:
        m.stop()


def test_prune_forgets_only_old_deletions_and_visits_only_them(store):
    m, _ = mirror(store)
    try:
        m._commit(10, [Put("/c/k/live", '"x"'), Put("/c/k/gone", '"y"'), Put("/c/k/back", '"z"')])
        m._commit(11, [Delete("/c/k/gone"), Delete("/c/k/back")])
        m._commit(12, [Put("/c/k/back", '"again"')])  # re-created: no longer a deletion
        m._commit(20, [Delete("/c/k/late")])  # a deletion newer than the watch position
        assert set(m._deleted) == {"/c/k/gone", "/c/k/late"}
        m._prune("/c/", below=15)
        entries = m._dirs["/c/k/"]
        assert "gone" not in entries and entries["late"] == (20, None)  # filed by name in the directory
        assert set(m._deleted) == {"/c/k/late"}
        assert m.json("/c/k/") == {"live": "x", "back": "again"}
        m._commit(13, [Put("/c/k/late", '"stale"')])  # older than the remembered deletion: refused
        assert m.json("/c/k/") == {"live": "x", "back": "again"}
    finally:
        m.stop()


def _host_of(rel, raw):
    if not isinstance(raw, dict) or not isinstance(raw.get("host"), str):
        raise RecordError("no host")
    return {"host": raw["host"], "n": raw.get("n", 0)}


def test_a_held_directory_keeps_records_parsed_once_and_no_text(store):
    store.put("/c/e/1", {"host": "h1"})
    store.put("/c/other/1", {"host": "h1"})
    m = Mirror(store, ["/c/"], lambda: None, timeout=0.2, held={"/c/e/": Held(_host_of)})
    m.start()
    try:
        assert m.wait_ready(5)
        store.put("/c/e/2", {"host": "h2"})  # an own commit: parsed on arrival too
        held = m._dirs["/c/e/"]
        assert all(isinstance(v, dict) for _, v in held.values())  # typed only: no JSON text kept
        assert isinstance(m._dirs["/c/other/"]["1"][1], str)  # control: other directories keep text
        view = m.view("/c/e/", _host_of)
        assert view.refresh() == {"1", "2"}
        records = m.records("/c/e/", _host_of)
        assert records == {"1": {"host": "h1", "n": 0}, "2": {"host": "h2", "n": 0}}
        assert view["1"] is records["1"]  # one parsed copy for every reader
        store.put("/c/e/1", {"host": "h1", "n": 1})
        store.delete("/c/e/2")
        assert view.refresh() == {"1", "2"} and dict(view) == {"1": {"host": "h1", "n": 1}}
    finally:
        m.stop()


def test_a_held_directory_refuses_another_parser_and_overlapping_reads(store):
    m = Mirror(store, ["/c/"], lambda: None, timeout=0.2, held={"/c/e/": Held(_host_of)})
    m.start()
    try:
        assert m.wait_ready(5)
        with pytest.raises(ValueError, match="held typed by _host_of"):
            m.records("/c/e/", lambda rel, raw: raw)
        with pytest.raises(ValueError, match="overlaps the held directory /c/e/"):
            m.json("/c/")
        with pytest.raises(ValueError, match="held typed"):
            m.view("/c/e/", lambda rel, raw: raw)
    finally:
        m.stop()


@dataclasses.dataclass(frozen=True)
class _Named:
    id: str
    host: str


def _named(rel, raw):
    return _Named(sys.intern(raw["id"]), raw["host"])


def test_views_hold_only_kept_records_under_the_records_own_id_string(store):
    for n, host in enumerate(["h1", "h2", "h2", "h1"]):
        store.put(f"/c/n/id{n}", {"id": f"id{n}", "host": host})
    m = Mirror(store, ["/c/"], lambda: None, timeout=0.2, held={"/c/n/": Held(_named)})
    m.start()
    try:
        assert m.wait_ready(5)
        everything = m.view("/c/n/", _named)
        ours = m.view("/c/n/", _named, keep=lambda r: r.host == "h1")
        assert everything.refresh() == {"id0", "id1", "id2", "id3"} and ours.refresh() == {"id0", "id3"}
        # The key is the record's own id object, not a second copy of the string, in the views
        # and in the mirror (the parser interns the id, as canal.records does).
        assert all(key is record.id for key, record in everything.items())
        assert all(name is record.id for name, (_rev, record) in m._dirs["/c/n/"].items())
        # Others' records leave no key or revision behind in a view that does not keep them;
        # control: the view that keeps them has them.
        assert set(ours._revisions) == {"id0", "id3"} and set(everything._revisions) == set(everything)
        store.put("/c/n/id0", {"id": "id0", "host": "h2"})  # leaves ours, stays in everything
        assert ours.refresh() == {"id0"} and set(ours._revisions) == {"id3"}
        assert everything.refresh() == {"id0"} and everything["id0"].host == "h2"
    finally:
        m.stop()


def test_a_held_directory_keeps_only_wanted_records_and_quarantines_bad_ones(store):
    store.put("/c/a/1", {"host": "h1"})
    store.put("/c/a/2", {"host": "h2"})
    m = Mirror(store, ["/c/"], lambda: None, timeout=0.2,
               held={"/c/a/": Held(_host_of, wanted=lambda raw: raw.get("host") != "h2")})
    m.start()
    try:
        assert m.wait_ready(5)
        view = m.view("/c/a/", _host_of)
        assert view.refresh() == {"1"} and m.records("/c/a/", _host_of) == {"1": {"host": "h1", "n": 0}}
        # Unwanted: kept as a deletion is, so nothing once the list's revision is passed.
        assert "2" not in m._dirs["/c/a/"] and "/c/a/2" not in m._deleted
        store.put("/c/a/2", {"host": "h1"})  # now wanted: enters
        store.put("/c/a/1", {"host": "h2"})  # no longer wanted: leaves
        assert view.refresh() == {"1", "2"} and set(view) == {"2"}
        store.put("/c/a/3", {"nohost": True})  # wanted (not h2) but malformed: quarantined
        assert view.refresh() == set() and "/c/a/3" in m.quarantined
        store.put("/c/a/3", {"host": "h1"})  # fixed: back, quarantine lifted
        assert view.refresh() == {"3"} and "/c/a/3" not in m.quarantined
        m._relist("/c/")  # a re-list of the same state changes nothing
        assert view.refresh() == set() and set(view) == {"2", "3"}
    finally:
        m.stop()
