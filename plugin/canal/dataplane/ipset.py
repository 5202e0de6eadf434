"""ipsets written atomically: each set is filled under a temporary name, then swapped in.

Rules reference sets by name, so membership changes (endpoints coming and going) touch sets
only, never iptables rules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from canal.dataplane.cmd import run

log = logging.getLogger(__name__)

PREFIX = "canal-"
MAX_NAME = 31


@dataclass(frozen=True)
class IpSet:
    name: str
    kind: str  # "hash:ip" or "hash:net"
    members: frozenset[str]


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


def _normal(member: str) -> str:
    """ipset prints /32 networks of hash:net sets without the suffix."""
    return member[:-3] if member.endswith("/32") else member


def restore_script(desired: list[IpSet], present: dict[str, set[str]]) -> str:
    """The `ipset restore` input that brings changed sets to their desired members: small
    changes as adds and dels on the live set (one endpoint joining touches one line), large
    ones by filling a temporary set and swapping it in."""
    lines: list[str] = []
    for ipset in desired:
        want = {_normal(m) for m in ipset.members}
        if ipset.name in present:
            have = {_normal(m) for m in present[ipset.name]}
            if have == want:
                continue
            added, removed = want - have, have - want
            if len(added) + len(removed) <= max(16, len(want) // 4):
                lines.extend(f"del {ipset.name} {m} -exist" for m in sorted(removed))
                lines.extend(f"add {ipset.name} {m} -exist" for m in sorted(added))
                continue
        tmp = ipset.name[: MAX_NAME - 4] + "-tmp"
        size = max(65536, 2 * len(ipset.members))
        lines.append(f"create {tmp} {ipset.kind} family inet maxelem {size} -exist")
        lines.append(f"flush {tmp}")
        lines.extend(f"add {tmp} {m}" for m in sorted(ipset.members))
        lines.append(f"create {ipset.name} {ipset.kind} family inet maxelem {size} -exist")
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

    def current(self) -> dict[str, set[str]]:
        return current()

    def apply(self, desired: list[IpSet], read_back: bool = True) -> None:
        if read_back or self._known is None:
            self._known = self.current()
        script = restore_script(desired, self._known)
        if script:
            try:
                run(["ipset", "restore"], input=script, timeout=30)
            except Exception:
                self._known = None
                raise
            self._known.update({s.name: set(s.members) for s in desired})

    def destroy_unused(self, keep: set[str]) -> None:
        """Destroy our sets that are not wanted; call after rules stop referencing them."""
        known = self._known if self._known is not None else self.current()
        for name in sorted(set(known) - keep):
            proc = run(["ipset", "destroy", name], check=False, timeout=10)
            if proc.returncode != 0:
                log.warning("could not destroy ipset %s: %s", name, proc.stderr.strip())
            known.pop(name, None)
