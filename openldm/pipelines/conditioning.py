"""Prompt text -> UNet conditioning, with A1111's weighting, 75-token chunks and embeddings.

Each text encoder sees the prompt in chunks of 75 tokens (plus start and end), split early at a
comma near the boundary and at every BREAK; each chunk is encoded alone and the chunks are joined
along the token axis. Weighted tokens scale their hidden states, and the result is rescaled so its
mean equals the unweighted mean (AUTOMATIC1111's "original" emphasis). Unweighted prompts of at most
75 tokens therefore give exactly the plain 77-token encoding that diffusers computes.
One difference: the mean is restored per prompt, not over the whole batch, so an image does not
depend on the other prompts of its batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from openldm.checkpoints.io import CheckpointError
from openldm.checkpoints.layout import TEXT_ENCODER_NAMES
from openldm.config import SIZE_EMBED_DIM, ModelConfig
from openldm.models.clip import CLIPTextModel
from openldm.models.tokenizer import CLIPTokenizer
from openldm.nn.embeddings import timestep_embedding
from openldm.pipelines.params import GenerationParams
from openldm.prompts import extract_networks, parse_attention, prompt_schedule

if TYPE_CHECKING:
    from openldm.engines.weights import FileWeights
    from openldm.networks import Embedding
    from openldm.pipelines.prompt_cache import PromptCache

COMMA_BACKTRACK = 20  # move text after a comma this close to a chunk's end into the next chunk


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    # (position among the content tokens, vectors) for textual-inversion embeddings
    fixes: list[tuple[int, torch.Tensor]] = field(default_factory=list)


@dataclass(frozen=True)
class TextEncoder:
    """One tokenizer + encoder pair, and the embeddings (name -> vectors) usable in its prompts.

    With `weights` (a single file's encoder), the model's weights may be dropped to the file between
    runs (`Pipeline.hold_text_encoders`): `ready` reads them back."""

    tokenizer: CLIPTokenizer
    model: CLIPTextModel
    embeddings: Mapping[str, torch.Tensor] = field(default_factory=dict)
    weights: FileWeights | None = None

    def ready(self) -> CLIPTextModel:
        """The model with its weights in memory."""
        return self.weights.materialize() if self.weights is not None else self.model

    @property
    def placement(self) -> tuple[torch.device, torch.dtype]:
        """Where the weights are (or go when read back), without reading them."""
        if self.weights is not None:
            return self.weights.device, self.weights.dtype
        weight = self.model.text_model.embeddings.token_embedding.weight
        return weight.device, weight.dtype


def _embedding_at(tokens: list[int], i: int, names: Mapping[tuple[int, ...], str]) -> tuple[int, ...] | None:
    """The longest embedding name whose tokens start at position i."""
    found = [n for n in names if tuple(tokens[i : i + len(n)]) == n]
    return max(found, key=len) if found else None


def chunk_size(tokenizer: CLIPTokenizer) -> int:
    """Content tokens per chunk: the encoder's context (77 for SD) less the start and end tokens."""
    return tokenizer.max_length - 2


def chunk_prompt(text: str, encoder: TextEncoder) -> list[Chunk]:
    """Tokens and per-token weights of a prompt, in chunks of at most 75 content tokens."""
    size = chunk_size(encoder.tokenizer)
    comma = encoder.tokenizer.encode(",")[0]
    names = {tuple(encoder.tokenizer.encode(n)): n for n in encoder.embeddings}
    chunks: list[Chunk] = []
    chunk, last_comma = Chunk(), -1

    def close() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for part_index, part in enumerate(parse_attention(text)):
        if part_index:  # a BREAK
            close()
        for fragment, weight in part:
            tokens, i = encoder.tokenizer.encode(fragment), 0
            while i < len(tokens):
                if tokens[i] == comma:
                    last_comma = len(chunk.tokens)
                elif len(chunk.tokens) == size and last_comma != -1 and size - last_comma <= COMMA_BACKTRACK:
                    cut = last_comma + 1
                    moved = Chunk(chunk.tokens[cut:], chunk.weights[cut:])
                    chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                    close()
                    chunk = moved
                if len(chunk.tokens) == size:
                    close()
                name_tokens = _embedding_at(tokens, i, names)
                if name_tokens is None:
                    chunk.tokens.append(tokens[i])
                    chunk.weights.append(weight)
                    i += 1
                    continue
                vectors = encoder.embeddings[names[name_tokens]]
                if len(chunk.tokens) + len(vectors) > size:
                    close()
                chunk.fixes.append((len(chunk.tokens), vectors))
                chunk.tokens += [0] * len(vectors)
                chunk.weights += [weight] * len(vectors)
                i += len(name_tokens)
    if chunk.tokens or not chunks:
        close()
    return chunks


def _chunk_ids(chunk: Chunk, tokenizer: CLIPTokenizer) -> tuple[list[int], list[float]]:
    """77 ids: start, content, end, then padding (end tokens for SD1, the pad id for OpenCLIP)."""
    pad = chunk_size(tokenizer) - len(chunk.tokens)
    ids = [tokenizer.start_id, *chunk.tokens, tokenizer.end_id] + [tokenizer.pad_id] * pad
    return ids, [1.0, *chunk.weights, 1.0] + [1.0] * pad


@torch.no_grad()
def encode_chunks(
    chunks: Sequence[Chunk], encoder: TextEncoder, skip: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(1, 77 * len(chunks), width) weighted hidden states, and the first chunk's pooled output."""
    model = encoder.ready()
    device = model.text_model.embeddings.token_embedding.weight.device
    hidden, pooled = [], None
    for chunk in chunks:
        ids, weights = _chunk_ids(chunk, encoder.tokenizer)
        ids_t = torch.tensor([ids], device=device)
        embeds = None
        if chunk.fixes:
            embeds = model.text_model.embeddings.token_embedding(ids_t).clone()
            for offset, vectors in chunk.fixes:
                embeds[0, 1 + offset : 1 + offset + len(vectors)] = vectors.to(embeds)
        z, p = model(ids_t, skip=skip, token_embeds=embeds)
        w = torch.tensor(weights, device=z.device, dtype=z.dtype)[None, :, None]
        if (w != 1).any():
            mean = z.float().mean()
            z = z * w
            z = z * (mean / z.float().mean()).to(z.dtype)
        hidden.append(z)
        pooled = p if pooled is None else pooled
    return torch.cat(hidden, dim=1), pooled


@dataclass(frozen=True)
class EncodedPrompts:
    context: torch.Tensor  # (batch, tokens, context_dim)
    pooled: torch.Tensor | None  # (batch, width) of the encoder with a projection (SDXL)


class PromptEncoder:
    """Encodes prompts with all text encoders of a model and joins their outputs.

    With a `cache` (the pipeline's), a prompt already encoded under the same `weights` (the networks
    merged into the encoders: `Pipeline.text_weights`) is not encoded again.
    """

    def __init__(self, encoders: Sequence[TextEncoder], clip_skip: int | None = None,
                 cache: PromptCache | None = None, weights: Hashable = ()):
        self.encoders = list(encoders)
        self.clip_skip = clip_skip
        self.cache, self.weights = cache, weights

    def chunk_count(self, prompt: str) -> int:
        return max(len(chunk_prompt(prompt, e)) for e in self.encoders)

    def __call__(self, prompts: Sequence[str], min_chunks: int = 1) -> EncodedPrompts:
        """Encode a batch; every prompt gets the same number of chunks (padded with empty ones)."""
        count = max([min_chunks, *(self.chunk_count(p) for p in prompts)])
        contexts, pooled = [], []
        for prompt in prompts:
            parts, pool = [], None
            for index in range(len(self.encoders)):
                z, p = self._encode(index, prompt, count)
                parts.append(z)
                pool = p if p is not None else pool
            contexts.append(torch.cat(parts, dim=-1))
            pooled.append(pool)
        context = torch.cat(contexts)
        return EncodedPrompts(context, None if pooled[0] is None else torch.cat(pooled))

    def _encode(self, index: int, prompt: str, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One encoder's output for one prompt in `count` chunks, from the cache when it has it."""
        encoder = self.encoders[index]

        def encode() -> tuple[torch.Tensor, torch.Tensor | None]:
            chunks = chunk_prompt(prompt, encoder)
            chunks += [Chunk() for _ in range(count - len(chunks))]
            return encode_chunks(chunks, encoder, self.clip_skip)

        if self.cache is None:
            return encode()
        key = (index, prompt, count, self.clip_skip, *encoder.placement, self.weights)
        return self.cache.get(self.encoders, key, encode)


def vector_conditioning(
    config: ModelConfig, pooled: torch.Tensor, values: Mapping[str, Sequence[float]]
) -> torch.Tensor:
    """SDXL's `y`: pooled text embedding, then 256 Fourier features of each size/crop/score number."""
    numbers = [float(v) for name in config.vector_conds for v in values[name]]
    t = torch.tensor(numbers, device=pooled.device).repeat(pooled.shape[0], 1)
    return torch.cat([pooled, timestep_embedding(t, SIZE_EMBED_DIM).flatten(1).to(pooled.dtype)], dim=1)


@dataclass(frozen=True)
class PromptSteps:
    """The distinct prompt texts of a batch and the last sampling step each is used for."""

    ends: list[int]  # ascending; step i (0-based) uses the first entry with end >= i, as A1111 does
    texts: list[list[str]]  # texts[k][b]: prompt of batch item b up to ends[k]


def schedule_prompts(prompts: Sequence[str], steps: int, first_pass_steps: int = 0) -> PromptSteps:
    """Resolve prompt editing and alternation for every prompt of a batch over `steps` steps.

    Extra-network tags (`<lora:name:1>`) are taken out first, as in A1111: the text encoders never see them.
    `first_pass_steps` > 0: a hires pass after that many steps (see `prompt_schedule`).
    """
    schedules = [prompt_schedule(extract_networks(p)[0], steps, first_pass_steps=first_pass_steps)
                 for p in prompts]
    ends = sorted({end for schedule in schedules for end, _ in schedule})
    texts = [[next(t for e, t in schedule if e >= end) for schedule in schedules] for end in ends]
    return PromptSteps(ends, texts)


def size_conditioning(params: GenerationParams, width: int, height: int) -> dict[str, tuple[int, ...]]:
    """SDXL's size numbers in sgm's order: (height, width) and (top, left); unset sizes are the image's."""
    original_w, original_h = params.original_size or (width, height)
    target_w, target_h = params.target_size or (width, height)
    return {"original_size": (original_h, original_w), "crop_coords": tuple(params.crop_coords),
            "target_size": (target_h, target_w)}


def with_embeddings(encoders: Sequence[TextEncoder], embeddings: Iterable[Embedding],
                    config: ModelConfig) -> tuple[list[TextEncoder], list[str]]:
    """The encoders with `embeddings` usable by name, and why each one made for another model was skipped."""
    fitting, skipped = {}, []
    for embedding in embeddings:
        try:
            fitting[embedding.name] = embedding.for_model(config)
        except CheckpointError as e:
            skipped.append(f"{embedding.source or embedding.name}: skipped: {e}")
    out = []
    for component, encoder in zip(TEXT_ENCODER_NAMES, encoders):
        own = {name: parts[component] for name, parts in fitting.items() if component in parts}
        out.append(dataclasses.replace(encoder, embeddings={**encoder.embeddings, **own}))
    return out, skipped
