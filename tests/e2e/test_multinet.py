"""Containers on several canal networks, one host, real dockerd: `docker network connect` and
`disconnect`, routing by network inside the container, isolation and per-network policy."""

from __future__ import annotations


import pytest
from e2e_support import (
    canal_leftovers,
    CLUSTER,
    conntrack_sources,
    endpoint_ids,
    fetch,
    hosted,
    ip_of,
    ipset_members,
    reset,
    serve_hello,
    wait_open,
)

from testbed import SimHost, TestbedError, wait_until

PLUGIN = ["--network", CLUSTER, "--log-level", "debug", "--resync-interval", "2"]


@pytest.fixture(scope="module")
def host(underlay):
    with hosted(underlay, "m1", "198.18.0.1", PLUGIN) as h:
        yield h


@pytest.fixture
def h(host):
    yield host
    reset(host, PLUGIN)


def net(h: SimHost, *names: str) -> None:
    for name in names:
        h.docker("network", "create", "-d", "canal", "--ipam-driver", "canal", name)








def routes(h: SimHost, container: str) -> str:
    return h.docker("exec", container, "ip", "route").stdout


def test_connect_second_canal_network_reaches_both(h):
    """The issue's report: a proxy on front, connected to back, reaches members of both, each
    from the address of the network they are on (as their servers see it)."""
    net(h, "front", "back")
    serve_hello(h, "web", "front")
    serve_hello(h, "db", "back")
    serve_hello(h, "proxy", "front")
    h.docker("network", "connect", "back", "proxy")
    wait_open(h, "proxy")
    assert len(endpoint_ids(h, "proxy")) == 2
    assert fetch(h, "proxy", ip_of(h, "web", "front")) == "hello-web"
    assert fetch(h, "proxy", ip_of(h, "db", "back")) == "hello-db"
    # Sourced from the right network's address: the connections as the host's conntrack saw them.
    for server, network in (("web", "front"), ("db", "back")):
        assert conntrack_sources(h, ip_of(h, server, network)) == {ip_of(h, "proxy", network)}, routes(h, "proxy")
    # And the members of each network reach the proxy on that network's address, replies included.
    assert fetch(h, "web", ip_of(h, "proxy", "front")) == "hello-proxy"
    assert fetch(h, "db", ip_of(h, "proxy", "back")) == "hello-proxy"




def test_isolation_between_single_network_members(h):
    """web (front) and db (back) share no network: closed, while both reach the proxy (the
    positive control: the same servers answer a member of their own network)."""
    net(h, "front", "back")
    serve_hello(h, "web", "front")
    serve_hello(h, "db", "back")
    serve_hello(h, "proxy", "front")
    h.docker("network", "connect", "back", "proxy")
    wait_open(h, "proxy")
    assert fetch(h, "proxy", ip_of(h, "db", "back")) == "hello-db"  # control: db answers
    assert fetch(h, "web", ip_of(h, "db", "back")) == ""
    assert fetch(h, "db", ip_of(h, "web", "front")) == ""
    # The proxy's front address is not a member of back, whatever web tries.
    assert fetch(h, "db", ip_of(h, "proxy", "front")) == ""
    assert fetch(h, "web", ip_of(h, "proxy", "back")) == ""


def test_not_a_bridge_even_when_forwarding(h):
    """A multi-network container that forwards (NET_ADMIN, ip_forward=1) does not join its
    networks at L3: web (front) routes db's address via the proxy, and nothing arrives.
    Positive control: the proxy itself reaches db, and web reaches the proxy."""
    net(h, "front", "back")
    serve_hello(h, "db", "back")
    serve_hello(h, "proxy", "front", "--cap-add", "NET_ADMIN", "--sysctl", "net.ipv4.ip_forward=1")
    h.docker("network", "connect", "back", "proxy")
    serve_hello(h, "web", "front", "--cap-add", "NET_ADMIN")
    wait_open(h, "proxy")
    db, proxy_front = ip_of(h, "db", "back"), ip_of(h, "proxy", "front")
    assert fetch(h, "proxy", db) == "hello-db"
    assert fetch(h, "web", proxy_front) == "hello-proxy"
    # web's own next hop for db: the proxy (on-link through its gateway's proxy ARP, the only
    # way a packet for db can be handed to the host on web's interface).
    h.docker("exec", "web", "ip", "route", "add", f"{db}/32", "via", proxy_front, "dev", "eth0", "onlink")
    assert fetch(h, "web", db) == ""


def test_anti_spoofing_per_interface(h):
    """The proxy (NET_ADMIN) sends to db out of its back interface with its front address as
    source: dropped, so its front identity never reaches back members. Positive control: the
    same forced path with its back address gets db's answer."""
    net(h, "front", "back")
    serve_hello(h, "db", "back")
    serve_hello(h, "proxy", "front", "--cap-add", "NET_ADMIN")
    h.docker("network", "connect", "back", "proxy")
    wait_open(h, "proxy")
    db, front, back = ip_of(h, "db", "back"), ip_of(h, "proxy", "front"), ip_of(h, "proxy", "back")
    eth1, gateway = iface_of(h, "proxy", "back"), h.docker_json("inspect", "proxy")[0]["NetworkSettings"]["Networks"]["back"]["Gateway"]

    def forced(source: str) -> str:
        # A table of the test's own, ahead of Canal's: the agent leaves it alone.
        h.docker("exec", "proxy", "ip", "route", "replace", f"{db}/32", "via", gateway, "dev", eth1,
                 "src", source, "onlink", "table", "100")
        return fetch(h, "proxy", db)

    h.docker("exec", "proxy", "ip", "rule", "add", "to", f"{db}/32", "lookup", "100", "pref", "10")
    assert forced(back) == "hello-db"
    assert forced(front) == ""
    assert conntrack_sources(h, db) == {back}


def test_disconnect_and_reconnect_leave_nothing(h):
    net(h, "front", "back")
    serve_hello(h, "db", "back")
    serve_hello(h, "proxy", "front")
    h.docker("network", "connect", "back", "proxy")
    wait_open(h, "proxy")
    back_ip = ip_of(h, "proxy", "back")
    assert fetch(h, "proxy", ip_of(h, "db", "back")) == "hello-db"
    eps = endpoint_ids(h, "proxy")
    h.docker("network", "disconnect", "back", "proxy")
    gone = [e for e in eps if e not in endpoint_ids(h, "proxy")]
    assert len(gone) == 1
    wait_until(lambda: not any(v.startswith("cnl" + gone[0][:12]) for v in canal_leftovers(h)["veths"]),
               timeout=10, what="the back veth removed")
    def sets_holding_back_ip() -> list[str]:  # exact members: 10.0.0.1 is not in 10.0.0.12
        return sorted(name for name, members in ipset_members(h).items() if back_ip in members)

    try:
        wait_until(lambda: not sets_holding_back_ip(), timeout=10, what="no ipset member")
    except TestbedError:
        raise AssertionError(f"{back_ip} still in {sets_holding_back_ip()}; plugin log tail:\n"
                             + "\n".join(h.plugin_log.read_text(errors="replace").splitlines()[-80:])) from None
    wait_until(lambda: not h.exec(["conntrack", "-L", "--orig-src", back_ip], check=False).stdout.strip(),
               timeout=10, what="no conntrack state of the departed address")
    assert fetch(h, "proxy", ip_of(h, "db", "back")) == ""  # no longer on back
    wait_until(lambda: "proto 101" not in routes(h, "proxy"), timeout=10, what="explicit routes removed")
    assert h.docker("exec", "proxy", "ip", "rule").stdout.count("lookup 256") == 0
    # Still fine on front, and a reconnect works again.
    serve_hello(h, "web", "front")
    assert fetch(h, "proxy", ip_of(h, "web", "front")) == "hello-web"
    h.docker("network", "connect", "back", "proxy")
    wait_open(h, "proxy")
    assert fetch(h, "proxy", ip_of(h, "db", "back")) == "hello-db"
    assert fetch(h, "proxy", ip_of(h, "web", "front")) == "hello-web"


def test_members_joining_later_are_routed(h):
    """Routes follow the networks' membership live: a member started after the connect."""
    net(h, "front", "back")
    serve_hello(h, "proxy", "front")
    h.docker("network", "connect", "back", "proxy")
    wait_open(h, "proxy")
    serve_hello(h, "db", "back")
    serve_hello(h, "web", "front")
    assert fetch(h, "proxy", ip_of(h, "db", "back")) == "hello-db"
    assert fetch(h, "proxy", ip_of(h, "web", "front")) == "hello-web"
    h.docker("rm", "-f", "db")
    serve_hello(h, "db2", "back")
    assert fetch(h, "proxy", ip_of(h, "db2", "back")) == "hello-db2"


def test_three_networks_and_gateway_choice(h):
    """Any number of canal networks; Docker's gateway choice decides the default route only."""
    net(h, "alpha", "beta", "gamma")
    for network in ("alpha", "beta", "gamma"):
        serve_hello(h, f"m-{network}", network)
    serve_hello(h, "multi", "gamma")
    h.docker("network", "connect", "alpha", "multi")
    h.docker("network", "connect", "beta", "multi")
    wait_open(h, "multi")
    for network in ("alpha", "beta", "gamma"):
        assert fetch(h, "multi", ip_of(h, f"m-{network}", network)) == f"hello-m-{network}", routes(h, "multi")
        assert fetch(h, f"m-{network}", ip_of(h, "multi", network)) == "hello-multi"
    gateways = {n: v["Gateway"] for n, v in h.docker_json("inspect", "multi")[0]["NetworkSettings"]["Networks"].items()}
    assert len(set(gateways.values())) == 3, gateways
    default = [line for line in routes(h, "multi").splitlines() if line.startswith("default")]
    # Docker's choice (documented in the README): the first network by name, not the first joined.
    assert default == [f"default via {gateways['alpha']} dev {iface_of(h, 'multi', 'alpha')} "], routes(h, "multi")


def iface_of(h: SimHost, container: str, network: str) -> str:
    address = ip_of(h, container, network)
    for line in h.docker("exec", container, "ip", "-o", "-4", "addr").stdout.splitlines():
        if f" {address}/" in line:
            return line.split()[1]
    raise AssertionError(f"{address} not in {container}")
