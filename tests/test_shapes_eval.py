"""The shapes evaluation: held-out prompt sets, scoring and the `openldm eval` command."""

import json
from dataclasses import replace

import pytest

from openldm.cli import main
from openldm.data.shapes import HELD_OUT_PAIRS, PALETTE, ShapesConfig, render
from openldm.data.shapes_eval import EVAL_GENERATION_SEED, eval_scenes, evaluate, format_table


def test_prompt_sets_are_fixed_and_respect_the_splits():
    assert eval_scenes("in_distribution", 20) == eval_scenes("in_distribution", 20)
    for scene in eval_scenes("in_distribution", 100):
        assert len(scene.shapes) == 1 and (scene.shapes[0].colour, scene.shapes[0].kind) not in HELD_OUT_PAIRS
    for scene in eval_scenes("compositional", 50):
        assert (scene.shapes[0].colour, scene.shapes[0].kind) in HELD_OUT_PAIRS
    assert all(len(s.shapes) == 2 for s in eval_scenes("two_shapes", 20))
    with pytest.raises(ValueError, match="unknown prompt set"):
        eval_scenes("everything", 3)


def test_a_perfect_generator_scores_100_and_a_colour_blind_one_fails_colour():
    scenes = eval_scenes("in_distribution", 24)
    by_caption = {s.caption: s for s in scenes}
    seen_seeds = []

    def perfect(prompts, seeds):
        seen_seeds.extend(seeds)
        return [render(by_caption[p], ShapesConfig()) for p in prompts]

    def colour_blind(prompts, seeds):
        out = []
        for p in prompts:
            scene = by_caption[p]
            shape = scene.shapes[0]
            other = next(c for c in PALETTE if c not in (shape.colour, scene.background))
            out.append(render(replace(scene, shapes=(replace(shape, colour=other),)), ShapesConfig()))
        return out

    perfect_scores = evaluate(perfect, scenes, batch_size=5).accuracy()
    assert seen_seeds == [EVAL_GENERATION_SEED + i for i in range(24)]
    assert min(perfect_scores.values()) == 1.0
    blind = evaluate(colour_blind, scenes, batch_size=5).accuracy()
    assert blind["colour"] == 0.0 and blind["shape"] == 1.0 and blind["all"] == 0.0
    assert "| in_distribution | 24 |" in format_table({"in_distribution": evaluate(perfect, scenes)})


def test_eval_command_writes_scores(tmp_path, capsys):
    model = tmp_path / "tiny.safetensors"
    assert main(["init", "tiny-sd1", str(model)]) == 0
    out = tmp_path / "scores.json"
    grid = tmp_path / "grid.png"
    code = main(["eval", "shapes", "--model", str(model), "--n", "2", "--steps", "2", "--sets",
                 "in_distribution,two_shapes", "--json", str(out), "--grid", str(grid)])
    assert code == 0
    data = json.loads(out.read_text())
    assert set(data["scores"]) == {"in_distribution", "two_shapes"}
    assert all(0.0 <= v <= 1.0 for s in data["scores"].values() for k, v in s.items() if k != "n")
    assert grid.stat().st_size > 0
    assert "| prompt set |" in capsys.readouterr().out


def test_eval_command_rejects_bad_input(tmp_path, capsys):
    assert main(["eval", "shapes", "--sets", "nope", "--model", str(tmp_path)]) == 2
    assert "unknown prompt set" in capsys.readouterr().err
    assert main(["eval", "shapes", "--model", str(tmp_path / "missing.safetensors")]) == 2
    assert "error" in capsys.readouterr().err
