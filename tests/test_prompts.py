"""Table-driven tests of the A1111 prompt language: its published doctest examples, then cases by hand."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from openldm.prompts import NetworkRef, extract_networks, parse_attention, prompt_schedule

E = 1.1
D = 1 / 1.1
BRK = object()  # where a BREAK starts a new part, in the flat form these tables are written in


def _flat(parts: list[list[tuple[str, float]]]) -> list:
    return [item for i, part in enumerate(parts) for item in ([BRK] if i else []) + part]

# A1111 1.6's doctests from its modules/prompt_parser.py: (prompt, base steps, hires steps, schedule).
# The schedules of the two "hires" cases are those of the second pass; A1111 writes them as lists of lists.
A1111_SCHEDULE_DOCTESTS = [
    ("test", 10, None, [[10, "test"]]),
    ("a [b:3]", 10, None, [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", 10, None, [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", 10, None, [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", 10, None, [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", 10, None, [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", 10, None, [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", 10, None, [[10, "a [unbalanced"]]),
    ("a [b:.5] c", 10, None, [[5, "a  c"], [10, "a b c"]]),
    ("a [{b|d{:.5] c", 10, None, [[5, "a  c"], [10, "a {b|d{ c"]]),  # A1111: "not handling this right now"
    ("((a][:b:c [d:3]", 10, None, [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", 10, None, [[i, "a" if i % 2 else "(b:1.1)"] for i in range(1, 11)]),
    ("[fe|]male", 10, None, [[i, "female" if i % 2 else "male"] for i in range(1, 11)]),
    ("[fe|||]male", 10, None, [[i, "female" if i % 4 == 1 else "male"] for i in range(1, 11)]),
    ("a [b:.5] c", 10, 10, [[10, "a b c"]]),
    ("a [b:1.5] c", 10, 10, [[5, "a  c"], [10, "a b c"]]),
]
# Where we knowingly differ from a published example: its id and why. Every other example must agree.
A1111_SCHEDULE_DIFFERENCES = {
    # stale in A1111: its 1.6 grammar (run with lark 1.3.1) rejects the `|`; we agree with the grammar
    "a [{b|d{:.5] c": "a `|` outside an alternation makes the prompt unparsable",
}

A1111_ATTENTION_DOCTESTS = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
        [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1],
    ]),
]

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
    ("a BREAK b", [("a", 1.0), BRK, ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), BRK, ("b", 1.0)]),
    ("aBREAKb", [("aBREAKb", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("(a BREAK b:1.5)", [("a", 1.5), BRK, ("b", 1.5)]),
    ("BREAK", [("", 1.0), BRK, ("", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), BRK, ("", 1.0), BRK, ("b", 1.0)]),
    ("(a:-1) BREAK b", [("a", -1.0), ("", 1.0), BRK, ("b", 1.0)]),  # a weight of -1 is not a BREAK
    ("(BREAK:-1)", [("", -1.0), BRK, ("", -1.0)]),
    ("(a)(b)", [("ab", E)]),
    ("(a) (b)", [("a", E), (" ", 1.0), ("b", E)]),
    ("(a:1.2)(b:1.2)", [("ab", 1.2)]),
    ("a \\ b", [("a  b", 1.0)]),  # a lone backslash escapes nothing and is dropped
    ("a\\b\\", [("ab", 1.0)]),
    ("((a:-1))", [("a", -1.1)]),  # negative weights scale through brackets like any other
    ("[(a:-1)]", [("a", -D)]),
    ("(a:-1) (b)", [("a", -1.0), (" ", 1.0), ("b", E)]),
    ("(a:1.2.3)", [("a:1.2.3", E)]),  # not a weight: A1111 raises ValueError from float()
    ("(a:.)", [("a:.", E)]),
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
    ("(a [b:3]", 5, [(3, "(a "), (5, "(a b")]),  # unmatched brackets before an edit are text
    ("a] [b:3] (c", 5, [(3, "a]  (c"), (5, "a] b (c")]),
    ("[a (b] [c:3]", 5, [(3, "[a (b] "), (5, "[a (b] c")]),
    ("[a:b:c:2] [d:3]", 5, [(3, "[a:b:c:2] "), (5, "[a:b:c:2] d")]),
    ("a | b [c:3]", 5, [(5, "a | b [c:3]")]),  # A1111 1.6 rejects a top-level `|`: the prompt as it is
    ("(a|b) [c:3]", 5, [(5, "(a|b) [c:3]")]),
    ("[c:3] a\\", 5, [(5, "[c:3] a\\")]),  # and a backslash that escapes nothing
    ("[c:3] a\\\nb", 5, [(5, "[c:3] a\\\nb")]),
    ("[c:3] \\[x\\]", 5, [(3, " \\[x\\]"), (5, "c \\[x\\]")]),
    ("[a:b:2 ]", 5, [(2, "a"), (5, "b")]),
    ("[a:b:+2]", 5, [(2, "a"), (5, "b")]),
    ("[a:b:1e1]", 20, [(10, "a"), (20, "b")]),  # no '.': a step number
    ("[a:b:2.5e-1]", 20, [(5, "a"), (20, "b")]),
    ("[a:b:1e999]", 5, [(5, "a")]),  # too large for int(): clamped first
    ("[a:b:-1e999]", 5, [(5, "b")]),
    ("[a:b:-2]", 5, [(5, "b")]),
    ("[a:b:1.5]", 10, [(10, "a")]),  # a fraction past the first pass: only a hires pass switches
    ("[a|b|]", 3, [(1, "a"), (2, "b"), (3, "")]),
]

# (prompt, first-pass steps, hires steps, hires-pass schedule): step numbers count on from the first pass,
# fractions span both passes ([0, 1] the first, [1, 2] the second).
HIRES_CASES = [
    ("[a:b:15]", 10, 10, [(5, "a"), (10, "b")]),
    ("[a:b:0.5]", 10, 10, [(10, "b")]),
    ("[a:b:1.5]", 10, 10, [(5, "a"), (10, "b")]),
    ("[a:b:1.0]", 10, 10, [(10, "b")]),
    ("[a:b:2.0]", 10, 10, [(10, "a")]),
    ("[a:b:5]", 10, 10, [(10, "b")]),
    ("[a:b:10]", 10, 10, [(10, "b")]),
    ("[a:b:11]", 10, 10, [(1, "a"), (10, "b")]),
    ("[a:b:25]", 10, 10, [(10, "a")]),
    ("[a:b:1.25]", 10, 20, [(5, "a"), (20, "b")]),
    ("[a:b:15]", 10, 20, [(5, "a"), (20, "b")]),
    ("[a:b:15]", 20, 4, [(4, "b")]),
    ("[a|b] [c:d:12]", 10, 3, [(1, "a c"), (2, "b c"), (3, "a d")]),  # alternation restarts with the pass
    ("[[a:b:12]:c:1.5]", 10, 6, [(2, "a"), (3, "b"), (6, "c")]),
    ("plain", 10, 10, [(10, "plain")]),
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
    got = _flat(parse_attention(text))
    assert [x if x is BRK else x[0] for x in got] == [x if x is BRK else x[0] for x in expected]
    weights = [x[1] for x in got if x is not BRK]
    assert weights == pytest.approx([x[1] for x in expected if x is not BRK], rel=1e-12)


@pytest.mark.parametrize(("text", "steps", "expected"), SCHEDULE_CASES, ids=[c[0] for c in SCHEDULE_CASES])
def test_prompt_schedule(text, steps, expected):
    assert prompt_schedule(text, steps) == expected


@pytest.mark.parametrize(
    ("text", "steps", "hires", "expected"), A1111_SCHEDULE_DOCTESTS,
    ids=[f"{c[0]}-{c[2] or 'base'}" for c in A1111_SCHEDULE_DOCTESTS],
)
def test_a1111_schedule_doctests(text, steps, hires, expected):
    if hires is None:
        got = prompt_schedule(text, steps)
    else:
        got = prompt_schedule(text, hires, first_pass_steps=steps)
    if text in A1111_SCHEDULE_DIFFERENCES and hires is None:
        assert got == [(steps, text)] != [tuple(e) for e in expected], A1111_SCHEDULE_DIFFERENCES[text]
        return
    assert got == [tuple(e) for e in expected]


@pytest.mark.parametrize(
    ("text", "expected"), A1111_ATTENTION_DOCTESTS, ids=[c[0] for c in A1111_ATTENTION_DOCTESTS]
)
def test_a1111_attention_doctests(text, expected):
    (got,) = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    err = max(abs(w - e) for (_, w), (_, e) in zip(got, expected))
    assert err <= 1e-12, f"max abs weight error {err:.2e}"


@pytest.mark.parametrize(
    ("text", "first", "steps", "expected"), HIRES_CASES, ids=[f"{c[0]}-{c[1]}+{c[2]}" for c in HIRES_CASES]
)
def test_hires_pass_schedule(text, first, steps, expected):
    assert prompt_schedule(text, steps, first_pass_steps=first) == expected


@pytest.mark.parametrize(("text", "rest", "refs"), NETWORK_CASES, ids=[c[0] for c in NETWORK_CASES])
def test_extract_networks(text, rest, refs):
    assert extract_networks(text) == (rest, refs)


def test_bad_network_weight_is_an_error_naming_it():
    with pytest.raises(ValueError, match="lora:a:much"):
        extract_networks("<lora:a:much>")


# --- properties over arbitrary text (hypothesis) ------------------------------------------------

_PIECES = ["[", "]", "(", ")", ":", "|", "\\", "\n", " ", "a", "b", "BREAK", "3", ".5", "-", "e", "1e999",
           "9" * 400, "<lora:", "<lora:x:", ">", "nan", "[a:b:2]", "[a|b]", "(a:1.5)", "(a:-1)"]
PROMPTS = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(_PIECES) | st.text(max_size=3), max_size=20).map("".join),
)


@given(PROMPTS, st.integers(1, 40), st.integers(0, 40))
def test_any_text_has_a_schedule_covering_every_step(text, steps, first):
    schedule = prompt_schedule(text, steps, first_pass_steps=first)
    ends = [end for end, _ in schedule]
    assert ends == sorted(set(ends)) and ends[0] >= 1 and ends[-1] == steps, ends
    assert all(isinstance(t, str) for _, t in schedule)
    if not any(c in text for c in "[]"):  # nothing to edit or alternate: the text itself
        assert schedule == [(steps, text)]


@given(st.integers(0, 60), st.integers(1, 30), st.integers(1, 30), st.integers(0, 15))
def test_hires_switch_points_continue_the_first_pass(when, first, steps, eighths):
    """An integer counts on from the first pass; a fraction 1 + x of the hires pass is x of a plain pass."""
    hires = prompt_schedule(f"[a:b:{when}]", steps, first_pass_steps=first)
    assert hires == prompt_schedule(f"[a:b:{max(when - first, 0)}]", steps)
    fraction = eighths / 8  # exact in binary, so both sides round alike
    hires = prompt_schedule(f"[a:b:{1 + fraction!r}]", steps, first_pass_steps=first)
    assert hires == prompt_schedule(f"[a:b:{fraction!r}]", steps)


@given(PROMPTS)
def test_any_text_has_finite_weights_or_a_value_error(text):
    try:
        parts = parse_attention(text)
    except ValueError as e:
        assert "not a finite number" in str(e)
        return
    assert all(part and all(math.isfinite(w) for _, w in part) for part in parts)
    if not any(c in text for c in "\\()[]") and "BREAK" not in text:  # no syntax: the text itself
        assert parts == [[(text, 1.0)]]


@given(PROMPTS)
def test_network_tags_are_taken_out_or_a_value_error_names_the_tag(text):
    try:
        rest, refs = extract_networks(text)
    except ValueError as e:
        assert str(e).startswith("bad weight") and "<" in str(e)
        return
    assert len(rest) <= len(text) and all(math.isfinite(ref.weight) for ref in refs)


def test_a_switch_step_too_large_for_int_is_the_last_step():
    """Found by the fuzzer: int(float("9" * 400)) raised OverflowError."""
    assert prompt_schedule(f"[a:b:{'9' * 400}]", 10) == [(10, "a")]
    assert prompt_schedule(f"[a:b:{'9' * 400}.0]", 10, first_pass_steps=10) == [(10, "a")]


def test_weights_that_overflow_are_a_value_error():
    with pytest.raises(ValueError, match="not a finite number"):
        parse_attention("(a:" + "9" * 400 + ")")
    with pytest.raises(ValueError, match="not a finite number"):
        parse_attention(f"((a:{'9' * 300}):{'9' * 300})")  # 1e300 squared


@pytest.mark.parametrize("tag", ["<lora:a:nan>", "<lora:a:inf>", "<lora:a:1e999>"])
def test_network_weights_that_are_not_finite_are_an_error(tag):
    with pytest.raises(ValueError, match="bad weight"):
        extract_networks(f"x {tag}")


def test_brackets_nested_too_deep_to_recurse_are_text():
    assert prompt_schedule("[" * 5000, 10) == [(10, "[" * 5000)]
    assert prompt_schedule("[a|" * 3000 + " [b:3]", 10) == [(10, "[a|" * 3000 + " [b:3]")]
    nested = "[" * 100 + "x" + "]" * 100  # but a hundred levels are fine
    assert prompt_schedule(nested + "[b:3]", 10) == [(3, nested), (10, nested + "b")]
