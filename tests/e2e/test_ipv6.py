"""Issue 13 end to end on one host: dual-stack canal networks (--ipv6), real containers and
packets, policy over both families, spoofed IPv6 sources, and IPv6 of a network created
without --ipv6 still closed. Every closed path has an open control through the same code."""

from __future__ import annotations

import ipaddress
import json

import pytest
from e2e_support import canal, canal_leftovers, CLUSTER, hosted, IMAGE, reset, wait_open

from testbed import SimHost, wait_until
from testbed._util import run as run_cmd

NETWORK6 = "fd00:6464::/48"  # the plugin's --network6 in this module
PLUGIN = ["--network", CLUSTER, "--network6", NETWORK6, "--log-level", "debug", "--resync-interval", "2"]
GATEWAY6 = "fe80::ecee:eeff:feee:eeee"


@pytest.fixture(scope="module")
def host(underlay):
    with hosted(underlay, "v6", "198.18.0.1", PLUGIN) as h:
        yield h


@pytest.fixture
def h(host):
    yield host
    reset(host, PLUGIN)
    assert canal_leftovers(host) == {"veths": [], "routes": [], "iptables": [], "ipsets": []}
    assert host.ip("-6", "route", "show", "proto", "101").stdout.strip() == ""
    assert [l for l in host.exec(["ip6tables-nft-save"]).stdout.splitlines() if "CANAL" in l] == []


def apply(h: SimHost, *docs: dict) -> None:
    canal(h, "policy", "apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs), raw=True)


def policy(name: str, network: str, spec: dict) -> dict:
    return {"apiVersion": "canal/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "network": network}, "spec": spec}


def net(h: SimHost, name: str, *opts: str) -> None:
    h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", *opts, name)


def daemon(h: SimHost, name: str, network: str, *opts: str, cmd: tuple[str, ...] = ("sleep", "100000")) -> None:
    h.docker("run", "-d", "--name", name, "--network", network, *opts, IMAGE, *cmd)
    wait_open(h, name)


def server(h: SimHost, name: str, network: str, *opts: str) -> None:
    """A container answering pong-NAME on TCP 80, over IPv4 and IPv6 (busybox nc -l listens on
    an IPv6 socket that also takes IPv4)."""
    daemon(h, name, network, *opts, cmd=("sh", "-c", f"while true; do echo pong-{name} | nc -l -p 80; done & sleep 100000"))


def addresses(h: SimHost, container: str, network: str) -> tuple[str, str]:
    settings = h.docker_json("inspect", container)[0]["NetworkSettings"]["Networks"][network]
    return settings["IPAddress"], settings["GlobalIPv6Address"]


def run(h: SimHost, container: str, script: str) -> tuple[int, str]:
    proc = h.docker("exec", container, "sh", "-c", script, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def pings(h: SimHost, container: str, target: str, *flags: str) -> bool:
    return run(h, container, f"ping {' '.join(flags)} -c1 -W2 {target}")[0] == 0


def fetch(h: SimHost, container: str, address: str) -> str:
    return run(h, container, f"nc -w 2 {address} 80 </dev/null")[1].strip()


def test_dual_stack_ping6_by_address_and_name(h):
    net(h, "dual", "--ipv6")
    info = h.docker_json("network", "inspect", "dual")[0]
    assert info["EnableIPv6"] is True
    daemon(h, "alpha", "dual")
    daemon(h, "beta", "dual")
    _, a6 = addresses(h, "alpha", "dual")
    b4, b6 = addresses(h, "beta", "dual")
    assert ipaddress.ip_address(a6) in ipaddress.ip_network(NETWORK6) and a6 != b6
    assert h.docker_json("inspect", "alpha")[0]["NetworkSettings"]["Networks"]["dual"]["GlobalIPv6PrefixLen"] == 128
    code, out = run(h, "alpha", "ip -6 route; ip -6 addr show eth0")
    assert f"default via {GATEWAY6} dev eth0" in out and f"{a6}/128 scope global" in out, out
    assert pings(h, "alpha", b6) and pings(h, "alpha", b4)
    assert pings(h, "alpha", "beta", "-6")  # Docker's embedded DNS answers AAAA for the name
    code, out = run(h, "alpha", "nslookup -type=aaaa beta 127.0.0.11")
    assert b6 in out, out
    # IPv6 uses the veth's MTU, which is IPv4's (the host has no IPv6 default route at all).
    mtu = run(h, "alpha", "cat /sys/class/net/eth0/mtu; cat /proc/sys/net/ipv6/conf/eth0/mtu")[1].split()
    assert mtu[0] == mtu[1] and int(mtu[0]) < 1500, mtu
    assert h.ip("-6", "route", "show", "default").stdout.strip() == ""


def test_tcp_over_ipv6_and_user_subnet_with_ip6(h):
    net(h, "dual6", "--ipv6", "--subnet", "fd00:6565::/64")
    server(h, "srv", "dual6", "--ip6", "fd00:6565::80")
    daemon(h, "cli", "dual6")
    assert addresses(h, "srv", "dual6")[1] == "fd00:6565::80"
    assert fetch(h, "cli", "fd00:6565::80") == "pong-srv"
    assert fetch(h, "cli", addresses(h, "srv", "dual6")[0]) == "pong-srv"


def both(h: SimHost, client: str, srv: str, network: str) -> tuple[bool, bool]:
    """(TCP over IPv4 answered, TCP over IPv6 answered) from client to srv's port 80."""
    v4, v6 = addresses(h, srv, network)
    return fetch(h, client, v4) == f"pong-{srv}", fetch(h, client, v6) == f"pong-{srv}"


def test_policy_decides_alike_over_ipv4_and_ipv6(h):
    net(h, "pol", "--ipv6")
    server(h, "db", "pol", "--label", "role=db")
    daemon(h, "web", "pol", "--label", "role=web")
    daemon(h, "batch", "pol", "--label", "role=batch")
    assert both(h, "web", "db", "pol") == (True, True)  # the profile: own network allowed
    assert both(h, "batch", "db", "pol") == (True, True)
    apply(h, policy("deny-web", "pol", {"selector": "role == 'db'", "ingress": [
        {"action": "Deny", "source": {"selector": "role == 'web'"}},
        {"action": "Allow"}]}))
    wait_until(lambda: both(h, "web", "db", "pol") == (False, False), timeout=10, what="web denied over both families")
    assert both(h, "batch", "db", "pol") == (True, True)
    apply(h, policy("deny-web", "pol", {"selector": "role == 'db'", "ingress": [
        {"action": "Allow", "protocol": "TCP", "source": {"selector": "role == 'web'"}, "destination": {"ports": [80]}}]}))
    wait_until(lambda: both(h, "web", "db", "pol") == (True, True), timeout=10, what="web allowed over both families")
    # Any other source now meets the default deny, in both families alike.
    assert both(h, "batch", "db", "pol") == (False, False)
    # nets take IPv6 CIDRs, counted only in their own family: batch's /128 denied, its IPv4 not.
    batch6 = addresses(h, "batch", "pol")[1]
    apply(h, policy("deny-web", "pol", {"selector": "role == 'db'", "ingress": [
        {"action": "Deny", "source": {"nets": [f"{batch6}/128"]}}, {"action": "Allow"}]}))
    wait_until(lambda: both(h, "batch", "db", "pol") == (True, False), timeout=10, what="batch's /128 denied")
    assert both(h, "web", "db", "pol") == (True, True)


def in_container(h: SimHost, container: str, *argv: str) -> None:
    """iproute2 of the machine inside a container's network namespace: what a container with
    NET_ADMIN could do to itself (busybox's ip lacks nodad and neighbour entries)."""
    run_cmd(["nsenter", f"--net=/proc/{h.container_pid(container)}/ns/net", *argv])


def rpfilter_drops(h: SimHost) -> int:
    """Packets Canal's IPv6 raw rpfilter rule dropped so far."""
    saved = h.exec(["ip6tables-nft-save", "-c", "-t", "raw"]).stdout.splitlines()
    (line,) = [line for line in saved if "CANAL-PREROUTING" in line and "rpfilter --invert -j DROP" in line]
    return int(line[1:].split(":", 1)[0])


def test_spoofed_ipv6_source_is_dropped(h):
    """A container sending from an address not its own (a neighbour's, or one nobody holds):
    nothing answers and Canal's rpfilter rule counted the drop. Control: the same ping from
    its own /128 is answered and counts nothing."""
    net(h, "spoof", "--ipv6", "--subnet", "fd00:6566::/64")
    daemon(h, "target", "spoof")
    daemon(h, "neighbour", "spoof", "--ip6", "fd00:6566::77")
    daemon(h, "evil", "spoof")
    target6 = addresses(h, "target", "spoof")[1]
    own6 = addresses(h, "evil", "spoof")[1]
    before = rpfilter_drops(h)
    assert run(h, "evil", f"ping -6 -c1 -W2 -I {own6} {target6}")[0] == 0
    assert rpfilter_drops(h) == before
    for forged in ("fd00:6566::77", "fd00:6566::dead"):
        in_container(h, "evil", "ip", "-6", "addr", "add", f"{forged}/128", "dev", "eth0", "nodad")
        try:
            before = rpfilter_drops(h)
            code, out = run(h, "evil", f"ping -6 -c1 -W2 -I {forged} {target6}")
            assert code != 0 and "1 packets transmitted, 0 packets received" in out, out
            assert rpfilter_drops(h) > before
        finally:
            in_container(h, "evil", "ip", "-6", "addr", "del", f"{forged}/128", "dev", "eth0")
    assert run(h, "evil", f"ping -6 -c1 -W2 -I {own6} {target6}")[0] == 0  # control again, after


def test_ipv6_of_a_network_without_ipv6_stays_closed(h):
    """A container of a network created without --ipv6 configures IPv6 itself (address, a
    static neighbour entry for the host veth's link-local, a default route) and sends to a
    dual-stack container: nothing arrives. Control: the same from a dual-stack container."""
    net(h, "dual", "--ipv6", "--subnet", "fd00:6567::/64")
    net(h, "v4only")
    daemon(h, "target", "dual")
    daemon(h, "insider", "dual")
    daemon(h, "outsider", "v4only")
    target6 = addresses(h, "target", "dual")[1]
    assert addresses(h, "outsider", "v4only")[1] == ""
    for name, src in (("insider", addresses(h, "insider", "dual")[1]), ("outsider", "fd00:6567::99")):
        in_container(h, name, "sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=0")
        in_container(h, name, "ip", "-6", "addr", "replace", f"{src}/128", "dev", "eth0", "nodad")
        in_container(h, name, "ip", "-6", "neigh", "replace", GATEWAY6, "lladdr", "ee:ee:ee:ee:ee:ee",
                     "dev", "eth0", "nud", "permanent")
        in_container(h, name, "ip", "-6", "route", "replace", "default", "via", GATEWAY6, "dev", "eth0")
    code, out = run(h, "insider", f"ping -6 -c1 -W2 {target6}")
    assert code == 0, out  # control
    code, out = run(h, "outsider", f"ping -6 -c1 -W2 -I fd00:6567::99 {target6}")
    assert code != 0 and "1 packets transmitted, 0 packets received" in out, out
    # Closed twice: the outsider's host veth has IPv6 disabled, and the raw table drops IPv6
    # from every veth but the dual-stack endpoints'.
    raw = h.exec(["ip6tables-nft-save", "-t", "raw"]).stdout.splitlines()
    assert raw.index("-A CANAL-PREROUTING -i cnl+ -j DROP") > max(
        i for i, line in enumerate(raw) if line.endswith("-j RETURN"))


def wl_to_host_drops(h: SimHost) -> int:
    """Packets CANAL-WL-TO-HOST's final DROP (workload to host, --workload-to-host drop) took, IPv6."""
    saved = h.exec(["ip6tables-nft-save", "-c", "-t", "filter"]).stdout.splitlines()
    (line,) = [line for line in saved if line.endswith("-A CANAL-WL-TO-HOST -j DROP")]
    return int(line[1:].split(":", 1)[0])


def test_host_protection_holds_for_ipv6(h):
    """The host veth's link-local address is every dual-stack container's IPv6 next hop: neighbour
    discovery with it works (control: the container reaches another one through it), but the host
    itself is closed to workloads over IPv6 as over IPv4: a ping to it is dropped and counted."""
    net(h, "prot", "--ipv6", "--subnet", "fd00:6569::/64")
    daemon(h, "alpha", "prot")
    daemon(h, "beta", "prot")
    assert pings(h, "alpha", addresses(h, "beta", "prot")[1], "-6")  # via the host veth's link-local
    before = wl_to_host_drops(h)
    assert not pings(h, "alpha", f"{GATEWAY6}%eth0", "-6")
    assert wl_to_host_drops(h) > before
    assert not pings(h, "alpha", h.address)  # IPv4 alike


def raw_drops(h: SimHost, match: str) -> int:
    saved = h.exec(["ip6tables-nft-save", "-c", "-t", "raw"]).stdout.splitlines()
    (line,) = [line for line in saved if "CANAL-PREROUTING" in line and match in line]
    return int(line[1:].split(":", 1)[0])


def test_encapsulated_ipv6_from_a_workload_is_dropped_before_conntrack(h):
    """VXLAN to the tunnel port over IPv6 would reach peers' VTEPs with any inner address: the
    raw table drops it as for IPv4, whatever the destination. Control: the same datagram to
    another port passes the raw table (counted nowhere there)."""
    net(h, "encap", "--ipv6", "--subnet", "fd00:656a::/64")
    daemon(h, "alpha", "encap")
    daemon(h, "beta", "encap")
    beta6 = addresses(h, "beta", "encap")[1]
    vxlan = "--dport 8472 -j DROP"

    def send(port: int) -> None:  # from alpha's own /128 (busybox nc has no UDP)
        in_container(h, "alpha", "python3", "-c", "import socket, sys; socket.socket(socket.AF_INET6, "
                     "socket.SOCK_DGRAM).sendto(b'x' * 64, (sys.argv[1], int(sys.argv[2])))", beta6, str(port))

    before = raw_drops(h, vxlan)
    send(8473)
    assert raw_drops(h, vxlan) == before  # control
    send(8472)
    assert raw_drops(h, vxlan) == before + 1
