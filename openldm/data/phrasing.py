"""The one grammar of shapes captions: what the embedded model is trained to understand.

The generator knows every scene's truth, so one scene can be captioned in many ways. `caption`
writes a caption in a style: "template" is the fixed form of the first embedded model
(`Scene.caption`); "varied" samples the forms below, for training. `read_prompt` is the other side,
used by the evaluator: which attributes a prompt states, and their values.

The varied grammar (words in lower case; case, commas and articles are a surface choice):

    caption     := one | two
    one         := any order of: shape-clause [position-clause] [background]
                 | COLOUR background with shape-clause [position-clause]   (size not stated)
    two         := pair [background] | background pair
    pair        := placed join placed | position shape "and" position shape
    placed      := shape position
    join        := "and" | "with" | "," | "next to" | "beside"  ("next to", "beside": side by side only)
    shape-clause:= ["a"] [size] [colour] kind [position]       (size, colour, position optional)
                 | colour size kind [position]                 (background not "on a ... background")
                 | kind "in" colour [size] [position]          (one shape)
                 | colour kind "," size                        (one shape, with a position or background)
                 | kind ("," attribute)*                       (one shape: a list of size, colour, position)
    shape       := ["a"] [size] [colour] kind | colour size kind | size kind "in" colour
    size        := small | little | large | big
    colour      := red | green | blue | yellow | purple | orange | white | black
    kind        := circle | square | triangle
    position    := on the left [side] | left [side] | on the right [side] | right [side]
                 | at the top | top | upper | in the upper half
                 | at the bottom | bottom | lower | in the lower half
                 | in the center | in the centre | in the middle | center | centre | middle
                 | (training only, POSITION_EXTRA) in/on the left/right half, towards the left/right/top/
                   bottom/center/centre/middle, at the left/right/top/bottom side, in the top half,
                   on the upper/lower side, upper/lower side
    position-clause := position, said on its own when the shape clause has none ("red circle, left")
    background  := on a COLOUR background | COLOUR background | with a COLOUR background
                 | the background is COLOUR
                 | background COLOUR    (one shape: said first, or after a shape clause that is
                                         neither a list nor "kind in colour")

Clauses are joined by ", " or " "; articles (a, an, the) are all kept or all dropped; the whole
caption is in lower, sentence, title or upper case. A quarter of varied captions are the template.
`matches_grammar` recognises (a superset of) this language, so a test can prove that the held-out
free-phrasing prompts (`openldm.data.free_phrasing`) are none of it: the restrictions in brackets
above are what keeps each held-out template out.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

from openldm.data.shapes import PALETTE, POSITIONS, SHAPES, SIZES, Scene

STYLES = ("template", "varied")
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "on the left": ("on the left", "on the left side", "left", "left side"),
    "on the right": ("on the right", "on the right side", "right", "right side"),
    "at the top": ("at the top", "top", "upper", "in the upper half"),
    "at the bottom": ("at the bottom", "bottom", "lower", "in the lower half"),
    "in the center": ("in the center", "in the centre", "in the middle", "center", "centre", "middle"),
}
# more ways of saying each position, in training captions only: the free-phrasing prompts fill their
# {position} slots from POSITION_WORDS, so adding a phrase here leaves the held-out set as it was
POSITION_EXTRA: dict[str, tuple[str, ...]] = {
    "on the left": ("in the left half", "on the left half", "towards the left", "at the left side"),
    "on the right": ("in the right half", "on the right half", "towards the right",
                     "at the right side"),
    "at the top": ("in the top half", "on the upper side", "towards the top", "upper side",
                   "at the top side"),
    "at the bottom": ("on the lower side", "towards the bottom", "lower side", "at the bottom side"),
    "in the center": ("towards the center", "towards the centre", "towards the middle"),
}
EXTRA_SHARE = 0.35  # of training position phrases taken from POSITION_EXTRA
BACKGROUND_FORMS = ("on a {} background", "{} background", "with a {} background", "the background is {}")
# "background X" also closes one-shape captions ("a red circle on the left, background blue"), except
# after a list ("circle, red, small, background blue" is held out) and after "kind in colour" ("circle in
# red background blue" reads both ways without commas); said first it leads any form
BARE_BACKGROUND = "background {}"
PAIR_JOINS = ("and", "with", ",")
SIDE_BY_SIDE_JOINS = ("next to", "beside")
ARTICLES = frozenset({"a", "an", "the"})

TEMPLATE_SHARE = 0.25  # varied captions that are exactly the template
OMIT = 0.2  # chance of leaving out each of size, colour, position (one shape) and background
SHORT_FORM = 0.3  # a stated single-shape position is its own clause ("red circle, left")
# how a shape clause is worded (the forms the docstring lists); a form that needs an attribute the
# caption leaves out falls back to "plain"
ONE_FORMS = {"plain": 0.42, "colour_first": 0.12, "in_colour": 0.13, "list": 0.15, "background_with": 0.1,
             "size_after": 0.08}
LEADING_BACKGROUND = 0.15  # a stated one-shape background said first as "background X"
LEADING_FORM = BARE_BACKGROUND
TWO_FORMS = {"plain": 0.7, "colour_first": 0.15, "in_colour": 0.15}
PRE_POSITION = 0.3  # two shapes joined by "and" with each position said first ("on the left a red circle")
# the keyword of a position phrase, whichever form it takes (the parser reads any of them)
POSITION_KEYWORDS = {"left": "on the left", "right": "on the right", "top": "at the top",
                     "upper": "at the top", "bottom": "at the bottom", "lower": "at the bottom",
                     "center": "in the center", "centre": "in the center", "middle": "in the center"}
assert set(POSITIONS) == set(POSITION_WORDS) == set(POSITION_EXTRA) and set(SIZES) == set(SIZE_WORDS)


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

def _position_phrase(position: str, rng: random.Random, extra: bool = True) -> str:
    forms = POSITION_EXTRA if extra and rng.random() < EXTRA_SHARE else POSITION_WORDS
    return rng.choice(forms[position])


def _form(weights: dict[str, float], rng: random.Random, size: str | None, colour: str | None) -> str:
    form = rng.choices(list(weights), list(weights.values()))[0]
    needs = {"colour_first": bool(size and colour), "in_colour": bool(colour),
             "background_with": not size, "size_after": bool(size and colour)}
    return form if needs.get(form, True) else "plain"


def _shape_words(kind: str, size: str | None, colour: str | None, form: str, rng: random.Random) -> list[str]:
    """The shape itself in a form: [a] [size] [colour] kind, colour size kind, [size] kind in colour
    (the caller moves the size of "size_after" and of a single "in_colour" shape after the kind)."""
    size_word = [rng.choice(SIZE_WORDS[size])] if size else []
    if form in ("colour_first", "size_after"):
        return ["a", colour, *size_word, kind]
    if form == "in_colour":
        return ["a", *size_word, kind, "in", colour]
    return ["a", *size_word, *([colour] if colour else []), kind]


def _omitted(rng: random.Random, names: tuple[str, ...]) -> set[str]:
    return {name for name in names if rng.random() < OMIT}


def _background(colour: str, rng: random.Random, forms: tuple[str, ...] = BACKGROUND_FORMS) -> str:
    return rng.choice(forms).format(colour)


def _one(scene: Scene, rng: random.Random) -> tuple[list[str], PromptFacts]:
    shape = scene.shapes[0]
    omit = _omitted(rng, ("size", "colour", "position", "background"))
    size, colour, position = (None if a in omit else getattr(shape, a)
                              for a in ("size", "colour", "position"))
    background = None if "background" in omit else scene.background
    stated = Stated(shape.kind, colour, size, position)
    form = _form(ONE_FORMS, rng, size, colour)
    alone = not (position or background)
    if (form == "background_with" and not background) or (form == "size_after" and alone):
        form = "plain"
    where = _position_phrase(position, rng) if position else None
    leading = background is not None and rng.random() < LEADING_BACKGROUND
    if form == "list":  # "circle, red, small, on the left": the attributes after the kind, any order
        attributes = [w for w in (colour, where) if w] + ([rng.choice(SIZE_WORDS[size])] if size else [])
        rng.shuffle(attributes)
        clauses = [shape.kind, *attributes]
        if background and not leading:
            clauses.insert(rng.choice((0, len(clauses))), _background(background, rng))
        return _lead(clauses, background if leading else None), PromptFacts((stated,), background)
    if form == "background_with":
        words = _shape_words(shape.kind, size, colour, "plain", rng)
        clauses = [f"a {background} background with {' '.join(words)}"] + ([where] if where else [])
        return clauses, PromptFacts((stated,), background)
    short = where is not None and rng.random() < SHORT_FORM
    words = _shape_words(shape.kind, size, colour, form, rng)
    if form == "in_colour" and size:  # "small circle in red ..." is a held-out form: "circle in red, small"
        words = [*words[:1], *words[2:], words[1]]
    if form == "size_after":  # "a red circle, small" is held out alone: here a position or background follows
        (article, colour_word, size_word, kind), short = words, where is not None
        words = [article, colour_word, kind, ",", size_word]
    clauses = [" ".join(words + ([where] if where and not short else [])).replace(" ,", ",")]
    clauses += [where] if short else []
    if background and not leading:  # "colour size kind ... on a X background" is a held-out form
        forms = BACKGROUND_FORMS if form == "in_colour" else (*BACKGROUND_FORMS, BARE_BACKGROUND)
        clauses.append(_background(background, rng, forms[1:] if form == "colour_first" else forms))
    rng.shuffle(clauses)
    return _lead(clauses, background if leading else None), PromptFacts((stated,), background)


def _lead(clauses: list[str], background: str | None) -> list[str]:
    """The clauses after "background X" (a form said only first: "background blue, a red circle")."""
    return [LEADING_FORM.format(background), *clauses] if background else clauses


def _two(scene: Scene, rng: random.Random) -> tuple[list[str], PromptFacts]:
    side_by_side = scene.shapes[0].position == "on the left"
    join = rng.choice(PAIR_JOINS + (SIDE_BY_SIDE_JOINS if side_by_side else ()))
    pre = join == "and" and rng.random() < PRE_POSITION
    described = []
    for shape in scene.shapes:
        omit = _omitted(rng, ("size", "colour"))
        size, colour = (None if a in omit else getattr(shape, a) for a in ("size", "colour"))
        form = _form(TWO_FORMS, rng, size, colour)
        if form == "in_colour" and not size:  # "kind in colour" without a size is a held-out two-shape form
            form = "plain"
        words = _shape_words(shape.kind, size, colour, form, rng)
        where = _position_phrase(shape.position, rng, extra=False)  # two shapes: keep within 32 tokens
        described.append((" ".join([where, *words] if pre else [*words, where]),
                          Stated(shape.kind, colour, size, shape.position)))
    if rng.random() < 0.5:
        described.reverse()
    (first, _), (second, _) = described
    pair = f"{first}, {second}" if join == "," else f"{first} {join} {second}"
    clauses = [pair]
    background = None if rng.random() < OMIT else scene.background
    if background:
        clauses.insert(rng.randrange(2), _background(background, rng, BACKGROUND_FORMS[:3]))
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
        phrases += [*(w for forms in (*POSITION_WORDS.values(), *POSITION_EXTRA.values()) for w in forms),
                    *BACKGROUND_FORMS, *PAIR_JOINS, *SIDE_BY_SIDE_JOINS, "in",
                    *(w for forms in SIZE_WORDS.values() for w in forms)]
    words = {w for p in phrases for w in re.findall(r"[a-z]+", p)}
    return frozenset(words | set(PALETTE) | set(SHAPES) | set(SIZES))


# --- the recogniser and the parser -----------------------------------------------------------

def normalise(text: str) -> str:
    """Lower case, punctuation as spaces, no articles: the form the grammar's choices collapse to."""
    words = re.findall(r"[a-z]+", text.lower())
    return " ".join(w for w in words if w not in ARTICLES)


def _alternatives(options) -> str:
    return "(?:" + "|".join(sorted({re.escape(normalise(o)) for o in options}, key=len, reverse=True)) + ")"


def _grammar_pattern() -> re.Pattern:
    """A regular expression for every normalised caption the grammar can write (and a little more).

    Punctuation is gone once normalised, so each restriction of the docstring's grammar is spelt out
    here: they are what keeps the held-out free-phrasing templates out of this language.
    """
    size = _alternatives(w for forms in SIZE_WORDS.values() for w in forms)
    position = _alternatives(w for table in (POSITION_WORDS, POSITION_EXTRA) for forms in table.values()
                             for w in forms)
    colour, kind = _alternatives(PALETTE), _alternatives(SHAPES)
    slot = "colourslot"

    def backgrounds(forms) -> str:
        return "(?:" + "|".join(normalise(f.format(slot)).replace(slot, colour) for f in forms) + ")"

    any_background = backgrounds(BACKGROUND_FORMS)
    clause_background, not_on = (backgrounds((*forms, BARE_BACKGROUND)) for forms in
                                 (BACKGROUND_FORMS, BACKGROUND_FORMS[1:]))
    plain = f"(?:{size} )?(?:{colour} )?{kind}"
    colour_first = f"{colour} {size} {kind}"
    attribute = f"(?:{colour}|{size}|{position})"
    lead = normalise(LEADING_FORM.format(slot)).replace(slot, colour)
    ones = []
    cores = ((plain, clause_background, False), (f"{kind} in {colour}(?: {size})?", any_background, False),
             (colour_first, not_on, False), (f"{colour} {kind} {size}", clause_background, True))
    for core, background, needs_more in cores:  # needs_more: never alone (held out)
        for extra in ((), (position,), (background,), (position, background)):
            if extra or not needs_more:
                ones += [" ".join(o) for o in itertools.permutations((f"{core}(?: {position})?", *extra))]
        for extra in ((), (position,)):
            ones += [f"{lead} " + " ".join(o)
                     for o in itertools.permutations((f"{core}(?: {position})?", *extra))]
    listed = f"{kind}(?: {attribute})*"
    ones += [listed, f"{listed} {any_background}", f"{any_background} {listed}", f"{lead} {listed}"]
    with_shape = f"{colour} background with (?:{colour} )?{kind}(?: {position})?"
    ones += [with_shape, f"{with_shape} {position}", f"{position} {with_shape}"]
    shape = f"(?:{plain}|{colour_first}|{size} {kind} in {colour})"
    joins = _alternatives(PAIR_JOINS[:2] + SIDE_BY_SIDE_JOINS)
    pair = f"(?:{shape} {position}(?: {joins})? {shape} {position}|{position} {shape} and {position} {shape})"
    twos = [pair, f"{pair} {any_background}", f"{any_background} {pair}"]
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
        elif word == "is" and words[i - 1:i] == ["background"]:
            tokens.append(("is", word))
        elif word in {",", ";", ":", ".", "and", "with", "beside"} or (
                word == "next" and words[i + 1:i + 2] == ["to"]):
            tokens.append(("sep", word))
    return tokens


def _take_background(tokens: list[tuple[str, str]]) -> str | None:
    """The colour after "background is", else just before "background", else just after it (past
    punctuation); both leave `tokens`."""
    words = [i for i, token in enumerate(tokens) if token[0] != "sep" or token[1].isalpha()]
    for n, i in enumerate(words):
        if tokens[i][0] != "background":
            continue
        after = words[n + 1:n + 2]
        said = after and tokens[after[0]][0] == "is"
        for j in words[n + 2:n + 3] if said else words[max(0, n - 1):n] + after:
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
