"""The ipset and iptables appliers against the real kernel, each case in a network namespace of
its own (`unshare -n`: sets and chains die with it): sets outgrowing their creation size, a full
hash, a half-done restore's leftovers, chains edited in place. The unit tests check the
scripts; only the kernel says whether they are accepted and what they do."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from testbed import REPO

PRELUDE = f"""
import ipaddress, subprocess, sys
sys.path.insert(0, {str(REPO / "plugin")!r})
from canal.dataplane.ipset import Ipsets, IpSet
from canal.dataplane.firewall import Firewall, FirewallState, restore_text, tables_of
from canal.dataplane.iptables import Iptables
from canal.errors import CommandFailed

def sh(*argv, input=None):
    return subprocess.run(argv, input=input, capture_output=True, text=True)

def members(n, base="10.0.0.0"):
    start = int(ipaddress.IPv4Address(base))
    return frozenset(str(ipaddress.IPv4Address(start + i)) for i in range(n))

def count(name):
    out = sh("ipset", "list", name, "-t").stdout
    return int(next(l.split(":")[1] for l in out.splitlines() if l.startswith("Number of entries")))
"""


def in_netns(body: str) -> str:
    proc = subprocess.run(["unshare", "-n", sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_a_set_made_smaller_by_an_older_release_grows_past_its_size():
    out = in_netns("""
        # As an older release made it: maxelem 65,536, a few members.
        sh("ipset", "create", "canal-net-x", "hash:ip", "family", "inet", "maxelem", "65536")
        # Positive control: re-declaring the live set with another size, as the old script did
        # before its swap, is refused by the kernel (the failure seen at 100,000 endpoints).
        old = sh("ipset", "restore", input="create canal-net-x hash:ip family inet maxelem 140000 -exist\\n")
        print("redeclare", old.returncode, "already exists" in old.stderr)
        Ipsets().apply([IpSet("canal-net-x", "hash:ip", members(70000))])
        print("after swap", count("canal-net-x"))
        # Then one more member by the in-place path, past the old size.
        Ipsets().apply([IpSet("canal-net-x", "hash:ip", members(70001))])
        print("after add", count("canal-net-x"))
    """)
    assert "redeclare 1 True" in out
    assert "after swap 70000" in out and "after add 70001" in out


def test_a_full_hash_is_rewritten_whole_after_the_failed_restore():
    out = in_netns("""
        sh("ipset", "create", "canal-sel-x", "hash:ip", "family", "inet", "maxelem", "16")
        for ip in sorted(members(16)):
            sh("ipset", "add", "canal-sel-x", ip)
        ipsets = Ipsets()
        try:  # four more: the in-place adds hit the full hash (the positive control)
            ipsets.apply([IpSet("canal-sel-x", "hash:ip", members(20))])
            print("first ok")
        except CommandFailed as err:
            print("first failed", "full" in str(err))
        ipsets.apply([IpSet("canal-sel-x", "hash:ip", members(20))], read_back=False)
        print("retry", count("canal-sel-x"))
    """)
    assert "first failed True" in out and "retry 20" in out


def test_a_temporary_set_left_by_a_half_done_restore_is_replaced():
    out = in_netns("""
        # A leftover of another type under the temporary name, as a restore that died leaves it.
        sh("ipset", "create", "canal-sel-y-tmp", "hash:net", "family", "inet")
        Ipsets().apply([IpSet("canal-sel-y", "hash:ip", members(300))])
        print("count", count("canal-sel-y"), "tmp gone", sh("ipset", "list", "canal-sel-y-tmp").returncode != 0)
    """)
    assert "count 300 tmp gone True" in out


def test_a_long_chain_is_edited_in_place_and_ends_as_wanted():
    out = in_netns("""
        rules = [f"-i cnl{i:04d} -j DROP" for i in range(300)]
        fw = Firewall(Iptables("nft"), Ipsets())
        fw.apply(FirewallState(chains={("filter", "CANAL-X"): rules}))
        want = rules[:100] + ["-i cnlnew1 -j DROP"] + rules[100:250] + rules[251:] + ["-i cnlnew2 -j DROP"]
        wanted = FirewallState(chains={("filter", "CANAL-X"): want})
        text = restore_text(wanted, fw.iptables.save())
        print("edits", sum(l.startswith(("-I", "-D")) for l in text.splitlines()), "flush", "-F CANAL-X" in text)
        fw.apply(wanted)
        print("equal", fw.iptables.save()["filter"].rules["CANAL-X"] == want)
        # Tampered (rules deleted behind our back): the event-driven pass's edits, made against
        # what it last programmed, are refused by the kernel (a delete by spec finds nothing, so
        # nothing else is deleted); the same pass then diffs against the kernel and repairs.
        sh("iptables-nft", "-D", "CANAL-X", "-i", "cnlnew1", "-j", "DROP")
        sh("iptables-nft", "-D", "CANAL-X", "-i", "cnl0000", "-j", "DROP")
        later = [r for r in want if r != "-i cnlnew1 -j DROP"][:-1]
        stale = restore_text(FirewallState(chains={("filter", "CANAL-X"): later}), tables_of(fw.applied))
        refused = sh("iptables-nft-restore", "--noflush", input=stale)
        print("stale edits refused", refused.returncode != 0)
        fw.apply(FirewallState(chains={("filter", "CANAL-X"): later}), read_back=False)
        print("repaired", fw.iptables.save()["filter"].rules["CANAL-X"] == later)
    """)
    assert "edits 3 flush False" in out and "equal True" in out
    assert "stale edits refused True" in out and "repaired True" in out


def test_the_route_dump_reads_what_pyroute2_reads_in_both_families():
    """canal.dataplane.routedump (the appliers' read-back) against pyroute2's own decoding of
    the same tables: default, onlink gateways, metrics, other tables and protocols, IPv6, and
    enough routes to span many datagrams."""
    out = in_netns("""
        import socket
        from pyroute2 import IPRoute
        from canal.dataplane import routedump
        for cmd in ("ip link add u0 type veth peer name u0p", "ip link set u0 up", "ip link set u0p up",
                    "ip link set lo up", "ip addr add 198.18.0.1/24 dev u0", "ip -6 addr add 2001:2::1/64 dev u0 nodad",
                    "ip route add default via 198.18.0.254", "ip route add 100.64.9.0/24 via 198.18.0.2 proto 103",
                    "ip route add 100.64.8.0/24 via 198.18.0.3 metric 7", "ip route add 100.64.7.0/24 dev u0 table 200 proto 104",
                    "ip route add 100.64.6.1/32 via 169.254.1.1 dev u0 onlink proto 102",
                    "ip -6 route add fd00:c0a1:0:2::/64 via 2001:2::2 proto 103",
                    "ip -6 route add fd00:c0a1::5/128 via fe80::1 dev u0 proto 101"):
            assert sh(*cmd.split()).returncode == 0, cmd
        batch = "".join(f"route add 100.65.{i >> 8}.{i & 255}/32 via 198.18.0.9 proto 102\\n" for i in range(3000))
        assert sh("ip", "-batch", "-", input=batch).returncode == 0
        ipr = IPRoute()
        for family in (socket.AF_INET, socket.AF_INET6):
            theirs = set()
            for r in ipr.get_routes(family=family):
                dst = r.get_attr("RTA_DST")
                gw = r.get_attr("RTA_GATEWAY")
                theirs.add((f"{dst}/{r['dst_len']}" if dst else None, r.get_attr("RTA_TABLE") or r["table"], r["proto"],
                            r.get_attr("RTA_OIF"), gw, r.get_attr("RTA_PRIORITY"), r["flags"]))
            ours = {(str(x.dst) if x.dst else None, x.table, x.protocol, x.oif, str(x.gateway) if x.gateway else None,
                     x.priority, x.flags) for x in routedump.dump(family)}
            print(family, len(ours), ours == theirs, sorted(ours ^ theirs, key=str)[:5])
        print("filtered", len(routedump.dump(socket.AF_INET, table=254, protocol=102)),
              len(routedump.dump(socket.AF_INET, table=200)), len(routedump.dump(socket.AF_INET6, protocol=103)))
    """)
    lines = out.splitlines()
    assert lines[0].startswith("2 ") and " True " in lines[0], out
    assert lines[1].startswith("10 ") and " True " in lines[1], out
    assert int(lines[0].split()[1]) > 3000, out  # every datagram of the dump read
    assert lines[2] == "filtered 3001 1 1", out
