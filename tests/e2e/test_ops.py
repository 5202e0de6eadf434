"""Issue 11 (operability) end to end on two etcd hosts: `canal status` exit codes with etcd
up and stopped and with the plugin down; `canal uninstall` refusing while a canal container is
on the host (naming it), then leaving nothing of Canal in the host's kernel or in etcd, and
the peer forgetting the host (its route, neighbour and FDB entry to it gone)."""

from __future__ import annotations

import ipaddress
import json
import tarfile
from pathlib import Path

import pytest
from e2e_support import IMAGE, canal_leftovers, clear, etcd_cluster, etcd_plugin_args, wait_open

from testbed import Etcd, SimHost, wait_until

TTL = 8
PLUGIN = str(Path(__file__).resolve().parents[2] / "plugin")


def plugin_args(host: SimHost, etcd: Etcd) -> list[str]:
    return etcd_plugin_args(host, etcd, ttl=TTL)


@pytest.fixture(scope="module")
def cluster():
    with etcd_cluster(plugin_args) as bed:
        yield bed


@pytest.fixture
def c(cluster):
    _ul, etcd, (h1, h2) = cluster
    yield etcd, h1, h2
    if not etcd.running():
        etcd.start()
    for h in (h1, h2):
        if not h.plugin_running():
            h.start_plugin(plugin_args(h, etcd))
        clear(h)


def canal(h: SimHost, *args: str):
    """The CLI inside host h (this worktree's code), not checked: exit codes are the point."""
    return h.exec([h.plugin_argv()[0], "-m", "canal", *args], check=False, env={"PYTHONPATH": PLUGIN}, timeout=60)


def status(h: SimHost):
    done = canal(h, "status", "-o", "json")
    return done.returncode, (json.loads(done.stdout) if done.stdout.strip() else None), done.stderr


def test_status_exit_codes_etcd_up_stopped_and_plugin_down(c):
    etcd, h1, _h2 = c
    wait_until(lambda: status(h1)[0] == 0, timeout=20, what="h1 healthy")
    code, st, _ = status(h1)
    assert st["health"] == "healthy" and st["problems"] == [] and st["datastore_reachable"] is True
    assert st["lease"]["subnet"] and st["lease"]["expires_in"] > 0
    assert [p["public_ip"] for p in st["peers"]] == ["198.18.0.2"]
    table = canal(h1, "status")
    assert table.returncode == 0 and "health" in table.stdout
    etcd.stop()
    try:
        code, st, _ = status(h1)
        assert code == 1, st
        assert st["health"] == "unhealthy" and st["datastore_reachable"] is False
        assert any("datastore etcd unreachable" in p for p in st["problems"]), st["problems"]
        table = canal(h1, "status")
        assert table.returncode == 1 and "unreachable" in table.stdout
    finally:
        etcd.start()
    wait_until(lambda: status(h1)[0] == 0, timeout=30, what="h1 healthy again after etcd came back")
    h1.stop_plugin()
    code, st, err = status(h1)
    assert code == 2 and st is None and "cannot reach the canal plugin" in err


def test_json_logs_from_a_real_plugin(c):
    etcd, h1, _h2 = c
    h1.stop_plugin()
    start = h1.plugin_log.stat().st_size if h1.plugin_log.exists() else 0
    h1.start_plugin([*plugin_args(h1, etcd), "--log-format", "json"])
    wait_until(lambda: status(h1)[0] == 0, timeout=20, what="h1 healthy")
    h1.stop_plugin()
    lines = [line for line in h1.plugin_log.read_text()[start:].splitlines()
             if line.strip() and not line.startswith("==== ")]  # the test bed's own markers
    records = [json.loads(line) for line in lines]  # every line, gunicorn's too, is one JSON object
    assert any(r["logger"].startswith("gunicorn") for r in records)
    assert any(r["logger"].startswith("canal") and "owns subnet" in r["message"] for r in records)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)


def test_diagnose_on_a_live_host(c, tmp_path):
    _etcd, h1, _h2 = c
    h1.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "diagnet")
    h1.docker("run", "-d", "--name", "diag", "--network", "diagnet", IMAGE, "sleep", "1000")
    wait_open(h1, "diag")
    out = tmp_path / "b.tar.gz"
    done = canal(h1, "diagnose", "-o", str(out))
    assert done.returncode == 0, done.stderr
    with tarfile.open(out) as tar:
        files = {m.name.split("/", 1)[1]: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
    assert "CANAL-" in files["kernel/iptables-nft.txt"]
    assert "canal-" in files["kernel/ipsets.txt"]
    assert "proto 101" in files["kernel/routes-proto101.txt"] or files["kernel/routes-proto101.txt"].strip()
    assert "198.18.0.2" in files["kernel/flannel.1-fdb.txt"]
    assert json.loads(files["status.json"])["host"] == "h1"
    assert len(json.loads(files["records.json"])["endpoints"]) == 1
    assert files["logs.jsonl"].strip() and all(json.loads(line)["level"] for line in files["logs.jsonl"].splitlines())


def plant_leftovers(h: SimHost) -> None:
    """Canal objects outside any endpoint: chains and jumps (both families), an ipset, a proto
    101 route and a veth, as a crashed plugin would leave them."""
    for tool in ("iptables-nft", "ip6tables-nft"):
        h.exec([tool, "-N", "CANAL-LEFT"])
        h.exec([tool, "-A", "CANAL-LEFT", "-j", "RETURN"])
        h.exec([tool, "-I", "FORWARD", "-j", "CANAL-LEFT"])
        h.exec([tool, "-t", "nat", "-N", "CANAL-LEFT-NAT"])
    h.exec(["ipset", "create", "canal-left", "hash:ip"])
    h.ip("link", "add", "cnlleftover01", "type", "veth", "peer", "name", "cnpleftover01")
    h.ip("link", "set", "cnlleftover01", "up")
    h.ip("route", "add", "100.64.250.5/32", "dev", "cnlleftover01", "proto", "101")


def peer_knows(h1: SimHost, h2: SimHost, subnet: str) -> bool:
    routes = h1.ip("route", "show", "dev", "flannel.1").stdout
    fdb = h1.exec(["bridge", "fdb", "show", "dev", "flannel.1"]).stdout
    return subnet in routes or h2.address in fdb


def test_uninstall_refuses_then_removes_everything_and_the_peer_forgets(c):
    etcd, h1, h2 = c
    wait_until(lambda: status(h2)[0] == 0, timeout=20, what="h2 healthy")
    subnet2 = status(h2)[1]["lease"]["subnet"]
    wait_until(lambda: peer_knows(h1, h2, subnet2), timeout=15, what="h1 routes to h2")
    h2.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "unet")
    h2.docker("run", "-d", "--name", "keepme", "--network", "unet", IMAGE, "sleep", "1000")
    wait_open(h2, "keepme")

    running = canal(h2, "uninstall", *plugin_args(h2, etcd))
    assert running.returncode == 1 and "plugin is running" in running.stderr

    h2.stop_plugin()
    refused = canal(h2, "uninstall", *plugin_args(h2, etcd))
    assert refused.returncode == 1 and "keepme" in refused.stderr, refused.stderr
    assert canal_leftovers(h2)["iptables"]  # the refusal removed nothing

    h2.start_plugin(plugin_args(h2, etcd))
    clear(h2)
    h2.stop_plugin()
    plant_leftovers(h2)  # what a crashed plugin (SIGKILL mid-way) can leave: every kind of object
    before = canal_leftovers(h2)
    assert before["iptables"] and before["ipsets"] and before["routes"] and before["veths"], before
    dry = canal(h2, "uninstall", "--dry-run", *plugin_args(h2, etcd))
    assert dry.returncode == 0 and "would release subnet lease" in dry.stdout, dry.stdout
    assert canal_leftovers(h2) == before  # a dry run removes nothing
    done = canal(h2, "uninstall", *plugin_args(h2, etcd))
    assert done.returncode == 0, done.stderr
    assert "release subnet lease" in done.stdout and "delete flannel.1" in done.stdout

    left = canal_leftovers(h2)
    assert left == {"veths": [], "routes": [], "iptables": [], "ipsets": []}, left
    for tool in ("iptables-legacy-save", "ip6tables-nft-save", "ip6tables-legacy-save"):
        assert "CANAL" not in h2.exec([tool], check=False).stdout, tool
    assert "flannel" not in h2.ip("-o", "link").stdout
    assert h2.ip("route", "show", "table", "all", "proto", "102").stdout.strip() == ""
    assert h2.exec(["ipset", "list", "-n"]).stdout.split() == []
    keys = etcd.etcdctl("get", "--prefix", "--keys-only", "/").stdout.split()
    assert "/canal/v1/hosts/h2" not in keys and not [k for k in keys if "/h2/" in k]
    leases = etcd.etcdctl("get", "--prefix", "/coreos.com/network/subnets/").stdout
    assert h2.address not in leases and subnet2.replace("/", "-") not in leases
    # the peer forgets it on its next pass (not after the lease TTL would have run out)
    wait_until(lambda: not peer_knows(h1, h2, subnet2), timeout=10, what="h1 forgot h2")
    assert str(ipaddress.ip_network(subnet2).network_address) not in h1.ip("neigh", "show", "dev", "flannel.1").stdout
    again = canal(h2, "uninstall", *plugin_args(h2, etcd))
    assert again.returncode == 0 and "nothing of canal left" in again.stdout
