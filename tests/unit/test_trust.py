"""Trust boundaries inside the plugin: quarantine of malformed records, fail-closed policy scopes,
the one-transaction CreateEndpoint, one identity per host name, collection of departed hosts."""

from __future__ import annotations

import ipaddress
import logging
import threading

import pytest
from fakes import FakeLinks

from canal.agent.desired import Snapshot, desired_firewall
from canal.agent.mirror import Mirror
from canal.datastore.keys import Keys
from canal.errors import Conflict, Unavailable
from canal.policy.compiler import endpoint_chain
from canal.policy.model import EGRESS, INGRESS, Policy
from canal.records import EndpointRecord, Lease, NetworkRecord, RecordError
from canal.runtime import _policy_scope, _stored_policy
from canal.services.hosts import Hosts
from canal.services.ipam import DEFAULT_POOL_ID, Ipam
from canal.services.networks import Networks

KEYS = Keys("/canal/v1", "/coreos.com/network")
NET = "a" * 64
GOOD, BAD, OTHER = "e" * 64, "f" * 64, "d" * 64


def endpoint(ep_id, ip, host="h1", **extra):
    return {"id": ep_id, "network": NET, "host": host, "ip": ip, "mac": "02:42:64:40:03:02", "mtu": 1450,
            "joined": True, "created": 1.0, "labels": {}, **extra}


def network(host="h1"):
    return {"id": NET, "host": host, "pools": ["0.0.0.0/0"], "name": "appnet"}


def started_mirror(store):
    m = Mirror(store, [KEYS.root + "/", KEYS.flannel + "/"], lambda: None, timeout=0.2)
    m.start()
    assert m.wait_ready(5)
    return m


def typed_snapshot(m):
    return Snapshot(
        "h1", "100.64.0.0/16",
        m.records(KEYS.networks, lambda k, raw: NetworkRecord.parse(raw, k)),
        m.records(KEYS.endpoints, lambda k, raw: EndpointRecord.parse(raw, k)),
    )


# Quarantine ---------------------------------------------------------------------------------------


def test_a_malformed_record_is_quarantined_and_the_rest_still_programmed(store, caplog):
    store.put(KEYS.network("h1", NET), network())
    store.put(KEYS.endpoint(GOOD), endpoint(GOOD, "100.64.3.2"))
    store.put(KEYS.endpoint(BAD), {**endpoint(BAD, "100.64.3.3"), "ip": None})  # ip: null
    store.put(KEYS.endpoint(OTHER), endpoint(OTHER, "100.64.4.2", host="h2", labels=["a=b"]))  # labels as a list
    m = started_mirror(store)
    try:
        # Positive control: the malformed records, taken as they are, break the pure compute.
        with pytest.raises(RecordError):
            EndpointRecord.parse(store.get_json(KEYS.endpoint(BAD)))
        with caplog.at_level(logging.ERROR, logger="canal.agent.mirror"):
            for _ in range(3):  # every pass: skipped, logged once
                state = desired_firewall(typed_snapshot(m))
        assert ("filter", endpoint_chain(GOOD, EGRESS)) in state.chains
        assert ("filter", endpoint_chain(BAD, EGRESS)) not in state.chains
        assert set(m.quarantined) == {KEYS.endpoint(BAD), KEYS.endpoint(OTHER)}
        assert "field ip is missing" in m.quarantined[KEYS.endpoint(BAD)][1]
        assert sum("quarantined" in r.message for r in caplog.records) == 2
        assert m.quarantined_total == 2
        store.put(KEYS.endpoint(BAD), endpoint(BAD, "100.64.3.3"))  # fixed: back in force
        assert ("filter", endpoint_chain(BAD, EGRESS)) in desired_firewall(typed_snapshot(m)).chains
        assert set(m.quarantined) == {KEYS.endpoint(OTHER)}
        store.delete(KEYS.endpoint(OTHER))  # removed: no longer listed
        typed_snapshot(m)
        assert m.quarantined == {}
    finally:
        m.stop()


def test_a_record_that_is_not_json_is_quarantined_not_fatal(store):
    store.put(KEYS.network("h1", NET), network())
    m = started_mirror(store)
    try:
        from canal.datastore.base import Put

        store.txn([], [Put(KEYS.endpoint(BAD), "{not json")])
        store.put(KEYS.endpoint(GOOD), endpoint(GOOD, "100.64.3.2"))
        assert set(typed_snapshot(m).endpoints) == {GOOD}
        assert m.quarantined[KEYS.endpoint(BAD)][1] == "not JSON"
    finally:
        m.stop()


# Policies that do not parse close their scope ------------------------------------------------------

ALLOW_ALL = {"apiVersion": "canal/v1", "kind": "GlobalNetworkPolicy", "metadata": {"name": "allow"},
             "spec": {"selector": "all()", "ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}]}}


def test_a_stored_policy_that_does_not_parse_fails_closed_for_its_scope(store):
    store.put(KEYS.network("h1", NET), network())
    store.put(KEYS.endpoint(GOOD), endpoint(GOOD, "100.64.3.2"))
    store.put(KEYS.policy(None, "allow"), ALLOW_ALL)
    broken = {**ALLOW_ALL, "metadata": {"name": "deny-db"}, "spec": {"selector": "app == 'db'", "bogus": 1}}
    m = started_mirror(store)
    try:
        policies = m.records(KEYS.policies, _stored_policy)
        snap = typed_snapshot(m)
        open_state = desired_firewall(Snapshot(snap.host, snap.cluster_network, snap.networks, snap.endpoints,
                                               policies=tuple(policies.values())))
        # Positive control: with only valid policies, the endpoint's chains let traffic through.
        assert open_state.chains[("filter", endpoint_chain(GOOD, EGRESS))][-1] == "-j RETURN"
        for scope, key in ((None, KEYS.policy(None, "deny-db")), ("appnet", KEYS.policy("appnet", "deny-db"))):
            store.put(key, broken)
            policies = m.records(KEYS.policies, _stored_policy)
            assert key in m.quarantined and list(policies) == ["global/allow"]
            scopes = {_policy_scope(k[len(KEYS.policies):]) for k in m.quarantined}
            assert scopes == {scope}
            state = desired_firewall(Snapshot(snap.host, snap.cluster_network, snap.networks, snap.endpoints,
                                              policies=tuple(policies.values()), broken_policy_scopes=frozenset(scopes)))
            for direction in (EGRESS, INGRESS):
                assert state.chains[("filter", endpoint_chain(GOOD, direction))][-1] == "-j DROP"
            store.delete(key)
            m.records(KEYS.policies, _stored_policy)
        # A policy of another network's scope leaves this one's endpoints alone.
        state = desired_firewall(Snapshot(snap.host, snap.cluster_network, snap.networks, snap.endpoints,
                                          broken_policy_scopes=frozenset({"othernet"})))
        assert state.chains[("filter", endpoint_chain(GOOD, EGRESS))][-1] == "-j RETURN"
    finally:
        m.stop()


def test_a_policy_stored_under_a_foreign_key_is_refused():
    policy = Policy.from_dict(ALLOW_ALL)
    assert _stored_policy("global/allow", ALLOW_ALL) == policy
    with pytest.raises(Exception, match="another key"):
        _stored_policy("global/other", ALLOW_ALL)
    assert _policy_scope("net/appnet/x") == "appnet" and _policy_scope("weird") is None


# CreateEndpoint: one transaction ------------------------------------------------------------------


class FailingTxn:
    """The datastore, but the next txn touching `key` fails as if the plugin died right then."""

    def __init__(self, store, key):
        self.store, self.key, self.armed = store, key, True

    def __getattr__(self, name):
        return getattr(self.store, name)

    def txn(self, guards, ops):
        if self.armed and any(op.key == self.key for op in ops):
            self.armed = False
            raise Unavailable("etcd went away mid-call")
        return self.store.txn(guards, ops)


class Req:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_create_endpoint_binds_the_address_and_writes_the_record_together(store):
    wrapped = FailingTxn(store, KEYS.endpoint(GOOD))
    ipam = Ipam(wrapped, KEYS, "h1", lambda: ipaddress.IPv4Network("100.64.3.0/24"))
    nets = Networks(wrapped, KEYS, ipam, FakeLinks(), "h1", lambda: 1450, lambda sync: None)
    store.put(KEYS.network("h1", NET), network())
    addr = ipam.request_address(DEFAULT_POOL_ID, "", None)[0]
    req = Req(NetworkID=NET, EndpointID=GOOD, Interface={"Address": addr, "MacAddress": ""}, Options={})
    with pytest.raises(Unavailable):
        nets.create_endpoint(req)
    ip = addr.split("/")[0]
    # Nothing half-done: no endpoint record, the address not bound, so Docker's ReleaseAddress frees it.
    assert store.get(KEYS.endpoint(GOOD)) is None
    assert store.get_json(KEYS.address(ip))["endpoint"] == ""
    assert nets.create_endpoint(req) == {"Interface": {"MacAddress": "02:42:64:40:03:" + f"{int(ip.split('.')[-1]):02x}"}}
    assert nets.create_endpoint(req)  # a replay is idempotent
    assert store.get_json(KEYS.address(ip))["endpoint"] == GOOD
    with pytest.raises(Conflict, match="already used by endpoint"):
        nets.create_endpoint(Req(NetworkID=NET, EndpointID=OTHER, Interface={"Address": addr}, Options={}))
    nets.delete_endpoint(NET, GOOD)
    assert store.get(KEYS.endpoint(GOOD)) is None and store.get_json(KEYS.address(ip))["endpoint"] == ""
    ipam.release_address(DEFAULT_POOL_ID, ip)
    assert store.get(KEYS.address(ip)) is None


def test_concurrent_create_endpoints_for_one_address_bind_it_once(store):
    ipam = Ipam(store, KEYS, "h1", lambda: ipaddress.IPv4Network("100.64.3.0/24"))
    nets = Networks(store, KEYS, ipam, FakeLinks(), "h1", lambda: 1450, lambda sync: None)
    store.put(KEYS.network("h1", NET), network())
    addr = ipam.request_address(DEFAULT_POOL_ID, "", None)[0]
    results: list[str] = []

    def create(ep_id):
        try:
            nets.create_endpoint(Req(NetworkID=NET, EndpointID=ep_id, Interface={"Address": addr}, Options={}))
            results.append(ep_id)
        except Conflict:
            pass

    threads = [threading.Thread(target=create, args=(c * 64,)) for c in "0123456789"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 1
    assert store.get_json(KEYS.address(addr.split("/")[0]))["endpoint"] == results[0]


# One identity per host name -----------------------------------------------------------------------


def lease(store, subnet, public_ip):
    store.put(KEYS.lease(subnet), {"PublicIP": public_ip, "BackendType": "vxlan", "BackendData": {"VtepMAC": "02:00:00:00:00:01"}})


def test_a_second_live_host_with_the_same_name_is_refused(store):
    first = Hosts(store, KEYS, "node", "198.18.0.1")
    first.ensure()
    first.update(lambda r: r.__class__(r.name, r.vtep_mac, ipaddress.IPv4Network("100.64.3.0/24"), r.public_ip, r.renewed))
    lease(store, "100.64.3.0/24", "198.18.0.1")
    clone = Hosts(store, KEYS, "node", "198.18.0.2")
    with pytest.raises(Conflict) as err:
        clone.ensure()
    message = str(err.value)
    assert "198.18.0.1" in message and "198.18.0.2" in message and "--hostname" in message
    assert store.get_json(KEYS.host("node"))["public_ip"] == "198.18.0.1"  # untouched
    first.ensure()  # the rightful owner restarts fine
    # Once the first host's lease is gone (host replaced, readdressed), the name may move.
    store.delete(KEYS.lease("100.64.3.0/24"))
    assert clone.ensure().public_ip == "198.18.0.2"


# Departed hosts -------------------------------------------------------------------------------------


def test_records_of_a_host_gone_for_good_are_collected(store):
    now = [1000.0]
    gone = Hosts(store, KEYS, "gone", "198.18.0.9", clock=lambda: now[0])
    gone.ensure()
    here = Hosts(store, KEYS, "here", "198.18.0.1", clock=lambda: now[0])
    here.ensure()
    store.put(KEYS.network("gone", NET), network("gone"))
    store.put(KEYS.network("here", NET), network("here"))
    ipam = Ipam(store, KEYS, "gone", lambda: ipaddress.IPv4Network("100.64.9.0/24"))
    ip = ipam.request_address(DEFAULT_POOL_ID, "", None)[0].split("/")[0]
    store.put(KEYS.endpoint(OTHER), endpoint(OTHER, ip, host="gone"))
    store.update(KEYS.address(ip), lambda r: {**r, "endpoint": OTHER})
    store.put(KEYS.endpoint(GOOD), endpoint(GOOD, "100.64.3.2", host="here"))
    store.put(KEYS.route("100.64.20.1"), {"ip": "100.64.20.1", "host": "gone", "subnet": "100.64.9.0/24"})
    m = started_mirror(store)
    try:
        leases = [Lease(ipaddress.IPv4Network("100.64.3.0/24"), "198.18.0.1", "")]
        now[0] += 10
        assert here.collect_departed(m.records, leases, ttl=8, min_absence=60) == []  # within 2 TTLs: kept
        now[0] += 30
        assert here.collect_departed(m.records, leases, ttl=8, min_absence=60) == []  # away, not gone
        live = leases + [Lease(ipaddress.IPv4Network("100.64.9.0/24"), "198.18.0.9", "")]
        now[0] += 100
        assert here.collect_departed(m.records, live, ttl=8, min_absence=60) == []  # its lease lives: kept
        assert here.collect_departed(m.records, leases, ttl=8) == []  # the default: a day at least
        assert here.collect_departed(m.records, leases, ttl=8, min_absence=60) == ["gone"]
        left = sorted(k for k in (e.key for e in store.list(KEYS.root + "/")[0]))
        assert left == sorted([KEYS.host("here"), KEYS.network("here", NET), KEYS.endpoint(GOOD)])
    finally:
        m.stop()


def test_a_datastore_outage_is_not_taken_for_departed_hosts(store):
    """Regression (found by tests/e2e/test_faults.py, etcd frozen past the lease TTL): after an
    outage every host's last renewal is old and its lease expired, so the first host back
    collected the records of live peers, cutting their running containers off. Absence now
    counts only from when the collector itself sees the datastore again."""
    now = [1000.0]
    peer = Hosts(store, KEYS, "peer", "198.18.0.9", clock=lambda: now[0], ttl=8)
    peer.ensure()
    here = Hosts(store, KEYS, "here", "198.18.0.1", clock=lambda: now[0], ttl=8)
    here.ensure()
    store.put(KEYS.endpoint(OTHER), endpoint(OTHER, "100.64.9.2", host="peer"))
    m = started_mirror(store)
    try:
        leases = [Lease(ipaddress.IPv4Network("100.64.3.0/24"), "198.18.0.1", "")]  # the peer's expired
        now[0] += 100  # the datastore was away for 100 s; our first renewal after it:
        here.touch()
        assert here.collect_departed(m.records, leases, ttl=8, min_absence=60) == []
        assert store.get(KEYS.endpoint(OTHER)) is not None
        for _ in range(10):  # renewing every 5 s (a third of the TTL, as the plugin does)
            now[0] += 5
            here.touch()
        assert here.collect_departed(m.records, leases, ttl=8, min_absence=60) == []  # 50 s seen: not yet
        for _ in range(3):
            now[0] += 5
            here.touch()
        # Positive control: a peer we saw stay away for min_absence is collected.
        assert here.collect_departed(m.records, leases, ttl=8, min_absence=60) == ["peer"]
    finally:
        m.stop()


def test_our_clock_jumping_forward_does_not_make_peers_look_gone(store):
    """The collector's wall clock steps two days forward: every peer's renewal looks two days
    old, but a step is a gap in our own renewals, so absence counts from it (and a step back,
    a negative gap, likewise)."""
    now = [1000.0]
    Hosts(store, KEYS, "peer", "198.18.0.9", clock=lambda: 1000.0).ensure()  # renewed at 1000
    here = Hosts(store, KEYS, "here", "198.18.0.1", clock=lambda: now[0], ttl=8)
    here.ensure()
    m = started_mirror(store)
    try:
        now[0] += 2 * 86400  # the step; the peer's lease is between renewals (absent right now)
        here.touch()
        assert here.collect_departed(m.records, [], ttl=8, min_absence=60) == []
        now[0] -= 86400  # and back a day
        here.touch()
        assert here.collect_departed(m.records, [], ttl=8, min_absence=60) == []
    finally:
        m.stop()


def test_no_collection_before_our_own_first_renewal(store):
    now = [1000.0]
    Hosts(store, KEYS, "peer", "198.18.0.9", clock=lambda: now[0]).ensure()
    fresh = Hosts(store, KEYS, "here", "198.18.0.1", clock=lambda: now[0] + 10**6)
    m = started_mirror(store)
    try:
        assert fresh.collect_departed(m.records, [], ttl=8, min_absence=60) == []
        fresh.ensure()
        assert fresh.collect_departed(m.records, [], ttl=8, min_absence=60) == []  # seen for 0 s
        for _ in range(13):
            now[0] += 5
            fresh.touch()
        assert fresh.collect_departed(m.records, [], ttl=8, min_absence=60) == ["peer"]
    finally:
        m.stop()


def test_ipam_is_not_stopped_by_foreign_keys_or_malformed_pool_records(store):
    from canal.datastore.base import Put

    ipam = Ipam(store, KEYS, "h1", lambda: ipaddress.IPv4Network("100.64.3.0/24"))
    store.txn([], [Put(KEYS.addresses + "644003zz", '"junk"'), Put(KEYS.addresses + "6440030", "{")])
    store.put(KEYS.pools + "junk", {"cidr": "10.0.0.0/8\n"})
    # Positive control: the junk is where IPAM looks (the pool listing and the address prefix),
    # and the key is one int(key, 16) refuses.
    assert "junk" in store.list_json(KEYS.pools)
    assert KEYS.addresses + "644003zz" in [e.key for e in store.list(KEYS.addresses + "644003")[0]]
    with pytest.raises(ValueError):
        int("644003zz", 16)
    assert ipam.request_address(DEFAULT_POOL_ID, "", None)[0].startswith("100.64.3.")
    pool_id, pool, _ = ipam.request_pool("CanalLocal", "100.70.0.0/24", "", {}, False)
    assert pool == "100.70.0.0/24" and ipam.request_address(pool_id, "", None)[0].startswith("100.70.0.")
