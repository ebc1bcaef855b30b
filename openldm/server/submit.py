"""One path from a request to a queued job, for both APIs: validate, bound, decode the uploads, queue.

Settings go through `GenerationParams.from_json` and `check_inputs`, the rules a local run uses;
the server adds its own bounds (`ServerLimits`). Every refusal is a `Refused` with an HTTP status and
a one-line message that names the field or the limit.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from openldm.atomic import write_bytes_atomic
from openldm.pipelines.control import ControlUnit
from openldm.pipelines.params import GenerationParams, hires_size
from openldm.pipelines.render import check_inputs
from openldm.pipelines.x4 import X4Settings, X4Tiling
from openldm.server.config import ServerConfig, ServerLimits
from openldm.server.jobs import Job, JobStore, QueueFull, new_job_id
from openldm.server.models import ModelCatalog, ModelEntry, UnknownModel

if TYPE_CHECKING:
    from openldm.server.controls import ControlNetCatalog

CONTROL_FAMILIES = ("sd1", "sd2", "sdxl")  # the base models ControlNets exist for


class Refused(Exception):
    """A request the server will not queue: `status` is the HTTP code, the message one line."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.field = status, field


@dataclass(frozen=True)
class Submission:
    """A request that passed every check: what `JobStore.submit` records."""

    source: str
    mode: str
    params: GenerationParams  # with concrete seeds, so a job run again after a crash repeats itself
    model: ModelEntry
    hires: bool = False
    images: dict[str, Image.Image] = dataclasses.field(default_factory=dict)
    controls: tuple[ControlUnit, ...] = ()  # each `model` a ControlNet name, each image preprocessed
    x4: X4Settings | None = None  # an x4-upscaler model's noise level and tiles


def read_params(data: Any) -> GenerationParams:
    if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
        raise Refused(422, '"params" must be an object with at least a "prompt" string', "params")
    try:
        return GenerationParams.from_json(data)
    except (ValueError, TypeError) as e:
        raise Refused(422, str(e), _field_of(str(e))) from None


def _field_of(message: str) -> str | None:
    """The setting a `GenerationParams`, `Limits` or `check_inputs` message names: "setting 'steps' must
    be int ...", "steps 501 is over the limit of 500", "batch_size x batch_count 72 is over ...", "width 30:
    sizes must be ..."."""
    if message.startswith("setting '"):
        return message.split("'")[1]
    if message.startswith("batch_size x batch_count"):
        return "batch_count"
    if message.startswith("size "):  # width x height over a bound
        return "width"
    first = message.split(" ", 1)[0].rstrip(":")
    return first if first in {f.name for f in dataclasses.fields(GenerationParams)} else None


def decode_image(data: Any, name: str, limits: ServerLimits) -> Image.Image:
    """A base64 image (a data: URL too), refused before decoding if its header says it is too big."""
    if not isinstance(data, str):
        raise Refused(422, f'"{name}" must be the image file\'s bytes in base64', name)
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if len(data) > limits.max_upload_bytes * 4 // 3 + 4:
        raise Refused(413, f"{name} is over max_upload_bytes={limits.max_upload_bytes:,}", name)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise Refused(422, f'"{name}" must be the image file\'s bytes in base64', name) from None
    try:
        image = Image.open(io.BytesIO(raw))  # reads the header only
        pixels = image.width * image.height
        if pixels > limits.max_upload_pixels:
            raise Refused(413, f"{name} of {image.width}x{image.height} is over max_upload_pixels="
                          f"{limits.max_upload_pixels:,}", name)
        return image.convert("L" if name == "mask" else "RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise Refused(422, f"{name} is not a readable image ({e})", name) from None


def check_limits(mode: str, params: GenerationParams, hires: bool, images: dict[str, Image.Image],
                 limits: ServerLimits, x4: bool = False) -> None:
    """The server's own bounds, each refusal naming the limit it broke (`x4`: the output is 4x the input)."""
    image = images.get("image")
    width = params.width or (image.width if image is not None else 0)
    height = params.height or (image.height if image is not None else 0)
    scale = 1.0
    if x4:
        scale = 4.0
    elif (hires or mode == "upscale" or params.hires) and width and height:
        scale = hires_size(width, height, params).width / width  # the enlarged size, before a crop
    try:
        limits.generation().check(params)  # the rules a local run applies, at the server's bounds
    except ValueError as e:
        raise Refused(422, str(e), _field_of(str(e))) from None
    checks = [  # what `Limits` cannot see from the settings alone: an input image's size, the hires scale
        ("width", width * height * scale * scale <= limits.max_pixels,
         f"{width}x{height} (x{scale:g}) is over max_pixels={limits.max_pixels:,}"),
    ]
    for field, ok, message in checks:
        if not ok:
            raise Refused(422, message, field)


def check_memory_budget(submission: Submission, config: ServerConfig) -> None:
    """Refuse (422, `memory`) a job whose estimated peak (`openldm.memory`, the estimate a local run
    checks) is over the budget, on the first worker's device and in its dtype; the model's config comes
    from its header. A model whose config that cannot tell (a .ckpt) is checked by the worker."""
    model = submission.model.config
    if model is None or submission.x4 is not None:  # x4 runs are tiled and checked by the worker
        return
    from openldm.memory import MemoryLimitError
    from openldm.pipelines.render import check_run_memory, device_and_dtype

    try:
        device, dtype = device_and_dtype(config.device_for(0), config.dtype)
        check_run_memory(model, submission.mode, submission.params, submission.images.get("image"),
                         submission.hires, dtype=dtype, device=device, budget=config.limits.memory_budget)
    except MemoryLimitError as e:
        raise Refused(422, f"memory: {e}", "memory") from None


def check_networks(params: GenerationParams, config: ServerConfig) -> None:
    """LoRA tags name files inside the configured folders only (a path is just an unknown name: 404)."""
    from openldm.networks.library import NETWORK_SUFFIXES, find_files, network_refs

    refs = network_refs(params.prompt, params.negative)
    if not refs:
        return
    files = find_files(config.lora_dirs, NETWORK_SUFFIXES, "LoRA") if config.lora_dirs else {}
    missing = [ref.name for ref in refs if ref.name not in files]
    if missing:
        raise Refused(404, f"no LoRA named {missing[0]!r} in the server's LoRA folders", "prompt")


def check_x4(entry: ModelEntry, mode: str, hires: bool, x4: X4Settings | None) -> X4Settings | None:
    """An x4-upscaler model only upscales; its noise level must be one its schedule has."""
    if entry.family != "x4":
        if x4 is not None:
            raise Refused(422, f"noise_level and tiles are for an x4-upscaler model, not {entry.name}",
                          "noise_level")
        return None
    if mode != "upscale" or hires:
        raise Refused(422, f"model {entry.name} is an x4 upscaler: it only runs upscale jobs", "model")
    x4 = x4 or X4Settings()
    top = entry.config.low_res.max_noise_level
    if not 0 <= x4.noise_level <= top:
        raise Refused(422, f"noise_level must be in [0, {top}] for {entry.name}, got {x4.noise_level}",
                      "noise_level")
    return x4


def x4_settings(noise_level: int | None, tile: int | None, overlap: int | None) -> X4Settings | None:
    """A request's x4 fields as `X4Settings` (None when it gives none of them)."""
    if noise_level is None and tile is None and overlap is None:
        return None
    try:
        tiling = X4Tiling(tile, X4Tiling.overlap if overlap is None else overlap)
    except ValueError as e:
        raise Refused(422, str(e), "tile") from None
    return X4Settings(X4Settings.noise_level if noise_level is None else noise_level, tiling)


def check_controls(units: tuple[ControlUnit, ...], entry: ModelEntry, controlnets: ControlNetCatalog) -> None:
    """Units steer a model of their own family; the names were resolved by the API that read them."""
    if units and entry.family not in (*CONTROL_FAMILIES, None):
        raise Refused(422, f"model {entry.name} ({entry.family}) takes no ControlNet units", "controls")
    for i, unit in enumerate(units):
        family = controlnets.get(str(unit.model)).family
        if None not in (family, entry.family) and family != entry.family:
            raise Refused(422, f"ControlNet {unit.model} is for {family} models, not {entry.name} "
                          f"({entry.family})", f"controls.{i}.model")


def prepare(source: str, mode: str, params: GenerationParams, model: str | None, hires: bool,
            images: dict[str, Image.Image], catalog: ModelCatalog, config: ServerConfig, *,
            controls: tuple[ControlUnit, ...] = (), controlnets: ControlNetCatalog | None = None,
            x4: X4Settings | None = None) -> Submission:
    """Every check a request passes before it is queued, in the order that costs least first."""
    try:
        entry = catalog.get(model)
    except UnknownModel as e:
        raise Refused(404, str(e), "model") from None
    x4 = check_x4(entry, mode, hires, x4)
    if controls:
        check_controls(controls, entry, controlnets)
    check_limits(mode, params, hires, images, config.limits, x4=x4 is not None)
    check_networks(params, config)
    try:
        check_inputs(mode, params, images.get("image"), images.get("mask"))
    except ValueError as e:
        message = str(e).splitlines()[0]
        raise Refused(422, message, _field_of(message)) from None
    submission = Submission(source, mode, params.with_seed(), entry, hires, images, controls, x4)
    check_memory_budget(submission, config)
    return submission


def enqueue(submission: Submission, store: JobStore, config: ServerConfig) -> tuple[Job, int]:
    """Write the inputs, then the job row: a worker never sees a job whose files are missing."""
    job_id = new_job_id()
    images = submission.images | {f"control-{i}": u.image for i, u in enumerate(submission.controls)}
    inputs = {}
    for name, image in images.items():
        out = io.BytesIO()
        image.save(out, format="PNG")
        write_bytes_atomic(config.inputs / f"{job_id}-{name}.png", out.getvalue())
        inputs[name] = f"{job_id}-{name}.png"
    try:
        return store.submit(submission.source, submission.mode, submission.params.to_json(),
                            model=submission.model.name, hires=submission.hires, inputs=inputs,
                            max_queue=config.limits.max_queue, job_id=job_id, extras=_extras(submission))
    except QueueFull as e:
        for file in inputs.values():
            (config.inputs / file).unlink(missing_ok=True)
        raise Refused(429, str(e)) from None


def _extras(submission: Submission) -> dict[str, Any]:
    """The job record's `extras`: the ControlNet units (images by input name) and the x4 settings."""
    from openldm.server.controls import unit_json

    extras: dict[str, Any] = {}
    if submission.controls:
        extras["controls"] = [unit_json(u, f"control-{i}") for i, u in enumerate(submission.controls)]
    if submission.x4 is not None:
        x4 = submission.x4
        extras["x4"] = {"noise_level": x4.noise_level, "tile": x4.tiling.tile,
                        "tile_overlap": x4.tiling.overlap}
    return extras
