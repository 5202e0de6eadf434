"""Calico's label-selector language: parse once, match endpoint labels, name ipsets by canonical text.

Selectors arrive from users (policy documents, Docker labels), so every malformed one must become a
BadRequest that says where it went wrong and what was expected. The grammar is small, so a
hand-written tokenizer plus recursive-descent parser keeps that precise without a dependency.

Grammar, loosest binding first (`||` and `&&` are left-associative; match operators bind tightest):

    selector := <empty> | or                       (empty or blank means all())
    or       := and ('||' and)*
    and      := unary ('&&' unary)*
    unary    := '!' unary | '(' or ')' | 'all' '(' ')' | 'has' '(' KEY ')' | match
    match    := KEY ('==' | '!=' | 'contains' | 'starts with' | 'ends with') STRING
              | KEY ('in' | 'not in') '{' [STRING (',' STRING)*] '}'
    KEY      := [A-Za-z0-9_./-]{1,512}
    STRING   := '...' | "..."                      (no escapes)

Semantics follow Calico: `!=` and `not in` are true for endpoints that LACK the label; `==`, `in`,
`contains`, `starts with` and `ends with` need the label to be present.

Operator words are recognised by position, not reserved, so a key spelled like one (`has`, `all`,
`in`, `not`) still works where a key is expected; that accepts a superset of Calico's regex tokenizer.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Mapping, NoReturn, Optional, Tuple, cast

from canal.errors import BadRequest

__all__ = [
    "MAX_DEPTH",
    "MAX_KEY_LENGTH",
    "All",
    "And",
    "Compare",
    "Has",
    "InSet",
    "Not",
    "Or",
    "Selector",
    "SelectorError",
    "parse",
    "quote",
]

MAX_KEY_LENGTH = 512
# Bounds recursion in the parser, matches() and canonical(): deep input must be a clear 400, never a
# RecursionError. Counts every open '(' and every '!'.
MAX_DEPTH = 100

_WHITESPACE = " \t\n\r\f\v"
_KEY_RE = re.compile(r"[A-Za-z0-9_./-]+")


class SelectorError(BadRequest):
    """A selector that cannot be parsed; `column` (1-based) points at the offending token."""

    def __init__(self, selector: str, column: int, reason: str) -> None:
        self.selector = selector
        self.column = column
        self.reason = reason
        super().__init__(f'selector "{_excerpt(selector, column)}" column {column}: {reason}')

    def __reduce__(self):  # keep picklable despite the custom signature (multiprocessing, logging)
        return (type(self), (self.selector, self.column, self.reason))


# --------------------------------------------------------------------------------------------------
# AST


class Selector:
    """A parsed selector: immutable and hashable, so one instance is shared by cache and callers."""

    __slots__ = ()
    # Binding strength, used by canonical() to add exactly the parentheses that are needed.
    _precedence: ClassVar[int] = 4

    def matches(self, labels: Mapping[str, str]) -> bool:
        """True if an endpoint carrying `labels` is selected."""
        raise NotImplementedError

    def canonical(self) -> str:
        """Normalized text: equal for selectors differing only in layout, quoting or redundant parens."""
        raise NotImplementedError

    def label_keys(self) -> frozenset:
        """Every label key the selector reads, so callers know which label changes can affect it."""
        return frozenset()

    def __str__(self) -> str:
        return self.canonical()

    def _wrapped(self, min_precedence: int) -> str:
        text = self.canonical()
        return f"({text})" if self._precedence < min_precedence else text


@dataclass(frozen=True)
class All(Selector):
    """`all()` (and the empty selector): selects every endpoint."""

    def matches(self, labels: Mapping[str, str]) -> bool:
        return True

    def canonical(self) -> str:
        return "all()"


@dataclass(frozen=True)
class Has(Selector):
    """`has(key)`: the label exists, whatever its value."""

    key: str

    def __post_init__(self) -> None:
        _check_key(self.key)

    def matches(self, labels: Mapping[str, str]) -> bool:
        return labels.get(self.key) is not None

    def canonical(self) -> str:
        return f"has({self.key})"

    def label_keys(self) -> frozenset:
        return frozenset((self.key,))


_COMPARE_OPS: Dict[str, Callable[[str, str], bool]] = {
    "==": lambda actual, value: actual == value,
    "!=": lambda actual, value: actual != value,
    "contains": lambda actual, value: value in actual,
    "starts with": lambda actual, value: actual.startswith(value),
    "ends with": lambda actual, value: actual.endswith(value),
}


@dataclass(frozen=True)
class Compare(Selector):
    """`key OP "value"` for ==, !=, contains, starts with, ends with; only != matches a missing label."""

    key: str
    op: str
    value: str

    def __post_init__(self) -> None:
        _check_key(self.key)
        if self.op not in _COMPARE_OPS:
            raise BadRequest(f"unknown selector operator {self.op!r}; expected one of {sorted(_COMPARE_OPS)}")
        _check_value(self.value)

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.key)
        if actual is None:
            return self.op == "!="
        return _COMPARE_OPS[self.op](actual, self.value)

    def canonical(self) -> str:
        return f"{self.key} {self.op} {quote(self.value)}"

    def label_keys(self) -> frozenset:
        return frozenset((self.key,))


@dataclass(frozen=True)
class InSet(Selector):
    """`key in {...}` / `key not in {...}`; the negated form also matches a missing label."""

    key: str
    values: frozenset
    negated: bool = False

    def __post_init__(self) -> None:
        _check_key(self.key)
        if isinstance(self.values, str):  # a bare string would silently become a set of characters
            raise BadRequest("InSet values must be a collection of strings, not a single string")
        values = frozenset(self.values)
        for value in values:
            _check_value(value)
        object.__setattr__(self, "values", values)

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.key)
        return (actual is not None and actual in self.values) != self.negated

    def canonical(self) -> str:
        op = "not in" if self.negated else "in"
        # Sorted and de-duplicated: set order carries no meaning, so it must not change the hash.
        return f"{self.key} {op} {{{', '.join(quote(v) for v in sorted(self.values))}}}"

    def label_keys(self) -> frozenset:
        return frozenset((self.key,))


@dataclass(frozen=True)
class Not(Selector):
    """`!expr`."""

    operand: Selector
    _precedence: ClassVar[int] = 3

    def matches(self, labels: Mapping[str, str]) -> bool:
        return not self.operand.matches(labels)

    def canonical(self) -> str:
        return "!" + self.operand._wrapped(self._precedence)

    def label_keys(self) -> frozenset:
        return self.operand.label_keys()


def _flatten(kind: type, operands: Iterable[Selector]) -> Tuple[Selector, ...]:
    """Inline nested nodes of the same kind: `(a && b) && c` and `a && (b && c)` are one selector."""
    flat: List[Selector] = []
    for operand in operands:
        flat.extend(cast(Any, operand).operands if isinstance(operand, kind) else (operand,))
    if len(flat) < 2:
        raise BadRequest(f"{kind.__name__} needs at least two operands, got {len(flat)}")
    return tuple(flat)


@dataclass(frozen=True)
class And(Selector):
    """`a && b && ...` (n-ary; nested Ands are flattened so grouping does not change canonical())."""

    operands: Tuple[Selector, ...]
    _precedence: ClassVar[int] = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "operands", _flatten(And, self.operands))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(operand.matches(labels) for operand in self.operands)

    def canonical(self) -> str:
        return " && ".join(operand._wrapped(self._precedence) for operand in self.operands)

    def label_keys(self) -> frozenset:
        return frozenset().union(*(operand.label_keys() for operand in self.operands))


@dataclass(frozen=True)
class Or(Selector):
    """`a || b || ...` (n-ary; nested Ors are flattened so grouping does not change canonical())."""

    operands: Tuple[Selector, ...]
    _precedence: ClassVar[int] = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "operands", _flatten(Or, self.operands))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return any(operand.matches(labels) for operand in self.operands)

    def canonical(self) -> str:
        return " || ".join(operand._wrapped(self._precedence) for operand in self.operands)

    def label_keys(self) -> frozenset:
        return frozenset().union(*(operand.label_keys() for operand in self.operands))


def quote(value: str) -> str:
    """Render `value` as a string literal; the language has no escapes, so use the quote it lacks.

    Code that builds selectors from data (e.g. a network name) should use this rather than f-strings.
    """
    _check_value(value)
    return f"'{value}'" if '"' in value else f'"{value}"'


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key) or len(key) > MAX_KEY_LENGTH:
        raise BadRequest(
            f"invalid selector label key {key!r}: expected 1-{MAX_KEY_LENGTH} characters from [A-Za-z0-9_./-]"
        )


def _check_value(value: str) -> None:
    if not isinstance(value, str):
        raise BadRequest(f"selector values must be strings, got {type(value).__name__}")
    if '"' in value and "'" in value:
        raise BadRequest(f"label value {value!r} contains both ' and \" and cannot be written in a selector")


# --------------------------------------------------------------------------------------------------
# Tokenizer and parser


@dataclass(frozen=True)
class _Token:
    kind: str  # punctuation/operator text itself, or "word", "string", "eof", "bad"
    text: str  # source text (strings include their quotes)
    column: int  # 1-based
    value: str = ""  # content of a string literal; for "bad": how to describe it in an error


class _Parser:
    """One parse of one text. Tokens are produced lazily so the first error from the left is reported."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0
        self._ahead: List[_Token] = []
        self._prev: Optional[_Token] = None
        self._depth = 0

    # -- tokenizer -----------------------------------------------------------------------------------

    def _lex(self) -> _Token:
        text, pos, size = self._text, self._pos, len(self._text)
        while pos < size and text[pos] in _WHITESPACE:
            pos += 1
        if pos >= size:
            self._pos = pos
            # Point just past the last real character: that is where something was missing.
            return _Token("eof", "", len(text.rstrip(_WHITESPACE)) + 1)
        char, column = text[pos], pos + 1
        pair = text[pos : pos + 2]
        if pair in ("==", "!=", "&&", "||"):
            token = _Token(pair, pair, column)
        elif char in "(){},!":
            token = _Token(char, char, column)
        elif char in "'\"":
            end = text.find(char, pos + 1)
            if end < 0:
                token = _Token("bad", text[pos:], column, f"unterminated string literal {_clip(text[pos:])} (no closing {char})")
            else:
                token = _Token("string", text[pos : end + 1], column, text[pos + 1 : end])
        else:
            match = _KEY_RE.match(text, pos)
            if match:
                token = _Token("word", match.group(), column)
            elif char in "=&|":
                token = _Token("bad", char, column, f"'{char}' (did you mean '{char * 2}'?)")
            else:
                shown = f"'{char}'" if char.isprintable() else f"U+{ord(char):04X}"
                token = _Token("bad", char, column, f"unexpected character {shown}")
        self._pos = pos + len(token.text)
        return token

    def _peek(self, index: int = 0) -> _Token:
        while len(self._ahead) <= index:
            self._ahead.append(self._lex())
        return self._ahead[index]

    def _next(self) -> _Token:
        token = self._peek()
        self._ahead.pop(0)
        self._prev = token
        return token

    # -- errors --------------------------------------------------------------------------------------

    def _fail(self, expected: str, token: Optional[_Token] = None) -> NoReturn:
        token = token or self._peek()
        raise SelectorError(self._text, token.column, f"expected {expected}, found {_describe(token)}")

    def _expect(self, kind: str, expected: str) -> _Token:
        if self._peek().kind != kind:
            self._fail(expected)
        return self._next()

    def _enter(self, token: _Token) -> None:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise SelectorError(
                self._text,
                token.column,
                f"expected at most {MAX_DEPTH} levels of nested '(' and '!', found deeper nesting",
            )

    # -- grammar -------------------------------------------------------------------------------------

    def parse(self) -> Selector:
        if self._peek().kind == "eof":
            return All()
        node = self._or()
        token = self._peek()
        if token.kind == ")":
            self._fail("'&&', '||' or end of input (this ')' has no matching '(')")
        if token.kind != "eof":
            self._fail("'&&', '||' or end of input")
        return node

    def _or(self) -> Selector:
        operands = [self._and()]
        while self._peek().kind == "||":
            self._next()
            operands.append(self._and())
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def _and(self) -> Selector:
        operands = [self._unary()]
        while self._peek().kind == "&&":
            self._next()
            operands.append(self._unary())
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def _unary(self) -> Selector:
        token = self._peek()
        if token.kind == "!":
            self._next()
            self._enter(token)
            node: Selector = Not(self._unary())
            self._depth -= 1
            return node
        if token.kind == "(":
            self._next()
            self._enter(token)
            node = self._or()
            self._expect(")", f"'&&', '||' or ')' to close the '(' at column {token.column}")
            self._depth -= 1
            return node
        if token.kind == "word":
            return self._word()
        after = f" after '{self._prev.text}'" if self._prev else ""
        self._fail(f"a label key, 'has(', 'all()', '!' or '('{after}")

    def _word(self) -> Selector:
        token = self._next()
        if token.text in ("has", "all") and self._peek().kind == "(":
            self._next()
            if token.text == "all":
                self._expect(")", "')' to close 'all('")
                return All()
            if self._peek().kind != "word":
                self._fail("a label key inside 'has('")
            key = self._key(self._next())
            self._expect(")", "')' to close 'has('")
            return Has(key)

        key = self._key(token)
        op = self._peek()
        if op.kind in ("==", "!="):
            self._next()
            return Compare(key, op.kind, self._string(op.kind))
        word = op.text if op.kind == "word" else ""
        if word in ("in", "notin"):
            self._next()
            return InSet(key, self._set(word), negated=word == "notin")
        if word in ("contains", "startswith", "endswith"):
            self._next()
            name = word if word == "contains" else word[:-4] + " with"
            return Compare(key, name, self._string(name))
        if word in ("not", "starts", "ends"):
            self._next()
            second = "in" if word == "not" else "with"
            follow = self._peek()
            if follow.kind != "word" or follow.text != second:
                self._fail(f"'{second}' after '{word}'")
            self._next()
            name = f"{word} {second}"
            if word == "not":
                return InSet(key, self._set(name), negated=True)
            return Compare(key, name, self._string(name))
        self._fail(
            "an operator (==, !=, in, not in, contains, starts with, ends with) "
            f"after label key '{_clip(key)}'"
        )

    def _key(self, token: _Token) -> str:
        if len(token.text) > MAX_KEY_LENGTH:
            raise SelectorError(
                self._text,
                token.column,
                f"expected a label key of at most {MAX_KEY_LENGTH} characters, "
                f"found one of {len(token.text)} characters",
            )
        return token.text

    def _string(self, after: str) -> str:
        return self._expect("string", f"a string literal after '{after}'").value

    def _set(self, after: str) -> frozenset:
        self._expect("{", f"'{{' after '{after}'")
        values: List[str] = []
        if self._peek().kind == "}":
            self._next()
            return frozenset()
        values.append(self._expect("string", "a string literal or '}' after '{'").value)
        while self._peek().kind == ",":
            self._next()
            values.append(self._expect("string", "a string literal after ',' in a set").value)
        self._expect("}", "',' or '}' after a set element")
        return frozenset(values)


def _clip(text: str, limit: int = 40) -> str:
    text = _printable(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _printable(text: str) -> str:
    """Message-safe text with one character per source character, so columns still line up."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else (" " if c in _WHITESPACE else "?") for c in text)


def _excerpt(text: str, column: int, radius: int = 80) -> str:
    """The selector as quoted in errors: whole if short, else a window around `column` (still absolute)."""
    if len(text) <= 2 * radius:
        return _printable(text)
    start, end = max(0, column - 1 - radius), min(len(text), column - 1 + radius)
    return ("..." if start else "") + _printable(text[start:end]) + ("..." if end < len(text) else "")


def _describe(token: _Token) -> str:
    if token.kind == "eof":
        return "end of input"
    if token.kind == "string":
        return f"string literal {_clip(token.text)}"
    if token.kind == "bad":
        return token.value
    return f"'{_clip(token.text)}'"


@functools.lru_cache(maxsize=4096)
def _parse_cached(text: str) -> Selector:
    try:
        return _Parser(text).parse()
    except RecursionError:  # only if the caller's own stack is already nearly exhausted
        raise SelectorError(text, 1, "expected a selector the parser can nest, found one too deep") from None


def parse(text: str) -> Selector:
    """Parse a selector (empty or blank means all()); raises SelectorError, and nothing else, on bad input.

    Results are cached: the same few selectors are re-evaluated on every endpoint and policy change.
    """
    if not isinstance(text, str):
        raise SelectorError(repr(text), 1, f"expected a selector string, found {type(text).__name__}")
    return _parse_cached(text)


parse.cache_info = _parse_cached.cache_info  # type: ignore[attr-defined]
parse.cache_clear = _parse_cached.cache_clear  # type: ignore[attr-defined]
