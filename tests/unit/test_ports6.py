"""Published ports over IPv6 (issue 13): the ip6tables nat of desired_firewall, the reservations
of both families (real sockets, on the loopback of the test's own process: nothing configured),
and the bindings' typed host addresses."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket

import pytest
from test_policy_ipv6 import snapshot

from canal.agent.desired import desired_firewall
from canal.dataplane.firewall import restore_text
from canal.dataplane.iptables import check_restore
from canal.dataplane.ports import ANY6, HostPort, Reservations
from canal.errors import Conflict
from canal.records import PortBinding, RecordError

EP = "a" * 64
V4ONLY = "c" * 64


def published(ipv6: bool, *bindings: PortBinding, owner: str = EP):
    """A snapshot whose endpoint publishes `bindings`, every host port of them held by `owner`."""
    snap = snapshot(ipv6=ipv6)
    eps = dict(snap.endpoints)
    eps[EP] = dataclasses.replace(eps[EP], ports=tuple(bindings))
    held = {(k.proto, str(k.ip or ""), k.port): owner for b in bindings for k in HostPort.all_of(b, ipv6)}
    return dataclasses.replace(snap, endpoints=eps, held_ports=held)


def test_a_binding_on_every_address_is_dnated_in_both_families():
    state = desired_firewall(published(True, PortBinding("tcp", 80, 8080), PortBinding("udp", 90, 9090)))
    assert state.chains[("nat", "CANAL-DNAT")][1:] == [
        "-p tcp -m tcp --dport 8080 -j DNAT --to-destination 100.64.7.2:80",
        "-p udp -m udp --dport 9090 -j DNAT --to-destination 100.64.7.2:90"]
    assert state.chains6[("nat", "CANAL-DNAT")] == [
        "-m addrtype ! --dst-type LOCAL -j RETURN",
        "-p tcp -m tcp --dport 8080 -j DNAT --to-destination [fd00::2]:80",
        "-p udp -m udp --dport 9090 -j DNAT --to-destination [fd00::2]:90"]
    assert "-s fd00::2/128 -d fd00::2/128 -p tcp -m tcp --dport 80 -j MASQUERADE" in state.chains6[("nat", "CANAL-POSTROUTING")]
    assert {(j.table, j.builtin) for j in state.jumps6} >= {("nat", "PREROUTING"), ("nat", "OUTPUT"), ("nat", "POSTROUTING")}
    check_restore(restore_text(state.family6(), {}))  # what ip6tables-restore gets passes the same check as IPv4's


def test_family_of_the_host_address_decides():
    v6only = PortBinding("tcp", 81, 8081, ipaddress.IPv6Address("::"))
    one6 = PortBinding("tcp", 82, 8082, ipaddress.IPv6Address("2001:2::1"))
    one4 = PortBinding("tcp", 83, 8083, ipaddress.IPv4Address("198.18.0.1"))
    state = desired_firewall(published(True, v6only, one6, one4))
    assert state.chains[("nat", "CANAL-DNAT")][1:] == [
        "-d 198.18.0.1/32 -p tcp -m tcp --dport 8083 -j DNAT --to-destination 100.64.7.2:83"]
    assert state.chains6[("nat", "CANAL-DNAT")][1:] == [
        "-p tcp -m tcp --dport 8081 -j DNAT --to-destination [fd00::2]:81",
        "-d 2001:2::1/128 -p tcp -m tcp --dport 8082 -j DNAT --to-destination [fd00::2]:82"]


def test_only_held_ports_are_dnated_and_nothing_without_ipv6():
    snap = published(True, PortBinding("tcp", 80, 8080))
    not_held6 = dataclasses.replace(snap, held_ports={k: v for k, v in snap.held_ports.items() if k[1] != "::"})
    state = desired_firewall(not_held6)
    assert ("nat", "CANAL-DNAT") not in state.chains6  # a host process holds [::]:8080: not diverted
    assert len(state.chains[("nat", "CANAL-DNAT")]) == 2  # IPv4's still is
    stolen = desired_firewall(published(True, PortBinding("tcp", 80, 8080), owner="f" * 64))
    assert ("nat", "CANAL-DNAT") not in stolen.chains6
    plain = desired_firewall(published(False, PortBinding("tcp", 80, 8080)))
    assert not any(table == "nat" for table, _ in plain.chains6)  # no --ipv6 network: no IPv6 nat at all


def test_host_ports_of_a_binding():
    b = PortBinding("tcp", 80, 8080)
    assert HostPort.all_of(b, ipv6=False) == [HostPort("tcp", 8080)]
    assert HostPort.all_of(b, ipv6=True) == [HostPort("tcp", 8080), HostPort("tcp", 8080, ANY6)]
    v6 = PortBinding("tcp", 80, 8080, ipaddress.IPv6Address("::"))
    assert HostPort.all_of(v6, ipv6=True) == [HostPort("tcp", 8080, ANY6)]
    assert str(HostPort("tcp", 8080, ANY6)) == "[::]:8080/tcp" and str(v6) == "80/tcp -> [::]:8080"
    assert sorted([v6, b, PortBinding("tcp", 80, 8080, ipaddress.IPv4Address("127.0.0.1"))]) == [
        b, PortBinding("tcp", 80, 8080, ipaddress.IPv4Address("127.0.0.1")), v6]
    assert PortBinding.parse({"proto": "tcp", "port": 80, "host_port": 8080, "host_ip": "::"}) == v6
    with pytest.raises(RecordError):
        PortBinding.parse({"proto": "tcp", "port": 80, "host_port": 8080, "host_ip": "::1; rm"})


def _free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        return s.getsockname()[1]


def test_reservations_hold_the_ipv6_port_apart_and_see_it_taken():
    port = _free_port()
    r = Reservations()
    try:
        r.reserve(HostPort("tcp", port), "e1")
        r.reserve(HostPort("tcp", port, ANY6), "e1")  # IPV6_V6ONLY: both families side by side
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as intruder:
            intruder.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            with pytest.raises(OSError):
                intruder.bind(("::", port))  # a host process cannot take the IPv6 port now
        r.release([HostPort("tcp", port, ANY6)])
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as owner:
            owner.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            owner.bind(("::", port))
            owner.listen(1)
            with pytest.raises(Conflict, match=r"\[::\]:%d/tcp is in use" % port):
                r.reserve(HostPort("tcp", port, ANY6), "e1")  # a host process holds it: refused
    finally:
        r.close()


def test_canal_port_lists_the_ipv6_half_of_a_binding():
    from canal.agent.desired import endpoint_rows

    bindings = (PortBinding("tcp", 80, 8080), PortBinding("tcp", 81, 8081, ipaddress.IPv6Address("::")))
    rows = {r["endpoint"]: r for r in endpoint_rows(published(True, *bindings))}
    assert rows[EP[:12]]["ports"] == ["80/tcp -> 0.0.0.0:8080", "80/tcp -> [::]:8080", "81/tcp -> [::]:8081"]
    rows = {r["endpoint"]: r for r in endpoint_rows(published(False, PortBinding("tcp", 80, 8080)))}
    assert rows[EP[:12]]["ports"] == ["80/tcp -> 0.0.0.0:8080"]  # no IPv6 address: IPv4 only


def test_a_pass_reading_records_before_a_release_does_not_take_the_port_back():
    """`docker rm -f a && docker run -p P b`: RevokeExternalConnectivity releases P while a pass
    that read a's record (still publishing P) is between its read and its sync; that sync must
    not take P back for a (and keep it GRACE seconds, refusing b)."""
    loopback = ipaddress.IPv4Address("127.0.0.1")
    port = _free_port()
    key = HostPort("tcp", port, loopback)
    r = Reservations(clock=lambda: 1000.0)
    try:
        r.reserve(key, "a")
        read_at = r.mark()  # the pass reads the records: a still publishes P
        r.release([key])  # Revoke, meanwhile
        assert r.sync({key: "a"}, read_at) == [] and r.held() == {}
        r.reserve(key, "b")  # b publishes P at once
        assert r.held() == {key: "b"}
        r.release([key])
        # Control: the same sync from records read after the release (a restart, say) takes
        # it; and without the mark it would have re-taken it in the race above.
        assert r.sync({key: "a"}, r.mark()) == [] and r.held() == {key: "a"}
        r.release([key])
        assert r.sync({key: "a"}) == [] and r.held() == {key: "a"}
    finally:
        r.close()
