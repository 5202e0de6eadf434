"""Policy resources (Calico v3 field names), validated strictly because they are security policy.

Every document is checked field by field and the whole input is refused on the first error, with
the document index and field path in the message: a typo that was silently ignored (an unknown
field, a duplicated key, a YAML 1.1 sexagesimal number) would widen or narrow policy without anyone
noticing. Defaults are resolved here (types, order) so the stored form is explicit and the compiler
never guesses.

    apiVersion: canal/v1
    kind: NetworkPolicy | GlobalNetworkPolicy
    metadata: {name: ..., network: ...}      # network only (and required) for NetworkPolicy
    spec: {order, selector, types, ingress: [Rule], egress: [Rule]}
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, NoReturn, Optional, Sequence, Tuple, Union

import yaml

from canal.errors import BadRequest
from canal.policy import selector as selectors

__all__ = [
    "ACTIONS",
    "API_VERSION",
    "EGRESS",
    "GLOBAL",
    "INGRESS",
    "KINDS",
    "NETWORK",
    "PORT_PROTOCOLS",
    "PROTOCOLS",
    "EntityRule",
    "IcmpMatch",
    "Policy",
    "Rule",
    "load_documents",
]

API_VERSION = "canal/v1"
NETWORK = "NetworkPolicy"
GLOBAL = "GlobalNetworkPolicy"
KINDS = (NETWORK, GLOBAL)
INGRESS = "Ingress"
EGRESS = "Egress"
ACTIONS = ("Allow", "Deny", "Log", "Pass")

# Canonical spelling -> IP protocol number. Names are matched case-insensitively.
PROTOCOLS = {"TCP": 6, "UDP": 17, "ICMP": 1, "SCTP": 132, "UDPLite": 136, "ICMPv6": 58}
_PROTOCOL_BY_LOWER = {name.lower(): name for name in PROTOCOLS}
# Calico allows ports only with these (by name or number); iptables multiport agrees.
PORT_PROTOCOLS = frozenset({6, 17, 132, 136})

NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
MAX_NAME = 253
# Docker's own name pattern; the network name also becomes a selector value (canal.network).
NETWORK_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_PORT_RE = re.compile(r"([0-9]{1,5})(?::([0-9]{1,5}))?")  # ASCII digits only (\d takes any script's)

Protocol = Union[str, int]  # canonical name ("TCP") or number 1-255
PortRange = Tuple[int, int]  # inclusive; a single port is (p, p)


class _Invalid(Exception):
    """Internal: one validation failure at `path`; turned into BadRequest with document context."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


def _fail(path: str, message: str) -> NoReturn:
    raise _Invalid(path, message)


# --------------------------------------------------------------------------------------------------
# Resources


@dataclass(frozen=True)
class IcmpMatch:
    """ICMP type and optional code (a code without a type is meaningless, so not representable)."""

    type: int
    code: Optional[int] = None

    def to_dict(self) -> dict:
        return {"type": self.type} if self.code is None else {"type": self.type, "code": self.code}


@dataclass(frozen=True)
class EntityRule:
    """`source` / `destination` of a rule; every present field must match (AND)."""

    nets: Tuple[str, ...] = ()
    not_nets: Tuple[str, ...] = ()
    selector: Optional[str] = None
    not_selector: Optional[str] = None
    ports: Tuple[PortRange, ...] = ()
    not_ports: Tuple[PortRange, ...] = ()

    def to_dict(self) -> dict:
        out: dict = {}
        if self.nets:
            out["nets"] = list(self.nets)
        if self.not_nets:
            out["notNets"] = list(self.not_nets)
        if self.selector is not None:
            out["selector"] = self.selector
        if self.not_selector is not None:
            out["notSelector"] = self.not_selector
        if self.ports:
            out["ports"] = [_port_text(p) for p in self.ports]
        if self.not_ports:
            out["notPorts"] = [_port_text(p) for p in self.not_ports]
        return out

    @property
    def has_ports(self) -> bool:
        return bool(self.ports or self.not_ports)


@dataclass(frozen=True)
class Rule:
    """One ingress or egress rule: Allow and Deny are final, Log continues, Pass skips to profiles."""

    action: str
    protocol: Optional[Protocol] = None
    not_protocol: Optional[Protocol] = None
    icmp: Optional[IcmpMatch] = None
    not_icmp: Optional[IcmpMatch] = None
    source: EntityRule = field(default_factory=EntityRule)
    destination: EntityRule = field(default_factory=EntityRule)

    def to_dict(self) -> dict:
        out: dict = {"action": self.action}
        if self.protocol is not None:
            out["protocol"] = self.protocol
        if self.not_protocol is not None:
            out["notProtocol"] = self.not_protocol
        if self.icmp is not None:
            out["icmp"] = self.icmp.to_dict()
        if self.not_icmp is not None:
            out["notICMP"] = self.not_icmp.to_dict()
        source, destination = self.source.to_dict(), self.destination.to_dict()
        if source:
            out["source"] = source
        if destination:
            out["destination"] = destination
        return out


@dataclass(frozen=True)
class Policy:
    """A NetworkPolicy (scoped to `network`) or GlobalNetworkPolicy (network None), defaults resolved."""

    kind: str
    name: str
    network: Optional[str] = None
    order: Optional[float] = None  # None = +inf (applied last)
    selector: str = ""  # as written; "" = all()
    types: Tuple[str, ...] = (INGRESS,)
    ingress: Tuple[Rule, ...] = ()
    egress: Tuple[Rule, ...] = ()

    @property
    def key(self) -> str:
        """Datastore key: `<network>/<name>`, or `global/<name>` for a GlobalNetworkPolicy."""
        return f"global/{self.name}" if self.kind == GLOBAL else f"{self.network}/{self.name}"

    @property
    def is_global(self) -> bool:
        return self.kind == GLOBAL

    @property
    def sort_key(self) -> tuple:
        """Application order: order (missing = +inf), then name; kind breaks the last tie stably."""
        order = math.inf if self.order is None else self.order
        return (order, self.name, self.kind, self.network or "")

    def rules(self, direction: str) -> Tuple[Rule, ...]:
        return self.ingress if direction == INGRESS else self.egress

    def to_dict(self) -> dict:
        """The stored (JSON) form; `from_dict(p.to_dict()) == p`."""
        metadata: dict = {"name": self.name}
        if self.network is not None:
            metadata["network"] = self.network
        spec: dict = {"selector": self.selector, "types": list(self.types)}
        if self.order is not None:
            spec["order"] = self.order
        if self.ingress:
            spec["ingress"] = [r.to_dict() for r in self.ingress]
        if self.egress:
            spec["egress"] = [r.to_dict() for r in self.egress]
        return {"apiVersion": API_VERSION, "kind": self.kind, "metadata": metadata, "spec": spec}

    @classmethod
    def from_dict(cls, data: Any) -> "Policy":
        """Validate one document; BadRequest names the field path (e.g. `spec.types[1]: ...`)."""
        try:
            return _policy(data)
        except _Invalid as err:
            raise BadRequest(str(err)) from None


# --------------------------------------------------------------------------------------------------
# Loading


# Input limits: a policy file is written by people; these are far above any real one and far
# below what makes parsing expensive (PyYAML is pure Python here, ~1 s per MiB).
MAX_INPUT = 256 * 1024  # bytes of YAML/JSON text
MAX_DOCUMENTS = 128  # documents per apply: etcd's default --max-txn-ops, one transaction
MAX_NESTING = 32  # a policy is 6 levels deep; deeper is an attack on the parser
MAX_NUMBER = 20  # characters of an integer literal (int64 has 19 digits)


def load_documents(text: str) -> List[Policy]:
    """Policies from YAML (one or more `---` documents) or JSON (an object or a list of objects).

    All or nothing: the first invalid document refuses the whole input, so a half-applied batch
    never leaves policy in a state nobody wrote. Empty documents are skipped; indexes are 1-based.
    Input is bounded (size, documents, nesting, number length) and YAML anchors/aliases are
    refused: a few KiB of nested aliases expand to gigabytes ("billion laughs").
    """
    if not isinstance(text, str):
        raise BadRequest(f"policy input must be text, got {type(text).__name__}")
    if len(text) > MAX_INPUT or len(text.encode("utf-8", "surrogatepass")) > MAX_INPUT:
        raise BadRequest(f"policy input is larger than {MAX_INPUT // 1024} KiB; split it into several files")
    documents, skip_empty = _parse_text(text)
    if len(documents) > MAX_DOCUMENTS:
        raise BadRequest(f"policy input has {len(documents)} documents; at most {MAX_DOCUMENTS} per apply")
    policies: List[Policy] = []
    seen: Dict[str, Tuple[str, int]] = {}
    for index, document in enumerate(documents, 1):
        if document is None and skip_empty:
            continue
        label = f"document {index}"
        name = _peek_name(document)
        if name:
            label += f" ({name})"
        try:
            policy = _policy(document)
        except _Invalid as err:
            raise BadRequest(f"{label}: {err}") from None
        except RecursionError:  # a selector nested past the parser's stack
            raise BadRequest(f"{label}: a value is nested too deeply") from None
        except (ValueError, OverflowError) as err:  # e.g. a digit int() refuses ("²"), a huge number
            detail = "it has too many digits" if "limit" in str(err) else _clip(str(err), 120)
            raise BadRequest(f"{label}: a value is not a valid number: {detail}") from None
        if policy.key in seen and seen[policy.key][0] == policy.kind:
            first = seen[policy.key][1]
            raise BadRequest(f"{label}: metadata.name: {policy.kind} {policy.key!r} already defined by document {first}")
        seen[policy.key] = (policy.kind, index)
        policies.append(policy)
    return policies


def _parse_text(text: str) -> Tuple[list, bool]:
    """(documents, whether empty ones may be skipped: YAML's `---` separators make them, JSON never)."""
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            data = json.loads(
                text, object_pairs_hook=_json_object, parse_constant=_json_constant, parse_int=_json_int
            )
        except _Invalid as err:
            raise BadRequest(f"invalid JSON: {err}") from None
        except RecursionError:
            raise BadRequest(f"invalid JSON: nested deeper than {MAX_NESTING} levels") from None
        except ValueError as err:
            try:  # YAML flow style (`{kind: ...}`) also starts with a brace
                return _parse_yaml(text), True
            except BadRequest:
                raise BadRequest(f"invalid JSON: {err}") from None
        if _too_deep(data):
            raise BadRequest(f"invalid JSON: nested deeper than {MAX_NESTING} levels")
        return (data if isinstance(data, list) else [data]), False
    documents = _parse_yaml(text)
    if len(documents) == 1 and isinstance(documents[0], list):  # one YAML list: like a JSON list
        return documents[0], False
    return documents, True


def _too_deep(value: Any) -> bool:
    """True if lists/maps nest more than MAX_NESTING deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_NESTING:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _json_object(pairs: list) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Invalid("", f"duplicate key {key!r}")
        out[key] = value
    return out


def _json_constant(name: str) -> NoReturn:
    raise _Invalid("", f"{name} is not a number")


def _json_int(text: str) -> int:
    if len(text) > MAX_NUMBER:
        raise _Invalid("", f"number {text[:MAX_NUMBER]}... is longer than {MAX_NUMBER} characters")
    return int(text)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, anchors and aliases (no "billion laughs", no
    merge keys), nesting deeper than MAX_NESTING and overlong numbers, and never reads `1:30`
    as the sexagesimal int 90."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor} is not allowed in policy input; write the value out",
                event.start_mark,  # type: ignore[arg-type]  # libyaml's Mark is a yaml.Mark at run time
            )
        if getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, f"anchor &{event.anchor} is not allowed in policy input", event.start_mark
            )
        if self._depth >= MAX_NESTING:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_NESTING} levels", event.start_mark
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "found an unhashable key", key_node.start_mark
            ) from None
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


def _overlong(node: yaml.ScalarNode) -> NoReturn:
    raise yaml.constructor.ConstructorError(
        None, None, f"number {node.value[:MAX_NUMBER]}... is longer than {MAX_NUMBER} characters", node.start_mark
    )


def _construct_int(loader: _StrictLoader, node: yaml.ScalarNode) -> Any:
    if ":" in node.value:  # YAML 1.1 base 60: "1:30" would become 90, e.g. in a port range
        return node.value
    if len(node.value) > MAX_NUMBER:
        _overlong(node)
    return yaml.SafeLoader.construct_yaml_int(loader, node)


def _construct_float(loader: _StrictLoader, node: yaml.ScalarNode) -> Any:
    if ":" in node.value:
        return node.value
    if len(node.value) > 64:
        _overlong(node)
    return yaml.SafeLoader.construct_yaml_float(loader, node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def _parse_yaml(text: str) -> list:
    documents = []
    try:
        for document in yaml.load_all(text, Loader=_StrictLoader):
            documents.append(document)
            if len(documents) > MAX_DOCUMENTS:
                break  # load_documents refuses the input; parse no further
    except yaml.YAMLError as err:
        raise BadRequest(f"invalid YAML: {_yaml_message(err)}") from None
    except RecursionError:
        raise BadRequest(f"invalid YAML: nested deeper than {MAX_NESTING} levels") from None
    return documents


def _yaml_message(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    if mark is not None:
        return f"line {mark.line + 1} column {mark.column + 1}: {problem}"
    return problem


def _peek_name(document: Any) -> str:
    """metadata.name for error messages, only if it is a plausible name (never echo garbage)."""
    if isinstance(document, dict) and isinstance(document.get("metadata"), dict):
        name = document["metadata"].get("name")
        if isinstance(name, str) and len(name) <= MAX_NAME and NAME_RE.fullmatch(name):
            return name
    return ""


# --------------------------------------------------------------------------------------------------
# Validation


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float):
        return repr(value)  # "got 6.0": shows why an integer field refused it
    if isinstance(value, int):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _object(value: Any, path: str, allowed: Sequence[str], required: Sequence[str] = ()) -> dict:
    """A mapping with only `allowed` keys: an unknown key is an error, never ignored."""
    if not isinstance(value, dict):
        _fail(path, f"expected an object, got {_describe(value)}")
    for key in value:
        if not isinstance(key, str):
            _fail(path, f"field names must be strings, got {key!r}")
        if key not in allowed:
            _fail(_join(path, key), f"unknown field; expected one of: {', '.join(allowed)}")
    for key in required:
        if key not in value or value[key] is None:
            _fail(_join(path, key), "required field is missing")
    return value


def _list(value: Any, path: str) -> list:
    if not isinstance(value, list):
        _fail(path, f"expected a list, got {_describe(value)}")
    return value


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        _fail(path, f"expected a string, got {_describe(value)}")
    return value


def _integer(value: Any, path: str, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(path, f"expected {what} (an integer {low}-{high}), got {_describe(value)}")
    if not low <= value <= high:
        _fail(path, f"{what} {value} out of range {low}-{high}")
    return value


def _policy(data: Any) -> Policy:
    doc = _object(data, "", ("apiVersion", "kind", "metadata", "spec"), ("apiVersion", "kind", "metadata"))
    api = _string(doc["apiVersion"], "apiVersion")
    if api != API_VERSION:
        _fail("apiVersion", f"expected {API_VERSION!r}, got {api!r}")
    kind = _string(doc["kind"], "kind")
    if kind not in KINDS:
        _fail("kind", f"expected {' or '.join(KINDS)}, got {kind!r}")
    if kind == GLOBAL and isinstance(doc["metadata"], dict) and "network" in doc["metadata"]:
        _fail("metadata.network", "a GlobalNetworkPolicy spans all networks; remove it or use kind NetworkPolicy")
    allowed = ("name", "network") if kind == NETWORK else ("name",)
    metadata = _object(doc["metadata"], "metadata", allowed, allowed)
    name = _string(metadata["name"], "metadata.name")
    if len(name) > MAX_NAME or not NAME_RE.fullmatch(name):
        _fail(
            "metadata.name",
            f"invalid name {_clip(name)!r}: expected at most {MAX_NAME} characters of lower-case "
            "letters, digits, '-' and '.', starting and ending with a letter or digit",
        )
    network = None
    if kind == NETWORK:
        network = _string(metadata["network"], "metadata.network")
        if len(network) > MAX_NAME or not NETWORK_RE.fullmatch(network):
            _fail(
                "metadata.network",
                f"invalid network name {_clip(network)!r}: expected at most {MAX_NAME} characters "
                "of letters, digits, '_', '.' and '-', starting with a letter or digit",
            )
    spec = doc.get("spec")
    spec = {} if spec is None else _object(spec, "spec", ("order", "selector", "types", "ingress", "egress"))

    order = None
    if spec.get("order") is not None:
        value = spec["order"]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail("spec.order", f"expected a number, got {_describe(value)}")
        if not math.isfinite(value):
            _fail("spec.order", f"expected a finite number, got {value}")
        order = float(value)

    text = ""
    if spec.get("selector") is not None:
        text = _selector(spec["selector"], "spec.selector")

    ingress = tuple(_rules(spec.get("ingress"), "spec.ingress"))
    egress = tuple(_rules(spec.get("egress"), "spec.egress"))
    if spec.get("types") is None:
        # Calico's defaults: Egress only if only egress rules; both if both; else Ingress.
        if egress and not ingress:
            types: Tuple[str, ...] = (EGRESS,)
        elif egress:
            types = (INGRESS, EGRESS)
        else:
            types = (INGRESS,)
    else:
        types = _types(spec["types"], "spec.types")
    if ingress and INGRESS not in types:
        _fail("spec.ingress", "ingress rules given but spec.types does not include Ingress (they would never apply)")
    if egress and EGRESS not in types:
        _fail("spec.egress", "egress rules given but spec.types does not include Egress (they would never apply)")
    return Policy(kind, name, network, order, text, types, ingress, egress)


def _types(value: Any, path: str) -> Tuple[str, ...]:
    items = _list(value, path)
    if not items:
        _fail(path, "expected at least one of Ingress, Egress")
    found = set()
    for i, item in enumerate(items):
        item_path = f"{path}[{i}]"
        text = _string(item, item_path)
        if text not in (INGRESS, EGRESS):
            _fail(item_path, f"expected Ingress or Egress, got {_clip(text)!r}")
        if text in found:
            _fail(item_path, f"{text} listed twice")
        found.add(text)
    return tuple(t for t in (INGRESS, EGRESS) if t in found)  # canonical order


def _selector(value: Any, path: str) -> str:
    text = _string(value, path)
    try:
        selectors.parse(text)
    except BadRequest as err:  # SelectorError, or a value the AST refuses
        _fail(path, str(err))
    return text


_RULE_FIELDS = ("action", "protocol", "notProtocol", "icmp", "notICMP", "source", "destination")
_ENTITY_FIELDS = ("nets", "notNets", "selector", "notSelector", "ports", "notPorts")


def _rules(value: Any, path: str) -> list:
    if value is None:
        return []
    return [_rule(item, f"{path}[{i}]") for i, item in enumerate(_list(value, path))]


def _rule(value: Any, path: str) -> Rule:
    data = _object(value, path, _RULE_FIELDS, ("action",))
    action = _string(data["action"], _join(path, "action"))
    if action not in ACTIONS:
        _fail(_join(path, "action"), f"expected one of {', '.join(ACTIONS)}, got {_clip(action)!r}")
    protocol = _protocol(data.get("protocol"), _join(path, "protocol"))
    not_protocol = _protocol(data.get("notProtocol"), _join(path, "notProtocol"))
    icmp = _icmp(data.get("icmp"), _join(path, "icmp"))
    not_icmp = _icmp(data.get("notICMP"), _join(path, "notICMP"))
    for name, match in (("icmp", icmp), ("notICMP", not_icmp)):
        if match is not None and _protocol_number(protocol) not in (1, 58):
            _fail(_join(path, name), "ICMP type/code need protocol ICMP or ICMPv6")
    source = _entity(data.get("source"), _join(path, "source"))
    destination = _entity(data.get("destination"), _join(path, "destination"))
    for name, entity in (("source", source), ("destination", destination)):
        if entity.has_ports and _protocol_number(protocol) not in PORT_PROTOCOLS:
            which = "ports" if entity.ports else "notPorts"
            _fail(f"{path}.{name}.{which}", "ports need protocol TCP, UDP, SCTP or UDPLite")
    return Rule(action, protocol, not_protocol, icmp, not_icmp, source, destination)


def _protocol(value: Any, path: str) -> Optional[Protocol]:
    if value is None:
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 3:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return _integer(value, path, 1, 255, "protocol number")
    if isinstance(value, str):
        name = _PROTOCOL_BY_LOWER.get(value.lower())
        if name is None:
            _fail(path, f"unknown protocol {_clip(value)!r}; expected TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite or 1-255")
        return name
    _fail(path, f"expected a protocol name or number, got {_describe(value)}")


def _protocol_number(protocol: Optional[Protocol]) -> Optional[int]:
    if protocol is None:
        return None
    return protocol if isinstance(protocol, int) else PROTOCOLS[protocol]


def _icmp(value: Any, path: str) -> Optional[IcmpMatch]:
    if value is None:
        return None
    data = _object(value, path, ("type", "code"))
    if data.get("type") is None:
        if data.get("code") is not None:
            _fail(_join(path, "type"), "required when code is given")
        _fail(_join(path, "type"), "required field is missing")
    icmp_type = _integer(data["type"], _join(path, "type"), 0, 254, "ICMP type")
    code = None
    if data.get("code") is not None:
        code = _integer(data["code"], _join(path, "code"), 0, 255, "ICMP code")
    return IcmpMatch(icmp_type, code)


def _entity(value: Any, path: str) -> EntityRule:
    if value is None:
        return EntityRule()
    data = _object(value, path, _ENTITY_FIELDS)
    selector = not_selector = None
    if data.get("selector") is not None:
        selector = _selector(data["selector"], _join(path, "selector"))
    if data.get("notSelector") is not None:
        not_selector = _selector(data["notSelector"], _join(path, "notSelector"))
    return EntityRule(
        nets=_nets(data.get("nets"), _join(path, "nets")),
        not_nets=_nets(data.get("notNets"), _join(path, "notNets")),
        selector=selector,
        not_selector=not_selector,
        ports=_ports(data.get("ports"), _join(path, "ports")),
        not_ports=_ports(data.get("notPorts"), _join(path, "notPorts")),
    )


def _nets(value: Any, path: str) -> Tuple[str, ...]:
    if value is None:
        return ()
    out = []
    for i, item in enumerate(_list(value, path)):
        item_path = f"{path}[{i}]"
        text = _string(item, item_path)
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            _fail(item_path, f"invalid CIDR {_clip(text)!r}")
        if "/" in text and net.network_address != ipaddress.ip_address(text.split("/")[0]):
            # 10.0.0.1/8: did the author mean the host or the network? Refuse to guess.
            _fail(
                item_path,
                f"{text} has host bits set; write {net} for the network or "
                f"{text.split('/')[0]}/{net.max_prefixlen} for the host",
            )
        out.append(str(net))
    return tuple(out)


def _ports(value: Any, path: str) -> Tuple[PortRange, ...]:
    if value is None:
        return ()
    return tuple(_port(item, f"{path}[{i}]") for i, item in enumerate(_list(value, path)))


def _port(value: Any, path: str) -> PortRange:
    if isinstance(value, int) and not isinstance(value, bool):
        port = _integer(value, path, 0, 65535, "port")
        return (port, port)
    if not isinstance(value, str):
        _fail(path, f"expected a port number or \"start:end\" range, got {_describe(value)}")
    match = _PORT_RE.fullmatch(value)
    if not match:
        if re.fullmatch(r"[A-Za-z][-A-Za-z0-9]*", value):
            _fail(path, f"named port {_clip(value)!r} is not supported; use a number or \"start:end\"")
        _fail(path, f"invalid port {_clip(value)!r}; expected a number 0-65535 or \"start:end\"")
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) is not None else start
    for number in (start, end):
        if number > 65535:
            _fail(path, f"port {number} in {value!r} out of range 0-65535")
    if start > end:
        _fail(path, f"port range {value!r} has start > end")
    return (start, end)


def _port_text(port: PortRange) -> Union[int, str]:
    return port[0] if port[0] == port[1] else f"{port[0]}:{port[1]}"


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
