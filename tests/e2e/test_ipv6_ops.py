"""Issue 13, single host: published ports over IPv6 (`docker run -p` on an --ipv6 canal network),
and the operator's views (endpoint list, status, metrics, diagnose) in both families.

The host and a client machine (no Docker) share the underlay; the test gives both an IPv6
address of 2001:2::/48 on their underlay interfaces (inside their own namespaces), so clients
reach the published port over IPv6 from another machine, from the host itself and from
containers (hairpin), and the container's policy decides as it does for IPv4."""

from __future__ import annotations

import ipaddress
import json
import re
import tarfile
import time
from pathlib import Path

import pytest
from e2e_support import CLUSTER, IMAGE, canal, reset, start_host, wait_open
from prometheus_client.parser import text_string_to_metric_families

from testbed import SimHost, wait_until

PLUGIN_DIR = str(Path(__file__).resolve().parents[2] / "plugin")  # this checkout's CLI (diagnose runs in it)
NETWORK6 = "fd00:6572::/48"
PLUGIN = ["--network", CLUSTER, "--network6", NETWORK6, "--log-level", "debug", "--resync-interval", "2"]
HOST_IP, HOST_IP6 = "198.18.0.1", "2001:2::1"
CLIENT_IP6 = "2001:2::2"


@pytest.fixture(scope="module")
def bed(underlay):
    h = start_host(underlay, "p61", HOST_IP, PLUGIN)
    client = None
    try:
        client = SimHost(underlay, "p62", "198.18.0.2")  # another machine: only a client
        for node, address in ((h, HOST_IP6), (client, CLIENT_IP6)):
            node.ip("-6", "addr", "add", f"{address}/64", "dev", "eth0", "nodad")
        yield h, client
    finally:
        if client is not None:
            client.close()
        h.close()


@pytest.fixture
def b(bed):
    h, client = bed
    yield h, client
    reset(h, PLUGIN)


def serve(h: SimHost, name: str, network: str, *opts: str) -> None:
    """TCP 80 answers hello-NAME (busybox nc listens on an IPv6 socket taking IPv4 too)."""
    h.docker("run", "-d", "--name", name, "--network", network, "--label", f"app={name}", *opts, IMAGE,
             "sh", "-c", f"while true; do echo hello-{name} | nc -l -p 80; done & sleep 100000")
    wait_open(h, name)


def tcp(run, address: str, port: int, tries: int = 3) -> str:
    """The server's answer ("" if none), retried: the busybox loop has gaps between connections."""
    for _ in range(tries):
        answer = run(["busybox", "nc", "-w", "2", address, str(port)], check=False, input="").stdout.strip()
        if answer:
            return answer
        time.sleep(0.2)
    return ""


def addresses(h: SimHost, container: str, network: str) -> tuple[str, str]:
    settings = h.docker_json("inspect", container)[0]["NetworkSettings"]["Networks"][network]
    return settings["IPAddress"], settings["GlobalIPv6Address"]


def apply(h: SimHost, doc: dict) -> None:
    canal(h, "policy", "apply", "-f", "-", input=json.dumps(doc), raw=True)


def only_from(nets: list[str]) -> dict:
    return {"apiVersion": "canal/v1", "kind": "NetworkPolicy", "metadata": {"name": "srv-in", "network": "dual"},
            "spec": {"selector": "app == 'srv'", "ingress": [{"action": "Allow", "source": {"nets": nets}}]}}


def test_published_port_over_ipv6_from_another_host_this_host_and_containers(b):
    h, client = b
    h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "--ipv6", "dual")
    serve(h, "srv", "dual", "-p", "8080:80")
    srv4, srv6 = addresses(h, "srv", "dual")
    assert ipaddress.IPv6Address(srv6) in ipaddress.IPv6Network(NETWORK6)
    assert tcp(client.exec, HOST_IP, 8080) == "hello-srv"  # IPv4, as before
    assert tcp(client.exec, HOST_IP6, 8080) == "hello-srv"  # IPv6 from another machine
    assert tcp(h.exec, HOST_IP6, 8080) == "hello-srv"  # the host, on its own IPv6 address
    # The client's address is kept (no SNAT), as for IPv4.
    flows = h.exec(["conntrack", "-L", "-f", "ipv6", "-p", "tcp", "--orig-src", CLIENT_IP6]).stdout
    assert re.search(rf"src={re.escape(srv6)} dst={re.escape(CLIENT_IP6)} sport=80 ", flows), flows
    # Containers reach it through the host's IPv6 address (hairpin), the publisher itself included.
    serve(h, "other", "dual")
    assert h.docker("exec", "other", "nc", "-w", "2", HOST_IP6, "8080").stdout.strip() == "hello-srv"
    assert h.docker("exec", "srv", "nc", "-w", "2", HOST_IP6, "8080").stdout.strip() == "hello-srv"
    nat6 = [r for r in h.exec(["ip6tables-nft-save", "-t", "nat"]).stdout.splitlines() if r.startswith("-A CANAL-DNAT")]
    assert nat6[1:] == [f"-A CANAL-DNAT -p tcp -m tcp --dport 8080 -j DNAT --to-destination [{srv6}]:80"], nat6
    assert canal(h, "port", "srv", raw=True).stdout.split("\n")[:2] == ["80/tcp -> 0.0.0.0:8080", "80/tcp -> [::]:8080"]
    # The IPv6 port is held too: a host process cannot take [::]:8080 (IPV6_V6ONLY) from under it.
    taken = h.exec(["python3", "-c", "import socket; s=socket.socket(socket.AF_INET6); "
                    "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1); s.bind(('::', 8080))"], check=False)
    assert taken.returncode != 0 and "Address already in use" in taken.stderr, taken.stderr
    # A network without --ipv6: published over IPv4 only, nothing over IPv6.
    h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "plain")
    serve(h, "old", "plain", "-p", "8081:80")
    assert tcp(client.exec, HOST_IP, 8081) == "hello-old"
    assert tcp(client.exec, HOST_IP6, 8081, tries=1) == ""
    # [::]:PORT publishes over IPv6 only; on a network without --ipv6 it is refused, named.
    serve(h, "six", "dual", "-p", "[::]:8082:80")
    assert tcp(client.exec, HOST_IP6, 8082) == "hello-six" and tcp(client.exec, HOST_IP, 8082, tries=1) == ""
    proc = h.docker("run", "-d", "--name", "nosix", "--network", "plain", "-p", "[::]:8083:80", IMAGE, "sleep", "1000",
                    check=False)
    assert proc.returncode != 0 and "no IPv6 address" in proc.stderr, proc.stderr


def test_policy_decides_published_traffic_over_ipv6_as_over_ipv4(b):
    h, client = b
    h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "--ipv6", "dual")
    serve(h, "srv", "dual", "-p", "8080:80")
    assert tcp(client.exec, HOST_IP, 8080) == "hello-srv" and tcp(client.exec, HOST_IP6, 8080) == "hello-srv"  # control
    apply(h, only_from(["198.18.0.3/32", "2001:2::3/128"]))  # someone else: the client meets the default deny

    def both() -> tuple[str, str]:
        return tcp(client.exec, HOST_IP, 8080, tries=1), tcp(client.exec, HOST_IP6, 8080, tries=1)
    wait_until(lambda: both() == ("", ""), timeout=10, what="published port closed to the client in both families")
    v6 = canal(h, "policy", "explain", CLIENT_IP6, "srv", "--port", "80", "--published", "-o", "json")
    assert v6["verdict"] == "denied" and v6["flow"]["family"] == 6 and v6["ingress"]["reason"] == "default-deny"

    def denied() -> int:  # `canal policy stats` sums both families' counters
        rows = canal(h, "policy", "stats", "-o", "json")["implicit"]
        return sum(r["packets"] for r in rows if r["container"] == "srv" and r["outcome"] == "default-deny")
    before = denied()
    assert tcp(client.exec, HOST_IP6, 8080, tries=1) == ""  # IPv6 only
    assert denied() > before
    apply(h, only_from(["198.18.0.2/32", f"{CLIENT_IP6}/128"]))
    wait_until(lambda: both() == ("hello-srv", "hello-srv"), timeout=10, what="published port open to the client again")
    v6 = canal(h, "policy", "explain", CLIENT_IP6, "srv", "--port", "80", "--published", "-o", "json")
    assert v6["verdict"] == "allowed" and v6["ingress"]["policy"] == "dual/srv-in"


def metrics(h: SimHost) -> dict:
    out = {}
    for family in text_string_to_metric_families(canal(h, "metrics", raw=True).stdout):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_endpoint_list_status_metrics_and_diagnose_show_both_families(b, tmp_path):
    h, _ = b
    h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "--ipv6", "dual")
    h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "plain")
    serve(h, "alpha", "dual")
    serve(h, "gamma", "plain")
    apply(h, {"apiVersion": "canal/v1", "kind": "NetworkPolicy", "metadata": {"name": "a-in", "network": "dual"},
              "spec": {"selector": "app == 'alpha'", "ingress": [{"action": "Allow", "source": {"selector": "app == 'alpha'"}}]}})
    a4, a6 = addresses(h, "alpha", "dual")
    rows = {r["container"]: r for r in canal(h, "endpoint", "list", "-o", "json")}
    assert (rows["alpha"]["ip"], rows["alpha"]["ip6"]) == (a4, a6) and rows["gamma"]["ip6"] is None
    table = canal(h, "endpoint", "list", raw=True).stdout
    assert "IP6" in table.splitlines()[0].split() and a6 in table.split()
    status = canal(h, "status", "-o", "json")
    assert status["network6"] == NETWORK6 and status["endpoints"] == 2 and status["endpoints6"] == 1

    def ready() -> dict | None:
        m = metrics(h)
        return m if m.get(("canal_ipset_members_by_family", (("family", "inet6"),)), 0) >= 2 else None
    m = wait_until(ready, timeout=10, what="the IPv6 sets programmed")
    assert m[("canal_ipv6_local_endpoints", ())] == 1 and m[("canal_cluster_num_ipv6_workload_endpoints", ())] == 1
    assert m[("canal_ipsets_by_family", (("family", "inet6"),))] >= 2  # canal-6nets and the selector set
    assert m[("canal_ip6tables_rules", ())] > 0
    # The kernel agrees: the selector's IPv6 set holds a's /128.
    sets = h.exec(["ipset", "list", "-o", "save"]).stdout.splitlines()
    six = {line.split()[1] for line in sets if line.startswith("create canal-6") and "family inet6" in line}
    members = {line.split()[2] for line in sets if line.startswith("add ") and line.split()[1] in six}
    assert ipaddress.IPv6Address(a6) in {ipaddress.ip_network(x, strict=False).network_address for x in members
                                          if ipaddress.ip_network(x, strict=False).prefixlen == 128}
    out = tmp_path / "bundle.tar.gz"
    h.exec([h.plugin_argv()[0], "-m", "canal", "diagnose", "-o", str(out)], env={"PYTHONPATH": PLUGIN_DIR})
    with tarfile.open(out) as tar:
        files = {m.name.split("/", 1)[1]: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
    assert "CANAL-FORWARD" in files["kernel/ip6tables-nft.txt"]
    assert any(line.startswith("create canal-6") for line in files["kernel/ipsets.txt"].splitlines())
    assert any(line.split()[0] == a6 for line in files["kernel/routes6-proto101.txt"].splitlines() if line.strip()), files[
        "kernel/routes6-proto101.txt"]
    assert json.loads(files["status.json"])["endpoints6"] == 1
