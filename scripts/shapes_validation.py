"""Shape-prompt accuracy of a model on a validation split, for choosing sampling settings.

The split (dataset seed 424242, generation seeds from 9,000,000) is used neither in training nor by
`openldm eval shapes`, so settings picked here leave the held-out evaluation honest.

    python scripts/shapes_validation.py openldm/weights/shapes 100 dpmpp_2m:2:20 dpmpp_2m:3:20
"""

from __future__ import annotations

import sys
import time
from collections import Counter

from openldm.data.shapes import ShapesDataset, score_image
from openldm.data.shapes_eval import PROMPT_SETS
from openldm.pipelines.loading import load

VALIDATION_DATASET_SEED = 424_242
VALIDATION_GENERATION_SEED = 9_000_000


def main(model: str, n: int, settings: list[str]) -> None:
    pipe = load(model)
    scenes = ShapesDataset(n, PROMPT_SETS["in_distribution"][0], seed=VALIDATION_DATASET_SEED)
    for setting in settings:  # SAMPLER:CFG:STEPS
        sampler, cfg, steps = setting.split(":")
        started, correct = time.perf_counter(), Counter()
        for i in range(n):
            _, caption, scene = scenes[i]
            image = pipe.txt2img(caption, seed=VALIDATION_GENERATION_SEED + i, steps=int(steps),
                                 cfg=float(cfg), sampler=sampler)[0]
            correct.update({k: int(v) for k, v in score_image(image, scene).items()})
        scores = ", ".join(f"{k} {v / n:.1%}" for k, v in correct.items())
        print(f"{setting}: {scores} ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
