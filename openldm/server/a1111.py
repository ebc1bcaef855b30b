"""The AUTOMATIC1111 face (`/sdapi/v1`): A1111's request bodies, mapped onto the same job queue.

Clients send every field, so every field is accepted. A field at a value that changes nothing is
ignored; a field that would change the image and that we do not implement is refused with 422 and
a message naming it (`UNSUPPORTED` and `_check_unsupported` are the whole list).
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict

from openldm.pipelines.params import (
    MASKED_CONTENT,
    RESIZE_MODES,
    UPSCALER_NAMES,
    GenerationParams,
    upscaler_key,
)
from openldm.server.controls import a1111_units, module_list
from openldm.server.jobs import FINISHED, Job
from openldm.server.state import ServerState
from openldm.server.submit import Refused, Submission, decode_image, enqueue, prepare, read_params

# Fields that change the image when not at these values, and that we do not implement.
UNSUPPORTED = {
    "restore_faces": (False, None), "tiling": (False, None), "script_name": (None, ""),
    "styles": ([], None), "seed_resize_from_h": (0, -1, None), "seed_resize_from_w": (0, -1, None),
    "s_churn": (0, 0.0, None), "s_tmin": (0, 0.0, None), "s_tmax": (0, 0.0, None, float("inf")),
    "firstphase_width": (0, None), "firstphase_height": (0, None), "hr_checkpoint_name": (None, ""),
    "hr_scheduler": (None, "", "Automatic", "automatic"), "initial_noise_multiplier": (1, 1.0, None),
    "include_init_images": (False, None), "refiner_checkpoint": (None, ""),
}
OVERRIDES = {"sd_model_checkpoint", "CLIP_stop_at_last_layers", "sd_vae"}
CONTROLNET_SCRIPT = "controlnet"  # the sd-webui-controlnet extension's script, matched case-insensitively


class A1111Request(BaseModel):
    """Any A1111 txt2img / img2img body; the fields we read are typed, the rest are kept and checked."""

    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    eta: float | None = None
    s_noise: float | None = None
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = None
    alwayson_scripts: dict[str, Any] | None = None
    # txt2img: the hires fix
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_sampler_name: str | None = None
    hr_cfg: float | None = None
    # img2img
    init_images: list[str] | None = None
    mask: str | None = None
    resize_mode: int = 0
    mask_blur: float | None = None
    inpainting_fill: int = 0
    inpaint_full_res: bool | int = True
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: int = 0


def _check_unsupported(request: A1111Request) -> None:
    extra = request.model_extra or {}
    for name, neutral in UNSUPPORTED.items():
        if name in extra and extra[name] not in neutral:
            raise Refused(422, f"{name}={extra[name]!r} is not supported by openldm (it would change the "
                          "image); leave it at its default", name)
    for name in (request.override_settings or {}):
        if name not in OVERRIDES:
            raise Refused(422, f"override_settings.{name} is not supported by openldm",
                          f"override_settings.{name}")
    active = [name for name, script in (request.alwayson_scripts or {}).items()
              if _script_on(script) and name.lower() != CONTROLNET_SCRIPT]
    if active:
        raise Refused(422, f"alwayson_scripts {', '.join(active)}: openldm has no such extension",
                      "alwayson_scripts")


def _control_args(request: A1111Request) -> list[Any]:
    """The ControlNet extension's units (webuiapi sends the script as "ControlNet")."""
    scripts = request.alwayson_scripts or {}
    script = next((v for k, v in scripts.items() if k.lower() == CONTROLNET_SCRIPT), None)
    if script is None or not _script_on(script):
        return []
    args = script.get("args", []) if isinstance(script, dict) else script
    if not isinstance(args, list):
        raise Refused(422, "alwayson_scripts.controlnet.args must be a list of units",
                      "alwayson_scripts.controlnet.args")
    return args


def _script_on(script: Any) -> bool:
    """A1111 clients send disabled extensions as {"args": []} or {"args": [False, ...]}."""
    args = script.get("args", []) if isinstance(script, dict) else script
    return bool(args) and args[0] is not False


def _settings(request: A1111Request, img2img: bool) -> tuple[dict[str, Any], bool]:
    """(GenerationParams fields, hires) for a request."""
    sampler = request.sampler_name or request.sampler_index or "Euler"
    scheduler = None if request.scheduler in (None, "", "automatic", "Automatic") else request.scheduler
    clip_skip = (request.override_settings or {}).get("CLIP_stop_at_last_layers")
    values: dict[str, Any] = {
        "prompt": request.prompt, "negative": request.negative_prompt, "seed": request.seed,
        "subseed": request.subseed, "subseed_strength": request.subseed_strength, "sampler": sampler,
        "schedule": scheduler, "batch_size": request.batch_size, "batch_count": request.n_iter,
        "steps": request.steps, "cfg": request.cfg_scale, "width": request.width, "height": request.height,
        "clip_skip": clip_skip if clip_skip not in (None, 1) else None,
        "eta": None if request.eta in (None, 1, 1.0) else request.eta,  # 1: A1111's ancestral default
        "s_noise": None if request.s_noise in (None, 1, 1.0) else request.s_noise,
    }
    hires = not img2img and request.enable_hr
    if img2img:
        values |= _img2img_settings(request)
    elif hires:
        values |= _hires_settings(request)
    return values, hires


def _img2img_settings(request: A1111Request) -> dict[str, Any]:
    if request.resize_mode not in range(len(RESIZE_MODES)):
        raise Refused(422, f"resize_mode {request.resize_mode} is not supported (0, 1 or 2)", "resize_mode")
    if request.inpainting_fill not in range(len(MASKED_CONTENT)):
        raise Refused(422, f"inpainting_fill must be 0-3, not {request.inpainting_fill}", "inpainting_fill")
    values = {"strength": 0.75 if request.denoising_strength is None else request.denoising_strength,
              "resize_mode": RESIZE_MODES[request.resize_mode]}
    if request.mask is not None:
        values |= {"masked_content": MASKED_CONTENT[request.inpainting_fill],
                   "only_masked": bool(request.inpaint_full_res),
                   "only_masked_padding": request.inpaint_full_res_padding,
                   "invert_mask": bool(request.inpainting_mask_invert)}
        if request.mask_blur is not None:
            values["mask_blur"] = float(request.mask_blur)
    return values


def _hires_settings(request: A1111Request) -> dict[str, Any]:
    """A1111's hires fields as our settings: the one mapping; sizes and passes follow `upscale`."""
    try:
        upscaler = upscaler_key(request.hr_upscaler or "Latent")
    except ValueError:
        raise Refused(422, f"hr_upscaler {request.hr_upscaler!r} is not supported; GET /sdapi/v1/upscalers "
                      "and /sdapi/v1/latent-upscale-modes", "hr_upscaler") from None
    same_sampler = request.hr_sampler_name in (None, "", "Use same sampler")
    return {"hires": True, "upscale_by": request.hr_scale, "upscaler": upscaler,
            "hires_width": request.hr_resize_x, "hires_height": request.hr_resize_y,
            "hires_steps": request.hr_second_pass_steps or None,
            "hires_strength": 0.7 if request.denoising_strength is None else request.denoising_strength,
            "hires_prompt": request.hr_prompt, "hires_negative": request.hr_negative_prompt,
            "hires_sampler": None if same_sampler else request.hr_sampler_name, "hires_cfg": request.hr_cfg}


def submit(state: ServerState, request: A1111Request, img2img: bool) -> Job:
    _check_unsupported(request)
    values, hires = _settings(request, img2img)
    params = read_params(values)
    images: dict[str, Any] = {}
    mode = "txt2img"
    if img2img:
        if not request.init_images or len(request.init_images) != 1:
            raise Refused(422, "init_images must hold exactly one image", "init_images")
        images["image"] = decode_image(request.init_images[0], "image", state.config.limits)
        mode = "img2img"
        if request.mask is not None:
            images["mask"] = decode_image(request.mask, "mask", state.config.limits)
            mode = "inpaint"
    controls = a1111_units(_control_args(request), images.get("image"), state.controlnets,
                           state.config.limits)
    model = (request.override_settings or {}).get("sd_model_checkpoint") or state.default_model()
    submission: Submission = prepare("a1111", mode, params, state.model(model).name, hires, images,
                                     state.catalog, state.config, controls=controls,
                                     controlnets=state.controlnets)
    job, _ = enqueue(submission, state.store, state.config)
    return job


async def wait(state: ServerState, job: Job) -> Job:
    """Wait without holding a thread (many A1111 callers may wait at once), woken by the store's changes."""
    seen, store = state.store.changes.version, state.store
    while job.state not in FINISHED:
        seen = await state.next_change(seen)
        glance = store.glance(job.id)  # a step changes nothing it reads: decode the row only when done
        if glance is None or glance[0] in FINISHED:
            job = store.get(job.id)
    return job


async def run(state: ServerState, request: A1111Request, img2img: bool) -> dict[str, Any]:
    job = await run_in_threadpool(submit, state, request, img2img)  # decodes images: off the event loop
    job = await wait(state, job)
    return await run_in_threadpool(response, state, job, request)


def response(state: ServerState, job: Job, request: A1111Request) -> dict[str, Any]:
    """A1111's reply: raw base64 PNGs, the request echoed, and `info` as a JSON string."""
    if job.state == "failed":
        raise Refused(500, job.error or "the job failed")
    pngs = [(state.config.outputs / o["name"]).read_bytes() for o in job.outputs]
    return {"images": [base64.b64encode(p).decode("ascii") for p in pngs],
            "parameters": request.model_dump(), "info": json.dumps(_info(state, job, pngs))}


def _info(state: ServerState, job: Job, pngs: list[bytes]) -> dict[str, Any]:
    from openldm.diffusion.registry import resolve

    p = GenerationParams.from_json(job.params)
    seeds = [o["seed"] for o in job.outputs]
    count = p.batch_size * p.batch_count
    entry = state.model(job.model)
    infotexts = [state.png_info(base64.b64encode(png).decode("ascii"))["info"] for png in pngs]
    return {
        "prompt": p.prompt, "all_prompts": [p.prompt] * len(seeds), "negative_prompt": p.negative,
        "all_negative_prompts": [p.negative] * len(seeds), "seed": p.seed, "all_seeds": seeds,
        "subseed": p.subseed, "all_subseeds": [(p.subseed + i) % 2**64 for i in range(len(seeds))],
        "subseed_strength": p.subseed_strength, "width": p.width, "height": p.height,
        "sampler_name": resolve(p.sampler, p.schedule)[0].display, "cfg_scale": p.cfg, "steps": p.steps,
        "batch_size": p.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": entry.name, "sd_model_hash": entry.hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength":
            p.strength if job.mode != "txt2img" else (p.hires_strength if job.hires else None),
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
        "clip_skip": p.clip_skip or 1,
        "is_using_inpainting_conditioning": False, "version": "openldm", "interrupted": len(seeds) < count,
        "job_id": job.id,
    }


def _progress(state: ServerState) -> dict[str, Any]:
    running = state.store.running()
    counts = state.store.counts()
    job = running[0] if running else None
    progress = job.step / job.total if job is not None and job.total else 0.0
    preview = state.store.preview(job.id) if job is not None else None
    return {
        "progress": progress, "eta_relative": (job.eta or 0.0) if job is not None else 0.0,
        "state": {"skipped": bool(job and job.skip), "interrupted": bool(job and job.cancel),
                  "job": job.id if job else "",
                  "job_count": counts["queued"] + counts["running"], "job_timestamp": "0",
                  "job_no": 0, "sampling_step": job.step if job else 0,
                  "sampling_steps": job.total if job else 0},
        "current_image": base64.b64encode(preview).decode("ascii") if preview else None,
        "textinfo": None,
    }


def router(state: ServerState) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1", tags=["a1111"])

    @api.post("/txt2img")
    async def txt2img(request: A1111Request) -> dict[str, Any]:
        return await run(state, request, img2img=False)

    @api.post("/img2img")
    async def img2img(request: A1111Request) -> dict[str, Any]:
        return await run(state, request, img2img=True)

    @api.get("/progress")
    def progress() -> dict[str, Any]:
        return _progress(state)

    @api.post("/interrupt")
    def interrupt() -> dict[str, Any]:
        """Stops the running generations; each returns early with the images finished so far."""
        for job in state.store.running():
            state.store.cancel(job.id)
        return {}

    @api.post("/skip")
    def skip() -> dict[str, Any]:
        """Ends the batch each running generation is on (its images are dropped); the next one starts."""
        for job in state.store.running():
            state.store.skip(job.id)
        return {}

    _add_listings(api, state)
    return api


def controlnet_router(state: ServerState) -> APIRouter:
    """The ControlNet extension's discovery routes, at its own prefix (`/controlnet`)."""
    api = APIRouter(prefix="/controlnet", tags=["a1111"])

    @api.get("/version")
    def version() -> dict[str, int]:
        return {"version": 2}

    @api.get("/model_list")
    def model_list() -> dict[str, list[str]]:
        state.controlnets.refresh()
        return {"model_list": [e.title for e in state.controlnets.entries.values()]}

    @api.get("/module_list")
    def modules() -> dict[str, Any]:
        return {"module_list": module_list(), "module_detail": {}}

    return api


def _add_listings(api: APIRouter, state: ServerState) -> None:
    from openldm.diffusion.registry import SAMPLERS, SCHEDULE_DISPLAY

    @api.get("/samplers")
    def samplers() -> list[dict[str, Any]]:
        return [{"name": s.display, "aliases": [s.name, *s.aliases], "options": {}}
                for s in SAMPLERS.values()]

    @api.get("/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        automatic = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                      "need_inner_model": False}]
        return automatic + [{"name": n, "label": d, "aliases": None, "default_rho": -1,
                             "need_inner_model": False} for n, d in SCHEDULE_DISPLAY.items()]

    @api.get("/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        return [{"title": e.title, "model_name": e.name, "hash": e.hash, "sha256": e.sha256,
                 "filename": e.filename, "config": None} for e in state.catalog.entries.values()]

    @api.get("/options")
    def get_options() -> dict[str, Any]:
        entry = state.model(None)
        return {"sd_model_checkpoint": entry.title, "sd_checkpoint_hash": entry.sha256,
                "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic", "samples_format": "png"}

    @api.post("/options")
    def set_options(options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - {"sd_model_checkpoint", "sd_vae", "samples_format"})
        if unknown:
            raise Refused(422, f"options {', '.join(unknown)} are not supported by openldm", unknown[0])
        if "sd_model_checkpoint" in options:
            state.set_default_model(str(options["sd_model_checkpoint"]))

    @api.post("/png-info")
    def png_info(body: dict[str, Any]) -> dict[str, Any]:
        found = state.png_info(body.get("image"))
        return {"info": found["info"], "items": found["items"], "parameters": found["params"] or {}}

    @api.post("/refresh-checkpoints")
    def refresh_checkpoints() -> None:
        state.catalog.refresh()

    @api.post("/refresh-loras")
    def refresh_loras() -> None:
        return None

    @api.get("/loras")
    def loras() -> list[dict[str, Any]]:
        from openldm.networks.library import NETWORK_SUFFIXES, find_files

        files = find_files(state.config.lora_dirs, NETWORK_SUFFIXES, "LoRA")
        return [{"name": n, "alias": n, "path": p.name, "metadata": {}} for n, p in files.items()]

    @api.get("/embeddings")
    def embeddings() -> dict[str, Any]:
        from openldm.networks.library import EMBEDDING_SUFFIXES, find_files

        files = find_files(state.config.embedding_dirs, EMBEDDING_SUFFIXES, "embedding")
        return {"loaded": {n: {"filename": p.name} for n, p in files.items()}, "skipped": {}}

    @api.get("/sd-vae")
    def sd_vae() -> list[dict[str, Any]]:
        return []

    @api.get("/upscalers")
    def upscalers() -> list[dict[str, Any]]:
        return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 2}
                for n in ("Latent", "Lanczos")]

    @api.get("/latent-upscale-modes")
    def latent_modes() -> list[dict[str, str]]:
        return [{"name": name} for key, name in UPSCALER_NAMES.items() if key.startswith("latent")]

    @api.get("/scripts")
    def scripts() -> dict[str, list[str]]:
        return {"txt2img": [], "img2img": []}
