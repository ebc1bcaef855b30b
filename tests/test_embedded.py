"""The embedded model that ships inside the package: it loads like any checkpoint and draws what
the prompt says, checked by the shapes evaluator on held-out prompts (a quick version of
`openldm eval shapes`, whose full 200-prompt run is reported in docs/embedded.md)."""

import json

import pytest
import torch

from openldm.cli import main
from openldm.cli.eval import EVAL_CFG, EVAL_SAMPLER, EVAL_STEPS
from openldm.data.shapes_eval import eval_scenes, evaluate
from openldm.models.embedded import default_model_path

# Issue 6's bars on in-distribution prompts: colour >= 90%, shape >= 85%, position >= 80% (the shipped
# model scores 100%, 93% and 100% on 200 prompts, docs/embedded.md); 20 prompts here keep CI quick.
BARS = {"colour": 0.90, "shape": 0.85, "position": 0.80}
MAX_BYTES = 30 * 2**20


@pytest.fixture(scope="module")
def pipe():
    from openldm.pipelines.pipeline import load

    return load(default_model_path())


def test_ships_inside_the_package_within_30_mb():
    folder = default_model_path()
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert folder.joinpath("model.safetensors").is_file()
    assert folder.joinpath("tokenizer", "vocab.json").is_file()
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES


def test_loads_as_the_shapes_preset(pipe):
    assert pipe.config.name == "shapes"
    assert pipe.dtype == torch.float32  # stored in fp16, computed in fp32 on the CPU
    assert pipe.config.image_size == 128 and pipe.config.vae.downsample_factor == 8


def test_info_describes_it(capsys):
    assert main(["info", str(default_model_path() / "model.safetensors"), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert "shapes" in json.dumps(described)


def test_generates_what_held_out_prompts_ask_for(pipe):
    def generate(prompts, seeds):
        return [pipe.txt2img(p, seed=s, steps=EVAL_STEPS, cfg=EVAL_CFG, sampler=EVAL_SAMPLER)[0]
                for p, s in zip(prompts, seeds)]

    scores = evaluate(generate, eval_scenes("in_distribution", 20)).accuracy()
    for attribute, bar in BARS.items():
        assert scores[attribute] >= bar, scores
    assert scores["background"] >= 0.9 and scores["size"] >= 0.9, scores
