"""IPv6 across hosts over host-gw, vxlan DirectRouting and WireGuard, end to end, on an
underlay with IPv6 (2001:2::/64 beside 198.18.0.0/24 on the test bridge) and dual-stack
flannel leases (EnableIPv6: each host an IPv6 /64 and its PublicIPv6).

- host-gw (h1, h2): each peer's IPv6 subnet, and its /128s outside it, via its PublicIPv6;
  a peer whose PublicIPv6 is off the segment is named, the others keep working.
- vxlan DirectRouting (h3, h4, a cluster of their own): the same direct IPv6 routes.
- The wireguard backend (h5, h6): both families through one device, in the main table.
- An encrypted --ipv6 network on h3/h4: its IPv6 crosses the underlay as WireGuard UDP only
  (a marker never seen; the plain --ipv6 network's marker is: the positive control), and
  with a peer's key gone its IPv6 gets nothing, while without the fail-closed rules the same
  packets would leave in the clear.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import socket

import pytest
from e2e_support import CLUSTER, IMAGE, add_ipv6_underlay, clear, etcd_plugin_args, ip_of, wait_open
from test_encryption import capture, frames, listener, received, udp_ports
from test_multihost import daemon, ping

from testbed import Etcd, SimHost, TestbedError, Underlay, wait_until

V6_NET, V6_NET_DR = "fd00:6a::/48", "fd00:6b::/48"
DR_CLUSTER = "100.66.0.0/16"
DR = ("--etcd-prefix", "/canal/dr", "--flannel-prefix", "/dr/network", "--network", DR_CLUSTER)
WG_CLUSTER, V6_NET_WG = "100.67.0.0/16", "fd00:6c::/48"
WG = ("--etcd-prefix", "/canal/wgv6", "--flannel-prefix", "/wgv6/network", "--network", WG_CLUSTER)
OFF_LINK_KEY = "/coreos.com/network/subnets/100.64.201.0-24&fd00:6a:0:c9::-64"


def underlay6(i: int) -> str:
    return f"2001:2::{i}"


def args(h: SimHost, etcd: Etcd) -> list[str]:
    extra = {"h3": DR, "h4": DR, "h5": WG, "h6": WG}.get(h.name, ())
    return etcd_plugin_args(h, etcd, *extra)


@pytest.fixture(scope="module")
def bed():
    ul = Underlay()
    try:
        etcd = Etcd(ul)
        etcd.etcdctl("put", "/coreos.com/network/config", json.dumps(
            {"Network": CLUSTER, "EnableIPv6": True, "IPv6Network": V6_NET, "Backend": {"Type": "host-gw"}}))
        etcd.etcdctl("put", "/dr/network/config", json.dumps(
            {"Network": DR_CLUSTER, "EnableIPv6": True, "IPv6Network": V6_NET_DR,
             "Backend": {"Type": "vxlan", "DirectRouting": True}}))
        etcd.etcdctl("put", "/wgv6/network/config", json.dumps(
            {"Network": WG_CLUSTER, "EnableIPv6": True, "IPv6Network": V6_NET_WG, "Backend": {"Type": "wireguard"}}))
        hosts = []
        for i in (1, 2, 3, 4, 5, 6):
            h = SimHost(ul, f"h{i}", f"198.18.0.{i}")
            # The IPv6 underlay: before the plugin starts (it publishes the address as PublicIPv6).
            assert add_ipv6_underlay(h) == underlay6(i)
            h.start_dockerd()
            h.load_image()
            h.start_plugin(args(h, etcd))
            hosts.append(h)
        f7 = SimHost(ul, "f7", "198.18.0.7")  # a flanneld dual-stack wireguard host, built by hand
        add_ipv6_underlay(f7)
        hosts.append(f7)
        # Six plugins just started list, lease and program at once: the first test begins once
        # every one is healthy, not while etcd is still catching up with them (a CreateNetwork
        # then met the 2 s --etcd-timeout on a loaded 2-core machine).
        wait_until(lambda: all(status(h).get("health") == "healthy" for h in hosts[:6]), timeout=60,
                   what="every plugin healthy")
        yield ul, etcd, hosts
    finally:
        ul.close()


@pytest.fixture
def b(bed):
    ul, etcd, hosts = bed
    yield ul, etcd, hosts
    etcd.etcdctl("del", OFF_LINK_KEY)
    for h in hosts[:6]:
        if not h.plugin_running():
            h.start_plugin(args(h, etcd))
        clear(h)


def status(h: SimHost) -> dict:
    return json.loads(h.exec([h.plugin_argv()[0], "-m", "canal", "status", "-o", "json"], check=False).stdout)


def net6(h: SimHost, name: str, *opts: str) -> None:
    h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "--ipv6", *opts, name)


def server(h: SimHost, name: str, network: str, *opts: str) -> None:
    h.docker("run", "-d", "--name", name, "--network", network, *opts, IMAGE, "sh", "-c",
             f"while true; do echo pong-{name} | nc -l -p 80; done & sleep 100000")
    wait_open(h, name)


def ip6_of(h: SimHost, container: str, network: str) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(
        h.docker_json("inspect", container)[0]["NetworkSettings"]["Networks"][network]["GlobalIPv6Address"])


def answered(h: SimHost, client: str, address: ipaddress.IPv6Address, name: str) -> bool:
    out = h.docker("exec", client, "sh", "-c", f"nc -w 2 {address} 80 </dev/null", check=False).stdout
    return out.strip() == f"pong-{name}"


def route6(h: SimHost, address: ipaddress.IPv6Address) -> list[str]:
    """`ip -6 route get`'s words (the route the kernel takes to `address`)."""
    return h.ip("-6", "route", "get", str(address)).stdout.split()


def via(words: list[str]) -> tuple[str, str]:
    return words[words.index("via") + 1] if "via" in words else "", words[words.index("dev") + 1]


def lease6(etcd: Etcd, prefix: str, h: SimHost) -> tuple[str, dict]:
    out = etcd.etcdctl("get", "--prefix", f"{prefix}/subnets/").stdout.splitlines()
    for key, value in zip(out[::2], out[1::2]):
        parsed = json.loads(value)
        if parsed.get("PublicIP") == h.address:
            return key, parsed
    raise AssertionError(f"no lease of {h.address}")


def test_host_gw_routes_ipv6_via_the_peers_public_ipv6(b):
    _ul, etcd, (h1, h2, _h3, _h4, _h5, _h6, _f7) = b
    key, value = lease6(etcd, "/coreos.com/network", h1)
    assert "&" in key and value["PublicIPv6"] == underlay6(1) and value["BackendType"] == "host-gw"
    for h in (h1, h2):
        net6(h, "dual")
    server(h1, "web", "dual")
    daemon(h2, "client", "dual")
    web6 = ip6_of(h1, "web", "dual")
    subnet6 = ipaddress.IPv6Network(key.split("&", 1)[1].replace("-", "/"))
    assert web6 in subnet6  # drawn from h1's leased IPv6 subnet: no /128 record needed
    wait_until(lambda: answered(h2, "client", web6, "web"), timeout=30, what="TCP over IPv6 h2 -> h1")
    assert h2.container_exec("client", "ping", "-6", "-c1", "-W2", str(web6), check=False).returncode == 0
    # flannel's host-gw in dual stack: h1's IPv6 subnet via its PublicIPv6 on the underlay.
    assert via(route6(h2, web6)) == (underlay6(1), "eth0")
    shown = h2.ip("-6", "route", "show", str(subnet6)).stdout.split()
    assert shown[:6] == [str(subnet6), "via", underlay6(1), "dev", "eth0", "proto"] and shown[6] in ("103", "canal")
    assert h2.ip("link", "show", "flannel-v6.1", check=False).returncode != 0  # no VXLAN in either family
    # The MTU: host-gw has no encapsulation, in either family.
    assert h2.container_exec("client", "cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1500"


def test_host_gw_routes_a_peers_128_outside_its_subnet6(b):
    """A --subnet pool (cluster-wide): each endpoint's /128 is a route record, routed via its
    host's PublicIPv6."""
    _ul, _etcd, (h1, h2, _h3, _h4, _h5, _h6, _f7) = b
    for h in (h1, h2):
        net6(h, "wide", "--subnet", "fd00:6568::/64")
    server(h1, "db", "wide")
    daemon(h2, "client", "wide")
    db6 = ip6_of(h1, "db", "wide")
    wait_until(lambda: answered(h2, "client", db6, "db"), timeout=30, what="TCP over IPv6 to a /128")
    assert h2.ip("-6", "route", "show", str(db6)).stdout.split()[:5] == [str(db6), "via", underlay6(1), "dev", "eth0"]


def test_host_gw_names_a_peer_whose_public_ipv6_is_off_the_segment(b):
    _ul, etcd, (h1, h2, _h3, _h4, _h5, _h6, _f7) = b
    etcd.etcdctl("put", OFF_LINK_KEY, json.dumps(
        {"PublicIP": "198.18.0.9", "PublicIPv6": "2001:2:0:9::9", "BackendType": "host-gw"}))

    def named() -> bool:
        return any("2001:2:0:9::9" in p and "not on the same L2 segment" in p
                   for p in status(h1)["backend"]["problems"])

    wait_until(named, timeout=20)
    assert h1.ip("-6", "route", "show", "fd00:6a:0:c9::/64").stdout.strip() == ""
    assert "via 198.18.0.9" in h1.ip("route", "show", "100.64.201.0/24").stdout  # its IPv4 is still routed
    for h in (h1, h2):
        net6(h, "dual")
    server(h1, "web", "dual")
    daemon(h2, "client", "dual")
    wait_until(lambda: answered(h2, "client", ip6_of(h1, "web", "dual"), "web"), timeout=30)


def test_direct_routing_routes_ipv6_via_the_peers_public_ipv6(b):
    _ul, etcd, (_h1, _h2, h3, h4, _h5, _h6, _f7) = b
    _key, value = lease6(etcd, "/dr/network", h3)
    assert value["PublicIPv6"] == underlay6(3) and value["BackendType"] == "vxlan"
    for h in (h3, h4):
        net6(h, "dual")
    server(h3, "web", "dual")
    daemon(h4, "client", "dual")
    web6 = ip6_of(h3, "web", "dual")
    wait_until(lambda: answered(h4, "client", web6, "web"), timeout=30, what="TCP over IPv6 h4 -> h3 (DR)")
    assert h4.container_exec("client", "ping", "-6", "-c1", "-W2", str(web6), check=False).returncode == 0
    assert via(route6(h4, web6)) == (underlay6(3), "eth0")  # not flannel.1 nor flannel-v6.1
    assert status(h4)["backend"]["problems"] == []
    # The v6 tunnels leave the directly routed peer alone (no second route to fight over).
    key, _value = lease6(etcd, "/dr/network", h3)
    subnet6 = key.split("&", 1)[1].replace("-", "/")
    for device in ("flannel-v6.1", "flannel.1"):
        shown = h4.ip("-6", "route", "show", "dev", device, check=False).stdout.split()
        assert subnet6 not in shown and str(web6) not in shown, (device, shown)


def v6_in_clear(frame: bytes, address: ipaddress.IPv6Address) -> bool:
    """An IPv6 packet to or from `address` readable on the wire (directly, or inside VXLAN)."""
    return address.packed in frame


def deliver6(h: SimHost, client: str, address: ipaddress.IPv6Address, server_host: SimHost, srv: str,
             marker: str) -> None:
    def done() -> bool:
        if not received(server_host, srv, marker):
            h.container_exec(client, "sh", "-c", f"echo {marker} | nc -w 2 {address} 5000", check=False, timeout=20)
        return received(server_host, srv, marker)

    try:
        wait_until(done, timeout=30, interval=0.5, what=f"{marker} received by {srv}")
    except TestbedError:
        raise AssertionError(f"{marker} not received: {server_host.docker('logs', srv).stdout!r}") from None


@pytest.fixture
def secret(b):
    ul, etcd, (_h1, _h2, h3, h4, _h5, _h6, _f7) = b
    for h in (h3, h4):
        net6(h, "secret", "-o", "encrypted=true")
        net6(h, "plain")
    listener(h3, "srv-secret", "secret")
    listener(h3, "srv-plain", "plain")
    daemon(h4, "cli-secret", "secret")
    daemon(h4, "cli-plain", "plain")
    yield ul, etcd, h3, h4, ip6_of(h3, "srv-secret", "secret"), ip6_of(h3, "srv-plain", "plain")


def test_encrypted_ipv6_network_crosses_hosts_as_wireguard_only(secret):
    ul, etcd, h3, h4, secret6, plain6 = secret
    wait_until(lambda: ping(h4, "cli-secret", str(secret6), "-6"), timeout=30, what="ping6 over WireGuard")
    marker_secret, marker_plain = f"canal-secret6-{secrets.token_hex(8)}", f"canal-plain6-{secrets.token_hex(8)}"
    with capture(ul) as pcap:
        deliver6(h4, "cli-secret", secret6, h3, "srv-secret", marker_secret)
        deliver6(h4, "cli-plain", plain6, h3, "srv-plain", marker_plain)
    seen = frames(pcap)
    # Positive control: the plain --ipv6 network's marker and packets are on the wire...
    assert any(marker_plain.encode() in f for f in seen) and any(v6_in_clear(f, plain6) for f in seen)
    # ...the encrypted one's never, and WireGuard (UDP 51820 between the IPv4 endpoints) carried it.
    assert not any(marker_secret.encode() in f or v6_in_clear(f, secret6) for f in seen)
    assert any(udp_ports(f) == (51820, 51820) for f in seen)
    # The peer's AllowedIPs hold both families; its IPv6 subnet is routed through the device
    # in the marked table; the device has the lease's first IPv6 address.
    _key, value = lease6(etcd, "/dr/network", h3)
    assert value["BackendV6Data"]["PublicKey"] == value["BackendData"]["PublicKey"]  # one key (Mode auto)
    allowed = status(h4)["backend"]["encryption"]["peers"][0]["allowed_ips"].split(",")
    assert {ipaddress.ip_network(a).version for a in allowed} == {4, 6}
    assert any(secret6 in ipaddress.ip_network(a) for a in allowed if ":" in a)
    assert "dev flannel-wg" in h4.ip("-6", "route", "show", "table", "25900").stdout
    assert "lookup 25900" in h4.ip("-6", "rule").stdout
    # MTU: WireGuard's overhead, for both families (one eth0).
    assert h4.container_exec("cli-secret", "cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1420"


def test_keyless_peer_gets_no_ipv6_either_never_plaintext(secret):
    ul, etcd, h3, h4, secret6, plain6 = secret
    wait_until(lambda: ping(h4, "cli-secret", str(secret6), "-6"), timeout=30)
    # h3's plugin stops and its lease loses its key in both families (held by the test).
    h3.stop_plugin()
    key, value = lease6(etcd, "/dr/network", h3)
    for data in ("BackendData", "BackendV6Data"):
        value[data].pop("PublicKey", None)
        value[data].pop("Port", None)
    held = etcd.etcdctl("lease", "grant", "300").stdout.split()[1]
    etcd.etcdctl("put", f"--lease={held}", key, json.dumps(value))
    wait_until(lambda: "has published no WireGuard key" in " ".join(status(h4)["backend"]["problems"]), timeout=20)
    marker = f"canal-nokey6-{secrets.token_hex(8)}"
    with capture(ul) as pcap:
        run = h4.container_exec("cli-secret", "sh", "-c", f"echo {marker} | nc -w 2 {secret6} 5000", check=False,
                                timeout=20)
        assert run.returncode != 0
        assert ping(h4, "cli-plain", str(plain6), "-6")  # the plain --ipv6 network is unaffected
    seen = frames(pcap)
    assert any(v6_in_clear(f, plain6) for f in seen)  # the capture does see IPv6
    assert not any(marker.encode() in f or v6_in_clear(f, secret6) for f in seen)
    assert not received(h3, "srv-secret", marker)
    # Positive control: without ip6tables' fail-closed chain, the same attempt leaves in the clear.
    h4.stop_plugin()
    h4.exec(["ip6tables", "-F", "CANAL-ENCRYPT-OUT"])
    with capture(ul) as pcap:
        h4.container_exec("cli-secret", "sh", "-c", f"echo {marker} | nc -w 2 {secret6} 5000", check=False, timeout=20)
    assert any(v6_in_clear(f, secret6) for f in frames(pcap))
    h4.start_plugin(args(h4, etcd))
    h3.start_plugin(args(h3, etcd))
    wait_until(lambda: "PublicKey" in lease6(etcd, "/dr/network", h3)[1]["BackendV6Data"], timeout=20)
    wait_until(lambda: ping(h4, "cli-secret", str(secret6), "-6"), timeout=30)


def test_frames_helper_parses_ipv6_addresses_exactly():
    a = ipaddress.IPv6Address("fd00:6b:0:1::2")
    assert v6_in_clear(b"\x00" * 22 + socket.inet_pton(socket.AF_INET6, "fd00:6b:0:1::2"), a)
    assert not v6_in_clear(b"\x00" * 22 + socket.inet_pton(socket.AF_INET6, "fd00:6b:0:1::20"), a)


def test_wireguard_backend_carries_ipv6_in_the_same_tunnel(b):
    ul, etcd, (_h1, _h2, _h3, _h4, h5, h6, _f7) = b
    _key, value = lease6(etcd, "/wgv6/network", h5)
    assert value["BackendType"] == "wireguard" and value["PublicIPv6"] == underlay6(5)
    assert value["BackendV6Data"] == value["BackendData"]  # one key, one port: flannel's Mode "auto"
    for h in (h5, h6):
        net6(h, "wgdual")
    listener(h5, "srv", "wgdual")
    daemon(h6, "cli", "wgdual")
    srv6 = ip6_of(h5, "srv", "wgdual")
    wait_until(lambda: ping(h6, "cli", str(srv6), "-6"), timeout=30, what="ping6 over the wireguard backend")
    marker = f"canal-wgv6-{secrets.token_hex(8)}"
    with capture(ul) as pcap:
        deliver6(h6, "cli", srv6, h5, "srv", marker)
    seen = frames(pcap)
    assert not any(marker.encode() in f or v6_in_clear(f, srv6) for f in seen)
    assert any(udp_ports(f) == (51820, 51820) for f in seen)
    assert via(route6(h6, srv6)) == ("", "flannel-wg")  # the main table, as flannel
    assert h6.container_exec("cli", "cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1420"


def udp6_ports(frame: bytes) -> tuple[int, int] | None:
    """(sport, dport) of an IPv6/UDP Ethernet frame (no extension headers), else None."""
    if len(frame) < 62 or frame[12:14] != b"\x86\xdd" or frame[20] != 17:
        return None
    return int.from_bytes(frame[54:56], "big"), int.from_bytes(frame[56:58], "big")


def _mode_ipv6(etcd) -> dict:
    """Put the wireguard cluster on flannel's Mode "ipv6"; returns the config to restore."""
    config = {"Network": WG_CLUSTER, "EnableIPv6": True, "IPv6Network": V6_NET_WG, "Backend": {"Type": "wireguard"}}
    etcd.etcdctl("put", "/wgv6/network/config", json.dumps({**config, "Backend": {"Type": "wireguard", "Mode": "ipv6"}}))
    return config


def _mode_ipv6_pair(h5, h6) -> tuple[str, str]:
    """A server on h5 and a client on h6 on a dual-stack network, once h6 tunnels to h5's
    IPv6 underlay address; the server's (IPv4, IPv6) addresses."""
    for h in (h5, h6):
        net6(h, "wgdual")
    listener(h5, "srv", "wgdual")
    daemon(h6, "cli", "wgdual")
    wait_until(lambda: [p["endpoint"] for p in status(h6)["backend"]["encryption"]["peers"]]
               == [f"[{underlay6(5)}]:51820"], timeout=30, what="h6's peer endpoint on IPv6")
    return ip_of(h5, "srv", "wgdual"), ip6_of(h5, "srv", "wgdual")


def test_wireguard_mode_ipv6_tunnels_over_the_ipv6_underlay(b):
    """flannel's Mode "ipv6": the peers' PublicIPv6 as endpoints, the outer packets IPv6."""
    ul, etcd, (_h1, _h2, _h3, _h4, h5, h6, _f7) = b
    config = _mode_ipv6(etcd)
    try:
        srv4, srv6 = _mode_ipv6_pair(h5, h6)
        wait_until(lambda: ping(h6, "cli", str(srv6), "-6") and ping(h6, "cli", srv4), timeout=30)
        marker = f"canal-wgmode6-{secrets.token_hex(8)}"
        with capture(ul) as pcap:
            deliver6(h6, "cli", srv6, h5, "srv", marker)
        seen = frames(pcap)
        assert not any(marker.encode() in f or v6_in_clear(f, srv6) for f in seen)
        assert any(udp6_ports(f) == (51820, 51820) for f in seen)  # WireGuard over the IPv6 underlay
        assert not any(udp_ports(f) == (51820, 51820) for f in seen)
        assert h6.container_exec("cli", "cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1420"  # 80: IPv6 outer
    finally:
        etcd.etcdctl("put", "/wgv6/network/config", json.dumps(config))


def test_an_ipv6_only_underlay_carries_both_families_over_wireguard_mode_ipv6(b):
    """Between hosts the underlay passes IPv6 only (the bridge drops IPv4 and ARP frames
    between its ports; etcd, on the bridge itself, stays reachable): with the wireguard
    backend in Mode "ipv6" containers still reach each other over IPv4 and IPv6."""
    ul, etcd, (_h1, _h2, _h3, _h4, h5, h6, _f7) = b
    config = _mode_ipv6(etcd)
    blocked = False
    try:
        srv4, srv6 = _mode_ipv6_pair(h5, h6)
        # Positive control first: the hosts reach each other over IPv4, then no longer.
        assert h6.exec(["ping", "-c1", "-W2", h5.address], check=False).returncode == 0
        for proto in ("IPv4", "ARP"):
            ul.exec(["ebtables", "-A", "FORWARD", "-p", proto, "-j", "DROP"])
        blocked = True
        h6.exec(["ip", "neigh", "flush", "dev", "eth0"], check=False)
        assert h6.exec(["ping", "-c1", "-W2", h5.address], check=False).returncode != 0
        assert h6.exec(["ping", "-6", "-c1", "-W2", underlay6(5)], check=False).returncode == 0
        wait_until(lambda: ping(h6, "cli", srv4) and ping(h6, "cli", str(srv6), "-6"), timeout=30,
                   what="both families across an IPv6-only underlay")
        marker = f"canal-v6only-{secrets.token_hex(8)}"
        with capture(ul) as pcap:
            deliver6(h6, "cli", srv6, h5, "srv", marker)
        seen = frames(pcap)
        assert any(udp6_ports(f) == (51820, 51820) for f in seen)
        assert not any(udp_ports(f) == (51820, 51820) for f in seen)  # no tunnel packet tried IPv4
        assert not any(marker.encode() in f for f in seen)
    finally:
        if blocked:
            for proto in ("IPv4", "ARP"):
                ul.exec(["ebtables", "-D", "FORWARD", "-p", proto, "-j", "DROP"], check=False)
        etcd.etcdctl("put", "/wgv6/network/config", json.dumps(config))


def test_canal_and_a_flanneld_mode_auto_wireguard_host_reach_each_other_over_ipv6(b):
    """f7 as flanneld's wireguard backend builds a dual-stack host in Mode "auto" (one device,
    flannel-wg, one key in BackendData and BackendV6Data, the lease's first addresses of both
    subnets on the device, a route for each whole network through it), with a "pod" address
    of each family in its subnets."""
    ul, etcd, (_h1, _h2, _h3, _h4, h5, _h6, f7) = b
    subnet, subnet6 = "100.67.200.0/24", "fd00:6c:0:c8::/64"
    key = "/wgv6/network/subnets/100.67.200.0-24&fd00:6c:0:c8::-64"
    pod, pod6 = "100.67.200.1", ipaddress.IPv6Address("fd00:6c:0:c8::1")
    try:
        private = f7.exec(["wg", "genkey"]).stdout.strip()
        public = f7.exec(["wg", "pubkey"], input=private + "\n").stdout.strip()
        key_file = f7.workdir / "wgkey"
        key_file.write_text(private + "\n")
        key_file.chmod(0o600)
        f7.exec(["wireguard-go", "flannel-wg"])
        f7.exec(["wg", "set", "flannel-wg", "private-key", str(key_file), "listen-port", "51820"])
        f7.ip("addr", "add", "100.67.200.0/32", "dev", "flannel-wg")
        f7.ip("-6", "addr", "add", "fd00:6c:0:c8::/128", "dev", "flannel-wg", "nodad")
        f7.ip("link", "set", "flannel-wg", "up")
        f7.ip("route", "add", WG_CLUSTER, "dev", "flannel-wg", "scope", "link")
        f7.ip("-6", "route", "add", V6_NET_WG, "dev", "flannel-wg")
        f7.ip("addr", "replace", f"{pod}/32", "dev", "lo")
        f7.ip("-6", "addr", "replace", f"{pod6}/128", "dev", "lo", "nodad")
        etcd.etcdctl("put", key, json.dumps({
            "PublicIP": f7.address, "PublicIPv6": underlay6(7), "BackendType": "wireguard",
            "BackendData": {"PublicKey": public}, "BackendV6Data": {"PublicKey": public}}))
        net6(h5, "wgdual")
        daemon(h5, "web", "wgdual")
        h5_key, h5_lease = lease6(etcd, "/wgv6/network", h5)
        h5_subnet6 = h5_key.split("&", 1)[1].replace("-", "/")
        f7.exec(["wg", "set", "flannel-wg", "peer", h5_lease["BackendV6Data"]["PublicKey"], "endpoint",
                 f"{h5.address}:51820", "allowed-ips", f"{status(h5)['subnet']},{h5_subnet6}"])

        def peered() -> bool:
            peers = status(h5)["backend"]["encryption"]["peers"]
            return any(p["public_key"] == public and {subnet, subnet6} <= set(p["allowed_ips"].split(","))
                       for p in peers)

        wait_until(peered, timeout=20, what="h5 peers with f7 for both families")
        assert via(route6(h5, pod6)) == ("", "flannel-wg")
        with capture(ul) as pcap:
            assert ping(h5, "web", str(pod6), "-6")  # there over Canal's device, back over flanneld's
            assert ping(h5, "web", pod)
        seen = frames(pcap)
        assert not any(v6_in_clear(f, pod6) for f in seen)
        assert any(udp_ports(f) == (51820, 51820) for f in seen)
    finally:
        etcd.etcdctl("del", key)
        f7.ip("link", "del", "flannel-wg", check=False)
        clear(h5)
