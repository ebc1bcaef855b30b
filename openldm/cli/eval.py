"""`openldm eval shapes`: score a model on held-out shapes prompts with the exact evaluator."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from openldm.atomic import write_bytes_atomic
from openldm.engines import ENGINE_NAMES

if TYPE_CHECKING:
    from PIL import Image
EVAL_STEPS = 20
EVAL_CFG = None  # the model's own guidance scale (`ModelConfig.guidance`)
EVAL_SAMPLER = "dpmpp_2m"
DEFAULT_SETS = "in_distribution,compositional,two_shapes,varied_two_shapes,free,free_two_shapes"


def add_commands(sub) -> None:
    p = sub.add_parser(
        "eval", help="score a model on held-out shapes prompts (colour, shape, size, position, background)",
        description="Generate images for prompts the training never saw (and seeds it never used), read each "
                    "back with the shapes dataset's own rules, and print accuracy per attribute.",
    )
    p.add_argument("domain", choices=("shapes",), help="the evaluation domain")
    p.add_argument("--model",
                   help="checkpoint, diffusers folder or model folder (default: the embedded model)")
    p.add_argument("--n", type=int, default=200, help="prompts per prompt set (default 200)")
    p.add_argument("--sets", default=DEFAULT_SETS,
                   help="comma-separated prompt sets: in_distribution, compositional, two_shapes (the "
                        "training template), varied, varied_two_shapes (the training grammar), free, "
                        "free_two_shapes (held-out "
                        f"free phrasing); default {DEFAULT_SETS}")
    p.add_argument("--steps", type=int, default=EVAL_STEPS)
    p.add_argument("--cfg", type=float, default=EVAL_CFG, help="guidance scale (default: the model's own)")
    p.add_argument("--sampler", default=EVAL_SAMPLER)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--engine", default="eager",
                   help=f"what runs the UNet and VAE decoder: {', '.join(ENGINE_NAMES)} (default eager, the "
                        "reference; an inexact engine such as openvino-int8 is scored against it this way)")
    p.add_argument("--grid", type=Path,
                   help="also write a captioned grid of the first images of the first prompt set")
    p.add_argument("--grid-size", type=int, default=16, metavar="N",
                   help="images in the grid (default 16; 4 a row, 5 when N is a multiple of 5 and not of 4)")
    p.add_argument("--json", type=Path, help="also write the scores as JSON")
    p.set_defaults(run=_eval)


def make_grid(tiles: list[tuple[Image.Image, str]], columns: int = 4, caption_height: int = 50
              ) -> Image.Image:
    """Images in rows with their prompt written under each."""
    from PIL import Image, ImageDraw

    w, h = tiles[0][0].size
    rows = (len(tiles) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * (h + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, text) in enumerate(tiles):
        x, y = (i % columns) * w, (i // columns) * (h + caption_height)
        grid.paste(image, (x, y))
        lines = [""]
        for word in text.split():  # the default font is about 6 pixels a character
            if lines[-1] and len(lines[-1]) + 1 + len(word) > (w - 4) // 6:
                lines.append("")
            lines[-1] = f"{lines[-1]} {word}".strip()
        for row, line in enumerate(lines[: caption_height // 12]):
            draw.text((x + 2, y + h + 1 + 12 * row), line, fill="black")
    return grid


def _eval(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from openldm.data.shapes_eval import PROMPT_SETS, eval_prompts, evaluate, format_table
    from openldm.engines.base import get_engine
    from openldm.models.embedded import default_model_path
    from openldm.pipelines.loading import load

    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in sets if s not in PROMPT_SETS]
    if unknown or args.n <= 0 or args.grid_size <= 0:
        raise ValueError(f"unknown prompt set(s) {', '.join(unknown)}" if unknown
                         else "--n must be positive" if args.n <= 0 else "--grid-size must be positive")
    engine = get_engine(args.engine)  # an unknown or missing engine fails before the model loads
    model = Path(args.model) if args.model else default_model_path()
    started = time.perf_counter()
    pipe = load(model, engine=engine)
    print(f"loaded {model} in {time.perf_counter() - started:.1f} s")
    pipe.domain = None  # prompt sets may use words a model was never taught, on purpose: scored, not warned

    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        return [pipe.txt2img(p, seed=s, steps=args.steps, cfg=args.cfg, sampler=args.sampler)[0]
                for p, s in zip(prompts, seeds)]

    results, tiles = {}, []
    for name in sets:
        prompts = eval_prompts(name, args.n)
        bar = tqdm(total=len(prompts), desc=name, unit="img")

        def collect(i, image, prompt, score, name=name, bar=bar):
            bar.update(1)
            if name == sets[0] and len(tiles) < args.grid_size:
                tiles.append((image, prompt.text))

        started = time.perf_counter()
        results[name] = evaluate(generate, prompts, args.batch_size, collect)
        bar.close()
        per_image = (time.perf_counter() - started) / len(prompts)
        print(f"{name}: {per_image:.2f} s per image")
    print(format_table(results))
    if args.json:
        data = {name: {"n": s.n, **s.accuracy(), "came_out": {k: dict(v) for k, v in s.came_out.items() if v}}
                for name, s in results.items()}
        cfg = pipe.config.guidance if args.cfg is None else args.cfg
        settings = {"steps": args.steps, "cfg": cfg, "sampler": args.sampler, "model": str(model),
                    "engine": engine.name}
        write_bytes_atomic(args.json, json.dumps({"settings": settings, "scores": data}, indent=2).encode())
    if args.grid and tiles:
        import io

        buffer = io.BytesIO()
        columns = 5 if len(tiles) % 5 == 0 and len(tiles) % 4 else 4
        make_grid(tiles, columns).save(buffer, format="PNG")
        write_bytes_atomic(args.grid, buffer.getvalue())
        print(f"wrote {args.grid}")
    return 0
