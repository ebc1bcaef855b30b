"""Textual-inversion files in every format load to the same vectors; misfits fail loudly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from openldm.checkpoints.io import CheckpointError
from openldm.config import SD2_BASE, SD15, SDXL_BASE, SDXL_REFINER, TINY_SD1, TINY_SDXL
from openldm.networks import load_embedding, parse_embedding

VECTORS = torch.randn(3, 32)


def _a1111_pt(path, vectors):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "other-name",
                "step": 1500, "sd_checkpoint": "a9263745", "sd_checkpoint_name": "v1-5-pruned"}, path)


WRITERS = {
    "a1111.pt": _a1111_pt,
    "a1111.safetensors": lambda path, v: save_file({"emb_params": v}, path),
    "learned_embeds.bin": lambda path, v: torch.save({"<a1111>": v}, path),
    "diffusers.safetensors": lambda path, v: save_file({"<a1111>": v}, path),
}


@pytest.mark.parametrize("filename", list(WRITERS))
def test_every_format_loads_the_same_vectors(tmp_path, filename):
    path = tmp_path / filename
    WRITERS[filename](path, VECTORS)
    embedding = load_embedding(path)
    assert embedding.num_vectors == 3
    # the trigger word is the file stem, except a diffusers file kept under its generic name
    assert embedding.name == ("<a1111>" if filename.startswith("learned_embeds") else path.stem)
    assert torch.equal(embedding.for_model(TINY_SD1)["text_encoder"], VECTORS)
    assert load_embedding(path, name="mine").name == "mine"


def test_single_vector_diffusers_file_is_one_row(tmp_path):
    torch.save({"<cat>": VECTORS[0]}, tmp_path / "cat.bin")
    embedding = load_embedding(tmp_path / "cat.bin")
    assert embedding.num_vectors == 1
    assert torch.equal(embedding.for_model(TINY_SD1)["text_encoder"], VECTORS[:1])


def test_sdxl_embedding_routes_clip_l_and_clip_g(tmp_path):
    clip_l, clip_g = torch.randn(2, 32), torch.randn(2, 32)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, tmp_path / "xl.safetensors")
    vectors = load_embedding(tmp_path / "xl.safetensors").for_model(TINY_SDXL)
    assert vectors.keys() == {"text_encoder", "text_encoder_2"}
    assert torch.equal(vectors["text_encoder"], clip_l) and torch.equal(vectors["text_encoder_2"], clip_g)


def test_full_size_widths_route_and_check():
    """Presets only are used here (no models built): the check reads the encoders' widths."""
    xl = parse_embedding({"clip_l": torch.zeros(2, 768), "clip_g": torch.ones(2, 1280)}, "xl")
    assert [tuple(v.shape) for v in xl.for_model(SDXL_BASE).values()] == [(2, 768), (2, 1280)]
    refiner = xl.for_model(SDXL_REFINER)
    assert list(refiner) == ["text_encoder"] and torch.equal(refiner["text_encoder"], torch.ones(2, 1280))
    sd1 = parse_embedding({"emb_params": torch.zeros(4, 768)}, "sd1")
    assert sd1.for_model(SD15)["text_encoder"].shape == (4, 768)
    with pytest.raises(CheckpointError, match="1024 wide"):
        sd1.for_model(SD2_BASE)
    with pytest.raises(CheckpointError, match="2 text encoders"):
        sd1.for_model(SDXL_BASE)
    with pytest.raises(CheckpointError, match="not for sd15"):
        xl.for_model(SD15)
    swapped = parse_embedding({"clip_l": torch.zeros(1, 1280), "clip_g": torch.zeros(1, 768)}, "swapped")
    with pytest.raises(CheckpointError, match="text_encoder is 768 wide"):
        swapped.for_model(SDXL_BASE)


def test_unknown_and_inconsistent_files_fail(tmp_path):
    with pytest.raises(CheckpointError, match=r"\['bar', 'foo'\]"):
        parse_embedding({"foo": torch.zeros(2, 4), "bar": torch.zeros(2, 4)}, "x")
    with pytest.raises(CheckpointError, match="differ in length"):
        parse_embedding({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)}, "x")
    with pytest.raises(CheckpointError, match="shape"):
        parse_embedding({"emb_params": torch.zeros(1, 2, 768)}, "x")
    # the original textual-inversion code pickled an nn.ParameterDict: not a plain tensor file
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(VECTORS)})
    torch.save({"string_to_param": params}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_embedding(tmp_path / "old.pt")
