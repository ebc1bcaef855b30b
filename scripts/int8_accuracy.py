"""The int8 fast mode's trade, measured: image PSNR against eager fp32, and UNet-step speed ratios.

    python scripts/int8_accuracy.py build                 # random full-size SD1.5, fp32, into --dir
    python scripts/int8_accuracy.py psnr --variant default                       # the embedded model
    python scripts/int8_accuracy.py psnr --model sd15 --size 256 --variant default --threads 2
    python scripts/int8_accuracy.py speed --model sd15 --size 256 --variants default,weights --diffusers
    python scripts/int8_accuracy.py decoder --model sd15 --size 256 --variant hybrid-w8a8-decoder \
        --keep decoder.up.0

`--model` is a path, `embedded` (the shipped shapes model, default) or `sd15` (the file `build`
wrote). Eager fp32 images are made once per (model, size, steps, prompt) and kept under
`--dir`/eager, so each variant costs only its own run. Prompts: the shapes eval's in-distribution
set for the embedded model, a fixed list otherwise; seeds 1000+i, unlike calibration's 0..n-1.
A variant is a named set of `OpenVINOInt8` fields (VARIANTS; `default` is what the engine ships) or
an engine's name (`openvino-bf16`).
`speed` calls one CFG-batched UNet step per engine in turn, `--rounds` times, in one process, and
prints medians and ratios to eager (and to diffusers' UNet with `--diffusers`). Conversions go to
the engine cache ($OPENLDM_CACHE), so a second run of a variant pays nothing. `decoder` measures an
int8 VAE decoder alone: final latents of `--latents` held-out runs (sampled once by the hybrid UNet
and kept under `--dir`), each decoded eagerly and by the variant's decoder, with `--keep`'s VAE
modules fp32 besides DECODER_SENSITIVE (`--only M` keeps every level but M fp32: one level's
error). docs/engines.md has the numbers this printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from openldm.engines import ENGINE_NAMES
from openldm.engines.base import Engine, get_engine
from openldm.engines.int8 import DECODER_SENSITIVE, SENSITIVE, OpenVINOInt8
from openldm.pipelines.conditioning import PromptEncoder
from openldm.pipelines.loading import load

ALL = SENSITIVE
VARIANTS: dict[str, dict] = {
    "default": {},
    "v0": {"preset": "performance", "ignored": (), "prompts": 4, "steps": 8},  # the first W8A8
    "v0-calib16": {"preset": "performance", "ignored": (), "prompts": 16, "steps": 8},
    "v0-calib4x20": {"preset": "performance", "ignored": (), "prompts": 4, "steps": 20},
    "v0-ignore": {"preset": "performance", "ignored": ALL, "prompts": 4, "steps": 8},
    "v0-mixed": {"preset": "mixed", "ignored": (), "prompts": 4, "steps": 8},
    "v0-sq0.5": {"preset": "performance", "ignored": (), "prompts": 4, "steps": 8, "smooth_quant": 0.5},
    "v0-sqoff": {"preset": "performance", "ignored": (), "prompts": 4, "steps": 8, "smooth_quant": -1},
    "ignore-mixed-8x8": {"preset": "mixed", "prompts": 8, "steps": 8},
    "mixed": {"preset": "mixed"},
    "fp32-attention": {"ignored_types": ("ScaledDotProductAttention",)},  # softmax(QK) inputs unquantized
    "convs": {"ignored_types": ("ScaledDotProductAttention", "MatMul")},  # only convolutions W8A8
    "weights": {"mode": "weights"},
    # matmuls W8A8, convolutions int8 weights with exact activations, the VAE decoder fp32: what
    # `openvino-int8-hybrid` ships (its name too, so that the CLI's cache entries serve)
    "hybrid": {"mode": "hybrid", "name": "openvino-int8-hybrid"},
    "hybrid-w8a8-decoder": {"mode": "hybrid", "decoder": True, "name": "openvino-int8-hybrid"},  # and the VAE
}
SD_PROMPTS = (
    "a castle on a hill under a stormy sky", "a cat sleeping on a windowsill", "a bowl of ramen, top view",
    "a city street at night in the rain", "a portrait of a young woman, soft light",
    "a mountain lake at dawn", "a vintage car parked by the sea", "an owl on a branch in winter",
    "a field of sunflowers", "a spaceship over a desert planet", "a cup of coffee on a wooden desk",
    "a fox in a snowy forest", "a sailboat at sunset", "a robot reading a book",
    "a library with tall shelves", "a red bicycle", "a waterfall in a jungle",
    "a plate of pancakes with berries", "a lighthouse in fog", "a dragon made of glass",
)


def model_path(name: str, folder: Path) -> Path:
    from openldm.models.embedded import default_model_path

    known = {"embedded": default_model_path(), "sd15": folder / "sd15-random.safetensors"}
    return known.get(name, Path(name))


def prompts(name: str, n: int) -> list[str]:
    from openldm.data.shapes_eval import eval_prompts

    texts = [p.text for p in eval_prompts("in_distribution", n)] if name == "embedded" else list(SD_PROMPTS)
    if n > len(texts):
        raise SystemExit(f"at most {len(texts)} prompts for {name}")
    return texts[:n]


def engine(variant: str) -> Engine:
    if variant in ENGINE_NAMES:  # a shipped engine by its name, e.g. openvino-bf16
        return get_engine(variant)
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}, or an engine's name")
    return OpenVINOInt8(**VARIANTS[variant])


def pixels(image: Image.Image) -> np.ndarray:
    """An 8-bit picture as floats in [0, 1], what `psnr` compares."""
    return np.asarray(image, dtype=np.float64) / 255


def generate(pipe, texts: list[str], args) -> list[np.ndarray]:
    size = args.size or pipe.config.image_size
    images = [pipe.txt2img(t, seed=1000 + i, steps=args.steps, width=size, height=size)[0]
              for i, t in enumerate(texts)]
    return [pixels(i) for i in images]


def eager_images(pipe, texts: list[str], args, model: Path) -> list[np.ndarray]:
    """Eager fp32 images, each made once and kept as PNG (lossless) for every later variant."""
    folder = args.dir / "eager" / f"{model.stem}-{args.size or pipe.config.image_size}px-{args.steps}steps"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, text in enumerate(texts):
        path = folder / f"{i:02d}.png"
        if not path.exists():
            pipe.set_engine("eager")
            start = time.perf_counter()
            Image.fromarray(np.round(generate(pipe, [text], args)[0] * 255).astype(np.uint8)).save(path)
            print(f"eager {i}: {time.perf_counter() - start:.1f} s", flush=True)
        out.append(pixels(Image.open(path)))
    return out


def psnr(got: np.ndarray, want: np.ndarray) -> float:
    mse = float(np.mean((got - want) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def run_psnr(args) -> None:
    model = model_path(args.model, args.dir)
    texts = prompts(args.model, args.prompts)
    pipe = load(model)
    pipe.domain = None  # eval prompts are scored, not warned about
    want = eager_images(pipe, texts, args, model)
    for variant in args.variant.split(","):
        pipe.set_engine(engine(variant))
        start = time.perf_counter()
        got = [generate(pipe, [t], args)[0] for t in texts]
        values = [psnr(g, w) for g, w in zip(got, want)]
        print(f"{variant}: PSNR per prompt " + " ".join(f"{v:.1f}" for v in values))
        print(f"{variant}: median {statistics.median(values):.1f} dB, min {min(values):.1f} dB, "
              f">= 30 dB: {sum(v >= 30 for v in values)}/{len(values)} "
              f"({time.perf_counter() - start:.0f} s incl. calibration)", flush=True)


def diffusers_unet(pipe, model: Path, folder: Path):
    """diffusers' own UNet on the same weights (our diffusers-layout export, written once)."""
    import diffusers

    from openldm.checkpoints.save import save_diffusers

    target = folder / f"{model.stem}-diffusers"
    if not (target / "unet").exists():
        save_diffusers(pipe.components, target)
    unet = diffusers.UNet2DConditionModel.from_pretrained(target / "unet").eval()
    return lambda x, t, c, y: unet(x, t, encoder_hidden_states=c).sample


def run_speed(args) -> None:
    model = model_path(args.model, args.dir)
    pipe = load(model)
    pipe.domain = None
    cfg = pipe.config
    side = (args.size or cfg.image_size) // cfg.vae.downsample_factor
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.unet.in_channels, side, side, generator=g)
    t = torch.full((2,), 500.0)
    with torch.no_grad():
        context = PromptEncoder(pipe.text_encoders)(["a cat", ""]).context
    runners = {}
    for name in ["eager", "openvino", *args.variants.split(",")]:
        pipe.set_engine(name if name in ("eager", "openvino") else engine(name))
        runners[name] = pipe.unet_runner
    if args.diffusers:
        runners["diffusers"] = diffusers_unet(pipe, model, args.dir)
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.no_grad():
        for run in runners.values():
            run(x, t, context, None)  # build / warm up
        for _ in range(args.rounds):
            for name, run in runners.items():
                start = time.perf_counter()
                run(x, t, context, None)
                times[name].append(time.perf_counter() - start)
    base = {k: statistics.median(times[k]) for k in ("eager", "diffusers") if k in times}
    for name, values in times.items():
        median = statistics.median(values)
        ratios = ", ".join(f"{base[k] / median:.2f}x {k}" for k in base)
        print(f"{name:>14}: median {median * 1000:.0f} ms (min {min(values) * 1000:.0f}), {ratios}")


# the VAE decoder's stages in the order they run, as module paths (the original checkpoints' names)
DECODER_LEVELS = ("decoder.mid", "decoder.up.3", "decoder.up.2", "decoder.up.1", "decoder.up.0")


def held_out_latents(pipe, texts: list[str], args, model: Path) -> list[torch.Tensor]:
    """Final latents of `texts`' runs (seeds 1000+i, hybrid UNet), sampled once and kept under --dir."""
    from openldm.pipelines.params import GenerationParams

    size = args.size or pipe.config.image_size
    path = args.dir / "latents" / f"{model.stem}-{size}px-{args.steps}steps-{len(texts)}.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pipe.set_engine(engine("hybrid"))
        with torch.no_grad():
            latents = [pipe.txt2img_latents(GenerationParams(t, steps=args.steps, seed=1000 + i,
                                                             width=size, height=size))
                       for i, t in enumerate(texts)]
        torch.save(latents, path)
    return torch.load(path, weights_only=True)


def run_decoder(args) -> None:
    model = model_path(args.model, args.dir)
    pipe = load(model)
    pipe.domain = None
    latents = held_out_latents(pipe, prompts(args.model, args.latents), args, model)
    pipe.set_engine("eager")
    with torch.no_grad():
        want = [pixels(pipe.decode(z)[0]) for z in latents]
    keep = tuple(m for m in args.keep.split(",") if m)
    if args.only:
        keep += tuple(m for m in DECODER_LEVELS if m != args.only)
    for variant in args.variant.split(","):
        fields = VARIANTS[variant] | {"decoder_ignored": DECODER_SENSITIVE + keep}
        pipe.set_engine(OpenVINOInt8(**fields))
        with torch.no_grad():
            pipe.decode(latents[0])  # build (and calibrate) the decoder
            start = time.perf_counter()
            got = [pixels(pipe.decode(z)[0]) for z in latents]
            seconds = (time.perf_counter() - start) / len(latents)
        values = [psnr(g, w) for g, w in zip(got, want)]
        print(f"{variant} keep {','.join(keep) or '-'}: decoder PSNR median {statistics.median(values):.1f}"
              f" dB, min {min(values):.1f} dB; {seconds:.2f} s a decode", flush=True)


def build(args) -> None:
    from openldm.checkpoints.io import write_safetensors_atomic
    from openldm.checkpoints.save import random_state_dict
    from openldm.config import SD15

    path = args.dir / "sd15-random.safetensors"
    write_safetensors_atomic(path, random_state_dict(SD15, seed=0, progress=True))
    print(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("build", "psnr", "speed", "decoder"))
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/openldm-int8"), help="scratch folder")
    parser.add_argument("--variant", default="default", help="comma-separated variants (psnr)")
    parser.add_argument("--variants", default="default", help="comma-separated variants (speed)")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, help="image size (default: the model's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latents", type=int, default=12, help="held-out final latents (decoder)")
    parser.add_argument("--keep", default="", help="comma-separated VAE modules kept fp32 (decoder)")
    parser.add_argument("--only", choices=DECODER_LEVELS, help="quantize only this stage (decoder)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--diffusers", action="store_true", help="also time diffusers' UNet (speed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.dir.mkdir(parents=True, exist_ok=True)
    {"build": build, "psnr": run_psnr, "speed": run_speed, "decoder": run_decoder}[args.command](args)


if __name__ == "__main__":
    main()
