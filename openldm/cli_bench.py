"""`openldm bench MODEL`: time a real generation by stage, optionally side by side with diffusers.

`--compare diffusers` runs diffusers on the same weights (the diffusers folder given, or our
conversion of the checkpoint) in the same process; the runs alternate `--rounds` times and the
ratios of the medians are printed (above 1: openldm is faster). Absolute times depend on the
host's load; the ratios of alternated runs much less.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from openldm.engines import ENGINE_NAMES

PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry"
RATIOS = ("load_s", "text_encoding_s", "unet_step_median_s", "vae_decode_s", "generate_s", "total_s")


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="time a generation by stage (and beside diffusers)",
                       description=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  openldm bench sd15.safetensors --size 256 --steps 8 "
                       "--compare diffusers")
    p.add_argument("model", type=Path, metavar="MODEL", nargs="?",
                   help="a checkpoint file, diffusers folder or model folder (default: the embedded model)")
    p.add_argument("--size", type=int, help="width and height (default: the model's native size)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--batch", type=int, default=1, help="images per batch (default 1)")
    p.add_argument("--sampler", default="euler", help="sampler name (default euler)")
    p.add_argument("--engine", choices=ENGINE_NAMES, default="eager", help="openldm's engine (default eager)")
    p.add_argument("--compare", choices=("diffusers",), help="also run diffusers on the same weights")
    p.add_argument("--rounds", type=int, default=2, help="alternated runs of each tool (default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        from openldm import bench
    except ImportError as e:  # pragma: no cover - torch missing
        print(f"openldm bench: error: {e}", file=sys.stderr)
        return 2
    imports_s = time.perf_counter() - start
    try:
        report = _measure(args, bench, imports_s)
    except ValueError as e:
        print(f"openldm bench: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return 0


def _measure(args: argparse.Namespace, bench, imports_s: float) -> dict:
    """Alternate openldm and (if asked) diffusers runs; each record is one run's stages."""
    from openldm.cli_generate import model_path
    from openldm.diffusion.registry import resolve

    if args.steps < 1 or args.batch < 1 or args.rounds < 1:
        raise ValueError("--steps, --batch and --rounds must be at least 1")
    resolve(args.sampler, None)
    model = model_path(argparse.Namespace(model=args.model))
    runs, pipe, ref, flops = [], None, None, 0
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(args.rounds):
            stages, pipe = bench.run_openldm(model, _params(args, pipe), args.engine,
                                             imports_s if i == 0 else 0.0, pipe)
            params = _params(args, pipe)
            flops = flops or bench.unet_flops(pipe, params)
            runs.append(stages)
            if args.compare:
                ref_load = 0.0
                if ref is None:
                    ref, ref_load = bench.load_diffusers(bench.diffusers_folder(pipe, model, Path(scratch)),
                                                         pipe.config.family)
                runs.append(bench.run_diffusers(ref, ref_load, params))
    roofline = bench.matmul_gflops()
    records = [bench.as_dict(s, flops, roofline) for s in runs]
    return {"model": str(model), "size": params.width, "steps": args.steps, "batch": args.batch,
            "engine": args.engine, "imports_s": imports_s, "runs": records, "ratios": _ratios(records)}


def _params(args: argparse.Namespace, pipe):
    from openldm.pipelines.params import GenerationParams

    size = args.size or (pipe.config.image_size if pipe is not None else None)
    return GenerationParams(PROMPT, negative=NEGATIVE, steps=args.steps, sampler=args.sampler, seed=1,
                            width=size, height=size, batch_size=args.batch, cfg=7.5)


def _ratios(records: list[dict]) -> dict[str, float]:
    """diffusers' median over openldm's, per stage (load: first runs only): above 1, openldm is faster."""
    ours = [r for r in records if r["tool"].startswith("openldm")]
    theirs = [r for r in records if r["tool"] == "diffusers"]
    if not theirs:
        return {}
    out = {}
    for key in RATIOS:
        first = key in ("load_s", "total_s")  # later runs reuse the loaded model
        mine = [ours[0][key]] if first else [r[key] for r in ours]
        other = [theirs[0][key]] if first else [r[key] for r in theirs]
        out[key] = statistics.median(other) / max(statistics.median(mine), 1e-9)
    return out


def _table(report: dict) -> str:
    rows = [f"{report['model']}: {report['size']}px, {report['steps']} steps, batch {report['batch']}, "
            f"imports {report['imports_s']:.2f} s"]
    fields = ("load_s", "text_encoding_s", "unet_step_median_s", "unet_step_min_s", "unet_step_max_s",
              "vae_decode_s", "generate_s", "png_write_s", "total_s", "it_per_s", "unet_gflop_per_s",
              "roofline_fraction", "peak_rss_gib")
    rows.append(f"{'':22}" + "".join(f"{r['tool'][:18]:>19}" for r in report["runs"]))
    for key in fields:
        rows.append(f"{key:22}" + "".join(f"{r[key]:19.4g}" for r in report["runs"]))
    for key, ratio in report["ratios"].items():
        rows.append(f"diffusers / openldm {key}: {ratio:.2f}x")
    return "\n".join(rows)
