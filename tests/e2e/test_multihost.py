"""Issue 3 end to end: several simulated hosts sharing one etcd, each with its own dockerd
and Canal plugin, containers talking across a flannel-compatible VXLAN."""

from __future__ import annotations

import ipaddress
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from e2e_support import CLUSTER, IMAGE, clear, etcd_cluster, etcd_plugin_args, wait_open

from testbed import Etcd, SimHost, wait_until

TTL = 8


def plugin_args(host: SimHost, etcd: Etcd) -> list[str]:
    return etcd_plugin_args(host, etcd, ttl=TTL)


@pytest.fixture(scope="module")
def cluster():
    with etcd_cluster(plugin_args) as bed:
        yield bed


@pytest.fixture
def c(cluster):
    """(etcd, h1, h2), cleaned after each test: containers, canal networks, leftovers."""
    ul, etcd, (h1, h2) = cluster
    yield etcd, h1, h2
    if not etcd.running():
        etcd.start()
    for h in (h1, h2):
        if not h.plugin_running():
            h.start_plugin(plugin_args(h, etcd))
        clear(h)
        assert not [l for l in h.ip("-o", "link").stdout.splitlines() if ": cnl" in l]
    # Nothing of any network is left in the shared datastore either.
    left = etcd.etcdctl("get", "--prefix", "--keys-only", "/canal/v1/").stdout.split()
    assert [k for k in left if "/hosts/" not in k] == []


def net(h, name, *opts):
    h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", *opts, name)


def daemon(h, name, network, *opts, cmd=("sleep", "1000")):
    h.docker("run", "-d", "--name", name, "--network", network, *opts, IMAGE, *cmd)
    wait_open(h, name)


def ip_of(h, container, network):
    return h.docker_json("inspect", container)[0]["NetworkSettings"]["Networks"][network]["IPAddress"]


def ping(h, container, target, *args):
    return h.container_exec(container, "ping", "-c1", "-W2", *args, target, check=False).returncode == 0


def lease_of(etcd, host):
    for line in etcd.etcdctl("get", "--prefix", "/coreos.com/network/subnets/").stdout.splitlines():
        if line.startswith("{") and json.loads(line)["PublicIP"] == host.address:
            return json.loads(line)
    return None


def subnet_of(h):
    status = h.exec([h.plugin_argv()[0], "-m", "canal", "status", "-o", "json"], check=False).stdout  # exit 1: unhealthy
    return json.loads(status)["subnet"]


def test_containers_on_two_hosts_talk_ip_and_tcp(c):
    etcd, h1, h2 = c
    for h in (h1, h2):
        net(h, "appnet")
    daemon(h1, "web", "appnet", cmd=("sh", "-c", "while true; do echo hello-from-h1 | nc -l -p 5000; done"))
    daemon(h2, "client", "appnet")
    web = ip_of(h1, "web", "appnet")
    assert ipaddress.ip_address(web) in ipaddress.ip_network(subnet_of(h1))
    assert ping(h2, "client", web)
    out = h2.container_exec("client", "sh", "-c", f"nc {web} 5000 </dev/null", timeout=20).stdout
    assert "hello-from-h1" in out
    # flannel's device on each host: our own lease's MAC, learning off, 8472, MTU 1450.
    details = h1.ip("-d", "link", "show", "flannel.1").stdout
    assert "vxlan id 1" in details and "dstport 8472" in details and "nolearning" in details
    assert "mtu 1450" in details
    assert lease_of(etcd, h1)["BackendData"]["VtepMAC"] in details
    env = h1.exec(["cat", "/run/flannel/subnet.env"]).stdout.split()
    first = ipaddress.ip_network(subnet_of(h1)).network_address + 1
    assert env == [f"FLANNEL_NETWORK={CLUSTER}", f"FLANNEL_SUBNET={first}/24", "FLANNEL_MTU=1450", "FLANNEL_IPMASQ=true"]


def test_full_size_packet_crosses_with_df(c):
    _, h1, h2 = c
    for h in (h1, h2):
        net(h, "appnet")
    daemon(h1, "ca", "appnet")
    daemon(h2, "cb", "appnet")
    mtu = int(h2.container_exec("cb", "cat", "/sys/class/net/eth0/mtu").stdout)
    assert mtu == 1450
    target = ip_of(h1, "ca", "appnet")
    pid = str(h2.container_pid("cb"))
    # iputils ping (DF set, no fragmentation) run in the container's network namespace.
    full = h2.exec(["nsenter", f"--net=/proc/{pid}/ns/net", "ping", "-M", "do", "-c1", "-W2", "-s", str(mtu - 28), target], check=False)
    assert full.returncode == 0, full.stdout + full.stderr
    over = h2.exec(["nsenter", f"--net=/proc/{pid}/ns/net", "ping", "-M", "do", "-c1", "-W2", "-s", str(mtu - 27), target], check=False)
    assert over.returncode != 0


def test_same_subnet_on_two_hosts_no_duplicates_and_host_routes(c):
    _, h1, h2 = c
    for h in (h1, h2):
        net(h, "shared", "--subnet", "100.80.0.0/24")
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda args: daemon(args[0], args[1], "shared"),
                      [(h1 if i % 2 else h2, f"s{i}") for i in range(16)]))
    ips = [ip_of(h1 if i % 2 else h2, f"s{i}", "shared") for i in range(16)]
    assert len(set(ips)) == 16
    # 100.80.0.0/24 is in no host's lease: peers reach these /32s through route records.
    assert ping(h1, "s1", ips[0]) and ping(h2, "s0", ips[1])


def test_address_from_another_hosts_subnet_is_routed_to_its_owner(c):
    etcd, h1, h2 = c
    for h in (h1, h2):
        net(h, "wide", "--subnet", CLUSTER)
    foreign = str(ipaddress.ip_network(subnet_of(h2)).network_address + 77)
    daemon(h1, "moved", "wide", "--ip", foreign)  # h2's subnet, living on h1
    daemon(h2, "peer", "wide")
    assert ping(h2, "peer", foreign)
    route = h2.ip("route", "show", f"{foreign}/32").stdout
    assert "flannel.1" in route and "onlink" in route
    h1.docker("rm", "-f", "moved")
    wait_until(lambda: not h2.ip("route", "show", f"{foreign}/32").stdout.strip(), timeout=10)


def test_network_name_is_learned_on_every_host(c):
    etcd, h1, h2 = c
    for h in (h1, h2):
        net(h, "named")
    def names():
        out = etcd.etcdctl("get", "--prefix", "/canal/v1/networks/", "--print-value-only").stdout
        return sorted(json.loads(line)["name"] for line in out.splitlines() if line.startswith("{"))
    wait_until(lambda: names() == ["named", "named"], timeout=10)


def test_peer_whose_lease_expires_disappears_and_gets_its_subnet_back(c):
    etcd, h1, h2 = c
    subnet2 = subnet_of(h2)
    gateway2 = str(ipaddress.ip_network(subnet2).network_address)
    assert subnet2 in h1.ip("route", "show", "dev", "flannel.1").stdout
    h2.stop_plugin(signal.SIGKILL)  # stops renewing
    wait_until(lambda: lease_of(etcd, h2) is None, timeout=TTL + 10)
    wait_until(lambda: subnet2 not in h1.ip("route", "show", "dev", "flannel.1").stdout, timeout=10)
    assert gateway2 not in h1.ip("neigh", "show", "dev", "flannel.1").stdout
    assert h2.address not in h1.exec(["bridge", "fdb", "show", "dev", "flannel.1"]).stdout
    h2.start_plugin(plugin_args(h2, etcd))
    assert subnet_of(h2) == subnet2
    wait_until(lambda: subnet2 in h1.ip("route", "show", "dev", "flannel.1").stdout, timeout=10)


def test_etcd_outage(c):
    etcd, h1, h2 = c
    for h in (h1, h2):
        net(h, "appnet")
    daemon(h1, "ca", "appnet")
    daemon(h2, "cb", "appnet")
    target = ip_of(h2, "cb", "appnet")
    etcd.stop()
    try:
        assert ping(h1, "ca", target)  # the dataplane does not need etcd
        started = time.monotonic()
        failed = h1.docker("run", "-d", "--name", "late", "--network", "appnet", IMAGE, "sleep", "100", check=False)
        assert failed.returncode != 0 and "etcd" in failed.stderr, failed.stderr
        assert time.monotonic() - started < 20
        fail_net = h1.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "--subnet", "100.81.0.0/24", "x", check=False)
        assert fail_net.returncode != 0 and "etcd" in fail_net.stderr
    finally:
        etcd.start()
    h1.docker("rm", "-f", "late", check=False)
    daemon(h1, "after", "appnet")
    assert ping(h1, "after", target)


def test_policy_applied_on_one_host_is_in_force_on_all(c):
    _, h1, h2 = c
    for h in (h1, h2):
        net(h, "appnet")
    daemon(h1, "db", "appnet", "--label", "role=db", cmd=("sh", "-c", "while true; do echo pong-db | nc -l -p 5432; done"))
    daemon(h2, "web", "appnet", "--label", "role=web")
    daemon(h2, "batch", "appnet", "--label", "role=batch")
    db = ip_of(h1, "db", "appnet")

    def tcp(src):
        out = h2.container_exec(src, "sh", "-c", f"nc -w 1 {db} 5432 </dev/null", check=False, timeout=20).stdout
        return "pong-db" in out

    assert tcp("web") and tcp("batch")  # one logical network across hosts: open by default
    doc = {"apiVersion": "canal/v1", "kind": "NetworkPolicy", "metadata": {"name": "db-from-web", "network": "appnet"},
           "spec": {"selector": "role == 'db'", "ingress": [
               {"action": "Allow", "protocol": "TCP", "source": {"selector": "role == 'web'"}, "destination": {"ports": [5432]}}]}}
    h2.exec([h2.plugin_argv()[0], "-m", "canal", "policy", "apply", "-f", "-"], input=json.dumps(doc))
    wait_until(lambda: not tcp("batch"), timeout=5)  # enforced on h1, applied on h2
    assert tcp("web")
    h1.exec([h1.plugin_argv()[0], "-m", "canal", "policy", "delete", "db-from-web"])
    wait_until(lambda: tcp("batch"), timeout=5)


def test_dockers_default_ipam_is_refused_across_hosts(c):
    """With etcd, Docker's per-host IPAM would give two hosts' containers the same addresses."""
    _, h1, _ = c
    proc = h1.docker("network", "create", "-d", "canal", "plain", check=False)
    assert proc.returncode != 0 and "same addresses" in proc.stderr and "--ipam-driver canal" in proc.stderr
