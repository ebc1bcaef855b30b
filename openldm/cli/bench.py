"""`openldm bench MODEL`: time a real generation by stage, optionally side by side with diffusers.

`--compare diffusers` runs diffusers on the same weights (the diffusers folder given, or our
conversion of the checkpoint) in the same process, `--compare eager` openldm with another engine;
the runs alternate `--rounds` times and the ratios of the medians are printed (above 1: the
`--engine` run is faster). Absolute times depend on the
host's load; the ratios of alternated runs much less.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from openldm.config import WEIGHT_DTYPES
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
    p.add_argument("--compare", action="append", default=[], choices=("diffusers", *ENGINE_NAMES),
                   help="also run diffusers on the same weights, or openldm with another engine "
                   "(repeatable); the runs alternate")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda if available, else cpu); on CUDA "
                   "the table adds each run's peak VRAM")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, help="default fp16 on cuda, fp32 elsewhere")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=2, help="alternated runs of each tool (default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    from openldm import bench

    report = _measure(args, bench, time.perf_counter() - start)  # errors: one line from `cli.main`
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return 0


def _measure(args: argparse.Namespace, bench, imports_s: float) -> dict:
    """Alternate openldm (its `--engine`) with each `--compare` tool; each record is one run's stages."""
    import torch

    from openldm.cli.generate import model_path
    from openldm.diffusion.registry import resolve
    from openldm.pipelines.render import device_and_dtype

    if args.steps < 1 or args.batch < 1 or args.rounds < 1 or (args.threads or 1) < 1:
        raise ValueError("--steps, --batch, --rounds and --threads must be at least 1")
    resolve(args.sampler, None)
    device, dtype = device_and_dtype(args.device, args.dtype)  # refused here, before any loading
    if args.threads:
        torch.set_num_threads(args.threads)
    model = model_path(argparse.Namespace(model=args.model))
    tools = [args.engine] + [t for t in args.compare if t != args.engine]
    loaded: dict = {}  # tool -> its openldm Pipeline, or diffusers' pipeline
    runs, flops = [], 0
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(args.rounds):
            for tool in tools:
                if tool == "diffusers":
                    pipe, ref_load = loaded[args.engine], 0.0
                    if tool not in loaded:
                        folder = bench.diffusers_folder(pipe, model, Path(scratch))
                        loaded[tool], ref_load = bench.load_diffusers(folder, pipe.config.family, device,
                                                                      dtype)
                    runs.append(bench.run_diffusers(loaded[tool], ref_load, _params(args, pipe)))
                    continue
                first = i == 0 and tool == args.engine
                stages, loaded[tool] = bench.run_openldm(model, _params(args, loaded.get(tool)), tool,
                                                         imports_s if first else 0.0, loaded.get(tool),
                                                         device, dtype)
                runs.append(stages)
                flops = flops or bench.unet_flops(loaded[tool], _params(args, loaded[tool]))
    roofline = bench.matmul_gflops(device, dtype)
    records = [bench.as_dict(s, flops, roofline) for s in runs]
    return {"model": str(model), "size": _params(args, loaded[args.engine]).width, "steps": args.steps,
            "batch": args.batch, "engine": args.engine, "device": device,
            "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "imports_s": imports_s, "runs": records, "ratios": _ratios(records)}


def _params(args: argparse.Namespace, pipe):
    from openldm.pipelines.params import GenerationParams

    size = args.size or (pipe.config.image_size if pipe is not None else None)
    return GenerationParams(PROMPT, negative=NEGATIVE, steps=args.steps, sampler=args.sampler, seed=1,
                            width=size, height=size, batch_size=args.batch, cfg=7.5)


def _ratios(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per compared tool, its median over the first tool's, per stage (load and total: first runs only).

    Above 1, the first tool (openldm with `--engine`) is faster.
    """
    import statistics  # here: every command's start (a `--server` client's too) imports this module

    by_tool: dict[str, list[dict]] = {}
    for record in records:
        by_tool.setdefault(record["tool"], []).append(record)
    mine, *others = by_tool
    out = {}
    for other in others:
        out[other] = {}
        for key in RATIOS:
            first = key in ("load_s", "total_s")  # later runs reuse the loaded model
            a = [by_tool[mine][0][key]] if first else [r[key] for r in by_tool[mine]]
            b = [by_tool[other][0][key]] if first else [r[key] for r in by_tool[other]]
            out[other][key] = statistics.median(b) / max(statistics.median(a), 1e-9)
    return out


def _table(report: dict) -> str:
    rows = [f"{report['model']}: {report['size']}px, {report['steps']} steps, batch {report['batch']}, "
            f"{report['device']} {report['dtype']}, imports {report['imports_s']:.2f} s"]
    fields = ("load_s", "text_encoding_s", "unet_step_median_s", "unet_step_min_s", "unet_step_max_s",
              "vae_decode_s", "generate_s", "png_write_s", "total_s", "it_per_s", "unet_gflop_per_s",
              "roofline_fraction", "peak_rss_gib", "peak_vram_gib", "estimated_peak_gib")
    rows.append(f"{'':22}" + "".join(f"{r['tool'][:18]:>19}" for r in report["runs"]))
    for key in fields:
        rows.append(f"{key:22}" + "".join(f"{r[key]:19.4g}" if r[key] is not None else f"{'-':>19}"
                                          for r in report["runs"]))
    mine = report["runs"][0]["tool"]
    for other, ratios in report["ratios"].items():
        rows.append(f"{other} / {mine}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    return "\n".join(rows)
