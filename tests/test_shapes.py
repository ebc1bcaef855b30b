import random
from dataclasses import replace

import numpy as np
import pytest

from openldm.data.shapes import (
    ATTRIBUTES,
    HELD_OUT_PAIRS,
    Scene,
    Shape,
    ShapesConfig,
    ShapesDataset,
    render,
    score_image,
)


@pytest.mark.parametrize("two_shape_fraction", [0.0, 1.0])
def test_evaluator_scores_real_images_above_99_percent(two_shape_fraction):
    ds = ShapesDataset(400, ShapesConfig(two_shape_fraction=two_shape_fraction), seed=11)
    totals = dict.fromkeys(ATTRIBUTES, 0)
    for i in range(len(ds)):
        image, _, scene = ds[i]
        for name, ok in score_image(image, scene).items():
            totals[name] += ok
    rates = {k: v / len(ds) for k, v in totals.items()}
    assert min(rates.values()) >= 0.99, rates


def test_evaluator_rejects_each_wrong_attribute():
    scene = Scene((Shape("circle", "red", "large", "on the left"),), "blue")
    image = render(scene, ShapesConfig())
    wrong = {
        "background": replace(scene, background="green"),
        "colour": Scene((replace(scene.shapes[0], colour="yellow"),), "blue"),
        "shape": Scene((replace(scene.shapes[0], kind="triangle"),), "blue"),
        "size": Scene((replace(scene.shapes[0], size="small"),), "blue"),
        "position": Scene((replace(scene.shapes[0], position="on the right"),), "blue"),
    }
    assert all(score_image(image, scene).values())
    for attribute, other in wrong.items():
        scores = score_image(image, other)
        assert not scores[attribute], attribute
        assert sum(scores.values()) == len(ATTRIBUTES) - 1, (attribute, scores)


def test_items_are_reproducible_from_seed_and_index():
    a, b = ShapesDataset(10, seed=5), ShapesDataset(10, seed=5)
    assert np.array_equal(np.asarray(a[7][0]), np.asarray(b[7][0])) and a[7][1] == b[7][1]
    assert a[7][1] != ShapesDataset(10, seed=6)[7][1] or not np.array_equal(
        np.asarray(a[7][0]), np.asarray(ShapesDataset(10, seed=6)[7][0])
    )


def test_splits_respect_held_out_pairs():
    train = ShapesDataset(500, ShapesConfig(split="train"), seed=0)
    held = ShapesDataset(100, ShapesConfig(split="held_out"), seed=0)
    train_pairs = {(s.colour, s.kind) for i in range(len(train)) for s in train.scene(i)[0].shapes}
    held_pairs = {(s.colour, s.kind) for i in range(len(held)) for s in held.scene(i)[0].shapes}
    assert not train_pairs & HELD_OUT_PAIRS
    assert held_pairs <= HELD_OUT_PAIRS and held_pairs


def test_caption_states_every_attribute():
    scene = Scene((Shape("square", "purple", "small", "at the top"),), "orange")
    assert scene.caption == "a small purple square at the top, on an orange background"
    rng = random.Random(0)
    image = render(scene, ShapesConfig(image_size=64), rng)
    assert image.size == (64, 64)
