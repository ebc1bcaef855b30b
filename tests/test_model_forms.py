"""One model, every form: the embedded model as a model folder, a single file alone and a diffusers folder.

Every command that takes a model takes each form, and a single file without its folder either carries
its own tokenizer in its header or is refused with one line naming the tokenizer and where it goes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import openldm
from openldm.checkpoints.io import CheckpointError, read_metadata
from openldm.checkpoints.load import load_components
from openldm.checkpoints.save import save_single_file
from openldm.cli import main
from openldm.config import SHAPES_PHRASING

EMBEDDED = Path(openldm.__file__).parent / "weights" / "shapes"
pytestmark = pytest.mark.usefixtures("one_thread")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_single_file_without_its_tokenizer_is_refused_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    source = EMBEDDED / "model.safetensors"  # the weights alone: without the folder or the file's own copy
    metadata = {k: v for k, v in read_metadata(source).items() if k != "openldm.tokenizer"}
    save_file(load_file(source), tmp_path / "model.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError) as info:
        load_components(tmp_path / "model.safetensors")
    message = str(info.value)
    assert "\n" not in message
    assert "the tokenizer has 49408 tokens but the text encoder's embedding table 632" in message
    assert "tokenizer/ folder beside the weights" in message


def test_a_single_file_we_write_carries_its_tokenizer(tmp_path):
    folder = load_components(EMBEDDED)
    assert folder.config == SHAPES_PHRASING and len(folder.tokenizers[0].vocab) == 632
    alone = save_single_file(folder, tmp_path / "alone" / "shapes.safetensors")
    assert "openldm.tokenizer" in read_metadata(alone)
    again = load_components(alone)
    assert again.tokenizers[0].vocab == folder.tokenizers[0].vocab
    assert again.tokenizers[0].merges == folder.tokenizers[0].merges
    text = "a red circle on a blue square"
    assert torch.equal(again.tokenizers[0]([text]), folder.tokenizers[0]([text]))


def test_info_and_convert_take_a_model_folder(capsys, tmp_path):
    code, out, err = _run(capsys, "info", str(EMBEDDED), "--json")
    assert code == 0, err
    facts = json.loads(out)
    assert (facts["preset"], facts["model"], facts["layout"]) == ("shapes-phrasing", "shapes-phrasing",
                                                                  "single-file")
    assert not any(k.startswith("openldm.tokenizer") for k in facts["metadata"])
    code, out, err = _run(capsys, "convert", str(EMBEDDED), str(tmp_path / "diffusers"), "--to", "diffusers")
    assert code == 0, err
    vocab = json.loads((tmp_path / "diffusers" / "tokenizer" / "vocab.json").read_text())
    assert len(vocab) == 632  # the model's own vocabulary, not CLIP's 49,408 tokens
    config = json.loads((tmp_path / "diffusers" / "unet" / "config.json").read_text())
    assert config["norm_num_groups"] == 8
    assert json.loads((tmp_path / "diffusers" / "vae" / "config.json").read_text())["norm_num_groups"] == 4
    code, out, err = _run(capsys, "info", str(tmp_path / "diffusers"), "--json")
    assert code == 0 and json.loads(out)["preset"] == "shapes-phrasing", err


def test_info_on_a_non_preset_checkpoint_says_what_was_inferred_from_what(capsys, tmp_path):
    from dataclasses import replace

    from openldm.checkpoints.io import write_safetensors_atomic
    from openldm.checkpoints.save import random_state_dict
    from openldm.config import TINY_SD1

    text = replace(TINY_SD1.text_encoders[0], hidden_size=64, num_heads=1)
    unet = replace(TINY_SD1.unet, num_res_blocks=(1, 2), transformer_depth_middle=None, context_dim=64,
                   num_heads=8)
    path = tmp_path / "bk-sdm-like.safetensors"  # no openldm metadata: everything from shapes and conventions
    write_safetensors_atomic(path, random_state_dict(replace(TINY_SD1, unet=unet, text_encoders=(text,))))
    code, out, err = _run(capsys, "info", str(path), "--json")
    assert code == 0, err
    facts = json.loads(out)
    assert (facts["model"], facts["preset"]) == ("custom SD1-family (inferred)", "custom-sd1")
    assert facts["inferred"]["unet heads"] == "SD1 convention (8 heads)"
    assert facts["inferred"]["prediction"] == "default (eps)"
    code, out, err = _run(capsys, "info", str(path), "--prediction", "v")
    assert "custom SD1-family (inferred) (family sd1, v prediction)" in out and "from --prediction" in out
