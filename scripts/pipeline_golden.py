"""Every pipeline mode on tiny random models, written to (or checked against) a reference file.

A refactor of `openldm/pipelines/` must leave these bit for bit: run `--write ref.pt` on the old code
and `--check ref.pt` on the new one, on the same machine (kernels differ across CPUs). Each case keeps
the final latents, the 8-bit pixels and the step callback's (step, total) sequence.

    PYTHONPATH=. python scripts/pipeline_golden.py --write /tmp/golden.pt
    PYTHONPATH=. python scripts/pipeline_golden.py --check /tmp/golden.pt
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import openldm
from openldm.pipelines.params import GenerationParams
from tests.helpers import make_checkpoint

BASE = {"steps": 4, "seed": 11, "subseed": 3, "cfg": 6.0, "negative": "blurry"}


def _picture(width: int = 40, height: int = 32) -> Image.Image:
    image = Image.new("RGB", (width, height), (200, 40, 30))
    ImageDraw.Draw(image).ellipse((6, 4, width - 6, height - 4), fill=(20, 60, 220))
    return image


def _mask(width: int = 40, height: int = 32) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle((10, 8, 28, 24), fill=255)
    return mask


def _cases(pipes: dict) -> dict:
    """name -> (pipeline, GenerationParams, generate keyword arguments)."""
    sd1, inp = pipes["tiny-sd1"], pipes["tiny-sd1-inpaint"]
    xl, ref = pipes["tiny-sdxl"], pipes["tiny-sdxl-refiner"]
    p = lambda **c: GenerationParams("a red [cat:dog:0.5] (circle:1.2)", **(BASE | c))  # noqa: E731
    cases = {
        "txt2img_2x2": (sd1, p(batch_size=2, batch_count=2, subseed_strength=0.3), {}),
        "txt2img_ancestral": (sd1, p(sampler="euler_ancestral", width=48), {}),
        "txt2img_sde": (sd1, p(sampler="dpmpp_sde"), {}),
        "img2img": (sd1, p(strength=0.6, sampler="dpmpp_2m"), {"image": _picture()}),
        "img2img_crop": (sd1, p(strength=0.5, width=32, height=32, resize_mode="crop"),
                         {"image": _picture()}),
        "outpaint": (sd1, p(outpaint=(8, 0, 0, 8), strength=0.9), {"image": _picture()}),
        "outpaint_inp": (inp, p(outpaint=(0, 8, 8, 0)), {"image": _picture()}),
        "hires_latent": (sd1, p(width=32, height=32, upscale_by=1.5, hires_steps=3), {"hires": True}),
        "hires_lanczos": (sd1, p(width=32, height=32, upscaler="lanczos", batch_size=2), {"hires": True}),
        "hires_image": (sd1, p(upscale_by=1.25), {"hires": True, "image": _picture()}),
        "inp_txt2img": (inp, p(width=48), {}),
        "inp_hires": (inp, p(width=32, height=32, upscale_by=1.5), {"hires": True}),
        "xl_refiner": (xl, p(sampler="euler_ancestral", refiner_switch=0.5), {"refiner": ref}),
        "xl_inpaint_refiner": (xl, p(strength=0.7, masked_content="latent_noise"),
                               {"image": _picture(), "mask": _mask(), "refiner": ref}),
        "xl_hires_refiner": (xl, p(width=32, height=32, upscale_by=1.5), {"hires": True, "refiner": ref}),
    }
    for content in ("original", "fill", "latent_noise", "latent_nothing"):
        for model, pipe in (("sd1", sd1), ("inp", inp)):
            settings = p(masked_content=content, strength=0.8, batch_size=2)
            cases[f"inpaint_{model}_{content}"] = (pipe, settings, {"image": _picture(), "mask": _mask()})
    cases["inpaint_only_masked"] = (sd1, p(only_masked=True, only_masked_padding=4, mask_blur=2,
                                           invert_mask=True, width=32, height=32),
                                    {"image": _picture(), "mask": _mask()})
    return cases


def run_all(folder: Path) -> dict:
    torch.manual_seed(0)
    names = ("tiny-sd1", "tiny-sd1-inpaint", "tiny-sdxl", "tiny-sdxl-refiner")
    pipes = {n: openldm.load(make_checkpoint(folder, n, seed=i)) for i, n in enumerate(names)}
    out = {}
    for name, (pipe, params, kwargs) in _cases(pipes).items():
        steps: list = []
        record = steps.append
        callback = lambda i, n, x, keep=record: keep((i, n, x.clone()))  # noqa: E731
        results = pipe.generate(params, callback=callback, **kwargs)
        out[name] = {
            "latents": torch.cat([r.latent for r in results]),
            "pixels": torch.from_numpy(np.stack([np.asarray(r.image) for r in results])),
            "seeds": [(r.params.seed, r.params.subseed, r.mode, r.params.width, r.params.height)
                      for r in results],
            "steps": [(i, n) for i, n, _ in steps],
            "denoised": [x for _, _, x in steps],
        }
    return out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path)
    group.add_argument("--check", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        got = run_all(Path(tmp))
    if args.write:
        torch.save(got, args.write)
        print(f"wrote {len(got)} cases to {args.write}")
        return 0
    want = torch.load(args.check, weights_only=True)
    bad = []
    for name in want:
        a, b = want[name], got.get(name)
        same = b is not None and all(
            _same(a[k], b[k]) for k in a
        )
        differ = [] if b is None else [k for k in a if not _same(a[k], b[k])]
        print(f"{'same' if same else 'DIFFERENT'}  {name}", *differ)
        bad += [] if same else [name]
    print(f"{len(want) - len(bad)}/{len(want)} cases bit for bit")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
