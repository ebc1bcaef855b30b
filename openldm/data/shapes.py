"""A procedurally generated, captioned dataset of coloured shapes, with an exact evaluator.

Every image is drawn from a `Scene` (background colour plus one or two shapes, each with a
colour, class, size and position), and its caption is written from the same scene, e.g.
"a small red circle on the left, on a blue background". Because the generator knows the truth,
`score_image` can check a generated image attribute by attribute with the generator's own rules.
It is the test data for training and the training data of the embedded model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 225, 30),
    "purple": (140, 50, 190),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.12, "large": 0.2}  # shape half-extent, as a fraction of the image side
POSITIONS: dict[str, tuple[float, float]] = {  # (x, y) centre as fractions of the image side
    "on the left": (0.3, 0.5),
    "on the right": (0.7, 0.5),
    "at the top": (0.5, 0.3),
    "at the bottom": (0.5, 0.7),
    "in the center": (0.5, 0.5),
}
# Two shapes always stand side by side or one above the other.
PAIRED_POSITIONS = (("on the left", "on the right"), ("at the top", "at the bottom"))
# Colour/shape pairs never shown in training, to measure compositional generalisation.
HELD_OUT_PAIRS = frozenset(
    {("red", "triangle"), ("blue", "circle"), ("yellow", "square"), ("white", "circle")}
)
FILL_RATIO = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / bounding-box area
TOP_HALF_SHARE = {"circle": 0.5, "square": 0.5, "triangle": 0.25}  # share of the area above the centre
JITTER = 0.04  # random offset of centres, fraction of the image side
SIZE_JITTER = 0.1  # relative random change of the half-extent


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    position: str

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.kind} {self.position}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str

    @property
    def caption(self) -> str:
        article = "an" if self.background[0] in "aeiou" else "a"
        return " and ".join(s.phrase() for s in self.shapes) + f", on {article} {self.background} background"


@dataclass(frozen=True)
class ShapesConfig:
    image_size: int = 128
    two_shape_fraction: float = 0.0
    split: str = "train"  # "train" avoids HELD_OUT_PAIRS; "held_out" uses only them; "all"
    supersample: int = 4  # draw larger, then downsample: smooth, anti-aliased edges


def _pair_allowed(colour: str, kind: str, split: str) -> bool:
    held_out = (colour, kind) in HELD_OUT_PAIRS
    return {"train": not held_out, "held_out": held_out, "all": True}[split]


def random_shape(rng: random.Random, position: str, background: str, split: str) -> Shape:
    """A shape whose colour differs from the background and whose colour/class pair fits the split."""
    while True:
        colour = rng.choice([c for c in PALETTE if c != background])
        kind = rng.choice(SHAPES)
        if _pair_allowed(colour, kind, split):
            return Shape(kind, colour, rng.choice(list(SIZES)), position)


def random_scene(rng: random.Random, config: ShapesConfig) -> Scene:
    background = rng.choice(list(PALETTE))
    if rng.random() < config.two_shape_fraction:
        first, second = rng.choice(PAIRED_POSITIONS)
        # Two shapes are always small, so that they never overlap.
        shapes = tuple(
            replace(random_shape(rng, pos, background, config.split), size="small") for pos in (first, second)
        )
    else:
        shapes = (random_shape(rng, rng.choice(list(POSITIONS)), background, config.split),)
    return Scene(shapes, background)


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if kind == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if kind == "triangle":  # apex up, base and apex at the half-extent: bounding box 2r x 2r
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return None


def render(scene: Scene, config: ShapesConfig, rng: random.Random | None = None) -> Image.Image:
    """Draw a scene; `rng` adds the small position and size jitter of training images."""
    big = config.image_size * config.supersample
    image = Image.new("RGB", (big, big), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        fx, fy = POSITIONS[shape.position]
        half = SIZES[shape.size]
        if rng is not None:
            fx += rng.uniform(-JITTER, JITTER)
            fy += rng.uniform(-JITTER, JITTER)
            half *= 1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
        cx, cy, r = fx * big, fy * big, half * big
        points = _polygon(shape.kind, cx, cy, r)
        if points is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=PALETTE[shape.colour])
        else:
            draw.polygon(points, fill=PALETTE[shape.colour])
    return image.resize((config.image_size, config.image_size), Image.Resampling.BOX)


@dataclass
class ShapesDataset:
    """`len(config)` items, item i reproducible from (seed, i) alone: (image, caption, scene)."""

    length: int
    config: ShapesConfig = field(default_factory=ShapesConfig)
    seed: int = 0

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> tuple[Scene, random.Random]:
        rng = random.Random(f"{self.seed}:{index}")
        return random_scene(rng, self.config), rng

    def __getitem__(self, index: int) -> tuple[Image.Image, str, Scene]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        scene, rng = self.scene(index)
        return render(scene, self.config, rng), scene.caption, scene


# --- the evaluator -------------------------------------------------------------------------

ATTRIBUTES = ("background", "colour", "shape", "size", "position")


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(PALETTE)
    table = np.array([PALETTE[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((table - rgb) ** 2).sum(axis=1)))]


def _nearest(value: float | tuple[float, float], table: dict) -> str:
    return min(table, key=lambda k: float(np.sum((np.asarray(table[k]) - np.asarray(value)) ** 2)))


def read_scene(image: Image.Image, n_shapes: int = 1) -> Scene:
    """Recover the scene an image shows, by the generator's own rules (inverse of `render`)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    side = pixels.shape[0]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = nearest_colour(np.median(border, axis=0))
    foreground = np.sqrt(((pixels - np.array(PALETTE[background])) ** 2).sum(-1)) > 60
    if n_shapes == 2:
        ys, xs = np.nonzero(foreground)
        horizontal = xs.size and xs.std() >= ys.std()
        masks = _split_mask(foreground, horizontal)
    else:
        masks = [foreground]
    return Scene(tuple(_read_shape(pixels, m, side) for m in masks), background)


def _split_mask(mask: np.ndarray, horizontal: bool) -> list[np.ndarray]:
    """Split a two-shape foreground into its two halves along the axis the shapes lie on."""
    side = mask.shape[0]
    first, second = np.zeros_like(mask), np.zeros_like(mask)
    if horizontal:
        first[:, : side // 2], second[:, side // 2 :] = mask[:, : side // 2], mask[:, side // 2 :]
    else:
        first[: side // 2], second[side // 2 :] = mask[: side // 2], mask[side // 2 :]
    return [first, second]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a mask: a shape without stray pixels elsewhere.

    Generated images can carry faint specks or edge artefacts that cross the colour threshold;
    a shape is one connected region, so everything else is dropped before measuring it.
    """
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else mask


def _classify(mask: np.ndarray, x0: int, x1: int, y0: int, y1: int) -> str:
    """Shape class by the generator's geometry: triangles stand apex up, so only about a quarter
    of their area lies in the upper half of their box (circles and squares: half); squares fill
    their box, circles pi/4 of it."""
    box = mask[y0:y1, x0:x1]
    upper = box[: (y1 - y0) // 2].sum() / max(1, box.sum())
    if upper < (TOP_HALF_SHARE["triangle"] + TOP_HALF_SHARE["circle"]) / 2:
        return "triangle"
    fill = box.sum() / box.size
    return "square" if fill > (FILL_RATIO["square"] + FILL_RATIO["circle"]) / 2 else "circle"


def _read_shape(pixels: np.ndarray, mask: np.ndarray, side: int) -> Shape:
    if mask.sum() < 4:
        return Shape("none", "none", "none", "none")
    mask = largest_component(mask)
    ys, xs = np.nonzero(mask)
    colour = nearest_colour(np.median(pixels[mask], axis=0))
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    half = max(x1 - x0, y1 - y0) / 2 / side
    centre = ((x0 + x1) / 2 / side, (y0 + y1) / 2 / side)
    return Shape(_classify(mask, x0, x1, y0, y1), colour, _nearest(half, SIZES), _nearest(centre, POSITIONS))


def score_image(image: Image.Image, scene: Scene) -> dict[str, bool]:
    """Per-attribute correctness of an image against the scene it was asked to show."""
    seen = read_scene(image, len(scene.shapes))
    scores = {"background": seen.background == scene.background}
    for attr, name in (("colour", "colour"), ("kind", "shape"), ("size", "size"), ("position", "position")):
        scores[name] = all(getattr(a, attr) == getattr(b, attr) for a, b in zip(seen.shapes, scene.shapes))
    return scores
