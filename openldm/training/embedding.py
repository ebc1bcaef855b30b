"""Textual-inversion training (Gal et al. 2022): new token vectors for a frozen model, A1111's file.

The captions become `template` with the trigger word in it; where the word stands, the text
encoder receives the trained vectors instead of the word's token embeddings, exactly as the
generation pipeline substitutes an embedding (`pipelines.conditioning`: placeholder id 0 at each
vector's position). The file is A1111's `.safetensors` (`emb_params`, (vectors, width)) named after
the trigger word, which `openldm.networks.embeddings` and A1111 read.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from openldm.checkpoints.io import write_safetensors_atomic
from openldm.pipelines.pipeline import Pipeline
from openldm.training.config import TrainConfig
from openldm.training.data import DataError
from openldm.training.ldm import FrozenModelTask


class TokenVectors(nn.Module):
    """The trained vectors, under the name A1111's safetensors files give them."""

    def __init__(self, vectors: torch.Tensor):
        super().__init__()
        self.emb_params = nn.Parameter(vectors)


class EmbeddingTask(FrozenModelTask):
    """The LDM loss with the whole model frozen; only the embedding's vectors learn."""

    what = "embedding"

    def __init__(self, config: TrainConfig, rank: int = 0, world: int = 1):
        super().__init__(config, rank, world)
        self.embedding_options = options = config.embedding
        init_ids = self.tokenizer.encode(options.init_word)
        if not init_ids:
            raise DataError(f"embedding.init_word {options.init_word!r} has no tokens")
        table = self.text_encoder.text_model.embeddings.token_embedding.weight
        self.vectors = TokenVectors(table[init_ids[0]].detach().clone().float().repeat(options.vectors, 1))

    def trainable(self) -> dict[str, nn.Module]:
        return {"embedding": self.vectors}

    def param_groups(self) -> list[dict]:
        return [{"params": [self.vectors.emb_params]}]

    def caption(self, caption: str) -> str:
        """The training text of one image ("" stays "": caption dropout trains the unconditional)."""
        options = self.embedding_options
        return options.template.format(token=options.token, caption=caption) if caption else ""

    def token_ids(self, text: str) -> tuple[list[int], list[int]]:
        """(ids padded to the context, positions of the vectors) with id 0 standing in for each vector."""
        tokenizer, token = self.tokenizer, self.embedding_options.token
        count = self.vectors.emb_params.shape[0]
        content, positions = [], []
        for i, part in enumerate(text.split(token)):
            if i:
                positions += range(1 + len(content), 1 + len(content) + count)
                content += [0] * count
            content += tokenizer.encode(part)
        room = tokenizer.max_length - 2
        if positions and positions[-1] > room:
            raise DataError(f"caption {text!r} is too long: the embedding falls past token {room}")
        ids = [tokenizer.start_id, *content[:room], tokenizer.end_id]
        return ids + [tokenizer.pad_id] * (tokenizer.max_length - len(ids)), positions

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        rows = [self.token_ids(self.caption(c)) for c in captions]
        device = self.config.run.device
        ids = torch.tensor([r[0] for r in rows], device=device)
        embeds = self.text_encoder.text_model.embeddings.token_embedding(ids).clone()
        vectors = self.vectors.emb_params
        for row, (_, positions) in enumerate(rows):
            for k in range(0, len(positions), len(vectors)):
                embeds[row, positions[k]:positions[k] + len(vectors)] = vectors.to(embeds)
        hidden, _ = self._text_encoder(ids, token_embeds=embeds)
        return hidden

    def sampling_pipeline(self) -> Pipeline:
        """The generation pipeline with the embedding as a user would load it."""
        pipeline = super().sampling_pipeline()
        vectors = self.vectors.emb_params.detach().clone()
        embeddings = {self.embedding_options.token: vectors}
        pipeline.text_encoders = [replace(pipeline.text_encoders[0], embeddings=embeddings)]
        return pipeline

    def sample_prompts(self, count: int) -> list[str]:
        return [self.caption(prompt) for prompt in super().sample_prompts(count)]

    def export(self, output_dir: Path) -> list[Path]:
        token = self.embedding_options.token
        tensors = {"emb_params": self.vectors.emb_params.detach().to("cpu").contiguous()}
        metadata = {"openldm.trained_by": "openldm train embedding", "openldm.preset": self.model_config.name}
        path = Path(output_dir) / f"{token}.safetensors"
        return [write_safetensors_atomic(path, tensors, metadata=metadata)]
