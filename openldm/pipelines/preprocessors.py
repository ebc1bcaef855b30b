"""Control-image preprocessors that need no model weights: canny edges, inverted scribbles, tile blur.

The names are the A1111 ControlNet extension's modules. Those that run a network (depth, pose,
lineart, normal, segmentation) are not built in: asking for one says so, and a control image made
elsewhere can always be given ready (`none`).

numpy and Pillow are imported where they are used: the CLI lists PREPROCESSORS while building its
parser, and a `--server` client should not pay for them (each about a fifth of its imports) to send
a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

NEEDS_WEIGHTS = ("depth", "depth_midas", "depth_zoe", "openpose", "lineart", "lineart_anime", "normal_bae",
                 "seg", "mlsd", "softedge_hed", "softedge_pidinet", "scribble_hed")
PREPROCESSORS = ("none", "canny", "invert", "tile_blur")


@dataclass(frozen=True)
class Thresholds:
    """Canny's low and high hysteresis thresholds (the extension's defaults: 100, 200); tile's blur sigma."""

    low: int = 100
    high: int = 200
    sigma: float = 5.0


def preprocess(name: str, image: Image.Image, thresholds: Thresholds = Thresholds()) -> Image.Image:
    """The control image a ControlNet expects from `image`, made by the preprocessor `name`."""
    if name == "none":
        return image.convert("RGB")
    if name == "canny":
        return canny(image, thresholds.low, thresholds.high)
    if name == "invert":
        return invert(image)
    if name == "tile_blur":
        from PIL import ImageFilter

        return image.convert("RGB").filter(ImageFilter.GaussianBlur(thresholds.sigma))
    if name in NEEDS_WEIGHTS:
        raise ValueError(f"preprocessor {name!r} needs model weights, which openldm does not ship: "
                         "make the control image with another tool and pass it with preprocessor none")
    raise ValueError(f"unknown preprocessor {name!r}; built in: {', '.join(PREPROCESSORS)}")


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """White edges on black (OpenCV's Canny on the grey image), three channels as ControlNets take."""
    try:
        import cv2
    except ImportError:
        raise ValueError("the canny preprocessor needs OpenCV: pip install 'openldm[control]'") from None
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds {low}, {high}: need 0 <= low <= high")
    import numpy as np
    from PIL import Image

    edges = cv2.Canny(np.asarray(image.convert("L")), low, high)
    return Image.fromarray(edges).convert("RGB")


def invert(image: Image.Image) -> Image.Image:
    """Black strokes on white (a drawing) -> white on black, what scribble and lineart ControlNets take."""
    import numpy as np
    from PIL import Image

    grey = 255 - np.asarray(image.convert("L"), dtype=np.int16)
    return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
