"""flannel's host-gw backend end to end: Canal hosts over one etcd whose network config says
host-gw, a flanneld-style host-gw host built by hand as flanneld builds it (its lease without
BackendData, its pod address, its routes via the peers' public IPs), and a peer whose lease
names an address off our L2 segment: refused by name while the others keep working."""

from __future__ import annotations

import ipaddress
import json

import pytest
from e2e_support import CLUSTER, clear, etcd_plugin_args
from test_multihost import daemon, ip_of, lease_of, net, ping

from testbed import Etcd, SimHost, Underlay, wait_until

FLANNEL_SUBNET = ipaddress.ip_network("100.64.200.0/24")
OFF_LINK_KEY = "/coreos.com/network/subnets/100.64.201.0-24"


def status(h: SimHost) -> dict:
    out = h.exec([h.plugin_argv()[0], "-m", "canal", "status", "-o", "json"], check=False).stdout
    return json.loads(out)


@pytest.fixture(scope="module")
def bed():
    ul = Underlay()
    try:
        etcd = Etcd(ul)
        etcd.etcdctl("put", "/coreos.com/network/config",
                     json.dumps({"Network": CLUSTER, "Backend": {"Type": "host-gw"}}))
        hosts = []
        for i in (1, 2):
            h = SimHost(ul, f"h{i}", f"198.18.0.{i}")
            h.start_dockerd()
            h.load_image()
            h.start_plugin(etcd_plugin_args(h, etcd))
            hosts.append(h)
        f1 = SimHost(ul, "f1", "198.18.0.3")
        yield etcd, hosts[0], hosts[1], f1
    finally:
        ul.close()


@pytest.fixture
def b(bed):
    etcd, h1, h2, f1 = bed
    yield bed
    etcd.etcdctl("del", OFF_LINK_KEY)
    for h in (h1, h2):
        clear(h)


def subnet(h: SimHost) -> ipaddress.IPv4Network:
    return ipaddress.ip_network(status(h)["subnet"])


def test_host_gw_hosts_route_directly_and_containers_talk(b):
    etcd, h1, h2, _f1 = b
    for h in (h1, h2):
        net(h, "appnet")
    daemon(h1, "web", "appnet", cmd=("sh", "-c", "while true; do echo hello-from-h1 | nc -l -p 5000; done"))
    daemon(h2, "client", "appnet")
    web = ip_of(h1, "web", "appnet")
    assert ping(h2, "client", web)
    assert "hello-from-h1" in h2.container_exec("client", "sh", "-c", f"nc {web} 5000 </dev/null", timeout=20).stdout
    # flannel's host-gw: the lease carries its type and no BackendData; a plain route via the
    # peer's public IP on the underlay; no VXLAN device; no encapsulation overhead in the MTU.
    assert lease_of(etcd, h1) == {"PublicIP": h1.address, "BackendType": "host-gw"}
    route = h2.ip("route", "show", str(subnet(h1))).stdout
    assert f"via {h1.address} dev eth0 proto 103" in route, route
    assert h2.ip("link", "show", "flannel.1", check=False).returncode != 0
    assert h2.container_exec("client", "cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1500"
    assert status(h2)["backend"] == {"type": "host-gw", "direct_routing": False, "problems": []}


def test_canal_and_flanneld_host_gw_hosts_reach_each_other(b):
    etcd, h1, _h2, f1 = b
    # flanneld host-gw on f1: its lease (no BackendData), a pod address in its subnet, and a
    # route to each peer subnet via the peer's public IP.
    etcd.etcdctl("put", f"/coreos.com/network/subnets/{FLANNEL_SUBNET.network_address}-24",
                 json.dumps({"PublicIP": f1.address, "BackendType": "host-gw"}))
    f1.ip("addr", "replace", f"{FLANNEL_SUBNET.network_address + 1}/32", "dev", "lo")  # its "pod" (no dummy module here)
    f1.ip("route", "replace", str(subnet(h1)), "via", h1.address, "dev", "eth0")
    net(h1, "appnet")
    daemon(h1, "web", "appnet")
    wait_until(lambda: f"via {f1.address}" in h1.ip("route", "show", str(FLANNEL_SUBNET)).stdout, timeout=15)
    pod = str(FLANNEL_SUBNET.network_address + 1)
    assert ping(h1, "web", pod)  # there over h1's host-gw route, back over flanneld's


def test_peer_off_the_l2_segment_is_refused_by_name_and_the_others_keep_working(b):
    etcd, h1, h2, _f1 = b
    # A lease naming a public IP that is not on-link on the hosts' underlay (198.18.0.0/24).
    etcd.etcdctl("put", OFF_LINK_KEY, json.dumps({"PublicIP": "203.0.113.9", "BackendType": "host-gw"}))

    def refused() -> bool:
        return any("203.0.113.9" in p and "not on the same L2 segment" in p for p in status(h1)["backend"]["problems"])

    wait_until(refused, timeout=20)
    assert any("203.0.113.9" in p for p in status(h1)["problems"])  # unhealthy, naming the peer
    assert h1.ip("route", "show", "100.64.201.0/24").stdout.strip() == ""
    assert "203.0.113.9" in h1.plugin_log.read_text()
    # ... while h1 and h2 still reach each other.
    for h in (h1, h2):
        net(h, "appnet")
    daemon(h1, "ca", "appnet")
    daemon(h2, "cb", "appnet")
    assert ping(h2, "cb", ip_of(h1, "ca", "appnet")) and ping(h1, "ca", ip_of(h2, "cb", "appnet"))
    # The bad lease gone, the problem goes too.
    etcd.etcdctl("del", OFF_LINK_KEY)
    wait_until(lambda: not refused(), timeout=20)
