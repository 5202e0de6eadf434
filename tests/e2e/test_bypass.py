"""Issue 9 end to end: a hostile container (NET_ADMIN + NET_RAW) tries every kernel-level way
around Canal's policy, on real dockerd, real kernel and the real plugin, and each attempt fails
(including ICMP errors, which conntrack calls RELATED to the flow they quote: from workloads
they go through policy, not around it).

Every test also shows the same attempt succeeding without the protection, so none passes by
accident: the protection is removed by tampering (a raw-table rule deleted with iptables-nft, a
sysctl set back, with the plugin paused) and then restored by the plugin's own read-back pass
(--resync-interval 2), or the plugin runs with a looser --workload-to-host, a policy allows it,
or the traffic comes from a Docker bridge or the underlay.
Attacks are sent from the host side with `nsenter --net=/proc/<container pid>/ns/net`: exactly
what a process in the container with NET_ADMIN/NET_RAW can send.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import pytest
from e2e_support import endpoint_ids, etcd_cluster, etcd_plugin_args, IMAGE, reset, wait_open

from testbed import Etcd, SimHost, wait_until
from testbed._util import spawn, stop_popen

HOSTILE = ("--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW")
VXLAN_PORT = 8472
RAW_RPFILTER = "-i cnl+ -m rpfilter --invert -j DROP"
RAW_VXLAN = f"-i cnl+ -p udp -m udp --dport {VXLAN_PORT} -j DROP"
RAW_IPIP = "-i cnl+ -p ipencap -j DROP"
RAW_ESP = "-i cnl+ -p esp -j DROP"
RAW6_DROP = "-i cnl+ -j DROP"


def plugin_args(host: SimHost, etcd: Etcd, *extra: str) -> list[str]:
    return etcd_plugin_args(host, etcd, *extra, resync=2)


@pytest.fixture(scope="module")
def cluster():
    with etcd_cluster(plugin_args) as bed:
        yield bed


@pytest.fixture
def c(cluster):
    """(etcd, h1, h2), each host back on the default plugin settings and emptied after the test."""
    ul, etcd, (h1, h2) = cluster
    yield etcd, h1, h2
    for h in (h1, h2):
        reset(h, plugin_args(h, etcd))
        h.docker("network", "rm", "plainnet", check=False)
        assert not [l for l in h.ip("-o", "link").stdout.splitlines() if ": cnl" in l]


# ------------------------------------------------------------------------------------ helpers


def apply(h: SimHost, doc: dict) -> None:
    h.exec([h.plugin_argv()[0], "-m", "canal", "policy", "apply", "-f", "-"], input=json.dumps(doc))


def net(h: SimHost, name: str = "appnet") -> None:
    h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", name)


def daemon(h: SimHost, name: str, *opts: str, network: str = "appnet", cmd=("sleep", "1000")) -> None:
    h.docker("run", "-d", "--name", name, "--network", network, *opts, IMAGE, *cmd)
    wait_open(h, name)


def ip_of(h: SimHost, container: str, network: str = "appnet") -> str:
    return h.docker_json("inspect", container)[0]["NetworkSettings"]["Networks"][network]["IPAddress"]


def ping(h: SimHost, container: str, target: str) -> bool:
    return h.container_exec(container, "ping", "-c1", "-W1", target, check=False).returncode == 0


def veth_of(h: SimHost, container: str) -> str:
    (endpoint,) = endpoint_ids(h, container)
    return f"cnl{endpoint[:12]}"


def in_netns(h: SimHost, container: str, argv: list[str], timeout: float = 30, check: bool = False
             ) -> subprocess.CompletedProcess:
    """Run argv in the container's network namespace (the attacker's view of the network)."""
    return h.exec(["nsenter", f"--net=/proc/{h.container_pid(container)}/ns/net", *argv],
                  timeout=timeout, check=check)


def py_in(h: SimHost, container: str, script: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return in_netns(h, container, ["python3", "-c", script, *args], timeout=timeout)


TCP_PROBE = r"""
import socket, sys
from concurrent.futures import ThreadPoolExecutor
port = int(sys.argv[1])

def probe(addr):
    s = socket.socket()
    s.settimeout(1.5)
    try:
        s.connect((addr, port))
        return addr
    except OSError:
        return None
    finally:
        s.close()

with ThreadPoolExecutor(len(sys.argv) - 2) as pool:
    opened = [a for a in pool.map(probe, sys.argv[2:]) if a]
print(" ".join(opened))
sys.exit(0 if opened else 1)
"""


def tcp_open(h: SimHost, container: str, addr: str, port: int) -> bool:
    """Can the container complete a TCP handshake with addr:port?"""
    return py_in(h, container, TCP_PROBE, str(port), addr).returncode == 0


def tcp_opened(h: SimHost, container: str, addrs: tuple[str, ...], port: int) -> list[str]:
    """Which of addrs (probed at once) the container completes a TCP handshake with."""
    opened = set(py_in(h, container, TCP_PROBE, str(port), *addrs).stdout.split())
    return [a for a in addrs if a in opened]


LISTENER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
print("listener", "ready", flush=True)
while True:
    conn, peer = s.accept()
    print("accepted", peer, flush=True)
    conn.close()
"""


@contextmanager
def host_listener(h: SimHost, port: int) -> Iterator[None]:
    """A TCP service of the host itself (its netns) on 0.0.0.0:port, stopped afterwards."""
    log = h.workdir / f"listener-{port}.log"
    proc = h.popen(["python3", "-c", LISTENER, str(port)], log)
    try:
        wait_until(lambda: "listener ready" in log.read_text(), timeout=10, what=f"listener on {port}")
        yield
    finally:
        stop_popen(proc, signal.SIGTERM, 5, group=True)


def saved(h: SimHost, table: str, v6: bool = False) -> list[str]:
    return h.exec([("ip6tables-nft-save" if v6 else "iptables-nft-save"), "-t", table]).stdout.splitlines()


def has_raw(h: SimHost, rule: str, v6: bool = False) -> bool:
    return f"-A CANAL-PREROUTING {rule}" in saved(h, "raw", v6)


def tamper_raw(h: SimHost, rule: str, v6: bool = False) -> None:
    """Delete one of Canal's raw-table rules, as another tool or an admin could."""
    h.exec([("ip6tables-nft" if v6 else "iptables-nft"), "-t", "raw", "-D", "CANAL-PREROUTING", *rule.split()])
    assert not has_raw(h, rule, v6)


def wait_raw_back(h: SimHost, *rules: str, v6: bool = False) -> None:
    wait_until(lambda: all(has_raw(h, r, v6) for r in rules), timeout=20, what=f"plugin restored {rules}")


@contextmanager
def plugin_paused(h: SimHost) -> Iterator[None]:
    """Freeze the plugin (SIGSTOP to its process group) while a control runs on tampered state,
    so its read-back pass cannot repair it halfway; resumed (SIGCONT) afterwards, always."""
    os.killpg(h.plugin.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(h.plugin.pid, signal.SIGCONT)


def sysctl(h: SimHost, path: str) -> str:
    return h.exec(["cat", f"/proc/sys/{path}"]).stdout.strip()


def set_sysctl(h: SimHost, path: str, value: str) -> None:
    h.exec(["sh", "-c", f"echo {value} > /proc/sys/{path}"])


def wl_to_host_action(h: SimHost) -> str:
    rules = [r for r in saved(h, "filter") if r.startswith("-A CANAL-WL-TO-HOST ")]
    return rules[-1].split()[-1] if rules else ""


def restart_plugin(h: SimHost, etcd: Etcd, mode: str) -> None:
    """Restart the host's plugin with --workload-to-host MODE, until its chain says so."""
    h.stop_plugin()
    h.start_plugin(plugin_args(h, etcd, "--workload-to-host", mode))
    wait_until(lambda: wl_to_host_action(h) == mode.upper(), timeout=20, what=f"workload-to-host {mode}")


def diagnostics(h: SimHost) -> str:
    """What a failed control needs to be understood: rule counters and the conntrack table."""
    return "\n".join([*h.exec(["iptables-nft-save", "-c"]).stdout.splitlines(),
                      *h.exec(["conntrack", "-L"], check=False).stdout.splitlines()])


# --------------------------------------------------------------------- 1. host ports


def test_host_ports_closed_to_containers_unless_the_host_says_so(c):
    """Default drop: no host port on any of the host's addresses (underlay, the gateway
    169.254.1.1, docker0), whatever INPUT says. accept opens them (so the probe works); return hands the
    decision to the host's own INPUT rules (open with policy ACCEPT, closed by a DROP rule the admin adds)."""
    etcd, h1, _ = c
    port = 7070
    net(h1)
    daemon(h1, "evil", *HOSTILE)
    # The host's underlay address, Canal's gateway on the veth, and Docker's own bridge address.
    targets = (h1.address, "169.254.1.1", h1.docker_bip.split("/")[0])
    with host_listener(h1, port):
        assert h1.exec(["python3", "-c", TCP_PROBE, str(port), "127.0.0.1"], check=False).returncode == 0
        assert tcp_opened(h1, "evil", targets, port) == []
        try:
            restart_plugin(h1, etcd, "accept")
            wait_open(h1, "evil")
            assert tcp_opened(h1, "evil", targets, port) == list(targets)
            restart_plugin(h1, etcd, "return")
            wait_open(h1, "evil")
            assert ":INPUT ACCEPT" in "\n".join(saved(h1, "filter"))
            assert tcp_opened(h1, "evil", targets, port) == list(targets)
            host_rule = ["INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP"]
            h1.exec(["iptables-nft", "-A", *host_rule])
            try:
                assert tcp_opened(h1, "evil", targets, port) == []
            finally:
                h1.exec(["iptables-nft", "-D", *host_rule])
        finally:
            restart_plugin(h1, etcd, "drop")  # the module's default setting, for the tests after
        wait_open(h1, "evil")
        assert tcp_opened(h1, "evil", targets, port) == []


# ------------------------------------------------------------------------ 2. datastore


def test_datastore_closed_to_containers_unless_a_policy_allows_it(c):
    """etcd is every host's trust root: a container cannot open TCP to it; an explicit egress
    Allow for that address and port opens it for the selected container only; the host itself
    always reaches it."""
    etcd, h1, _ = c
    addr, port = etcd.endpoint.split("//")[1].split(":")
    port = int(port)
    net(h1)
    daemon(h1, "evil", *HOSTILE)
    daemon(h1, "client", "--label", "role=etcd-client")
    assert h1.exec(["python3", "-c", TCP_PROBE, str(port), addr], check=False).returncode == 0
    assert not tcp_open(h1, "evil", addr, port)
    assert not tcp_open(h1, "client", addr, port)
    apply(h1, {"apiVersion": "canal/v1", "kind": "GlobalNetworkPolicy", "metadata": {"name": "etcd-clients"},
               "spec": {"selector": "role == 'etcd-client'", "egress": [
                   {"action": "Allow", "protocol": "TCP", "destination": {"nets": [f"{addr}/32"], "ports": [port]}}]}})
    wait_until(lambda: tcp_open(h1, "client", addr, port), timeout=15, what="policy Allow opens etcd")
    assert not tcp_open(h1, "evil", addr, port)


# ------------------------------------------------------------- 3. spoofed UDP reply


VICTIM = r"""
import socket, sys, time
out, servers = sys.argv[1], [(a, int(p)) for a, p in (t.split(":") for t in sys.argv[2:])]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 4000))
s.settimeout(0.2)
with open(out, "a") as log:
    while True:
        for server in servers:
            s.sendto(b"victim-request", server)
        try:
            data, src = s.recvfrom(2048)
        except socket.timeout:
            continue
        log.write(f"{src[0]}:{src[1]} {data.decode(errors='replace')}\n")
        log.flush()
"""

FORGE_UDP = r"""
import socket, struct, sys, time
src, sport, dst, dport, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5].encode()
udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                 socket.inet_aton(src), socket.inet_aton(dst))
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for _ in range(3):
    s.sendto(ip + udp, (dst, 0))
    time.sleep(0.1)
"""


def nat_reply_port(h: SimHost, victim: str, dport: int) -> int:
    """The port h's masquerade gave the victim's flow to dport (the reply tuple's dport)."""
    out = h.exec(["conntrack", "-L", "-p", "udp", "-s", victim, "--dport", str(dport)], check=False).stdout
    ports = [f.split("=")[1] for line in out.splitlines() for f in line.split() if f.startswith("dport=")]
    return int(ports[1]) if len(ports) >= 2 else 0


def test_spoofed_reply_into_a_neighbours_udp_flow(c):
    """Victim A on h1 talks UDP from port 4000 to a container S:5000 on h2 and (masqueraded) to
    h2's own address on 5001; attacker B on h1 forges the replies (S:5000 -> A:4000, and
    h2:5001 -> h1's address:<NAT port>, which conntrack would un-NAT to A). The raw rpfilter
    rule and rp_filter on B's veth each drop them before conntrack; with both removed they
    reach A; the plugin puts both back."""
    _, h1, h2 = c
    for h in (h1, h2):
        net(h)
    daemon(h2, "server")
    daemon(h1, "victim")
    daemon(h1, "evil", *HOSTILE)
    server, victim, evil_veth = ip_of(h2, "server"), ip_of(h1, "victim"), veth_of(h1, "evil")
    received = h1.workdir / f"victim-{uuid.uuid4().hex[:6]}.log"
    received.write_text("")
    proc = spawn(["nsenter", f"--net=/proc/{h1.container_pid('victim')}/ns/net", "python3", "-c", VICTIM,
                  str(received), f"{server}:5000", f"{h2.address}:5001"], h1.workdir / "victim-proc.log")
    rp_path = f"net/ipv4/conf/{evil_veth}/rp_filter"
    try:
        # Both flows are in h1's conntrack table (the forged packets would match their replies).
        wait_until(lambda: nat_reply_port(h1, victim, 5000) and nat_reply_port(h1, victim, 5001),
                   timeout=10, what="victim's flows in conntrack")
        nat_port = nat_reply_port(h1, victim, 5001)

        def forge(marker: str) -> None:
            for argv in ((server, "5000", victim, "4000"), (h2.address, "5001", h1.address, str(nat_port))):
                res = py_in(h1, "evil", FORGE_UDP, *argv, f"{marker}-{argv[1]}")
                assert res.returncode == 0, res.stderr

        def arrived(marker: str) -> list[str]:
            time.sleep(0.5)  # the victim's receive loop polls every 0.2 s
            text = received.read_text()
            return [port for port in ("5000", "5001") if f"{marker}-{port}" in text]

        assert sysctl(h1, rp_path) == "1" and has_raw(h1, RAW_RPFILTER)
        forge("forged-1")
        assert arrived("forged-1") == []
        # Positive control: both protections removed, the forged "replies" reach the victim.
        assert sysctl(h1, "net/ipv4/conf/all/rp_filter") == "0", "conf/all would keep rp_filter on"
        with plugin_paused(h1):
            set_sysctl(h1, rp_path, "0")
            forge("forged-raw-alone")
            assert arrived("forged-raw-alone") == []  # the raw rpfilter rule alone holds
            set_sysctl(h1, rp_path, "1")
            tamper_raw(h1, RAW_RPFILTER)
            forge("forged-sysctl-alone")
            assert arrived("forged-sysctl-alone") == []  # so does rp_filter alone
            set_sysctl(h1, rp_path, "0")
            forge("forged-2")
            assert arrived("forged-2") == ["5000", "5001"], diagnostics(h1)
        # The plugin's read-back pass restores both; the same forgeries fail again.
        wait_raw_back(h1, RAW_RPFILTER)
        wait_until(lambda: sysctl(h1, rp_path) == "1", timeout=20, what="plugin restored rp_filter")
        forge("forged-3")
        assert arrived("forged-3") == []
    finally:
        stop_popen(proc, signal.SIGTERM, 5, group=True)


SILENT_UDP = r"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 5000))
while True:
    s.recv(2048)
"""

CONNECTED_CLIENT = r"""
import socket, sys, time
local, lport, server, sport, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((local, lport))
s.connect((server, sport))
s.settimeout(0.2)
with open(out, "a") as log:
    while True:
        try:
            s.send(b"request")
            s.recv(2048)
        except socket.timeout:
            pass
        except OSError as err:  # an ICMP error about this flow, reported on the connected socket
            log.write(f"ERR {err}\n")
            log.flush()
"""

FORGE_ICMP_ERROR = r"""
import socket, struct, sys
victim, server = sys.argv[1], sys.argv[2]
inner = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, socket.inet_aton(victim),
                    socket.inet_aton(server)) + struct.pack("!HHHH", 4000, 5000, 8, 0)
icmp = struct.pack("!BBHI", 3, 3, 0, 0) + inner  # port unreachable, quoting the victim's datagram
total = sum(struct.unpack("!%dH" % (len(icmp) // 2), icmp))
while total >> 16:
    total = (total & 0xFFFF) + (total >> 16)
icmp = icmp[:2] + struct.pack("!H", ~total & 0xFFFF) + icmp[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
for _ in range(3):
    s.sendto(icmp, (victim, 0))
"""


def test_forged_icmp_error_into_a_neighbours_flow_past_a_deny_policy(c):
    """Attacker B, with its own (unspoofed) address, sends victim A an ICMP port-unreachable
    quoting A's UDP flow to S: conntrack calls it RELATED to A's flow. Without a policy B may
    reach A and A's socket gets the error (control); with an ingress policy that denies B, it
    must not (A's DNS client or any connected UDP/TCP socket would otherwise be B's to break)."""
    _, h1, h2 = c
    for h in (h1, h2):
        net(h)
    daemon(h2, "server")
    daemon(h1, "victim", "--label", "role=victim")
    daemon(h1, "evil", *HOSTILE)
    server, victim = ip_of(h2, "server"), ip_of(h1, "victim")
    errors = h1.workdir / f"victim-errors-{uuid.uuid4().hex[:6]}.log"
    errors.write_text("")
    server_ns = f"--net=/proc/{h2.container_pid('server')}/ns/net"
    procs = [spawn(["nsenter", server_ns, "python3", "-c", SILENT_UDP], h2.workdir / "silent-server.log")]
    try:
        # The client only once the server listens: a datagram before that earns a genuine
        # port-unreachable, which the test would take for the forged one.
        wait_until(lambda: ":5000" in h2.exec(["nsenter", server_ns, "ss", "-uln"]).stdout, timeout=10,
                   what="the server listening on 5000")
        procs.append(spawn(["nsenter", f"--net=/proc/{h1.container_pid('victim')}/ns/net", "python3", "-c",
                            CONNECTED_CLIENT, "0.0.0.0", "4000", server, "5000", str(errors)],
                           h1.workdir / "victim-client.log"))
        wait_until(lambda: nat_reply_port(h1, victim, 5000), timeout=10, what="victim's flow in conntrack")

        def forged_error_arrives() -> bool:
            before = errors.read_text().count("ERR")
            res = py_in(h1, "evil", FORGE_ICMP_ERROR, victim, server)
            assert res.returncode == 0, res.stderr
            time.sleep(0.6)  # the victim's loop calls the socket every 0.2 s
            return errors.read_text().count("ERR") > before

        time.sleep(0.6)
        assert errors.read_text() == ""  # the server is silent: no error but a forged one
        assert forged_error_arrives()  # control: B may reach A, its error gets through
        only_web = {"selector": "role == 'victim'",
                    "ingress": [{"action": "Allow", "source": {"selector": "role == 'web'"}}]}
        apply(h1, {"apiVersion": "canal/v1", "kind": "NetworkPolicy",
                   "metadata": {"name": "victim-in", "network": "appnet"}, "spec": only_web})
        wait_until(lambda: not ping(h1, "evil", victim), timeout=15, what="policy denies evil -> victim")
        assert not forged_error_arrives(), diagnostics(h1)
    finally:
        for proc in procs:
            stop_popen(proc, signal.SIGTERM, 5, group=True)


FORGE_HOST_ICMP_ERROR = FORGE_ICMP_ERROR.replace("4000, 5000", "5555, 9999")


def test_icmp_error_into_a_host_flow_from_a_container(c):
    """The host talks UDP 5555 -> h2:9999 (h2 listens, silent). An ICMP port-unreachable quoting
    that flow, sent to the host by a router on the path (the underlay), reaches the host's
    socket (control: the forged packet is good). The same packet from a container must not:
    workload-to-host is drop."""
    _, h1, h2 = c
    net(h1)
    daemon(h1, "evil", *HOSTILE)
    errors = h1.workdir / f"host-errors-{uuid.uuid4().hex[:6]}.log"
    errors.write_text("")
    procs = [h2.popen(["python3", "-c", SILENT_UDP.replace("5000", "9999")], h2.workdir / "silent-9999.log")]
    try:
        wait_until(lambda: "9999" in h2.exec(["ss", "-uln"]).stdout, timeout=10, what="h2 listening on 9999")
        procs.append(h1.popen(["python3", "-c", CONNECTED_CLIENT, h1.address, "5555", h2.address, "9999", str(errors)],
                              h1.workdir / "host-flow.log"))
        wait_until(lambda: "dport=9999" in h1.exec(["conntrack", "-L", "-p", "udp"], check=False).stdout,
                   timeout=10, what="host flow in conntrack")
        time.sleep(0.6)
        assert errors.read_text() == ""  # h2 is silent: no error but a forged one

        def error_arrives(send) -> bool:
            before = errors.read_text().count("ERR")
            res = send(["python3", "-c", FORGE_HOST_ICMP_ERROR, h1.address, h2.address], check=False)
            assert res.returncode == 0, res.stderr
            time.sleep(0.6)  # the host flow's loop calls the socket every 0.2 s
            return errors.read_text().count("ERR") > before

        assert error_arrives(h1.underlay.exec)  # control: from a router on the path it is accepted
        assert not error_arrives(lambda argv, check: in_netns(h1, "evil", argv, check=check)), diagnostics(h1)
    finally:
        for proc in procs:
            stop_popen(proc, signal.SIGTERM, 5, group=True)


# ------------------------------------------------------------ 4. tunnels to a peer


SEND_TUNNELS = r"""
import socket, struct, sys
peer, vxlan_port, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
inner_ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + 16, 0, 0, 64, 17, 0,
                       socket.inet_aton("100.64.66.66"), socket.inet_aton("100.64.77.77"))
inner = inner_ip + struct.pack("!HHHH", 1234, 5678, 8 + 16, 0) + marker.encode().ljust(16, b".")
ether = bytes.fromhex("ffffffffffff" "02aabbccddee" "0800") + inner
vxlan = struct.pack("!II", 0x08000000, 1 << 8) + ether
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(vxlan, (peer, vxlan_port))
u.sendto(vxlan.replace(b"vx", b"xx") + b"." * 3000 + marker.replace("vx", "fr").encode(), (peer, vxlan_port))
for proto, tag in ((4, b"ip"), (50, b"es")):
    r = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
    r.sendto(inner.replace(b"vx", tag), (peer, 0))
u.sendto(vxlan.replace(b"vx", b"ct"), (peer, vxlan_port + 1))  # control, last: the same datagram, next port
"""


@contextmanager
def counters(h: SimHost, markers: list[str]) -> Iterator[Callable[[], dict[str, int]]]:
    """Counting rules (no target) at the end of the peer's raw PREROUTING, one per marker;
    yields a function reading {marker: packets}."""
    rules = [["PREROUTING", "-m", "string", "--string", m, "--algo", "bm"] for m in markers]
    added = []
    try:
        for rule in rules:
            h.exec(["iptables-nft", "-t", "raw", "-A", *rule])
            added.append(rule)

        def read() -> dict[str, int]:
            out = h.exec(["iptables-nft-save", "-c", "-t", "raw"]).stdout.splitlines()
            found = {}
            for line in out:
                for m in markers:
                    if f'--string "{m}"' in line or f"--string {m} " in line:
                        found[m] = int(line.split("]")[0].strip("[").split(":")[0])
            return found

        yield read
    finally:
        for rule in added:
            h.exec(["iptables-nft", "-t", "raw", "-D", *rule], check=False)


def test_tunnel_packets_from_a_container_never_reach_a_peer(c):
    """VXLAN to the peer's VTEP (any inner source; also as IP fragments, whose later parts carry
    no UDP header), IP-in-IP and ESP: counted where they would
    arrive (the peer's raw PREROUTING). None arrives; the same datagram on the next UDP port
    does; with h1's raw drops removed all three arrive; the plugin restores the drops."""
    _, h1, h2 = c
    net(h1)
    daemon(h1, "evil", *HOSTILE)
    tunnel_rules = (RAW_VXLAN, RAW_IPIP, RAW_ESP)
    assert all(has_raw(h1, r) for r in tunnel_rules)
    for round_, expect in (("a", 0), ("b", 1), ("c", 0)):
        marker = f"vx{round_}{uuid.uuid4().hex[:6]}"
        names = {"vxlan": marker, "vxlan-fragmented": marker.replace("vx", "fr"),
                 "next-port": marker.replace("vx", "ct"), "ipip": marker.replace("vx", "ip"),
                 "esp": marker.replace("vx", "es")}
        with counters(h2, list(names.values())) as read, (plugin_paused(h1) if round_ == "b" else nullcontext()):
            if round_ == "b":
                for rule in tunnel_rules:
                    tamper_raw(h1, rule)
            res = py_in(h1, "evil", SEND_TUNNELS, h2.address, str(VXLAN_PORT), marker)
            assert res.returncode == 0, res.stderr
            control = names["next-port"]
            wait_until(lambda: read().get(control) == 1, timeout=5, what="control datagram at the peer")  # noqa: B023
            time.sleep(0.3)  # sent before the control: give any straggler the same path's time to land
            seen = {k: read()[v] for k, v in names.items()}
        assert seen == {"vxlan": expect, "vxlan-fragmented": expect, "next-port": 1, "ipip": expect, "esp": expect}, \
            (round_, seen)
        if round_ == "b":
            wait_raw_back(h1, *tunnel_rules)


# ------------------------------------------------------------------- 5. IPv6 to host


PING6 = r"""
import socket, struct, sys, time
ifname, targets = sys.argv[1], sys.argv[2:]
idx = socket.if_nametoindex(ifname)
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, idx)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
s.settimeout(0.2)
for seq, target in enumerate(targets):
    s.sendto(struct.pack("!BBHHH", 128, 0, 0, 0x6366, seq) + b"canal-v6", (target, 0, 0, idx))
seen, deadline = set(), time.monotonic() + 1.5
while time.monotonic() < deadline:
    try:
        data, src = s.recvfrom(2048)
    except socket.timeout:
        continue
    if data[0] == 129:
        seen.add(src[0].split("%")[0])
print(" ".join(sorted(seen)))
"""


def test_ipv6_link_local_to_the_host(c):
    """A container that turns IPv6 on in its own netns gets no IPv6 answer from the host: the
    host veth has IPv6 disabled (no link-local address) and ip6tables raw drops IPv6 from cnl+.
    With both undone the host answers on its link-local; the plugin redoes both."""
    _, h1, _ = c
    net(h1)
    daemon(h1, "evil", *HOSTILE)
    veth = veth_of(h1, "evil")
    for path in ("all/disable_ipv6", "eth0/disable_ipv6"):
        res = in_netns(h1, "evil", ["sh", "-c", f"echo 0 > /proc/sys/net/ipv6/conf/{path}"])
        assert res.returncode == 0, res.stderr
    res = in_netns(h1, "evil", ["ip", "-6", "addr", "add", "fe80::bad:1/64", "dev", "eth0", "nodad"])
    assert res.returncode == 0, res.stderr
    v6_path = f"net/ipv6/conf/{veth}/disable_ipv6"

    def answers(*targets: str) -> set[str]:
        res = py_in(h1, "evil", PING6, "eth0", *targets)
        assert res.returncode == 0, res.stderr
        return set(res.stdout.split())

    assert sysctl(h1, v6_path) == "1" and has_raw(h1, RAW6_DROP, v6=True)
    assert answers("ff02::1") == set()
    # Positive control: IPv6 on the host veth (no DAD wait) and the ip6tables raw drop removed.

    def host_link_local() -> list[str]:
        return [l.split()[3].split("/")[0] for l in h1.ip("-6", "-o", "addr", "show", "dev", veth).stdout.splitlines()
                if " fe80:" in l]

    with plugin_paused(h1):
        set_sysctl(h1, f"net/ipv6/conf/{veth}/accept_dad", "0")
        set_sysctl(h1, v6_path, "0")
        tamper_raw(h1, RAW6_DROP, v6=True)
        wait_until(host_link_local, timeout=10, what="link-local address on the host veth")
        link_local = host_link_local()
        assert link_local[0] in answers("ff02::1", link_local[0])
    # The plugin's read-back pass restores both; the host is silent again.
    wait_raw_back(h1, RAW6_DROP, v6=True)
    wait_until(lambda: sysctl(h1, v6_path) == "1", timeout=20, what="plugin disabled IPv6 on the veth again")
    assert answers("ff02::1", link_local[0]) == set()


# ----------------------------------------------------------- 6. Docker bridge untouched


def rule_counters(h: SimHost) -> dict[str, list[int]]:
    """Packet counters of every rule of Canal's FORWARD/INPUT chains and its raw chain."""
    out = {}
    for table, chain in (("filter", "CANAL-FORWARD"), ("filter", "CANAL-INPUT"), ("filter", "CANAL-WL-TO-HOST"),
                         ("raw", "CANAL-PREROUTING")):
        lines = h.exec(["iptables-nft", "-t", table, "-L", chain, "-v", "-x", "-n"]).stdout.splitlines()[2:]
        out[chain] = [int(l.split()[0]) for l in lines if l.strip()]
    return out


def test_docker_bridge_traffic_is_not_canals(c):
    """Containers on a plain bridge network talk to each other, to their host and to another
    host as usual, and not one packet of that moves a counter of Canal's rules; a canal
    container's traffic does move them (so the counters are live)."""
    _, h1, h2 = c
    net(h1)  # Canal's chains exist on h1 (it has a canal network)
    h1.docker("network", "create", "-d", "bridge", "plainnet")
    for name in ("b1", "b2"):
        h1.docker("run", "-d", "--name", name, "--network", "plainnet", *HOSTILE, IMAGE,
                  "sh", "-c", "while true; do echo hello-bridge | nc -l -p 6000; done")
    gateway = h1.docker_json("network", "inspect", "plainnet")[0]["IPAM"]["Config"][0]["Gateway"]
    before = rule_counters(h1)
    assert before["CANAL-FORWARD"] and before["CANAL-PREROUTING"]
    b1 = ip_of(h1, "b1", "plainnet")
    assert "hello-bridge" in h1.container_exec("b2", "sh", "-c", f"nc -w 2 {b1} 6000 </dev/null", timeout=20).stdout
    for target in (b1, gateway, h2.address):
        assert h1.container_exec("b2", "ping", "-c2", "-W2", target, check=False).returncode == 0, target
    assert rule_counters(h1) == before
    # Positive control: a canal container's traffic through the same chains moves them.
    daemon(h1, "cnl1")
    daemon(h1, "cnl2")
    assert h1.container_exec("cnl1", "ping", "-c2", "-W2", ip_of(h1, "cnl2"), check=False).returncode == 0
    h1.container_exec("cnl1", "ping", "-c1", "-W1", "169.254.1.1", check=False)
    udp = "import socket, sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', (sys.argv[1], 8472))"
    py_in(h1, "cnl1", udp, h2.address)  # dropped in raw CANAL-PREROUTING (counted there)
    after = rule_counters(h1)
    moved = {chain for chain in after if sum(after[chain]) > sum(before[chain])}
    assert moved >= {"CANAL-FORWARD", "CANAL-INPUT", "CANAL-PREROUTING"}, (before, after)
