"""WireGuard between hosts, end to end: an encrypted network (`-o encrypted`) beside a plain one
on a vxlan cluster, and a cluster whose flannel config says wireguard. What crosses the
underlay is captured on the test bridge: a marker sent over an encrypted network never
appears there in plaintext, while the same marker over a plain network does (the positive
control). A peer without a key gets nothing; with the fail-closed rules taken away, the same
packet would leave in the clear. A key rotation under a running iperf3 keeps the connection.
The test kernel has no WireGuard module: this exercises wireguard-go (the kernel path is the
same UAPI and is taken where `ip link add type wireguard` works)."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
import stat
import struct
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from e2e_support import clear, etcd_plugin_args, ip_of
from test_multihost import daemon, net, ping

from testbed import Etcd, SimHost, TestbedError, Underlay, wait_until

WG_PREFIX = ("--etcd-prefix", "/canal/wg", "--flannel-prefix", "/wg/network")
WG_CLUSTER = "100.66.0.0/16"


def canal_cli(h: SimHost, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return h.exec([h.plugin_argv()[0], "-m", "canal", *args], check=check)


def status(h: SimHost) -> dict:
    return json.loads(canal_cli(h, "status", "-o", "json", check=False).stdout)


def lease(etcd: Etcd, h: SimHost, prefix: str = "/coreos.com/network") -> dict:
    out = etcd.etcdctl("get", "--prefix", f"{prefix}/subnets/", "--print-value-only").stdout
    for line in out.splitlines():
        if line.strip().startswith("{"):
            value = json.loads(line)
            if value.get("PublicIP") == h.address:
                return value
    raise AssertionError(f"no lease of {h.address} under {prefix}")


@contextmanager
def capture(ul: Underlay) -> Iterator[Path]:
    """Every frame on the underlay bridge while the block runs (tcpdump in the underlay's netns)."""
    path = ul.run_dir / f"underlay-{secrets.token_hex(4)}.pcap"
    proc = subprocess.Popen(["ip", "netns", "exec", ul.netns, "tcpdump", "-i", ul.BRIDGE, "--immediate-mode", "-U", "-s", "0",
                             "-Z", "root", "-w", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: path.exists() and path.stat().st_size >= 24, timeout=10)
        yield path
    finally:
        time.sleep(1)  # the last frames written (immediate mode, -U: one write per packet)
        proc.terminate()
        proc.wait(timeout=10)


def frames(path: Path) -> list[bytes]:
    data = path.read_bytes()
    out, pos = [], 24
    while pos + 16 <= len(data):
        incl = struct.unpack_from("<I", data, pos + 8)[0]
        out.append(data[pos + 16:pos + 16 + incl])
        pos += 16 + incl
    return out


def udp_ports(frame: bytes) -> tuple[int, int] | None:
    """(sport, dport) of an IPv4/UDP Ethernet frame, else None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    ihl = (frame[14] & 0x0F) * 4
    return struct.unpack_from("!HH", frame, 14 + ihl)


def in_clear(frame: bytes, address: str) -> bool:
    """A VXLAN frame (UDP 8472) whose inner packet is to or from `address`: plaintext."""
    ports = udp_ports(frame)
    return ports is not None and 8472 in ports and socket.inet_aton(address) in frame[42:]


def send_marker(h: SimHost, client: str, address: str, marker: str, check: bool = True) -> bool:
    run = h.container_exec(client, "sh", "-c", f"echo {marker} | nc -w 2 {address} 5000", check=False, timeout=20)
    if check:
        assert run.returncode == 0, run
    return run.returncode == 0


def deliver(h: SimHost, client: str, address: str, server_host: SimHost, server: str, marker: str) -> None:
    """Send the marker until the server has logged it: a listener's `nc -l` restarts between
    connections, and a send that lands in that gap is refused (the marker never left)."""
    def done() -> bool:
        if not received(server_host, server, marker):
            send_marker(h, client, address, marker, check=False)
        return received(server_host, server, marker)

    try:
        wait_until(done, timeout=30, interval=0.5, what=f"{marker} received by {server}")
    except TestbedError:
        raise AssertionError(f"{marker} not received by {server}: {server_host.docker('logs', server).stdout!r}") from None


def listener(h: SimHost, name: str, network: str, *opts: str) -> None:
    daemon(h, name, network, *opts, cmd=("sh", "-c", "while true; do nc -l -p 5000; done"))


def received(h: SimHost, name: str, marker: str) -> bool:
    return marker in h.docker("logs", name).stdout


@pytest.fixture(scope="module")
def bed():
    ul = Underlay()
    try:
        etcd = Etcd(ul)
        etcd.etcdctl("put", "/wg/network/config", json.dumps({"Network": WG_CLUSTER, "Backend": {"Type": "wireguard"}}))
        hosts = []
        for i in (1, 2, 3, 4):
            h = SimHost(ul, f"h{i}", f"198.18.0.{i}")
            h.start_dockerd()
            h.load_image()
            extra = WG_PREFIX + ("--network", WG_CLUSTER) if i > 2 else ()
            h.start_plugin(etcd_plugin_args(h, etcd, *extra))
            hosts.append(h)
        hosts.append(SimHost(ul, "f1", "198.18.0.5"))  # a flanneld wireguard host, built by hand
        yield ul, etcd, hosts
    finally:
        ul.close()


@pytest.fixture
def pernet(bed):
    """h1, h2 on the vxlan cluster: `secret` (encrypted) and `plain` networks on both."""
    ul, etcd, (h1, h2, _h3, _h4, _f1) = bed
    for h in (h1, h2):
        net(h, "secret", "-o", "encrypted=true")
        net(h, "plain")
    yield ul, etcd, h1, h2
    for h in (h1, h2):
        if not h.plugin_running():
            h.start_plugin(etcd_plugin_args(h, etcd))
        clear(h)


def test_encrypted_network_crosses_hosts_as_wireguard_only(pernet):
    ul, etcd, h1, h2 = pernet
    listener(h1, "srv-secret", "secret")
    listener(h1, "srv-plain", "plain")
    daemon(h2, "cli-secret", "secret")
    daemon(h2, "cli-plain", "plain")
    secret_ip, plain_ip = ip_of(h1, "srv-secret", "secret"), ip_of(h1, "srv-plain", "plain")
    marker_secret, marker_plain = f"canal-secret-{secrets.token_hex(8)}", f"canal-plain-{secrets.token_hex(8)}"
    wait_until(lambda: ping(h2, "cli-secret", secret_ip), timeout=30)
    with capture(ul) as pcap:
        deliver(h2, "cli-secret", secret_ip, h1, "srv-secret", marker_secret)
        deliver(h2, "cli-plain", plain_ip, h1, "srv-plain", marker_plain)
    seen = frames(pcap)
    # Positive control: the plain network's marker is on the wire (inside VXLAN, UDP 8472)...
    assert any(marker_plain.encode() in f for f in seen)
    # ...the encrypted network's never is, nor any packet of it, and WireGuard (UDP 51820) carried it.
    assert not any(marker_secret.encode() in f or in_clear(f, secret_ip) for f in seen)
    assert any(udp_ports(f) in ((51820, 51820),) for f in seen)
    # Each host publishes a public key in its (vxlan) lease, beside flannel's own fields.
    for h in (h1, h2):
        value = lease(etcd, h)
        assert value["BackendType"] == "vxlan" and set(value["BackendData"]) == {"VNI", "VtepMAC", "PublicKey", "Port"}
    # The MTU leaves room for WireGuard's 80 bytes; the plain network keeps VXLAN's.
    assert h2.container_exec("cli-secret", "cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1420"
    assert h2.container_exec("cli-plain", "cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1450"
    encryption = status(h2)["backend"]["encryption"]
    assert encryption["implementation"] in ("kernel", "wireguard-go")
    assert [p["public_key"] for p in encryption["peers"]] == [lease(etcd, h1)["BackendData"]["PublicKey"]]
    # Felix's WireGuard metrics, per peer.
    metrics = canal_cli(h2, "metrics").stdout
    assert "canal_wireguard_peers 1.0" in metrics
    handshake = next(line for line in metrics.splitlines() if line.startswith("canal_wireguard_latest_handshake_seconds{"))
    assert f'peer_endpoint="{h1.address}:51820"' in handshake and float(handshake.split()[-1]) > 0


def test_private_key_stays_on_the_host(pernet):
    ul, etcd, h1, h2 = pernet
    daemon(h1, "keyholder", "secret")
    wait_until(lambda: "PublicKey" in lease(etcd, h1).get("BackendData", {}), timeout=20)
    path = h1.workdir / "canal" / "wireguard" / "private.key"
    private = path.read_text().strip()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    dump = etcd.etcdctl("get", "--prefix", "").stdout
    assert lease(etcd, h1)["BackendData"]["PublicKey"] in dump  # positive control: the dump is whole
    assert private not in dump
    assert private not in h1.plugin_log.read_text()
    diag = canal_cli(h1, "status", "-o", "json").stdout
    assert private not in diag


def test_peer_without_a_key_gets_nothing_never_plaintext(pernet):
    ul, etcd, h1, h2 = pernet
    listener(h1, "srv-secret", "secret")
    daemon(h2, "cli-secret", "secret")
    daemon(h2, "cli-plain", "plain")
    listener(h1, "srv-plain", "plain")
    secret_ip, plain_ip = ip_of(h1, "srv-secret", "secret"), ip_of(h1, "srv-plain", "plain")
    wait_until(lambda: ping(h2, "cli-secret", secret_ip), timeout=30)
    # h1's plugin stops (its containers and device stay) and its lease loses its key. The lease
    # is held by the test meanwhile (h1's own etcd lease expires without renewals, and with it
    # h1 as a peer); h1's plugin takes it over again when it restarts.
    h1.stop_plugin()
    key = etcd.etcdctl("get", "--prefix", "/coreos.com/network/subnets/", "--keys-only").stdout.split()
    h1_key = next(k for k in key if json.loads(etcd.etcdctl("get", k, "--print-value-only").stdout)["PublicIP"] == h1.address)
    value = lease(etcd, h1)
    del value["BackendData"]["PublicKey"], value["BackendData"]["Port"]
    held = etcd.etcdctl("lease", "grant", "300").stdout.split()[1]  # "lease <hex id> granted with TTL(300s)"
    etcd.etcdctl("put", f"--lease={held}", h1_key, json.dumps(value))
    wait_until(lambda: "has published no WireGuard key" in " ".join(status(h2)["backend"]["problems"]), timeout=20)
    marker = f"canal-nokey-{secrets.token_hex(8)}"
    with capture(ul) as pcap:
        assert not send_marker(h2, "cli-secret", secret_ip, marker, check=False)
        assert ping(h2, "cli-plain", plain_ip)  # the plain network is unaffected
    seen = frames(pcap)
    assert any(in_clear(f, plain_ip) for f in seen)  # the capture does see VXLAN
    assert not any(marker.encode() in f or in_clear(f, secret_ip) for f in seen)
    assert not received(h1, "srv-secret", marker)
    # Positive control: without the fail-closed rules, the same connection attempt leaves in
    # plaintext (its SYNs inside VXLAN; h1 drops them, so the marker itself never follows).
    # h2's plugin stopped first, so that no read-back pass puts the chain back meanwhile.
    h2.stop_plugin()
    h2.exec(["iptables", "-F", "CANAL-ENCRYPT-OUT"])
    with capture(ul) as pcap:
        send_marker(h2, "cli-secret", secret_ip, marker, check=False)
    assert any(in_clear(f, secret_ip) for f in frames(pcap))
    # Both plugins back: h2 repairs its chain, h1 republishes its key, and the network works
    # again, encrypted.
    h2.start_plugin(etcd_plugin_args(h2, etcd))
    h1.start_plugin(etcd_plugin_args(h1, etcd))
    wait_until(lambda: "PublicKey" in lease(etcd, h1)["BackendData"], timeout=20)
    wait_until(lambda: ping(h2, "cli-secret", secret_ip), timeout=30)


def test_key_rotation_keeps_a_running_tcp_flow(pernet):
    ul, etcd, h1, h2 = pernet
    daemon(h1, "srv", "secret")
    daemon(h2, "cli", "secret")
    server = ip_of(h1, "srv", "secret")
    wait_until(lambda: ping(h2, "cli", server), timeout=30)
    h1.exec(["nsenter", f"--net=/proc/{h1.container_pid('srv')}/ns/net", "iperf3", "-s", "-1", "-D"])
    before = lease(etcd, h1)["BackendData"]["PublicKey"]
    result: dict = {}

    def client() -> None:
        result["run"] = h2.exec(["nsenter", f"--net=/proc/{h2.container_pid('cli')}/ns/net", "iperf3", "-c", server,
                                 "-t", "12", "-J"], check=False, timeout=60)

    thread = threading.Thread(target=client)
    thread.start()
    time.sleep(4)
    rotated = json.loads(canal_cli(h1, "encryption", "rotate", "-o", "json").stdout)
    thread.join(70)
    run = result["run"]
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert rotated["public_key"] != before
    assert lease(etcd, h1)["BackendData"]["PublicKey"] == rotated["public_key"]
    # The flow carried data after the rotation too (its last intervals), on the same connection.
    late = [i["sum"]["bytes"] for i in report["intervals"][-4:]]
    assert all(b > 0 for b in late), late
    # And both ends use the new key (h2 learned it from the lease).
    wait_until(lambda: [p["public_key"] for p in status(h2)["backend"]["encryption"]["peers"]] == [rotated["public_key"]],
               timeout=20)


def test_wireguard_cluster_backend_as_flannel_writes_it(bed):
    ul, etcd, (_h1, _h2, h3, h4, _f1) = bed
    try:
        for h in (h3, h4):
            net(h, "wgnet")
        listener(h3, "srv", "wgnet")
        daemon(h4, "cli", "wgnet")
        server = ip_of(h3, "srv", "wgnet")
        wait_until(lambda: ping(h4, "cli", server), timeout=30)
        marker = f"canal-wgcluster-{secrets.token_hex(8)}"
        with capture(ul) as pcap:
            deliver(h4, "cli", server, h3, "srv", marker)
        seen = frames(pcap)
        assert not any(marker.encode() in f for f in seen)
        assert not any(udp_ports(f) in ((8472, 8472),) for f in seen)  # no VXLAN at all
        # flannel's wireguard lease, device, routes and MTU.
        value = lease(etcd, h3, "/wg/network")
        assert value["BackendType"] == "wireguard" and set(value["BackendData"]) == {"PublicKey", "Port"}
        assert value["BackendData"]["Port"] == 51820
        subnet3 = status(h3)["subnet"]
        assert "dev flannel-wg proto 104" in h4.ip("route", "show", subnet3).stdout
        assert h4.ip("link", "show", "flannel.1", check=False).returncode != 0
        assert h4.container_exec("cli", "cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1420"
    finally:
        for h in (h3, h4):
            clear(h)


def test_canal_and_flanneld_wireguard_hosts_reach_each_other(bed):
    """f1 is built as flanneld's wireguard backend builds a host (FL device.go,
    wireguard_network.go): its own key, device flannel-wg with the lease's .0/32 and a route for
    the whole Network, its lease with BackendData {PublicKey, Port}, a peer per other lease
    (endpoint PublicIP:Port, AllowedIPs its subnet), and a "pod" address in its subnet."""
    ul, etcd, (_h1, _h2, h3, _h4, f1) = bed
    subnet, lease_key = "100.66.200.0/24", "/wg/network/subnets/100.66.200.0-24"
    pod = "100.66.200.1"
    try:
        private = f1.exec(["wg", "genkey"]).stdout.strip()
        public = f1.exec(["wg", "pubkey"], input=private + "\n").stdout.strip()
        key_file = f1.workdir / "wgkey"
        key_file.write_text(private + "\n")
        os.chmod(key_file, 0o600)
        f1.exec(["wireguard-go", "flannel-wg"])
        f1.exec(["wg", "set", "flannel-wg", "private-key", str(key_file), "listen-port", "51820"])
        f1.ip("addr", "add", "100.66.200.0/32", "dev", "flannel-wg")
        f1.ip("link", "set", "flannel-wg", "up")
        f1.ip("route", "add", WG_CLUSTER, "dev", "flannel-wg", "scope", "link")
        f1.ip("addr", "replace", f"{pod}/32", "dev", "lo")
        etcd.etcdctl("put", lease_key, json.dumps({"PublicIP": f1.address, "BackendType": "wireguard",
                                                   "BackendData": {"PublicKey": public, "Port": 51820}}))
        net(h3, "wgnet")
        daemon(h3, "web", "wgnet")
        h3_lease = lease(etcd, h3, "/wg/network")
        f1.exec(["wg", "set", "flannel-wg", "peer", h3_lease["BackendData"]["PublicKey"], "endpoint",
                 f"{h3.address}:51820", "allowed-ips", status(h3)["subnet"]])
        wait_until(lambda: public in [p["public_key"] for p in status(h3)["backend"]["encryption"]["peers"]], timeout=20)
        assert "dev flannel-wg proto 104" in h3.ip("route", "show", subnet).stdout
        # There over Canal's tunnel, back over flanneld's; nothing in the clear on the way.
        with capture(ul) as pcap:
            assert ping(h3, "web", pod)
        assert not any(in_clear(f, pod) for f in frames(pcap))
        assert any(udp_ports(f) == (51820, 51820) for f in frames(pcap))
    finally:
        etcd.etcdctl("del", lease_key)
        f1.ip("link", "del", "flannel-wg", check=False)
        clear(h3)


def test_nothing_of_it_stays_when_the_last_encrypted_network_goes(bed):
    _ul, etcd, (h1, _h2, _h3, _h4, _f1) = bed
    net(h1, "secret", "-o", "encrypted")
    daemon(h1, "cc", "secret")
    wait_until(lambda: h1.ip("link", "show", "flannel-wg", check=False).returncode == 0, timeout=20)
    assert "fwmark 0x100000/0x100000 lookup 25900" in h1.ip("rule").stdout
    clear(h1)

    def gone() -> bool:
        return (h1.ip("link", "show", "flannel-wg", check=False).returncode != 0
                and "25900" not in h1.ip("rule").stdout
                and "canal-encrypted" not in h1.exec(["ipset", "list", "-n"]).stdout
                and "CANAL-ENCRYPT" not in h1.exec(["iptables-save"]).stdout
                and "CANAL-MARK" not in h1.exec(["iptables-save", "-t", "mangle"]).stdout)

    wait_until(gone, timeout=20)  # wireguard-go exits with its device
    # The key stays on the host (and in the lease) for the next encrypted network.
    assert (h1.workdir / "canal" / "wireguard" / "private.key").exists()


def test_an_address_from_a_peers_range_on_an_encrypted_network(pernet):
    """A --ip from h1's subnet, on h2: h1 reaches it through the tunnel (its /32 in h2's
    AllowedIPs), and h2's own containers reach it locally: the WireGuard table has a throw
    route for it, or its peer's /24 there would send it to h1."""
    ul, etcd, h1, h2 = pernet
    for h in (h1, h2):
        net(h, "widesecret", "--subnet", "100.64.0.0/16", "-o", "encrypted")
    daemon(h1, "near", "widesecret")
    h1_subnet = ipaddress.ip_network(status(h1)["subnet"])
    foreign = str(h1_subnet.network_address + 200)
    daemon(h2, "guest", "widesecret", "--ip", foreign)
    daemon(h2, "neighbour", "widesecret")
    wait_until(lambda: ping(h1, "near", foreign), timeout=30)
    assert ping(h2, "neighbour", foreign)
    assert f"throw {foreign}" in h2.ip("route", "show", "table", "25900").stdout
    with capture(ul) as pcap:
        assert ping(h1, "near", foreign)
    assert not any(in_clear(f, foreign) for f in frames(pcap))
