"""The captions grammar (openldm.data.phrasing) and the held-out free phrasing (data.free_phrasing)."""

import random
import re
from collections import Counter

import pytest

from openldm.data.free_phrasing import ONE_SHAPE, TWO_SHAPES, fill, free_phrase
from openldm.data.phrasing import (
    POSITION_WORDS,
    PromptFacts,
    Stated,
    caption,
    matches_grammar,
    phrase,
    read_prompt,
    stated_all,
    vocabulary,
)
from openldm.data.shapes import ShapesConfig, ShapesDataset


def _scenes(n: int, two: float = 0.3, seed: int = 3):
    dataset = ShapesDataset(n, ShapesConfig(two_shape_fraction=two, split="all"), seed=seed)
    return [dataset.scene(i)[0] for i in range(n)]


def test_the_parser_reads_back_exactly_what_every_generated_caption_states():
    for i, scene in enumerate(_scenes(2000)):
        written = phrase(scene, random.Random(i))
        assert read_prompt(written.text) == written.stated, written.text
        assert matches_grammar(written.text), written.text


def test_the_template_style_is_the_first_models_caption_and_states_everything():
    for scene in _scenes(50):
        assert caption(scene, random.Random(0), "template") == scene.caption
        assert read_prompt(scene.caption) == stated_all(scene)
    with pytest.raises(ValueError, match="unknown caption style"):
        caption(_scenes(1)[0], random.Random(0), "poetry")


def test_varied_captions_use_every_form_the_grammar_documents():
    texts = [caption(s, random.Random(i)) for i, s in enumerate(_scenes(3000))]
    words = Counter(w for t in texts for w in re.findall(r"[a-z]+", t.lower()))
    assert set(words) == vocabulary("varied")  # every word of the grammar occurs, and no other
    assert vocabulary("template") < vocabulary("varied")
    lowered = [t.lower() for t in texts]
    assert any(t.isupper() for t in texts) and any(t.islower() for t in texts)
    assert any("," not in t for t in texts) and any(t.startswith("on ") for t in lowered)  # reordered
    assert any(" a " not in f" {t} " and " an " not in f" {t} " for t in lowered)
    forms = {f.replace("the ", "") for fs in POSITION_WORDS.values() for f in fs} | {
        f for fs in POSITION_WORDS.values() for f in fs}
    assert any(clause in forms for t in lowered for clause in t.split(", "))  # short form: "..., left, ..."
    assert any(" next to " in t for t in lowered)
    facts = [read_prompt(t) for t in texts]
    for attr in ("size", "colour", "position"):
        share = sum(getattr(f.shapes[0], attr) is None for f in facts if len(f.shapes) == 1) / len(facts)
        assert 0.08 < share < 0.25, (attr, share)  # omitted about a fifth of the time (of 70% one-shape)
    assert all(f.shapes[i].position for f in facts if len(f.shapes) == 2 for i in (0, 1))


def test_two_shapes_come_in_both_orders_and_parse_to_their_own_positions():
    orders = Counter()
    for i, scene in enumerate(_scenes(400, two=1.0)):
        written = phrase(scene, random.Random(i))
        first = written.stated.shapes[0]
        orders[first.position == scene.shapes[0].position] += 1
        assert {s.position for s in written.stated.shapes} == {s.position for s in scene.shapes}
    assert min(orders.values()) > 100


def test_the_parser_on_hand_written_prompts():
    assert read_prompt("on a blue background, a red circle on the left") == PromptFacts(
        (Stated("circle", "red", None, "on the left"),), "blue")
    assert read_prompt("RED CIRCLE, LEFT, BLUE BACKGROUND") == read_prompt("red circle left blue background")
    assert read_prompt("big triangle in the middle") == PromptFacts((Stated("triangle", None, "large",
                                                                            "in the center"),))
    two = read_prompt("a small purple square on the right and a large orange circle on the left")
    assert [(s.kind, s.position) for s in two.shapes] == [("square", "on the right"),
                                                          ("circle", "on the left")]
    assert read_prompt("a photograph of a cat") == PromptFacts(())


def test_no_free_phrasing_template_is_a_caption_the_training_grammar_can_write():
    scenes_one, scenes_two = _scenes(300, two=0.0), _scenes(300, two=1.0, seed=4)
    for template in ONE_SHAPE + TWO_SHAPES:
        scenes = scenes_one if template in ONE_SHAPE else scenes_two
        for i, scene in enumerate(scenes):
            written = fill(template, scene, random.Random(i), swap=bool(i % 2))
            assert not matches_grammar(written.text), (template, written.text)
    # the recogniser is not blind: the grammar's own forms of the same scenes match
    assert all(matches_grammar(caption(s, random.Random(i))) for i, s in enumerate(scenes_one + scenes_two))


def test_free_phrasing_uses_only_words_the_grammar_teaches_and_parses_to_its_truth():
    for i, scene in enumerate(_scenes(600, two=0.5, seed=9)):
        written = free_phrase(scene, random.Random(i))
        assert set(re.findall(r"[a-z]+", written.text.lower())) <= vocabulary("varied"), written.text
        assert read_prompt(written.text) == written.stated, written.text


def test_every_position_phrase_has_a_keyword_the_parser_reads():
    for position, forms in POSITION_WORDS.items():
        for form in forms:
            assert read_prompt(f"circle {form}").shapes[0].position == position, form
