"""LoRA and textual-inversion training: the files they write load on the generation side and change it.

Both train a few steps on a random tiny-sd1 model; what matters is that the generation side sees
exactly what training saw: the LoRA merged by `openldm.networks` computes what the training-time
adapters computed, and the embedding gives the same text conditioning as the training captions.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors import safe_open

from openldm.networks.embeddings import load_embedding
from openldm.networks.formats import load_network
from openldm.networks.lora import apply_networks
from openldm.pipelines.conditioning import PromptEncoder
from openldm.pipelines.pipeline import Pipeline
from openldm.training.lora import LORA_FILE
from openldm.training.run import train
from tests.helpers import make_checkpoint
from tests.training_helpers import (
    make_config,
    one_thread_and_one_clip_tokenizer,  # noqa: F401 (an autouse fixture)
)

PROMPT = "a small red circle on the left, on a blue background"


def _image(pipeline: Pipeline, prompt: str = PROMPT) -> np.ndarray:
    return np.asarray(pipeline.txt2img(prompt, steps=2, seed=5, width=16, height=16)[0], dtype=np.int16)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny-sd1 file with random weights everywhere (a fresh UNet's zero output conv would hide
    every change a LoRA or an embedding makes)."""
    return make_checkpoint(tmp_path_factory.mktemp("base"), "tiny-sd1")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_model):
    config = make_config(tmp_path_factory.mktemp("lora"), "lora", optim={"lr": 1e-2}, run={"steps": 6},
                         ldm={"init": str(base_model)}, lora={"rank": 2, "alpha": 1.0, "text_encoder": True})
    trainer, exported = train(config)
    return trainer, exported[0]


def test_lora_file_is_kohya_format(lora_run):
    trainer, path = lora_run
    assert path.name == LORA_FILE
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["ss_network_dim"] == "2"
    unet_key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # diffusers names
    text_key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    for key in (unet_key, text_key):
        assert {f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"} <= keys
    assert len(keys) == 3 * len(trainer.task.network.adapters)


def test_trained_lora_merges_into_what_training_computed(lora_run):
    trainer, path = lora_run
    task = trainer.task
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0])
    ids = task.tokenizer([PROMPT])
    with torch.no_grad():
        hooked = task.unet(x, t, task.text_encoder(ids)[0])
        task.network.detach_hooks()  # from here on the model is the bare base model
        base_context = task.text_encoder(ids)[0]
        base = task.unet(x, t, base_context)
    pipeline = Pipeline(task.components, [task.tokenizer])
    before = _image(pipeline)
    models = {"unet": task.unet, "text_encoder": task.text_encoder}
    applied = apply_networks(models, [(load_network(path), 1.0)], task.model_config)
    assert applied.reports[0].ok, applied.summary()
    with torch.no_grad():
        merged = task.unet(x, t, task.text_encoder(ids)[0])
    gap = (merged - hooked).abs().max().item()
    assert gap < 1e-5 < (base - hooked).abs().max().item(), f"merged LoRA vs training adapters: {gap:.3g}"
    assert np.abs(_image(pipeline) - before).max() > 0, "the LoRA does not change the image"
    applied.remove()
    assert np.array_equal(_image(pipeline), before)


@pytest.fixture(scope="module")
def embedding_run(tmp_path_factory, base_model):
    config = make_config(tmp_path_factory.mktemp("embedding"), "embedding", optim={"lr": 5e-2},
                         run={"steps": 6}, ldm={"init": str(base_model)},
                         embedding={"token": "shp-tok", "vectors": 2, "init_word": "shape"})
    trainer, exported = train(config)
    return trainer, exported[0]


def test_trained_embedding_conditions_like_training_and_changes_the_image(embedding_run):
    trainer, path = embedding_run
    task = trainer.task
    embedding = load_embedding(path)
    assert path.name == "shp-tok.safetensors" and embedding.name == "shp-tok"
    assert torch.equal(embedding.vectors["any"], task.vectors.emb_params.detach())
    init = task.text_encoder.text_model.embeddings.token_embedding.weight[task.tokenizer.encode("shape")[0]]
    assert not torch.equal(embedding.vectors["any"][0], init), "the vectors did not train"

    plain = Pipeline(task.components, [task.tokenizer])
    with_embedding = Pipeline(task.components, [task.tokenizer])
    vectors = embedding.for_model(task.model_config)["text_encoder"]
    encoder = dataclasses.replace(with_embedding.text_encoders[0], embeddings={"shp-tok": vectors})
    with_embedding.text_encoders = [encoder]
    prompt = task.caption("any caption")  # the template: "a picture of shp-tok"
    with torch.no_grad():
        trained = task.encode_text(["any caption"])
        generated = PromptEncoder(with_embedding.text_encoders)([prompt]).context
    torch.testing.assert_close(generated, trained)
    assert np.abs(_image(with_embedding, prompt) - _image(plain, prompt)).max() > 0
