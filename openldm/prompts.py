"""The AUTOMATIC1111 prompt language, parsed into plain structures.

Two levels, as in A1111:
- scheduling: `[from:to:when]`, `[to:when]`, `[from::when]` (prompt editing) and `[a|b|c]`
  (alternation) turn one prompt into a list of (last step, text) pairs: `prompt_schedule`;
- attention: `(x)` x1.1, `[x]` /1.1, `(x:1.3)` and escapes `\\(` turn one text into weighted
  fragments, in one list per part between `BREAK`s: `parse_attention`.
`when` is a fraction of the steps if it contains a '.', else a step number (A1111 >= 1.6 rule), and
a hires fix's second pass continues the first pass's count (`prompt_schedule(first_pass_steps=)`).
Like A1111, any text is a prompt: the parsers raise only for weights that are not finite numbers.
Extra networks (`<lora:name:weight>`) are taken out before either: `extract_networks`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

# --- extra networks ------------------------------------------------------------------------

_NETWORK = re.compile(r"<(\w+):([^>:]+)(?::([^>]*))?>")


@dataclass(frozen=True)
class NetworkRef:
    """`<kind:name:weight>` in a prompt, e.g. `<lora:film_grain:0.6>`."""

    kind: str
    name: str
    weight: float = 1.0


def extract_networks(prompt: str) -> tuple[str, list[NetworkRef]]:
    """Remove `<kind:name[:weight]>` tags from a prompt and return them; ValueError for a bad weight."""
    refs: list[NetworkRef] = []

    def take(match: re.Match) -> str:
        weight = match.group(3)
        try:
            value = float(weight.split(":")[0]) if weight else 1.0
        except ValueError:
            value = math.nan
        if not math.isfinite(value):  # float() also reads "nan" and "1e999"
            raise ValueError(f"bad weight {weight!r} in {match.group(0)!r}")
        refs.append(NetworkRef(match.group(1), match.group(2), value))
        return ""

    return _NETWORK.sub(take, prompt), refs


# --- scheduling: prompt editing and alternation ----------------------------------------------


@dataclass(frozen=True)
class Scheduled:
    before: list
    after: list
    when: int  # the last step of this pass that uses `before` (<= 0: none)


@dataclass(frozen=True)
class Alternate:
    options: list[list]


class _Unparsable(ValueError):
    """A1111 uses such a prompt as it is: a `|` outside `[...]`, or a backslash at a line's end."""


class _NoElement(ValueError):
    """An opening bracket that starts no element; at the top level it is literal text."""


# A1111's (lark's) SIGNED_NUMBER, with the spaces its grammar allows around it
_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*")
_SYNTAX = "\\[]():|"


class _ScheduleParser:
    """Recursive descent over A1111's scheduling grammar; emphasis brackets are kept as text.

    At the top level a bracket or colon that opens no element is literal text, and parsing goes on
    after it (so `((a][:b:c [d:3]` still edits `[d:3]`); inside brackets it fails the enclosing element.
    """

    def __init__(self, text: str, when: Callable[[str], int]):
        self.text, self.when, self.pos = text, when, 0

    def parse(self) -> list:
        nodes: list = []
        while self.pos < len(self.text):
            start = self.pos
            try:
                nodes.append(self.element())
            except _NoElement:
                self.pos = start
                if self.text[start] not in "[]():":
                    raise _Unparsable(self.text) from None
                nodes.append(self.text[start])
                self.pos += 1
        return nodes

    def element(self):
        """Plain text (with `\\x` escapes kept for the attention parser), or a bracketed element."""
        text, start = self.text, self.pos
        if text[start] == "(":
            return self.round()
        if text[start] == "[":
            return self.square()
        while self.pos < len(text) and (text[self.pos] not in _SYNTAX or self.escape()):
            self.pos += 2 if text[self.pos] == "\\" else 1
        if self.pos == start:
            raise _NoElement(text)
        return text[start : self.pos]

    def escape(self) -> bool:
        """A backslash and the character after it are text; one before a line's end escapes nothing."""
        rest = self.text[self.pos : self.pos + 2]
        return rest[0] == "\\" and len(rest) == 2 and rest[1] != "\n"

    def sequence(self) -> list:
        """Elements up to the next `]`, `)`, `:` or `|` of this nesting level (or the end)."""
        nodes: list = []
        while self.pos < len(self.text) and self.text[self.pos] not in "]):|":
            nodes.append(self.element())
        return nodes

    def take(self, chars: str) -> str:
        if self.pos >= len(self.text) or self.text[self.pos] not in chars:
            raise _NoElement(self.text)
        self.pos += 1
        return self.text[self.pos - 1]

    def round(self) -> list:
        """`(x)` or `(x:weight)`: emphasis, which this level keeps as text."""
        self.take("(")
        nodes = ["(", *self.sequence()]
        if self.take(":)") == ":":
            nodes += [":", *self.sequence(), self.take(")")]
        else:
            nodes.append(")")
        return nodes

    def square(self):
        """`[x]`, `[from:to:when]`, `[to:when]` or `[a|b|...]`, told apart by the separators inside."""
        self.take("[")
        parts, spans, seps = [], [], []
        while True:
            start = self.pos
            parts.append(self.sequence())
            spans.append(self.text[start : self.pos])
            sep = self.take(":|]")
            if sep == "]":
                break
            seps.append(sep)
        if not seps:
            return ["[", *parts[0], "]"]
        if set(seps) == {"|"}:
            return Alternate(parts)
        number = _NUMBER.fullmatch(spans[-1])
        if seps not in ([":"], [":", ":"]) or number is None:
            raise _NoElement(self.text)
        return Scheduled(parts[0] if len(parts) == 3 else [], parts[-2], self.when(number.group(1)))


def _switch_step(number: str, steps: int, first_pass_steps: int) -> int:
    """The last step of this pass before a `[from:to:number]` edit (A1111 >= 1.6 rules).

    A number with a '.' is a fraction, else a step number. In a hires fix's second pass, step numbers
    count on from the first pass and fractions span both: [0, 1] the first pass, [1, 2] the second.
    """
    value = float(number)
    if "." in number:
        value = (value - (1.0 if first_pass_steps else 0.0)) * steps
    else:
        value -= first_pass_steps
    return int(max(0.0, min(float(steps), value)))  # clamped first: `1e999` is a number too


def _boundaries(nodes: list, steps: int) -> set[int]:
    found: set[int] = set()
    for node in nodes:
        if isinstance(node, Scheduled):
            if node.when >= 1:
                found.add(node.when)
            found |= _boundaries(node.before, steps) | _boundaries(node.after, steps)
        elif isinstance(node, Alternate):
            found |= set(range(1, steps + 1))
            for option in node.options:
                found |= _boundaries(option, steps)
        elif isinstance(node, list):
            found |= _boundaries(node, steps)
    return found


def _text_at(nodes: list, step: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, Scheduled):
            out.append(_text_at(node.before if step <= node.when else node.after, step))
        elif isinstance(node, Alternate):
            out.append(_text_at(node.options[(step - 1) % len(node.options)], step))
        elif isinstance(node, list):
            out.append(_text_at(node, step))
        else:
            out.append(node)
    return "".join(out)


def prompt_schedule(prompt: str, steps: int, *, first_pass_steps: int = 0) -> list[tuple[int, str]]:
    """[(last step, text)] covering steps 1..`steps` of one sampling pass; never raises.

    As in A1111, sampling step i (0-based) uses the first entry whose last step is >= i. With
    `first_pass_steps` > 0 this is the second pass of a hires fix that followed a first pass of that many
    steps: `[b:15]` after 10 steps switches at step 5 of this pass, `[b:1.5]` halfway through it, and
    `[b:0.5]` is already done. A prompt A1111 cannot parse is used as it is.
    """
    when = partial(_switch_step, steps=steps, first_pass_steps=first_pass_steps)
    try:
        nodes = _ScheduleParser(prompt, when).parse()
    except (_Unparsable, RecursionError):  # brackets nested hundreds deep are taken as plain text
        return [(steps, prompt)]
    ends = sorted(_boundaries(nodes, steps) | {steps})
    return [(end, _text_at(nodes, end)) for end in ends if end <= steps]


# --- attention: weights and BREAK -------------------------------------------------------------

EMPHASIS = 1.1
BREAK = "BREAK"
_WEIGHT = r"[+-]?(?:\d+\.?\d*|\.\d+)"  # A1111 takes any run of digits and dots, and fails on `(a:1.2.3)`
_ATTENTION = re.compile(
    rf"\\[()\[\]\\]|\\|\(|\[|:\s*({_WEIGHT})\s*\)|\)|\]|[^\\()\[\]:]+|:"
)
_BREAK = re.compile(rf"\s*\b{BREAK}\b\s*", re.S)


def parse_attention(text: str) -> list[list[tuple[str, float]]]:
    """Weighted fragments of `text`, one list per part between BREAKs (each part starts a chunk).

    Any text parses; the one error, a ValueError, is a weight that overflows to infinity.

    A1111 marks a BREAK with a fragment ("BREAK", -1) that brackets scale like any other, so
    `(a BREAK b)` encodes the word "BREAK"; here a BREAK is structure, breaks wherever it is, and no
    weight (`(x:-1)` included) can be mistaken for one.
    """
    fragments: list[list] = []
    breaks: list[int] = []  # where each part after the first starts in `fragments`
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0])  # a lone backslash escapes nothing and is dropped
        elif token == "(":
            round_open.append(len(fragments))
        elif token == "[":
            square_open.append(len(fragments))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), EMPHASIS)
        elif token == "]" and square_open:
            scale(square_open.pop(), 1 / EMPHASIS)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    breaks.append(len(fragments))
                fragments.append([part, 1.0])
    for start in round_open:
        scale(start, EMPHASIS)
    for start in square_open:
        scale(start, 1 / EMPHASIS)
    for fragment, weight in fragments:
        if not math.isfinite(weight):  # `(x:1e200)` inside `(...:1e200)`: no image can follow
            raise ValueError(f"the weight of {fragment!r} in the prompt is {weight}, not a finite number")
    bounds = [0, *breaks, len(fragments)]
    return [_merge(fragments[a:b]) for a, b in zip(bounds, bounds[1:])]


def _merge(fragments: list[list]) -> list[tuple[str, float]]:
    """Join neighbours of equal weight (as A1111 does, empty fragments included)."""
    merged: list[list] = []
    for text, weight in fragments:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(t, w) for t, w in merged] or [("", 1.0)]
