"""One CLIP text transformer (Radford et al. 2021) for OpenAI CLIP-L, OpenCLIP ViT-H and ViT-bigG.

Parameter names are Hugging Face's (`text_model.encoder.layers.N.self_attn.q_proj`), so an SD1 or
diffusers text encoder loads with a strict `load_state_dict`; OpenCLIP checkpoints are renamed by
`openldm.checkpoints.openclip` first. Pre-norm residual blocks with causal self-attention; which
hidden state the UNet sees, and whether the final norm is applied to it, is the config's to say.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from openldm.config import CLIPTextConfig
from openldm.nn.attention import Backend, attention
from openldm.nn.lookup import Embedding


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU; the weights were trained with it."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v projections (OpenCLIP stacks them)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, backend: Backend = "sdpa") -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.out_proj(attention(q, k, v, self.heads, causal=True, backend=backend))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size)
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor, backend: Backend = "sdpa") -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), backend)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_layers))


class CLIPEmbeddings(nn.Module):
    """Token plus learned absolute position embeddings (no `position_ids` buffer: positions are 0..n-1)."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = Embedding(cfg.max_length, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if token_embeds is None:
            token_embeds = self.token_embedding(input_ids)
        return token_embeds + self.position_embedding.weight[: input_ids.shape[1]]


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size)


class CLIPTextModel(nn.Module):
    """The text encoder; `text_projection` exists only for encoders whose pooled output is used."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def layers_to_run(self, skip: int | None) -> int:
        """Layers whose output is needed: A1111's "CLIP skip" k takes the output of layer N - k + 1."""
        if skip is None:
            skip = 1 if self.cfg.layer == "last" else 2
        if not 1 <= skip <= self.cfg.num_layers:
            raise ValueError(f"skip must be in 1..{self.cfg.num_layers} (1 = last layer), got {skip}")
        return self.cfg.num_layers - skip + 1

    def embedding_weight(self) -> torch.Tensor:
        return self.text_model.embeddings.token_embedding.weight.detach()

    def set_vocabulary(self, rows: torch.Tensor, pad_token: int) -> None:
        """A new token table (a vocabulary grown for training); the config follows its size."""
        self.text_model.embeddings.token_embedding = Embedding.from_pretrained(rows.clone(), freeze=False)
        self.cfg = replace(self.cfg, vocab_size=rows.shape[0], pad_token=pad_token)

    def forward(
        self, input_ids: torch.Tensor, skip: int | None = None, token_embeds: torch.Tensor | None = None,
        backend: Backend = "sdpa",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, n) ids -> (hidden (B, n, width) for the UNet, pooled (B, projection_dim) or None).

        `skip` overrides the config's layer (1 = last, 2 = penultimate, ...). `token_embeds`
        (B, n, width) replaces the embedding lookup, for textual-inversion vectors. Pooled is the
        final-normed last layer at each row's first end token (the highest id, 49407), projected.
        """
        tm = self.text_model
        wanted = self.layers_to_run(skip)
        run = self.cfg.num_layers if self.cfg.projection_dim is not None else wanted
        x = hidden = tm.embeddings(input_ids, token_embeds)
        for i, layer in enumerate(tm.encoder.layers[:run]):
            x = layer(x, backend)
            if i + 1 == wanted:
                hidden = x
        if self.cfg.final_norm:
            hidden = tm.final_layer_norm(hidden)
        if self.cfg.projection_dim is None:
            return hidden, None
        end = input_ids.argmax(dim=-1)
        pooled = tm.final_layer_norm(x[torch.arange(x.shape[0], device=x.device), end])
        return hidden, self.text_projection(pooled)
