"""The AUTOMATIC1111 prompt language, parsed into plain structures.

Two levels, as in A1111:
- scheduling: `[from:to:when]`, `[to:when]`, `[from::when]` (prompt editing) and `[a|b|c]`
  (alternation) turn one prompt into a list of (last step, text) pairs: `prompt_schedule`;
- attention: `(x)` x1.1, `[x]` /1.1, `(x:1.3)`, escapes `\\(`, and `BREAK` turn one text into
  weighted fragments: `parse_attention`.
`when` is a fraction of the steps if it contains a '.', else a step number (A1111 >= 1.6 rule).
Extra networks (`<lora:name:weight>`) are taken out before either: `extract_networks`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# --- extra networks ------------------------------------------------------------------------

_NETWORK = re.compile(r"<(\w+):([^>:]+)(?::([^>]*))?>")


@dataclass(frozen=True)
class NetworkRef:
    """`<kind:name:weight>` in a prompt, e.g. `<lora:film_grain:0.6>`."""

    kind: str
    name: str
    weight: float = 1.0


def extract_networks(prompt: str) -> tuple[str, list[NetworkRef]]:
    """Remove `<kind:name[:weight]>` tags from a prompt and return them."""
    refs: list[NetworkRef] = []

    def take(match: re.Match) -> str:
        weight = match.group(3)
        try:
            value = float(weight.split(":")[0]) if weight else 1.0
        except ValueError:
            raise ValueError(f"bad weight {weight!r} in {match.group(0)!r}") from None
        refs.append(NetworkRef(match.group(1), match.group(2), value))
        return ""

    return _NETWORK.sub(take, prompt), refs


# --- scheduling: prompt editing and alternation ----------------------------------------------


@dataclass(frozen=True)
class Scheduled:
    before: list
    after: list
    when: float  # already converted to a step number


@dataclass(frozen=True)
class Alternate:
    options: list[list]


class _Unparsable(ValueError):
    pass


_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*$")


class _ScheduleParser:
    """Recursive descent over the scheduling grammar; emphasis brackets are kept as text."""

    def __init__(self, text: str, steps: int):
        self.text, self.steps, self.pos = text, steps, 0

    def parse(self) -> list:
        nodes = self.sequence(stop="")
        if self.pos != len(self.text):
            raise _Unparsable(self.text)
        return nodes

    def sequence(self, stop: str) -> list:
        """Nodes up to (not including) an unescaped character of `stop` at this nesting level."""
        nodes: list = []
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c in stop:
                break
            if c == "\\" and self.pos + 1 < len(self.text):
                nodes.append(self.text[self.pos : self.pos + 2])
                self.pos += 2
            elif c == "[":
                nodes.append(self.bracket())
            elif c == "(":
                self.pos += 1
                nodes += ["(", *self.sequence(stop=")"), self.expect(")")]
            elif c in "])|" and stop:
                raise _Unparsable(self.text)
            else:
                nodes.append(c)
                self.pos += 1
        return nodes

    def expect(self, char: str) -> str:
        if self.pos >= len(self.text) or self.text[self.pos] != char:
            raise _Unparsable(self.text)
        self.pos += 1
        return char

    def bracket(self):
        """`[...]`: emphasis, prompt editing or alternation, told apart by the separators inside."""
        self.pos += 1
        parts, seps = [self.sequence(stop=":|]")], []
        while self.pos < len(self.text) and self.text[self.pos] in ":|":
            seps.append(self.text[self.pos])
            self.pos += 1
            parts.append(self.sequence(stop=":|]"))
        self.expect("]")
        if not seps:
            return ["[", *parts[0], "]"]
        if set(seps) == {"|"}:
            return Alternate(parts)
        if seps in ([":"], [":", ":"]):
            return self.scheduled(parts)
        raise _Unparsable(self.text)

    def scheduled(self, parts: list[list]) -> Scheduled:
        number = "".join(x for x in parts[-1] if isinstance(x, str))
        if not all(isinstance(x, str) for x in parts[-1]) or not _NUMBER.match(number):
            raise _Unparsable(self.text)
        value = float(number)
        when = value * self.steps if "." in number else value
        before = parts[0] if len(parts) == 3 else []
        return Scheduled(before, parts[-2], min(self.steps, int(when)))


def _boundaries(nodes: list, steps: int) -> set[int]:
    found: set[int] = set()
    for node in nodes:
        if isinstance(node, Scheduled):
            if node.when >= 1:
                found.add(int(node.when))
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


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """[(last step, text)] covering steps 1..`steps`; an unparsable prompt is used as it is.

    As in A1111, sampling step i (0-based) uses the first entry whose last step is >= i.
    """
    try:
        nodes = _ScheduleParser(prompt, steps).parse()
    except _Unparsable:
        return [(steps, prompt)]
    ends = sorted(_boundaries(nodes, steps) | {steps})
    return [(end, _text_at(nodes, end)) for end in ends if end <= steps]


# --- attention: weights and BREAK -------------------------------------------------------------

EMPHASIS = 1.1
BREAK = "BREAK"
_ATTENTION = re.compile(
    r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:"
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Weighted fragments of `text`; a `("BREAK", -1.0)` entry marks a forced chunk boundary.

    One deliberate difference from A1111: a BREAK inside brackets still breaks the chunk (A1111
    scales its marker weight too, and then encodes the literal word "BREAK").
    """
    fragments: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            if fragment[1] != -1.0:  # BREAK markers keep their meaning inside brackets
                fragment[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            fragments.append([token[1:] or "\\", 1.0])
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
                    fragments.append([BREAK, -1.0])
                fragments.append([part, 1.0])
    for start in round_open:
        scale(start, EMPHASIS)
    for start in square_open:
        scale(start, 1 / EMPHASIS)
    return _merge(fragments)


def _merge(fragments: list[list]) -> list[tuple[str, float]]:
    """Join neighbours of equal weight (as A1111 does, empty fragments included)."""
    merged: list[list] = []
    for text, weight in fragments:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(t, w) for t, w in merged] or [("", 1.0)]
