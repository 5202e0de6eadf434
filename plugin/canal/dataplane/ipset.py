"""ipsets written atomically: each set is filled under a temporary name, then swapped in.

Rules reference sets by name, so membership changes (endpoints coming and going) touch sets
only, never iptables rules.

`ipset restore` reads one command per line, so set names, types and members are checked before
they become input: a member that is not an IPv4 address/CIDR (a record that smuggled
"\nadd canal-nets 0.0.0.0/1" in) can match nothing in the kernel anyway, so it is dropped with a
warning; a bad name or type is a bug, refused as UnsafeInput.
"""

from __future__ import annotations

import collections.abc
import ipaddress
import logging
import re
from dataclasses import dataclass
from typing import AbstractSet, Any, Iterable, Iterator

from canal.dataplane.cmd import run
from canal.errors import UnsafeInput
from canal.records import IPV4_TEXT

log = logging.getLogger(__name__)

PREFIX = "canal-"
MAX_NAME = 31
KINDS = ("hash:ip", "hash:net")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,30}")
_MEMBER = re.compile(rf"{IPV4_TEXT}(?:/(?:3[0-2]|[0-2]?[0-9]))?")
_MEMBER6 = re.compile(r"[0-9a-f:]{2,39}(?:/[0-9]{1,3})?")
FAMILIES = ("inet", "inet6")


class StaleMembers(RuntimeError):
    """A Members view read after its TrackedSet changed (a bug: views live for one pass)."""


class TrackedSet:
    """One ipset's members kept incrementally (canal.agent.index), with a journal of the members
    touched per version: the applier writes only those (one endpoint joining: one line)."""

    def __init__(self) -> None:
        self.members: set[str] = set()
        # member -> how many contributors give it, for members given more than once (two
        # records may briefly share an address): it leaves the set only with the last one. The
        # usual single contributor costs no entry (100 bytes a member at 100,000 endpoints).
        self._extra: dict[str, int] = {}
        self.version = 0
        self._log: list[str] = []  # member touched by version floor+1 .. version
        self._floor = 0

    def add(self, member: str) -> None:
        if member in self.members:
            self._extra[member] = self._extra.get(member, 1) + 1
            return
        self.members.add(member)
        self._touch(member)

    def discard(self, member: str) -> None:
        """Take one contribution of `member` back (it must have been added)."""
        if member not in self.members:
            raise KeyError(member)
        count = self._extra.pop(member, 1) - 1
        if count > 1:
            self._extra[member] = count
        if count:
            return
        self.members.discard(member)
        self._touch(member)

    def _touch(self, member: str) -> None:
        self.version += 1
        self._log.append(member)
        if len(self._log) > max(1024, 2 * len(self.members)):  # bounded: old readers diff whole
            self._log.clear()
            self._floor = self.version

    def touched_since(self, version: int) -> set[str] | None:
        """Members added or removed after `version`; None when the journal no longer reaches back."""
        if version < self._floor or version > self.version:
            return None
        return set(self._log[version - self._floor:])

    def view(self) -> "Members":
        return Members(self, self.version, len(self.members))


class Members(AbstractSet[str]):
    """A read-only view of a TrackedSet at one version. Two views of one set are equal when
    their versions are (so an unchanged set compares in O(1)); against anything else, by content.
    Its size stays readable later, from any thread (metrics count what was programmed)."""

    __slots__ = ("source", "version", "size")

    def __init__(self, source: TrackedSet, version: int, size: int):
        self.source = source
        self.version = version
        self.size = size

    def _live(self) -> set[str]:
        if self.source.version != self.version:
            raise StaleMembers("ipset members read after they changed")
        return self.source.members

    def __contains__(self, member: object) -> bool:
        return member in self._live()

    def __iter__(self) -> Iterator[str]:
        return iter(self._live())

    def __len__(self) -> int:
        return self.size

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, Members):
            if other.source is self.source:
                return other.version == self.version
            if other.stale:
                return False
        if self.stale:
            return False  # what it held is unknown now: never "unchanged"
        return collections.abc.Set.__eq__(self, other)

    @property
    def stale(self) -> bool:
        return self.source.version != self.version

    def __hash__(self) -> int:
        return hash((id(self.source), self.version))

    def __repr__(self) -> str:
        return f"Members(v{self.version}, {self.size} members)"


@dataclass(frozen=True)
class IpSet:
    name: str
    kind: str  # "hash:ip" or "hash:net"
    members: AbstractSet[str]  # a frozenset, or a Members view (incremental passes)
    family: str = "inet"  # "inet6": IPv6 members (policy of networks created with --ipv6)


def current() -> dict[str, set[str]]:
    """Our sets as the kernel holds them now: name -> members."""
    out: dict[str, set[str]] = {}
    text = run(["ipset", "save"], timeout=15).stdout
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "create" and parts[1].startswith(PREFIX):
            out[parts[1]] = set()
        elif len(parts) >= 3 and parts[0] == "add" and parts[1] in out:
            out[parts[1]].add(parts[2])
    return out


def _normalised(members: AbstractSet[str]) -> set[str]:
    """The members as ipset prints them; a set of addresses only (most) is taken as it is,
    found in C (one join) rather than by a Python loop over every member."""
    if "/" not in "".join(members):
        return set(members)
    return {_normal(m) for m in members}


def _normal(member: str) -> str:
    """ipset prints /32 (/128) networks of hash:net sets without the suffix."""
    if member.endswith("/128"):
        return member[:-4]
    return member[:-3] if member.endswith("/32") else member


def valid_member(member: object, family: str = "inet") -> bool:
    """An IPv4 (inet6: IPv6) address or CIDR as ipset prints it: nothing else may become a
    restore line."""
    if family == "inet6":
        if not isinstance(member, str) or not _MEMBER6.fullmatch(member):
            return False
        try:
            ipaddress.IPv6Network(member, strict=False)
        except ValueError:
            return False
        return True
    # One regex with the octets' and the prefix's ranges: every member of a set written whole
    # (175,000 at a restart with 100,000 endpoints) was an ipaddress object made and dropped.
    return isinstance(member, str) and _MEMBER.fullmatch(member) is not None


def _check_name(ipset: IpSet) -> None:
    if not isinstance(ipset.name, str) or not _NAME.fullmatch(ipset.name):
        raise UnsafeInput(f"ipset name {str(ipset.name)[:80]!r} is malformed, refused")
    if ipset.family not in FAMILIES:
        raise UnsafeInput(f"ipset {ipset.name}: family {str(ipset.family)[:40]!r} is not inet or inet6")
    if ipset.kind not in KINDS:
        raise UnsafeInput(f"ipset {ipset.name}: type {str(ipset.kind)[:40]!r} is not one of {', '.join(KINDS)}")


def _valid_lines(ipset: IpSet, members: Iterable[str]) -> list[str]:
    """The members about to be written, checked: only what reaches `ipset restore` is parsed
    (a pass that adds one endpoint checks one address, not every member of every set)."""
    good: list[str] = []
    bad: list[str] = []
    for member in sorted(members):
        (good if valid_member(member, ipset.family) else bad).append(member)
    if bad:
        log.warning("ipset %s: dropping %d malformed member(s), e.g. %r", ipset.name, len(bad), str(bad[0])[:80])
    return good


# Every set is made with this room: maxelem is only a limit (the kernel grows the hash as it
# fills), so one size for all means a set never has to be re-declared with another as it
# grows, which `create -exist` refuses ("set with the same name already exists").
MAXELEM = 1 << 22


def restore_script(desired: list[IpSet], present: dict[str, set[str]], rewrite: bool = False) -> str:
    """The `ipset restore` input that brings changed sets to their desired members: small
    changes as adds and dels on the live set (one endpoint joining touches one line), large
    ones (or all changed sets, `rewrite`: after a failed restore) by filling a temporary set
    and swapping it in. Swapping also moves a set made by an older release onto MAXELEM."""
    lines: list[str] = []
    for ipset in desired:
        _check_name(ipset)
        want = _normalised(ipset.members)
        if ipset.name in present:
            have = _normalised(present[ipset.name])
            if have == want:
                continue
            added, removed = want - have, have - want
            if not rewrite and len(added) + len(removed) <= max(16, len(want) // 4):
                lines.extend(f"del {ipset.name} {m} -exist" for m in _valid_lines(ipset, removed))
                lines.extend(f"add {ipset.name} {m} -exist" for m in _valid_lines(ipset, added))
                continue
        tmp = ipset.name[: MAX_NAME - 4] + "-tmp"
        if tmp in present:  # left by a restore that failed half-way: it may have another type
            lines.append(f"destroy {tmp}")
        lines.append(f"create {tmp} {ipset.kind} family {ipset.family} maxelem {MAXELEM}")
        lines.extend(f"add {tmp} {m}" for m in _valid_lines(ipset, ipset.members))
        if ipset.name not in present:
            lines.append(f"create {ipset.name} {ipset.kind} family {ipset.family} maxelem {MAXELEM}")
        lines.append(f"swap {tmp} {ipset.name}")
        lines.append(f"destroy {tmp}")
    return "\n".join(lines) + ("\n" if lines else "")


class Ipsets:
    """The kernel's ipsets (of this network namespace), through the ipset command.

    Remembers what it last wrote, so an event-driven pass diffs against memory; a full pass
    (read_back=True) reads the kernel and repairs what someone else changed.
    """

    def __init__(self) -> None:
        self._known: dict[str, set[str]] | None = None
        self._failed = False
        # name -> (TrackedSet, version) whose members _known[name] holds: the next pass writes
        # only the members touched since (Felix's delta tracking), never diffs the whole set.
        self._versions: dict[str, tuple[TrackedSet, int]] = {}

    def current(self) -> dict[str, set[str]]:
        return current()

    def apply(self, desired: list[IpSet], read_back: bool = True) -> None:
        # After a failed restore (a full hash, a set of another type in the way), whatever
        # failed is rewritten whole: replaying the same adds would fail the same way forever.
        rewrite, self._failed = self._failed, False
        if read_back or self._known is None:
            self._known = self.current()
            self._versions = {}
        known = self._known
        whole: list[IpSet] = []
        deltas: list[tuple[IpSet, list[str], list[str]]] = []
        for ipset in desired:
            delta = None if rewrite else self._delta(ipset, known)
            if delta is None:
                whole.append(ipset)
            elif delta[0] or delta[1]:
                deltas.append((ipset, *delta))
        lines: list[str] = []
        for ipset, added, removed in deltas:
            _check_name(ipset)
            lines.extend(f"del {ipset.name} {m} -exist" for m in _valid_lines(ipset, removed))
            lines.extend(f"add {ipset.name} {m} -exist" for m in _valid_lines(ipset, added))
        script = restore_script(whole, known, rewrite) + "".join(line + "\n" for line in lines)
        if script:
            try:
                run(["ipset", "restore"], input=script, timeout=30)
            except Exception:
                self._known = None
                self._failed = True
                self._versions = {}
                raise
        for ipset, added, removed in deltas:
            known[ipset.name].difference_update(removed)
            known[ipset.name].update(added)
        for ipset in whole:
            if script or ipset.name not in known:
                known[ipset.name] = set(ipset.members)
        for ipset in desired:
            if isinstance(ipset.members, Members):
                self._versions[ipset.name] = (ipset.members.source, ipset.members.version)
            else:
                self._versions.pop(ipset.name, None)

    def _delta(self, ipset: IpSet, known: dict[str, set[str]]) -> tuple[list[str], list[str]] | None:
        """(members to add, members to delete) from the journal of its TrackedSet, or None: diff
        the whole set (not a view, another set or version than last written, journal too short)."""
        members = ipset.members
        last = self._versions.get(ipset.name)
        if not isinstance(members, Members) or last is None or last[0] is not members.source:
            return None
        if ipset.name not in known:
            return None
        touched = members.source.touched_since(last[1])
        if touched is None:
            return None
        have = known[ipset.name]
        added = [m for m in touched if m in members and m not in have]
        removed = [m for m in touched if m not in members and m in have]
        return added, removed

    def destroy_unused(self, keep: set[str]) -> None:
        """Destroy our sets that are not wanted; call after rules stop referencing them."""
        known = self._known if self._known is not None else self.current()
        for name in sorted(set(known) - keep):
            proc = run(["ipset", "destroy", name], check=False, timeout=10)
            if proc.returncode != 0:
                log.warning("could not destroy ipset %s: %s", name, proc.stderr.strip())
            known.pop(name, None)
