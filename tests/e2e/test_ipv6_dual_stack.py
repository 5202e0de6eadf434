"""Issue 13, flannel's dual stack across real hosts: every host leases an IPv6 subnet with its
IPv4 one (one flannel lease key for both), --ipv6 networks without an IPv6 --subnet draw from
it, and peers route each other's subnets over `flannel-v6.1` when both have an IPv6 underlay
(2001:2::/48 on eth0), into `flannel.1` when not, and with a dual-stack flanneld host built by
hand as flanneld builds it."""

from __future__ import annotations

import ipaddress
import json

import pytest
from e2e_support import CLUSTER, IMAGE, add_ipv6_underlay, canal, clear, etcd_cluster, etcd_plugin_args, underlay6_address, wait_open

from canal.datastore.keys import Keys
from testbed import Etcd, SimHost, wait_until

NETWORK6 = ipaddress.IPv6Network("fd00:64::/48")
FLANNEL_CONFIG = {"Network": CLUSTER, "SubnetLen": 24, "EnableIPv6": True, "IPv6Network": str(NETWORK6),
                  "Backend": {"Type": "vxlan", "VNI": 1}}
KEYS = Keys("/canal/v1", "/coreos.com/network")
F_SUBNET, F_SUBNET6 = ipaddress.IPv4Network("100.64.200.0/24"), ipaddress.IPv6Network("fd00:64:0:c8::/64")
F_MAC, F_MAC6 = "aa:bb:cc:00:00:04", "aa:bb:cc:00:66:04"


def plugin_args(h: SimHost, etcd: Etcd) -> list[str]:
    return etcd_plugin_args(h, etcd)


@pytest.fixture(scope="module")
def bed():
    # The cluster's config first (flannel's EnableIPv6): every host's lease is dual stack.
    with etcd_cluster(plugin_args, flannel_config=FLANNEL_CONFIG, ipv6_underlay=True) as (ul, etcd, hosts):
        yield ul, etcd, hosts


@pytest.fixture
def c(bed):
    ul, etcd, (h1, h2) = bed
    yield ul, etcd, h1, h2
    for h in (h1, h2):
        if not h.plugin_running():
            h.start_plugin(plugin_args(h, etcd))
        clear(h)


def leases(etcd: Etcd) -> dict[str, dict]:
    out = etcd.etcdctl("get", "--prefix", KEYS.leases).stdout.splitlines()
    return {key[len(KEYS.leases):]: json.loads(value) for key, value in zip(out[::2], out[1::2])}


def lease_of(etcd: Etcd, h: SimHost) -> tuple[str, dict]:
    found = [(k, v) for k, v in leases(etcd).items() if v["PublicIP"] == h.address]
    assert len(found) == 1, found
    return found[0]


def keys_of(etcd: Etcd, h: SimHost) -> list[str]:
    """Every lease key of a host: two only mid-move (the new key is written before the old goes)."""
    return sorted(k for k, v in leases(etcd).items() if v["PublicIP"] == h.address)


def subnet6_of(etcd: Etcd, h: SimHost) -> ipaddress.IPv6Network:
    key, _ = lease_of(etcd, h)
    assert "&" in key, key
    address, length = key.split("&")[1].rsplit("-", 1)
    return ipaddress.IPv6Network(f"{address}/{length}")


def link(h: SimHost, name: str) -> dict | None:
    proc = h.ip("-j", "-s", "link", "show", name, check=False)
    return json.loads(proc.stdout)[0] if proc.returncode == 0 else None


def route6(h: SimHost, dst: ipaddress.IPv6Network) -> dict | None:
    """The main-table route to exactly `dst` (parsed, compared exactly)."""
    for r in json.loads(h.ip("-j", "-6", "route", "show", "table", "main").stdout):
        if r.get("dst") and ipaddress.IPv6Network(r["dst"] if "/" in r["dst"] else f"{r['dst']}/128") == dst:
            return r
    return None


def fdb(h: SimHost, dev: str) -> set[tuple[str, str]]:
    entries = json.loads(h.exec(["bridge", "-j", "fdb", "show", "dev", dev]).stdout)
    return {(e["mac"], str(ipaddress.ip_address(e["dst"]))) for e in entries if e.get("dst")}


def net(h: SimHost) -> None:
    h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "--ipv6", "dual")


def server(h: SimHost, name: str, *opts: str) -> None:
    h.docker("run", "-d", "--name", name, "--network", "dual", *opts, IMAGE, "sh", "-c",
             f"while true; do echo pong-{name} | nc -l -p 80; done & sleep 100000")
    wait_open(h, name)


def address6(h: SimHost, container: str) -> ipaddress.IPv6Address:
    settings = h.docker_json("inspect", container)[0]["NetworkSettings"]["Networks"]["dual"]
    return ipaddress.IPv6Address(settings["GlobalIPv6Address"])


def answered(h: SimHost, client: str, address: str, name: str) -> bool:
    out = h.docker("exec", client, "sh", "-c", f"nc -w 2 {address} 80 </dev/null", check=False).stdout
    return out.strip() == f"pong-{name}"


def pings6(h: SimHost, client: str, target: str) -> bool:
    return h.docker("exec", client, "ping", "-6", "-c1", "-W2", target, check=False).returncode == 0


def tx_packets(h: SimHost, dev: str) -> int:
    info = link(h, dev)
    assert info is not None, f"{dev} missing on {h.name}"
    return int(info["stats64"]["tx"]["packets"])


def routes_records(etcd: Etcd) -> set[str]:
    return set(etcd.etcdctl("get", "--prefix", "--keys-only", KEYS.routes).stdout.split())


def test_dual_stack_leases_and_ipv6_over_flannel_v6(c):
    _, etcd, h1, h2 = c
    # Each lease: flannel's dual-stack key, PublicIPv6 and BackendV6Data with the device's MAC.
    for h in (h1, h2):
        key, value = lease_of(etcd, h)
        assert value["PublicIPv6"] == underlay6_address(h)
        wait_until(lambda h=h: link(h, "flannel-v6.1") is not None, timeout=15, what=f"{h.name}'s flannel-v6.1")
        dev = link(h, "flannel-v6.1")
        assert dev is not None and value["BackendV6Data"]["VtepMAC"] == dev["address"]
        assert dev["mtu"] == 1500 - 70
        sub6 = subnet6_of(etcd, h)
        assert sub6.prefixlen == 64 and sub6.subnet_of(NETWORK6)
        env = dict(line.split("=", 1) for line in h.exec(["cat", "/run/flannel/subnet.env"]).stdout.split())
        assert env["FLANNEL_IPV6_NETWORK"] == str(NETWORK6)
        assert ipaddress.IPv6Interface(env["FLANNEL_IPV6_SUBNET"]) == ipaddress.IPv6Interface(
            f"{sub6.network_address + 1}/64")
    s1, s2 = subnet6_of(etcd, h1), subnet6_of(etcd, h2)
    assert s1 != s2
    for h in (h1, h2):
        net(h)
    server(h2, "db")
    db6 = address6(h2, "db")
    server(h1, "web", "--add-host", f"db:{db6}")
    web6 = address6(h1, "web")
    # Addresses from each host's own leased subnet: no /128 route records for them.
    assert web6 in s1 and db6 in s2
    assert KEYS.route(db6) not in routes_records(etcd) and KEYS.route(web6) not in routes_records(etcd)
    # h1 routes h2's subnet over flannel-v6.1 as flanneld does: via its subnet address, onlink,
    # neighbour -> h2's v6 VTEP MAC, FDB -> h2's IPv6 underlay address.
    mac6_h2 = lease_of(etcd, h2)[1]["BackendV6Data"]["VtepMAC"]
    wait_until(lambda: route6(h1, s2) is not None, timeout=15, what="h1 routes h2's IPv6 subnet")
    r = route6(h1, s2)
    assert r is not None and r["dev"] == "flannel-v6.1" and ipaddress.IPv6Address(r["gateway"]) == s2.network_address
    assert "onlink" in r.get("flags", [])
    assert (mac6_h2, underlay6_address(h2)) in fdb(h1, "flannel-v6.1")
    before = tx_packets(h1, "flannel-v6.1")
    assert pings6(h1, "web", str(db6)) and pings6(h1, "web", "db")  # by address and by name
    assert answered(h1, "web", str(db6), "db") and answered(h1, "web", "db", "db")
    assert answered(h2, "db", str(web6), "web")
    assert tx_packets(h1, "flannel-v6.1") > before  # the packets went through flannel-v6.1
    # One MTU for both families: a packet of the container's full MTU crosses flannel-v6.1
    # whole (with the IPv4 MTU of 1450 it would be dropped there, waiting on PMTU discovery).
    mtu = int(h1.docker("exec", "web", "cat", "/sys/class/net/eth0/mtu").stdout)
    assert mtu == 1500 - 70
    full = h1.docker("exec", "web", "ping", "-6", "-c1", "-W2", "-s", str(mtu - 48), str(db6), check=False)
    assert full.returncode == 0, full.stdout + full.stderr
    status = json.loads(h1.exec([h1.plugin_argv()[0], "-m", "canal", "status", "-o", "json"], check=False).stdout)
    assert not status["backend"]["problems"]
    assert (status["subnet6"], status["public_ip6"]) == (str(s1), underlay6_address(h1))


def test_interop_with_a_dual_stack_flanneld_host(c):
    ul, etcd, h1, _ = c
    f1 = SimHost(ul, "f1", "198.18.0.4")
    try:
        f_public6 = add_ipv6_underlay(f1)
        # flanneld's start: dual-stack lease, flannel.1 and flannel-v6.1 (flannel's device.go).
        lease = etcd.etcdctl("lease", "grant", "600").stdout.split()[1]
        value = {"PublicIP": f1.address, "PublicIPv6": f_public6, "BackendType": "vxlan",
                 "BackendData": {"VNI": 1, "VtepMAC": F_MAC}, "BackendV6Data": {"VNI": 1, "VtepMAC": F_MAC6}}
        key = f"{F_SUBNET.network_address}-24&{F_SUBNET6.network_address}-64"
        etcd.etcdctl("put", f"--lease={lease}", KEYS.leases + key, json.dumps(value))
        f1.ip("link", "add", "flannel.1", "address", F_MAC, "type", "vxlan", "id", "1", "local", f1.address,
              "dev", "eth0", "nolearning", "dstport", "8472")
        f1.ip("addr", "add", f"{F_SUBNET.network_address}/32", "dev", "flannel.1")
        f1.ip("link", "set", "flannel.1", "mtu", "1450", "up")
        f1.ip("link", "add", "flannel-v6.1", "address", F_MAC6, "type", "vxlan", "id", "1", "local", f_public6,
              "dev", "eth0", "nolearning", "dstport", "8472")
        f1.exec(["sysctl", "-qw", "net.ipv6.conf.flannel-v6/1.accept_ra=0"])
        f1.ip("-6", "addr", "add", f"{F_SUBNET6.network_address}/128", "dev", "flannel-v6.1", "nodad")
        f1.ip("link", "set", "flannel-v6.1", "mtu", "1430", "up")
        # flanneld's peer steps for h1's lease, IPv6 side: neighbour, FDB, onlink route.
        h1_key, h1_value = lease_of(etcd, h1)
        s1 = subnet6_of(etcd, h1)
        f1.ip("-6", "neigh", "replace", str(s1.network_address), "lladdr", h1_value["BackendV6Data"]["VtepMAC"],
              "dev", "flannel-v6.1", "nud", "permanent")
        f1.exec(["bridge", "fdb", "replace", h1_value["BackendV6Data"]["VtepMAC"], "dev", "flannel-v6.1",
                 "dst", h1_value["PublicIPv6"], "self", "permanent"])
        f1.ip("-6", "route", "replace", str(s1), "via", str(s1.network_address), "dev", "flannel-v6.1", "onlink")
        # Canal programs the flanneld host from its lease alone.
        wait_until(lambda: route6(h1, F_SUBNET6) is not None, timeout=15, what="h1 routes the flanneld v6 subnet")
        r = route6(h1, F_SUBNET6)
        assert r is not None and r["dev"] == "flannel-v6.1"
        assert (F_MAC6, f_public6) in fdb(h1, "flannel-v6.1")
        net(h1)
        server(h1, "web")
        web6 = address6(h1, "web")
        target = str(F_SUBNET6.network_address)
        assert pings6(h1, "web", target)  # Canal container -> an address in the flanneld host's v6 subnet
        # Inward, Canal's default isolation holds (control), until a policy lets the subnet in.
        assert f1.exec(["ping", "-6", "-c1", "-W2", "-I", target, str(web6)], check=False).returncode != 0
        policy = {"apiVersion": "canal/v1", "kind": "GlobalNetworkPolicy", "metadata": {"name": "from-flannel6"},
                  "spec": {"ingress": [{"action": "Allow", "source": {"nets": [str(F_SUBNET6)]}}]}}
        canal(h1, "policy", "apply", "-f", "-", input=json.dumps(policy), raw=True)
        try:
            wait_until(lambda: f1.exec(["ping", "-6", "-c1", "-W2", "-I", target, str(web6)], check=False
                                       ).returncode == 0, timeout=15, what="flanneld host pings the container")
        finally:
            canal(h1, "policy", "delete", "from-flannel6", raw=True)
        # A flanneld lease without PublicIPv6 cannot carry IPv6: named in canal status.
        bad = {"PublicIP": "198.18.0.9", "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": "aa:bb:cc:00:00:09"}}
        bad_key = KEYS.leases + "100.64.201.0-24&fd00:64:0:c9::-64"
        etcd.etcdctl("put", bad_key, json.dumps(bad))
        try:
            def named() -> bool:
                status = json.loads(h1.exec([h1.plugin_argv()[0], "-m", "canal", "status", "-o", "json"],
                                            check=False).stdout)
                return any("198.18.0.9" in p and "PublicIPv6" in p for p in status["backend"]["problems"])
            wait_until(named, timeout=15, what="canal status names the flanneld peer without PublicIPv6")
            assert route6(h1, ipaddress.IPv6Network("fd00:64:0:c9::/64")) is None
        finally:
            etcd.etcdctl("del", bad_key)
        etcd.etcdctl("lease", "revoke", lease)
        wait_until(lambda: route6(h1, F_SUBNET6) is None, timeout=15, what="the flanneld host's v6 route removed")
        assert (F_MAC6, f_public6) not in fdb(h1, "flannel-v6.1")  # its FDB entry went with it
    finally:
        f1.close()


def test_without_an_ipv6_underlay_ipv6_goes_through_flannel_1(c):
    """Both hosts lose their IPv6 underlay (plugins restarted): leases drop PublicIPv6, the
    flannel-v6.1 devices go, and each routes the other's IPv6 subnet into flannel.1."""
    _, etcd, h1, h2 = c
    for h in (h1, h2):
        net(h)
    server(h2, "db")
    server(h1, "web")
    db6, web6 = address6(h2, "db"), address6(h1, "web")
    try:
        for h in (h1, h2):
            h.stop_plugin()
            h.ip("-6", "addr", "del", f"{underlay6_address(h)}/64", "dev", "eth0")
            h.start_plugin(plugin_args(h, etcd))
        for h in (h1, h2):
            wait_until(lambda h=h: "PublicIPv6" not in lease_of(etcd, h)[1], timeout=15, what="lease without PublicIPv6")
            wait_until(lambda h=h: link(h, "flannel-v6.1") is None, timeout=15, what=f"{h.name}'s flannel-v6.1 removed")
        s1, s2 = subnet6_of(etcd, h1), subnet6_of(etcd, h2)
        assert web6 in s1 and db6 in s2  # same leases, same subnets, the addresses kept
        wait_until(lambda: (route6(h1, s2) or {}).get("dev") == "flannel.1", timeout=15, what="h1: h2's subnet via flannel.1")
        r = route6(h1, s2)
        assert r is not None and ipaddress.IPv6Address(r["gateway"]).is_link_local
        before = tx_packets(h1, "flannel.1")
        assert pings6(h1, "web", str(db6)) and answered(h1, "web", str(db6), "db")
        assert answered(h2, "db", str(web6), "web")
        assert tx_packets(h1, "flannel.1") > before
    finally:
        for h in (h1, h2):
            h.stop_plugin()
            h.ip("-6", "addr", "add", f"{underlay6_address(h)}/64", "dev", "eth0", "nodad", check=False)
            h.start_plugin(plugin_args(h, etcd))


def test_leases_follow_the_config_live_and_route_records_still_work(c):
    """The cluster drops IPv6 and gains it back while the plugins run: each lease moves between
    the IPv4-only and the dual-stack key at renewal, keeping its IPv4 subnet, never two keys
    left; then an address outside every host subnet (a --subnet pool's, like addresses of older
    releases) travels as a /128 route record over flannel-v6.1."""
    _, etcd, h1, h2 = c
    v4 = {h.name: lease_of(etcd, h)[0].split("&")[0] for h in (h1, h2)}
    try:
        etcd.etcdctl("put", "/coreos.com/network/config",
                     json.dumps({k: v for k, v in FLANNEL_CONFIG.items() if k not in ("EnableIPv6", "IPv6Network")}))
        for h in (h1, h2):
            wait_until(lambda h=h: keys_of(etcd, h) == [v4[h.name]], timeout=20, what=f"{h.name}: IPv4-only key")
            wait_until(lambda h=h: link(h, "flannel-v6.1") is None, timeout=15, what=f"{h.name}: flannel-v6.1 removed")
    finally:
        etcd.etcdctl("put", "/coreos.com/network/config", json.dumps(FLANNEL_CONFIG))
    for h in (h1, h2):
        wait_until(lambda h=h: len(keys_of(etcd, h)) == 1 and "&" in keys_of(etcd, h)[0], timeout=20,
                   what=f"{h.name}: dual-stack key again, the IPv4-only one gone")
        assert lease_of(etcd, h)[0].split("&")[0] == v4[h.name]  # same IPv4 subnet (lease_of: one key per host)
        wait_until(lambda h=h: link(h, "flannel-v6.1") is not None, timeout=15, what=f"{h.name}: flannel-v6.1 back")
    # A --subnet pool's addresses lie outside every host subnet: /128 route records, over flannel-v6.1.
    for h in (h1, h2):
        h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "--ipv6", "--subnet", "fd00:6569::/64",
                 "dual")
    server(h2, "db")
    server(h1, "web")
    outside = address6(h2, "db")
    assert outside in ipaddress.IPv6Network("fd00:6569::/64")
    wait_until(lambda: KEYS.route(outside) in routes_records(etcd), timeout=15, what="db's /128 route record")
    dst = ipaddress.IPv6Network(f"{outside}/128")
    wait_until(lambda: route6(h1, dst) is not None, timeout=15, what="h1 routes db's /128")
    r = route6(h1, dst)
    assert r is not None and r["dev"] == "flannel-v6.1"
    assert ipaddress.IPv6Address(r["gateway"]) == subnet6_of(etcd, h2).network_address
    assert pings6(h1, "web", str(outside)) and answered(h1, "web", str(outside), "db")
    assert answered(h2, "db", str(address6(h1, "web")), "web")
