"""Generation parameters stored in PNG files, readable by the tools people already use.

The `parameters` text chunk follows AUTOMATIC1111's "infotext" layout:

    a red circle
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512

We also store the exact settings as JSON in an `openldm` chunk, so that `--from-png`
regenerates the same image bit for bit without guessing at display names.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openldm.atomic import write_bytes_atomic

if TYPE_CHECKING:
    from PIL import Image

INFOTEXT_KEY = "parameters"
EXACT_KEY = "openldm"
_NEGATIVE = "Negative prompt:"
# `key: value` pairs; a value is either a quoted string (with \" escapes) or runs to the next comma.
_PAIR = re.compile(r'\s*([\w ()/+-]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _quote(value: str) -> str:
    """Quote a value that would break the comma-separated line, as A1111 does (and one that the reader
    would strip: spaces at either end)."""
    if not any(c in value for c in ',\n:"') and value == value.strip():
        return value
    return json.dumps(value)


def _unquote(value: str) -> str:
    """A quoted value's text; one that is not valid JSON is kept as written, as A1111 does."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def format_infotext(prompt: str, negative: str, settings: dict[str, Any]) -> str:
    """The A1111 text: prompt, optional negative prompt line, then `Key: value` pairs."""
    lines = [prompt]
    if negative:
        lines.append(f"{_NEGATIVE} {negative}")
    pairs = (f"{key}: {_quote(str(value))}" for key, value in settings.items() if value is not None)
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Inverse of `format_infotext`: (prompt, negative prompt, settings as strings); never raises.

    The first line that starts with "Negative prompt:" starts the negative prompt; later ones are part of it.
    """
    *head, last = text.rstrip("\n").split("\n")
    settings: dict[str, str] = {}
    if _PAIR.match(last) and len(_PAIR.findall(last)) >= 2:
        for key, value in _PAIR.findall(last):
            settings[key.strip()] = _unquote(value) if value.startswith('"') else value.strip()
    else:
        head.append(last)
    split = next((i for i, line in enumerate(head) if line.startswith(_NEGATIVE)), len(head))
    negative = "\n".join(head[split:])[len(_NEGATIVE):]
    return "\n".join(head[:split]), negative.removeprefix(" "), settings


def png_bytes(image: Image.Image, infotext: str, exact: dict[str, Any]) -> bytes:
    """A PNG file's bytes with both chunks: what `save_png` writes and the server sends."""
    from PIL import PngImagePlugin  # Pillow is imported when an image is read or written, not before

    info = PngImagePlugin.PngInfo()
    info.add_text(INFOTEXT_KEY, infotext)
    info.add_text(EXACT_KEY, json.dumps(exact, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, path: str | Path, infotext: str, exact: dict[str, Any]) -> Path:
    """Write a PNG with both chunks, atomically: an interrupted run leaves no broken file."""
    return write_bytes_atomic(Path(path), png_bytes(image, infotext, exact))


def read_png(path: str | Path) -> tuple[str | None, dict[str, Any] | None]:
    """(infotext, exact settings) stored in a PNG; None for a chunk that is absent."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            text = dict(image.text) if hasattr(image, "text") else dict(image.info)
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable PNG image ({e})") from None
    exact = text.get(EXACT_KEY)
    return text.get(INFOTEXT_KEY), json.loads(exact) if exact else None
