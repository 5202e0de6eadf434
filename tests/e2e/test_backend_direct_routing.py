"""flannel's vxlan backend with DirectRouting, end to end, in a mixed cluster: two Canal hosts
on one segment route to each other directly; a hand-built flanneld vxlan host whose public IP
is on another subnet (reached through a router) stays on VXLAN; a hand-built flanneld host-gw
host on the segment is routed directly. Decided per peer, from the leases alone."""

from __future__ import annotations

import ipaddress
import json

import pytest
from e2e_support import CLUSTER, clear, etcd_plugin_args
from test_backend_hostgw import status, subnet
from test_multihost import daemon, ip_of, net, ping

from testbed import Etcd, SimHost, Underlay, wait_until

VX_SUBNET = ipaddress.ip_network("100.64.200.0/24")
VX_MAC = "aa:bb:cc:00:00:03"
VX_PUBLIC = "198.18.5.3"  # f1's tunnel address, on a subnet of its own: not on-link for h1/h2
GW_SUBNET = ipaddress.ip_network("100.64.202.0/24")


@pytest.fixture(scope="module")
def bed():
    ul = Underlay()
    try:
        etcd = Etcd(ul)
        etcd.etcdctl("put", "/coreos.com/network/config",
                     json.dumps({"Network": CLUSTER, "Backend": {"Type": "vxlan", "DirectRouting": True}}))
        hosts = []
        for i in (1, 2):
            h = SimHost(ul, f"h{i}", f"198.18.0.{i}")
            h.start_dockerd()
            h.load_image()
            h.start_plugin(etcd_plugin_args(h, etcd))
            h.ip("route", "add", "198.18.5.0/24", "via", "198.18.0.3")  # f1 routes its own subnet
            hosts.append(h)
        f1 = SimHost(ul, "f1", "198.18.0.3")
        f2 = SimHost(ul, "f2", "198.18.0.4")
        # flanneld vxlan on f1, its VTEP bound to the address on the other subnet.
        f1.ip("addr", "add", f"{VX_PUBLIC}/24", "dev", "eth0")
        f1.ip("link", "add", "flannel.1", "address", VX_MAC, "type", "vxlan", "id", "1", "local", VX_PUBLIC,
              "dev", "eth0", "nolearning", "dstport", "8472")
        f1.ip("addr", "add", f"{VX_SUBNET.network_address}/32", "dev", "flannel.1")
        f1.ip("link", "set", "flannel.1", "mtu", "1450", "up")
        etcd.etcdctl("put", "/coreos.com/network/subnets/100.64.200.0-24", json.dumps(
            {"PublicIP": VX_PUBLIC, "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": VX_MAC}}))
        # flanneld host-gw on f2: its lease without BackendData and a "pod" address.
        f2.ip("addr", "add", f"{GW_SUBNET.network_address + 1}/32", "dev", "lo")
        etcd.etcdctl("put", "/coreos.com/network/subnets/100.64.202.0-24",
                     json.dumps({"PublicIP": f2.address, "BackendType": "host-gw"}))
        yield etcd, hosts[0], hosts[1], f1, f2
    finally:
        ul.close()


def vxlan_peer(f: SimHost, subnet: ipaddress.IPv4Network, mac: str, public_ip: str) -> None:
    """flanneld's three steps for a remote vxlan lease: neighbour, FDB, then the onlink route."""
    gw = str(subnet.network_address)
    f.ip("neigh", "replace", gw, "lladdr", mac, "dev", "flannel.1", "nud", "permanent")
    f.exec(["bridge", "fdb", "replace", mac, "dev", "flannel.1", "dst", public_ip, "self", "permanent"])
    f.ip("route", "replace", str(subnet), "via", gw, "dev", "flannel.1", "onlink")


def lease(etcd: Etcd, h: SimHost) -> dict:
    out = etcd.etcdctl("get", "--prefix", "/coreos.com/network/subnets/").stdout.splitlines()
    return next(json.loads(v) for v in out[1::2] if json.loads(v)["PublicIP"] == h.address)


def test_mixed_cluster_routes_each_peer_its_own_way_and_all_talk(bed):
    etcd, h1, h2, f1, f2 = bed
    try:
        for h in (h1, h2):
            net(h, "appnet")
        daemon(h1, "web", "appnet", cmd=("sh", "-c", "while true; do echo hello-from-h1 | nc -l -p 5000; done"))
        daemon(h2, "client", "appnet")
        web = ip_of(h1, "web", "appnet")
        s1, s2 = subnet(h1), subnet(h2)
        # Canal peers on one segment: direct, no tunnel.
        wait_until(lambda: f"via {h2.address} dev eth0 proto 103" in h1.ip("route", "show", str(s2)).stdout, timeout=15)
        assert f"via {h1.address} dev eth0 proto 103" in h2.ip("route", "show", str(s1)).stdout
        assert ping(h2, "client", web)
        assert "hello-from-h1" in h2.container_exec("client", "sh", "-c", f"nc {web} 5000 </dev/null", timeout=20).stdout
        # The vxlan peer off our subnet: over flannel.1 as ever; the host-gw peer: direct.
        wait_until(lambda: "flannel.1" in h1.ip("route", "show", str(VX_SUBNET)).stdout, timeout=15)
        assert VX_MAC in h1.exec(["bridge", "fdb", "show", "dev", "flannel.1"]).stdout
        assert f"via {f2.address} dev eth0" in h1.ip("route", "show", str(GW_SUBNET)).stdout
        # Leases stay vxlan (DirectRouting is a per-host choice, not a lease type); MTU keeps the tunnel's.
        assert lease(etcd, h1)["BackendType"] == "vxlan" and lease(etcd, h1)["BackendData"]["VtepMAC"]
        assert h2.container_exec("client", "cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1450"
        assert status(h1)["backend"] == {"type": "vxlan", "direct_routing": True, "problems": []}
        # The flanneld hosts program h1 as flanneld would, and a container on h1 reaches both.
        h1_lease = lease(etcd, h1)
        vxlan_peer(f1, s1, h1_lease["BackendData"]["VtepMAC"], h1.address)
        f2.ip("route", "replace", str(s1), "via", h1.address, "dev", "eth0")
        assert ping(h1, "web", str(VX_SUBNET.network_address))  # over VXLAN both ways
        assert ping(h1, "web", str(GW_SUBNET.network_address + 1))  # directly both ways
    finally:
        for h in (h1, h2):
            clear(h)
