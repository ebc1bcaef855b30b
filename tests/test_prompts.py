"""Table-driven tests of the A1111 prompt language; expectations are worked out by hand."""

import pytest

from openldm.prompts import BREAK, NetworkRef, extract_networks, parse_attention, prompt_schedule

E = 1.1
D = 1 / 1.1

ATTENTION_CASES = [
    ("", [("", 1.0)]),
    ("a cat", [("a cat", 1.0)]),
    ("(cat)", [("cat", E)]),
    ("((cat))", [("cat", E * E)]),
    ("(((cat)))", [("cat", E * E * E)]),
    ("[cat]", [("cat", D)]),
    ("[[cat]]", [("cat", D * D)]),
    ("a (cat) b", [("a ", 1.0), ("cat", E), (" b", 1.0)]),
    ("a [cat] b", [("a ", 1.0), ("cat", D), (" b", 1.0)]),
    ("(cat:1.3)", [("cat", 1.3)]),
    ("(cat:0.5)", [("cat", 0.5)]),
    ("(cat: 1.3 )", [("cat", 1.3)]),
    ("(cat:-1)", [("cat", -1.0)]),
    ("(cat:+2)", [("cat", 2.0)]),
    ("(cat:.5)", [("cat", 0.5)]),
    ("((cat):2)", [("cat", E * 2)]),
    ("([cat]:2)", [("cat", D * 2)]),
    ("(a (b) c)", [("a ", E), ("b", E * E), (" c", E)]),
    ("(a [b] c)", [("a ", E), ("b", 1.0), (" c", E)]),
    ("(a, b:1.2), c", [("a, b", 1.2), (", c", 1.0)]),
    ("(cat", [("cat", E)]),
    ("[cat", [("cat", D)]),
    ("((cat)", [("cat", E * E)]),
    ("cat)", [("cat)", 1.0)]),
    ("cat]", [("cat]", 1.0)]),
    ("cat:1.2)", [("cat:1.2)", 1.0)]),
    ("a:b", [("a:b", 1.0)]),
    ("(a:b)", [("a:b", E)]),
    (r"\(cat\)", [("(cat)", 1.0)]),
    (r"\[cat\]", [("[cat]", 1.0)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
    (r"(\(cat\))", [("(cat)", E)]),
    ("a BREAK b", [("a", 1.0), (BREAK, -1.0), ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), (BREAK, -1.0), ("b", 1.0)]),
    ("aBREAKb", [("aBREAKb", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("(a BREAK b:1.5)", [("a", 1.5), (BREAK, -1.0), ("b", 1.5)]),
    ("BREAK", [("", 1.0), (BREAK, -1.0), ("", 1.0)]),
    ("(a)(b)", [("ab", E)]),
    ("(a) (b)", [("a", E), (" ", 1.0), ("b", E)]),
    ("(a:1.2)(b:1.2)", [("ab", 1.2)]),
]

SCHEDULE_CASES = [
    ("a cat", 10, [(10, "a cat")]),
    ("[cat:dog:5]", 10, [(5, "cat"), (10, "dog")]),
    ("a [cat:dog:5] b", 10, [(5, "a cat b"), (10, "a dog b")]),
    ("[cat:dog:0.5]", 10, [(5, "cat"), (10, "dog")]),
    ("[cat:dog:0.25]", 10, [(2, "cat"), (10, "dog")]),
    ("[cat:dog:1.0]", 10, [(10, "cat")]),
    ("[cat:dog:1]", 10, [(1, "cat"), (10, "dog")]),
    ("[cat:dog:0]", 10, [(10, "dog")]),
    ("[cat:dog:20]", 10, [(10, "cat")]),
    ("[cat:dog: 5 ]", 10, [(5, "cat"), (10, "dog")]),
    ("[dog:5]", 10, [(5, ""), (10, "dog")]),
    ("[cat::5]", 10, [(5, "cat"), (10, "")]),
    ("[a:b:2] [c:d:4]", 6, [(2, "a c"), (4, "b c"), (6, "b d")]),
    ("[[a:b:2]:c:4]", 6, [(2, "a"), (4, "b"), (6, "c")]),
    ("[a|b]", 4, [(1, "a"), (2, "b"), (3, "a"), (4, "b")]),
    ("[a|b|c] x", 4, [(1, "a x"), (2, "b x"), (3, "c x"), (4, "a x")]),
    ("[a|]", 3, [(1, "a"), (2, ""), (3, "a")]),
    ("[a|b] [c:d:2]", 3, [(1, "a c"), (2, "b c"), (3, "a d")]),
    ("(cat)", 5, [(5, "(cat)")]),
    ("(cat:1.2) [dog:fox:2]", 5, [(2, "(cat:1.2) dog"), (5, "(cat:1.2) fox")]),
    ("([cat:dog:2])", 5, [(2, "(cat)"), (5, "(dog)")]),
    ("[cat]", 5, [(5, "[cat]")]),
    ("[(cat):dog:2]", 5, [(2, "(cat)"), (5, "dog")]),
    (r"\[a:b:2\]", 5, [(5, r"\[a:b:2\]")]),
    ("broken [a:b:2", 5, [(5, "broken [a:b:2")]),
    ("[a:b:c:2]", 5, [(5, "[a:b:c:2]")]),
    ("[a:b:x]", 5, [(5, "[a:b:x]")]),
    ("a) [b:c:2]", 5, [(2, "a) b"), (5, "a) c")]),
    ("a: b", 5, [(5, "a: b")]),
]

NETWORK_CASES = [
    ("a cat", "a cat", []),
    ("a cat <lora:grain:0.6>", "a cat ", [NetworkRef("lora", "grain", 0.6)]),
    ("<lora:grain>", "", [NetworkRef("lora", "grain", 1.0)]),
    ("<lora:a:1><lyco:b:-0.5> x", " x", [NetworkRef("lora", "a", 1.0), NetworkRef("lyco", "b", -0.5)]),
    ("<lora:a:0.8:0.2> x", " x", [NetworkRef("lora", "a", 0.8)]),
]


@pytest.mark.parametrize(("text", "expected"), ATTENTION_CASES, ids=[c[0] or "-" for c in ATTENTION_CASES])
def test_parse_attention(text, expected):
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


@pytest.mark.parametrize(("text", "steps", "expected"), SCHEDULE_CASES, ids=[c[0] for c in SCHEDULE_CASES])
def test_prompt_schedule(text, steps, expected):
    assert prompt_schedule(text, steps) == expected


@pytest.mark.parametrize(("text", "rest", "refs"), NETWORK_CASES, ids=[c[0] for c in NETWORK_CASES])
def test_extract_networks(text, rest, refs):
    assert extract_networks(text) == (rest, refs)


def test_bad_network_weight_is_an_error_naming_it():
    with pytest.raises(ValueError, match="lora:a:much"):
        extract_networks("<lora:a:much>")
