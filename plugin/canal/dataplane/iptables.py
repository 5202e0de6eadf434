"""iptables through iptables-save / iptables-restore, with the backend Docker uses.

Debian 12 ships both nft and legacy iptables; rules written with the wrong one are invisible to
the other (python-iptables writes legacy tables even where Docker uses nft). So we detect
which one holds Docker's chains and use only that one.

iptables-restore input is text where one newline starts a new command, so every line we send
is checked against the restore grammar first (see check_restore): a value that smuggled a
newline or a control character into a chain name or rule is refused, never interpreted.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from typing import Callable, Optional

from canal.dataplane.cmd import run
from canal.errors import CommandError, ToolMissing, UnsafeInput, Unavailable

log = logging.getLogger(__name__)

BACKENDS = ("nft", "legacy")


def find_tool(
    backend: str, tool: str, family: str = "iptables", which: Callable[[str], Optional[str]] = shutil.which
) -> Optional[str]:
    """iptables-nft-save, ip6tables-legacy-restore, ... else the plain name Debian's
    alternatives link (iptables-save); None if neither is installed."""
    for name in (f"{family}-{backend}-{tool}", f"{family}-{tool}"):
        if which(name):
            return name
    return None


def _binary(backend: str, tool: str, family: str = "iptables") -> str:
    found = find_tool(backend, tool, family)
    if found is None:
        name = f"{family}-{backend}-{tool}"
        raise ToolMissing(name, hint=f"neither {name} nor {family}-{tool} is installed: install the iptables package")
    return found


def _rule_count(backend: str) -> tuple[bool, int]:
    """(holds Docker's chains, number of rules) for one backend; (False, -1) if unusable."""
    try:
        text = run([_binary(backend, "save")], timeout=10).stdout
    except (CommandError, Unavailable) as err:
        log.debug("iptables backend %s unusable: %s", backend, err)
        return False, -1
    docker = bool(re.search(r"^:DOCKER", text, re.M))
    return docker, sum(1 for line in text.splitlines() if line.startswith("-A "))


def detect_backend(configured: str = "auto") -> str:
    """The backend holding Docker's rules; else the one with more rules; else nft."""
    if configured in BACKENDS:
        return configured
    counts = {b: _rule_count(b) for b in BACKENDS}
    for backend in BACKENDS:
        if counts[backend][0]:
            return backend
    best = max(BACKENDS, key=lambda b: (counts[b][1], b == "nft"))
    if counts[best][1] < 0:
        raise Unavailable("no working iptables found: install the iptables package")
    return best


@dataclass
class Table:
    """One table as iptables-save prints it: chain policies and rules in order."""

    name: str
    chains: dict[str, str] = field(default_factory=dict)  # chain -> policy ("-" for user chains)
    rules: dict[str, list[str]] = field(default_factory=dict)  # chain -> rule specs (after -A CHAIN)


def parse_save(text: str) -> dict[str, Table]:
    tables: dict[str, Table] = {}
    current: Table | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), Table(line[1:].strip()))
        elif current is None or line.startswith("#") or not line.strip():
            continue
        elif line.startswith(":"):
            name, policy = line[1:].split()[:2]
            current.chains[name] = policy
            current.rules.setdefault(name, [])
        elif line.startswith("-A "):
            _, chain, spec = line.split(" ", 2)
            current.rules.setdefault(chain, []).append(spec)
    return tables


TABLES = ("filter", "nat", "mangle", "raw", "security")
# iptables chain names: at most 28 characters, no whitespace, not starting with '-'.
_CHAIN = r"[!-,.-~][!-~]{0,27}"
_DECLARATION = re.compile(rf":({_CHAIN}) (?:ACCEPT|DROP|RETURN|QUEUE|-)(?: \[[0-9]+:[0-9]+\])?")
_COMMAND = re.compile(rf"-[AIDRFXZNEP] ({_CHAIN})(?: [^\x00-\x1f\x7f]*)?")


def check_restore(text: str) -> None:
    """Refuse iptables-restore input with a line outside the restore grammar (a table header,
    a chain declaration, one command, COMMIT, a comment) or with a control character:
    defence in depth behind the API's validation, for records from other hosts."""
    if text and not text.endswith("\n"):
        raise UnsafeInput("iptables-restore input does not end with a newline")
    for number, line in enumerate(text.split("\n")[:-1], 1):
        if line.startswith("*") and line[1:] in TABLES:
            continue
        if line == "COMMIT" or (line.startswith("#") and not re.search(r"[\x00-\x1f\x7f]", line)):
            continue
        if _DECLARATION.fullmatch(line) or _COMMAND.fullmatch(line):
            continue
        raise UnsafeInput(f"iptables-restore input line {number} is malformed, refused: {line[:120]!r}")


class Iptables:
    """One address family's tables (`ip6tables` for IPv6) through the chosen backend's tools."""

    def __init__(self, backend: str, family: str = "iptables"):
        self.backend = backend
        self.family = family
        self._save = _binary(backend, "save", family)
        self._restore = _binary(backend, "restore", family)

    def save(self) -> dict[str, Table]:
        return parse_save(run([self._save], timeout=15).stdout)

    def save_counters(self, table: str = "filter") -> str:
        """`iptables-save -c -t TABLE`: every rule with its [packets:bytes] (for `canal policy stats`)."""
        if table not in TABLES:
            raise UnsafeInput(f"unknown iptables table {table!r}")
        return run([self._save, "-c", "-t", table], timeout=15).stdout

    def restore(self, text: str) -> None:
        """One atomic transaction per table; --noflush keeps everything we do not own."""
        check_restore(text)
        run([self._restore, "--noflush", "--wait", "5"], input=text, timeout=30)
