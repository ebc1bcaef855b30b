"""FileWeights: torch's copy of a component dropped while its file can give it back, read back on demand."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_checkpoint

from openldm.checkpoints.load import load_components
from openldm.engines import cache
from openldm.engines.weights import FileWeights, file_identity


def _weights(tmp_path):
    module = torch.nn.Linear(3, 2)
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    reads: list[int] = []

    def read():
        reads.append(1)
        return {k: v.clone() for k, v in saved.items()}

    path = tmp_path / "w.bin"
    path.write_bytes(b"x")
    return FileWeights(module, read, file_identity(path, "unet", torch.float32), torch.device("cpu"),
                       torch.float32), saved, reads


def test_pristine_weights_are_dropped_and_read_back_equal(tmp_path):
    weights, saved, reads = _weights(tmp_path)
    assert weights.release() and weights.released
    assert all(p.is_meta for p in weights.module.parameters())
    assert (weights.device, weights.dtype) == (torch.device("cpu"), torch.float32)  # where they will be
    module = weights.materialize()
    assert reads == [1] and not weights.released and weights.pristine()
    for key, value in module.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_weights_changed_in_memory_are_never_dropped(tmp_path):
    weights, _, _ = _weights(tmp_path)
    with torch.no_grad():
        weights.module.weight.add_(1)  # as a LoRA merge does
    assert not weights.pristine()
    assert not weights.release() and not weights.released
    weights.mark_pristine()  # what the cache does once the bytes equal the file's again
    assert weights.release()


def test_the_identity_follows_the_file_and_the_placement(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"one")
    first = file_identity(path, "unet", torch.float32)
    assert first == file_identity(path, "unet", torch.float32)
    assert first != file_identity(path, "unet", torch.float16)
    assert first != file_identity(path, "vae", torch.float32)
    path.write_bytes(b"other")
    os.utime(path, ns=(1, 1))
    assert first != file_identity(path, "unet", torch.float32)


def test_a_deferred_unet_is_not_read_until_needed_and_then_matches(tmp_path):
    path = make_checkpoint(tmp_path, "tiny-sd1", dtype=torch.float16)
    lazy = load_components(path, dtype=torch.float32, defer_unet=True)
    assert all(p.is_meta for p in lazy.unet.parameters())
    assert not lazy.unet.training  # built for inference, as the loaded components are
    eager = load_components(path, dtype=torch.float32)
    got = lazy.unet_weights.materialize().state_dict()
    for key, value in eager.unet.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(got[key], value), key


@pytest.fixture(scope="module")
def openvino_run(tmp_path_factory, one_thread):
    pytest.importorskip("openvino")
    from openldm.engines.openvino import OpenVINO
    from openldm.pipelines.loading import load

    root = tmp_path_factory.mktemp("ov")
    path = make_checkpoint(root, "tiny-sd1")
    notes: list[str] = []
    pipe = load(path, engine=OpenVINO(root=root / "cache", log=notes.append))
    images = pipe.txt2img("a red square", steps=2, seed=3)
    return pipe, images, notes, path, root


def test_after_an_openvino_run_only_the_program_holds_the_unet(openvino_run):
    pipe, _, notes, _, _ = openvino_run
    assert [n for n in notes if "converting" in n], "nothing was converted"
    assert all(p.is_meta for p in pipe.components.unet.parameters()), "torch's UNet weights stayed"
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_after_an_openvino_run_its_cached_program_is_not_resident_twice(openvino_run):
    """The plugin keeps its own copy of the weights: of its mappings of the cache files, only the few
    constants it reads in place come back (without the drop, all of what it compiled from stays)."""
    from test_pages import resident_kib

    _, _, _, _, root = openvino_run
    files = [f.resolve() for f in (root / "cache").rglob("*") if f.is_file()]
    mapped = [f for f in files if str(f) in Path("/proc/self/maps").read_text()]
    assert mapped, "OpenVINO maps no cache file: nothing left to check"
    resident = sum(resident_kib(f) for f in mapped) * 1024
    size = sum(f.stat().st_size for f in mapped)
    assert resident < 0.25 * size, f"{resident / size:.0%} of the mapped cache files is resident"


def test_eager_after_release_reads_the_unet_back_and_draws_the_same(openvino_run):
    import numpy as np

    pipe, images, _, _, _ = openvino_run
    engine, reads = pipe.unet_runner.engine, pipe.components.unet_weights.reads  # read once to convert
    pipe.set_engine("eager")
    try:
        again = pipe.txt2img("a red square", steps=2, seed=3)
    finally:
        pipe.set_engine(engine)
    assert not any(p.is_meta for p in pipe.components.unet.parameters())
    assert pipe.components.unet_weights.reads == reads + 1
    err = np.abs(np.asarray(again[0], float) - np.asarray(images[0], float)).max()
    assert err <= 1, f"eager after release differs by {err}/255"


def test_a_restart_finds_the_program_without_reading_the_unet(openvino_run):
    from openldm.engines.openvino import OpenVINO
    from openldm.pipelines.loading import load

    _, images, _, path, root = openvino_run
    notes: list[str] = []
    pipe = load(path, engine=OpenVINO(root=root / "cache", log=notes.append))
    again = pipe.txt2img("a red square", steps=2, seed=3)
    assert not [n for n in notes if "converting" in n], notes
    assert pipe.components.unet_weights.reads == 0, "the UNet was read although its program was cached"
    assert list(again[0].getdata()) == list(images[0].getdata())


def test_a_restart_keys_the_vae_decoder_by_its_file_and_keeps_torchs_vae(openvino_run, monkeypatch):
    """Hashing the VAE's tensors for its cache key took 0.23 s of every full-size run: a restart names
    them by the file instead, while they are unchanged; changed ones are hashed (a new entry)."""
    from openldm.engines.openvino import OpenVINO
    from openldm.pipelines.loading import load

    _, images, _, path, root = openvino_run
    hashed: list[str] = []
    real = cache.tensor_hash
    monkeypatch.setattr(cache, "tensor_hash",
                        lambda module: hashed.append(type(module).__name__) or real(module))
    notes: list[str] = []
    pipe = load(path, engine=OpenVINO(root=root / "cache", log=notes.append))
    again = pipe.txt2img("a red square", steps=2, seed=3)
    assert hashed == [] and not [n for n in notes if "converting" in n], (hashed, notes)
    assert list(again[0].getdata()) == list(images[0].getdata())
    assert not any(p.is_meta for p in pipe.vae.parameters()), "the VAE was dropped: its encoder needs it"
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias.add_(0.5)
    changed = pipe.txt2img("a red square", steps=2, seed=3)
    assert hashed == ["AutoencoderKL"], hashed
    assert [n for n in notes if "converting vae_decoder" in n], notes
    assert list(changed[0].getdata()) != list(images[0].getdata())


def test_weights_that_are_not_releasable_are_only_named(tmp_path):
    weights, _, reads = _weights(tmp_path)
    weights.releasable = False
    assert not weights.release() and not weights.released and weights.pristine()
    assert weights.materialize() is weights.module and reads == []


def _pixels(images):
    return [image.tobytes() for image in images]


@pytest.mark.parametrize("config", ["tiny-sd1", "tiny-sdxl"])  # one CLIP; CLIP and OpenCLIP (converted)
def test_text_encoders_not_held_go_back_to_their_file_and_draw_the_same(tmp_path, config):
    from openldm.pipelines.loading import load

    path = make_checkpoint(tmp_path, config, dtype=torch.float16)
    held = load(path)
    expected = [held.txt2img(p, steps=2, seed=3) for p in ("a red square", "a blue circle")]
    pipe = load(path)
    pipe.hold_text_encoders = False
    encoders = pipe.text_encoders
    assert _pixels(pipe.txt2img("a red square", steps=2, seed=3)) == _pixels(expected[0])
    for encoder in encoders:
        assert encoder.weights.released and all(p.is_meta for p in encoder.model.parameters())
        assert encoder.placement == (torch.device("cpu"), torch.float32)  # where they come back to
    assert _pixels(pipe.txt2img("a red square", steps=2, seed=3, batch_count=2)[:1]) == _pixels(expected[0])
    assert [e.weights.reads for e in encoders] == [0] * len(encoders), "an encoded prompt read them back"
    assert _pixels(pipe.txt2img("a blue circle", steps=2, seed=3)) == _pixels(expected[1])
    assert [(e.weights.reads, e.weights.released) for e in encoders] == [(1, True)] * len(encoders)


def test_text_encoders_holding_a_lora_merge_stay(tmp_path):
    from helpers import write_tiny_lora

    from openldm.networks import load_network
    from openldm.pipelines.loading import load

    path = make_checkpoint(tmp_path, "tiny-sd1")
    write_tiny_lora(tmp_path / "style.safetensors", 1)
    pipe = load(path)
    pipe.hold_text_encoders = False
    [encoder] = pipe.text_encoders
    with pipe.merge_networks([(load_network(tmp_path / "style.safetensors"), 0.8)]):
        pipe.txt2img("a red square", steps=1, seed=3)
        assert not encoder.weights.released, "weights merged in memory were dropped"
    held = load(path)
    after = pipe.txt2img("a green star", steps=1, seed=3)  # the merge undone: the file's model draws
    assert _pixels(after) == _pixels(held.txt2img("a green star", steps=1, seed=3))
