"""Score a text-to-image model on the shapes domain with the dataset's exact evaluator.

Prompts come from scenes the training run never drew (their own dataset seed) and images from
generation seeds far from any used in training. The prompt sets:

- `in_distribution`: single shapes whose colour/class pair appeared in training, in the template;
- `compositional`: colour/class pairs held out of training (`shapes.HELD_OUT_PAIRS`);
- `two_shapes`: two shapes side by side or one above the other, in the template;
- `varied`: single shapes captioned by the training grammar (`openldm.data.phrasing`);
- `free`, `free_two_shapes`: held-out free phrasing (`openldm.data.free_phrasing`).

Each image is scored on the attributes its prompt states (read back by `phrasing.read_prompt`); for
the attributes it leaves out, what came out is counted instead.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from PIL import Image

from openldm.data.free_phrasing import free_phrase
from openldm.data.phrasing import PromptFacts, phrase, read_prompt
from openldm.data.shapes import ATTRIBUTES, Scene, ShapesConfig, ShapesDataset, read_scene

EVAL_DATASET_SEED = 1_000_003  # training configs use small seeds; this one is reserved for evaluation
EVAL_GENERATION_SEED = 7_000_000  # image i of a prompt set is generated with seed EVAL_GENERATION_SEED + i
EVAL_PHRASING_SEED = 5_000_011  # the phrasing of prompt i comes from random.Random(f"{this}:{i}")

_ONE, _TWO = ShapesConfig(split="train"), ShapesConfig(split="train", two_shape_fraction=1.0)
PROMPT_SETS: dict[str, tuple[ShapesConfig, str]] = {  # name -> (scenes, phrasing)
    "in_distribution": (_ONE, "template"),
    "compositional": (ShapesConfig(split="held_out"), "template"),
    "two_shapes": (_TWO, "template"),
    "varied": (_ONE, "varied"),
    "varied_two_shapes": (_TWO, "varied"),  # the grammar's two-shape forms: both orders, every joiner
    "free": (_ONE, "free"),
    "free_two_shapes": (_TWO, "free"),
}
_FIELDS = {"colour": "colour", "shape": "kind", "size": "size", "position": "position"}


@dataclass(frozen=True)
class EvalPrompt:
    text: str
    scene: Scene


def _check_set(prompt_set: str) -> None:
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {prompt_set!r}; choose from {', '.join(PROMPT_SETS)}")


def eval_scenes(prompt_set: str, n: int) -> list[Scene]:
    """The first n scenes of a prompt set (always the same ones)."""
    _check_set(prompt_set)
    dataset = ShapesDataset(n, PROMPT_SETS[prompt_set][0], seed=EVAL_DATASET_SEED)
    return [dataset.scene(i)[0] for i in range(n)]


def eval_prompts(prompt_set: str, n: int) -> list[EvalPrompt]:
    """The first n prompts of a prompt set with their scenes (always the same ones)."""
    style = PROMPT_SETS[prompt_set][1] if prompt_set in PROMPT_SETS else None
    prompts = []
    for i, scene in enumerate(eval_scenes(prompt_set, n)):
        rng = random.Random(f"{EVAL_PHRASING_SEED}:{i}")
        written = free_phrase(scene, rng) if style == "free" else phrase(scene, rng, style)
        prompts.append(EvalPrompt(written.text, scene))
    return prompts


def _pair(facts: PromptFacts, scene: Scene) -> list[tuple[int, int]]:
    """(stated shape, scene shape) index pairs: by stated position, else in order."""
    positions = [s.position for s in scene.shapes]
    if all(s.position in positions for s in facts.shapes) and len(set(positions)) == len(positions):
        return [(i, positions.index(s.position)) for i, s in enumerate(facts.shapes)]
    return list(zip(range(len(facts.shapes)), range(len(scene.shapes))))


def score_stated(image: Image.Image, prompt: EvalPrompt) -> tuple[dict[str, bool], dict[str, list[str]]]:
    """Correctness of each attribute the prompt states, and what came out for those it leaves out."""
    facts, scene = read_prompt(prompt.text), prompt.scene
    seen = read_scene(image, len(scene.shapes))
    scores, came_out = {}, {}
    if facts.background is None:
        came_out["background"] = [seen.background]
    else:
        scores["background"] = seen.background == scene.background
    for name, attr in _FIELDS.items():
        stated = [(i, j) for i, j in _pair(facts, scene) if getattr(facts.shapes[i], attr) is not None]
        omitted = [j for i, j in _pair(facts, scene) if getattr(facts.shapes[i], attr) is None]
        if stated:
            scores[name] = all(getattr(seen.shapes[j], attr) == getattr(scene.shapes[j], attr)
                               for _, j in stated)
        if omitted:
            came_out[name] = [getattr(seen.shapes[j], attr) for j in omitted]
    return scores, came_out


@dataclass
class Scores:
    """Counts of correct attributes over the images whose prompt states them, and what omitted ones showed."""

    n: int = 0
    correct: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ATTRIBUTES, 0))
    stated: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ATTRIBUTES, 0))
    came_out: dict[str, Counter] = field(default_factory=lambda: {a: Counter() for a in ATTRIBUTES})
    all_correct: int = 0

    def add(self, score: dict[str, bool], came_out: dict[str, list[str]] | None = None) -> None:
        self.n += 1
        for name, ok in score.items():
            self.correct[name] += int(ok)
            self.stated[name] += 1
        for name, values in (came_out or {}).items():
            self.came_out[name].update(values)
        self.all_correct += int(all(score.values()))

    def accuracy(self) -> dict[str, float]:
        """Per stated attribute (attributes no prompt stated are left out), and "all"."""
        table = {name: self.correct[name] / count for name, count in self.stated.items() if count}
        table["all"] = self.all_correct / max(1, self.n)
        return table


Generate = Callable[[list[str], list[int]], list[Image.Image]]


def evaluate(generate: Generate, prompts: Iterable[EvalPrompt], batch_size: int = 8,
             on_image: Callable[[int, Image.Image, EvalPrompt, dict[str, bool]], None] | None = None
             ) -> Scores:
    """Generate every prompt (seed EVAL_GENERATION_SEED + i) and score what it states."""
    prompts = list(prompts)
    scores = Scores()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        seeds = [EVAL_GENERATION_SEED + start + i for i in range(len(chunk))]
        images = generate([p.text for p in chunk], seeds)
        for offset, (image, prompt) in enumerate(zip(images, chunk)):
            score, came_out = score_stated(image, prompt)
            scores.add(score, came_out)
            if on_image is not None:
                on_image(start + offset, image, prompt, score)
    return scores


def format_table(results: dict[str, Scores]) -> str:
    """Markdown: accuracy per stated attribute, then what came out where the prompts were silent."""
    columns = [*ATTRIBUTES, "all"]
    lines = ["| prompt set | n | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name, scores in results.items():
        acc = scores.accuracy()
        cells = [f"{100 * acc[c]:.1f}%" if c in acc else "-" for c in columns]
        lines.append(f"| {name} | {scores.n} | " + " | ".join(cells) + " |")
    omitted = [(name, attr, counts) for name, s in results.items()
               for attr, counts in s.came_out.items() if counts]
    if omitted:
        lines += ["", "| prompt set | omitted | times | what came out |", "|---|---|---|---|"]
        for name, attr, counts in omitted:
            total = sum(counts.values())
            shares = ", ".join(f"{value} {100 * k / total:.0f}%" for value, k in counts.most_common())
            lines.append(f"| {name} | {attr} | {total} | {shares} |")
    return "\n".join(lines)
