"""Prompt -> UNet conditioning: A1111 weighting, 75-token chunks, BREAK, embeddings, two encoders.

Every expectation is computed by hand from the text encoder's plain forward on token rows, so a
mistake in the chunking or the weighting cannot hide behind the same mistake in the test.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

from openldm.config import TINY_SD1, TINY_SDXL, CLIPTextConfig
from openldm.models.clip import CLIPTextModel
from openldm.models.tokenizer import CLIPTokenizer
from openldm.pipelines.conditioning import PromptEncoder, TextEncoder

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-6


@cache
def _tokenizer(cfg: CLIPTextConfig) -> CLIPTokenizer:
    return CLIPTokenizer.for_config(cfg)


def _encoder(cfg: CLIPTextConfig, seed: int = 0, **embeddings: torch.Tensor) -> TextEncoder:
    """Random weights; norm biases too, or the final norm makes every mean 0 (and the weighting 0/0)."""
    torch.manual_seed(seed)
    model = CLIPTextModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return TextEncoder(_tokenizer(cfg), model, embeddings)


def _plain(encoder: TextEncoder, text: str, skip: int | None = None) -> torch.Tensor:
    """The plain 77-token encoding that diffusers computes."""
    with torch.no_grad():
        return encoder.model(encoder.tokenizer([text]), skip=skip)[0]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_plain_prompt_is_the_plain_encoding_and_clip_skip_reaches_the_encoder():
    encoder = _encoder(TINY_SD1.text_encoders[0])
    text = "a red circle on a blue square"
    assert _err(PromptEncoder([encoder])([text]).context, _plain(encoder, text)) == 0
    assert _err(PromptEncoder([encoder], clip_skip=2)([text]).context, _plain(encoder, text, skip=2)) == 0


def test_weights_scale_hidden_states_then_the_mean_is_restored():
    encoder = _encoder(TINY_SD1.text_encoders[0])
    z = _plain(encoder, "a red circle")  # tokens: start, a, red, circle, end, pad...
    w = torch.ones(1, z.shape[1], 1)
    w[0, 2] = 1.5
    expected = z * w * (z.mean() / (z * w).mean())  # A1111's "original" emphasis
    err = _err(PromptEncoder([encoder])(["a (red:1.5) circle"]).context, expected)
    assert err <= TOL, f"max abs err {err:.2e}"


def test_the_word_break_weighted_minus_one_is_text_not_a_break():
    """`BRE()AK` joins into the text "BREAK"; at weight -1 it once looked like the BREAK marker."""
    encoder = _encoder(TINY_SD1.text_encoders[0])
    z = _plain(encoder, "a BREAK circle")
    w = torch.ones(1, z.shape[1], 1)
    w[0, 2 : 2 + len(encoder.tokenizer.encode("BREAK"))] = -1.0
    expected = z * w * (z.mean() / (z * w).mean())
    err = _err(PromptEncoder([encoder])(["a (BRE()AK:-1) circle"]).context, expected)  # one chunk, not two
    assert err <= TOL, f"max abs err {err:.2e}"


def test_long_prompts_and_break_make_77_token_chunks():
    encoder = _encoder(TINY_SD1.text_encoders[0])
    prompts = PromptEncoder([encoder])
    long = prompts(["cat " * 80]).context  # 75 tokens, then 5
    assert long.shape == (1, 2 * 77, 32)
    assert _err(long[:, :77], _plain(encoder, "cat " * 75)) == 0
    assert _err(long[:, 77:], _plain(encoder, "cat " * 5)) == 0
    broken = prompts(["a red circle BREAK a blue square"]).context
    halves = [_plain(encoder, "a red circle"), _plain(encoder, "a blue square")]
    assert _err(broken, torch.cat(halves, dim=1)) == 0
    padded = prompts(["a red circle"], min_chunks=2).context  # a batch's shorter prompt: empty chunk after
    assert _err(padded[:, 77:], _plain(encoder, "")) == 0


def test_embedding_name_is_replaced_by_its_vectors():
    vectors = torch.randn(2, 32)
    encoder = _encoder(TINY_SD1.text_encoders[0], mystyle=vectors)
    tokenizer, model = encoder.tokenizer, encoder.model
    ids = [tokenizer.start_id, *tokenizer.encode("a"), 0, 0, *tokenizer.encode("cat"), tokenizer.end_id]
    ids = torch.tensor([ids + [tokenizer.pad_id] * (77 - len(ids))])
    with torch.no_grad():
        embeds = model.text_model.embeddings.token_embedding(ids)
        embeds[0, 2:4] = vectors
        expected = model(ids, token_embeds=embeds)[0]
    err = _err(PromptEncoder([encoder])(["a mystyle cat"]).context, expected)
    assert err <= TOL, f"max abs err {err:.2e}"


def test_sdxl_joins_both_encoders_and_pools_the_second():
    first, second = (_encoder(cfg, seed=i) for i, cfg in enumerate(TINY_SDXL.text_encoders))
    text = "a red circle"
    encoded = PromptEncoder([first, second])([text, text])
    expected = torch.cat([_plain(first, text), _plain(second, text)], dim=-1)
    assert _err(encoded.context, torch.cat([expected, expected])) == 0
    with torch.no_grad():
        pooled = second.model(second.tokenizer([text]))[1]
    assert _err(encoded.pooled, torch.cat([pooled, pooled])) == 0
