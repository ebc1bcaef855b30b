"""What a server is allowed to do, in one place: the folders it reads, its bounds and its credentials."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from openldm.pipelines.params import Limits


@dataclass(frozen=True)
class ServerLimits:
    """Bounds checked before a job is queued; each refusal is a 422 (a full queue 429) naming the limit."""

    max_pixels: int = 2048 * 2048  # width x height of one output image
    max_images: int = 64  # batch_size x batch_count of one job
    max_batch_size: int = 16
    max_steps: int = 500
    max_prompt_chars: int = 20_000
    max_queue: int = 256  # jobs queued and not yet running
    max_upload_pixels: int = 4096 * 4096  # an input image or mask, checked before it is decoded
    max_upload_bytes: int = 32 * 2**20
    max_controls: int = 4  # ControlNet units of one job (each one more network call per step)
    # The estimated peak (`openldm.memory`) a job may reach, in bytes; None: what the device has when
    # the job is submitted (free memory plus what the server holds). Workers decide `auto` tiling by it.
    memory_budget: int | None = None

    def generation(self) -> Limits:
        """This server's values as the `params.Limits` that settings are checked against (one owner)."""
        return Limits(max_prompt_chars=self.max_prompt_chars, max_steps=self.max_steps,
                      max_batch_size=self.max_batch_size, max_images=self.max_images,
                      max_pixels=self.max_pixels)

    def __post_init__(self) -> None:
        bad = [name for name, value in vars(self).items() if value is not None and value <= 0]
        if bad:
            raise ValueError(f"server limits must be positive: {', '.join(bad)}")


@dataclass(frozen=True)
class ServerConfig:
    """Everything `create_app` and the workers need; `openldm serve` fills it from its flags."""

    data_dir: Path
    default_model: Path  # the model used when a job names none (the embedded one unless --model)
    models_dir: Path | None = None
    controlnet_dir: Path | None = None  # None: <models_dir>/ControlNet, A1111's folder name
    lora_dirs: tuple[Path, ...] = ()
    embedding_dirs: tuple[Path, ...] = ()
    keep_models: int = 1  # models kept loaded by each worker, most recently used first
    workers: int = 1  # 1: a worker thread in the server process; more: one process per device
    devices: tuple[str, ...] = ()  # one per worker; empty: cuda when there is one, else cpu
    dtype: str | None = None
    engine: str = "eager"  # what runs the UNet and decoder (`openldm.engines`); `openldm serve`: auto
    threads: int | None = None  # torch threads per worker (None: torch's default)
    warmup: bool = False  # each worker loads the default model and renders once at start (serve: on)
    auth: tuple[tuple[str, str], ...] = ()  # --api-auth user:pass pairs
    api_key: str | None = None
    a1111: bool = True
    limits: ServerLimits = field(default_factory=ServerLimits)

    @property
    def controlnets(self) -> Path | None:
        """The one folder ControlNet names resolve in (kept out of the models listing)."""
        if self.controlnet_dir is not None:
            return self.controlnet_dir
        return self.models_dir / "ControlNet" if self.models_dir is not None else None

    @property
    def outputs(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def inputs(self) -> Path:
        return self.data_dir / "inputs"

    @property
    def database(self) -> Path:
        return self.data_dir / "jobs.sqlite"

    def device_for(self, worker: int) -> str | None:
        return self.devices[worker % len(self.devices)] if self.devices else None
