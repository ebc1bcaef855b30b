"""Image and mask handling for the pipelines: PIL <-> tensors, resize modes, masks, crops."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from openldm.pipelines.params import RESIZE_MODES

ResizeMode = Literal["resize", "crop", "fill"]
LANCZOS = Image.Resampling.LANCZOS


def open_image(path: str | Path, what: str = "image", mode: str = "RGB") -> Image.Image:
    """Open an image file with an error that says which input was missing or unreadable."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except FileNotFoundError:
        raise ValueError(f"{what} not found: {path}") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # a bomb: more pixels than PIL allows
        raise ValueError(f"{what} {path} is not a readable image ({e})") from None


def check_size(width: int, height: int, multiple: int = 8) -> None:
    if width <= 0 or height <= 0 or width % multiple or height % multiple:
        raise ValueError(f"width and height must be positive multiples of {multiple}; got {width}x{height}")


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB images -> (batch, 3, h, w) float tensor in [-1, 1]."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(batch, 3, h, w) tensor in [-1, 1] -> RGB images, rounded as 8-bit pixels."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """Grayscale mask -> (1, 1, h, w) in [0, 1]; 1 marks what is repainted."""
    return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]


def resize_image(image: Image.Image, width: int, height: int, mode: ResizeMode = "resize") -> Image.Image:
    """Bring an image to (width, height): stretch, crop to fill, or fit and fill the borders."""
    if mode == "resize":
        return image.resize((width, height), LANCZOS)
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    w, h = image.size
    ratio = (max if mode == "crop" else min)(width / w, height / h)
    scaled = image.resize((max(1, round(w * ratio)), max(1, round(h * ratio))), LANCZOS)
    sw, sh = scaled.size
    canvas = Image.new(image.mode, (width, height))
    left, top = (width - sw) // 2, (height - sh) // 2
    canvas.paste(scaled, (left, top))
    if mode == "fill":
        _stretch_edges(canvas, scaled, left, top)
    return canvas


def _stretch_edges(canvas: Image.Image, inner: Image.Image, left: int, top: int) -> None:
    """Fill the bands around an inner image by stretching its outermost rows or columns."""
    width, height = canvas.size
    iw, ih = inner.size
    right, bottom = width - left - iw, height - top - ih
    bands = [
        ((0, 0, 1, ih), (left, ih), (0, top)),
        ((iw - 1, 0, iw, ih), (right, ih), (left + iw, top)),
        ((0, 0, iw, 1), (iw, top), (left, 0)),
        ((0, ih - 1, iw, ih), (iw, bottom), (left, top + ih)),
    ]
    for edge, size, where in bands:
        if size[0] > 0 and size[1] > 0:
            canvas.paste(inner.crop(edge).resize(size), where)


def prepare_mask(mask: Image.Image, blur: float = 0.0, invert: bool = False) -> Image.Image:
    """Grayscale mask, optionally inverted, then Gaussian-blurred by `blur` pixels."""
    mask = mask.convert("L")
    if invert:
        mask = ImageOps.invert(mask)
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return mask


def masked_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """Box around the masked pixels, padded, grown to the target aspect ratio, inside the image."""
    box = mask.getbbox()
    if box is None:
        raise ValueError("the mask is empty: nothing to inpaint")
    x0, y0, x1, y1 = box
    iw, ih = mask.size
    x0, y0, x1, y1 = max(0, x0 - padding), max(0, y0 - padding), min(iw, x1 + padding), min(ih, y1 + padding)
    target = width / height
    if (x1 - x0) / (y1 - y0) < target:
        x0, x1 = _grow(x0, x1, round((y1 - y0) * target), iw)
    else:
        y0, y1 = _grow(y0, y1, round((x1 - x0) / target), ih)
    return x0, y0, x1, y1


def _grow(lo: int, hi: int, size: int, limit: int) -> tuple[int, int]:
    """Widen [lo, hi) around its centre to `size` (at most `limit`), shifting to stay inside."""
    size = min(size, limit)
    lo = max(0, min(lo - (size - (hi - lo)) // 2, limit - size))
    return lo, lo + size


def paste_back(
    original: Image.Image, patch: Image.Image, box: tuple[int, int, int, int], mask: Image.Image
) -> Image.Image:
    """Put a processed crop back where it came from, blending through the (blurred) mask."""
    x0, y0, x1, y1 = box
    patch = patch.resize((x1 - x0, y1 - y0), LANCZOS)
    out = original.copy()
    out.paste(patch, (x0, y0), mask.crop(box))
    return out


def extend_canvas(
    image: Image.Image, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0,
    mask: Image.Image | None = None,
) -> tuple[Image.Image, Image.Image]:
    """Outpainting: a larger canvas (borders filled by stretched edges) and a mask of the new area.

    A `mask` of the image's own (white = repaint) is kept inside the new one, at the image's place.
    """
    w, h = image.size
    if mask is not None and mask.size != image.size:
        raise ValueError(f"mask size {mask.size[0]}x{mask.size[1]} does not match the image size {w}x{h}")
    canvas = Image.new("RGB", (w + left + right, h + top + bottom))
    canvas.paste(image, (left, top))
    _stretch_edges(canvas, image, left, top)
    new_mask = Image.new("L", canvas.size, 255)
    new_mask.paste(0 if mask is None else mask.convert("L"), (left, top, left + w, top + h))
    return canvas, new_mask


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Replace masked pixels by colours spread in from the unmasked surroundings ("fill" content).

    Unknown pixels take the mean of their known neighbours, ring by ring (a box filter over the
    known pixels and their count), until the hole is closed.
    """
    rgb = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
    known = torch.from_numpy(np.asarray(mask.convert("L")) < 128).float()[None, None]
    if known.sum() == 0:
        return image.convert("RGB")
    filled, weight = rgb * known, known.clone()
    while (weight == 0).any():
        total = torch.nn.functional.avg_pool2d(filled, 3, 1, 1, count_include_pad=False)
        count = torch.nn.functional.avg_pool2d(weight, 3, 1, 1, count_include_pad=False)
        grow = (weight == 0) & (count > 0)
        filled = torch.where(grow, total / count.clamp(min=1e-8), filled)
        weight = torch.where(grow, torch.ones_like(weight), weight)
    out = filled[0].permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8).numpy()
    return Image.fromarray(out)
