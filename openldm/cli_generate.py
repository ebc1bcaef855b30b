"""`openldm txt2img | img2img | inpaint | outpaint | upscale | png-info`: images from the command line.

Every option left out keeps its default, or the value stored in the `--from-png` file. Output
naming: `-o out.png` is the file when a run makes one image; with more (batch size, batch count,
several prompts) the images are out-0001.png, out-0002.png, ... in generation order. An existing
folder, or a path ending in `/`, holds `<command>.png` (or `<command>-0001.png`, ...). Files are
written atomically and carry their settings, so `--from-png` regenerates them.

Expected failures print one line, `openldm COMMAND: error: ...`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from openldm.checkpoints.hashing import model_hash
from openldm.checkpoints.save import DTYPES
from openldm.diffusion.registry import SAMPLERS, SCHEDULE_DISPLAY, resolve
from openldm.models.embedded import default_model_path
from openldm.networks import NetworkLibrary, load_network, network_refs, read_embeddings
from openldm.pipelines import images as im
from openldm.pipelines.common import seeds_for
from openldm.pipelines.infotext import read_png
from openldm.pipelines.outputs import output_paths, read_settings, save_result
from openldm.pipelines.params import GenerationParams, read_ints
from openldm.pipelines.pipeline import MASKED_CONTENT, Pipeline, load

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C
_FORMATTER = argparse.RawDescriptionHelpFormatter
_SETTINGS = {f.name for f in dataclasses.fields(GenerationParams)} - {"prompt", "loras"}


def add_commands(sub) -> None:
    """Register the generation subcommands on `openldm`'s subparsers."""
    for add in (_add_txt2img, _add_img2img, _add_inpaint, _add_outpaint, _add_upscale, _add_png_info):
        add(sub)


def _clean_errors(run):
    """Bad input (a missing file, an invalid setting) is one line on stderr and status 2; Ctrl-C, 130."""

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (ValueError, OSError) as e:
            print(f"openldm {args.command}: error: {e}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:  # files already written are whole; the one being written is not there
            print(f"openldm {args.command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED

    return wrapper


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


def _add_common(p: argparse.ArgumentParser, command: str) -> None:
    """Options every generating command shares; None means "not given"."""
    p.add_argument("prompt", nargs="?", help="what to draw; A1111 syntax: (word:1.2), [from:to:0.5], BREAK, "
                   "<lora:NAME:WEIGHT> (see --lora-dir), embedding names (see --embeddings)")
    model = p.add_argument_group("model and output")
    model.add_argument("--model", type=Path, metavar="PATH", help="a .safetensors/.ckpt checkpoint, a "
                       "diffusers folder or a model folder (default: the embedded model, "
                       f"{default_model_path()})")
    model.add_argument("--prediction", choices=("eps", "v"), help="for SD2 768-v files that cannot tell")
    model.add_argument("-o", "--out", type=Path, default=Path(f"{command}.png"),
                       help=f"output PNG, or a folder (default {command}.png; several images: "
                       f"{command}-0001.png, ...)")
    model.add_argument("--lora", type=_lora_spec, action="append", default=[], metavar="FILE:WEIGHT",
                       help="merge a LoRA/LyCORIS file at this weight (repeatable; weight default 1)")
    model.add_argument("--lora-dir", type=Path, action="append", default=[], metavar="DIR",
                       help="folder of LoRA/LyCORIS files (.safetensors/.pt/.ckpt, subfolders too) that "
                       "prompts name as <lora:NAME:WEIGHT> or <lyco:NAME:WEIGHT>, NAME being the file name "
                       "without its extension; merged only for the images that name them (repeatable)")
    model.add_argument("--embeddings", type=Path, action="append", default=[], metavar="DIR",
                       help="folder of textual-inversion embeddings (.safetensors/.pt/.bin, subfolders too); "
                       "write a file's name without its extension in a prompt to use it (repeatable)")
    model.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)")
    model.add_argument("--dtype", choices=tuple(DTYPES), help="default fp16 on cuda, fp32 elsewhere")
    g = p.add_argument_group("generation settings")
    g.add_argument("--negative", help="negative prompt: what to steer away from")
    g.add_argument("--prompt-file", type=Path, metavar="FILE", help="one prompt per line, each run in turn")
    g.add_argument("--from-png", type=Path, metavar="PNG", help="start from the settings stored in a PNG "
                   "made by openldm or A1111 (prompt, seed, sampler, ...); other options override them")
    g.add_argument("--steps", type=int, help="sampling steps (default 20)")
    g.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the model's, 7 for SD "
                   "checkpoints, 2 for the embedded model)")
    g.add_argument("--sampler", metavar="NAME",
                   help=f"default euler; one of {', '.join(SAMPLERS)} (A1111 names work too)")
    g.add_argument("--scheduler", dest="schedule", metavar="NAME",
                   help=f"sigma schedule (default: the sampler's own); one of {', '.join(SCHEDULE_DISPLAY)}")
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
    xl = p.add_argument_group("SDXL settings")
    xl.add_argument("--original-size", type=_size_spec, metavar="WxH",
                    help="size conditioning: the picture's size before cropping (default: the output size)")
    xl.add_argument("--crop-coords", type=_crop_spec, metavar="TOP,LEFT",
                    help="size conditioning: where the crop began (default 0,0; larger values look cut off)")
    xl.add_argument("--target-size", type=_size_spec, metavar="WxH",
                    help="size conditioning: the size asked for (default: the output size)")
    xl.add_argument("--refiner", type=Path, metavar="PATH", help="an SDXL refiner model that finishes each "
                    "image: it takes over the latents at --refiner-switch")
    xl.add_argument("--refiner-switch", type=float, metavar="F", help="fraction of the noise range the base "
                    "model samples before the refiner takes over (default 0.8, as diffusers' denoising_end)")
    p.set_defaults(outpaint=(0, 0, 0, 0))  # only `outpaint` extends, even with --from-png of an outpainting


def _add_txt2img(sub) -> None:
    p = _parser(sub, "txt2img", "generate images from a prompt",
                "Generate images from a text prompt.",
                'openldm txt2img "a red circle" --steps 20 --seed 1 -o a.png')
    _add_common(p, "txt2img")
    p.set_defaults(run=_generate, inputs=())


def _add_img2img(sub) -> None:
    p = _parser(sub, "img2img", "redraw an image following a prompt",
                "Redraw IMAGE following PROMPT; --strength says how much of it may change.",
                'openldm img2img photo.png "an oil painting" --strength 0.6')
    p.add_argument("image", type=Path, help="the starting image")
    _add_common(p, "img2img")
    g = p.add_argument_group("img2img settings")
    g.add_argument("--strength", type=float, help="denoising strength: 0 keeps the image, 1 ignores it "
                   "(default 0.75)")
    g.add_argument("--resize-mode", choices=im.RESIZE_MODES, help="fit IMAGE to --width/--height by "
                   "stretching (resize), cropping (crop) or padding (fill)")
    p.set_defaults(run=_generate, inputs=("image",))


def _add_inpaint(sub) -> None:
    p = _parser(sub, "inpaint", "repaint the masked part of an image",
                "Repaint the white part of MASK in IMAGE following PROMPT. Inpainting models "
                "(9-channel) get the masked image; other models blend latents under the mask.",
                'openldm inpaint photo.png mask.png "a cat" --mask-blur 4')
    p.add_argument("image", type=Path, help="the image to repaint")
    p.add_argument("mask", type=Path, help="same size as IMAGE; white = repaint, black = keep")
    _add_common(p, "inpaint")
    _add_inpaint_settings(p)
    p.set_defaults(run=_generate, inputs=("image", "mask"))


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
    p.set_defaults(run=_generate, inputs=("image",), outpaint=None)


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
    g = p.add_argument_group("upscaling settings")
    g.add_argument("--scale", dest="upscale_by", type=float, help="enlargement factor (default 2)")
    g.add_argument("--upscaler", choices=("latent", "lanczos"), help="how to enlarge (default latent)")
    g.add_argument("--strength", dest="hires_strength", type=float, help="redraw strength (default 0.5)")
    g.add_argument("--hires-steps", type=int, help="steps of the redraw (default: --steps)")
    p.set_defaults(run=_generate, inputs=("image",))


def _add_png_info(sub) -> None:
    p = _parser(sub, "png-info", "print the generation settings stored in a PNG",
                "Print the A1111-style parameters of a PNG made by openldm or AUTOMATIC1111.",
                "openldm png-info txt2img.png")
    p.add_argument("png", type=Path, help="the PNG to read")
    p.set_defaults(run=_png_info)


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
    resolve(base.sampler, base.schedule)  # unknown names fail now, not after loading the model
    if args.command == "outpaint" and not any(base.outpaint):
        raise ValueError("nothing to outpaint: give --extend LEFT,RIGHT,TOP,BOTTOM (pixels to add)")
    return [dataclasses.replace(base, prompt=p) for p in prompts], stored.model_hash if stored else None


def _check_size(params: GenerationParams, image) -> None:
    left, right, top, bottom = params.outpaint  # outpainting works on the image with its new borders
    width = params.width or (image.width + left + right if image is not None else None)
    height = params.height or (image.height + top + bottom if image is not None else None)
    sizes = (("width", width), ("height", height))
    bad = [f"{n} {v}" for n, v in sizes if v is not None and (v <= 0 or v % 8)]
    if bad:
        raise ValueError(f"{' and '.join(bad)}: sizes must be positive multiples of 8 "
                         "(--width/--height resize an input image)")


def _open_inputs(args: argparse.Namespace) -> dict:
    inputs = {name: im.open_image(getattr(args, name), name) for name in args.inputs}
    if "mask" in inputs:
        inputs["mask"] = inputs["mask"].convert("L")
    return inputs


# --- running -----------------------------------------------------------------------------

def _model_path(args: argparse.Namespace) -> Path:
    if args.model is not None:
        return args.model
    path = default_model_path()
    if not path.exists():
        raise ValueError(f"no --model given and the embedded model is not installed ({path} is missing); "
                         "pass --model PATH (a .safetensors/.ckpt file or a diffusers folder)")
    return path


def _load(args: argparse.Namespace, path: Path, jobs: list[GenerationParams]) -> Pipeline:
    """The model with its --lora-dir and --embeddings; those are read first, so a typo costs no load time."""
    networks, embeddings = NetworkLibrary(args.lora_dir), read_embeddings(args.embeddings)
    for ref in network_refs(*(text for params in jobs for text in (params.prompt, params.negative))):
        networks.path(ref)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    default = torch.float16 if device.startswith("cuda") else torch.float32
    dtype = DTYPES[args.dtype] if args.dtype else default
    pipe = load(path, device=device, dtype=dtype, prediction=args.prediction)
    pipe.progress, pipe.networks = True, networks
    for skipped in pipe.add_embeddings(embeddings):
        print(f"warning: {skipped}", file=sys.stderr)
    return pipe


def _load_refiner(args: argparse.Namespace, pipe: Pipeline) -> Pipeline | None:
    """The --refiner model, on the base model's device and in its dtype."""
    if args.refiner is None:
        return None
    refiner = load(args.refiner, device=pipe.device, dtype=pipe.dtype)
    refiner.progress = True
    return refiner


def _apply_loras(pipe: Pipeline, specs: list[tuple[Path, float]]) -> tuple[tuple[str, float], ...]:
    """Merge the --lora files into the weights; print what each matched (and every key it did not)."""
    if not specs:
        return ()
    networks = [(load_network(path), weight) for path, weight in specs]
    print(pipe.merge_networks(networks).summary(), file=sys.stderr)
    return tuple((network.name, weight) for network, weight in networks)


def _batches(params: GenerationParams):
    """One run per batch; batch b starts at seed + b * batch_size, as `Pipeline.generate` numbers them."""
    for b in range(params.batch_count):
        offset = b * params.batch_size
        yield dataclasses.replace(params, seed=seeds_for(params.seed, 1, offset)[0],
                                  subseed=seeds_for(params.subseed, 1, offset)[0], batch_count=1)


@_clean_errors
def _generate(args: argparse.Namespace) -> int:
    jobs, png_hash = _settings(args)
    inputs = _open_inputs(args)
    _check_size(jobs[0], inputs.get("image"))
    total = len(jobs) * jobs[0].batch_size * jobs[0].batch_count
    paths = iter(output_paths(args.out, total, args.command))
    path = _model_path(args)
    pipe = _load(args, path, jobs)
    name, hash_ = path.stem if path.is_file() else path.name, model_hash(path)
    if png_hash and png_hash != hash_:
        print(f"note: {args.from_png} was made with another model ({png_hash}; this one is {hash_})",
              file=sys.stderr)
    loras = _apply_loras(pipe, args.lora)
    if jobs[0].loras and not loras:
        print(f"note: {args.from_png} used LoRAs {', '.join(n for n, _ in jobs[0].loras)}; pass them with "
              "--lora FILE:WEIGHT to reproduce it", file=sys.stderr)
    reported = {""}  # what the prompts' LoRA tags matched, printed once per distinct set of networks
    refiner = _load_refiner(args, pipe)
    if jobs[0].refiner_model and refiner is None:
        print(f"note: {args.from_png} used the refiner {jobs[0].refiner_model}; pass it with --refiner PATH "
              "to reproduce it", file=sys.stderr)
    with tqdm(total=total, desc="images", unit="image", disable=total == 1) as bar:
        for params in jobs:
            for batch in _batches(dataclasses.replace(params, loras=loras)):
                for result in pipe.generate(batch, hires=args.command == "upscale", refiner=refiner,
                                            **inputs):
                    report = "\n".join(network.summary() for network in result.networks)
                    if report not in reported:
                        reported.add(report)
                        bar.write(report, file=sys.stderr)
                    written = save_result(result, next(paths), name, hash_)
                    bar.write(f"wrote {written} (seed {result.params.seed})")
                bar.update(batch.batch_size)
    return 0


@_clean_errors
def _png_info(args: argparse.Namespace) -> int:
    text, _ = read_png(args.png)
    if text is None:
        raise ValueError(f"{args.png}: the PNG holds no generation parameters")
    print(text)
    return 0
