"""openldm.memory's estimate against the peak RSS of fresh processes, as a table.

    python scripts/memory_table.py            # tiny presets, a few seconds
    python scripts/memory_table.py --full     # also full-size SD1.5 (random weights): minutes
    python scripts/memory_table.py --slicing  # only SD1.5's 512 px batch-4 decode, whole and sliced

Each case runs in its own process: build the model with random weights, then either a whole
one-step generation (text encoder, one CFG UNet step, VAE decode, PNG-ready image) or a VAE decode
alone, whole or tiled. The peak is VmHWM, reset (/proc/self/clear_refs) once the weights are built,
so it is the run's peak with the weights resident, which is what the estimate describes.
"run" columns: the stage's own bytes (estimate's largest stage; measured peak minus RSS before it).

Measured with torch 2.13 CPU, float32, random weights, on a 2-core host under load 16
(`python scripts/memory_table.py --full`, 41 min):

    case                                estimate  measured   error    run est. run meas.
    tiny-sd1 64px b1 generate               318M      326M   -2.5%         23M       34M
    tiny-sd1 256px b2 generate              537M      594M   -9.6%        242M      301M
    tiny-sdxl 128px b2 generate             358M      392M   -8.9%         49M       62M
    sd15 256px b1 generate                 4630M     4751M   -2.6%        282M      403M
    sd15 512px b1 generate                 5402M     5557M   -2.8%       1055M     1210M
    sd15 1024px b1 decode                  4744M     4429M   +7.1%       4145M     3880M
    sd15 1024px b1 decode, tiled           1674M     1599M   +4.7%       1075M     1051M

VAE slicing (`python scripts/memory_table.py --slicing`, 2-core Zen 4 host, idle):

    sd15 512px b4 decode                   4744M     4417M   +7.4%       4145M     3867M
    sd15 512px b4 decode, sliced           1654M     1569M   +5.4%       1055M     1019M
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, dataclass

MiB = 2**20


@dataclass(frozen=True)
class Case:
    preset: str
    size: int
    batch: int = 1
    stage: str = "generate"  # or "decode"
    tiling: str = "off"  # decode: "off" or "on"
    sliced: bool = False  # decode: the batch one image at a time

    @property
    def label(self) -> str:
        tiled = ", tiled" if self.tiling == "on" else ""
        sliced = ", sliced" if self.sliced else ""
        return f"{self.preset} {self.size}px b{self.batch} {self.stage}{tiled}{sliced}"


TINY_CASES = (Case("tiny-sd1", 64), Case("tiny-sd1", 256, 2), Case("tiny-sdxl", 128, 2))
FULL_CASES = (Case("sd15", 256), Case("sd15", 512), Case("sd15", 1024, stage="decode"),
              Case("sd15", 1024, stage="decode", tiling="on"), Case("sd15", 512, 4, stage="decode"),
              Case("sd15", 512, 4, stage="decode", sliced=True))
SLICING_CASES = FULL_CASES[-2:]


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1]) / 1024


def _child(case: Case) -> dict:
    """Runs in the fresh process: build, reset the high-water mark, run, report MiB."""
    import torch

    from openldm.checkpoints.layout import TEXT_ENCODER_NAMES
    from openldm.checkpoints.load import Components, build_component
    from openldm.config import get_preset
    from openldm.models.vae_tiling import VAETiling, decode_latents
    from openldm.pipelines.params import GenerationParams
    from openldm.pipelines.pipeline import Pipeline

    config = get_preset(case.preset)
    torch.manual_seed(0)
    if case.stage == "decode":
        vae = build_component("vae", config, device="cpu").eval()
        f = config.vae.downsample_factor
        z = torch.randn(case.batch, config.vae.embed_dim, case.size // f, case.size // f)
        run = lambda: decode_latents(vae, z, VAETiling(mode=case.tiling, sliced=case.sliced))  # noqa: E731
    else:
        parts = {n: build_component(n, config, device="cpu") for n in ("unet", "vae", *TEXT_ENCODER_NAMES)
                 if n == "unet" or n == "vae" or TEXT_ENCODER_NAMES.index(n) < len(config.text_encoders)}
        encoders = [parts[n] for n in TEXT_ENCODER_NAMES if n in parts]
        pipe = Pipeline(Components(config, parts["unet"], parts["vae"], encoders))
        params = GenerationParams("a photo", steps=1, width=case.size, height=case.size,
                                  batch_size=case.batch, cfg=7.0, seed=1)
        run = lambda: pipe.generate(params)  # noqa: E731
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_mib("VmRSS")
    run()
    return {"before_mib": before, "peak_mib": _status_mib("VmHWM")}


def measure(case: Case) -> dict:
    """The case's measured MiB (RSS before the run, peak during it), from a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(asdict(case))],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def estimate(case: Case) -> tuple[float, float]:
    """(estimated peak of the process, estimated peak of the stage above the resident weights) in MiB."""
    from openldm.config import get_preset
    from openldm.memory import RUNTIME_CPU, estimate_peak, parameter_counts, vae_decode_bytes
    from openldm.models.vae_tiling import DEFAULT_VAE_TILE

    config = get_preset(case.preset)
    if case.stage == "decode":
        f = config.vae.downsample_factor
        tile = DEFAULT_VAE_TILE if case.tiling == "on" else None
        batch = 1 if case.sliced else case.batch  # as `memory.estimate_peak` counts a sliced decode
        work = vae_decode_bytes(config.vae, batch, case.size // f, case.size // f, 4, tile=tile)
        return (RUNTIME_CPU + parameter_counts(config)["vae"] * 4 + work) / MiB, work / MiB
    found = estimate_peak(config, width=case.size, height=case.size, batch=case.batch)
    return found.total / MiB, max(found.stages.values()) / MiB


def table(cases) -> list[dict]:
    rows = []
    for case in cases:
        got = measure(case)
        total, work = estimate(case)
        rows.append({"case": case.label, "estimate_mib": total, "measured_mib": got["peak_mib"],
                     "error": total / got["peak_mib"] - 1, "work_estimate_mib": work,
                     "work_measured_mib": got["peak_mib"] - got["before_mib"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also full-size SD1.5 cases (minutes)")
    parser.add_argument("--slicing", action="store_true",
                        help="only the SD1.5 batch-4 decode, whole and sliced")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(Case(**json.loads(args.child)))))
        return
    print(f"{'case':34} {'estimate':>9} {'measured':>9} {'error':>7}   {'run est.':>9} {'run meas.':>9}")
    for row in table(SLICING_CASES if args.slicing else TINY_CASES + (FULL_CASES if args.full else ())):
        print(f"{row['case']:34} {row['estimate_mib']:8.0f}M {row['measured_mib']:8.0f}M {row['error']:+7.1%}"
              f"   {row['work_estimate_mib']:8.0f}M {row['work_measured_mib']:8.0f}M", flush=True)


if __name__ == "__main__":
    main()
