"""Issue 13 across two real hosts sharing one etcd: a dual-stack canal network whose IPv6
addresses (one cluster-wide pool) are routed host to host through the IPv4 VXLAN tunnel as
/128 route records; policy holds for the remote IPv6 flows as for IPv4."""

from __future__ import annotations

import json

import pytest
from e2e_support import etcd_cluster, etcd_plugin_args, IMAGE, reset, wait_open

from testbed import Etcd, SimHost, wait_until


def plugin_args(host: SimHost, etcd: Etcd) -> list[str]:
    return etcd_plugin_args(host, etcd)


@pytest.fixture(scope="module")
def cluster():
    with etcd_cluster(plugin_args) as bed:
        yield bed


@pytest.fixture
def c(cluster):
    _, etcd, (h1, h2) = cluster
    yield etcd, h1, h2
    for h in (h1, h2):
        reset(h, plugin_args(h, etcd))
    for h in (h1, h2):
        wait_until(lambda h=h: h.ip("-6", "route", "show", "proto", "101").stdout.strip() == "", timeout=15,
                   what=f"{h.name}'s IPv6 routes gone")


def canal(h: SimHost, *args: str, input: str | None = None, check: bool = True):
    return h.exec([h.plugin_argv()[0], "-m", "canal", *args], input=input, check=check)


def net(h: SimHost) -> None:
    h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", "--ipv6", "--subnet", "fd00:6568::/64", "dual")


def server(h: SimHost, name: str, *opts: str) -> None:
    h.docker("run", "-d", "--name", name, "--network", "dual", *opts, IMAGE, "sh", "-c",
             f"while true; do echo pong-{name} | nc -l -p 80; done & sleep 100000")
    wait_open(h, name)


def addresses(h: SimHost, container: str) -> tuple[str, str]:
    settings = h.docker_json("inspect", container)[0]["NetworkSettings"]["Networks"]["dual"]
    return settings["IPAddress"], settings["GlobalIPv6Address"]


def answered(h: SimHost, client: str, address: str, name: str) -> bool:
    out = h.docker("exec", client, "sh", "-c", f"nc -w 2 {address} 80 </dev/null", check=False).stdout
    return out.strip() == f"pong-{name}"


def test_ipv6_across_hosts_and_policy(c):
    _, h1, h2 = c
    for h in (h1, h2):
        net(h)
    server(h2, "db", "--label", "role=db")
    server(h1, "web", "--label", "role=web")
    db4, db6 = addresses(h2, "db")
    web4, web6 = addresses(h1, "web")
    assert db6 != web6 and db6.startswith("fd00:6568::") and web6.startswith("fd00:6568::")
    # Each host learns the other's /128 from its route record and routes it into flannel.1.
    wait_until(lambda: db6 in h1.ip("-6", "route", "show", "proto", "101").stdout, timeout=15, what="h1 routes db's /128")
    wait_until(lambda: web6 in h2.ip("-6", "route", "show", "proto", "101").stdout, timeout=15, what="h2 routes web's /128")
    assert "dev flannel.1" in h1.ip("-6", "route", "show", db6).stdout
    assert answered(h1, "web", db4, "db") and answered(h1, "web", db6, "db")
    assert answered(h2, "db", web6, "web")
    assert h1.docker("exec", "web", "ping", "-6", "-c1", "-W2", db6, check=False).returncode == 0
    # A policy on h2's endpoint, written through h1's CLI, denies web over both families.
    doc = {"apiVersion": "canal/v1", "kind": "NetworkPolicy", "metadata": {"name": "deny-web", "network": "dual"},
           "spec": {"selector": "role == 'db'", "ingress": [
               {"action": "Deny", "source": {"selector": "role == 'web'"}}, {"action": "Allow"}]}}
    canal(h1, "policy", "apply", "-f", "-", input=json.dumps(doc))
    wait_until(lambda: not answered(h1, "web", db4, "db") and not answered(h1, "web", db6, "db"), timeout=15,
               what="web denied over both families across hosts")
    assert answered(h2, "db", web6, "web")  # the other direction: web's ingress has no policy
    canal(h1, "policy", "delete", "dual/deny-web")
    wait_until(lambda: answered(h1, "web", db4, "db") and answered(h1, "web", db6, "db"), timeout=15,
               what="web allowed again over both families")
    # The container leaving takes its /128 route record and the peer's route with it.
    h2.docker("rm", "-f", "db")
    wait_until(lambda: db6 not in h1.ip("-6", "route", "show", "proto", "101").stdout, timeout=15,
               what="h1 dropped db's /128")
