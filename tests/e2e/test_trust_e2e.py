"""Issue 8 end to end: the datastore is every host's trust root, so poisoned records in a real etcd
must neither stop the hosts nor reach their kernels, and one host name means one host."""

from __future__ import annotations

import ipaddress
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from e2e_support import CLUSTER, IMAGE, clear, etcd_cluster, etcd_plugin_args, wait_open

from testbed import Etcd, SimHost, TestbedError, wait_until

TTL = 8
SERVER = ("sh", "-c", "while true; do echo pong-db | nc -l -p 5432; done")


def plugin_args(host: SimHost, etcd: Etcd) -> list[str]:
    return etcd_plugin_args(host, etcd, "--gc-grace", "3", ttl=TTL)


@pytest.fixture(scope="module")
def cluster():
    with etcd_cluster(plugin_args) as bed:
        yield bed


@pytest.fixture
def c(cluster):
    ul, etcd, (h1, h2) = cluster
    yield ul, etcd, h1, h2
    for h in (h1, h2):
        if not h.plugin_running():
            h.start_plugin(plugin_args(h, etcd))
        clear(h)
    left = etcd.etcdctl("get", "--prefix", "--keys-only", "/canal/v1/").stdout.split()
    assert [k for k in left if "/hosts/" not in k] == []


def canal(h: SimHost, *args: str) -> dict:
    # `canal status` exits 1 when unhealthy (quarantined records): its JSON is printed all the same
    return json.loads(h.exec([h.plugin_argv()[0], "-m", "canal", *args, "-o", "json"],
                             check=args[:1] != ("status",)).stdout)


def quarantined(h: SimHost) -> set[str]:
    return set(canal(h, "status")["quarantined"])


LEASES = "/coreos.com/network/subnets/"
HALF_LEASE = LEASES + "0.0.0.0-1"


def leases(etcd: Etcd) -> dict[str, dict]:
    out = etcd.etcdctl("get", "--prefix", LEASES).stdout.splitlines()
    return {key: json.loads(value) for key, value in zip(out[::2], out[1::2])}


def net(h: SimHost, name: str) -> None:
    h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", name)


def daemon(h: SimHost, name: str, *opts: str, cmd=("sleep", "1000")) -> None:
    h.docker("run", "-d", "--name", name, "--network", "appnet", *opts, IMAGE, *cmd)
    wait_open(h, name)


def ip_of(h: SimHost, container: str) -> str:
    return h.docker_json("inspect", container)[0]["NetworkSettings"]["Networks"]["appnet"]["IPAddress"]


def tcp(h: SimHost, src: str, dst: str) -> bool:
    out = h.container_exec(src, "sh", "-c", f"nc -w 1 {dst} 5432 </dev/null", check=False, timeout=20).stdout
    return "pong-db" in out


POLICY = {"apiVersion": "canal/v1", "kind": "NetworkPolicy", "metadata": {"name": "db-from-web", "network": "appnet"},
          "spec": {"selector": "role == 'db'", "ingress": [
              {"action": "Allow", "protocol": "TCP", "source": {"selector": "role == 'web'"}, "destination": {"ports": [5432]}}]}}

HOSTILE_POOL = "10.9.0.0/24\nadd canal-nets 0.0.0.0/1"
POISON = {
    # A remote endpoint without ip, and one with ip null and labels as a list.
    "/canal/v1/endpoints/" + "e" * 64: {"id": "e" * 64, "host": "h2", "network": "a" * 64, "mac": "02:42:00:00:00:01",
                                        "mtu": 1450, "joined": True},
    "/canal/v1/endpoints/" + "f" * 64: {"id": "f" * 64, "host": "h2", "network": "a" * 64, "ip": None,
                                        "mac": "02:42:00:00:00:02", "mtu": 1450, "joined": True, "labels": ["a=b"]},
    # A route record without subnet; a network record whose pool is ipset input.
    "/canal/v1/routes/6440ff01": {"ip": "100.64.255.1", "host": "h9"},
    "/canal/v1/networks/h9/" + "b" * 64: {"id": "b" * 64, "host": "h9", "pools": [HOSTILE_POOL]},
    # A policy of another network that does not validate (closes only that network).
    "/canal/v1/policies/net/othernet/broken": {"apiVersion": "canal/v1", "kind": "NetworkPolicy", "spec": 7},
}


def test_poisoned_records_are_quarantined_and_both_hosts_keep_working(c):
    _, etcd, h1, h2 = c
    for h in (h1, h2):
        net(h, "appnet")
    daemon(h1, "db", "--label", "role=db", cmd=SERVER)
    daemon(h2, "web", "--label", "role=web")
    daemon(h2, "batch", "--label", "role=batch")
    db = ip_of(h1, "db")
    h2.exec([h2.plugin_argv()[0], "-m", "canal", "policy", "apply", "-f", "-"], input=json.dumps(POLICY))
    wait_until(lambda: tcp(h2, "web", db) and not tcp(h2, "batch", db), timeout=10)
    poison_leases: list[str] = []
    try:
        for key, value in POISON.items():
            etcd.etcdctl("put", key, json.dumps(value))
        # Hostile leases (any host can write one): half of everything, and the lower half of
        # h1's subnet, more specific than h1's own route (db's address is in it).
        sub1 = ipaddress.IPv4Network(next(
            k.rsplit("/", 1)[1].split("&")[0].replace("-", "/") for k, v in leases(etcd).items() if v["PublicIP"] == h1.address))
        inner = next(sub1.subnets())
        assert ipaddress.IPv4Address(db) in inner
        for key, addr in ((HALF_LEASE, "198.18.0.66"), (f"{LEASES}{inner.network_address}-{inner.prefixlen}", "198.18.0.67")):
            etcd.etcdctl("put", key, json.dumps({"PublicIP": addr, "BackendType": "vxlan",
                                                 "BackendData": {"VtepMAC": "aa:bb:cc:00:00:66"}}))
            poison_leases.append(key)
        etcd.etcdctl("put", "/canal/v1/endpoints/" + "d" * 64, "{not json")
        poisoned = set(POISON) | {"/canal/v1/endpoints/" + "d" * 64}
        # Positive control: every record reached both plugins (and was refused there).
        wait_until(lambda: quarantined(h1) >= poisoned and quarantined(h2) >= poisoned, timeout=15)
        # Both hosts keep starting containers, connecting them and enforcing policy.
        daemon(h1, "new1", "--label", "role=batch", cmd=SERVER)
        daemon(h2, "new2", "--label", "role=web")
        assert tcp(h2, "new2", db) and tcp(h2, "web", db)
        assert not tcp(h2, "batch", db)
        assert tcp(h2, "new2", ip_of(h1, "new1"))
        # The hostile leases reached both plugins (named in their status) and no kernel route.
        for h in (h1, h2):
            wait_until(lambda h=h: {"198.18.0.66", "198.18.0.67"} <= {
                p.split()[1] for p in canal(h, "status")["backend"]["problems"] if p.startswith("peer ")}, timeout=15)
            dsts = {r["dst"] for r in json.loads(h.ip("-j", "route", "show", "table", "main").stdout)}
            assert "0.0.0.0/1" not in dsts and str(inner) not in dsts, dsts
        assert tcp(h2, "web", db)
        # The hostile pool never reached a kernel: the cluster set holds only real networks.
        for h in (h1, h2):
            members = h.exec(["ipset", "list", "canal-nets"]).stdout
            assert "0.0.0.0/1" not in members and "10.9.0.0/24" not in members and CLUSTER in members
        # A policy of appnet's own scope that does not parse closes appnet: fail closed.
        etcd.etcdctl("put", "/canal/v1/policies/net/appnet/broken", json.dumps({"kind": "NetworkPolicy"}))
        wait_until(lambda: not tcp(h2, "web", db), timeout=10)
        etcd.etcdctl("del", "/canal/v1/policies/net/appnet/broken")
        wait_until(lambda: tcp(h2, "web", db), timeout=10)
    finally:
        for key in list(POISON) + poison_leases + ["/canal/v1/endpoints/" + "d" * 64, "/canal/v1/policies/net/appnet/broken"]:
            etcd.etcdctl("del", key)
        h2.exec([h2.plugin_argv()[0], "-m", "canal", "policy", "delete", "db-from-web"], check=False)
    wait_until(lambda: not quarantined(h1) and not quarantined(h2), timeout=10)


def test_a_second_host_with_the_same_name_is_refused(c):
    ul, etcd, h1, _ = c
    name = canal(h1, "status")["host"]
    h3 = SimHost(ul, "h3", "198.18.0.3")
    try:
        h3.start_dockerd()
        with pytest.raises(TestbedError) as err:
            h3.start_plugin(plugin_args(h3, etcd) + ["--hostname", name], timeout=30)
        message = str(err.value)
        assert f"host name {name!r} is already used by a live host at {h1.address}" in message
        assert "198.18.0.3" in message and "--hostname" in message
        record = json.loads(etcd.etcdctl("get", "--print-value-only", f"/canal/v1/hosts/{name}").stdout)
        assert record["public_ip"] == h1.address  # the first host's record is untouched
        # Positive control: the same host under its own name starts and leases a subnet.
        h3.start_plugin(plugin_args(h3, etcd) + ["--hostname", "h3-own-name"])
        h3.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "n3")
        h3.docker("network", "rm", "n3")
        assert canal(h3, "status")["subnet"]
    finally:
        h3.close()
        etcd.etcdctl("del", "/canal/v1/hosts/h3-own-name")


def records(etcd: Etcd, prefix: str) -> dict[str, dict]:
    out = etcd.etcdctl("get", "--prefix", prefix).stdout.splitlines()
    return {key[len(prefix):]: json.loads(value) for key, value in zip(out[::2], out[1::2])}


def endpoints_and_addresses_agree(etcd: Etcd) -> list[str]:
    """The invariant one transaction keeps: an endpoint's address is bound to it, and a bound
    address has its endpoint. Returns what breaks it."""
    endpoints = records(etcd, "/canal/v1/endpoints/")
    addresses = {a["ip"]: a for a in records(etcd, "/canal/v1/ipam/addresses/").values()}
    broken = [f"endpoint {e[:12]} at {r['ip']}: address not bound to it"
              for e, r in endpoints.items() if addresses.get(r["ip"], {}).get("endpoint") != e]
    broken += [f"address {ip} bound to a missing endpoint {a['endpoint'][:12]}"
               for ip, a in addresses.items() if a.get("endpoint") and a["endpoint"] not in endpoints]
    return broken


def test_plugin_killed_during_concurrent_starts_leaks_nothing(c):
    """kill -9 while eight `docker run`s are in flight: no endpoint without its bound address or
    the reverse at any point, and after the containers are removed nothing is left: addresses
    whose release Docker lost while the plugin was dead are collected after --gc-grace."""
    _, etcd, h1, h2 = c
    net(h1, "appnet")
    h1.docker("run", "-d", "--name", "warm", "--network", "appnet", IMAGE, "sleep", "1000")

    def start(i: int) -> int:
        return h1.docker("run", "-d", "--name", f"k{i}", "--network", "appnet", IMAGE, "sleep", "1000",
                         check=False, timeout=120).returncode

    with ThreadPoolExecutor(max_workers=8) as pool:
        runs = [pool.submit(start, i) for i in range(8)]
        time.sleep(0.3)
        h1.stop_plugin(signal.SIGKILL)
        assert endpoints_and_addresses_agree(etcd) == []
        h1.start_plugin(plugin_args(h1, etcd))  # as a supervisor would restart it
        for run in runs:  # some runs fail: the plugin was killed under them
            run.result()
    assert endpoints_and_addresses_agree(etcd) == []
    # Positive control for the checker: a half-done pair (what two writes could leave) is seen.
    endpoint = next(iter(records(etcd, "/canal/v1/endpoints/")))
    record = records(etcd, "/canal/v1/endpoints/")[endpoint]
    etcd.etcdctl("put", f"/canal/v1/endpoints/{'0' * 64}", json.dumps({**record, "id": "0" * 64}))
    assert endpoints_and_addresses_agree(etcd) != []
    etcd.etcdctl("del", f"/canal/v1/endpoints/{'0' * 64}")
    ids = h1.docker("ps", "-aq").stdout.split()
    h1.docker("rm", "-f", *ids)
    h1.docker("network", "rm", "appnet")
    wait_until(lambda: not records(etcd, "/canal/v1/ipam/addresses/") and not records(etcd, "/canal/v1/endpoints/"),
               timeout=30, what="every address and endpoint collected")
