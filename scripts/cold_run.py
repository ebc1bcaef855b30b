"""Whole cold processes, openldm against diffusers: issue 19's "Whole CLI run" and "Peak RSS" bars.

    python scripts/cold_run.py [--root DIR] [--rounds 2] [--fresh-cache] [--threads N] [--arms A,B]

Makes once (and reuses) under `--root` a random-weight full-size SD1.5 single file in fp16, as real
downloads are (`openldm init sd15 --dtype fp16`), and its diffusers folder (`openldm convert --to
diffusers`, the same fp16 weights). Then each arm runs as a fresh process under `/usr/bin/time -f %M`,
256x256, 8 Euler steps, CFG 7.5, one image written as PNG, the arms alternated `--rounds` times:

- `openldm`: `openldm txt2img --model FILE` with the default engine (`auto`). Its conversion cache
  (`$OPENLDM_CACHE` = `--root`/cache) is warmed by one untimed run first; with `--fresh-cache` the
  cache is emptied before, and that cold-cache run is reported on its own row;
- `openldm eager`: the same with `--engine eager`;
- `openldm int8`, `openldm int8-weights`, `openldm int8-hybrid`, `openldm bf16` (only when named in
  `--arms`): the same with `--engine openvino-int8` / `openvino-int8-weights` / `openvino-int8-hybrid`
  / `openvino-bf16`, the opt-in fast modes (ENGINE_ARMS); their caches are warmed like the default's
  (the first W8A8 warm-up calibrates, minutes);
- `diffusers`: a minimal script, `StableDiffusionPipeline.from_pretrained(folder)` with
  `EulerDiscreteScheduler`, both left at their CPU defaults (float32).

Prints wall time and peak RSS per run, their medians and the ratios to diffusers. The host is shared,
so read the ratios of alternated runs; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a red cube on a table"
SIZE, STEPS, CFG, SEED = 256, 8, 7.5, 1

DIFFUSERS_SCRIPT = """
import sys, torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
folder, out, prompt, size, steps, cfg, seed = sys.argv[1:8]
pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
image = pipe(prompt, num_inference_steps=int(steps), guidance_scale=float(cfg), width=int(size),
             height=int(size), generator=torch.Generator().manual_seed(int(seed))).images[0]
image.save(out)
"""


def make_model(root: Path) -> tuple[Path, Path]:
    """The fp16 single file and its diffusers folder, made once."""
    single, folder = root / "sd15-random.safetensors", root / "sd15-random-diffusers"
    if not single.exists():
        subprocess.run(["openldm", "init", "sd15", "--dtype", "fp16", str(single)], check=True)
    if not (folder / "model_index.json").exists():
        subprocess.run(["openldm", "convert", str(single), str(folder), "--to", "diffusers"], check=True)
    return single, folder


# the arms that name an engine, and that engine
ENGINE_ARMS = {"openldm eager": "eager", "openldm int8": "openvino-int8",
               "openldm int8-weights": "openvino-int8-weights", "openldm int8-hybrid": "openvino-int8-hybrid",
               "openldm bf16": "openvino-bf16"}


def commands(single: Path, folder: Path, out: Path) -> dict[str, list[str]]:
    common = [PROMPT, "--width", str(SIZE), "--height", str(SIZE), "--steps", str(STEPS),
              "--cfg", str(CFG), "--sampler", "euler", "--seed", str(SEED)]
    txt2img = ["openldm", "txt2img", "--model", str(single), *common]
    return {
        "openldm": [*txt2img, "-o", str(out / "auto.png")],
        **{arm: [*txt2img, "--engine", engine, "-o", str(out / f"{engine}.png")]
           for arm, engine in ENGINE_ARMS.items()},
        "diffusers": [sys.executable, "-c", DIFFUSERS_SCRIPT, str(folder), str(out / "diffusers.png"),
                      PROMPT, str(SIZE), str(STEPS), str(CFG), str(SEED)],
    }


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of one fresh process; its output is shown only if it fails."""
    with tempfile.NamedTemporaryFile("r") as rss:
        start = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *command], env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode:
            sys.exit(f"failed ({done.returncode}): {' '.join(command[:3])} ...\n{done.stdout}{done.stderr}")
        return wall, int(rss.read().split()[-1]) / 2**20  # KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path.home() / ".cache" / "openldm-cold-run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fresh-cache", action="store_true", help="empty the conversion cache first")
    parser.add_argument("--arms", default="openldm,openldm eager,diffusers")
    parser.add_argument("--before", type=Path, help="another openldm source tree (e.g. `git archive main`): "
                        "adds the arm `openldm before`, its default engine, for a before/after ratio")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every arm (torch, and OpenVINO "
                        "through openldm): one thread each on a host whose other cores are busy")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    single, folder = make_model(args.root)
    env = {**os.environ, "OPENLDM_CACHE": str(args.root / "cache"), "OPENLDM_ENGINE": ""}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.fresh_cache:
        shutil.rmtree(args.root / "cache", ignore_errors=True)
    arms = args.arms.split(",") + (["openldm before"] if args.before else [])
    envs = {arm: env for arm in arms} | ({"openldm before": {**env, "PYTHONPATH": str(args.before)}}
                                         if args.before else {})
    with tempfile.TemporaryDirectory() as out:
        cmds = commands(single, folder, Path(out))
        cmds["openldm before"] = cmds["openldm"][:-1] + [str(Path(out) / "before.png")]
        rows: dict[str, list[tuple[float, float]]] = {arm: [] for arm in arms}
        # their conversion caches warmed (or, fresh, timed)
        for arm in arms:
            if arm not in ("openldm eager", "diffusers"):  # what converts or calibrates
                wall, rss = timed(cmds[arm], envs[arm])
                label = f"{arm}, cold cache" if args.fresh_cache else f"{arm}, warm-up (untimed)"
                print(f"{label:<28} {wall:7.1f} s {rss:6.2f} GiB", flush=True)
        for round_ in range(args.rounds):
            for arm in arms if round_ % 2 == 0 else arms[::-1]:
                wall, rss = timed(cmds[arm], envs[arm])
                rows[arm].append((wall, rss))
                print(f"{arm:<28} {wall:7.1f} s {rss:6.2f} GiB   load {os.getloadavg()[0]:.1f}", flush=True)
    report(rows)


def report(rows: dict[str, list[tuple[float, float]]]) -> None:
    median = {arm: (statistics.median(w for w, _ in r), statistics.median(m for _, m in r))
              for arm, r in rows.items()}
    base = median.get("diffusers")
    print("\n| process | wall (median) | peak RSS (median) | diffusers wall / this | RSS / diffusers |")
    print("|---|---|---|---|---|")
    for arm, (wall, rss) in median.items():
        ratios = (f"{base[0] / wall:.2f}x | {rss / base[1]:.2f}x" if base else "- | -")
        print(f"| {arm} | {wall:.1f} s | {rss:.2f} GiB | {ratios} |")
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
