"""Issue 4 end to end on one host: label policy on real containers, real packets, live."""

from __future__ import annotations

import json
import time

import pytest
from e2e_support import CLUSTER, hosted, IMAGE, reset, wait_open

from testbed import SimHost, wait_until

PLUGIN = ["--network", CLUSTER, "--log-level", "debug", "--resync-interval", "2"]


@pytest.fixture(scope="module")
def host(underlay):
    with hosted(underlay, "p1", "198.18.0.1", PLUGIN) as h:
        yield h


@pytest.fixture
def h(host):
    yield host
    reset(host, PLUGIN)


def canal(h: SimHost, *args: str, input: str | None = None, raw: bool = False, check: bool = True):
    proc = h.exec([h.plugin_argv()[0], "-m", "canal", *args], input=input, check=check)
    return proc if raw or not check else json.loads(proc.stdout)


def apply(h: SimHost, *docs: dict) -> str:
    return canal(h, "policy", "apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs), raw=True).stdout


def policy(name: str, spec: dict, network: str | None = "appnet") -> dict:
    kind = "NetworkPolicy" if network else "GlobalNetworkPolicy"
    meta = {"name": name, **({"network": network} if network else {})}
    return {"apiVersion": "canal/v1", "kind": kind, "metadata": meta, "spec": spec}


def net(h, name, *opts):
    h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", *opts, name)


def server(h, name, network, labels=(), ports=(5432,)):
    """A container answering 'pong-NAME' on each TCP port."""
    loops = " & ".join(f"while true; do echo pong-{name} | nc -l -p {p}; done" for p in ports)
    opts = [x for label in labels for x in ("--label", label)]
    h.docker("run", "-d", "--name", name, "--network", network, *opts, IMAGE, "sh", "-c", f"{loops} & sleep 100000")
    wait_open(h, name)


def client(h, name, network, labels=()):
    opts = [x for label in labels for x in ("--label", label)]
    h.docker("run", "-d", "--name", name, "--network", network, *opts, IMAGE, "sleep", "100000")
    wait_open(h, name)


def ip(h, container):
    networks = h.docker_json("inspect", container)[0]["NetworkSettings"]["Networks"]
    return next(iter(networks.values()))["IPAddress"]


def tcp(h, src, dst, port=5432) -> bool:
    out = h.container_exec(src, "sh", "-c", f"nc -w 1 {ip(h, dst)} {port} </dev/null", check=False, timeout=20).stdout
    return f"pong-{dst}" in out


def pings(h, src, target) -> bool:
    return h.container_exec(src, "ping", "-c1", "-W1", target, check=False).returncode == 0


def labelled(h, *containers):
    """Wait until the plugin learned these containers' labels (until then: fail closed)."""
    def known():
        rows = canal(h, "endpoint", "list", "-o", "json")
        names = {r["container"] for r in rows if r["labels"] is not None}
        return set(containers) <= names
    wait_until(known, timeout=10)


def eventually(check, timeout=5.0) -> None:
    wait_until(check, timeout=timeout)


def test_default_isolation_between_networks(h, underlay):
    net(h, "appnet")
    net(h, "other")
    server(h, "db", "appnet")
    client(h, "web", "appnet")
    client(h, "stranger", "other")
    assert tcp(h, "web", "db")
    assert pings(h, "web", ip(h, "db"))
    assert not tcp(h, "stranger", "db")
    assert not pings(h, "stranger", ip(h, "db"))
    assert pings(h, "stranger", underlay.gateway_ip)  # egress outside follows NAT, not policy
    # A GlobalNetworkPolicy is how two networks are allowed to talk.
    apply(h, policy("other-to-db", {"selector": "canal.network == 'appnet'", "ingress": [
        {"action": "Allow", "source": {"selector": "canal.network == 'other'"}},
        {"action": "Allow", "source": {"selector": "canal.network == 'appnet'"}}]}, network=None))
    labelled(h, "db", "web", "stranger")
    eventually(lambda: tcp(h, "stranger", "db"))
    assert tcp(h, "web", "db")


def test_db_from_web_ports_and_live_changes(h):
    net(h, "appnet")
    server(h, "db", "appnet", ["role=db"], ports=(5432, 5433, 8080))
    client(h, "web", "appnet", ["role=web"])
    client(h, "other", "appnet", ["role=batch"])
    labelled(h, "db", "web", "other")
    out = apply(h, policy("db-from-web", {"order": 100, "selector": "role == 'db'", "types": ["Ingress"], "ingress": [
        {"action": "Allow", "protocol": "TCP", "source": {"selector": "role == 'web'"},
         "destination": {"ports": [5432, "8000:8080"]}}]}))
    assert "NetworkPolicy appnet/db-from-web created" in out
    assert tcp(h, "web", "db", 5432) and tcp(h, "web", "db", 8080)
    assert not tcp(h, "web", "db", 5433)  # not in the ports
    assert not tcp(h, "other", "db", 5432)  # wrong label
    assert not pings(h, "web", ip(h, "db"))  # ICMP not allowed once a policy selects db
    rows = {r["container"]: r for r in canal(h, "endpoint", "list", "-o", "json")}
    assert rows["db"]["policies"] == ["appnet/db-from-web"] and rows["web"]["policies"] == []
    assert rows["db"]["labels"]["role"] == "db"
    # Live update: let role=batch in too; then delete: back to the network's default (all in).
    apply(h, policy("db-from-web", {"order": 100, "selector": "role == 'db'", "ingress": [
        {"action": "Allow", "protocol": "TCP", "source": {"selector": "role in {'web', 'batch'}"}}]}))
    eventually(lambda: tcp(h, "other", "db", 5432))
    canal(h, "policy", "delete", "db-from-web", raw=True)
    eventually(lambda: pings(h, "web", ip(h, "db")))
    assert tcp(h, "other", "db", 5433)


def test_order_deny_and_pass(h):
    net(h, "appnet")
    server(h, "db", "appnet", ["role=db"])
    client(h, "web", "appnet", ["role=web"])
    labelled(h, "db", "web")
    allow = {"action": "Allow", "source": {"selector": "role == 'web'"}}
    deny = {"action": "Deny", "source": {"selector": "role == 'web'"}}
    apply(h, policy("deny-first", {"order": 10, "selector": "role == 'db'", "ingress": [deny]}),
          policy("allow-later", {"order": 20, "selector": "role == 'db'", "ingress": [allow]}))
    assert not tcp(h, "web", "db")
    # Pass, ordered before both, skips the remaining policies: the network profile decides.
    apply(h, policy("pass-web", {"order": 5, "selector": "role == 'db'", "ingress": [
        {"action": "Pass", "source": {"selector": "role == 'web'"}}]}))
    eventually(lambda: tcp(h, "web", "db"))
    canal(h, "policy", "delete", "pass-web", raw=True)
    apply(h, policy("deny-first", {"order": 30, "selector": "role == 'db'", "ingress": [deny]}))
    eventually(lambda: tcp(h, "web", "db"))  # now the Allow (order 20) comes first


def test_egress_policy_and_log(h, underlay):
    net(h, "appnet")
    client(h, "locked", "appnet", ["egress=locked"])
    client(h, "free", "appnet")
    labelled(h, "locked", "free")
    apply(h, policy("no-underlay", {"selector": "egress == 'locked'", "types": ["Egress"], "egress": [
        {"action": "Log", "destination": {"nets": [f"{underlay.gateway_ip}/32"]}},
        {"action": "Deny", "destination": {"nets": [f"{underlay.gateway_ip}/32"]}},
        {"action": "Allow"}]}))
    assert not pings(h, "locked", underlay.gateway_ip)
    assert pings(h, "free", underlay.gateway_ip)
    assert pings(h, "locked", ip(h, "free"))


def test_spoofed_source_is_dropped(h):
    net(h, "appnet")
    client(h, "target", "appnet")
    h.docker("run", "-d", "--name", "spoofer", "--network", "appnet", "--cap-add", "NET_ADMIN", IMAGE, "sleep", "100000")
    wait_open(h, "spoofer")
    assert pings(h, "spoofer", ip(h, "target"))
    fake = "100.64.250.250"
    h.container_exec("spoofer", "ip", "addr", "add", f"{fake}/32", "dev", "eth0")
    spoofed = h.container_exec("spoofer", "ping", "-c1", "-W1", "-I", fake, ip(h, "target"), check=False)
    assert spoofed.returncode != 0


def test_tampered_chains_are_restored(h):
    net(h, "appnet")
    server(h, "db", "appnet", ["role=db"])
    client(h, "web", "appnet", ["role=web"])
    client(h, "other", "appnet", ["role=batch"])
    labelled(h, "db", "web", "other")
    apply(h, policy("db-from-web", {"selector": "role == 'db'", "ingress": [
        {"action": "Allow", "source": {"selector": "role == 'web'"}}]}))
    assert not tcp(h, "other", "db")
    save = h.exec(["iptables-nft-save", "-t", "filter"]).stdout
    tw = next(line.split()[1] for line in save.splitlines() if line.startswith("-A CANAL-TO-WL") and "-g CANAL-TW" in line and "-o" in line)
    h.exec(["iptables-nft", "-F", tw])  # someone flushes an endpoint's ingress chain
    h.exec(["ipset", "flush", next(s for s in h.exec(["ipset", "list", "-n"]).stdout.split() if s.startswith("canal-sel-"))])
    eventually(lambda: "-g CANAL-TW" in h.exec(["iptables-nft-save", "-t", "filter"]).stdout, timeout=10)
    eventually(lambda: tcp(h, "web", "db") and not tcp(h, "other", "db"), timeout=10)


def test_invalid_policy_is_refused_whole(h):
    net(h, "appnet")
    good = policy("fine", {"selector": "role == 'db'", "ingress": [{"action": "Allow"}]})
    bad = policy("broken", {"selector": "role == ", "ingress": [{"action": "Allow"}]})
    proc = canal(h, "policy", "apply", "-f", "-", input=json.dumps([good, bad]), check=False)
    assert proc.returncode == 2
    assert "document 2 (broken): spec.selector" in proc.stderr and "column" in proc.stderr
    assert canal(h, "policy", "list", "-o", "json") == []
    typo = policy("typo", {"selectr": "all()"})
    proc = canal(h, "policy", "apply", "-f", "-", input=json.dumps(typo), check=False)
    assert proc.returncode == 2 and "selectr" in proc.stderr


def test_unknown_labels_fail_closed_then_open(h):
    """A new container under a policy: nothing a policy could deny passes before its labels are
    known; once known, the policy decides. (The timing is measured by bench/policy.py.)"""
    net(h, "appnet")
    server(h, "db", "appnet", ["role=db"])
    labelled(h, "db")
    apply(h, policy("db-from-web", {"selector": "role == 'db'", "ingress": [
        {"action": "Allow", "source": {"selector": "role == 'web'"}}]}))
    started = time.monotonic()
    client(h, "web", "appnet", ["role=web"])
    eventually(lambda: tcp(h, "web", "db"), timeout=10)
    assert time.monotonic() - started < 10
