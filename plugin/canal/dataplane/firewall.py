"""Desired firewall state (pure data) and the one applier that diffs and programs it.

We own every chain named CANAL-* and every ipset named canal-*: they are rewritten whole.
Built-in chains are touched only to insert (and, on removal, delete) one jump each, and each
jump is kept first in its chain (after the rules it may follow, e.g. Docker's DOCKER-USER):
a tool that inserts a rule ahead of it is undone by the next read-back pass, as Felix does.
Both address families go through the same code: IPv4 (`chains`, `jumps`) with iptables,
IPv6 (`chains6`, `jumps6`) with ip6tables of the same backend.
"""

from __future__ import annotations

import collections
import difflib
import logging
from dataclasses import dataclass, field

from canal import metrics
from canal.dataplane.ipset import IpSet, Ipsets
from canal.dataplane.iptables import Iptables, Table
from canal.errors import CommandFailed

log = logging.getLogger(__name__)

CHAIN_PREFIX = "CANAL-"


@dataclass(frozen=True)
class Jump:
    table: str
    builtin: str
    chain: str
    # Rules that may stay ahead of this jump (Docker re-inserts DOCKER-USER at the top of
    # FORWARD whenever it creates a network: fighting over the first slot would flap).
    after: frozenset[str] = frozenset()
    # A match in front of the jump (e.g. "-i cnl+"): where every rule of the chain carries it,
    # the jump does, so the host's other packets skip the chain on one interface check instead
    # of one per rule (each is an interface-name load per packet under iptables-nft).
    match: str = ""

    @property
    def spec(self) -> str:
        return f"{self.match} -j {self.chain}" if self.match else f"-j {self.chain}"


@dataclass
class FirewallState:
    chains: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (table, chain) -> rules
    jumps: list[Jump] = field(default_factory=list)
    ipsets: list[IpSet] = field(default_factory=list)
    chains6: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # the same, for ip6tables
    jumps6: list[Jump] = field(default_factory=list)

    def family6(self) -> "FirewallState":
        """The IPv6 half as a state of its own (for restore_text and tables_of)."""
        return FirewallState(chains=self.chains6, jumps=self.jumps6)


def _lead(jump: Jump, rules: list[str]) -> int:
    """How many rules at the top of the chain the jump may follow (e.g. DOCKER-USER)."""
    lead = 0
    while lead < len(rules) and rules[lead] in jump.after:
        lead += 1
    return lead


def _in_place(jump: Jump, rules: list[str]) -> bool:
    """The jump is the first rule of its chain, not counting the rules it may follow."""
    lead = _lead(jump, rules)
    return lead < len(rules) and rules[lead] == jump.spec


def _edits(chain: str, have: list[str], want: list[str]) -> list[str] | None:
    """The deletes and inserts that turn a chain's rules `have` into `want`, when that is the
    smaller change: one endpoint joining adds two gotos to the dispatch chains of 1,500, and
    rewriting them whole cost iptables-nft-restore 0.9 s where the inserts cost 28 ms. None:
    flush and rewrite (large changes; or a rule to delete that is not unique in the chain, as
    a delete by spec removes the first match). Deletes go by spec, so a kernel that is not as
    last programmed fails the restore (and the agent's retry reads it back) instead of losing
    a rule it was not asked to."""
    ops = [op for op in difflib.SequenceMatcher(a=have, b=want, autojunk=False).get_opcodes() if op[0] != "equal"]
    gone = [have[i] for tag, i1, i2, _, _ in ops if tag in ("replace", "delete") for i in range(i1, i2)]
    new = [j for tag, _, _, j1, j2 in ops if tag in ("replace", "insert") for j in range(j1, j2)]
    if 2 * (len(gone) + len(new)) > len(want) + 8:
        return None
    if gone:
        counts = collections.Counter(have)
        if any(counts[rule] > 1 for rule in gone):
            return None
    # Deleted first, then inserted in ascending order of their final position: each insert then
    # finds every rule that precedes it in `want` already in place.
    return [f"-D {chain} {rule}" for rule in gone] + [f"-I {chain} {j + 1} {want[j]}" for j in new]


def restore_text(desired: FirewallState, tables: dict[str, Table]) -> str:
    """iptables-restore input turning `tables` (as saved) into `desired`; "" if nothing to do."""
    out: list[str] = []
    names = {t for t, _ in desired.chains} | {j.table for j in desired.jumps}
    names |= {t for t, table in tables.items() if any(c.startswith(CHAIN_PREFIX) for c in table.chains)}
    for name in sorted(names):
        table = tables.get(name, Table(name))
        wanted = {c: rules for (t, c), rules in desired.chains.items() if t == name}
        jumps = [j for j in desired.jumps if j.table == name]
        lines: list[str] = []
        changed = [c for c in sorted(wanted) if not (c in table.chains and table.rules.get(c) == wanted[c])]
        edits = {c: _edits(c, table.rules.get(c, []), wanted[c]) for c in changed if c in table.chains}
        # Declare every chain before any rule: a jump to a chain declared later is refused.
        lines.extend(f":{chain} - [0:0]" for chain in changed if edits.get(chain) is None)
        for chain in changed:
            edit = edits.get(chain)
            if edit is not None:
                lines.extend(edit)
                continue
            lines.append(f"-F {chain}")
            lines.extend(f"-A {chain} {rule}" for rule in wanted[chain])
        misplaced = [j for j in jumps if not _in_place(j, table.rules.get(j.builtin, []))]
        stale = [c for c in table.chains if c.startswith(CHAIN_PREFIX) and c not in wanted]
        wanted_jumps = {(j.builtin, j.spec) for j in jumps if j not in misplaced}
        for chain, rules in sorted(table.rules.items()):
            if chain.startswith(CHAIN_PREFIX):
                continue  # our own chains are rewritten or removed whole
            seen: set[str] = set()
            for rule in rules:
                if f"-j {CHAIN_PREFIX}" not in rule:
                    continue
                if (chain, rule) in wanted_jumps and rule not in seen:
                    seen.add(rule)
                    continue
                lines.append(f"-D {chain} {rule}")  # stale, duplicate or misplaced jump
        for jump in misplaced:  # (re)inserted after the deletions, so positions are known
            rules = [r for r in table.rules.get(jump.builtin, []) if f"-j {CHAIN_PREFIX}" not in r]
            lines.append(f"-I {jump.builtin} {_lead(jump, rules) + 1} {jump.spec}")
        for chain in stale:
            lines.append(f"-F {chain}")
        for chain in stale:
            lines.append(f"-X {chain}")
        if lines:
            out.append(f"*{name}")
            out.extend(lines)
            out.append("COMMIT")
    return "\n".join(out) + ("\n" if out else "")


def tables_of(state: FirewallState) -> dict[str, Table]:
    """The tables as they look when exactly `state` is programmed (as far as we own them)."""
    tables: dict[str, Table] = {}
    for (name, chain), rules in state.chains.items():
        table = tables.setdefault(name, Table(name))
        table.chains[chain] = "-"
        table.rules[chain] = list(rules)
    for jump in state.jumps:
        table = tables.setdefault(jump.table, Table(jump.table))
        table.rules.setdefault(jump.builtin, []).append(jump.spec)
    return tables


class Firewall:
    """Event-driven passes diff against what was last programmed (no iptables-save);
    read-back passes diff against the kernel and so repair tampering (Felix's refresh)."""

    def __init__(self, iptables: Iptables, ipsets: Ipsets | None = None, ip6tables: Iptables | None = None):
        self.iptables = iptables
        self.ip6tables = ip6tables  # None: IPv6 not programmed (a kernel without it)
        self.ipsets = ipsets or Ipsets()
        self._applied: FirewallState | None = None

    @property
    def applied(self) -> FirewallState | None:
        """What was last programmed (None before the first pass or after a failed restore)."""
        return self._applied

    @staticmethod
    def _restore(iptables: Iptables, text: str) -> None:
        log.debug("%s-restore:\n%s", iptables.family, text)
        metrics.IPTABLES_RESTORES.labels(iptables.family).inc()
        try:
            iptables.restore(text)
        except Exception:
            metrics.IPTABLES_RESTORE_ERRORS.labels(iptables.family).inc()
            raise

    def apply(self, desired: FirewallState, read_back: bool = True, read_back_sets: bool | None = None) -> bool:
        """Program desired; True if anything had to change. read_back_sets: whether the ipsets'
        members are read back too (default: as read_back)."""
        if not read_back and self._applied == desired:
            return False
        self.ipsets.apply(desired.ipsets, read_back if read_back_sets is None else read_back_sets)
        applied = None if read_back else self._applied  # None: diff against the kernel
        families = [(self.iptables, desired, applied)]
        if self.ip6tables is not None:
            families.append((self.ip6tables, desired.family6(), applied and applied.family6()))
        changed = False
        for iptables, wanted, last in families:
            text = restore_text(wanted, iptables.save() if last is None else tables_of(last))
            if not text:
                continue
            self._applied = None  # unknown until the restore succeeded
            try:
                self._restore(iptables, text)
            except CommandFailed as err:
                if last is None:
                    raise
                # Edits made against what we last programmed no longer fit the kernel (someone
                # changed our chains): diff against the kernel itself, in this same pass.
                log.warning("%s: our chains are not as last programmed (%s); reading them back",
                            iptables.family, str(err)[-200:])
                text = restore_text(wanted, iptables.save())
                if text:
                    self._restore(iptables, text)
            changed = True
        self._applied = desired
        self.ipsets.destroy_unused({s.name for s in desired.ipsets})
        return changed
