"""The FastAPI app: the native `/v1` job API, the A1111 face, and the static page at `/`.

`create_app(config)` opens the job store, requeues what a crash left running, starts the worker
(a thread, or one process per device) and returns the app for uvicorn. docs/server.md lists the
endpoints with their JSON.
"""

from __future__ import annotations

import base64
import json
import multiprocessing
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from openldm.server import a1111, worker
from openldm.server.auth import auth_middleware
from openldm.server.config import ServerConfig
from openldm.server.controls import ControlNetCatalog, ControlRequest, native_units
from openldm.server.jobs import FINISHED, STATES, Job, JobStore
from openldm.server.models import ModelCatalog
from openldm.server.state import ServerState
from openldm.server.submit import Refused, decode_image, enqueue, prepare, read_params, x4_settings

STATIC = Path(__file__).parent / "static"
IMAGE_NAME = re.compile(r"^[0-9a-f]{32}-\d{4}\.png$")
# Step events (with their previews) at most this often per stream: a small model steps every 15 ms, and
# a stream sending each one held the worker's GIL long enough to slow the job itself by 15%.
STEP_EVENTS_EVERY = 0.1


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: str = Field("txt2img", description="txt2img, img2img, inpaint, outpaint or upscale")
    params: dict[str, Any] = Field(description="GenerationParams fields; `prompt` is required")
    model: str | None = Field(None, description="a name from GET /v1/models; None: the default model")
    image: str | None = Field(None, description="the input image file, base64")
    mask: str | None = Field(None, description="the mask file, base64 (inpaint)")
    hires: bool = Field(False, description="txt2img finished by the hires fix (upscale_by, hires_steps ...)")
    controls: list[ControlRequest] = Field([], description="ControlNet units, applied together")
    noise_level: int | None = Field(None, description="x4-upscaler models: the low-res noise level (20)")
    tile: int | None = Field(None, description="x4-upscaler models: tile side in input pixels (None: whole)")
    tile_overlap: int | None = Field(None, description="x4-upscaler models: tile overlap (16)")


class Submitted(BaseModel):
    id: str
    position: int
    state: str


class ImageRef(BaseModel):
    name: str
    url: str
    seed: int
    networks: str = ""  # what the prompt's LoRA tags merged
    warning: str = ""  # prompt words outside a narrow model's domain


class JobView(BaseModel):
    id: str
    source: str
    mode: str
    hires: bool
    model: str | None
    model_hash: str | None
    state: str
    position: int | None
    step: int
    total: int
    eta: float | None
    created: float
    started: float | None
    finished: float | None
    images: list[ImageRef]
    error: str | None
    worker: str | None
    params: dict[str, Any]
    extras: dict[str, Any]  # "controls": the ControlNet units; "x4": an x4 upscale's noise level, tiles


class JobPage(BaseModel):
    jobs: list[JobView]
    total: int
    offset: int
    limit: int


class TokensRequest(BaseModel):
    prompt: str
    model: str | None = None


class PngInfoRequest(BaseModel):
    image: str


def job_view(job: Job, store: JobStore) -> JobView:
    images = [ImageRef(name=o["name"], url=f"/v1/images/{o['name']}", seed=o["seed"],
                       networks=o.get("networks", ""), warning=o.get("warning", "")) for o in job.outputs]
    return JobView(id=job.id, source=job.source, mode=job.mode, hires=job.hires, model=job.model,
                   model_hash=job.model_hash, state=job.state, position=store.position(job), step=job.step,
                   total=job.total, eta=job.eta, created=job.created, started=job.started,
                   finished=job.finished, images=images, error=job.error, worker=job.worker,
                   params=job.params, extras=job.extras)


def _start_workers(config: ServerConfig, store: JobStore) -> list:
    if config.workers <= 1:
        return [worker.start_thread(config, store)]
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads
    processes = [context.Process(target=worker.process_main, args=(config, i), daemon=True,
                                 name=f"openldm-worker-{i}") for i in range(config.workers)]
    for process in processes:
        process.start()
    return processes


def _stop_workers(workers: list) -> None:
    for w in workers:
        if isinstance(w, worker.Worker):
            w.stop.set()
            w.thread.join(30)  # a running job stops at its next step
        else:
            w.terminate()
            w.join(10)


def create_app(config: ServerConfig, start_workers: bool = True) -> FastAPI:
    """The app over `config.data_dir`'s job store; jobs a crash left running are queued again first."""
    store = JobStore(config.database)
    requeued = store.recover()
    catalog = ModelCatalog(config.default_model, config.models_dir, config.controlnets)
    state = ServerState(config, store, catalog, ControlNetCatalog(config.controlnets), requeued,
                        live=start_workers and config.workers <= 1)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        workers = _start_workers(config, store) if start_workers else []
        yield
        _stop_workers(workers)

    app = FastAPI(title="openldm", version="1", lifespan=lifespan,
                  description="A job-queue Stable Diffusion server; see docs/server.md")
    app.state.server = state
    if config.auth or config.api_key:
        app.middleware("http")(auth_middleware(config.auth, config.api_key))
    _add_errors(app)
    _add_jobs(app, state)
    _add_catalog(app, state)
    if config.a1111:
        app.include_router(a1111.router(state))
        app.include_router(a1111.controlnet_router(state))
    app.mount("/", StaticFiles(directory=STATIC, html=True), name="static")
    return app


def _add_errors(app: FastAPI) -> None:
    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused):
        body = {"error": str(e)} | ({"field": e.field} if e.field else {})
        return JSONResponse(body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"error": f"{where}: {first.get('msg')}", "field": where}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)


def _job_or_404(state: ServerState, job_id: str) -> Job:
    job = state.store.get(job_id)
    if job is None:
        raise Refused(404, f"no job {job_id!r}")
    return job


def _add_jobs(app: FastAPI, state: ServerState) -> None:
    store, limits = state.store, state.config.limits

    @app.post("/v1/jobs", response_model=Submitted, summary="queue a job (FIFO)")
    def submit(request: JobRequest) -> Submitted:
        params = read_params(request.params)
        images = {name: decode_image(data, name, limits)
                  for name, data in (("image", request.image), ("mask", request.mask)) if data is not None}
        controls = native_units(request.controls, state.controlnets, limits)
        x4 = x4_settings(request.noise_level, request.tile, request.tile_overlap)
        submission = prepare("v1", request.mode, params, request.model or state.default_model(),
                             request.hires, images, state.catalog, state.config, controls=controls,
                             controlnets=state.controlnets, x4=x4)
        job, position = enqueue(submission, store, state.config)
        return Submitted(id=job.id, position=position, state=job.state)

    @app.get("/v1/jobs", response_model=JobPage, summary="jobs, newest first")
    def jobs(state_: str | None = Query(None, alias="state"), offset: int = Query(0, ge=0),
             limit: int = Query(50, ge=1, le=500)) -> JobPage:
        if state_ is not None and state_ not in STATES:
            raise Refused(422, f"state must be one of {', '.join(STATES)}", "state")
        found, total = store.list(state_, offset, limit)
        return JobPage(jobs=[job_view(j, store) for j in found], total=total, offset=offset, limit=limit)

    @app.get("/v1/jobs/{job_id}", response_model=JobView)
    def job(job_id: str) -> JobView:
        return job_view(_job_or_404(state, job_id), store)

    @app.delete("/v1/jobs/{job_id}", response_model=JobView, summary="cancel a queued or running job")
    def cancel(job_id: str) -> JobView:
        _job_or_404(state, job_id)
        return job_view(store.cancel(job_id), store)

    @app.get("/v1/jobs/{job_id}/preview", summary="the latest step preview (JPEG)")
    def preview(job_id: str):
        data = store.preview(_job_or_404(state, job_id).id)
        if data is None:
            raise Refused(404, "no preview yet")
        from fastapi.responses import Response

        return Response(data, media_type="image/jpeg")

    @app.get("/v1/jobs/{job_id}/events", summary="Server-Sent Events: queued, step (with preview), done")
    async def events(job_id: str):
        _job_or_404(state, job_id)
        return StreamingResponse(_events(state, job_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/images/{name}", summary="an output PNG, exactly as written")
    def image(name: str):
        path = state.config.outputs / name
        if not IMAGE_NAME.match(name) or not path.is_file():
            raise Refused(404, f"no image {name!r}")
        return FileResponse(path, media_type="image/png")


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def _events(state: ServerState, job_id: str):
    """Send what changed at each change of the store; a client that goes away only stops its own stream."""
    store = state.store
    last: tuple | None = None
    sent_images = 0
    stepped_at = -STEP_EVENTS_EVERY  # when the last step event went out
    seen = store.changes.version
    while True:
        glanced = store.glance(job_id)  # before the read: whatever changes after it differs from this
        job = store.get(job_id)
        position = store.position(job)
        if job.state == "queued" and last != ("queued", position):
            yield _sse("queued", {"id": job_id, "position": position})
            last = ("queued", position)
        elif job.state == "running" and last != ("running", job.step):
            if last is None or last[0] != "running":
                yield _sse("started", {"id": job_id, "worker": job.worker})
            if job.step:
                preview = store.preview(job_id)
                yield _sse("step", {"id": job_id, "step": job.step, "total": job.total, "eta": job.eta,
                                    "preview": _data_url(preview)})
                stepped_at = time.monotonic()
            last = ("running", job.step)
        for output in job.outputs[sent_images:]:
            yield _sse("image", {"id": job_id, "name": output["name"], "url": f"/v1/images/{output['name']}",
                                 "seed": output["seed"]})
        sent_images = len(job.outputs)
        if job.state in FINISHED:
            yield _sse(job.state, {"id": job_id, "state": job.state, "error": job.error,
                                   "images": [o["name"] for o in job.outputs]})
            return
        seen = await _next_event(state, job, glanced, seen, stepped_at)


async def _next_event(state: ServerState, job: Job, glanced: tuple | None, seen: int,
                      stepped_at: float) -> int:
    """Wait for a change worth reading the job for: any, except a new step within `STEP_EVENTS_EVERY`
    of the last step event. A new state or output always passes at once: `glanced` was taken just
    before `job` was read, so the job's glance differs from it as soon as either moved since."""
    seen = await state.next_change(seen)
    while (job.state == "running" and time.monotonic() - stepped_at < STEP_EVENTS_EVERY
           and state.store.glance(job.id) == glanced):
        seen = await state.next_change(seen)
    return seen


def _data_url(jpeg: bytes | None) -> str | None:
    return None if jpeg is None else "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _add_catalog(app: FastAPI, state: ServerState) -> None:
    @app.get("/v1/models", summary="the default model and those under --models-dir")
    def models() -> dict[str, Any]:
        state.catalog.refresh()
        return {"default": state.default_model(), "models": [
            {"name": e.name, "hash": e.hash, "sha256": e.sha256, "family": e.family, "filename": e.filename,
             "size": e.native_size, "default": e.name == state.default_model()}
            for e in state.catalog.entries.values()]}

    @app.get("/v1/controlnets", summary="the ControlNets under --controlnet-dir")
    def controlnets() -> dict[str, Any]:
        state.controlnets.refresh()
        return {"controlnets": [{"name": e.name, "title": e.title, "sha256": e.sha256, "family": e.family,
                                 "filename": e.filename} for e in state.controlnets.entries.values()]}

    @app.get("/v1/samplers")
    def samplers() -> list[dict[str, Any]]:
        from openldm.diffusion.registry import SAMPLERS

        return [{"name": s.name, "display": s.display, "aliases": list(s.aliases),
                 "default_schedule": s.default_schedule} for s in SAMPLERS.values()]

    @app.get("/v1/schedulers")
    def schedulers() -> list[dict[str, str]]:
        from openldm.diffusion.registry import SCHEDULE_DISPLAY

        return [{"name": name, "display": display} for name, display in SCHEDULE_DISPLAY.items()]

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "jobs": state.store.counts(), "workers": state.config.workers,
                "default_model": state.default_model(), "time": time.time(),
                "requeued_at_start": state.requeued}

    @app.post("/v1/png-info", summary="the settings a PNG (openldm or A1111) carries")
    def png_info(request: PngInfoRequest) -> dict[str, Any]:
        return state.png_info(request.image)

    @app.post("/v1/tokens", summary="prompt tokens per 75-token chunk, by the model's tokenizer")
    def tokens(request: TokensRequest) -> dict[str, Any]:
        return state.token_counts(request.prompt, request.model)
