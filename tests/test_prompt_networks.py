"""LoRAs and embeddings that prompts name, found in folders: `openldm.load(lora_dirs=, embedding_dirs=)`,
`--lora-dir` and `--embeddings`, on tiny random checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import openldm
from openldm import cli
from openldm.checkpoints.io import CheckpointError
from openldm.networks import NetworkLibrary, load_network
from openldm.pipelines.infotext import read_png
from openldm.pipelines.params import GenerationParams
from tests.helpers import make_checkpoint, write_tiny_lora

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = {"steps": 2, "cfg": 5.0, "seed": 6}


@pytest.fixture(scope="module")
def files(tmp_path_factory, one_thread):
    """A tiny-sd1 checkpoint; a LoRA folder with a subfolder, a hidden folder and a stray file."""
    root = tmp_path_factory.mktemp("networks")
    loras = root / "loras"
    write_tiny_lora(loras / "styles" / "style.safetensors", 1)
    write_tiny_lora(loras / "other.safetensors", 2)
    write_tiny_lora(loras / ".trash" / "hidden.safetensors", 3)
    (loras / "notes.txt").write_text("not a network")
    return make_checkpoint(root, "tiny-sd1"), loras


@pytest.fixture
def pipe(files):
    checkpoint, loras = files
    return openldm.load(checkpoint, lora_dirs=[loras])


def _weights(pipe) -> dict[str, torch.Tensor]:
    models = {"unet": pipe.unet, **{f"te{i}": e.model for i, e in enumerate(pipe.text_encoders)}}
    return {f"{c}.{k}": v.detach().clone() for c, m in models.items() for k, v in m.state_dict().items()}


def _assert_same(pipe, before: dict[str, torch.Tensor]) -> None:
    changed = [k for k, v in _weights(pipe).items() if not torch.equal(v, before[k])]
    assert not changed, changed[:5]


def _latent(pipe, prompt: str, negative: str = "", **settings) -> torch.Tensor:
    return pipe.generate(GenerationParams(prompt, negative=negative, **FAST), **settings)[0].latent


# --- LoRAs named in prompts --------------------------------------------------------------------

def test_tag_merges_its_file_for_one_run_only(pipe, files):
    """`<lora:style:0.8>` equals merging style.safetensors at 0.8 by hand, the tag left out of the text."""
    before = _weights(pipe)
    plain = _latent(pipe, "a red circle")
    results = pipe.generate(GenerationParams("a red circle <lora:style:0.8>", **FAST))
    _assert_same(pipe, before)  # bit for bit, not a subtraction
    with pipe.merge_networks([(load_network(files[1] / "styles" / "style.safetensors"), 0.8)]):
        by_hand = _latent(pipe, "a red circle")
    _assert_same(pipe, before)
    assert torch.equal(results[0].latent, by_hand)
    assert not torch.equal(plain, by_hand), "the LoRA changed nothing: the test would prove nothing"
    assert torch.equal(_latent(pipe, "a red circle"), plain)
    assert results[0].params.prompt == "a red circle <lora:style:0.8>"  # kept for the infotext
    [report] = results[0].networks
    assert (report.name, report.multiplier, report.matched) == ("style", 0.8, {"unet": 3, "text_encoder": 3})
    # a tag in the negative prompt is taken out of its text and merged too; <lyco:> names the same files
    assert torch.equal(_latent(pipe, "a red circle", "<lyco:style:0.8>"), by_hand)


def test_weights_come_back_when_a_run_fails(pipe):
    before = _weights(pipe)
    name = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    seen = []

    def stop(step, total, denoised):
        seen.append(torch.equal(pipe.unet.get_parameter(name), before[f"unet.{name}"]))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipe.generate(GenerationParams("x <lora:style:-1>", **FAST), callback=stop)
    assert seen == [False]  # merged while sampling
    _assert_same(pipe, before)


@pytest.mark.parametrize(("prompt", "message"), [
    ("x <lora:nope:1>", r"no LoRA named 'nope' \(<lora:nope>\) in .*loras; available: other, style$"),
    ("x <hypernet:style:1>", "hypernet networks are not supported"),
])
def test_bad_tags_fail_before_touching_the_model(pipe, prompt, message):
    before = _weights(pipe)
    with pytest.raises(CheckpointError, match=message):
        pipe.generate(GenerationParams(prompt, **FAST))
    _assert_same(pipe, before)


def test_tags_without_lora_folders_say_how_to_give_them(files):
    with pytest.raises(CheckpointError, match=r"names <lora:style>, but no LoRA folders .* --lora-dir"):
        openldm.load(files[0]).generate(GenerationParams("x <lora:style>", **FAST))
    with pytest.raises(CheckpointError, match="LoRA folder .*missing does not exist"):
        openldm.load(files[0], lora_dirs=[files[1] / "missing"])


def test_a_file_added_later_is_found(pipe, files, tmp_path):
    extra = tmp_path / "late"
    write_tiny_lora(extra / "first.safetensors", 4)
    pipe.networks = NetworkLibrary(extra)  # one folder, given alone
    write_tiny_lora(extra / "added.safetensors", 4)
    assert torch.equal(_latent(pipe, "x <lora:added:0.5>"), _latent(pipe, "x <lora:first:0.5>"))


# --- embeddings named in prompts ---------------------------------------------------------------

def test_embedding_changes_the_image_only_when_named(files, tmp_path):
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    vectors = torch.randn(2, 32) * 3
    torch.save({"string_to_param": {"*": vectors}, "name": "ignored"}, folder / "sub" / "shinyword.pt")
    save_file({"emb_params": torch.randn(1, 48)}, folder / "wide.safetensors")  # an SD2-width file, say
    plain = openldm.load(files[0])
    with pytest.warns(UserWarning, match=r"wide.safetensors: skipped: .*text_encoder is 32 wide"):
        named = openldm.load(files[0], embedding_dirs=[folder])
    assert list(named.text_encoders[0].embeddings) == ["shinyword"]
    assert torch.equal(named.text_encoders[0].embeddings["shinyword"], vectors)
    assert torch.equal(_latent(named, "a red circle"), _latent(plain, "a red circle"))
    assert not torch.equal(_latent(named, "a shinyword circle"), _latent(plain, "a shinyword circle"))


def test_sdxl_embedding_gives_each_encoder_its_part(tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    clip_l, clip_g = torch.randn(2, 32), torch.randn(2, 32)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, folder / "xl.safetensors")
    save_file({"emb_params": torch.randn(1, 32)}, folder / "sd1.safetensors")
    with pytest.warns(UserWarning, match="sd1.safetensors: skipped: .*2 text encoders"):
        pipe = openldm.load(make_checkpoint(tmp_path, "tiny-sdxl"), embedding_dirs=[folder])
    first, second = (encoder.embeddings for encoder in pipe.text_encoders)
    assert list(first) == list(second) == ["xl"]
    assert torch.equal(first["xl"], clip_l) and torch.equal(second["xl"], clip_g)


def _truncated(path) -> None:
    """An interrupted download: the first half of a good A1111 embedding."""
    torch.save({"string_to_param": {"*": torch.randn(2, 32)}}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(("name", "write", "message"), [
    ("broken.pt", _truncated, "broken.pt: corrupt or truncated"),
    ("broken.safetensors", lambda path: path.write_bytes(b"\x08" + bytes(7) + b"{}"), "broken.safetensors"),
    ("lora.safetensors", lambda path: write_tiny_lora(path, 0),
     "lora.safetensors: lora: not a textual-inversion"),
])
def test_a_file_that_is_no_embedding_is_an_error(files, tmp_path, name, write, message):
    write(tmp_path / name)
    with pytest.raises(CheckpointError, match=message):
        openldm.load(files[0], embedding_dirs=[tmp_path])


def test_missing_embedding_folder_is_an_error(files, tmp_path):
    with pytest.raises(CheckpointError, match="embedding folder .*gone does not exist"):
        openldm.load(files[0], embedding_dirs=[tmp_path / "gone"])
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="embedding folder .*file is not a folder"):
        openldm.load(files[0], embedding_dirs=[tmp_path / "file"])


# --- the command line ----------------------------------------------------------------------------

def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_cli_lora_dir_reports_records_and_reproduces(files, tmp_path, capsys):
    checkpoint, loras = files
    common = ["--model", checkpoint, "--steps", 2, "--cfg", 5, "--seed", 6]
    tagged, by_file, again = tmp_path / "tagged.png", tmp_path / "by_file.png", tmp_path / "again.png"
    assert run("txt2img", "a red circle <lora:style:0.8>", *common, "--lora-dir", loras, "-o", tagged) == 0
    assert "style x0.8: applied 3 text_encoder, 3 unet keys" in capsys.readouterr().err
    assert read_png(tagged)[0].startswith("a red circle <lora:style:0.8>\nSteps: 2")
    style = loras / "styles" / "style.safetensors"
    assert run("txt2img", "a red circle", *common, "--lora", f"{style}:0.8", "-o", by_file) == 0
    assert np.array_equal(pixels(tagged), pixels(by_file))
    assert run("txt2img", "--from-png", tagged, "--model", checkpoint, "--lora-dir", loras, "-o", again) == 0
    assert read_png(again) == read_png(tagged) and np.array_equal(pixels(again), pixels(tagged))


def test_cli_embeddings(files, tmp_path, capsys):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    torch.save({"string_to_param": {"*": torch.randn(2, 32) * 3}}, folder / "shinyword.pt")
    save_file({"emb_params": torch.randn(1, 48)}, folder / "wide.safetensors")
    common = ["--model", files[0], "--steps", 2, "--cfg", 5, "--seed", 6]
    images = {}
    for prompt in ("a red circle", "a shinyword circle"):
        for given in ((), ("--embeddings", folder)):
            out = tmp_path / f"{prompt}-{len(given)}.png"
            assert run("txt2img", prompt, *common, *given, "-o", out) == 0
            images[prompt, bool(given)] = pixels(out)
    assert "warning: " in capsys.readouterr().err  # wide.safetensors fits no encoder of tiny-sd1
    assert np.array_equal(images["a red circle", False], images["a red circle", True])
    assert not np.array_equal(images["a shinyword circle", False], images["a shinyword circle", True])


@pytest.mark.parametrize(("given", "message"), [
    (["x <lora:nope>", "--lora-dir", "{loras}"], "no LoRA named 'nope' (<lora:nope>) in "),
    (["x <lora:style>"], "pass --lora-dir DIR"),
    (["x", "--lora-dir", "{tmp}/gone"], "LoRA folder"),
    (["x", "--embeddings", "{tmp}/gone"], "embedding folder"),
])
def test_cli_bad_folders_and_names_fail_in_one_line(files, tmp_path, capsys, given, message):
    out = tmp_path / "out.png"
    argv = [a.format(loras=files[1], tmp=tmp_path) for a in given]
    assert run("txt2img", *argv, "--model", files[0], "--steps", 2, "-o", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_help_names_the_folder_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["txt2img", "--help"])
    text = capsys.readouterr().out
    assert "--lora-dir DIR" in text and "--embeddings DIR" in text and "<lora:NAME:WEIGHT>" in text
