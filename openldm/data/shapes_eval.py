"""Score a text-to-image model on the shapes domain with the dataset's exact evaluator.

Prompts come from scenes the training run never drew (their own dataset seed) and images from
generation seeds far from any used in training. Three prompt sets:

- `in_distribution`: single shapes whose colour/class pair appeared in training;
- `compositional`: colour/class pairs held out of training (`shapes.HELD_OUT_PAIRS`);
- `two_shapes`: two shapes side by side or one above the other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from PIL import Image

from openldm.data.shapes import ATTRIBUTES, Scene, ShapesConfig, ShapesDataset, score_image

EVAL_DATASET_SEED = 1_000_003  # training configs use small seeds; this one is reserved for evaluation
EVAL_GENERATION_SEED = 7_000_000  # image i of a prompt set is generated with seed EVAL_GENERATION_SEED + i

PROMPT_SETS = {
    "in_distribution": ShapesConfig(split="train"),
    "compositional": ShapesConfig(split="held_out"),
    "two_shapes": ShapesConfig(split="train", two_shape_fraction=1.0),
}


def eval_scenes(prompt_set: str, n: int) -> list[Scene]:
    """The first n scenes of a prompt set (always the same ones)."""
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {prompt_set!r}; choose from {', '.join(PROMPT_SETS)}")
    dataset = ShapesDataset(n, PROMPT_SETS[prompt_set], seed=EVAL_DATASET_SEED)
    return [dataset.scene(i)[0] for i in range(n)]


@dataclass
class Scores:
    """Counts of correct attributes over the scored images."""

    n: int = 0
    correct: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ATTRIBUTES, 0))
    all_correct: int = 0

    def add(self, score: dict[str, bool]) -> None:
        self.n += 1
        for name, ok in score.items():
            self.correct[name] += int(ok)
        self.all_correct += int(all(score.values()))

    def accuracy(self) -> dict[str, float]:
        table = {name: count / max(1, self.n) for name, count in self.correct.items()}
        table["all"] = self.all_correct / max(1, self.n)
        return table


Generate = Callable[[list[str], list[int]], list[Image.Image]]


def evaluate(generate: Generate, scenes: Iterable[Scene], batch_size: int = 8,
             on_image: Callable[[int, Image.Image, Scene, dict[str, bool]], None] | None = None) -> Scores:
    """Generate every scene's caption (seed EVAL_GENERATION_SEED + i) and score it."""
    scenes = list(scenes)
    scores = Scores()
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start:start + batch_size]
        seeds = [EVAL_GENERATION_SEED + start + i for i in range(len(chunk))]
        images = generate([s.caption for s in chunk], seeds)
        for offset, (image, scene) in enumerate(zip(images, chunk)):
            score = score_image(image, scene)
            scores.add(score)
            if on_image is not None:
                on_image(start + offset, image, scene, score)
    return scores


def format_table(results: dict[str, Scores]) -> str:
    """A Markdown table: one row per prompt set, one column per attribute."""
    columns = [*ATTRIBUTES, "all"]
    lines = ["| prompt set | n | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name, scores in results.items():
        acc = scores.accuracy()
        lines.append(f"| {name} | {scores.n} | " + " | ".join(f"{100 * acc[c]:.1f}%" for c in columns) + " |")
    return "\n".join(lines)
