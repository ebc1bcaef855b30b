"""Results as PNG files that say how they were made, and those settings read back.

Each PNG carries the A1111 `parameters` infotext (read by existing tools) and our `openldm` chunk:
the exact `GenerationParams` as JSON, which regenerates the image bit for bit. PNGs from other
tools have only the infotext; `read_settings` falls back to parsing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openldm.atomic import write_bytes_atomic
from openldm.pipelines.infotext import format_infotext, parse_infotext, png_bytes, read_png
from openldm.pipelines.params import GenerationParams, infotext_settings, read_infotext

FORMAT_VERSION = 1


@dataclass(frozen=True)
class PngSettings:
    """What a PNG says about its making: the settings, and the mode and model when it tells them."""

    params: GenerationParams
    mode: str | None = None
    model: str | None = None
    model_hash: str | None = None
    unhonoured: tuple[str, ...] = ()  # "Key: value" of an infotext that we cannot make (see `read_infotext`)


@dataclass(frozen=True)
class Rendered:
    """One finished image as its PNG file's bytes: what a local run writes and the server sends."""

    png: bytes
    seed: int
    networks: str = ""  # what the prompt's LoRA tags merged, as a printable report ("" for none)
    warning: str = ""  # words of the prompt outside a narrow model's training (models/domain.py)


def result_infotext(result, model: str | None = None, model_hash: str | None = None,
                    vae: tuple[str, str] | None = None) -> str:
    """The A1111 infotext of a `Result` (its params hold the concrete seed and size); `vae`: (name, hash)."""
    p = result.params
    settings = infotext_settings(p, p.width or result.image.width, p.height or result.image.height,
                                 model, model_hash, result.mode)
    if vae is not None:  # after the model, as A1111 writes them
        keys = list(settings)
        at = keys.index("Model") + 1
        added = {"VAE hash": vae[1], "VAE": vae[0]}
        settings = {k: settings[k] for k in keys[:at]} | added | {k: settings[k] for k in keys[at:]}
    settings |= getattr(result, "control", None) or {}  # "ControlNet 0: ..." as the A1111 extension writes
    settings |= getattr(result, "infotext", None) or {}
    return format_infotext(p.prompt, p.negative, settings)


def result_png(result, model: str | None = None, model_hash: str | None = None,
               vae: tuple[str, str] | None = None) -> bytes:
    """One `Result` as PNG bytes carrying both chunks."""
    exact = {"version": FORMAT_VERSION, "mode": result.mode, "model": model, "model_hash": model_hash,
             "params": result.params.to_json(), **({"vae": list(vae)} if vae else {})}
    return png_bytes(result.image, result_infotext(result, model, model_hash, vae), exact)


def save_result(result, path: str | Path, model: str | None = None, model_hash: str | None = None) -> Path:
    """Write one `Result` as a PNG with both chunks, atomically."""
    return write_bytes_atomic(Path(path), result_png(result, model, model_hash))


def read_settings(path: str | Path) -> PngSettings:
    """The settings stored in a PNG: our exact chunk if present, else its A1111 infotext."""
    text, exact = read_png(path)
    if exact is not None:
        return _from_exact(exact, path)
    if text is None:
        raise ValueError(f"{path}: the PNG holds no generation parameters")
    prompt, negative, settings = parse_infotext(text)
    params, unhonoured = read_infotext(prompt, negative, settings)
    return PngSettings(params, model=settings.get("Model"), model_hash=settings.get("Model hash"),
                       unhonoured=unhonoured)


def _from_exact(exact: dict[str, Any], path: str | Path) -> PngSettings:
    if exact.get("version") != FORMAT_VERSION or "params" not in exact:
        raise ValueError(f"{path}: unknown openldm settings format (version {exact.get('version')!r})")
    return PngSettings(GenerationParams.from_json(exact["params"]), exact.get("mode"), exact.get("model"),
                       exact.get("model_hash"))


def output_paths(out: str | Path, count: int, stem: str = "image") -> list[Path]:
    """Where `count` images go: `out` itself for one, else out-0001.png, out-0002.png, ...

    A folder (existing, or written with a trailing slash) holds `<stem>.png` / `<stem>-0001.png` ...
    """
    text = str(out)
    out = Path(out)
    if out.is_dir() or text.endswith(("/", "\\")):
        out = out / f"{stem}.png"
    if not out.suffix:
        out = out.with_name(out.name + ".png")
    if out.suffix.lower() != ".png":
        raise ValueError(f"output {out} must be a .png file (PNG carries the generation settings)")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i:04d}{out.suffix}") for i in range(1, count + 1)]
