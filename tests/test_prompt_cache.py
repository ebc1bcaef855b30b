"""A loaded model remembers recent prompt encodings: repeats skip the text encoder and give the same
image; a LoRA merged into the encoder, another clip skip or new embeddings encode again."""

from __future__ import annotations

import pytest
import torch

import openldm
from openldm.networks import load_network
from openldm.pipelines.params import GenerationParams
from openldm.pipelines.prompt_cache import PromptCache
from tests.helpers import make_checkpoint, write_tiny_lora

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = {"steps": 2, "cfg": 5.0, "seed": 3, "negative": "blurry"}


@pytest.fixture(scope="module")
def files(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("prompt-cache")
    write_tiny_lora(root / "loras" / "style.safetensors", 1)
    return make_checkpoint(root, "tiny-sd1"), root / "loras"


@pytest.fixture
def pipe(files):
    checkpoint, loras = files
    return openldm.load(checkpoint, lora_dirs=[loras])


def _counted(pipe) -> list[int]:
    """A list that grows by one at every text-encoder forward (one per 77-token chunk)."""
    calls: list[int] = []
    pipe.text_encoders[0].model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def _latent(pipe, prompt: str, **settings) -> torch.Tensor:
    return pipe.generate(GenerationParams(prompt, **(FAST | settings)))[0].latent


def test_a_repeated_prompt_is_not_encoded_again_and_gives_the_same_image(pipe):
    calls = _counted(pipe)
    first = _latent(pipe, "a red circle")
    assert len(calls) == 2  # the prompt and the negative prompt, one chunk each
    again = _latent(pipe, "a red circle")
    assert len(calls) == 2, f"the repeat encoded {len(calls) - 2} chunks again"
    assert torch.equal(first, again)
    _latent(pipe, "a blue square")
    assert len(calls) == 3, "a new prompt is encoded; its negative prompt is remembered"


def test_batches_and_the_hires_pass_reuse_the_first_encoding(pipe):
    calls = _counted(pipe)
    pipe.generate(GenerationParams("a red circle", batch_count=3, **FAST))
    assert len(calls) == 2
    pipe.generate(GenerationParams("a red circle", hires=True, upscale_by=2, hires_steps=1, width=32,
                                   height=32, **FAST))
    assert len(calls) == 2, "the hires pass encoded its prompts again"


def test_cached_images_equal_those_of_a_model_without_the_cache(pipe, files):
    cold = openldm.load(files[0], lora_dirs=[files[1]])
    cold.prompt_cache = PromptCache(0)
    for prompt in ("a red circle", "a red circle <lora:style:0.8>", "a red circle"):
        warm = _latent(pipe, prompt)
        assert torch.equal(warm, _latent(cold, prompt)), prompt
    assert len(cold.prompt_cache) == 0 and len(pipe.prompt_cache) > 0


def test_a_lora_on_the_text_encoder_encodes_again_and_its_removal_restores_the_old_entries(pipe, files):
    calls = _counted(pipe)
    plain = _latent(pipe, "a red circle")
    assert len(calls) == 2
    tagged = _latent(pipe, "a red circle <lora:style:0.8>")  # the same text once the tag is out
    assert len(calls) == 4, "the LoRA changes the text encoder: its prompts must be encoded again"
    assert not torch.equal(tagged, plain)
    assert torch.equal(_latent(pipe, "a red circle"), plain) and len(calls) == 4  # unmerged: the old entries
    with pipe.merge_networks([(load_network(files[1] / "style.safetensors"), 0.5)]):
        _latent(pipe, "a red circle")
        assert len(calls) == 6
        _latent(pipe, "a red circle")
        assert len(calls) == 6, "while the merge stays, its encodings are reused"


def test_another_clip_skip_or_new_embeddings_encode_again(pipe):
    calls = _counted(pipe)
    one = _latent(pipe, "a red circle")
    two = _latent(pipe, "a red circle", clip_skip=2)
    assert len(calls) == 4
    assert not torch.equal(one, two), "clip skip changed nothing: the test would prove nothing"
    pipe.add_embeddings([])  # new encoder objects (the same model): the cache cannot know what changed
    calls.clear()
    assert torch.equal(_latent(pipe, "a red circle"), one) and len(calls) == 2


def test_the_oldest_entry_leaves_first_and_size_zero_keeps_none():
    cache, encoders = PromptCache(2), [object()]
    made: list[str] = []

    def get(key: str):
        return cache.get(encoders, key, lambda: made.append(key) or (torch.zeros(1), None))

    for key in ("a", "b", "a", "c", "a", "b"):  # "b" was least recently used when "c" came
        get(key)
    assert made == ["a", "b", "c", "b"] and len(cache) == 2
    cache.get([object()], "a", lambda: made.append("other") or (torch.zeros(1), None))
    assert made[-1] == "other" and len(cache) == 1, "other encoders must start an empty cache"
    off = PromptCache(0)
    off.get(encoders, "a", lambda: (torch.zeros(1), None))
    assert len(off) == 0
    with pytest.raises(ValueError, match="prompt cache size -1"):
        PromptCache(-1)
