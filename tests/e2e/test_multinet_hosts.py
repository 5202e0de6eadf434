"""Containers on several canal networks across two hosts (etcd, VXLAN): reachability from and
to the multi-network container, per-network policy on its interfaces, isolation, restart."""

from __future__ import annotations

import json

import pytest
from e2e_support import (
    canal,
    conntrack_sources,
    etcd_cluster,
    etcd_plugin_args,
    fetch,
    ip_of,
    reset,
    serve_hello,
    wait_open,
)

from testbed import Etcd, SimHost, wait_until


def plugin_args(host: SimHost, etcd: Etcd) -> list[str]:
    return etcd_plugin_args(host, etcd)


@pytest.fixture(scope="module")
def cluster():
    with etcd_cluster(plugin_args) as bed:
        yield bed


@pytest.fixture
def c(cluster):
    ul, etcd, (h1, h2) = cluster
    yield etcd, h1, h2
    for h in (h1, h2):
        reset(h, plugin_args(h, etcd))


def net(*pairs: tuple[SimHost, str], subnet: str = "") -> None:
    for h, name in pairs:
        h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal",
                 *(("--subnet", subnet) if subnet else ()), name)






def eventually_fetch(h: SimHost, client: str, address: str, expected: str) -> None:
    wait_until(lambda: fetch(h, client, address) == expected, timeout=15, what=f"{client} -> {address}: {expected!r}")




def apply(h: SimHost, *docs: dict) -> None:
    canal(h, "policy", "apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs), raw=True)


def setup_proxy(etcd, h1, h2, subnet_front: str = "", subnet_back: str = ""):
    net((h1, "front"), (h2, "front"), subnet=subnet_front)
    net((h1, "back"), (h2, "back"), subnet=subnet_back)
    serve_hello(h2, "web", "front", "--label", "app=web")
    serve_hello(h2, "db", "back", "--label", "app=db")
    serve_hello(h1, "proxy", "front", "--label", "app=proxy")
    h1.docker("network", "connect", "back", "proxy")
    wait_open(h1, "proxy")
    return ip_of(h2, "web", "front"), ip_of(h2, "db", "back"), ip_of(h1, "proxy", "front"), ip_of(h1, "proxy", "back")


def test_across_hosts_each_network_from_its_own_address(c):
    etcd, h1, h2 = c
    web, db, proxy_front, proxy_back = setup_proxy(etcd, h1, h2)
    eventually_fetch(h1, "proxy", web, "hello-web")
    eventually_fetch(h1, "proxy", db, "hello-db")
    assert conntrack_sources(h2, web) == {proxy_front}
    assert conntrack_sources(h2, db) == {proxy_back}
    # Replies and connections towards the proxy, on each network's address.
    eventually_fetch(h2, "web", proxy_front, "hello-proxy")
    eventually_fetch(h2, "db", proxy_back, "hello-proxy")
    # Isolation between members that share no network (control: the same servers answer
    # the proxy above), and the proxy's other address is not theirs to reach.
    assert fetch(h2, "web", db) == ""
    assert fetch(h2, "db", web) == ""
    assert fetch(h2, "web", proxy_back) == ""
    assert fetch(h2, "db", proxy_front) == ""


def test_distinct_subnets_are_routed_by_prefix(c):
    """Networks with their own --subnet: one route per pool inside the container, not per member."""
    etcd, h1, h2 = c
    web, db, _, _ = setup_proxy(etcd, h1, h2, subnet_front="100.65.1.0/24", subnet_back="100.65.2.0/24")
    eventually_fetch(h1, "proxy", web, "hello-web")
    eventually_fetch(h1, "proxy", db, "hello-db")
    table = h1.docker("exec", "proxy", "ip", "route").stdout
    assert "100.65.1.0/24 via 169.254.1." in table and "100.65.2.0/24 via 169.254.1." in table, table
    destinations = {line.split()[0] for line in table.splitlines() if line.strip()}
    assert web not in destinations and db not in destinations, table  # exact: 100.65.1.1 is not 100.65.1.13


def test_network_policy_applies_on_that_networks_interface(c):
    """A NetworkPolicy of `back` selecting the proxy governs its back interface only; one of
    `front` its front interface only."""
    etcd, h1, h2 = c
    web, db, proxy_front, proxy_back = setup_proxy(etcd, h1, h2)
    eventually_fetch(h1, "proxy", db, "hello-db")  # control: open before the policies
    eventually_fetch(h2, "web", proxy_front, "hello-proxy")
    apply(h1, {"apiVersion": "canal/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "proxy-out", "network": "back"},
               "spec": {"selector": "app == 'proxy'", "types": ["Egress"],
                        "egress": [{"action": "Deny", "destination": {"selector": "app == 'db'"}}]}},
          {"apiVersion": "canal/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "proxy-in", "network": "front"},
           "spec": {"selector": "app == 'proxy'", "types": ["Ingress"],
                    "ingress": [{"action": "Deny", "source": {"selector": "app == 'web'"}}]}})
    eventually_fetch(h1, "proxy", db, "")
    eventually_fetch(h2, "web", proxy_front, "")
    # The other interface of the proxy is not governed by them.
    assert fetch(h1, "proxy", web) == "hello-web"
    assert fetch(h2, "db", proxy_back) == "hello-proxy"


def test_plugin_restart_keeps_and_resumes_routes(c):
    etcd, h1, h2 = c
    web, db, _, _ = setup_proxy(etcd, h1, h2)
    eventually_fetch(h1, "proxy", db, "hello-db")
    h1.stop_plugin()
    # Running containers keep talking while the plugin is down.
    assert fetch(h1, "proxy", db) == "hello-db"
    assert fetch(h1, "proxy", web) == "hello-web"
    h1.start_plugin(plugin_args(h1, etcd))
    # A member that comes while the plugin was down, or after, is routed once it is back.
    serve_hello(h2, "db2", "back")
    eventually_fetch(h1, "proxy", ip_of(h2, "db2", "back"), "hello-db2")
    assert fetch(h1, "proxy", web) == "hello-web"
