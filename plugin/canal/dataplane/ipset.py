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
    """The `ipset restore` input that brings changed sets to their desired members."""
    lines: list[str] = []
    for ipset in desired:
        if ipset.name in present and {_normal(m) for m in present[ipset.name]} == {
            _normal(m) for m in ipset.members
        }:
            continue
        tmp = ipset.name[: MAX_NAME - 4] + "-tmp"
        size = max(1024, 2 * len(ipset.members))
        lines.append(f"create {tmp} {ipset.kind} family inet maxelem {max(65536, size)} -exist")
        lines.append(f"flush {tmp}")
        lines.extend(f"add {tmp} {m}" for m in sorted(ipset.members))
        lines.append(f"create {ipset.name} {ipset.kind} family inet maxelem {max(65536, size)} -exist")
        lines.append(f"swap {tmp} {ipset.name}")
        lines.append(f"destroy {tmp}")
    return "\n".join(lines) + ("\n" if lines else "")


class Ipsets:
    """The kernel's ipsets (of this network namespace), through the ipset command."""

    def current(self) -> dict[str, set[str]]:
        return current()

    def apply(self, desired: list[IpSet]) -> None:
        script = restore_script(desired, self.current())
        if script:
            run(["ipset", "restore"], input=script, timeout=30)

    def destroy_unused(self, keep: set[str]) -> None:
        """Destroy our sets that are not wanted; call after rules stop referencing them."""
        for name in sorted(set(self.current()) - keep):
            proc = run(["ipset", "destroy", name], check=False, timeout=10)
            if proc.returncode != 0:
                log.warning("could not destroy ipset %s: %s", name, proc.stderr.strip())
