"""What both APIs share: the config, the job store, the model listing and the current default model."""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from typing import Any

from openldm.pipelines.infotext import parse_infotext, read_png
from openldm.pipelines.outputs import PngSettings, read_settings
from openldm.pipelines.params import GenerationParams
from openldm.server.config import ServerConfig
from openldm.server.jobs import JobStore
from openldm.server.models import ModelCatalog, ModelEntry, UnknownModel
from openldm.server.submit import Refused, decode_image

DEFAULT_MODEL_OPTION = "sd_model_checkpoint"  # A1111's option name, kept in the store across restarts


@dataclass
class ServerState:
    config: ServerConfig
    store: JobStore
    catalog: ModelCatalog
    requeued: list[str] = field(default_factory=list)  # jobs a crash left running, queued again at start
    _tokenizers: dict[str, Any] = field(default_factory=dict)

    def default_model(self) -> str:
        name = self.store.option(DEFAULT_MODEL_OPTION)
        try:
            return self.catalog.get(name).name
        except UnknownModel:  # the file went away: back to the configured default
            return self.catalog.default_name

    def set_default_model(self, name: str) -> ModelEntry:
        try:
            entry = self.catalog.get(name)
        except UnknownModel:
            self.catalog.refresh()
            try:
                entry = self.catalog.get(name)
            except UnknownModel as e:
                raise Refused(404, str(e), DEFAULT_MODEL_OPTION) from None
        self.store.set_option(DEFAULT_MODEL_OPTION, entry.name)
        return entry

    def model(self, name: str | None) -> ModelEntry:
        try:
            return self.catalog.get(name or self.default_model())
        except UnknownModel as e:
            raise Refused(404, str(e), "model") from None

    def png_info(self, data: str) -> dict[str, Any]:
        """The infotext and the settings a PNG carries (our exact chunk when present)."""
        decode_image(data, "image", self.config.limits)  # size limits before anything reads it
        raw = _raw(data)
        text, _ = read_png(io.BytesIO(raw))
        try:
            settings: PngSettings | None = read_settings(io.BytesIO(raw))
        except ValueError:
            settings = None
        items = parse_infotext(text)[2] if text else {}
        return {"info": text or "", "items": items,
                "params": _our_names(settings.params) if settings else None,
                "mode": settings.mode if settings else None, "model": settings.model if settings else None}

    def token_counts(self, prompt: str, model: str | None) -> dict[str, Any]:
        """Content tokens in each chunk of a prompt, split as the text encoder will see it."""
        from openldm.pipelines.conditioning import TextEncoder, chunk_prompt, chunk_size

        tokenizer = self._tokenizer(self.model(model))
        chunks = chunk_prompt(prompt, TextEncoder(tokenizer, None))
        return {"chunks": [len(c.tokens) for c in chunks], "chunk_size": chunk_size(tokenizer),
                "total": sum(len(c.tokens) for c in chunks)}

    def _tokenizer(self, entry: ModelEntry):
        if entry.sha256 not in self._tokenizers:
            from openldm.models.tokenizer import CLIPTokenizer

            if entry.config is None:
                raise Refused(422, f"cannot tell the tokenizer of {entry.name} from its header", "model")
            folder = next((f for f in (entry.path / "tokenizer", entry.path)
                           if entry.path.is_dir() and (f / "vocab.json").is_file()), None)
            self._tokenizers[entry.sha256] = CLIPTokenizer.for_config(
                entry.config.text_encoders[0], folder)
        return self._tokenizers[entry.sha256]


def _our_names(params: GenerationParams) -> dict[str, Any]:
    """Settings with the sampler and schedule under our names (an A1111 PNG says "DPM++ 2M", "Karras")."""
    from openldm.diffusion.registry import resolve

    try:
        spec, schedule = resolve(params.sampler, params.schedule)
    except ValueError:  # a sampler we lack: the page shows the name it cannot select
        return params.to_json()
    return dataclasses.replace(params, sampler=spec.name, schedule=schedule).to_json()


def _raw(data: str) -> bytes:
    import base64

    return base64.b64decode(data.partition(",")[2] if data.startswith("data:") else data)
