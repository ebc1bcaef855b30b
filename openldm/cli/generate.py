"""`openldm txt2img | img2img | inpaint | outpaint | upscale | png-info | samplers`: images from the CLI.

Every option left out keeps its default, or the value stored in the `--from-png` file. Output
naming: `-o out.png` is the file when a run makes one image; with more (batch size, batch count,
several prompts) the images are out-0001.png, out-0002.png, ... in generation order. An existing
folder, or a path ending in `/`, holds `<command>.png` (or `<command>-0001.png`, ...). Files are
written atomically and carry their settings, so `--from-png` regenerates them.

With `--server URL` (or $OPENLDM_SERVER) a running `openldm serve` makes the images with the model
it keeps loaded. torch and the models are imported only by the functions that run a model here,
so such a run, `png-info` and `--help` start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from openldm.atomic import check_writable, write_bytes_atomic
from openldm.client import SERVER_ENV, RemoteRenderer
from openldm.config import WEIGHT_DTYPES
from openldm.engines import ENGINE_NAMES, OFFLOAD_MODES, default_engine
from openldm.models.embedded import default_model_path
from openldm.pipelines.infotext import read_png
from openldm.pipelines.outputs import Rendered, output_paths, read_settings
from openldm.pipelines.params import (
    MASKED_CONTENT,
    MODE_INPUTS,
    RESIZE_MODES,
    UPSCALER_NAMES,
    GenerationParams,
    read_ints,
    upscaler_key,
)
from openldm.pipelines.run import batch_params

if TYPE_CHECKING:
    from openldm.pipelines.render import Renderer

Render = Callable[[GenerationParams], list[Rendered]]  # one batch's settings -> its finished PNGs
_FORMATTER = argparse.RawDescriptionHelpFormatter
_SETTINGS = {f.name for f in dataclasses.fields(GenerationParams)} - {"prompt", "loras"}


def add_commands(sub) -> None:
    """Register the generation subcommands on `openldm`'s subparsers."""
    for add in (_add_txt2img, _add_img2img, _add_inpaint, _add_outpaint, _add_upscale, _add_png_info,
                _add_samplers):
        add(sub)


# --- arguments ---------------------------------------------------------------------------

def _parser(sub, name: str, summary: str, description: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, description=description, formatter_class=_FORMATTER,
                          epilog=f"example:\n  {example}")


def _lora_spec(text: str) -> tuple[Path, float]:
    """FILE:WEIGHT (or FILE, weight 1); the last colon splits, so Windows drive letters survive."""
    path, _, weight = text.rpartition(":")
    try:
        return Path(path), float(weight)
    except ValueError:
        return Path(text), 1.0


def _ints(text: str, count: int, sep: str, form: str) -> tuple[int, ...]:
    try:
        return read_ints(text, count, sep)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}") from None


_size_spec = functools.partial(_ints, count=2, sep="x", form="WIDTHxHEIGHT")
_crop_spec = functools.partial(_ints, count=2, sep=",", form="TOP,LEFT")
_extend_spec = functools.partial(_ints, count=4, sep=",", form="LEFT,RIGHT,TOP,BOTTOM")


def read_gib(text: str) -> int:
    """A positive number of GiB, in bytes."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of GiB, got {text!r}")
    return int(value * 2**30)


def add_model_options(group) -> dict[str, str]:
    """Which model to load and how: shared by the generating commands and `openldm serve`.

    Returns what it declared, flag -> attribute: on a `--server` client these are the server's.
    """
    add = group.add_argument
    actions = [
        add("--model", type=Path, metavar="PATH", help="a .safetensors/.ckpt checkpoint, a "
            "diffusers folder or a model folder (default: the embedded model, "
            f"{default_model_path()})"),
        add("--prediction", choices=("eps", "v"), help="for SD2 768-v files that cannot tell"),
        add("--vae", type=Path, metavar="PATH", help="use this VAE instead of the model's: a file in the "
            "original layout (e.g. vae-ft-mse-840000-ema-pruned.safetensors), in diffusers naming (the SDXL "
            "fp16-fix VAE) or a diffusers vae/ folder"),
        add("--lora", type=_lora_spec, action="append", default=[], metavar="FILE:WEIGHT",
            help="merge a LoRA/LyCORIS file at this weight (repeatable; weight default 1)"),
        add("--lora-dir", type=Path, action="append", default=[], metavar="DIR",
            help="folder of LoRA/LyCORIS files (.safetensors/.pt/.ckpt, subfolders too) that "
            "prompts name as <lora:NAME:WEIGHT> or <lyco:NAME:WEIGHT>, NAME being the file name "
            "without its extension; merged only for the images that name them (repeatable)"),
        add("--embeddings", type=Path, action="append", default=[], metavar="DIR",
            help="folder of textual-inversion embeddings (.safetensors/.pt/.bin, subfolders too); "
            "write a file's name without its extension in a prompt to use it (repeatable)"),
        add("--device", help="cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)"),
        add("--dtype", choices=WEIGHT_DTYPES, help="default fp16 on cuda, fp32 elsewhere (fp16 and bf16 are "
            "refused on the CPU: they fail there mid-run)"),
        add("--engine", choices=ENGINE_NAMES, help="what runs the UNet and VAE decoder ($OPENLDM_ENGINE, or "
            "auto): auto (OpenVINO fp32 for the UNet when installed, else eager), eager PyTorch, compile "
            "(torch.compile, frozen weights), openvino, openvino-int8 (W8A8: fastest, inexact), "
            "openvino-int8-weights (int8 weights only: near-exact), openvino-int8-hybrid (W8A8 matmuls, "
            "int8-weight convolutions: between the two) or openvino-bf16 (bf16: fast on CPUs with native "
            "bf16, inexact); OpenVINO and NNCF: "
            "pip install \"openldm[cpu]\""),
        add("--offload", choices=OFFLOAD_MODES, help="CUDA only: model keeps only the running component on "
            "the GPU, sequential streams the UNet's blocks through it (slower, for small GPUs)"),
        add("--decoder", type=Path, metavar="FILE", help="decode with this TAESD / TAESDXL decoder "
            "(taesd_decoder.safetensors, or a diffusers AutoencoderTiny): fast, inexact"),
        add("--refiner", type=Path, metavar="PATH", help="an SDXL refiner model that finishes each image: "
            "it takes over the latents at --refiner-switch"),
        add("--memory-budget", type=read_gib, metavar="GIB", help="the peak memory a run may reach, in GiB "
            "(default: what this machine has free now); runs that would need more are refused at once"),
    ]
    return {action.option_strings[-1]: action.dest for action in actions}


def _add_common(p: argparse.ArgumentParser, command: str) -> None:
    """Options every generating command shares; None means "not given"."""
    p.add_argument("prompt", nargs="?", help="what to draw; A1111 syntax: (word:1.2), [from:to:0.5], BREAK, "
                   "<lora:NAME:WEIGHT> (see --lora-dir), embedding names (see --embeddings)")
    model = p.add_argument_group("model and output")
    model.add_argument("-o", "--out", type=Path, default=Path(f"{command}.png"),
                       help=f"output PNG, or a folder (default {command}.png; several images: "
                       f"{command}-0001.png, ...)")
    model.add_argument("--server", metavar="URL", default=os.environ.get(SERVER_ENV) or None,
                       help="have a running `openldm serve` make the images (http://HOST:PORT, HOST:PORT or "
                       f"PORT; default ${SERVER_ENV}); the model options below are then the server's")
    add_model_options(model)
    g = p.add_argument_group("generation settings")
    g.add_argument("--negative", help="negative prompt: what to steer away from")
    g.add_argument("--prompt-file", type=Path, metavar="FILE", help="one prompt per line, each run in turn")
    g.add_argument("--from-png", type=Path, metavar="PNG", help="start from the settings stored in a PNG "
                   "made by openldm or A1111 (prompt, seed, sampler, ...); other options override them")
    g.add_argument("--steps", type=int, help="sampling steps (default 20)")
    g.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the model's, 7 for SD "
                   "checkpoints, 2 for the embedded model)")
    g.add_argument("--sampler", metavar="NAME", help="default euler; `openldm samplers` lists the names "
                   "(A1111's and ComfyUI's work too)")
    g.add_argument("--scheduler", dest="schedule", metavar="NAME",
                   help="sigma schedule (default: the sampler's own); `openldm samplers` lists them")
    g.add_argument("--seed", type=int, help="seed of the first image; image i uses seed+i (default -1: "
                   "random, and recorded)")
    g.add_argument("--subseed", type=int, help="variation seed")
    g.add_argument("--subseed-strength", type=float, metavar="S",
                   help="how far towards the variation seed (0..1)")
    g.add_argument("--width", type=int, help="multiple of 8 (default: the model's size, or the image's)")
    g.add_argument("--height", type=int, help="multiple of 8 (default: the model's size, or the image's)")
    g.add_argument("--batch-size", type=int, metavar="N", help="images sampled together (default 1)")
    g.add_argument("--n-iter", "--batch-count", dest="batch_count", type=int, metavar="N",
                   help="batches run one after another (default 1)")
    g.add_argument("--clip-skip", type=int, metavar="N",
                   help="use the text encoder's n-th layer from the end")
    g.add_argument("--cfg-rescale", dest="guidance_rescale", type=float, metavar="PHI",
                   help="rescale guided predictions towards the conditional one's spread (0..1, default 0)")
    g.add_argument("--eta", type=float, help="noise of ancestral and SDE samplers, DDIM's eta (default: the "
                   "sampler's)")
    g.add_argument("--s-noise", type=float, help="scale of the noise those samplers add (default 1)")
    g.add_argument("--lenient", action="store_true", help="with --from-png: warn about stored settings "
                   "openldm cannot honour (an unknown upscaler, an extension's key) instead of refusing")
    _add_vae_memory(p)
    _add_control(p)
    xl = p.add_argument_group("SDXL settings")
    xl.add_argument("--original-size", type=_size_spec, metavar="WxH",
                    help="size conditioning: the picture's size before cropping (default: the output size)")
    xl.add_argument("--crop-coords", type=_crop_spec, metavar="TOP,LEFT",
                    help="size conditioning: where the crop began (default 0,0; larger values look cut off)")
    xl.add_argument("--target-size", type=_size_spec, metavar="WxH",
                    help="size conditioning: the size asked for (default: the output size)")
    xl.add_argument("--refiner-switch", type=float, metavar="F", help="fraction of the noise range the base "
                    "model samples before the refiner takes over (default 0.8, as diffusers' denoising_end)")
    p.set_defaults(outpaint=(0, 0, 0, 0))  # only `outpaint` extends, even with --from-png of an outpainting


def _add_vae_memory(p: argparse.ArgumentParser) -> None:
    from openldm.models.vae_tiling import DEFAULT_VAE_TILE, TILING_MODES

    g = p.add_argument_group("VAE memory (sizes in latent pixels: x8 image pixels for SD)")
    g.add_argument("--vae-tiling", choices=TILING_MODES, help="decode and encode in overlapping tiles, so "
                   "memory follows the tile, not the image; tiles blend, so pixels differ slightly (default "
                   "auto: only when a whole decode would not fit in memory)")
    g.add_argument("--vae-tile-size", type=int, metavar="N",
                   help=f"tile side (default {DEFAULT_VAE_TILE}: {DEFAULT_VAE_TILE * 8} image pixels for SD)")
    g.add_argument("--vae-tile-overlap", type=int, metavar="N", help="pixels tiles share, blended "
                   "(default a quarter of the tile)")
    g.add_argument("--vae-slicing", action="store_true", default=None,
                   help="decode a batch one image at a time: the same pixels, less memory")


def _control_spec(text: str) -> tuple[Path, Path, float, float, float]:
    """FILE:IMAGE[:WEIGHT[:START:END]] -> (ControlNet file, control image, weight, start, end)."""
    parts = text.split(":")
    if len(parts) not in (2, 3, 5):
        raise argparse.ArgumentTypeError(f"{text!r} is not FILE:IMAGE[:WEIGHT[:START:END]]")
    try:
        weight, start, end = (float(v) for v in (parts[2:] + ["1", "0", "1"][len(parts) - 2:])[:3])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: WEIGHT, START and END must be numbers") from None
    return Path(parts[0]), Path(parts[1]), weight, start, end


def _add_control(p: argparse.ArgumentParser) -> None:
    from openldm.pipelines.params import CONTROL_MODES
    from openldm.pipelines.preprocessors import PREPROCESSORS

    g = p.add_argument_group("ControlNet")
    g.add_argument("--control", type=_control_spec, action="append", default=[],
                   metavar="FILE:IMAGE[:WEIGHT[:START:END]]", help="a ControlNet file or diffusers folder, "
                   "its control image, weight (default 1) and the fractions of the schedule it acts in; "
                   "repeatable")
    g.add_argument("--control-preprocess", choices=PREPROCESSORS, default="none",
                   help="make every control image with this preprocessor first (default none: ready-made)")
    g.add_argument("--canny-low", type=int, default=100, help="canny's low threshold (default 100)")
    g.add_argument("--canny-high", type=int, default=200, help="canny's high threshold (default 200)")
    g.add_argument("--control-mode", choices=CONTROL_MODES, default="balanced", help="A1111's control modes: "
                   "balanced, prompt (my prompt is more important), control (ControlNet is more important)")
    g.add_argument("--control-resize", choices=RESIZE_MODES, default="resize",
                   help="how control images meet the size (as --resize-mode)")
    g.add_argument("--guess-mode", action="store_true", help="ControlNet guess mode: no prompt needed")


def control_units(args: argparse.Namespace) -> list:
    """The `--control` options as `ControlUnit`s, their images read and preprocessed."""
    from openldm.pipelines.control import ControlUnit
    from openldm.pipelines.images import open_image
    from openldm.pipelines.preprocessors import Thresholds, preprocess

    thresholds = Thresholds(args.canny_low, args.canny_high)
    made = [preprocess(args.control_preprocess, open_image(image, "control image"), thresholds)
            for _, image, *_ in args.control]
    return [ControlUnit(model, image, weight, start, end, args.control_resize, args.control_mode,
                        args.guess_mode, args.control_preprocess)
            for (model, _, weight, start, end), image in zip(args.control, made)]


def _add_txt2img(sub) -> None:
    p = _parser(sub, "txt2img", "generate images from a prompt",
                "Generate images from a text prompt.",
                'openldm txt2img "a red circle" --steps 20 --seed 1 -o a.png')
    _add_common(p, "txt2img")
    g = p.add_argument_group("hires fix (A1111's: sample, enlarge, redraw at the larger size)")
    g.add_argument("--hires", action="store_true", default=None, help="finish with the hires fix")
    g.add_argument("--hires-width", type=int, metavar="PX", help="target width instead of --hires-scale (0 "
                   "or unset with --hires-height: keep the aspect; both: enlarge to cover, crop the middle)")
    g.add_argument("--hires-height", type=int, metavar="PX", help="target height (see --hires-width)")
    _add_hires_options(g, "--hires-scale")
    g.add_argument("--hires-prompt", metavar="TEXT", help="prompt of the second pass (default: the prompt)")
    g.add_argument("--hires-negative", metavar="TEXT",
                   help="negative prompt of the second pass (default: --negative)")
    g.add_argument("--hires-sampler", metavar="NAME", help="sampler of the second pass (default: --sampler)")
    g.add_argument("--hires-cfg", type=float, metavar="SCALE",
                   help="guidance scale of the second pass (default: --cfg)")
    p.set_defaults(run=_generate)


def _add_hires_options(g: argparse._ArgumentGroup, scale: str) -> None:
    """How the hires fix (txt2img --hires) and `upscale` enlarge and redraw."""
    g.add_argument(scale, dest="upscale_by", type=float, metavar="F", help="enlargement factor (default 2)")
    g.add_argument("--upscaler", type=_upscaler, metavar="NAME", help="how to enlarge: "
                   f"{', '.join(UPSCALER_NAMES.values())} (or {', '.join(UPSCALER_NAMES)}); default Latent; "
                   "x4: the SD x4-upscaler model given by --hires-upscaler")
    g.add_argument("--hires-upscaler", type=Path, metavar="PATH", help="an SD x4-upscaler model (file or "
                   "folder) to enlarge with; implies --upscaler x4")
    g.add_argument("--strength", "--denoising-strength", dest="hires_strength", type=float, metavar="S",
                   help="redraw strength (default 0.5)")
    g.add_argument("--hires-steps", type=int, metavar="N", help="steps of the redraw (default: --steps; "
                   "A1111's 0 too)")


def _upscaler(text: str) -> str:
    try:
        return upscaler_key(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_img2img(sub) -> None:
    p = _parser(sub, "img2img", "redraw an image following a prompt",
                "Redraw IMAGE following PROMPT; --strength says how much of it may change.",
                'openldm img2img photo.png "an oil painting" --strength 0.6')
    p.add_argument("image", type=Path, help="the starting image")
    _add_common(p, "img2img")
    g = p.add_argument_group("img2img settings")
    g.add_argument("--strength", type=float, help="denoising strength: 0 keeps the image, 1 ignores it "
                   "(default 0.75)")
    g.add_argument("--resize-mode", choices=RESIZE_MODES, help="fit IMAGE to --width/--height by "
                   "stretching (resize), cropping (crop) or padding (fill)")
    p.set_defaults(run=_generate)


def _add_inpaint(sub) -> None:
    p = _parser(sub, "inpaint", "repaint the masked part of an image",
                "Repaint the white part of MASK in IMAGE following PROMPT. Inpainting models "
                "(9-channel) get the masked image; other models blend latents under the mask.",
                'openldm inpaint photo.png mask.png "a cat" --mask-blur 4')
    p.add_argument("image", type=Path, help="the image to repaint")
    p.add_argument("mask", type=Path, help="same size as IMAGE; white = repaint, black = keep")
    _add_common(p, "inpaint")
    _add_inpaint_settings(p)
    p.set_defaults(run=_generate)


def _add_outpaint(sub) -> None:
    p = _parser(sub, "outpaint", "extend an image beyond its borders",
                "Add --extend pixels to the sides of IMAGE and paint them following PROMPT. The new area "
                "starts from the stretched edge pixels (or --masked-content) and is inpainted; the original "
                "stays as it was, except within --mask-blur pixels of the seam. The new size must be a "
                "multiple of 8. A higher --strength (0.9-1) lets more new content in.",
                'openldm outpaint photo.png "a wide beach" --extend 64,64,0,0 --strength 0.95')
    p.add_argument("image", type=Path, help="the image to extend")
    _add_common(p, "outpaint")
    g = _add_inpaint_settings(p)
    g.add_argument("--extend", dest="outpaint", type=_extend_spec, metavar="LEFT,RIGHT,TOP,BOTTOM",
                   help="pixels to add on each side, e.g. 0,64,0,0 widens to the right")
    p.set_defaults(run=_generate, outpaint=None)


def _add_inpaint_settings(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = p.add_argument_group("inpainting settings")
    g.add_argument("--strength", type=float, help="denoising strength (default 0.75)")
    g.add_argument("--mask-blur", type=float, help="blur radius of the mask edge in pixels (default 4)")
    g.add_argument("--invert-mask", action="store_true", default=None, help="repaint the black part")
    g.add_argument("--masked-content", choices=MASKED_CONTENT,
                   help="what the masked area starts from (default original)")
    g.add_argument("--only-masked", action="store_true", default=None,
                   help="work on a crop around the mask at full resolution, then paste it back")
    g.add_argument("--padding", dest="only_masked_padding", type=int,
                   help="pixels around the mask in --only-masked crops (default 32)")
    return g


def _add_upscale(sub) -> None:
    p = _parser(sub, "upscale", "enlarge an image and redraw the details",
                "Hires fix: enlarge IMAGE by --scale (in latent space or with Lanczos), then redraw it "
                "with img2img at --strength.", 'openldm upscale small.png "a castle" --scale 2 -o big.png')
    p.add_argument("image", type=Path, help="the image to enlarge")
    _add_common(p, "upscale")
    _add_hires_options(p.add_argument_group("upscaling settings"), "--scale")
    x4 = p.add_argument_group("x4 upscaler (when --model is SD 2's x4-upscaler: 4x, no img2img pass)")
    x4.add_argument("--noise-level", type=int, default=20, metavar="N",
                    help="noise added to the input before upscaling, 0..350 (default 20): more invents more")
    x4.add_argument("--tile", type=int, default=128, metavar="PX",
                    help="process inputs larger than this in tiles of PX input pixels (default 128)")
    x4.add_argument("--tile-overlap", type=int, default=16, metavar="PX", help="tile overlap (default 16)")
    p.set_defaults(run=_generate)


def x4_settings(args: argparse.Namespace):
    """The x4 upscaler's settings from `upscale`'s options (the defaults for other commands)."""
    from openldm.pipelines.x4 import X4Settings, X4Tiling

    if args.command != "upscale":
        return X4Settings()
    return X4Settings(args.noise_level, X4Tiling(args.tile, args.tile_overlap))


def _add_png_info(sub) -> None:
    p = _parser(sub, "png-info", "print the generation settings stored in a PNG",
                "Print the A1111-style parameters of a PNG made by openldm or AUTOMATIC1111.",
                "openldm png-info txt2img.png")
    p.add_argument("png", type=Path, help="the PNG to read")
    p.set_defaults(run=_png_info)


def _add_samplers(sub) -> None:
    p = _parser(sub, "samplers", "list the samplers and sigma schedules --sampler and --scheduler take",
                "List every sampler with its A1111 display name, default schedule and other accepted "
                "names, then the sigma schedules. Names are matched case-insensitively.",
                "openldm samplers")
    p.set_defaults(run=_samplers)


# --- settings ----------------------------------------------------------------------------

def read_prompt_file(path: Path) -> list[str]:
    """One prompt per line; blank lines are skipped, and a file without any prompt is an error."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"prompt file not found: {path}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} is empty: write one prompt per line")
    return prompts


def _settings(args: argparse.Namespace) -> tuple[list[GenerationParams], str | None]:
    """One concrete-seeded `GenerationParams` per prompt, and the hash of the model a PNG names."""
    stored = read_settings(args.from_png) if args.from_png else None
    if stored and stored.unhonoured:
        problem = f"{args.from_png}: settings openldm cannot honour: {'; '.join(stored.unhonoured)}"
        if not args.lenient:
            raise ValueError(f"{problem} (--lenient makes the image without them)")
        print(f"warning: {problem}; made without them", file=sys.stderr)
    base = stored.params if stored else GenerationParams("")
    given = {name: value for name in _SETTINGS if (value := getattr(args, name, None)) is not None}
    base = dataclasses.replace(base, **given).with_seed()
    if args.prompt is not None and args.prompt_file is not None:
        raise ValueError("give either a PROMPT or --prompt-file, not both")
    if args.prompt_file is not None:
        prompts = read_prompt_file(args.prompt_file)
    elif args.prompt is not None or stored:
        prompts = [args.prompt if args.prompt is not None else base.prompt]
    else:
        raise ValueError("no prompt: give a PROMPT, --prompt-file or --from-png")
    return [dataclasses.replace(base, prompt=p) for p in prompts], stored.model_hash if stored else None


# --- running -----------------------------------------------------------------------------

def model_path(args: argparse.Namespace) -> Path:
    if args.model is not None:
        return args.model
    path = default_model_path()
    if not path.exists():
        raise ValueError(f"no --model given and the embedded model is not installed ({path} is missing); "
                         "pass --model PATH (a .safetensors/.ckpt file or a diffusers folder)")
    return path


def load_here(args: argparse.Namespace, prompts: Iterable[str] = ()) -> Renderer:
    """A `Renderer` for the model options in `args` (the `--lora` files merged, the refiner loaded)."""
    from openldm.pipelines.render import load_renderer

    return load_renderer(model_path(args), device=args.device, dtype=args.dtype, prediction=args.prediction,
                         lora_dirs=args.lora_dir, embedding_dirs=args.embeddings, loras=args.lora,
                         refiner=args.refiner, prompts=prompts, vae=args.vae,
                         engine=args.engine or default_engine(), decoder=args.decoder, offload=args.offload,
                         upscaler=getattr(args, "hires_upscaler", None), memory_budget=args.memory_budget)


def _render_here(args: argparse.Namespace, jobs: list[GenerationParams]) -> tuple[Render, Callable[[], str]]:
    """This process loads the model; the inputs are read and checked first, so a typo costs no load time."""
    for params in jobs:  # the limits first: before starting torch takes seconds
        params.validate()
    from openldm.pipelines.images import open_image
    from openldm.pipelines.render import check_inputs

    inputs = {name: open_image(getattr(args, name), name) for name in MODE_INPUTS[args.command]}
    for params in jobs:
        check_inputs(args.command, params, **inputs)
    controls = control_units(args)
    renderer = load_here(args, [text for params in jobs for text in (params.prompt, params.negative)])
    # one prompt for the whole process (its other batches hit the prompt cache): the text encoders need
    # not stay in memory while it samples; several prompts keep them, rather than reading them per batch
    one_prompt = len({(params.prompt, params.negative) for params in jobs}) == 1
    renderer.pipe.hold_text_encoders = not one_prompt or args.offload is not None
    render = functools.partial(renderer.render, args.command, controls=controls, x4=x4_settings(args),
                               **inputs)
    return render, lambda: renderer.model_hash


_SERVER_SIDE = add_model_options(argparse.ArgumentParser(add_help=False))  # flag -> attribute


def _render_on_server(args: argparse.Namespace) -> tuple[Render, Callable[[], str]]:
    """The server renders; the inputs travel as their files' bytes."""
    if args.control:
        raise ValueError("--control runs here only: a server names its ControlNets itself; send "
                         "`controls` to its POST /v1/jobs (docs/server.md)")
    given = [flag for flag, name in _SERVER_SIDE.items() if getattr(args, name, None) not in (None, [])]
    if given:
        raise ValueError(f"{', '.join(given)}: the server's model settings; give them to `openldm serve`, "
                         "not to a client")
    inputs = {}
    for name in MODE_INPUTS[args.command]:
        try:
            inputs[name] = getattr(args, name).read_bytes()
        except FileNotFoundError:
            raise ValueError(f"{name} not found: {getattr(args, name)}") from None
    client = RemoteRenderer(args.server)
    return functools.partial(client.render, args.command, **inputs), lambda: client.model()["hash"]


def _generate(args: argparse.Namespace) -> int:
    if getattr(args, "hires_upscaler", None) is not None and args.upscaler is None:
        args.upscaler = "x4"  # --hires-upscaler implies it
    jobs, png_hash = _settings(args)
    total = len(jobs) * jobs[0].batch_size * jobs[0].batch_count
    paths = iter(check_writable(output_paths(args.out, total, args.command)))
    render, current_hash = _render_on_server(args) if args.server else _render_here(args, jobs)
    if png_hash and png_hash != (hash_ := current_hash()):
        print(f"note: {args.from_png} was made with another model ({png_hash}; this one is {hash_})",
              file=sys.stderr)
    if jobs[0].loras and not args.lora and not args.server:
        print(f"note: {args.from_png} used LoRAs {', '.join(n for n, _ in jobs[0].loras)}; pass them with "
              "--lora FILE:WEIGHT to reproduce it", file=sys.stderr)
    if jobs[0].refiner_model and args.refiner is None and not args.server:
        print(f"note: {args.from_png} used the refiner {jobs[0].refiner_model}; pass it with --refiner PATH "
              "to reproduce it", file=sys.stderr)
    reported = {""}  # what the prompts' LoRA tags matched and domain warnings: each printed once
    done = 0
    for params in jobs:
        for batch in batch_params(params):
            for image in render(batch):
                for note in (image.networks, image.warning and f"warning: {image.warning}"):
                    if note not in reported:
                        reported.add(note)
                        print(note, file=sys.stderr)
                written = write_bytes_atomic(next(paths), image.png)
                done += 1
                counter = f"[{done}/{total}] " if total > 1 else ""
                print(f"{counter}wrote {written} (seed {image.seed})")
    return 0


def _png_info(args: argparse.Namespace) -> int:
    text, _ = read_png(args.png)
    if text is None:
        raise ValueError(f"{args.png}: the PNG holds no generation parameters")
    print(text)
    return 0


def _samplers(args: argparse.Namespace) -> int:
    from openldm.diffusion.registry import SAMPLERS, SCHEDULE_DISPLAY

    print(f"{'sampler':<20} {'A1111 name':<20} {'default schedule':<18} other names")
    for spec in SAMPLERS.values():
        print(f"{spec.name:<20} {spec.display:<20} {spec.default_schedule:<18} {', '.join(spec.aliases)}")
    print(f"\n{'schedule':<20} A1111 name")
    for name, display in SCHEDULE_DISPLAY.items():
        print(f"{name:<20} {display}")
    return 0
