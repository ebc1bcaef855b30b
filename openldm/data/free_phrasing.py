"""Held-out "free phrasing" prompts: how people write shapes prompts, in forms training never uses.

The templates and the position phrases below are kept out of the training grammar
(`openldm.data.phrasing`): `tests/test_free_phrasing.py` checks that no filled template is a caption
the grammar can write, and that every word in them is one the grammar teaches (so a model trained on
it is not asked about words it never saw, only about new ways of putting them together).

Slots: size, colour, shape, position (the grammar's phrases), where (the held-out phrases below),
background; with a 1 or 2 suffix in two-shape templates. A template leaves out what it does not say.
"""

from __future__ import annotations

import random
import re
from string import Formatter

from openldm.data.phrasing import POSITION_WORDS, SIZE_WORDS, Caption, PromptFacts, Stated
from openldm.data.shapes import Scene

# position phrases the grammar never writes, made of words it does teach
WHERE: dict[str, tuple[str, ...]] = {
    "on the left": ("to the left", "at the left", "to the left side"),
    "on the right": ("to the right", "at the right", "to the right side"),
    "at the top": ("on top", "at the upper side", "on the top"),
    "at the bottom": ("on the bottom", "at the lower side", "in the bottom half"),
    "in the center": ("at the center", "at the centre", "at the middle"),
}

ONE_SHAPE = (
    "{size} {shape} in {colour} {position}, {background} background",
    "{background} background with a {size} {colour} {shape} {position}",
    "{colour} {size} {shape} {position} on a {background} background",
    "{shape}: {colour}, {size}, {position}; background: {background}",
    "{size} {colour} {shape} {where}, {background} background",
    "a {colour} {shape} {where}",
    "{background} background, {where}: a {colour} {shape}",
    "{colour} {shape}, {size}",
    "{where} a {size} {colour} {shape} with a {background} background",
    "{shape} in {colour} {where} on {background} background",
)
TWO_SHAPES = (
    "{position1} a {colour1} {shape1}, {position2} a {colour2} {shape2}, {background} background",
    "{size1} {colour1} {shape1} {where1} with a {size2} {colour2} {shape2} {where2}",
    "{shape2} in {colour2} {position2} and {shape1} in {colour1} {position1}, {background} background",
    "{background} background: {where1} {colour1} {shape1}, {where2} {colour2} {shape2}",
    "{colour1} {shape1} {where1}, {colour2} {shape2} {where2}, with a {background} background",
)


def _fields(template: str) -> list[str]:
    return [name for _, name, _, _ in Formatter().parse(template) if name]


def _slot_values(scene: Scene, order: list[int], rng: random.Random) -> dict[str, str]:
    values = {"background": scene.background}
    for n, index in enumerate(order, 1):
        shape, suffix = scene.shapes[index], str(n) if len(order) > 1 else ""
        values |= {f"size{suffix}": rng.choice(SIZE_WORDS[shape.size]), f"colour{suffix}": shape.colour,
                   f"shape{suffix}": shape.kind, f"where{suffix}": rng.choice(WHERE[shape.position]),
                   f"position{suffix}": rng.choice(POSITION_WORDS[shape.position])}
    return values


def _stated(scene: Scene, order: list[int], template: str) -> PromptFacts:
    """What the filled template states, its shapes in the order it names them."""
    fields = _fields(template)
    suffixes = [str(n) if len(order) > 1 else "" for n in range(1, len(order) + 1)]
    named = sorted(range(len(order)), key=lambda n: fields.index(f"shape{suffixes[n]}"))
    shapes = []
    for n in named:
        shape, suffix = scene.shapes[order[n]], suffixes[n]
        says = {attr for attr in ("size", "colour") if f"{attr}{suffix}" in fields}
        placed = f"position{suffix}" in fields or f"where{suffix}" in fields
        shapes.append(Stated(shape.kind, shape.colour if "colour" in says else None,
                             shape.size if "size" in says else None, shape.position if placed else None))
    return PromptFacts(tuple(shapes), scene.background if "background" in fields else None)


def fill(template: str, scene: Scene, rng: random.Random, swap: bool = False) -> Caption:
    """One template filled from a scene (`swap`: its second shape takes the template's first slots)."""
    order = list(range(len(scene.shapes)))[::-1] if swap else list(range(len(scene.shapes)))
    text = template.format(**_slot_values(scene, order, rng))
    text = re.sub(r"\ba (?=[aeiou])", "an ", text)
    text = text[0].upper() + text[1:] if rng.random() < 0.5 else text
    return Caption(text, _stated(scene, order, template))


def free_phrase(scene: Scene, rng: random.Random) -> Caption:
    """A held-out free-phrasing prompt for the scene, with what it states."""
    template = rng.choice(ONE_SHAPE if len(scene.shapes) == 1 else TWO_SHAPES)
    return fill(template, scene, rng, swap=len(scene.shapes) == 2 and rng.random() < 0.5)
