"""The last check before the kernel's line-oriented tools: what reaches iptables-restore and
ipset restore is one command per line, whatever a record smuggled in (defence in depth behind
the API's and the records' validation)."""

from __future__ import annotations

import pytest

from canal.dataplane.ipset import IpSet, restore_script
from canal.dataplane.iptables import check_restore
from canal.errors import UnsafeInput

GOOD = (
    "*raw\n:CANAL-PREROUTING - [0:0]\n-A CANAL-PREROUTING -i cnl+ -m rpfilter --invert -j DROP\nCOMMIT\n"
    "*filter\n:CANAL-FW-0ca3560493c4 - [0:0]\n-F CANAL-FW-0ca3560493c4\n"
    "-A CANAL-FW-0ca3560493c4 -m set --match-set canal-sel-1 src -m comment --comment \"policy web: allow\" -j ACCEPT\n"
    "-I FORWARD 2 -j CANAL-FORWARD\n-D DOCKER-USER -j CANAL-OLD\n-X CANAL-OLD\nCOMMIT\n"
)


def test_restore_grammar_accepts_what_the_firewall_writes():
    check_restore(GOOD)
    check_restore("")


@pytest.mark.parametrize("bad", [
    "*filter\n:CANAL-FW-abc\n-A INPUT - [0:0]\nCOMMIT\n",  # a declaration split by a newline in an ID
    "*filter\n-A CANAL-X -j ACCEPT\r\nCOMMIT\n",
    "*filter\n-A CANAL-X -m comment --comment \"a\x1bb\" -j ACCEPT\nCOMMIT\n",
    "*filter\n\nCOMMIT\n",
    "*filter\n:CANAL-TW-" + "a" * 30 + " - [0:0]\nCOMMIT\n",
    "*filter\n:-A - [0:0]\nCOMMIT\n",
    "*filter\n-A\nCOMMIT\n",
    "*bogus\nCOMMIT\n",
    "*filter\nCOMMIT",
])
def test_restore_grammar_refuses_anything_else(bad):
    with pytest.raises(UnsafeInput, match="iptables-restore input"):
        check_restore(bad)


HOSTILE = "10.9.0.0/24\nadd canal-nets 0.0.0.0/1"


def test_positive_control_an_unchecked_member_would_be_two_commands():
    line = f"add canal-nets {HOSTILE}"
    assert line.splitlines() == ["add canal-nets 10.9.0.0/24", "add canal-nets 0.0.0.0/1"]


@pytest.mark.parametrize("present", [{}, {"canal-nets": {"100.64.0.0/16"}}])
def test_ipset_members_that_are_not_ipv4_are_dropped(present):
    members = {"100.64.0.0/16", "100.70.0.0/24", HOSTILE, "1.2.3.4 -exist", "fd00::/64", "１.2.3.4", "300.1.1.1"}
    script = restore_script([IpSet("canal-nets", "hash:net", frozenset(members))], present)
    assert "100.70.0.0/24" in script
    for line in script.splitlines():
        assert line.split()[0] in ("create", "flush", "add", "del", "swap", "destroy"), line
        assert "0.0.0.0/1" not in line and "-exist -exist" not in line and "fd00" not in line
    assert "add canal-x-tmp 10.0.0.1" in restore_script([IpSet("canal-x", "hash:ip", frozenset({"10.0.0.1"}))], {})


def test_ipset_members_present_in_the_kernel_are_checked_too():
    """A member read back (or remembered) that is malformed is never echoed into a `del`."""
    script = restore_script([IpSet("canal-nets", "hash:net", frozenset({"100.64.0.0/16"}))],
                            {"canal-nets": {"100.64.0.0/16", "100.70.0.0/24", HOSTILE}})
    assert script == "del canal-nets 100.70.0.0/24 -exist\n"


@pytest.mark.parametrize("name, kind", [("canal-x\nflush", "hash:ip"), ("canal x", "hash:ip"), ("c" * 32, "hash:ip"),
                                        ("canal-x", "hash:ip family inet6"), ("-canal", "hash:net")])
def test_ipset_bad_names_and_types_are_refused(name, kind):
    with pytest.raises(UnsafeInput):
        restore_script([IpSet(name, kind, frozenset())], {})
