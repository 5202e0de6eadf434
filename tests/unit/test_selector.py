"""Tests for canal.policy.selector: Calico semantics, precedence, error positions, canonical form.

The property tests check the parser against an independent model (tuple ASTs with their own
evaluator and a renderer that randomises whitespace, quote style and redundant parentheses), so a
shared bug in parser and evaluator cannot hide itself.
"""

from __future__ import annotations

import pickle
import random
from typing import Dict, Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canal.errors import BadRequest
from canal.policy.selector import (
    MAX_DEPTH,
    MAX_KEY_LENGTH,
    All,
    And,
    Compare,
    Has,
    InSet,
    Not,
    Or,
    Selector,
    SelectorError,
    parse,
    quote,
)

LABELS = {
    "app": "web",
    "tier": "frontend",
    "com.docker.swarm.service.name": "shop_web",
    "io.example/owner": "team-a",
    "empty": "",
}

# --------------------------------------------------------------------------------------------------
# Semantics table


MATCH_CASES = [
    # empty / all()
    ("", {}, True),
    ("  \t\n", LABELS, True),
    ("all()", {}, True),
    ("all( )", LABELS, True),
    # has()
    ("has(app)", LABELS, True),
    ("has( app )", LABELS, True),
    ("has(db)", LABELS, False),
    ("has(empty)", LABELS, True),
    # ==
    ("app == 'web'", LABELS, True),
    ('app == "web"', LABELS, True),
    ("app=='web'", LABELS, True),
    ("app == 'db'", LABELS, False),
    ("db == 'web'", LABELS, False),
    ("empty == ''", LABELS, True),
    ("app == ''", LABELS, False),
    # != matches a missing label (Calico)
    ("app != 'db'", LABELS, True),
    ("app != 'web'", LABELS, False),
    ("db != 'web'", LABELS, True),
    ("db != ''", {}, True),
    ("empty != ''", LABELS, False),
    # in
    ("app in {'web', 'db'}", LABELS, True),
    ("app in {\"db\",'web'}", LABELS, True),
    ("app in {'db'}", LABELS, False),
    ("db in {'web'}", LABELS, False),
    ("app in {}", LABELS, False),
    ("app in{'web'}", LABELS, True),
    # not in matches a missing label (Calico)
    ("app not in {'db'}", LABELS, True),
    ("app not in {'web', 'db'}", LABELS, False),
    ("db not in {'web'}", LABELS, True),
    ("app not in {}", LABELS, True),
    ("app notin {'db'}", LABELS, True),
    # contains / starts with / ends with need the label
    ("tier contains 'ront'", LABELS, True),
    ("tier contains 'x'", LABELS, False),
    ("tier contains ''", LABELS, True),
    ("db contains ''", LABELS, False),
    ("tier starts with 'front'", LABELS, True),
    ("tier starts  with 'end'", LABELS, False),
    ("tier startswith 'fr'", LABELS, True),
    ("db starts with ''", LABELS, False),
    ("tier ends with 'end'", LABELS, True),
    ("tier ends with 'front'", LABELS, False),
    ("tier endswith 'd'", LABELS, True),
    ("db ends with ''", LABELS, False),
    # keys with dots, slashes, dashes, digits
    ("com.docker.swarm.service.name == 'shop_web'", LABELS, True),
    ("com.docker.swarm.service.name starts with 'shop'", LABELS, True),
    ("io.example/owner in {'team-a'}", LABELS, True),
    ("9 == 'x'", {"9": "x"}, True),
    # values: spaces, the other quote, non-ASCII
    ("app == 'a b'", {"app": "a b"}, True),
    ('app == "it\'s"', {"app": "it's"}, True),
    ("app == 'say \"hi\"'", {"app": 'say "hi"'}, True),
    ("app == 'é'", {"app": "é"}, True),
    ("app == '&& || ! ( )'", {"app": "&& || ! ( )"}, True),
    # negation
    ("!has(db)", LABELS, True),
    ("!has(app)", LABELS, False),
    ("!!has(app)", LABELS, True),
    ("!db == 'x'", LABELS, True),  # == on a missing label is false, so its negation is true
    ("!db in {'x'}", LABELS, True),
    ("!app != 'web'", LABELS, True),
    # precedence: match ops > parentheses > ! > && > ||
    ("!app == 'web'", LABELS, False),  # !(app == 'web'), not (!app) == 'web'
    ("!(app == 'web')", LABELS, False),
    ("app == 'db' && tier == 'frontend' || has(app)", LABELS, True),  # (F && T) || T
    ("app == 'db' && (tier == 'frontend' || has(app))", LABELS, False),
    ("has(app) || has(x) && has(y)", LABELS, True),  # T || (F && F)
    ("(has(app) || has(x)) && has(y)", LABELS, False),
    ("!has(app) || has(tier)", LABELS, True),  # (!T) || T
    ("!(has(app) || has(tier))", LABELS, False),
    ("!has(x) && has(app)", LABELS, True),
    ("!(has(x) && has(app))", LABELS, True),
    ("has(x) || has(y) || has(app)", LABELS, True),
    ("has(app) && has(tier) && has(x)", LABELS, False),
    ("((((has(app)))))", LABELS, True),
    # whitespace is insignificant between tokens
    ("\tapp\n==\r\n'web'  ", LABELS, True),
    ("app=='web'&&tier=='frontend'", LABELS, True),
    ("!(app!='web')||has(x)", LABELS, True),
    # operator words are positional, so keys may be spelled like them
    ("has == 'x'", {"has": "x"}, True),
    ("all == 'y'", {"all": "y"}, True),
    ("in in {'a'}", {"in": "a"}, True),
    ("not not in {'a'}", {}, True),
    ("contains contains 'b'", {"contains": "abc"}, True),
]


@pytest.mark.parametrize("text,labels,expected", MATCH_CASES)
def test_matches(text: str, labels: Mapping[str, str], expected: bool) -> None:
    assert parse(text).matches(labels) is expected


CANONICAL_CASES = [
    ("", "all()"),
    ("  ", "all()"),
    ("  app=='web'  ", 'app == "web"'),
    ("app == 'say \"hi\"'", "app == 'say \"hi\"'"),
    ("app in {'b', 'a', 'b'}", 'app in {"a", "b"}'),
    ("app not in {}", "app not in {}"),
    ("app notin {'x'}", 'app not in {"x"}'),
    ("a startswith 'x'", 'a starts with "x"'),
    ("a ends   with 'x'", 'a ends with "x"'),
    ("has( a )", "has(a)"),
    ("all( )", "all()"),
    ("((a == 'x') && ((b == 'y')))", 'a == "x" && b == "y"'),
    ("a == 'x' && (b == 'y' && c == 'z')", 'a == "x" && b == "y" && c == "z"'),
    ("(a == 'x' && b == 'y') && c == 'z'", 'a == "x" && b == "y" && c == "z"'),
    ("(a == 'x' || b == 'y') && c == 'z'", '(a == "x" || b == "y") && c == "z"'),
    ("a == 'x' || (b == 'y' && c == 'z')", 'a == "x" || b == "y" && c == "z"'),
    ("a == 'x' || (b == 'y' || c == 'z')", 'a == "x" || b == "y" || c == "z"'),
    ("!(a == 'x')", '!a == "x"'),
    ("!(a == 'x' && b == 'y')", '!(a == "x" && b == "y")'),
    ("!(a == 'x' || b == 'y') || c == 'z'", '!(a == "x" || b == "y") || c == "z"'),
    ("!(!has(a))", "!!has(a)"),
]


@pytest.mark.parametrize("text,expected", CANONICAL_CASES)
def test_canonical(text: str, expected: str) -> None:
    canonical = parse(text).canonical()
    assert canonical == expected
    assert parse(canonical).canonical() == canonical
    assert str(parse(text)) == canonical


def test_variants_share_canonical_form_and_equality() -> None:
    variants = [
        "app == 'web' && (tier in {'a','b'} || !has(x))",
        'app=="web"&&(tier in {"b", "a"}||!has( x ))',
        "((app == 'web')) && ((tier in {'b','a','a'}) || (!(has(x))))",
        "app == 'web' && (tier in {'a','b'} || !has(x))\n",
    ]
    parsed = [parse(v) for v in variants]
    assert len({p.canonical() for p in parsed}) == 1
    assert len(set(parsed)) == 1  # structurally equal and hashable


def test_different_selectors_have_different_canonical_forms() -> None:
    texts = ["a == 'x'", "a != 'x'", "a in {'x'}", "a not in {'x'}", "a contains 'x'",
             "a starts with 'x'", "a ends with 'x'", "has(a)", "!has(a)", "all()",
             "a == 'x' && b == 'y' || c == 'z'", "a == 'x' && (b == 'y' || c == 'z')"]
    assert len({parse(t).canonical() for t in texts}) == len(texts)


def test_label_keys() -> None:
    sel = parse("a == 'x' && (has(b) || !c in {'1'}) && all() && d.e/f not in {} || g contains ''")
    assert sel.label_keys() == frozenset({"a", "b", "c", "d.e/f", "g"})
    assert parse("").label_keys() == frozenset()
    assert parse("all()").label_keys() == frozenset()


def test_parse_builds_expected_ast() -> None:
    assert parse("") == All()
    assert parse("a == 'x' && has(b) || !c not in {'1', '2'}") == Or(
        (And((Compare("a", "==", "x"), Has("b"))), Not(InSet("c", frozenset({"1", "2"}), negated=True)))
    )


def test_parse_is_cached() -> None:
    text = "cache.test == 'yes'"
    assert parse(text) is parse(text)
    assert parse.cache_info().hits >= 1  # type: ignore[attr-defined]


def test_long_flat_selectors_do_not_recurse() -> None:
    many = " && ".join(f"k{i} == 'v'" for i in range(5000))
    sel = parse(many)
    assert sel.matches({f"k{i}": "v" for i in range(5000)})
    assert parse(sel.canonical()) == sel


def test_max_key_length_is_accepted() -> None:
    key = "k" * MAX_KEY_LENGTH
    assert parse(f"{key} == 'v'").matches({key: "v"})


def test_max_depth_is_accepted() -> None:
    assert parse("(" * MAX_DEPTH + "all()" + ")" * MAX_DEPTH).matches({})
    assert parse("!" * MAX_DEPTH + "all()").matches({})  # 100 is even


# --------------------------------------------------------------------------------------------------
# Errors


def test_error_message_format() -> None:
    with pytest.raises(SelectorError) as info:
        parse("role == ")
    assert str(info.value) == (
        "selector \"role == \" column 8: expected a string literal after '==', found end of input"
    )
    assert info.value.column == 8
    assert info.value.selector == "role == "
    assert isinstance(info.value, BadRequest) and info.value.status == 400


OPERATORS = "(==, !=, in, not in, contains, starts with, ends with)"

ERROR_CASES = [
    ("role", 5, f"expected an operator {OPERATORS} after label key 'role', found end of input"),
    ("role = 'x'", 6, "found '=' (did you mean '=='?)"),
    ("role == x", 9, "expected a string literal after '==', found 'x'"),
    ("role != ", 8, "expected a string literal after '!=', found end of input"),
    ("role == 'x", 9, "found unterminated string literal 'x (no closing ')"),
    ('role == "x', 9, "found unterminated string literal \"x (no closing \")"),
    ("a == 'b' & c == 'd'", 10, "expected '&&', '||' or end of input, found '&' (did you mean '&&'?)"),
    ("a == 'b' | c == 'd'", 10, "found '|' (did you mean '||'?)"),
    ("a == 'b' &&", 12, "expected a label key, 'has(', 'all()', '!' or '(' after '&&', found end of input"),
    ("a == 'b' || ", 12, "after '||', found end of input"),
    ("|| a == 'b'", 1, "expected a label key, 'has(', 'all()', '!' or '(', found '||'"),
    ("&&", 1, "found '&&'"),
    ("!", 2, "after '!', found end of input"),
    ("(a == 'b'", 10, "expected '&&', '||' or ')' to close the '(' at column 1, found end of input"),
    ("x == 'y' && (a == 'b' c", 23, "or ')' to close the '(' at column 13, found 'c'"),
    ("a == 'b')", 9, "this ')' has no matching '('"),
    ("a == 'b' b == 'c'", 10, "expected '&&', '||' or end of input, found 'b'"),
    ("()", 2, "after '(', found ')'"),
    ("has()", 5, "expected a label key inside 'has(', found ')'"),
    ("has(a", 6, "expected ')' to close 'has(', found end of input"),
    ("has(a b)", 7, "expected ')' to close 'has(', found 'b'"),
    ("has('a')", 5, "inside 'has(', found string literal 'a'"),
    ("all(x)", 5, "expected ')' to close 'all(', found 'x'"),
    ("a in 'x'", 6, "expected '{' after 'in', found string literal 'x'"),
    ("a not in ('x')", 10, "expected '{' after 'not in', found '('"),
    ("a in {'x'", 10, "expected ',' or '}' after a set element, found end of input"),
    ("a in {'x' 'y'}", 11, "expected ',' or '}' after a set element, found string literal 'y'"),
    ("a in {'x',}", 11, "expected a string literal after ',' in a set, found '}'"),
    ("a in {x}", 7, "expected a string literal or '}' after '{', found 'x'"),
    ("a in {,}", 7, "found ','"),
    ("a not 'x'", 7, "expected 'in' after 'not', found string literal 'x'"),
    ("a starts 'x'", 10, "expected 'with' after 'starts'"),
    ("a ends", 7, "expected 'with' after 'ends', found end of input"),
    ("a contains x", 12, "expected a string literal after 'contains', found 'x'"),
    ("a starts with", 14, "expected a string literal after 'starts with', found end of input"),
    ("a ends with {'x'}", 13, "after 'ends with', found '{'"),
    ("a is 'x'", 3, f"expected an operator {OPERATORS} after label key 'a', found 'is'"),
    ("a not in {'x'} && b >= 'c'", 21, "found unexpected character '>'"),
    ("a == 'b' && é == 'c'", 13, "found unexpected character 'é'"),
    ("a\x00", 2, "found unexpected character U+0000"),
    ("'x' == a", 1, "found string literal 'x'"),
    ("a == 'b' 'c'", 10, "found string literal 'c'"),
    ("x" * (MAX_KEY_LENGTH + 1) + " == 'a'", 1, "at most 512 characters, found one of 513 characters"),
    ("has(" + "x" * 600 + ")", 5, "found one of 600 characters"),
    ("(" * (MAX_DEPTH + 1) + "all()" + ")" * (MAX_DEPTH + 1), MAX_DEPTH + 1, "levels of nested '(' and '!'"),
    ("!" * (MAX_DEPTH + 1) + "all()", MAX_DEPTH + 1, "levels of nested '(' and '!'"),
    ("!(" * 60 + "all()" + ")" * 60, MAX_DEPTH + 1, "levels of nested '(' and '!'"),
    ("(" * 100_000, MAX_DEPTH + 1, "levels of nested '(' and '!'"),
    ("!" * 100_000, MAX_DEPTH + 1, "levels of nested '(' and '!'"),
]


@pytest.mark.parametrize("text,column,fragment", ERROR_CASES, ids=lambda v: repr(v)[:40] if isinstance(v, str) else None)
def test_errors(text: str, column: int, fragment: str) -> None:
    with pytest.raises(SelectorError) as info:
        parse(text)
    err = info.value
    assert err.column == column, str(err)
    assert fragment in str(err), str(err)
    assert f" column {column}: " in str(err)
    assert str(err).startswith('selector "')
    assert len(str(err)) < 1000  # huge inputs are excerpted, not echoed whole


@pytest.mark.parametrize("value", [None, 5, b"a == 'b'", ["a"]])
def test_non_string_input_is_a_selector_error(value: object) -> None:
    with pytest.raises(SelectorError):
        parse(value)  # type: ignore[arg-type]


def test_selector_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(SelectorError("a ==", 5, "expected x, found y")))
    assert (err.selector, err.column, err.reason) == ("a ==", 5, "expected x, found y")
    assert str(err) == 'selector "a ==" column 5: expected x, found y'


def test_quote_helper() -> None:
    assert quote("web") == '"web"'
    assert quote('say "hi"') == "'say \"hi\"'"
    for value in ["web", "it's", 'say "hi"', ""]:
        assert parse(f"k == {quote(value)}").matches({"k": value})
    with pytest.raises(BadRequest):
        quote("both ' and \"")


@pytest.mark.parametrize(
    "build",
    [
        lambda: Has("bad key"),
        lambda: Has(""),
        lambda: Has("k" * (MAX_KEY_LENGTH + 1)),
        lambda: Compare("k", "=~", "v"),
        lambda: Compare("k", "==", "both ' and \""),
        lambda: InSet("k", "abc"),
        lambda: And((Has("a"),)),
        lambda: Or(()),
    ],
)
def test_invalid_nodes_are_bad_requests(build) -> None:
    with pytest.raises(BadRequest):
        build()


def test_nodes_flatten_on_construction() -> None:
    a, b, c = Has("a"), Has("b"), Has("c")
    assert And((And((a, b)), c)) == And((a, And((b, c)))) == And((a, b, c))
    assert Or((a, Or((b, c)))).operands == (a, b, c)
    assert isinstance(parse("has(a)"), Selector)


# --------------------------------------------------------------------------------------------------
# Property tests against an independent model
#
# Model AST: ("all",) | ("has", k) | ("cmp", op, k, v) | ("in", k, values, negated)
#          | ("not", x) | ("and", x, y) | ("or", x, y)

KEYS = ["app", "tier", "com.docker.swarm.service.name", "io.example/owner", "a_b-9", "9",
        "has", "all", "not", "in", "contains", "starts", "ends", "with"]
VALUE_POOL = ["", "web", "we", "eb", "db", "web db", "it's", 'say "hi"', "é", "&&", "(", "{a}"]
COMPARE_OPS = ["==", "!=", "contains", "starts with", "ends with"]

values = st.one_of(
    st.sampled_from(VALUE_POOL),
    st.text(max_size=5).filter(lambda v: not ('"' in v and "'" in v)),
)
keys = st.sampled_from(KEYS)

leaves = st.one_of(
    st.just(("all",)),
    st.tuples(st.just("has"), keys),
    st.tuples(st.just("cmp"), st.sampled_from(COMPARE_OPS), keys, values),
    st.tuples(st.just("in"), keys, st.lists(values, max_size=4).map(tuple), st.booleans()),
)
asts = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.tuples(st.just("not"), inner),
        st.tuples(st.sampled_from(["and", "or"]), inner, inner),
    ),
    max_leaves=12,
)
label_dicts = st.dictionaries(keys, st.one_of(st.sampled_from(VALUE_POOL), st.text(max_size=4)), max_size=6)


def model_eval(node: tuple, labels: Dict[str, str]) -> bool:
    kind = node[0]
    if kind == "all":
        return True
    if kind == "has":
        return node[1] in labels
    if kind == "cmp":
        _, op, key, value = node
        if key not in labels:
            return op == "!="
        actual = labels[key]
        return {
            "==": actual == value,
            "!=": actual != value,
            "contains": value in actual,
            "starts with": actual.startswith(value),
            "ends with": actual.endswith(value),
        }[op]
    if kind == "in":
        _, key, vals, negated = node
        return (key in labels and labels[key] in vals) != negated
    if kind == "not":
        return not model_eval(node[1], labels)
    if kind == "and":
        return model_eval(node[1], labels) and model_eval(node[2], labels)
    return model_eval(node[1], labels) or model_eval(node[2], labels)


def model_keys(node: tuple) -> set:
    kind = node[0]
    if kind in ("has", "in"):
        return {node[1]}
    if kind == "cmp":
        return {node[2]}
    if kind in ("not", "and", "or"):
        return set().union(*(model_keys(child) for child in node[1:]))
    return set()


PRECEDENCE = {"or": 1, "and": 2, "not": 3}


def render(node: tuple, rnd: random.Random, min_prec: int = 0) -> str:
    """Render with random whitespace, quote style, spelling variants and redundant parentheses."""

    def ws() -> str:
        return rnd.choice(["", "", " ", "  ", "\t", "\n"])

    def sp() -> str:  # where two words meet, at least one blank is required
        return rnd.choice([" ", " ", "  ", "\t", " \n "])

    def lit(value: str) -> str:
        if '"' in value:
            q = "'"
        elif "'" in value:
            q = '"'
        else:
            q = rnd.choice("'\"")
        return q + value + q

    kind = node[0]
    if kind == "all":
        text = "all(" + ws() + ")"
    elif kind == "has":
        text = "has(" + ws() + node[1] + ws() + ")"
    elif kind == "cmp":
        _, op, key, value = node
        if op in ("==", "!="):
            text = key + ws() + op + ws() + lit(value)
        else:
            spelled = op.replace(" ", sp()) if " " not in op or rnd.random() < 0.8 else op.replace(" ", "")
            text = key + sp() + spelled + ws() + lit(value)
    elif kind == "in":
        _, key, vals, negated = node
        op = ("not" + sp() + "in" if rnd.random() < 0.8 else "notin") if negated else "in"
        items = ("," + ws()).join(lit(v) for v in vals)
        text = key + sp() + op + ws() + "{" + ws() + items + ws() + "}"
    elif kind == "not":
        text = "!" + ws() + render(node[1], rnd, PRECEDENCE["not"])
    else:
        prec = PRECEDENCE[kind]
        glue = ws() + ("&&" if kind == "and" else "||") + ws()
        text = render(node[1], rnd, prec) + glue + render(node[2], rnd, prec)
    prec = PRECEDENCE.get(kind, 4)
    if prec < min_prec or rnd.random() < 0.15:
        text = "(" + ws() + text + ws() + ")"
    return text


FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(ast=asts, rnd=st.randoms(use_true_random=False), labels=st.lists(label_dicts, min_size=1, max_size=4))
def test_parse_then_match_agrees_with_model(ast: tuple, rnd: random.Random, labels: list) -> None:
    text = render(ast, rnd)
    selector = parse(text)
    reparsed = parse(selector.canonical())
    for label_set in labels:
        expected = model_eval(ast, label_set)
        assert selector.matches(label_set) is expected, (text, label_set)
        assert reparsed.matches(label_set) is expected, (selector.canonical(), label_set)
    assert selector.label_keys() == frozenset(model_keys(ast))


@FAST
@given(ast=asts, rnd1=st.randoms(use_true_random=False), rnd2=st.randoms(use_true_random=False))
def test_canonical_is_a_fixed_point_independent_of_layout(ast: tuple, rnd1: random.Random, rnd2: random.Random) -> None:
    first, second = parse(render(ast, rnd1)), parse(render(ast, rnd2))
    canonical = first.canonical()
    assert second.canonical() == canonical
    assert first == second and hash(first) == hash(second)
    again = parse(canonical)
    assert again == first
    assert again.canonical() == canonical


TOKEN_SOUP = st.lists(
    st.sampled_from(
        ["(", ")", "!", "&&", "||", "==", "!=", "=", "&", "|", "{", "}", ",", "'a'", '"b"', "'", '"',
         "has", "all", "has(", "all()", "a", "b.c/d", "in", "not", "contains", "starts", "with",
         "ends", "startswith", " ", "\n", "é", "#", "''"]
    ),
    max_size=14,
)


def check_parse_or_selector_error(text: str) -> None:
    try:
        selector = parse(text)
    except SelectorError as err:
        assert 1 <= err.column <= len(text) + 1, str(err)
        assert str(err).startswith('selector "') and " column " in str(err) and "expected " in str(err)
        return
    canonical = selector.canonical()
    assert parse(canonical).canonical() == canonical
    assert parse(canonical) == selector


@FAST
@given(text=st.text(max_size=40))
def test_garbage_text_parses_or_raises_selector_error(text: str) -> None:
    check_parse_or_selector_error(text)


@FAST
@given(parts=TOKEN_SOUP, sep=st.sampled_from(["", " "]))
def test_token_soup_parses_or_raises_selector_error(parts: list, sep: str) -> None:
    check_parse_or_selector_error(sep.join(parts))
