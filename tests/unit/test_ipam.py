"""IPAM against the real embedded datastore: uniqueness, idempotence, clear refusals."""

from __future__ import annotations

import ipaddress
import threading

import pytest

from canal.datastore.keys import Keys
from canal.errors import BadRequest, Conflict, Exhausted, NotFound
from canal.services.ipam import DEFAULT_POOL_ID, GATEWAY_OPTION, Ipam

GW = {"RequestAddressType": GATEWAY_OPTION}
HOST_SUBNET = ipaddress.IPv4Network("100.64.3.0/24")


@pytest.fixture
def ipam(store):
    return Ipam(store, Keys("/canal/v1", "/coreos.com/network"), "host1", lambda: HOST_SUBNET)


def test_default_pool_skips_dockers_overlap_loop(ipam):
    pool_id, pool, data = ipam.request_pool("CanalLocal", "", "", {}, False)
    assert (pool_id, pool) == (DEFAULT_POOL_ID, "0.0.0.0/0")
    assert data == {GATEWAY_OPTION: "0.0.0.0/0"}  # so Docker asks for no gateway


def test_default_pool_addresses_are_host_subnet_slash_32(ipam):
    addr, _ = ipam.request_address(DEFAULT_POOL_ID, "", None)
    ip = ipaddress.IPv4Interface(addr)
    assert ip.network.prefixlen == 32 and ip.ip in HOST_SUBNET
    assert ip.ip not in (HOST_SUBNET.network_address, HOST_SUBNET.broadcast_address)


def test_identical_pool_requests_get_identical_answers(ipam):
    first = ipam.request_pool("CanalLocal", "100.70.0.0/24", "100.70.0.128/25", {}, False)
    again = ipam.request_pool("CanalLocal", "100.70.0.0/24", "100.70.0.128/25", {}, False)
    assert first == again
    assert first[1] == "100.70.0.0/24"


@pytest.mark.parametrize(
    "pool, sub, v6, message",
    [
        ("", "", True, "needs the cluster's IPv6 network"),
        ("", "100.70.0.0/25", False, "--ip-range needs --subnet"),
        ("bogus", "", False, "'bogus' is not an IPv4 CIDR"),
        ("fd00::/64", "", False, "is IPv6: create the network with --ipv6"),
        ("100.70.0.1/24", "", False, "has host bits set; did you mean 100.70.0.0/24"),
        ("100.70.0.0/31", "", False, "too small"),
        ("100.70.0.0/24", "100.71.0.0/25", False, "not inside subnet"),
    ],
)
def test_bad_pool_requests_name_the_problem(ipam, pool, sub, v6, message):
    with pytest.raises(BadRequest, match=message):
        ipam.request_pool("CanalLocal", pool, sub, {}, v6)


def test_unknown_address_space_is_refused(ipam):
    with pytest.raises(BadRequest, match="unknown address space 'LocalDefault'"):
        ipam.request_pool("LocalDefault", "", "", {}, False)


def test_overlapping_pools_are_refused_with_the_other_named(ipam):
    ipam.request_pool("CanalLocal", "100.70.0.0/24", "", {}, False)
    with pytest.raises(Conflict, match="overlaps subnet 100.70.0.0/24"):
        ipam.request_pool("CanalLocal", "100.70.0.0/16", "", {}, False)


def test_gateway_request_is_idempotent_and_never_handed_out(ipam):
    pool_id, _, _ = ipam.request_pool("CanalLocal", "100.70.0.0/29", "", {}, False)
    assert ipam.request_address(pool_id, "100.70.0.1", GW)[0] == "100.70.0.1/29"
    assert ipam.request_address(pool_id, "100.70.0.1", GW)[0] == "100.70.0.1/29"
    got = {ipam.request_address(pool_id, "", None)[0] for _ in range(5)}
    assert got == {f"100.70.0.{i}/32" for i in range(2, 7)}
    with pytest.raises(Exhausted, match="no free address left in 100.70.0.0/29"):
        ipam.request_address(pool_id, "", None)


def test_dynamic_gateway_is_the_first_free_address(ipam):
    pool_id, _, _ = ipam.request_pool("CanalLocal", "100.70.0.0/30", "", {}, False)
    assert ipam.request_address(pool_id, "", GW)[0] in ("100.70.0.1/30", "100.70.0.2/30")


def test_ip_range_limits_dynamic_but_not_static_addresses(ipam):
    pool_id, _, _ = ipam.request_pool("CanalLocal", "100.70.0.0/24", "100.70.0.128/25", {}, False)
    for _ in range(10):
        ip = ipaddress.IPv4Interface(ipam.request_address(pool_id, "", None)[0]).ip
        assert ip in ipaddress.IPv4Network("100.70.0.128/25")
    assert ipam.request_address(pool_id, "100.70.0.7", None)[0] == "100.70.0.7/32"


def test_static_address_conflicts_and_bounds(ipam):
    pool_id, _, _ = ipam.request_pool("CanalLocal", "100.70.0.0/24", "", {}, False)
    ipam.request_address(pool_id, "100.70.0.7", None)
    with pytest.raises(Conflict, match="100.70.0.7 is already in use"):
        ipam.request_address(pool_id, "100.70.0.7", None)
    with pytest.raises(BadRequest, match="outside the network's subnet 100.70.0.0/24"):
        ipam.request_address(pool_id, "100.71.0.7", None)
    with pytest.raises(BadRequest, match="network or broadcast"):
        ipam.request_address(pool_id, "100.70.0.255", None)
    with pytest.raises(BadRequest, match="not an IPv4 address"):
        ipam.request_address(pool_id, "nonsense", None)


def test_release_frees_and_is_idempotent(ipam):
    pool_id, _, _ = ipam.request_pool("CanalLocal", "100.70.0.0/24", "", {}, False)
    ipam.request_address(pool_id, "100.70.0.7", None)
    ipam.release_address(pool_id, "100.70.0.7/32")
    ipam.release_address(pool_id, "100.70.0.7")
    assert ipam.request_address(pool_id, "100.70.0.7", None)[0] == "100.70.0.7/32"


def test_release_from_the_wrong_pool_is_refused(ipam):
    a, _, _ = ipam.request_pool("CanalLocal", "100.70.0.0/24", "", {}, False)
    ipam.request_address(DEFAULT_POOL_ID, "100.64.3.9", None)
    with pytest.raises(Conflict, match="belongs to pool canal-default"):
        ipam.release_address(a, "100.64.3.9")


def test_pool_is_kept_while_addresses_remain(ipam, store):
    pool_id, _, _ = ipam.request_pool("CanalLocal", "100.70.0.0/24", "", {}, False)
    ipam.request_address(pool_id, "100.70.0.7", None)
    ipam.release_pool(pool_id)
    assert store.list_json("/canal/v1/ipam/pools/")
    ipam.release_address(pool_id, "100.70.0.7")
    ipam.release_pool(pool_id)
    ipam.release_pool(pool_id)
    assert not store.list_json("/canal/v1/ipam/pools/")
    with pytest.raises(NotFound, match="does not exist"):
        ipam.request_address(pool_id, "", None)


@pytest.mark.parametrize("pool_id", ["", "nope", "canal-pool:garbage", 7])
def test_unknown_pool_ids_are_not_found(ipam, pool_id):
    with pytest.raises(NotFound, match="unknown PoolID"):
        ipam.request_address(pool_id, "", None)


def test_concurrent_allocations_are_unique(ipam):
    results: list[str] = []
    lock = threading.Lock()

    def grab():
        for _ in range(10):
            addr, _ = ipam.request_address(DEFAULT_POOL_ID, "", None)
            with lock:
                results.append(addr)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 80 and len(set(results)) == 80


def test_pool_containing_the_host_subnet_prefers_it(ipam):
    pool_id, _, _ = ipam.request_pool("CanalLocal", "100.64.0.0/16", "", {}, False)
    for _ in range(5):
        ip = ipaddress.IPv4Interface(ipam.request_address(pool_id, "", None)[0]).ip
        assert ip in HOST_SUBNET


def test_addresses_are_unique_across_pools_sharing_space(ipam):
    """A --subnet over the cluster network and the default pool never hand out one IP twice."""
    pool_id, _, _ = ipam.request_pool("CanalLocal", "100.64.0.0/16", "", {}, False)
    seen = set()
    for i in range(60):
        addr, _ = ipam.request_address(pool_id if i % 2 else DEFAULT_POOL_ID, "", None)
        seen.add(ipaddress.IPv4Interface(addr).ip)
    assert len(seen) == 60


# Swarm (Docker's global address space): the manager allocates, every node asks again -------

CLUSTER = ipaddress.IPv4Network("100.64.0.0/16")


@pytest.fixture
def swarm(store):
    keys = Keys("/canal/v1", "/coreos.com/network")
    manager = Ipam(store, keys, "manager", lambda: ipaddress.IPv4Network("100.64.3.0/24"), lambda: CLUSTER)
    node = Ipam(store, keys, "node", lambda: ipaddress.IPv4Network("100.64.9.0/24"), lambda: CLUSTER)
    return manager, node


def test_swarm_default_pool_is_the_cluster_network_on_manager_and_nodes(swarm):
    manager, node = swarm
    pool_id, pool, data = manager.request_pool("CanalGlobal", "", "", {"com.docker.network.ipam.serial": "true"}, False)
    assert (pool_id, pool, data) == ("canal-cluster", "100.64.0.0/16", {})
    assert node.request_pool("CanalGlobal", "100.64.0.0/16", "", {}, False) == (pool_id, pool, data)
    assert node.request_pool("CanalLocal", "100.64.0.0/16", "", {}, False) == (pool_id, pool, data)
    gw, _ = manager.request_address(pool_id, "", GW)
    assert node.request_address(pool_id, gw.split("/")[0], GW)[0] == gw  # node replays it
    manager.release_pool(pool_id)  # no pool record to drop, no error


def bind(store, ip, endpoint_id):
    key = Keys("/canal/v1", "/coreos.com/network").address(ip)
    store.update(key, lambda r: {**r, "endpoint": endpoint_id, "network": "b" * 64 if endpoint_id else ""})


def test_task_address_claimed_by_the_node_then_bound_and_released(swarm, store):
    manager, node = swarm
    pool_id, _, _ = manager.request_pool("CanalGlobal", "", "", {}, False)
    task, _ = manager.request_address(pool_id, "", {"com.docker.network.ipam.serial": "true"})
    ip = task.split("/")[0]
    assert node.request_address(pool_id, ip, None)[0] == task  # the node claims, no conflict
    bind(store, ip, "a" * 64)  # what CreateEndpoint's transaction does
    with pytest.raises(Conflict, match="already in use"):
        node.request_address(pool_id, ip, None)  # bound now: a second claim is refused
    manager.release_address(pool_id, ip)  # manager first: kept while the container runs
    with pytest.raises(Conflict):
        node.request_address(pool_id, ip, None)
    bind(store, ip, "")
    node.release_address(pool_id, ip)
    manager.release_address(pool_id, ip)  # a late second release is harmless
    assert node.request_address(pool_id, ip, None)[0] == task


def test_swarm_user_subnet_is_shared_but_local_ones_are_not(swarm, store):
    manager, node = swarm
    shared, _, _ = manager.request_pool("CanalGlobal", "100.90.0.0/24", "", {}, False)
    assert node.request_pool("CanalLocal", "100.90.0.0/24", "", {}, False)[0] == shared  # same pool
    ip = manager.request_address(shared, "", None)[0].split("/")[0]
    assert node.request_address(shared, ip, None)[0] == f"{ip}/32"
    local, _, _ = manager.request_pool("CanalLocal", "100.91.0.0/24", "", {}, False)
    ip = manager.request_address(local, "", None)[0].split("/")[0]
    with pytest.raises(Conflict, match="already in use"):
        node.request_address(local, ip, None)  # local pools: a second request is a real duplicate


def test_the_last_free_address_is_found_past_taken_and_foreign_keys(store):
    """The free-address scan reads keys only: other keys under the directory (not 8 lowercase
    hex digits) are neither taken addresses nor errors."""
    keys = Keys("/canal/v1", "/coreos.com/network")
    small = Ipam(store, keys, "host1", lambda: ipaddress.IPv4Network("100.64.9.0/29"))
    for junk in ("64400904X", "644009", "6440090A", "6440090a/extra"):
        store.put(keys.addresses + junk, {"not": "an address record"})
    got = {small.request_address(DEFAULT_POOL_ID, "", None)[0] for _ in range(6)}
    assert got == {f"100.64.9.{i}/32" for i in range(1, 7)}  # .0 and .7 are never handed out
    with pytest.raises(Exhausted, match="no free address left in 100.64.9.0/29"):
        small.request_address(DEFAULT_POOL_ID, "", None)
