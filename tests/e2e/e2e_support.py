"""Helpers shared by the end-to-end modules (imported by name: `from e2e_support import ...`;
a conftest is not a module to import from)."""

from __future__ import annotations

import json
import subprocess
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from testbed import IMAGE, Etcd, SimHost, Underlay, wait_until

CLUSTER = "100.64.0.0/16"
# A short full-resync period, so repair of tampered state is seen within a test's patience.
PLUGIN_ARGS = ["--network", CLUSTER, "--log-level", "debug", "--resync-interval", "5"]


def etcd_plugin_args(host: SimHost, etcd: Etcd, *extra: str, ttl: int = 8, resync: float = 5) -> list[str]:
    """A plugin of a multi-host bed: etcd-backed, short lease and resync for the tests' patience."""
    return [
        "--datastore", "etcd", "--etcd-endpoints", etcd.endpoint, "--etcd-timeout", "2",
        "--network", CLUSTER, "--lease-ttl", str(ttl), "--resync-interval", f"{resync:g}",
        "--docker-host", f"unix://{host.docker_sock}", "--log-level", "debug", *extra,
    ]


@contextmanager
def etcd_cluster(plugin_args: Callable[[SimHost, Etcd], list[str]], count: int = 2,
                 flannel_config: dict[str, Any] | None = None, ipv6_underlay: bool = False,
                 ) -> Iterator[tuple[Underlay, Etcd, list[SimHost]]]:
    """An underlay, one etcd on it and `count` hosts (h1, h2, ...) each with dockerd, the test
    image and a plugin started with plugin_args(host, etcd); all removed afterwards.
    `flannel_config`: written before any plugin starts; `ipv6_underlay`: each host's too."""
    ul = Underlay()
    try:
        etcd = Etcd(ul)
        if flannel_config is not None:
            etcd.etcdctl("put", "/coreos.com/network/config", json.dumps(flannel_config))
        hosts = []
        for i in range(1, count + 1):
            h = SimHost(ul, f"h{i}", f"198.18.0.{i}")
            if ipv6_underlay:
                add_ipv6_underlay(h)  # before its plugin starts: it publishes the address then
            h.start_dockerd()
            h.load_image()
            h.start_plugin(plugin_args(h, etcd))
            hosts.append(h)
        yield ul, etcd, hosts
    finally:
        ul.close()


def start_host(ul: Underlay, name: str, ip: str, plugin_args: list[str]) -> SimHost:
    host = SimHost(ul, name, ip)
    # Also on Docker's default socket (in the host's private /run), where the plugin looks.
    host.start_dockerd(["-H", "unix:///run/docker.sock"])
    host.load_image()
    host.start_plugin(plugin_args)
    return host


@contextmanager
def hosted(ul: Underlay, name: str, ip: str, plugin_args: list[str]) -> Iterator[SimHost]:
    """A module's single host (start_host), closed afterwards also when the module fails."""
    host = start_host(ul, name, ip, plugin_args)
    try:
        yield host
    finally:
        host.close()


def reset(host: SimHost, plugin_args: list[str]) -> None:
    """After a test: the plugin running again (with the module's arguments), every policy
    deleted, every container and canal network removed (clear)."""
    if not host.plugin_running():
        host.start_plugin(plugin_args)
    for doc in canal(host, "policy", "list", "-o", "json"):
        meta = doc["metadata"]
        canal(host, "policy", "delete", f"{meta.get('network', 'global')}/{meta['name']}", raw=True)
    clear(host)


def canal(h: SimHost, *args: str, input: str | None = None, raw: bool = False) -> Any:
    """The `canal` CLI inside a host: its JSON output parsed, or the process itself (raw)."""
    proc = h.exec([h.plugin_argv()[0], "-m", "canal", *args], input=input)
    return proc if raw else json.loads(proc.stdout)


def canal_leftovers(host: SimHost) -> dict[str, list[str]]:
    """Everything of ours still in the host's kernel."""
    links = [l.split(":")[1].strip().split("@")[0] for l in host.ip("-o", "link").stdout.splitlines()]
    routes = host.ip("route", "show", "proto", "101").stdout.split("\n")
    chains = [l for l in host.exec(["iptables-nft-save"]).stdout.splitlines() if "CANAL" in l]
    sets = host.exec(["ipset", "list", "-n"]).stdout.split()
    return {
        "veths": [l for l in links if l.startswith(("cnl", "cnp"))],
        "routes": [r for r in routes if r.strip()],
        "iptables": chains,
        "ipsets": [s for s in sets if s.startswith("canal-")],
    }


def ipset_members(host: SimHost) -> dict[str, set[str]]:
    """Our ipsets as the host's kernel holds them: name -> members (exact, not substrings:
    10.0.0.1 must not be found in 10.0.0.12)."""
    sets: dict[str, set[str]] = {}
    for line in host.exec(["ipset", "save"]).stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "create" and parts[1].startswith("canal-"):
            sets[parts[1]] = set()
        elif len(parts) >= 3 and parts[0] == "add" and parts[1] in sets:
            sets[parts[1]].add(parts[2].removesuffix("/32"))
    return sets


def clear(host: SimHost, driver: str = "canal") -> None:
    """Remove every container and canal network of a host (through Docker, as a user would),
    then check the plugin logged no unexpected exception while the test ran."""
    ids = host.docker("ps", "-aq").stdout.split()
    if ids:
        host.docker("rm", "-f", *ids)
    nets = host.docker("network", "ls", "--filter", f"driver={driver}", "-q").stdout.split()
    if nets:
        host.docker("network", "rm", *nets)
    log = host.plugin_log.read_text(errors="replace") if host.plugin_log.exists() else ""
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:6000]


def endpoint_ids(host: SimHost, container: str) -> list[str]:
    networks = host.docker_json("inspect", container)[0]["NetworkSettings"]["Networks"] or {}
    return [n["EndpointID"] for n in networks.values() if n.get("EndpointID")]


def chain_open(rules: list[str]) -> bool:
    """An endpoint's egress chain no longer ends in the fail-closed DROP alone: it returns to
    the profile, runs a policy, or carries the datastore guard (all only once it is known)."""
    return any(r.endswith("-j RETURN") or "-j CANAL-PO-" in r or "--dports" in r for r in rules)


def is_open(host: SimHost, container: str) -> bool:
    """Every canal endpoint of the container has left the pending state: its egress chain
    (read from the kernel) no longer ends in the fail-closed DROP alone."""
    saved = host.exec(["iptables-nft-save", "-t", "filter"]).stdout.splitlines()
    for endpoint in endpoint_ids(host, container):
        rules = [line for line in saved if line.startswith(f"-A CANAL-FW-{endpoint[:12]} ")]
        if not rules:
            continue  # not a canal endpoint (a bridge network's)
        if not chain_open(rules):
            return False
    return True


def wait_open(host: SimHost, container: str, timeout: float = 10) -> None:
    """Until the plugin learned the container's labels and network name (closed before)."""
    wait_until(lambda: is_open(host, container), timeout=timeout, what=f"{container}'s endpoints open")


def run_open(host: SimHost, network: str, script: str, *opts: str, check: bool = True,
             timeout: float = 120) -> subprocess.CompletedProcess:
    """`docker run --rm ... sh -c SCRIPT`, with SCRIPT started only once the container's
    endpoint is open: an endpoint is closed until its labels are learned, which Docker lets
    a plugin do only after the container's process has started."""
    name = "gated-" + uuid.uuid4().hex[:10]
    gate = "while [ ! -e /tmp/.open ]; do sleep 0.02; done; "
    host.docker("run", "-d", "--name", name, "--network", network, *opts, IMAGE, "sh", "-c", gate + script)
    try:
        wait_open(host, name)
        host.docker("exec", name, "sh", "-c", ": > /tmp/.open")
        code = int(host.docker("wait", name, timeout=timeout).stdout.strip())
        logs = host.docker("logs", name)
        result = subprocess.CompletedProcess(["sh", "-c", script], code, logs.stdout, logs.stderr)
    finally:
        host.docker("rm", "-f", name, check=False)
    if check and code != 0:
        raise AssertionError(f"{script!r} exited {code}: {result.stdout}{result.stderr}")
    return result


def ip_of(host: SimHost, container: str, network: str) -> str:
    return host.docker_json("inspect", container)[0]["NetworkSettings"]["Networks"][network]["IPAddress"]


def serve_hello(host: SimHost, name: str, network: str, *opts: str) -> None:
    """A container answering `hello-NAME` on TCP 80 (open once its labels are learned)."""
    host.docker("run", "-d", "--name", name, "--network", network, *opts, IMAGE, "sh", "-c",
                f"while true; do echo hello-{name} | nc -l -p 80; done & sleep 100000")
    wait_open(host, name)


def fetch(host: SimHost, client: str, address: str, timeout: int = 2) -> str:
    """What `nc` in container `client` gets from address:80 ("" when nothing answers)."""
    proc = host.docker("exec", client, "sh", "-c", f"nc -w {timeout} {address} 80 </dev/null", check=False)
    return proc.stdout.strip()


def conntrack_sources(host: SimHost, address: str, port: int = 80) -> set[str]:
    """Source addresses of the TCP connections to address:port the host's conntrack has seen."""
    out = host.exec(["conntrack", "-L", "-p", "tcp", "--orig-dst", address, "--dport", str(port)], check=False).stdout
    return {f.split("=", 1)[1] for line in out.splitlines() for f in line.split()[:6] if f.startswith("src=")}


__all__ = ["CLUSTER", "IMAGE", "PLUGIN_ARGS", "canal_leftovers", "clear", "chain_open", "endpoint_ids", "etcd_cluster",
           "etcd_plugin_args", "fetch", "conntrack_sources", "ip_of", "is_open", "run_open", "serve_hello", "start_host",
           "wait_open"]


UNDERLAY6_PREFIX = "2001:2::"  # RFC 5180 benchmarking range (2001:2::/48): the optional IPv6 underlay


def underlay6_address(host: SimHost) -> str:
    """A host's IPv6 underlay address: 198.18.0.N -> 2001:2::N."""
    return f"{UNDERLAY6_PREFIX}{host.address.rsplit('.', 1)[1]}"


def add_ipv6_underlay(host: SimHost) -> str:
    """Give a host (before its plugin starts: the plugin reads it then) an IPv6 address on eth0
    and the test bridge one too (once): an IPv6 underlay beside the IPv4 one. No DAD, so the
    address is usable at once. Removed with the host's and the underlay's namespaces."""
    address = underlay6_address(host)
    host.ip("-6", "addr", "add", f"{address}/64", "dev", "eth0", "nodad")
    bridge = host.underlay.BRIDGE
    held = {(a["local"], a["prefixlen"]) for link in json.loads(host.underlay.ip("-j", "-6", "addr", "show", "dev", bridge).stdout)
            for a in link.get("addr_info", [])}
    if (f"{UNDERLAY6_PREFIX}fe", 64) not in held:
        host.underlay.ip("-6", "addr", "add", f"{UNDERLAY6_PREFIX}fe/64", "dev", bridge, "nodad")
    return address
