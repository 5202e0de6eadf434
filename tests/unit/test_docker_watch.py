"""Network names and container labels learned from Docker's list APIs, never per container."""

from __future__ import annotations

import pytest

from canal.agent.docker_watch import DockerWatch
from canal.datastore.keys import Keys

KEYS = Keys("/canal/v1", "/coreos.com/network")
NET, OTHER = "a" * 64, "b" * 64


def endpoint(ep_id, host="h1", ip="100.64.3.2", **extra):
    """A complete endpoint record as CreateEndpoint writes it."""
    return {"id": ep_id, "host": host, "network": NET, "ip": ip, "mac": "02:42:64:40:03:02", "mtu": 1450,
            "joined": True, "created": 0, **extra}


def network(net_id, host="h1", **extra):
    return {"id": net_id, "host": host, "pools": ["0.0.0.0/0"], "name": "", "explicit_name": False, **extra}


class FakeAPI:
    def __init__(self):
        self.network_list = [{"Id": NET, "Name": "appnet"}]
        self.container_list = [
            {"Id": "c" * 64, "Names": ["/web1"], "Labels": {"role": "web"},
             "NetworkSettings": {"Networks": {"appnet": {"EndpointID": "e" * 64}}}},
        ]
        self.libnetwork: dict = {}
        self.inspected: list = []

    def networks(self):
        return self.network_list

    def containers(self, all=False):
        return self.container_list

    def inspect_network(self, net_id):
        """libnetwork's view: endpoints it holds, keyed by container ("ep-<id>" without one)."""
        self.inspected.append(net_id)
        return {"Id": net_id, "Containers": self.libnetwork.get(net_id, {})}


class FakeClient:
    def __init__(self):
        self.api = FakeAPI()


def watch(store, client):
    return DockerWatch(store, KEYS, "h1", "unix:///nowhere", client_factory=lambda: client)


def test_names_and_labels_are_recorded(store):
    store.put(KEYS.network("h1", NET), network(NET))
    store.put(KEYS.network("h2", OTHER), network(OTHER, host="h2"))  # another host's
    store.put(KEYS.endpoint("e" * 64), endpoint("e" * 64))
    store.put(KEYS.endpoint("f" * 64), endpoint("f" * 64, ip="100.64.3.3"))
    client = FakeClient()
    assert watch(store, client).resolve() == 1  # f... is not in Docker's list (yet)
    assert store.get_json(KEYS.network("h1", NET))["name"] == "appnet"
    assert store.get_json(KEYS.network("h2", OTHER))["name"] == ""
    record = store.get_json(KEYS.endpoint("e" * 64))
    assert record["labels"] == {"role": "web"} and record["container_name"] == "web1"
    assert store.get_json(KEYS.endpoint("f" * 64)).get("labels") is None
    client.api.container_list[0]["Labels"] = {"role": "db"}  # docker update cannot, but a
    watch(store, client).resolve()                             # replaced container can
    assert store.get_json(KEYS.endpoint("e" * 64))["labels"] == {"role": "db"}


def test_with_the_mirrors_view_only_this_hosts_records_are_read_and_held(store):
    """The runtime's wiring: resolve and GC read a view of this host's records, kept from
    the mirror's journal, not every endpoint of the cluster."""
    from canal.agent.mirror import Mirror
    from canal.records import endpoint_entry

    store.put(KEYS.network("h1", NET), network(NET))
    store.put(KEYS.endpoint("e" * 64), endpoint("e" * 64))
    for i in range(50):  # other hosts' records: never held by the view
        store.put(KEYS.endpoint(f"{i:064x}"), endpoint(f"{i:064x}", host="h2", ip=f"100.64.9.{i + 2}"))
    mirror = Mirror(store, ["/canal/v1/"], lambda: None, timeout=0.2)
    mirror.start()
    try:
        assert mirror.wait_ready(5)
        view = mirror.view(KEYS.endpoints, endpoint_entry, keep=lambda r: r.host == "h1")
        client = FakeClient()
        w = DockerWatch(store, KEYS, "h1", "unix:///nowhere", client_factory=lambda: client,
                        records=mirror.records, endpoints=view)
        assert w.resolve() == 0
        assert store.get_json(KEYS.endpoint("e" * 64))["labels"] == {"role": "web"}
        assert set(view) == {"e" * 64}
        store.put(KEYS.endpoint("f" * 64), endpoint("f" * 64, ip="100.64.3.3"))  # a new local one
        assert w.resolve() == 1  # seen through the journal: its labels are not known yet
        assert set(view) == {"e" * 64, "f" * 64}
    finally:
        mirror.stop()


def test_an_explicit_network_name_is_kept(store):
    store.put(KEYS.network("h1", NET), network(NET, name="shared", explicit_name=True))
    watch(store, FakeClient()).resolve()
    assert store.get_json(KEYS.network("h1", NET))["name"] == "shared"


def test_docker_down_is_retried_not_fatal(store):
    calls = []

    def broken():
        calls.append(1)
        raise ConnectionError("no docker yet")

    w = DockerWatch(store, KEYS, "h1", "unix:///nowhere", interval=0.05, client_factory=broken)
    w.start()
    try:
        import time

        deadline = time.monotonic() + 5
        while len(calls) < 3 and time.monotonic() < deadline:
            w.poke()
            time.sleep(0.05)
        assert len(calls) >= 3 and "no docker yet" in w.last_error
    finally:
        w.stop()


@pytest.fixture(params=["store", "views"])
def reads(request, store):
    """How DockerWatch reads records: the datastore, or (the runtime's wiring) the mirror's
    records plus kept views of this host's endpoints and addresses."""
    if request.param == "store":
        yield lambda: {}
        return
    from canal.agent.mirror import Mirror
    from canal.records import address_entry, endpoint_entry

    mirror = Mirror(store, ["/canal/v1/"], lambda: None, timeout=0.2)
    mirror.start()
    assert mirror.wait_ready(5)
    yield lambda: {"records": mirror.records,
                   "endpoints": mirror.view(KEYS.endpoints, endpoint_entry, keep=lambda r: r.host == "h1"),
                   "addresses": mirror.view(KEYS.addresses, address_entry, keep=lambda r: r.host == "h1")}
    mirror.stop()


def test_what_docker_forgot_is_collected_after_a_grace_period(store, reads):
    import time as _time

    from canal.services.ipam import Ipam

    ipam = Ipam(store, KEYS, "h1", lambda: __import__("ipaddress").IPv4Network("100.64.3.0/24"))
    live = ipam.request_address("canal-default", "100.64.3.10", None)[0].split("/")[0]
    lost = ipam.request_address("canal-default", "100.64.3.11", None)[0].split("/")[0]
    aux = ipam.request_address("canal-default", "100.64.3.12", None)[0].split("/")[0]
    store.put(KEYS.endpoint("e" * 64), endpoint("e" * 64, ip=live))
    store.put(KEYS.endpoint("d" * 64), endpoint("d" * 64, ip="100.64.3.13"))
    store.put(KEYS.endpoint("f" * 64), endpoint("f" * 64, host="h2", ip="100.64.4.1"))
    store.update(KEYS.address(live), lambda r: {**r, "endpoint": "e" * 64, "network": NET})
    theirs = Ipam(store, KEYS, "h2", lambda: __import__("ipaddress").IPv4Network("100.64.4.0/24"))
    theirs.request_address("canal-default", "100.64.4.9", None)  # h2's unbound address: h2's to collect
    removed, released = [], []
    client = FakeClient()
    client.api.network_list[0]["IPAM"] = {"Config": [{"AuxiliaryAddresses": {"printer": aux}}]}
    w = DockerWatch(store, KEYS, "h1", "unix:///nowhere", interval=0, client_factory=lambda: client,
                    collect_endpoint=lambda n, e: removed.append(e),
                    collect_address=lambda p, ip: released.append(ip), grace=0, **reads())
    _time.sleep(0.01)
    w.resolve()
    assert removed == ["d" * 64]  # unknown to Docker; e... is a live container's; f... is h2's
    assert released == [lost]  # unbound and not an aux address
    patient = DockerWatch(store, KEYS, "h1", "unix:///nowhere", interval=0, client_factory=lambda: client,
                          collect_endpoint=lambda n, e: removed.append(e),
                          collect_address=lambda p, ip: released.append(ip), grace=1e12, **reads())
    patient.resolve()
    assert removed == ["d" * 64] and released == [lost]  # young records are left alone


def test_an_endpoint_of_a_container_still_starting_is_not_collected(store):
    """Regression (found by bench/chaos.py, plugin kill -9 during 50 concurrent runs): a joined
    endpoint whose container was still starting (not yet named in the container list) was taken
    for forgotten once older than the grace period, and its record and veth removed under the
    running container. libnetwork's own endpoint list now vouches for it."""
    store.put(KEYS.network("h1", NET), network(NET))
    store.put(KEYS.endpoint("d" * 64), endpoint("d" * 64, ip="100.64.3.13"))  # starting
    store.put(KEYS.endpoint("9" * 64), endpoint("9" * 64, ip="100.64.3.14"))  # forgotten
    removed = []
    client = FakeClient()
    client.api.libnetwork[NET] = {"ep-" + "d" * 64: {"EndpointID": "d" * 64, "Name": ""}}
    w = DockerWatch(store, KEYS, "h1", "unix:///nowhere", interval=0, client_factory=lambda: client,
                    collect_endpoint=lambda n, e: removed.append(e), grace=0)
    w.resolve()
    assert removed == ["9" * 64]  # positive control: what libnetwork does not hold still goes
    assert client.api.inspected == [NET]


def test_a_network_removed_meanwhile_does_not_stop_collection(store):
    class Gone(Exception):
        status_code = 404

    store.put(KEYS.network("h1", NET), network(NET))
    store.put(KEYS.endpoint("9" * 64), endpoint("9" * 64, ip="100.64.3.14"))
    removed = []
    client = FakeClient()

    def gone(net_id):
        raise Gone("no such network")

    client.api.inspect_network = gone
    w = DockerWatch(store, KEYS, "h1", "unix:///nowhere", interval=0, client_factory=lambda: client,
                    collect_endpoint=lambda n, e: removed.append(e), grace=0)
    w.resolve()
    assert removed == ["9" * 64]


def test_unusable_labels_keep_the_endpoint_closed_and_are_logged_once(store, caplog):
    store.put(KEYS.network("h1", NET), network(NET))
    store.put(KEYS.endpoint("e" * 64), endpoint("e" * 64))
    client = FakeClient()
    client.api.container_list[0]["Labels"] = {"role\n-A INPUT": "web"}
    w = watch(store, client)
    for _ in range(3):
        assert w.resolve() == 1  # still unknown: closed
    assert store.get_json(KEYS.endpoint("e" * 64)).get("labels") is None
    assert sum("unusable" in r.message for r in caplog.records) == 1
    client.api.container_list[0]["Labels"] = {"role": "web"}  # positive control: usable labels land
    assert w.resolve() == 0
    assert store.get_json(KEYS.endpoint("e" * 64))["labels"] == {"role": "web"}
