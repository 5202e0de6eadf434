"""A packet walked through the compiled filter rules, as the kernel would: for `canal policy explain`.

Why an interpreter of the emitted rule text rather than a second evaluation of the policy model:
the answer then cannot drift from what is programmed. Every rule the compiler writes is parsed
here; a match or target this module does not know raises EvaluationError (and the unit tests,
which evaluate every compiled chain, fail) instead of being silently skipped.

Semantics follow iptables: `-j CHAIN` calls, `-g CHAIN` jumps without a return address (a
RETURN from it returns to the chain that called the goto's chain), RETURN from a top-level chain
and falling off a user chain's end both return; MARK --set-xmark is `(mark & ~mask) ^ value`;
LOG continues.
"""

from __future__ import annotations

import functools
import ipaddress
import shlex
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

from canal.dataplane.ipset import IpSet
from canal.errors import CanalError
from canal.policy.compiler import protocol_name

__all__ = ["EvaluationError", "Packet", "Step", "Table", "Walk", "walk"]

TERMINAL = ("ACCEPT", "DROP")
MAX_DEPTH = 32


class EvaluationError(CanalError):
    """A compiled rule this evaluator cannot interpret: a bug to fix here, never a guess."""

    status = 500


@dataclass(frozen=True)
class Packet:
    """The first packet of a flow (conntrack state NEW, plus DNAT through a published port)."""

    src: str
    dst: str
    protocol: int  # IP protocol number
    sport: int = 40000
    dport: Optional[int] = None  # TCP/UDP/SCTP/UDPLite destination port
    icmp_type: Optional[int] = None  # ICMP or ICMPv6 type, as the packet's family has it
    icmp_code: int = 0
    iif: str = ""  # input interface ("" = none)
    oif: str = ""
    ctstate: FrozenSet[str] = frozenset({"NEW"})
    mark: int = 0


@dataclass(frozen=True)
class Step:
    """One rule that matched (target taken), in order."""

    chain: str
    index: int  # 0-based position in the chain
    rule: str
    target: str


@dataclass
class Walk:
    verdict: str  # ACCEPT | DROP | RETURN (fell out of the start chain)
    steps: List[Step] = field(default_factory=list)
    mark: int = 0


@functools.lru_cache(maxsize=1)
def _protocol_numbers() -> Dict[str, int]:
    return {protocol_name(n): n for n in range(256)}


class _Rule:
    """One rule split into match tokens and a target."""

    def __init__(self, text: str):
        self.text = text
        try:
            tokens = shlex.split(text)
        except ValueError as err:
            raise EvaluationError(f"cannot tokenise rule {text!r}: {err}") from None
        for flag in ("-j", "-g"):
            if flag in tokens:
                at = tokens.index(flag)
                self.matches = tokens[:at]
                self.goto = flag == "-g"
                self.target = tokens[at + 1]
                self.target_args = tokens[at + 2:]
                break
        else:
            raise EvaluationError(f"rule without a target: {text!r}")


def _iface(pattern: str, name: str) -> bool:
    if pattern.endswith("+"):
        return name.startswith(pattern[:-1])
    return name == pattern


@functools.lru_cache(maxsize=4096)
def _network(net: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Either family: the same walk serves iptables' and ip6tables' rules (an address never
    lies in a network of the other family)."""
    return ipaddress.ip_network(net, strict=False)


@functools.lru_cache(maxsize=4096)
def _address(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(address)


def _in_net(address: str, net: str) -> bool:
    return _address(address) in _network(net)


@functools.lru_cache(maxsize=1024)
def _ports(spec: str) -> List[Tuple[int, int]]:
    out = []
    for part in spec.split(","):
        start, _, end = part.partition(":")
        out.append((int(start), int(end or start)))
    return out


def _set_has(ipset: IpSet, address: str) -> bool:
    if ipset.kind == "hash:ip":
        return address in ipset.members
    if ipset.kind == "hash:net":
        return any(_in_net(address, net) for net in ipset.members)
    raise EvaluationError(f"ipset {ipset.name}: unknown type {ipset.kind}")


class _Matcher:
    def __init__(self, sets: Mapping[str, IpSet]):
        self.sets = sets
        self.protocols = _protocol_numbers()

    def matches(self, tokens: Sequence[str], packet: Packet, mark: int) -> bool:
        i = 0
        n = len(tokens)
        module = ""
        while i < n:
            negate = tokens[i] == "!"
            if negate:
                i += 1
            token = tokens[i]
            if token == "-m":
                module = tokens[i + 1]
                i += 2
                continue
            value = tokens[i + 1] if i + 1 < n else ""
            # Options of the current module may themselves be preceded by "!" (iptables-save
            # prints `-m set ! --match-set NAME src`).
            if token in ("-s", "-d"):
                ok = _in_net(packet.src if token == "-s" else packet.dst, value)
                i += 2
            elif token in ("-i", "-o"):
                ok = _iface(value, packet.iif if token == "-i" else packet.oif)
                i += 2
            elif token == "-p":
                if value not in self.protocols and not value.isdigit():
                    raise EvaluationError(f"unknown protocol {value!r} in rule {' '.join(tokens)!r}")
                ok = packet.protocol == (int(value) if value.isdigit() else self.protocols[value])
                i += 2
            elif token == "--match-set" and module == "set":
                name, direction = value, tokens[i + 2]
                if name not in self.sets:
                    raise EvaluationError(f"rule names ipset {name!r}, which the compiled state does not hold")
                ok = _set_has(self.sets[name], packet.src if direction == "src" else packet.dst)
                i += 3
            elif token in ("--sports", "--dports") and module == "multiport":
                port = packet.sport if token == "--sports" else packet.dport
                ok = port is not None and any(a <= port <= b for a, b in _ports(value))
                i += 2
            elif token in ("--dport", "--sport") and module in ("tcp", "udp", "sctp", "udplite"):
                port = packet.sport if token == "--sport" else packet.dport
                ok = port is not None and port == int(value)
                i += 2
            elif (token == "--icmp-type" and module == "icmp") or (token == "--icmpv6-type" and module == "icmp6"):
                type_text, _, code_text = value.partition("/")
                ok = packet.icmp_type == int(type_text) and (not code_text or packet.icmp_code == int(code_text))
                i += 2
            elif token == "--mark" and module == "mark":
                want, _, mask_text = value.partition("/")
                mask = int(mask_text, 0) if mask_text else 0xFFFFFFFF
                ok = mark & mask == int(want, 0)
                i += 2
            elif token == "--ctstate" and module == "conntrack":
                ok = bool(set(value.split(",")) & packet.ctstate)
                i += 2
            else:
                raise EvaluationError(f"cannot evaluate {token!r} in rule {' '.join(tokens)!r}")
            if ok == negate:
                return False
        return True


class Table:
    """One host's compiled filter chains and ipsets; rules are parsed once, walked many times."""

    def __init__(self, chains: Mapping[str, Sequence[str]], sets: Sequence[IpSet]):
        self.chains = chains
        self.matcher = _Matcher({s.name: s for s in sets})
        self._parsed: Dict[str, List[_Rule]] = {}
        self._dispatch: Dict[str, Tuple[str, Dict[str, int], int]] = {}

    def rules(self, chain: str) -> List[_Rule]:
        if chain not in self._parsed:
            if chain not in self.chains:
                raise EvaluationError(f"jump to chain {chain!r}, which the compiled state does not hold")
            parsed = [_Rule(text) for text in self.chains[chain]]
            self._parsed[chain] = parsed
            self._index_dispatch(chain, parsed)
        return self._parsed[chain]

    def _index_dispatch(self, chain: str, parsed: List[_Rule]) -> None:
        """A chain of `-i IFACE -g X` (or -o) rules, one per endpoint, is entered at the rule
        for the packet's interface instead of scanning them all: the first rule naming the
        interface, which is the one a scan would match first (same result, not O(endpoints))."""
        if len(parsed) < 8:
            return
        flags = {r.matches[0] for r in parsed[:-1] if len(r.matches) == 2}
        if len(flags) != 1 or flags.pop() not in ("-i", "-o"):
            return
        flag = parsed[0].matches[0]
        if any(len(r.matches) != 2 or r.matches[0] != flag or r.matches[1].endswith("+") for r in parsed[:-1]):
            return
        index: Dict[str, int] = {}
        for i, r in enumerate(parsed[:-1]):
            index.setdefault(r.matches[1], i)
        self._dispatch[chain] = (flag, index, len(parsed) - 1)

    def _entry(self, chain: str, packet: Packet) -> int:
        dispatch = self._dispatch.get(chain)
        if dispatch is None:
            return 0
        flag, index, last = dispatch
        return index.get(packet.iif if flag == "-i" else packet.oif, last)

    def walk(self, start: str, packet: Packet) -> Walk:
        """Walk `packet` from chain `start`; verdict ACCEPT, DROP, or RETURN (back to the caller)."""
        result = Walk("RETURN", mark=packet.mark)
        # A stack of (chain, next index); a goto replaces the top frame instead of pushing one.
        self.rules(start)
        stack: List[List] = [[start, self._entry(start, packet)]]
        while stack:
            if len(stack) > MAX_DEPTH:
                raise EvaluationError(f"chains nested deeper than {MAX_DEPTH} from {start}")
            frame = stack[-1]
            chain, index = frame
            body = self.rules(chain)
            if index >= len(body):
                stack.pop()  # fell off a user chain: return to its caller
                continue
            frame[1] = index + 1
            rule = body[index]
            if not self.matcher.matches(rule.matches, packet, result.mark):
                continue
            result.steps.append(Step(chain, index, rule.text, rule.target))
            target = rule.target
            if target in TERMINAL:
                result.verdict = target
                return result
            if target == "RETURN":
                stack.pop()
            elif target == "MARK":
                if rule.target_args[:1] != ["--set-xmark"]:
                    raise EvaluationError(f"cannot evaluate MARK {rule.target_args} in {rule.text!r}")
                value_text, _, mask_text = rule.target_args[1].partition("/")
                mask = int(mask_text, 0) if mask_text else 0xFFFFFFFF
                result.mark = (result.mark & ~mask) ^ int(value_text, 0)
            elif target == "LOG":
                pass
            elif rule.goto:
                self.rules(target)
                stack[-1] = [target, self._entry(target, packet)]
            else:
                self.rules(target)
                stack.append([target, self._entry(target, packet)])
        return result


def walk(chains: Mapping[str, Sequence[str]], sets: Sequence[IpSet], start: str, packet: Packet) -> Walk:
    """Walk `packet` from chain `start` of one table's compiled chains (name -> rule texts)."""
    return Table(chains, sets).walk(start, packet)
