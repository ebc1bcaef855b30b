"""The shapes evaluation: held-out prompt sets, scoring and the `openldm eval` command."""

import json
from dataclasses import replace

import pytest

from openldm.cli import main
from openldm.data.shapes import HELD_OUT_PAIRS, PALETTE, Scene, Shape, ShapesConfig, render
from openldm.data.shapes_eval import (
    EVAL_GENERATION_SEED,
    EvalPrompt,
    eval_prompts,
    eval_scenes,
    evaluate,
    format_table,
    score_stated,
)


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
    prompts = eval_prompts("in_distribution", 24)
    assert [p.text for p in prompts] == [p.scene.caption for p in prompts]
    scenes = prompts
    by_caption = {p.text: p.scene for p in prompts}
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
    rates = [v for s in data["scores"].values() for k, v in s.items() if k not in ("n", "came_out")]
    assert rates and all(0.0 <= v <= 1.0 for v in rates)
    assert grid.stat().st_size > 0
    assert "| prompt set |" in capsys.readouterr().out


def test_eval_command_rejects_bad_input(tmp_path, capsys):
    assert main(["eval", "shapes", "--sets", "nope", "--model", str(tmp_path)]) == 2
    assert "unknown prompt set" in capsys.readouterr().err
    assert main(["eval", "shapes", "--model", str(tmp_path / "missing.safetensors")]) == 2
    assert "error" in capsys.readouterr().err


def test_eval_runs_under_the_engine_it_is_given(tmp_path, capsys, monkeypatch):
    """A bad engine is one line before any loading; a good one runs the eval and is recorded."""
    pytest.importorskip("openvino")
    monkeypatch.setenv("OPENLDM_CACHE", str(tmp_path / "cache"))
    missing = tmp_path / "missing.safetensors"  # not loaded: the engine is checked first
    assert main(["eval", "shapes", "--engine", "tensorrt", "--model", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "openldm eval: error: unknown engine 'tensorrt'; one of auto, eager, compile, openvino, "
        "openvino-int8, openvino-int8-weights, openvino-int8-hybrid, openvino-bf16"], err
    model, out = tmp_path / "tiny.safetensors", tmp_path / "scores.json"
    assert main(["init", "tiny-sd1", str(model)]) == 0
    assert main(["eval", "shapes", "--engine", "openvino", "--model", str(model), "--n", "1", "--steps", "1",
                 "--sets", "in_distribution", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["engine"] == "openvino"


@pytest.mark.parametrize("prompt_set", ["varied", "varied_two_shapes", "free", "free_two_shapes"])
def test_a_perfect_generator_scores_100_on_every_attribute_the_prompts_state(prompt_set):
    prompts = eval_prompts(prompt_set, 40)
    assert prompts == eval_prompts(prompt_set, 40)
    assert len({p.text for p in prompts}) > 30  # phrased many ways, not one template
    by_text = {p.text: p.scene for p in prompts}
    scores = evaluate(lambda texts, seeds: [render(by_text[t], ShapesConfig()) for t in texts], prompts)
    assert min(scores.accuracy().values()) == 1.0, scores.accuracy()
    assert scores.stated["shape"] == 40  # every prompt names its shapes


def test_omitted_attributes_are_not_scored_but_counted():
    scene = Scene((Shape("circle", "red", "large", "on the left"),), "blue")
    drawn = render(Scene((Shape("circle", "green", "small", "on the left"),), "white"), ShapesConfig())
    score, came_out = score_stated(drawn, EvalPrompt("red circle on the left", scene))
    assert score == {"colour": False, "shape": True, "position": True}
    assert came_out == {"background": ["white"], "size": ["small"]}
    table = format_table({"free": evaluate(lambda t, s: [drawn], [EvalPrompt("circle, left", scene)])})
    assert "| free | 1 | - | - | 100.0% | - | 100.0% | 100.0% |" in table
    assert "| free | colour | 1 | green 100% |" in table


def test_two_shape_prompts_are_scored_in_either_clause_order():
    left = Shape("circle", "red", "small", "on the left")
    right = Shape("square", "blue", "small", "on the right")
    scene = Scene((left, right), "black")
    image = render(scene, ShapesConfig())
    for text in ("a small red circle on the left and a small blue square on the right",
                 "a blue square on the right next to a red circle on the left, black background"):
        score, _ = score_stated(image, EvalPrompt(text, scene))
        assert all(score.values()), (text, score)
    swapped = render(Scene((replace(right, position="on the left"), replace(left, position="on the right")),
                           "black"), ShapesConfig())
    score, _ = score_stated(swapped, EvalPrompt("a blue square on the right next to a red circle on the left",
                                                scene))
    assert not score["shape"] and not score["colour"]
