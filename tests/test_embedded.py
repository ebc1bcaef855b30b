"""The embedded model that ships inside the package: it loads like any checkpoint and draws what
the prompt says, checked by the shapes evaluator on held-out prompts (a quick version of
`openldm eval shapes`, whose full 200-prompt run is reported in docs/embedded.md), and the
fine-tuning config for free phrasing trains from it."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from openldm.cli import main
from openldm.cli.eval import EVAL_CFG, EVAL_SAMPLER, EVAL_STEPS
from openldm.data.shapes_eval import eval_prompts, evaluate
from openldm.models.domain import read_domain
from openldm.models.embedded import default_model_path
from openldm.training.config import load_config
from openldm.training.run import train

# Issue 6's bars on in-distribution prompts: colour >= 90%, shape >= 85%, position >= 80% (the shipped
# model scores 100%, 96% and 100% on 200 prompts, docs/embedded.md); 20 prompts here keep CI quick.
BARS = {"colour": 0.90, "shape": 0.85, "position": 0.80}
# Free phrasing (issue 17): the bar is 90% on every stated attribute. The shipped model, fine-tuned twice on
# the phrasing grammar (openldm/configs/shapes-ldm-phrasing.yaml, then shapes-ldm-phrasing-2.yaml), reaches
# on these 16 held-out prompts background 93% (13/14), colour 100% (16/16), shape 94% (15/16), size 100%
# (11/11), position 100% (15/15); the floors sit one image below, so that CI notices if it gets worse
# (docs/embedded.md).
FREE_FLOORS = {"background": 0.85, "colour": 0.93, "shape": 0.87, "size": 0.90, "position": 0.93}
# Two shapes in the grammar's forms, both orders (issue 17: the position of each shape >= 90%; 95.5% on
# 200 prompts): 7/8 here, the floor one image below.
TWO_SHAPES_POSITION_FLOOR = 0.74
MAX_BYTES = 30 * 2**20
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe():
    from openldm.pipelines.loading import load

    return load(default_model_path())


def test_ships_inside_the_package_within_30_mb():
    folder = default_model_path()
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert folder.joinpath("model.safetensors").is_file()
    assert folder.joinpath("tokenizer", "vocab.json").is_file()
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES


def test_loads_as_the_shapes_preset(pipe):
    assert pipe.config.name == "shapes-phrasing"  # the shapes preset, its vocabulary grown for the grammar
    assert pipe.dtype == torch.float32  # stored in fp16, computed in fp32 on the CPU
    assert pipe.config.image_size == 128 and pipe.config.vae.downsample_factor == 8


def test_info_describes_it(capsys):
    assert main(["info", str(default_model_path() / "model.safetensors"), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert "shapes" in json.dumps(described)


def _generator(pipe):
    def generate(prompts, seeds):
        return [pipe.txt2img(p, seed=s, steps=EVAL_STEPS, cfg=EVAL_CFG, sampler=EVAL_SAMPLER)[0]
                for p, s in zip(prompts, seeds)]

    return generate


def test_generates_what_held_out_prompts_ask_for(pipe):
    scores = evaluate(_generator(pipe), eval_prompts("in_distribution", 20)).accuracy()
    for attribute, bar in BARS.items():
        assert scores[attribute] >= bar, scores
    assert scores["background"] >= 0.9 and scores["size"] >= 0.9, scores


def test_free_phrasing_stays_above_what_the_shipped_model_reaches(pipe):
    """Held-out free phrasing on 16 prompts, held to the shipped model's level (docs/embedded.md)."""
    scores = evaluate(_generator(pipe), eval_prompts("free", 16)).accuracy()
    for attribute, floor in FREE_FLOORS.items():
        assert scores[attribute] >= floor, scores


def test_two_shapes_in_either_order_land_where_the_prompt_puts_them(pipe):
    scores = evaluate(_generator(pipe), eval_prompts("varied_two_shapes", 8)).accuracy()
    assert scores["position"] >= TWO_SHAPES_POSITION_FLOOR, scores


@pytest.mark.parametrize("name", ["shapes-ldm-phrasing", "shapes-ldm-phrasing-2"])
def test_the_phrasing_configs_fine_tune_the_shipped_model(name, tmp_path, one_thread):
    """Two tiny steps of each phrasing config: it starts from the shipped weights and exports a model
    folder that declares the grammar's words."""
    config = load_config(name, "ldm")
    ldm = replace(config.ldm, init=str(default_model_path() / "model.safetensors"),
                  tokenizer=str(default_model_path() / "tokenizer"))
    run = replace(config.run, steps=2, batch_size=2, output_dir=str(tmp_path), checkpoint_every=2,
                  log_every=1)
    config = replace(config, ldm=ldm, data=replace(config.data, length=8), run=run)
    assert config.data.captions == "varied" and config.ldm.domain
    trainer, exported = train(config)
    assert next(trainer.task.unet.parameters()).dtype == torch.float32  # fp16 file, fp32 master weights
    from openldm.pipelines.loading import load

    tuned, shipped = load(tmp_path), load(default_model_path())
    key = "input_blocks.0.0.weight"
    delta = (tuned.unet.state_dict()[key] - shipped.unet.state_dict()[key]).abs().max().item()
    assert 0 < delta < 0.05, delta  # it moved, a little: fine-tuned, not re-initialised
    domain = read_domain(tmp_path)
    assert domain is not None and {"big", "middle", "next", "circle"} <= domain.words
