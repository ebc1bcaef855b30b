"""ControlNet units through the server: the ControlNets it offers, and units read from either API.

Names resolve only in the ControlNet folder's listing (never joined onto a path), as models and LoRAs
do. Both faces turn their units into `ControlUnit`s whose `model` is a listed name and whose image is
already preprocessed, so a queued job repeats itself after a restart; `submit.prepare` then checks
them against the job's model. The A1111 face takes the sd-webui-controlnet extension's unit fields
(as `webuiapi.ControlNetUnit.to_dict()` sends them) and refuses with 422 what would change the image
and that we lack: a module that needs weights, a unit mask, a down-sampling tile_resample.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from openldm.checkpoints.hashing import SHORT
from openldm.pipelines.control import ControlUnit
from openldm.pipelines.preprocessors import Thresholds, preprocess
from openldm.server.config import ServerLimits
from openldm.server.models import MODEL_SUFFIXES, FileFacts, UnknownModel
from openldm.server.submit import Refused, decode_image

# The extension's module names -> ours (tile_resample only at rate 1, where it passes the image through).
MODULES = {"none": "none", "canny": "canny", "invert": "invert",
           "invert (from white bg & black line)": "invert", "blur_gaussian": "tile_blur",
           "tile_blur": "tile_blur", "tile_resample": "none"}
CONTROL_MODES = {"balanced": "balanced", "my prompt is more important": "prompt",
                 "controlnet is more important": "control", "0": "balanced", "1": "prompt", "2": "control"}
RESIZE_MODES = {"just resize": "resize", "crop and resize": "crop", "resize and fill": "fill",
                "inner fit (scale to fit)": "crop", "envelope (outer fit)": "fill",
                "0": "resize", "1": "crop", "2": "fill"}
_TITLE = re.compile(r"^(.*) \[[0-9a-fA-F]+\]$")


@dataclass(frozen=True)
class ControlNetEntry:
    name: str  # what units name (the file's stem, or the folder's name)
    path: Path
    filename: str  # relative to the ControlNet folder
    sha256: str
    family: str | None  # sd1, sd2 or sdxl from a safetensors header; None when not told cheaply

    @property
    def title(self) -> str:
        """The extension's "name [hash]" form, as /controlnet/model_list gives it."""
        return f"{self.name} [{self.sha256[:SHORT]}]"


class ControlNetCatalog:
    """The ControlNets in one folder, scanned when asked; hashes cached by (path, size, mtime)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._facts = FileFacts(_family)
        self.entries: dict[str, ControlNetEntry] = {}
        self.refresh()

    def refresh(self) -> None:
        found: dict[str, ControlNetEntry] = {}
        if self.folder is not None and self.folder.is_dir():
            for path in sorted(self.folder.rglob("*")):
                if _is_controlnet(path) and not any(_is_controlnet(p) for p in path.parents):
                    found.setdefault(path.stem if path.is_file() else path.name, self._entry(path))
        self.entries = found

    def _entry(self, path: Path) -> ControlNetEntry:
        name = path.stem if path.is_file() else path.name
        return ControlNetEntry(name, path, path.relative_to(self.folder).as_posix(), *self._facts(path))

    def get(self, name: str) -> ControlNetEntry:
        """The entry for a name, a filename or a "name [hash]" title; `UnknownModel` otherwise."""
        title = _TITLE.match(name)  # "name [hash]": the hash may be another tool's, so the name decides
        for attempt in dict.fromkeys((name, title.group(1) if title else name)):
            if attempt in self.entries:
                return self.entries[attempt]
            for entry in self.entries.values():
                if attempt in (entry.title, entry.filename):
                    return entry
        raise UnknownModel(f"no ControlNet {name!r} in the server's ControlNet folder; "
                           "GET /controlnet/model_list lists them")

    def resolve(self, name: str, status: int, where: str) -> ControlNetEntry:
        """`get`, looking again once (a file added since the last scan), refused with `status` if absent."""
        try:
            return self.get(name)
        except UnknownModel:
            self.refresh()
        try:
            return self.get(name)
        except UnknownModel as e:
            raise Refused(status, str(e), where) from None


def _is_controlnet(path: Path) -> bool:
    if path.is_file():
        return path.suffix in MODEL_SUFFIXES
    return (path / "config.json").is_file() and any(path.glob("diffusion_pytorch_model*.safetensors"))


def _family(path: Path) -> str | None:
    """The family an original-layout safetensors header shows (no tensor is read)."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    from openldm.checkpoints.controlnet import PREFIX, infer_config

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k.removeprefix(PREFIX): tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        return infer_config(shapes).family
    except Exception:  # not told by the header: the load says why, if a job names it
        return None


# --- the native API's units --------------------------------------------------------------------


class ControlThresholds(BaseModel):
    model_config = ConfigDict(extra="forbid")
    low: int = Field(100, description="canny's low hysteresis threshold")
    high: int = Field(200, description="canny's high hysteresis threshold")
    sigma: float = Field(5.0, description="tile_blur's Gaussian sigma")


class ControlRequest(BaseModel):
    """One ControlNet unit of a `/v1/jobs` request."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="a name from GET /v1/controlnets")
    image: str = Field(description="the control image file, base64 (ready, or made by `preprocessor`)")
    preprocessor: str = Field("none", description="none, canny, invert or tile_blur")
    weight: float = 1.0
    start: float = Field(0.0, description="fraction of the schedule where it starts acting")
    end: float = Field(1.0, description="... and where it stops")
    resize_mode: str = Field("resize", description="resize, crop or fill, as img2img's")
    control_mode: str = Field("balanced", description="balanced, prompt or control (more important)")
    guess_mode: bool = False
    thresholds: ControlThresholds = Field(default_factory=ControlThresholds)


def native_units(requests: list[ControlRequest], catalog: ControlNetCatalog,
                 limits: ServerLimits) -> tuple[ControlUnit, ...]:
    """The `controls` of a native job; an unknown ControlNet is a 404, as an unknown model is."""
    _check_count(len(requests), limits, "controls")
    units = []
    for i, r in enumerate(requests):
        where = f"controls.{i}"
        entry = catalog.resolve(r.model, 404, f"{where}.model")
        image = decode_image(r.image, "image", limits)
        t = r.thresholds
        units.append(_unit(where, entry.name, image, r.preprocessor, Thresholds(t.low, t.high, t.sigma),
                           weight=r.weight, start=r.start, end=r.end, resize_mode=r.resize_mode,
                           mode=r.control_mode, guess=r.guess_mode))
    return tuple(units)


def _check_count(count: int, limits: ServerLimits, where: str) -> None:
    """Before any image is decoded: each unit costs a ControlNet call per model call."""
    if count > limits.max_controls:
        raise Refused(422, f"{count} ControlNet units is over max_controls={limits.max_controls}", where)


def _unit(where: str, model: str, image: Image.Image, preprocessor: str, thresholds: Thresholds,
          **settings: Any) -> ControlUnit:
    """The unit with its image preprocessed; a bad setting or preprocessor is one 422 line naming it."""
    try:
        made = preprocess(preprocessor, image, thresholds)
        return ControlUnit(model, made, preprocessor=preprocessor, **settings)
    except ValueError as e:
        raise Refused(422, f"{where}: {e}", where) from None


def unit_json(unit: ControlUnit, image: str) -> dict[str, Any]:
    """A queued unit as the job record keeps it; `image` names its control image under inputs/."""
    fields = {f.name: getattr(unit, f.name) for f in dataclasses.fields(unit)}
    return fields | {"image": image}


def unit_from_json(data: dict[str, Any], model: Path, image: Image.Image) -> ControlUnit:
    """A recorded unit again, its ControlNet name resolved to the file the worker loads."""
    return ControlUnit(**(data | {"model": model, "image": image}))


# --- the A1111 ControlNet extension's units ------------------------------------------------------


def a1111_units(args: list[Any], init_image: Image.Image | None, catalog: ControlNetCatalog,
                limits: ServerLimits) -> tuple[ControlUnit, ...]:
    """`alwayson_scripts.controlnet.args`: the enabled units, each refused (422) by the field it breaks."""
    _check_count(sum(isinstance(a, dict) and a.get("enabled", True) is not False for a in args), limits,
                 "alwayson_scripts.controlnet.args")
    units = []
    for i, arg in enumerate(args):
        where = f"alwayson_scripts.controlnet.args.{i}"
        if not isinstance(arg, dict):
            raise Refused(422, f"{where} must be a ControlNet unit object", where)
        if arg.get("enabled", True) is False:
            continue
        units.append(_a1111_unit(arg, where, init_image, catalog, limits))
    return tuple(units)


def _a1111_unit(arg: dict[str, Any], where: str, init_image: Image.Image | None,
                catalog: ControlNetCatalog, limits: ServerLimits) -> ControlUnit:
    module = str(arg.get("module") or "none").lower()
    if module not in MODULES:
        raise Refused(422, f"{where}.module {arg.get('module')!r} is not supported by openldm; "
                      "GET /controlnet/module_list", f"{where}.module")
    rate = arg.get("threshold_a", 1.0)
    if module == "tile_resample" and rate not in (None, -1) and float(rate) > 1:
        raise Refused(422, f"{where}: tile_resample with a down-sampling rate {rate} > 1 is not supported "
                      "(use blur_gaussian, or a ready image with module none)", f"{where}.threshold_a")
    if arg.get("hr_option", "Both") not in (None, "Both"):
        raise Refused(422, f"{where}.hr_option {arg['hr_option']!r}: openldm's units act in both hires "
                      "passes (Both)", f"{where}.hr_option")
    if arg.get("mask") not in (None, ""):
        raise Refused(422, f"{where}.mask: ControlNet unit masks are not supported by openldm",
                      f"{where}.mask")
    if str(arg.get("model") or "None") in ("None", "none"):
        raise Refused(422, f"{where}.model: an enabled unit needs a model; GET /controlnet/model_list",
                      f"{where}.model")
    entry = catalog.resolve(str(arg["model"]), 422, f"{where}.model")
    image = _a1111_image(arg, where, init_image, limits)
    mode = CONTROL_MODES.get(str(arg.get("control_mode", "Balanced")).lower())
    resize = RESIZE_MODES.get(str(arg.get("resize_mode", "Crop and Resize")).lower())
    for name, value in (("control_mode", mode), ("resize_mode", resize)):
        if value is None:
            raise Refused(422, f"{where}.{name} {arg.get(name)!r} is not one the extension has",
                          f"{where}.{name}")
    return _unit(where, entry.name, image, MODULES[module], _a1111_thresholds(MODULES[module], arg),
                 weight=float(arg.get("weight", 1.0)), start=float(arg.get("guidance_start", 0.0)),
                 end=float(arg.get("guidance_end", 1.0)), resize_mode=resize, mode=mode,
                 guess=bool(arg.get("guessmode") or False))


def _a1111_image(arg: dict[str, Any], where: str, init_image: Image.Image | None,
                 limits: ServerLimits) -> Image.Image:
    """`image` or `input_image` (a base64 string, or the extension's {"image": ...}); img2img's own
    image when a unit has none, as the extension does."""
    data = arg.get("image") or arg.get("input_image")
    if isinstance(data, dict):
        data = data.get("image")
    if not data:
        if init_image is None:
            raise Refused(422, f"{where}.image: a txt2img ControlNet unit needs an image", f"{where}.image")
        return init_image
    return decode_image(data, "image", limits)


def _a1111_thresholds(module: str, arg: dict[str, Any]) -> Thresholds:
    """threshold_a/b are canny's low/high and blur_gaussian's sigma (a/b: the extension's sliders)."""
    a, b = arg.get("threshold_a"), arg.get("threshold_b")
    given = [v for v in (a, b) if v not in (None, -1)]
    if module == "canny" and len(given) == 2:
        return Thresholds(low=round(float(a)), high=round(float(b)))
    if module == "tile_blur" and a not in (None, -1):
        return Thresholds(sigma=float(a))
    return Thresholds()


def module_list() -> list[str]:
    return sorted(MODULES)
