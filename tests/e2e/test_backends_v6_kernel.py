"""The IPv6 halves of the backends' appliers against the real kernel, each case in a network
namespace of its own (`unshare -n`: links, routes and rules die with it): direct routes via a
peer's PublicIPv6 (host-gw, DirectRouting), the WireGuard device's IPv6 address, routes,
throws and fwmark rule, and the ip6tables rules of an encrypted network."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from testbed import REPO

PRELUDE = f"""
import ipaddress, socket, subprocess, sys
sys.path.insert(0, {str(REPO / "plugin")!r})
sys.path.insert(0, {str(REPO / "tests" / "unit")!r})
sys.path.insert(0, {str(REPO / "tests")!r})
from ipaddress import IPv4Address as A, IPv4Network as N, IPv6Address as A6, IPv6Network as N6

def sh(*argv, input=None):
    return subprocess.run(argv, input=input, capture_output=True, text=True)

def ok(*argv):
    proc = sh(*argv)
    assert proc.returncode == 0, (argv, proc.stderr)
    return proc.stdout

ok("ip", "link", "set", "lo", "up")
"""


def in_netns(body: str) -> str:
    proc = subprocess.run(["unshare", "-n", sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_direct_routes_in_both_families_via_the_peers_public_addresses():
    out = in_netns("""
        from canal.dataplane.routes import DirectRoutes
        ok("ip", "link", "add", "u0", "type", "veth", "peer", "name", "u1")
        ok("ip", "link", "set", "u1", "up")
        ok("ip", "addr", "add", "198.18.0.1/24", "dev", "u0")
        ok("ip", "addr", "add", "2001:2::1/64", "dev", "u0", "nodad")
        ok("ip", "link", "set", "u0", "up")
        direct = DirectRoutes("u0")
        print("underlay", [str(n) for n in direct.underlay_networks()])
        wanted = {N("100.64.2.0/24"): A("198.18.0.2"), N6("fd00:1:0:2::/64"): A6("2001:2::2"),
                  N6("fd00:9::7/128"): A6("2001:2::2")}
        print("problems", direct.add(wanted))
        print("v6", ok("ip", "-6", "route", "show", "proto", "103").strip().replace("\\n", " | "))
        print("again", direct.add(wanted))  # idempotent
        # a gateway the kernel refuses (not on-link): one problem naming it, the rest stay
        print("refused", direct.add({**wanted, N6("fd00:1:0:3::/64"): A6("2001:2:0:9::3")}))
        direct.remove_stale({N("100.64.2.0/24"): A("198.18.0.2")})
        print("after", ok("ip", "-6", "route", "show", "proto", "103").strip() or "none",
              ok("ip", "route", "show", "proto", "103").strip())
    """)
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["underlay"] == "['198.18.0.0/24', '2001:2::/64']"
    assert lines["problems"] == "[]" and lines["again"] == "[]"
    routes = sorted(r.split()[:5] for r in lines["v6"].split(" | "))
    assert routes == [["fd00:1:0:2::/64", "via", "2001:2::2", "dev", "u0"],
                      ["fd00:9::7", "via", "2001:2::2", "dev", "u0"]]
    assert "2001:2:0:9::3" in lines["refused"] and "fd00:1:0:3::/64" in lines["refused"]
    assert lines["after"].split()[:4] == ["none", "100.64.2.0/24", "via", "198.18.0.2"]


def test_wireguard_device_carries_ipv6_routes_throws_and_the_mark_rule():
    # A stand-in device (a veth: this kernel has no dummy) by the WireGuard device's name: the
    # routes, rule and addresses are the applier's; the tunnel itself is test_encryption's.
    out = in_netns("""
        from canal.dataplane.wireguard import DEVICE, WG_TABLE, RT_TABLE_MAIN, KeyFile, WireGuard
        ok("ip", "link", "add", DEVICE, "type", "veth", "peer", "name", "wgpeer")
        ok("ip", "link", "set", "wgpeer", "up")
        wg = WireGuard(KeyFile("/nonexistent"))
        wg.implementation = "kernel"
        wg.ensure_device(1420, A("100.64.1.0"), A6("fd00:1:0:1::"))
        print("addr6", ok("ip", "-6", "-o", "addr", "show", "dev", DEVICE, "scope", "global").split()[3])
        link = ok("ip", "-o", "link", "show", DEVICE).split()
        print("mtu", link[link.index("mtu") + 1])
        wanted = (N("100.64.2.0/24"), N6("fd00:1:0:2::/64"), N6("fd00:9::7/128"))
        wg.apply_routes(wanted, WG_TABLE, (N6("fd00:1:0:2::77/128"),))
        wg.ensure_rule(True)
        wg.ensure_rule(True)  # idempotent
        print("table6", ok("ip", "-6", "route", "show", "table", str(WG_TABLE)).strip().replace("\\n", " | "))
        print("rules6", ok("ip", "-6", "rule", "show").count("fwmark 0x100000/0x100000 lookup 25900"))
        print("rules4", ok("ip", "rule", "show").count("fwmark 0x100000/0x100000 lookup 25900"))
        # the cluster-wide backend: the same routes in the main table, none left in the other
        wg.apply_routes(wanted, RT_TABLE_MAIN)
        print("main6", ok("ip", "-6", "route", "show", "proto", "104").strip().replace("\\n", " | "))
        print("left6", ok("ip", "-6", "route", "show", "table", str(WG_TABLE)).strip() or "none")
        wg.apply_routes((), RT_TABLE_MAIN)
        wg.ensure_rule(False)
        print("gone", ok("ip", "-6", "route", "show", "proto", "104").strip() or "none",
              ok("ip", "-6", "rule", "show").count("lookup 25900"))
    """)
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["addr6"] == "fd00:1:0:1::/128" and lines["mtu"] == "1420"
    table = sorted(r.split()[:3] for r in lines["table6"].split(" | "))
    assert table == [["fd00:1:0:2::/64", "dev", "flannel-wg"], ["fd00:9::7", "dev", "flannel-wg"],
                     ["throw", "fd00:1:0:2::77", "dev"]]
    assert lines["rules6"] == "1" and lines["rules4"] == "1"
    assert sorted(r.split()[0] for r in lines["main6"].split(" | ")) == ["fd00:1:0:2::/64", "fd00:9::7"]
    assert lines["left6"] == "none" and lines["gone"] == "none 0"


def test_ip6tables_takes_the_encrypted_networks_rules():
    out = in_netns("""
        from canal.agent.desired import desired_firewall
        from canal.dataplane.firewall import restore_text, tables_of
        from test_backends_v6 import encrypted_snap6
        state = desired_firewall(encrypted_snap6())
        for s in state.ipsets:  # the sets the rules name (ipsets are per network namespace)
            ok("ipset", "create", s.name, s.kind, "family", s.family)
        for binary, half in (("iptables-restore", state), ("ip6tables-restore", state.family6())):
            text = restore_text(half, {})
            proc = sh(binary, "--noflush", input=text)
            print(binary, proc.returncode, proc.stderr.strip()[:300])
        print("out6", ok("ip6tables", "-S", "CANAL-ENCRYPT-OUT").count("-j DROP"))
        print("mangle6", ok("ip6tables", "-t", "mangle", "-S", "CANAL-MARK-OUT").count("canal-6encrypted"))
        for s in state.ipsets:
            sh("ipset", "destroy", s.name)
    """)
    assert "iptables-restore 0" in out and "ip6tables-restore 0" in out
    assert "out6 1" in out and "mangle6 1" in out
