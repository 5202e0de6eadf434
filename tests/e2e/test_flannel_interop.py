"""Canal beside and on top of flanneld. Debian ships no flanneld, so the flanneld host here is
built by hand exactly as flanneld builds it (reference: flannel's vxlan backend): its lease in
etcd with flannel's JSON, its flannel.1 device, its subnet.env and its peer entries."""

from __future__ import annotations

import ipaddress
import json

import pytest
from test_multihost import CLUSTER, daemon, ip_of, net, plugin_args

from testbed import Etcd, SimHost, Underlay, wait_until

FLANNEL_SUBNET = ipaddress.ip_network("100.64.200.0/24")
FLANNEL_MAC = "aa:bb:cc:00:00:03"


def flannel_host(f: SimHost, etcd: Etcd) -> None:
    """What flanneld does on start: lease, device, subnet.env; peers are programmed later."""
    lease = etcd.etcdctl("lease", "grant", "600").stdout.split()[1]
    value = {"PublicIP": f.address, "PublicIPv6": None, "BackendType": "vxlan",
             "BackendData": {"VNI": 1, "VtepMAC": FLANNEL_MAC}}
    etcd.etcdctl("put", f"--lease={lease}", "/coreos.com/network/subnets/100.64.200.0-24", json.dumps(value))
    f.ip("link", "add", "flannel.1", "address", FLANNEL_MAC, "type", "vxlan", "id", "1", "local", f.address,
         "dev", "eth0", "nolearning", "dstport", "8472")
    f.ip("addr", "add", f"{FLANNEL_SUBNET.network_address}/32", "dev", "flannel.1")
    f.ip("link", "set", "flannel.1", "mtu", "1450", "up")
    env = f"FLANNEL_NETWORK={CLUSTER}\nFLANNEL_SUBNET=100.64.200.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
    f.exec(["sh", "-c", f"mkdir -p /run/flannel && printf '{env}' > /run/flannel/subnet.env"])
    f.exec(["sysctl", "-qw", "net.ipv4.ip_forward=1"])


def flannel_add_peer(f: SimHost, etcd: Etcd, peer: SimHost) -> ipaddress.IPv4Network:
    """flanneld's three steps for a remote lease: neighbour, FDB, then the onlink route."""
    out = etcd.etcdctl("get", "--prefix", "/coreos.com/network/subnets/").stdout.splitlines()
    for key, value in zip(out[::2], out[1::2]):
        data = json.loads(value)
        if data["PublicIP"] == peer.address:
            subnet = ipaddress.ip_network(key.rsplit("/", 1)[1].replace("-", "/"))
            gw, mac = str(subnet.network_address), data["BackendData"]["VtepMAC"]
            f.ip("neigh", "replace", gw, "lladdr", mac, "dev", "flannel.1", "nud", "permanent")
            f.exec(["bridge", "fdb", "replace", mac, "dev", "flannel.1", "dst", peer.address, "self", "permanent"])
            f.ip("route", "replace", str(subnet), "via", gw, "dev", "flannel.1", "onlink")
            return subnet
    raise AssertionError(f"no lease for {peer.address}")


@pytest.fixture(scope="module")
def hosts():
    ul = Underlay()
    try:
        etcd = Etcd(ul)
        h1 = SimHost(ul, "h1", "198.18.0.1")
        h1.start_dockerd()
        h1.load_image()
        h1.start_plugin(plugin_args(h1, etcd))
        f1 = SimHost(ul, "f1", "198.18.0.3")
        f1.start_dockerd()
        f1.load_image()
        flannel_host(f1, etcd)
        yield etcd, h1, f1
    finally:
        ul.close()


def test_canal_and_flanneld_hosts_route_to_each_other(hosts):
    etcd, h1, f1 = hosts
    net(h1, "appnet")
    daemon(h1, "web", "appnet")
    web = ip_of(h1, "web", "appnet")
    h1_subnet = flannel_add_peer(f1, etcd, h1)
    assert ipaddress.ip_address(web) in h1_subnet
    # Canal programmed the flanneld host from its lease alone ...
    wait_until(lambda: str(FLANNEL_SUBNET) in h1.ip("route", "show", "dev", "flannel.1").stdout, timeout=10)
    assert FLANNEL_MAC in h1.exec(["bridge", "fdb", "show", "dev", "flannel.1"]).stdout
    # ... and packets flow between a Canal container and the flanneld host's VTEP: outward
    # freely, inward once a policy lets the flannel subnet in (Canal's default isolation).
    flannel_vtep = str(FLANNEL_SUBNET.network_address)
    assert h1.container_exec("web", "ping", "-c1", "-W2", flannel_vtep, check=False).returncode == 0
    assert f1.exec(["ping", "-c1", "-W2", "-I", flannel_vtep, web], check=False).returncode != 0
    policy = {"apiVersion": "canal/v1", "kind": "GlobalNetworkPolicy", "metadata": {"name": "from-flannel"},
              "spec": {"ingress": [{"action": "Allow", "source": {"nets": [str(FLANNEL_SUBNET)]}}]}}
    h1.exec([h1.plugin_argv()[0], "-m", "canal", "policy", "apply", "-f", "-"], input=json.dumps(policy))
    try:
        assert f1.exec(["ping", "-c1", "-W2", "-I", flannel_vtep, web], check=False).returncode == 0
    finally:
        h1.exec([h1.plugin_argv()[0], "-m", "canal", "policy", "delete", "from-flannel"])


def test_canal_on_top_of_flanneld_uses_its_subnet_and_device(hosts):
    etcd, h1, f1 = hosts
    flannel_add_peer(f1, etcd, h1)
    lease_before = etcd.etcdctl("get", "/coreos.com/network/subnets/100.64.200.0-24", "--print-value-only").stdout
    f1.start_plugin(plugin_args(f1, etcd))
    try:
        status = json.loads(f1.exec([f1.plugin_argv()[0], "-m", "canal", "status", "-o", "json"], check=False).stdout)
        assert status["flannel_mode"] == "external" and status["subnet"] == str(FLANNEL_SUBNET)
        net(f1, "appnet2")
        net(h1, "appnet2")
        daemon(f1, "onflannel", "appnet2")
        daemon(h1, "oncanal", "appnet2")
        there = ip_of(f1, "onflannel", "appnet2")
        assert ipaddress.ip_address(there) in FLANNEL_SUBNET
        assert h1.container_exec("oncanal", "ping", "-c1", "-W2", there, check=False).returncode == 0
        assert f1.container_exec("onflannel", "ping", "-c1", "-W2", ip_of(h1, "oncanal", "appnet2"), check=False).returncode == 0
        # flanneld's device, lease and MTU were left alone.
        assert FLANNEL_MAC in f1.ip("link", "show", "flannel.1").stdout
        lease_after = etcd.etcdctl("get", "/coreos.com/network/subnets/100.64.200.0-24", "--print-value-only").stdout
        assert lease_after == lease_before
        assert f1.container_exec("onflannel", "cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1450"
    finally:
        for h in (f1, h1):
            ids = h.docker("ps", "-aq").stdout.split()
            if ids:
                h.docker("rm", "-f", *ids)
            h.docker("network", "rm", "appnet2", check=False)
        f1.stop_plugin()
