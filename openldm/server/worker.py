"""The worker: takes the oldest queued job, loads its model on demand, renders it batch by batch.

Progress, previews and cancel all go through the job store, so a worker thread in the server
process and a worker process on another device behave the same. A cancel is seen at the next
step callback, before the next model call; the batches finished by then are kept.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections import OrderedDict
from pathlib import Path

from PIL import Image

from openldm.atomic import write_bytes_atomic
from openldm.pipelines.control import ControlUnit
from openldm.pipelines.params import GenerationParams
from openldm.pipelines.render import Renderer, load_renderer
from openldm.pipelines.run import batch_params
from openldm.pipelines.x4 import X4Settings, X4Tiling
from openldm.server.config import ServerConfig
from openldm.server.controls import ControlNetCatalog, unit_from_json
from openldm.server.jobs import Job, JobStore
from openldm.server.models import ModelCatalog, ModelEntry
from openldm.server.previews import preview_jpeg

POLL_SECONDS = 0.05  # an idle worker's look at the queue (and at `stop`), when no submit wakes it


class JobCancelled(Exception):
    """Raised from the step callback when the job's cancel flag is set."""


class BatchSkipped(Exception):
    """Raised from the step callback when the job's skip flag is set: this batch ends, the next starts."""


class ModelCache:
    """The last `keep` models used, most recent last; loading one more drops the oldest."""

    def __init__(self, config: ServerConfig, device: str | None, keep: int) -> None:
        self.config, self.device, self.keep = config, device, max(1, keep)
        self.loaded: OrderedDict[str, Renderer] = OrderedDict()

    def get(self, entry: ModelEntry) -> Renderer:
        if entry.sha256 in self.loaded:
            self.loaded.move_to_end(entry.sha256)
            return self.loaded[entry.sha256]
        while len(self.loaded) >= self.keep:
            self.loaded.popitem(last=False)
        renderer = load_renderer(entry.path, device=self.device, dtype=self.config.dtype,
                                 engine=self.config.engine, lora_dirs=self.config.lora_dirs,
                                 embedding_dirs=self.config.embedding_dirs,
                                 log=lambda message: print(message, file=sys.stderr),
                                 memory_budget=self.config.limits.memory_budget)
        renderer.pipe.progress = False
        renderer.model_name = entry.name
        self.loaded[entry.sha256] = renderer
        return renderer


class Worker:
    """Runs jobs from `store` until `stop` is set."""

    def __init__(self, config: ServerConfig, store: JobStore, name: str = "worker-0",
                 device: str | None = None) -> None:
        self.config, self.store, self.name = config, store, name
        self.catalog = ModelCatalog(config.default_model, config.models_dir, config.controlnets)
        self.controlnets = ControlNetCatalog(config.controlnets)
        self.models = ModelCache(config, device, config.keep_models)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def run_forever(self) -> None:
        if self.config.warmup:
            self.warm_up()
        while not self.stop.is_set():
            seen = self.store.changes.version
            try:
                job = self.store.claim(self.name)
            except Exception:  # the store briefly unreachable (locked, disk full): log, wait, retry
                traceback.print_exc(file=sys.stderr)
                job = None
            if job is None:  # woken at once by a submit in this process, else it looks again
                self.store.changes.wait_blocking(seen, POLL_SECONDS)
                continue
            self.run(job)

    def warm_up(self) -> None:
        """Load the default model and render one 1-step image at its native size, discarded: the first
        job then finds the model loaded and the engine's program built (never raises: a model that
        fails here fails its jobs with the reason)."""
        started = time.perf_counter()
        try:
            renderer = self.models.get(self._entry(None))
            renderer.render("txt2img", GenerationParams(prompt="", steps=1, seed=0))
        except Exception as e:
            print(f"warm-up of the default model failed: {str(e).splitlines()[0] if str(e) else e!r}",
                  file=sys.stderr)
        else:
            print(f"{self.name}: default model loaded and warmed up in {time.perf_counter() - started:.1f} s",
                  file=sys.stderr)

    def run(self, job: Job) -> None:
        """Render one claimed job and record how it ended; never raises."""
        try:
            self._render(job)
        except JobCancelled:
            self.store.finish(job.id, "cancelled", "cancelled while running")
        except (ValueError, LookupError, OSError) as e:  # settings or files the pipeline refused
            self.store.finish(job.id, "failed", str(e).splitlines()[0] if str(e) else type(e).__name__)
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            self.store.finish(job.id, "failed", f"internal error: {type(e).__name__}: {e}")
        else:
            self.store.finish(job.id, "done")

    def _entry(self, name: str | None) -> ModelEntry:
        try:
            return self.catalog.get(name)
        except LookupError:  # added since this worker last looked
            self.catalog.refresh()
            return self.catalog.get(name)

    def _render(self, job: Job) -> None:
        entry = self._entry(job.model)
        renderer = self.models.get(entry)
        params = GenerationParams.from_json(job.params)
        inputs = {name: _open(self.config.inputs / file, name) for name, file in job.inputs.items()
                  if name in ("image", "mask")}
        extras = {"controls": self._controls(job), "x4": _x4(job), "hires": job.hires}
        runs = batch_params(params)
        done = len(job.outputs)
        for b, batch in enumerate(runs):
            if b * params.batch_size < done:  # finished before a restart (never, today: recover clears)
                continue
            callback = self._callback(job, renderer, b, len(runs))
            try:
                images = renderer.render(job.mode, batch, **inputs, callback=callback, **extras)
            except BatchSkipped:
                self.store.skipped(job.id)
                continue
            for image in images:
                name = f"{job.id}-{done + 1:04d}.png"
                write_bytes_atomic(self.config.outputs / name, image.png)
                self.store.add_output(job.id, name, image.seed, renderer.model_hash, networks=image.networks,
                                      warning=image.warning)
                done += 1

    def _controls(self, job: Job) -> list[ControlUnit]:
        """The job's ControlNet units with their files (a ControlNet removed since: the job fails)."""
        units = []
        for data in job.extras.get("controls", []):
            try:
                path = self.controlnets.get(data["model"]).path
            except LookupError:
                self.controlnets.refresh()
                path = self.controlnets.get(data["model"]).path
            image = _open(self.config.inputs / job.inputs[data["image"]], data["image"])
            units.append(unit_from_json({k: v for k, v in data.items() if k != "image"}, path, image))
        return units

    def _callback(self, job: Job, renderer: Renderer, batch: int, batches: int):
        latent_format = renderer.pipe.config.latent_format

        def on_step(step: int, total: int, denoised) -> None:
            self.store.progress(job.id, batch * total + step, batches * total,
                                preview_jpeg(denoised, latent_format))
            cancel, skip = self.store.requests(job.id)
            if cancel:
                raise JobCancelled(job.id)
            if skip:
                raise BatchSkipped(job.id)

        return on_step


def _x4(job: Job) -> X4Settings | None:
    x4 = job.extras.get("x4")
    return None if x4 is None else X4Settings(x4["noise_level"], X4Tiling(x4["tile"], x4["tile_overlap"]))


def _open(path: Path, name: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("L" if name == "mask" else "RGB")


def start_thread(config: ServerConfig, store: JobStore) -> Worker:
    """A worker in this process, on a daemon thread (one worker: the default)."""
    worker = Worker(config, store, "worker-0", config.device_for(0))
    worker.thread = threading.Thread(target=worker.run_forever, name="openldm-worker", daemon=True)
    worker.thread.start()
    return worker


def process_main(config: ServerConfig, index: int) -> None:
    """Entry point of a worker process (`--workers N`): one device, its own models, the shared store."""
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    worker = Worker(config, JobStore(config.database), f"worker-{index}-pid{os.getpid()}",
                    config.device_for(index))
    worker.run_forever()
