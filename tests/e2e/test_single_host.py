"""Issue 2 end to end: one real Docker host, the plugin, real containers and packets."""

from __future__ import annotations

import ipaddress
import signal
from concurrent.futures import ThreadPoolExecutor

from e2e_support import CLUSTER, IMAGE, PLUGIN_ARGS, canal_leftovers, run_open, wait_open

from testbed import wait_until


def net(h, name, *opts):
    h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", *opts, name)


def daemon(h, name, network, *opts, cmd=("sleep", "1000")):
    h.docker("run", "-d", "--name", name, "--network", network, *opts, IMAGE, *cmd)
    wait_open(h, name)


def sh(h, network, script, *opts, check=True):
    return run_open(h, network, script, *opts, check=check)


def ip_of(h, container, network):
    data = h.docker_json("inspect", container)[0]
    return data["NetworkSettings"]["Networks"][network]["IPAddress"]


def pings(h, network, target, *opts):
    return sh(h, network, f"ping -c1 -W2 {target}", *opts, check=False).returncode == 0


def test_user_flow_by_name_and_ip(h1):
    net(h1, "appnet")
    daemon(h1, "web1", "appnet")
    ip = ip_of(h1, "web1", "appnet")
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(CLUSTER)
    out = sh(h1, "appnet", f"ping -c1 -W2 web1 && ping -c1 -W2 {ip} && ip route && ip -4 addr show eth0").stdout
    assert "default via 169.254.1.1 dev eth0" in out
    assert "/32 scope global eth0" in out
    # Docker turned the FORWARD policy to DROP; routed endpoints must not care.
    assert ":FORWARD DROP" in h1.exec(["iptables-nft-save", "-t", "filter"]).stdout


def test_network_inspect_and_addresses(h1):
    net(h1, "appnet")
    info = h1.docker_json("network", "inspect", "appnet")[0]
    assert info["Driver"] == "canal" and info["IPAM"]["Driver"] == "canal"
    daemon(h1, "web1", "appnet")
    settings = h1.docker_json("inspect", "web1")[0]["NetworkSettings"]["Networks"]["appnet"]
    assert settings["IPPrefixLen"] == 32
    ip = ipaddress.ip_address(settings["IPAddress"])
    assert settings["MacAddress"] == "02:42:" + ":".join(f"{b:02x}" for b in ip.packed)


def test_container_reaches_outside_through_masquerade_but_not_its_host(h1, underlay):
    net(h1, "appnet")
    # The underlay namespace has no route back to the cluster network: a reply only comes
    # back if the container's traffic was masqueraded to the host's address.
    assert pings(h1, "appnet", underlay.gateway_ip)
    # The host itself is closed to workloads by default (--workload-to-host drop).
    assert not pings(h1, "appnet", h1.address)


def test_nat_off_is_routed_unmasqueraded(h1, underlay):
    net(h1, "plain", "-o", "nat=false")
    net(h1, "natted")
    assert pings(h1, "natted", underlay.gateway_ip)  # positive control: masqueraded, answered
    assert not pings(h1, "plain", underlay.gateway_ip)  # sent as is: nothing routes the reply back


def test_internal_network_reaches_only_itself(h1, underlay):
    net(h1, "inside", "--internal")
    daemon(h1, "peer", "inside")
    assert pings(h1, "inside", "peer")
    assert not pings(h1, "inside", underlay.gateway_ip)


def test_two_networks_each_work(h1):
    net(h1, "neta")
    net(h1, "netb", "--subnet", "100.65.0.0/24")
    daemon(h1, "a1", "neta")
    daemon(h1, "b1", "netb")
    assert pings(h1, "neta", "a1")
    assert pings(h1, "netb", "b1")
    assert ipaddress.ip_address(ip_of(h1, "b1", "netb")) in ipaddress.ip_network("100.65.0.0/24")


def test_subnet_gateway_range_aux_and_static_ip(h1):
    net(h1, "fixed", "--subnet", "100.66.0.0/24", "--gateway", "100.66.0.1",
        "--ip-range", "100.66.0.128/25", "--aux-address", "printer=100.66.0.5")
    ipam = h1.docker_json("network", "inspect", "fixed")[0]["IPAM"]["Config"][0]
    assert ipam["Gateway"] == "100.66.0.1"
    daemon(h1, "static", "fixed", "--ip", "100.66.0.7")
    daemon(h1, "dynamic", "fixed")
    assert ip_of(h1, "static", "fixed") == "100.66.0.7"
    assert ipaddress.ip_address(ip_of(h1, "dynamic", "fixed")) in ipaddress.ip_network("100.66.0.128/25")
    assert pings(h1, "fixed", "static")
    taken = h1.docker("run", "--rm", "--network", "fixed", "--ip", "100.66.0.7", IMAGE, "true", check=False)
    assert taken.returncode != 0 and "100.66.0.7 is already in use" in taken.stderr
    aux = h1.docker("run", "--rm", "--network", "fixed", "--ip", "100.66.0.5", IMAGE, "true", check=False)
    assert aux.returncode != 0 and "100.66.0.5 is already in use" in aux.stderr
    outside = h1.docker("run", "--rm", "--network", "fixed", "--ip", "100.67.0.5", IMAGE, "true", check=False)
    assert outside.returncode != 0


def test_bad_requests_reach_the_user_clearly(h1):
    cases = [
        (["-o", "bogus=1"], "unknown option 'bogus' for a canal network"),
        (["--ipv6", "--subnet", "fd00:1::/127"], "IPv6 subnet fd00:1::/127 is too small"),
    ]
    for opts, message in cases:
        proc = h1.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", *opts, "bad", check=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    net(h1, "first", "--subnet", "100.68.0.0/24")
    proc = h1.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "--subnet", "100.68.0.0/16", "bad", check=False)
    assert proc.returncode != 0 and "overlaps subnet 100.68.0.0/24" in proc.stderr


def test_network_with_dockers_default_ipam_just_works_on_one_host(h1, underlay):
    """`docker network create -d canal NAME`, no --ipam-driver: Docker's IPAM hands out the
    addresses (one host: no one else can), canal routes them as /32s like its own."""
    h1.docker("network", "create", "-d", "canal", "plain")
    ipam = h1.docker_json("network", "inspect", "plain")[0]["IPAM"]
    assert ipam["Driver"] == "default"
    daemon(h1, "p1", "plain")
    ip = ip_of(h1, "p1", "plain")
    subnet = ipam["Config"][0]["Subnet"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(subnet)
    assert f"{ip} dev cnl" in h1.ip("route", "show", "proto", "101").stdout  # a routed /32
    out = sh(h1, "plain", f"ping -c1 -W2 p1 && ping -c1 -W2 {underlay.gateway_ip} && ip route").stdout
    assert "default via 169.254.1.1 dev eth0" in out


def test_container_restart_keeps_connectivity(h1):
    net(h1, "appnet")
    daemon(h1, "web1", "appnet")
    h1.docker("restart", "-t", "0", "web1")
    assert pings(h1, "appnet", "web1")
    assert len(canal_leftovers(h1)["veths"]) == 1


def test_mtu_default_and_option(h1):
    net(h1, "appnet")
    net(h1, "small", "-o", "mtu=1400")
    assert sh(h1, "appnet", "cat /sys/class/net/eth0/mtu").stdout.strip() == "1450"  # 1500 - 50
    assert sh(h1, "small", "cat /sys/class/net/eth0/mtu").stdout.strip() == "1400"
    daemon(h1, "big", "appnet")
    # A full-size packet (1450 - 28 bytes of IP+ICMP headers) crosses in one piece.
    assert sh(h1, "appnet", "ping -c1 -W2 -s 1422 big").returncode == 0


def test_concurrent_starts_get_distinct_addresses(h1):
    net(h1, "appnet")
    names = [f"par{i}" for i in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(lambda n: daemon(h1, n, "appnet"), names))
    ips = {ip_of(h1, n, "appnet") for n in names}
    assert len(ips) == 20
    routes = {line.split()[0] for line in h1.ip("route", "show", "proto", "101").stdout.splitlines() if line.strip()}
    assert ips <= routes  # exact destinations: 10.0.0.1 must not be found in 10.0.0.12
    script = " && ".join(f"ping -c1 -W2 {ip} >/dev/null" for ip in sorted(ips))
    assert sh(h1, "appnet", script).returncode == 0


def test_plugin_killed_and_restarted_loses_nothing(h1):
    net(h1, "appnet")
    daemon(h1, "web1", "appnet")
    daemon(h1, "web2", "appnet")
    before = {ip_of(h1, "web1", "appnet"), ip_of(h1, "web2", "appnet")}
    h1.stop_plugin(signal.SIGKILL)
    # The dataplane lives in the kernel: running containers keep talking without the plugin.
    assert h1.container_exec("web1", "ping", "-c1", "-W2", "web2").returncode == 0
    h1.start_plugin(PLUGIN_ARGS)
    daemon(h1, "web3", "appnet")
    assert ip_of(h1, "web3", "appnet") not in before
    assert h1.container_exec("web3", "ping", "-c1", "-W2", "web1").returncode == 0
    h1.stop_plugin(signal.SIGTERM)
    h1.start_plugin(PLUGIN_ARGS)
    assert h1.container_exec("web1", "ping", "-c1", "-W2", "web3").returncode == 0


def test_dockerd_restart_with_running_containers(h1):
    net(h1, "appnet")
    # Their PID 1 (sleep) ignores SIGTERM: dockerd's shutdown always ends in SIGKILL, and
    # --stop-timeout 0 sends it at once rather than after the default 10 s.
    daemon(h1, "always", "appnet", "--restart", "always", "--stop-timeout", "0")
    daemon(h1, "web2", "appnet", "--stop-timeout", "0")
    h1.restart_dockerd()
    wait_until(lambda: h1.docker_json("inspect", "always")[0]["State"]["Running"], timeout=30)
    h1.docker("start", "web2")
    assert h1.container_exec("web2", "ping", "-c1", "-W2", "always").returncode == 0
    daemon(h1, "web3", "appnet")
    assert h1.container_exec("web3", "ping", "-c1", "-W2", "web2").returncode == 0


def test_resync_repairs_deleted_rules_and_routes(h1):
    net(h1, "appnet")
    daemon(h1, "web1", "appnet")
    daemon(h1, "web2", "appnet")
    ip2 = ip_of(h1, "web2", "appnet")
    h1.exec(["iptables-nft", "-D", "FORWARD", "-j", "CANAL-FORWARD"])
    h1.ip("route", "del", f"{ip2}/32")
    # Repaired by the periodic full pass (which reads the kernel back), within the interval.
    wait_until(lambda: h1.container_exec("web1", "ping", "-c1", "-W1", ip2, check=False).returncode == 0, timeout=15)
    assert "-A FORWARD -j CANAL-FORWARD" in h1.exec(["iptables-nft-save", "-t", "filter"]).stdout


def test_network_rm_leaves_nothing(h1):
    net(h1, "appnet")
    net(h1, "fixed", "--subnet", "100.69.0.0/24")
    for i, network in enumerate(["appnet", "fixed", "appnet"]):
        daemon(h1, f"c{i}", network)
    assert canal_leftovers(h1)["veths"]
    h1.docker("rm", "-f", "c0", "c1", "c2")
    h1.docker("network", "rm", "appnet", "fixed")
    assert canal_leftovers(h1) == {"veths": [], "routes": [], "iptables": [], "ipsets": []}
    # ... and the datastore holds no address, endpoint, pool or network either.
    status, answer = h1.plugin_post("IpamDriver.RequestPool", {"AddressSpace": "CanalLocal", "Pool": "100.69.0.0/24"})
    assert status == 200 and answer["PoolID"] == "canal-pool:100.69.0.0/24"
    h1.plugin_post("IpamDriver.ReleasePool", {"PoolID": answer["PoolID"]})
