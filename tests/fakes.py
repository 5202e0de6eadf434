"""Stateful fakes: they keep state and are asserted on by result, not by call sequence."""

from __future__ import annotations

import shlex

from canal.dataplane.iptables import Table, parse_save
from canal.dataplane.links import EndpointLink
from canal.dataplane.ports import HostPort, Reservations
from canal.errors import Conflict


class FakeIptables:
    """Accepts iptables-restore --noflush input and answers save(), like the kernel would."""

    family = "iptables"

    def __init__(self, save_text: str = ""):
        self.tables: dict[str, Table] = parse_save(save_text) if save_text else {}
        self.restores: list[str] = []
        builtin_chains = {
            "filter": ("INPUT", "FORWARD", "OUTPUT"),
            "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
            "raw": ("PREROUTING", "OUTPUT"),
        }
        for name, builtins in builtin_chains.items():
            table = self.tables.setdefault(name, Table(name))
            for chain in builtins:
                table.chains.setdefault(chain, "ACCEPT")
                table.rules.setdefault(chain, [])

    def save(self) -> dict[str, Table]:
        return {
            name: Table(name, dict(t.chains), {c: list(r) for c, r in t.rules.items()})
            for name, t in self.tables.items()
        }

    def save_counters(self, table: str = "filter") -> str:
        """`iptables-save -c -t TABLE` of the fake: each rule's counters from `self.counters`
        ((chain, index) -> (packets, bytes)), zero when unset."""
        t = self.tables.get(table, Table(table))
        counters = getattr(self, "counters", {})
        lines = [f"*{table}"] + [f":{c} {p} [0:0]" for c, p in t.chains.items()]
        for chain, rules in t.rules.items():
            for i, rule in enumerate(rules):
                packets, octets = counters.get((chain, i), (0, 0))
                lines.append(f"[{packets}:{octets}] -A {chain} {rule}")
        return "\n".join(lines + ["COMMIT", ""])

    def restore(self, text: str) -> None:
        self.restores.append(text)
        table: Table | None = None
        for line in text.splitlines():
            if line.startswith("*"):
                table = self.tables.setdefault(line[1:], Table(line[1:]))
            elif line == "COMMIT":
                table = None
            elif line.startswith(":"):
                chain = line[1:].split()[0]
                assert table is not None
                table.chains[chain] = "-"
                table.rules[chain] = []  # --noflush still flushes a declared chain
            else:
                assert table is not None, f"rule outside a table: {line}"
                op, chain, *rest = line.split(" ", 2)
                spec = rest[0] if rest else ""
                target = spec.split("-j ", 1)[1].split()[0] if "-j " in spec else ""
                target = target or (spec.split("-g ", 1)[1].split()[0] if "-g " in spec else "")
                if op in ("-A", "-I") and target.startswith("CANAL-"):
                    assert target in table.chains, f"iptables-restore: Chain '{target}' does not exist"
                if op == "-A":
                    assert chain in table.chains, f"no chain {chain}"
                    table.rules[chain].append(spec)
                elif op == "-I":
                    position, spec = spec.split(" ", 1)
                    assert position.isdigit() and 1 <= int(position) <= len(table.rules[chain]) + 1, line
                    table.rules[chain].insert(int(position) - 1, spec)
                elif op == "-D":
                    table.rules[chain].remove(spec)
                elif op == "-F":
                    table.rules[chain] = []
                elif op == "-X":
                    for other, rules in table.rules.items():
                        assert not any(f"-j {chain}" in r for r in rules), f"{chain} still referenced by {other}"
                    del table.chains[chain]
                    del table.rules[chain]
                else:
                    raise AssertionError(f"unexpected restore line {shlex.quote(line)}")


class FakeLinks:
    """The kernel's veths as a dict: name -> EndpointLink."""

    def __init__(self) -> None:
        import threading

        self.veths: dict[str, EndpointLink] = {}
        self.prepared: dict[str, EndpointLink] = {}  # prepare()d ahead of a Join, not yet joined
        self.guard = threading.RLock()

    def ensure_veth(self, link: EndpointLink) -> None:
        self.veths[link.host_if] = link
        self.prepared.pop(link.host_if, None)

    def prepare(self, link: EndpointLink) -> None:
        self.prepared[link.host_if] = link

    def forget(self, endpoint_id: str) -> None:
        self.prepared = {n: l for n, l in self.prepared.items() if l.endpoint_id != endpoint_id}

    def delete(self, endpoint_id: str) -> None:
        self.veths = {n: l for n, l in self.veths.items() if l.endpoint_id != endpoint_id}

    def orphans(self, desired: list[EndpointLink]) -> set[str]:
        return set(self.veths) - {l.host_if for l in desired}

    def reconcile(self, desired: list[EndpointLink], orphans: set[str], full: bool = True) -> None:
        self.veths = {n: l for n, l in self.veths.items() if n not in orphans}

    def close(self) -> None:
        pass


class FakeIpsets:
    """ipsets as a dict; refuses to destroy a set that a rule of `iptables` still references."""

    def __init__(self, iptables: FakeIptables | None = None):
        self.sets: dict[str, set[str]] = {}
        self.iptables = iptables

    def current(self) -> dict[str, set[str]]:
        return {k: set(v) for k, v in self.sets.items()}

    def apply(self, desired, read_back: bool = True) -> None:
        for ipset in desired:
            self.sets[ipset.name] = set(ipset.members)

    def destroy_unused(self, keep: set[str]) -> None:
        for name in set(self.sets) - keep:
            if self.iptables is not None:
                for table in self.iptables.tables.values():
                    for rules in table.rules.values():
                        assert not any(name in r.split() for r in rules), f"ipset {name} still in use"
            del self.sets[name]


class FakeReservations(Reservations):
    """Reservations without sockets: the contract tests run in the machine's own namespace,
    whose ports are not theirs to hold. `busy` plays ports a host process holds."""

    def __init__(self) -> None:
        super().__init__()
        self.busy: dict[HostPort, str] = {}

    def reserve(self, key: HostPort, endpoint: str) -> None:
        with self._lock:
            held = self._held.get(key)
            if held is not None:
                if held[0] == endpoint:
                    return
                raise Conflict(f"host port {key} is already published by endpoint {held[0][:12]}")
            if key in self.busy:
                raise Conflict(f"host port {key} is in use by {self.busy[key]}")
            self._held[key] = (endpoint, _NoSocket())  # type: ignore[assignment]
            self._since[key] = self.clock()


class _NoSocket:
    def close(self) -> None:
        pass
