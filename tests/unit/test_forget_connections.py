"""Flushing departed addresses' conntrack state never fails its caller.

A missing `conntrack` or a failing flush used to raise out of the agent's pass, leaving the
batch's other addresses unflushed and failing the Join that waited on that pass. Logic with a
fake runner; the missing tool with the real command wrapper and an empty PATH; the flush itself
against a real kernel in a throwaway namespace (`cnlt<pid>-ct<n>`), addresses in 100.64.0.0/10.
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from canal.dataplane.cmd import run
from canal.dataplane.links import Forgotten, forget_connections
from canal.errors import Unavailable

_counter = itertools.count()


class Runner:
    """Records conntrack calls; answers rc per address, or raises for some."""

    def __init__(self, rc: dict[str, int] | None = None, raises: dict[str, Exception] | None = None) -> None:
        self.rc = rc or {}
        self.raises = raises or {}
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        self.calls.append(list(argv))
        ip = argv[-1]
        if ip in self.raises:
            raise self.raises[ip]
        rc = self.rc.get(ip, 1)
        return subprocess.CompletedProcess(argv, rc, "", "conntrack v1.4.7: Operation failed\n" if rc > 1 else "")


def test_each_address_flushed_both_ways() -> None:
    runner = Runner(rc={"100.64.0.5": 0})
    result = forget_connections("100.64.0.5", "100.64.0.6", runner=runner)
    assert result and result == Forgotten(("100.64.0.5", "100.64.0.6"), ())
    assert runner.calls == [
        ["conntrack", "-D", "--orig-src", "100.64.0.5"], ["conntrack", "-D", "--orig-dst", "100.64.0.5"],
        ["conntrack", "-D", "--orig-src", "100.64.0.6"], ["conntrack", "-D", "--orig-dst", "100.64.0.6"],
    ]


def test_one_failure_leaves_the_others_flushed(caplog: pytest.LogCaptureFixture) -> None:
    runner = Runner(rc={"100.64.0.2": 2}, raises={"100.64.0.3": Unavailable("conntrack timed out after 5s")})
    with caplog.at_level(logging.WARNING, logger="canal.dataplane.links"):
        result = forget_connections("100.64.0.1", "100.64.0.2", "100.64.0.3", "100.64.0.4", runner=runner)
    assert not result and not result.tool_missing
    assert result.flushed == ("100.64.0.1", "100.64.0.4")
    assert [ip for ip, _ in result.failed] == ["100.64.0.2", "100.64.0.3"]
    assert "rc=2: conntrack v1.4.7: Operation failed" in result.failed[0][1]
    assert {c[-1] for c in runner.calls} == {"100.64.0.1", "100.64.0.2", "100.64.0.3", "100.64.0.4"}
    assert len(caplog.records) == 1  # one line per call, naming both
    assert "100.64.0.2" in caplog.text and "100.64.0.3: conntrack timed out after 5s" in caplog.text


def test_addresses_from_records_never_become_options() -> None:
    """Departed addresses come from datastore records: a value like --flush (which would empty
    the whole table) is refused before it reaches the command line."""
    runner = Runner()
    result = forget_connections("--flush", "100.64.0.9 -F", "100.64.0.7", runner=runner)
    assert result.flushed == ("100.64.0.7",)
    assert result.failed == (("--flush", "not an IPv4 or IPv6 address"), ("100.64.0.9 -F", "not an IPv4 or IPv6 address"))
    assert all(c[-1] == "100.64.0.7" for c in runner.calls)


def test_missing_tool_is_reported_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """The real command wrapper with a PATH that has no conntrack: the issue's host."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="canal.dataplane.links"):
        result = forget_connections("100.64.0.1", "100.64.0.2")
    assert not result and result.tool_missing and result.flushed == ()
    assert result.failed == tuple((ip, "conntrack is not installed (apt-get install conntrack)")
                                  for ip in ("100.64.0.1", "100.64.0.2"))
    assert len(caplog.records) == 1
    assert "100.64.0.1, 100.64.0.2: conntrack is not installed (apt-get install conntrack)" in caplog.text


# ------------------------------------------------------------------------------ real kernel


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> rc {proc.returncode}: {proc.stderr.strip()}")
    return proc


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.fail("the conntrack kernel test needs root (network namespaces); run it as root", pytrace=False)
    name = f"cnlt{os.getpid()}-ct{next(_counter)}"
    sh("ip", "netns", "add", name)
    try:
        yield name
    finally:
        sh("ip", "netns", "delete", name)  # takes its addresses, rule and conntrack table along


def test_flush_removes_only_the_departed_address(netns: str) -> None:
    """Two UDP flows tracked in a throwaway namespace; forgetting one address drops its flow
    (control: the other stays, and both were there before)."""
    ns = ["nsenter", f"--net=/run/netns/{netns}", "--"]
    sh("ip", "-n", netns, "link", "set", "lo", "up")
    for n in (1, 2, 3, 4):
        sh("ip", "-n", netns, "addr", "add", f"100.64.0.{n}/32", "dev", "lo")
    sh(*ns, "iptables-nft", "-A", "OUTPUT", "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT")  # tracks here
    send = ("import socket\n"
            "for s, d in (('100.64.0.1', '100.64.0.2'), ('100.64.0.3', '100.64.0.4')):\n"
            "    k = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); k.bind((s, 0)); k.sendto(b'x', (d, 9)); k.close()\n")
    sh(*ns, sys.executable, "-c", send)

    def flows() -> set[tuple[str, str]]:
        out = sh(*ns, "conntrack", "-L", "-p", "udp").stdout
        return {(f.split("src=")[1].split()[0], f.split("dst=")[1].split()[0]) for f in out.splitlines() if "src=" in f}

    assert flows() == {("100.64.0.1", "100.64.0.2"), ("100.64.0.3", "100.64.0.4")}
    result = forget_connections("100.64.0.2", runner=lambda argv, **kw: run([*ns, *argv], **kw))
    assert result.flushed == ("100.64.0.2",) and result.failed == ()
    assert flows() == {("100.64.0.3", "100.64.0.4")}
