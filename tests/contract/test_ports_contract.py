"""Published ports through Docker's calls (ProgramExternalConnectivity / Revoke), replayed
through the Flask app: what is recorded, held and programmed, and every refusal."""

from __future__ import annotations

import pytest
from test_protocol import EP, NET, SANDBOX, call, create_network, ok

from canal.dataplane.ports import HostPort

PORTMAP = "com.docker.network.portmap"


def learned(plugin, ep=EP):
    """As the Docker watcher does once the container started: labels and network name."""
    from canal.records import NetworkRecord, replace

    key = plugin.keys.network("h1", NET)
    plugin.store.put(key, replace(NetworkRecord.parse(plugin.store.get_json(key), f"h1/{NET}"), name="web").to_json())
    plugin.networks.update_endpoint(NET, ep, lambda r: replace(r, labels={"app": "srv"}))
    plugin._changed(False)


def endpoint(client, ep=EP):
    addr = ok(client, "IpamDriver.RequestAddress", {"PoolID": "canal-default", "Address": "", "Options": None})["Address"]
    ok(client, "NetworkDriver.CreateEndpoint", {"NetworkID": NET, "EndpointID": ep,
                                                "Interface": {"Address": addr, "AddressIPv6": "", "MacAddress": ""}})
    ok(client, "NetworkDriver.Join", {"NetworkID": NET, "EndpointID": ep, "SandboxKey": SANDBOX, "Options": {}})
    return addr.split("/")[0]


def binding(proto=6, port=80, host_port=8080, end=None, host_ip=""):
    return {"Proto": proto, "IP": "", "Port": port, "HostIP": host_ip, "HostPort": host_port,
            "HostPortEnd": host_port if end is None else end}


def program(client, *bindings, ep=EP):
    return call(client, "NetworkDriver.ProgramExternalConnectivity",
                {"NetworkID": NET, "EndpointID": ep, "Options": {PORTMAP: list(bindings)}})


def nat(plugin) -> list[str]:
    return plugin.iptables.tables["nat"].rules.get("CANAL-DNAT", [])


def ingress(plugin, ep=EP) -> list[str]:
    return plugin.iptables.tables["filter"].rules[f"CANAL-TW-{ep[:12]}"]


def test_publish_records_holds_and_programs_then_revoke_undoes_it(client, plugin):
    create_network(client)
    ip = endpoint(client)
    learned(plugin)
    assert program(client, binding(), binding(17, 90, 9090, host_ip="127.0.0.1")) == (200, {})
    assert [str(b) for b in plugin.networks.endpoint(NET, EP).ports] == [
        "80/tcp -> 0.0.0.0:8080", "90/udp -> 127.0.0.1:9090"]
    assert set(plugin.reservations.held()) == {HostPort("tcp", 8080), HostPort("udp", 9090, _ip("127.0.0.1"))}
    assert nat(plugin) == [
        "-m addrtype ! --dst-type LOCAL -j RETURN",
        f"-p tcp -m tcp --dport 8080 -j DNAT --to-destination {ip}:80",
        f"-d 127.0.0.1/32 -p udp -m udp --dport 9090 -j DNAT --to-destination {ip}:90",
    ]
    # Ingress profile: the published ports, DNATed, from anywhere (policies may narrow it).
    assert "-p tcp -m tcp --dport 80 -m conntrack --ctstate DNAT -j RETURN" in ingress(plugin)
    # A replay is idempotent.
    assert program(client, binding(), binding(17, 90, 9090, host_ip="127.0.0.1")) == (200, {})
    ok(client, "NetworkDriver.RevokeExternalConnectivity", {"NetworkID": NET, "EndpointID": EP})
    assert plugin.networks.endpoint(NET, EP).ports == ()
    assert plugin.reservations.held() == {}
    assert nat(plugin) == ["-m addrtype ! --dst-type LOCAL -j RETURN"]
    assert not any("DNAT" in r for r in ingress(plugin))
    ok(client, "NetworkDriver.RevokeExternalConnectivity", {"NetworkID": NET, "EndpointID": EP})  # replay


def test_any_port_comes_from_the_ephemeral_range_and_a_replay_keeps_it(client, plugin):
    create_network(client)
    endpoint(client)
    ok(client, "NetworkDriver.ProgramExternalConnectivity",
       {"NetworkID": NET, "EndpointID": EP, "Options": {PORTMAP: [binding(host_port=0)]}})
    first = plugin.networks.endpoint(NET, EP).ports[0].host_port
    low, high = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    assert low <= first <= high
    program(client, binding(host_port=0))
    assert plugin.networks.endpoint(NET, EP).ports[0].host_port == first


def test_a_range_takes_the_first_free_port(client, plugin):
    create_network(client)
    endpoint(client)
    plugin.reservations.busy[HostPort("tcp", 8100)] = "process nginx (pid 7)"
    assert program(client, binding(host_port=8100, end=8102))[0] == 200
    assert plugin.networks.endpoint(NET, EP).ports[0].host_port == 8101


def test_a_taken_port_is_refused_naming_its_owner_and_nothing_is_kept(client, plugin):
    create_network(client)
    endpoint(client)
    other = "a1b2" * 16
    endpoint(client, other)
    assert program(client, binding(), ep=other)[0] == 200
    before = plugin.dump()
    status, answer = program(client, binding(port=81, host_port=8081), binding())
    assert status == 409 and "0.0.0.0:8080/tcp is already published by endpoint a1b2a1b2a1b2" in answer["Err"]
    assert plugin.dump() == before  # nothing recorded
    assert HostPort("tcp", 8081) not in plugin.reservations.held()  # nor held
    plugin.reservations.busy[HostPort("tcp", 9000)] = "process python3 (pid 42)"
    status, answer = program(client, binding(host_port=9000))
    assert status == 409 and "9000/tcp is in use by process python3 (pid 42)" in answer["Err"]
    status, answer = program(client, binding(host_port=8100, end=8101), binding(port=82, host_port=8100, end=8101),
                             binding(port=83, host_port=8100, end=8101))
    assert status == 409 and "no free host port in 8100-8101" in answer["Err"]


@pytest.mark.parametrize("entry, message", [
    (binding(proto=99), "Proto must be 6 (tcp), 17 (udp) or 132 (sctp), got int"),
    (binding(host_ip="::1"), "no IPv6 address on this network (created without --ipv6)"),  # a v4-only network
    (binding(host_ip="fe80::1"), "HostIP must be a plain IPv6 address"),
    (binding(host_ip="10.0.0.1; rm"), "HostIP must be an IPv4 or IPv6 address"),
    (binding(port=0), "Port must be a port number 1-65535"),
    (binding(host_port=70000), "HostPort must be a port number 0-65535"),
    (binding(host_port=8080, end=8000), "HostPortEnd 8000 is below HostPort 8080"),
    ("x", "must be an object"),
])
def test_bad_bindings_are_named_and_change_nothing(client, plugin, entry, message):
    create_network(client)
    endpoint(client)
    before = plugin.dump()
    status, answer = program(client, entry)
    assert status == 400 and message in answer["Err"], answer
    assert plugin.dump() == before and plugin.reservations.held() == {}


def test_publish_on_an_unknown_endpoint_is_404_and_revoke_of_one_is_fine(client, plugin):
    create_network(client)
    status, _ = program(client, binding())
    assert status == 404
    ok(client, "NetworkDriver.RevokeExternalConnectivity", {"NetworkID": NET, "EndpointID": EP})


def test_a_pending_endpoint_stays_closed_to_published_traffic(client, plugin):
    """Fail-closed labels hold for DNATed traffic: until its identity is known the endpoint's
    ingress chain drops everything, published ports included; then they open."""
    create_network(client)
    endpoint(client)
    program(client, binding())
    assert ingress(plugin)[1:] == ["-j DROP"]
    learned(plugin)
    assert "-p tcp -m tcp --dport 80 -m conntrack --ctstate DNAT -j RETURN" in ingress(plugin)


def _ip(text):
    import ipaddress

    return ipaddress.IPv4Address(text)


def test_a_forged_record_cannot_divert_a_port_a_host_service_holds(client, plugin):
    """A record naming a host port this plugin does not hold (sshd's 22, etcd's 2379) is not
    DNATed: only held ports are. Positive control: the same forged binding on a free port is."""
    from canal.records import PortBinding, replace

    create_network(client)
    endpoint(client)
    learned(plugin)
    plugin.reservations.busy[HostPort("tcp", 22)] = "process sshd (pid 1)"
    forged = (PortBinding("tcp", 80, 22), PortBinding("tcp", 81, 2222))
    plugin.networks.update_endpoint(NET, EP, lambda r: replace(r, ports=forged))
    # What the running plugin does on every pass: hold what the records publish, DNAT what is held.
    plugin.reservations.sync({HostPort("tcp", b.host_port): EP for b in forged})
    plugin._changed(False)
    rules = " ".join(nat(plugin))
    assert "--dport 2222 " in rules  # control: a held port is programmed
    assert "--dport 22 " not in rules


def test_reservations_keep_a_young_one_through_mirror_lag_then_let_go():
    from fakes import FakeReservations

    now = [100.0]
    reservations = FakeReservations()
    reservations.clock = lambda: now[0]
    reservations.reserve(HostPort("tcp", 8080), EP)
    assert reservations.sync({}) == [] and HostPort("tcp", 8080) in reservations.held()
    now[0] += reservations.GRACE + 1
    reservations.sync({})
    assert reservations.held() == {}


def test_published_ports_of_a_dual_stack_container_take_both_families(client, plugin):
    """-p on an --ipv6 network: a binding on every address holds the IPv4 and the IPv6 port (as
    Docker's bridge publishes both); [::]:PORT holds only the IPv6 one; the IPv6 port taken by a
    host process refuses the binding whole (the IPv4 port let go again); revoke frees both."""
    import ipaddress

    from test_ipv6_contract import create_dual_stack

    create_dual_stack(client)
    addr = ok(client, "IpamDriver.RequestAddress", {"PoolID": "canal-default"})["Address"]
    addr6 = ok(client, "IpamDriver.RequestAddress", {"PoolID": "canal-default6"})["Address"]
    ok(client, "NetworkDriver.CreateEndpoint", {"NetworkID": NET, "EndpointID": EP, "Interface": {
        "Address": addr, "AddressIPv6": addr6, "MacAddress": ""}})
    ok(client, "NetworkDriver.Join", {"NetworkID": NET, "EndpointID": EP, "SandboxKey": SANDBOX, "Options": {}})
    any6 = ipaddress.IPv6Address("::")
    plugin.reservations.busy[HostPort("tcp", 8090, any6)] = "process nginx (pid 7)"
    status, answer = program(client, binding(host_port=8090))
    assert status == 409 and "[::]:8090/tcp is in use by process nginx (pid 7)" in answer["Err"], answer
    assert plugin.reservations.held() == {}  # the IPv4 half not kept either
    assert program(client, binding(), binding(port=81, host_port=8081, host_ip="::")) == (200, {})
    assert [str(b) for b in plugin.networks.endpoint(NET, EP).ports] == ["80/tcp -> 0.0.0.0:8080", "81/tcp -> [::]:8081"]
    assert set(plugin.reservations.held()) == {HostPort("tcp", 8080), HostPort("tcp", 8080, any6),
                                               HostPort("tcp", 8081, any6)}
    assert program(client, binding(), binding(port=81, host_port=8081, host_ip="::")) == (200, {})  # replay
    assert len(plugin.reservations.held()) == 3
    ok(client, "NetworkDriver.RevokeExternalConnectivity", {"NetworkID": NET, "EndpointID": EP})
    assert plugin.reservations.held() == {} and plugin.networks.endpoint(NET, EP).ports == ()
