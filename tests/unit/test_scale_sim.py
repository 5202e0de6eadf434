"""bench/_simcluster.py: simulated hosts write exactly the records real plugins write."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import sys

from canal.datastore.base import dumps
from canal.records import address_entry, endpoint_entry, host_entry, lease_entry, network_entry, route_entry

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))

import _simcluster as sim  # noqa: E402

KEYS = sim.Keys(sim.PREFIX, sim.FLANNEL_PREFIX)
PARSERS = {KEYS.endpoints: endpoint_entry, KEYS.addresses: address_entry, KEYS.routes: route_entry}


def parse_all(items):
    """Every (key, JSON) through the parser the plugin's mirror uses for its directory."""
    out = []
    for key, value in items:
        directory = next(d for d in PARSERS if key.startswith(d))
        out.append(PARSERS[directory](key[len(directory):], json.loads(dumps(value))))
    return out


def test_joined_records_parse_as_a_plugin_reads_them():
    subnet = ipaddress.IPv4Network("100.64.7.0/24")
    ep_id, cid = sim.endpoint_id(7, 3), sim.container_id(7, 3)
    items = sim.joined_records(KEYS, sim.host_name(7), subnet, ep_id, cid, subnet.network_address + 9,
                               {"role": "c3"}, 1700000000.0)
    address, endpoint = parse_all(items)
    assert len(items) == 2  # inside its host's subnet: no route record
    assert endpoint.id == ep_id and endpoint.joined and endpoint.labels == {"role": "c3"}
    assert endpoint.host == "scale-sim0007" and endpoint.network == sim.SIM_NET
    assert str(endpoint.ip) == "100.64.7.9" and endpoint.container == cid
    assert address.endpoint == ep_id and address.host == endpoint.host and address.pool == "canal-default"


def test_an_address_outside_the_subnet_gets_a_route_record():
    subnet = ipaddress.IPv4Network("100.64.7.0/24")
    ip = ipaddress.IPv4Address("100.112.0.5")
    items = sim.joined_records(KEYS, sim.host_name(1), subnet, sim.endpoint_id(1, 0), sim.container_id(1, 0), ip,
                               {}, 0.0, sim.ROUTED_POOL)
    route = parse_all(items)[2]
    assert route.ip == ip and route.host == "scale-sim0001" and route.subnet == subnet


def test_ids_are_valid_and_distinct():
    ids = {sim.endpoint_id(h, s) for h in (0, 1, 499, 0xFFFFFF) for s in (0, 1, 10**6)}
    assert len(ids) == 12
    for ep_id in ids:
        assert ep_id.startswith(sim.EP_TAG)
        endpoint_entry(ep_id, {"id": ep_id, "network": sim.SIM_NET, "host": "h", "ip": "10.0.0.1",
                               "mac": "02:00:00:00:00:01", "mtu": 1450})


def test_bulk_population_through_the_real_services(tmp_path):
    """Identity, lease, network record and the bulk records of one host, on the embedded store:
    everything parses with the plugin's own parsers; routed ones lie outside the subnet."""
    from canal.datastore.local import LocalDatastore

    store = LocalDatastore(str(tmp_path / "canal.db"))
    host = sim.SimHost(3, store, KEYS, "100.64.0.0/16", 24, policies=4, renew_every=30)
    host.start(watch=False)
    items = host.bulk_records(10, 2, ipaddress.IPv4Network("100.112.0.0/12"), 0, 1700000000.0)
    sim.write_bulk(store, items)
    records = parse_all(items)
    endpoints = [r for r in records if hasattr(r, "joined")]
    routes = [r for r in records if hasattr(r, "subnet") and not hasattr(r, "joined")]
    assert len(endpoints) == 10 and len(routes) == 2
    assert all(r.ip not in host.subnet() for r in routes)
    assert {e.labels["role"] for e in endpoints} == {"c0", "c1", "c2", "c3"}
    lease = lease_entry(str(host.subnet()).replace("/", "-"), store.get_json(KEYS.lease(host.subnet())))
    assert lease.public_ip == sim.public_ip(3)
    assert host_entry(host.name, store.get_json(KEYS.host(host.name))).subnet == host.subnet()
    network_entry(f"{host.name}/{sim.SIM_NET}", store.get_json(KEYS.network(host.name, sim.SIM_NET)))
    # churn through the services: a start then a stop leave the count level and the records valid
    host.start_container()
    started = [k for k in host.running if k not in {e.id for e in endpoints}]
    assert len(started) == 1
    record = endpoint_entry(started[0], store.get_json(KEYS.endpoint(started[0])))
    assert record.joined and record.labels is not None and record.ip in host.subnet()
    rng = random.Random(0)
    while started[0] in host.running:
        host.stop_container(rng)
    assert store.get_json(KEYS.endpoint(started[0])) is None
    store.close()


def test_a_cluster_populates_churns_and_removes_everything_it_wrote(etcd_server):
    """On a real etcd: N hosts with leases, their endpoints, a start and a stop through the
    services; stop() leaves nothing of the simulated hosts behind (the flannel config stays)."""
    from canal.datastore.etcd import EtcdDatastore

    etcd_server.wipe()
    store = EtcdDatastore(etcd_server.endpoint, timeout=5.0)
    store.put(KEYS.flannel_config, {"Network": "100.64.0.0/10", "SubnetLen": 24, "SubnetMax": "100.111.255.0",
                                    "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472}})
    cluster = sim.Cluster(store, hosts=3, endpoints=31, policies=4, network="100.64.0.0/10", subnet_len=24,
                          routed_fraction=0.2, routed_block="100.112.0.0/12", renew_every=3600, watch=True,
                          workers=1, seed=1)
    try:
        answer = cluster.populate()
        assert answer["endpoints"] == 31
        entries, _ = store.list(KEYS.endpoints)
        assert len(entries) == 31 and all(endpoint_entry(e.key[len(KEYS.endpoints):], e.json()) for e in entries)
        routes, _ = store.list(KEYS.routes)
        assert len(routes) == 6  # int(10 * 0.2) or int(11 * 0.2) per host: 2 + 2 + 2
        leases, _ = store.list(KEYS.leases)
        assert len(leases) == 3
        cluster.hosts[0].start_container()
        assert cluster.hosts[1].stop_container(random.Random(0))
        assert cluster.stats()["running"] == 31
    finally:
        removed = cluster.stop()["removed"]
    assert removed > 31 * 2
    assert store.list("/canal/v1/")[0] == []
    assert [e.key for e in store.list("/coreos.com/network/")[0]] == [KEYS.flannel_config]
    store.close()
