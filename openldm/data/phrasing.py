"""The one grammar of shapes captions: what the embedded model is trained to understand.

The generator knows every scene's truth, so one scene can be captioned in many ways. `caption`
writes a caption in a style: "template" is the fixed form of the first embedded model
(`Scene.caption`); "varied" samples the forms below, for training. `read_prompt` is the other side,
used by the evaluator: which attributes a prompt states, and their values.

The varied grammar (words in lower case; case, commas and articles are a surface choice):

    caption     := one | two
    one         := any order of: shape-clause [position-clause] [background]
    two         := (shape-clause position) ("and" | "next to") (shape-clause position) , [background]
                   in either order of the two shapes (before or after the background);
                   "next to" only for side-by-side shapes; both positions are always stated
    shape-clause:= ["a"] [size] [colour] kind [position]       (size, colour, position optional)
    size        := small | little | large | big
    colour      := red | green | blue | yellow | purple | orange | white | black
    kind        := circle | square | triangle
    position    := on the left [side] | left [side] | on the right [side] | right [side]
                 | at the top | top | upper | in the upper half
                 | at the bottom | bottom | lower | in the lower half
                 | in the center | in the centre | in the middle | center | centre | middle
    position-clause := position, said on its own when the shape clause has none ("red circle, left")
    background  := on a COLOUR background | COLOUR background | with a COLOUR background

Clauses are joined by ", " or " "; articles (a, an, the) are all kept or all dropped; the whole
caption is in lower, sentence, title or upper case. A quarter of varied captions are the template.
`matches_grammar` recognises (a superset of) this language, so a test can prove that the held-out
free-phrasing prompts (`openldm.data.free_phrasing`) are none of it.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

from openldm.data.shapes import PALETTE, POSITIONS, SHAPES, SIZES, Scene, Shape

STYLES = ("template", "varied")
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "on the left": ("on the left", "on the left side", "left", "left side"),
    "on the right": ("on the right", "on the right side", "right", "right side"),
    "at the top": ("at the top", "top", "upper", "in the upper half"),
    "at the bottom": ("at the bottom", "bottom", "lower", "in the lower half"),
    "in the center": ("in the center", "in the centre", "in the middle", "center", "centre", "middle"),
}
BACKGROUND_FORMS = ("on a {} background", "{} background", "with a {} background")
PAIR_JOINS = ("and", "next to")
ARTICLES = frozenset({"a", "an", "the"})

TEMPLATE_SHARE = 0.25  # varied captions that are exactly the template
OMIT = 0.2  # chance of leaving out each of size, colour, position (one shape) and background
SHORT_FORM = 0.3  # a stated single-shape position is its own clause ("red circle, left")
# the keyword of a position phrase, whichever form it takes (the parser reads any of them)
POSITION_KEYWORDS = {"left": "on the left", "right": "on the right", "top": "at the top",
                     "upper": "at the top", "bottom": "at the bottom", "lower": "at the bottom",
                     "center": "in the center", "centre": "in the center", "middle": "in the center"}
assert set(POSITIONS) == set(POSITION_WORDS) and set(SIZES) == set(SIZE_WORDS)


@dataclass(frozen=True)
class Stated:
    """What a prompt says about one shape: None for an attribute it leaves out."""

    kind: str
    colour: str | None = None
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class PromptFacts:
    """What a prompt states: its shapes in the order it names them, and the background (or None)."""

    shapes: tuple[Stated, ...]
    background: str | None = None


@dataclass(frozen=True)
class Caption:
    text: str
    stated: PromptFacts


def stated_all(scene: Scene) -> PromptFacts:
    """A prompt that states every attribute of the scene."""
    shapes = tuple(Stated(s.kind, s.colour, s.size, s.position) for s in scene.shapes)
    return PromptFacts(shapes, scene.background)


# --- the generator ---------------------------------------------------------------------------

def _shape_clause(shape: Shape, rng: random.Random, omit: set[str], inline: bool) -> tuple[str, Stated]:
    size = None if "size" in omit else shape.size
    colour = None if "colour" in omit else shape.colour
    position = None if "position" in omit else shape.position
    words = ["a"]
    if size:
        words.append(rng.choice(SIZE_WORDS[size]))
    if colour:
        words.append(colour)
    words.append(shape.kind)
    if position and inline:
        words.append(rng.choice(POSITION_WORDS[position]))
    return " ".join(words), Stated(shape.kind, colour, size, position)


def _omitted(rng: random.Random, names: tuple[str, ...]) -> set[str]:
    return {name for name in names if rng.random() < OMIT}


def _one(scene: Scene, rng: random.Random) -> tuple[list[str], PromptFacts]:
    shape = scene.shapes[0]
    omit = _omitted(rng, ("size", "colour", "position", "background"))
    short = rng.random() < SHORT_FORM
    clause, stated = _shape_clause(shape, rng, omit, inline=not short)
    clauses = [clause]
    if short and stated.position:
        clauses.append(rng.choice(POSITION_WORDS[shape.position]))
    background = None if "background" in omit else scene.background
    if background:
        clauses.append(rng.choice(BACKGROUND_FORMS).format(background))
    rng.shuffle(clauses)
    return clauses, PromptFacts((stated,), background)


def _two(scene: Scene, rng: random.Random) -> tuple[list[str], PromptFacts]:
    described = [_shape_clause(s, rng, _omitted(rng, ("size", "colour")), inline=True) for s in scene.shapes]
    if rng.random() < 0.5:
        described.reverse()
    side_by_side = scene.shapes[0].position == "on the left"
    join = rng.choice(PAIR_JOINS) if side_by_side else "and"
    clauses = [f"{described[0][0]} {join} {described[1][0]}"]
    background = None if rng.random() < OMIT else scene.background
    if background:
        clauses.insert(rng.randrange(2), rng.choice(BACKGROUND_FORMS).format(background))
    return clauses, PromptFacts(tuple(stated for _, stated in described), background)


def _surface(clauses: list[str], rng: random.Random) -> str:
    """Commas or not, articles or not (a/an agreeing with the next word), and a letter case."""
    words = (", " if rng.random() < 0.5 else " ").join(clauses).split(" ")
    if rng.random() < 0.5:
        words = [w for w in words if w not in ARTICLES]
    words = ["an" if w == "a" and i + 1 < len(words) and words[i + 1][0] in "aeiou" else w
             for i, w in enumerate(words)]
    text = " ".join(words)
    case = rng.random()
    if case < 0.5:
        return text
    if case < 0.7:
        return text[0].upper() + text[1:]
    return text.title() if case < 0.85 else text.upper()


def phrase(scene: Scene, rng: random.Random, style: str = "varied") -> Caption:
    """A caption of the scene in a style, with what it states (the truth the parser must recover)."""
    if style not in STYLES:
        raise ValueError(f"unknown caption style {style!r}; choose from {', '.join(STYLES)}")
    if style == "template" or rng.random() < TEMPLATE_SHARE:
        return Caption(scene.caption, stated_all(scene))
    clauses, stated = (_one if len(scene.shapes) == 1 else _two)(scene, rng)
    return Caption(_surface(clauses, rng), stated)


def caption(scene: Scene, rng: random.Random, style: str = "varied") -> str:
    """One caption of the scene in a style ("template": always the same; "varied": the grammar)."""
    return phrase(scene, rng, style).text


def vocabulary(style: str = "varied") -> frozenset[str]:
    """Every word a caption of the style can contain: what a model trained on it knows."""
    phrases = [*POSITIONS, "a an on background and"]
    if style == "varied":
        phrases += [*(w for forms in POSITION_WORDS.values() for w in forms), *BACKGROUND_FORMS, *PAIR_JOINS,
                    *(w for forms in SIZE_WORDS.values() for w in forms)]
    words = {w for p in phrases for w in p.replace("{}", " ").split()}
    return frozenset(words | set(PALETTE) | set(SHAPES) | set(SIZES))


# --- the recogniser and the parser -----------------------------------------------------------

def normalise(text: str) -> str:
    """Lower case, punctuation as spaces, no articles: the form the grammar's choices collapse to."""
    words = re.findall(r"[a-z]+", text.lower())
    return " ".join(w for w in words if w not in ARTICLES)


def _alternatives(options) -> str:
    return "(?:" + "|".join(sorted({re.escape(normalise(o)) for o in options}, key=len, reverse=True)) + ")"


def _grammar_pattern() -> re.Pattern:
    """A regular expression for every normalised caption the grammar can write (and a little more)."""
    size = _alternatives(w for forms in SIZE_WORDS.values() for w in forms)
    position = _alternatives(w for forms in POSITION_WORDS.values() for w in forms)
    colour, kind = _alternatives(PALETTE), _alternatives(SHAPES)
    shape = f"(?:{size} )?(?:{colour} )?{kind}"
    slot = "colourslot"
    forms = (normalise(f.format(slot)).replace(slot, colour) for f in BACKGROUND_FORMS)
    background = "(?:" + "|".join(forms) + ")"
    ones = []
    for extra in ((), (position,), (background,), (position, background)):
        ones += [" ".join(order) for order in itertools.permutations((f"{shape}(?: {position})?", *extra))]
    pair = f"{shape} {position} {_alternatives(PAIR_JOINS)} {shape} {position}"
    twos = [pair, f"{pair} {background}", f"{background} {pair}"]
    return re.compile("|".join(f"(?:{p})" for p in ones + twos))


_GRAMMAR = _grammar_pattern()


def matches_grammar(text: str) -> bool:
    """Whether the training grammar can write this prompt (up to case, commas and articles)."""
    return _GRAMMAR.fullmatch(normalise(text)) is not None


def _tokens(text: str) -> list[tuple[str, str]]:
    """(role, value) per word: size, colour, kind, position, background, sep (a clause boundary)."""
    sizes = {w: size for size, forms in SIZE_WORDS.items() for w in forms}
    words = re.findall(r"[a-z]+|[,;:.]", text.lower())
    tokens = []
    for i, word in enumerate(words):
        if word in sizes:
            tokens.append(("size", sizes[word]))
        elif word in PALETTE:
            tokens.append(("colour", word))
        elif word in SHAPES:
            tokens.append(("kind", word))
        elif word in POSITION_KEYWORDS:
            tokens.append(("position", POSITION_KEYWORDS[word]))
        elif word == "background":
            tokens.append(("background", word))
        elif word in {",", ";", ":", ".", "and", "with"} or (word == "next" and words[i + 1:i + 2] == ["to"]):
            tokens.append(("sep", word))
    return tokens


def _take_background(tokens: list[tuple[str, str]]) -> str | None:
    """The colour just before "background", else just after it (past punctuation); both leave `tokens`."""
    words = [i for i, token in enumerate(tokens) if token[0] != "sep" or token[1].isalpha()]
    for n, i in enumerate(words):
        if tokens[i][0] != "background":
            continue
        for j in words[max(0, n - 1):n] + words[n + 1:n + 2]:
            if tokens[j][0] == "colour":
                colour = tokens[j][1]
                tokens[j] = tokens[i] = ("sep", "")
                return colour
    return None


def read_prompt(text: str) -> PromptFacts:
    """Which attributes a prompt states: each size, colour and position word belongs to a shape word.

    Size and colour go to the next shape word of their clause (else the previous shape), a position
    to the previous shape word of its clause (else the next one in it, else the previous, else the
    next); clauses end at commas, "and", "next to" and "with". The background is the colour beside
    the word "background".
    """
    tokens = _tokens(text)
    background = _take_background(tokens)
    clause = list(itertools.accumulate(int(role == "sep") for role, _ in tokens))
    kinds = [i for i, (role, _) in enumerate(tokens) if role == "kind"]
    found: list[dict[str, str]] = [{"kind": tokens[i][1]} for i in kinds]
    for i, (role, value) in enumerate(tokens):
        if role not in ("size", "colour", "position") or not kinds:
            continue
        before = [k for k in kinds if k < i]
        after = [k for k in kinds if k > i]
        here_before = [k for k in before if clause[k] == clause[i]]
        here_after = [k for k in after if clause[k] == clause[i]]
        if role == "position":
            order = here_before[-1:] + here_after[:1] + before[-1:] + after[:1]
        else:
            order = here_after[:1] + here_before[-1:] + after[:1] + before[-1:]
        found[kinds.index(order[0])].setdefault(role, value)
    shapes = tuple(Stated(f["kind"], f.get("colour"), f.get("size"), f.get("position")) for f in found)
    return PromptFacts(shapes, background)
