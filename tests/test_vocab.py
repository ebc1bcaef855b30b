"""The small BPE vocabulary learned from captions (the embedded model's tokenizer)."""

from collections import Counter

import pytest

from openldm.data.shapes import ShapesConfig, ShapesDataset
from openldm.models.tokenizer import CLIPTokenizer
from openldm.training.vocab import build_tokenizer, caption_words, learn_merges


@pytest.fixture(scope="module")
def captions():
    dataset = ShapesDataset(2000, ShapesConfig(two_shape_fraction=0.3), seed=5)
    return [dataset.scene(i)[0].caption for i in range(len(dataset))]


def test_every_caption_word_is_one_token(captions):
    tokenizer = build_tokenizer(captions)
    for word in caption_words(captions):
        assert len(tokenizer.encode(word)) == 1, word


def test_layout_matches_clip(captions):
    tokenizer = build_tokenizer(captions, max_length=32)
    assert tokenizer.end_id == len(tokenizer.vocab) - 1 and tokenizer.start_id == len(tokenizer.vocab) - 2
    assert len(tokenizer.vocab) == 512 + len(tokenizer.merges) + 2
    ids = tokenizer(["a small red circle on the left, on a blue background"])
    assert ids.shape == (1, 32)
    assert ids[0, 0] == tokenizer.start_id and (ids[0, 13:] == tokenizer.end_id).all()


def test_unknown_words_fall_back_to_bytes(captions):
    tokenizer = build_tokenizer(captions)
    assert len(tokenizer.encode("zebra")) == 5


def test_merges_are_learned_most_frequent_first():
    # pairs: (a, a) 10 times, (a, b</w>) 10 + 1 times: the second wins, then "aab" needs one more.
    merges = learn_merges(Counter({"aab": 10, "ab": 1}))
    assert merges == [("a", "b</w>"), ("a", "ab</w>")]


def test_saved_vocabulary_round_trips_and_matches_transformers(tmp_path, captions):
    transformers = pytest.importorskip("transformers")
    tokenizer = build_tokenizer(captions, max_length=32)
    tokenizer.save(tmp_path)
    again = CLIPTokenizer.from_folder(tmp_path, max_length=32)
    reference = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    for caption in captions[:200] + ["a purple zebra, at night!", "A LARGE Green Square"]:
        ours = tokenizer.encode(caption)
        assert again.encode(caption) == ours
        assert reference(caption, add_special_tokens=False)["input_ids"] == ours


def test_extending_makes_new_words_one_token_and_keeps_every_old_id(captions):
    from openldm.training.vocab import extend_tokenizer

    old = build_tokenizer(captions, max_length=32)
    new = extend_tokenizer(old, ["a big circle next to a little square", "in the middle"])
    for word in ("big", "next", "little", "middle", "circle"):
        assert len(new.encode(word)) == 1, word
    for token, i in old.vocab.items():
        if i < old.start_id:
            assert new.vocab[token] == i, token  # a word the old tokenizer knew keeps its ids
    assert (new.start_id, new.end_id) == (len(new.vocab) - 2, len(new.vocab) - 1)
    assert old.encode("a small red circle") == new.encode("a small red circle")
    assert new.max_length == 32 and new.pad_id == new.end_id
    assert extend_tokenizer(new, ["a big circle"]) is new  # nothing new: the same tokenizer


def test_carried_embedding_keeps_old_rows_and_starts_new_ones_from_their_spelling(captions):
    import torch

    from openldm.training.vocab import carry_embedding, extend_tokenizer

    old = build_tokenizer(captions)
    new = extend_tokenizer(old, ["big"])
    weight = torch.randn(len(old.vocab), 8)
    rows = carry_embedding(weight, old, new)
    assert rows.shape == (len(new.vocab), 8)
    assert torch.equal(rows[new.end_id], weight[old.end_id])
    assert torch.equal(rows[:old.start_id], weight[:old.start_id])
    (big,) = new.encode("big")
    assert torch.allclose(rows[big], weight[list(old.encode("big"))].mean(0))
