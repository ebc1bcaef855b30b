import os
import pickle
import resource
import sys

import pytest
import torch
from safetensors.torch import save_file

from openldm.checkpoints.io import CheckpointError, read_metadata, read_state_dict, write_safetensors_atomic


class _WritesMarker:
    """A pickle payload that would create a file if anything unpickled it for real."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_safetensors_round_trip_keeps_values_and_metadata(tmp_path):
    tensors = {"a.weight": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).half()}
    path = write_safetensors_atomic(tmp_path / "x.safetensors", tensors, {"openldm.prediction": "v"})
    read, metadata = read_state_dict(path)
    assert metadata == {"openldm.prediction": "v"}
    assert read_metadata(path) == metadata
    assert read.keys() == tensors.keys()
    for key, value in tensors.items():
        assert read[key].dtype == value.dtype and torch.equal(read[key], value), key


@pytest.mark.parametrize("keep", [0, 7, 100, 0.5])
def test_truncated_safetensors_is_a_checkpoint_error_naming_the_file(tmp_path, keep):
    whole = tmp_path / "whole.safetensors"
    save_file({"w": torch.randn(64, 64)}, whole)
    data = whole.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: corrupt or truncated"):
        read_state_dict(cut)


@pytest.mark.parametrize("use_torch_save", [True, False])
def test_malicious_pickle_is_refused_and_never_run(tmp_path, use_torch_save):
    marker = tmp_path / "pwned"
    payload = {"state_dict": {"w": torch.ones(2)}, "evil": _WritesMarker(marker)}
    path = tmp_path / "evil.ckpt"
    if use_torch_save:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "evil.ckpt" in message and "execute code" in message and ".safetensors" in message
    assert not marker.exists()


def test_ckpt_nested_state_dict_is_unwrapped_and_bookkeeping_dropped(tmp_path):
    weights = {"model.diffusion_model.w": torch.randn(2, 2), "first_stage_model.b": torch.randn(3)}
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": weights, "global_step": 470000, "epoch": 3}, path)
    read, metadata = read_state_dict(path)
    assert metadata == {}
    assert read.keys() == weights.keys()
    assert all(torch.equal(read[k], v) for k, v in weights.items())


def test_legacy_torch_format_reads(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.arange(4.0)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(read_state_dict(path)[0]["w"], torch.arange(4.0))


def test_truncated_ckpt_and_other_bad_files(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.randn(100)}}, good)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cut.ckpt: corrupt or truncated"):
        read_state_dict(cut)
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "missing.safetensors")
    (tmp_path / "x.onnx").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown checkpoint type '.onnx'"):
        read_state_dict(tmp_path / "x.onnx")
    torch.save({"state_dict": {"step": 3}}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="holds no tensors"):
        read_state_dict(tmp_path / "empty.pt")


def test_safetensors_are_memory_mapped_not_copied(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({f"t{i}": torch.ones(1024, 1024) for i in range(64)}, path)  # 256 MiB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tensors, _ = read_state_dict(path)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert len(tensors) == 64
    assert grown_mib < 64, f"reading grew peak RSS by {grown_mib:.0f} MiB for a 256 MiB file"


def test_atomic_write_failure_leaves_no_file(tmp_path):
    target = tmp_path / "out.safetensors"
    shared = torch.zeros(4)
    with pytest.raises(Exception):  # noqa: B017 (safetensors refuses tensors sharing memory)
        write_safetensors_atomic(target, {"a": shared, "b": shared})
    assert os.listdir(tmp_path) == []
    with pytest.raises(CheckpointError, match="must be strings"):
        write_safetensors_atomic(target, {"a": torch.zeros(1)}, {"step": 3})
    assert os.listdir(tmp_path) == []


def test_atomic_write_replaces_an_existing_file(tmp_path):
    target = tmp_path / "out.safetensors"
    write_safetensors_atomic(target, {"a": torch.zeros(2)})
    write_safetensors_atomic(target, {"b": torch.ones(3)})
    assert list(read_state_dict(target)[0]) == ["b"]
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_lightning_bookkeeping_in_original_ckpt_is_read_inertly(tmp_path, monkeypatch):
    """SD 1.x `.ckpt` files pickle a Lightning `ModelCheckpoint` callback (with numpy scalars)."""
    np = pytest.importorskip("numpy")
    module = type(os)("pytorch_lightning.callbacks.model_checkpoint")
    callback = type("ModelCheckpoint", (), {"__module__": module.__name__})
    module.ModelCheckpoint = callback
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, type(os)(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    saved = callback()
    saved.best_model_score = np.float64(0.25)
    path = tmp_path / "sd-v1.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "callbacks": {callback: saved}}, path)
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.delitem(sys.modules, name)
    assert torch.equal(read_state_dict(path)[0]["w"], torch.ones(3))


def test_a_cast_reads_the_file_not_its_memory_map(tmp_path):
    from openldm.checkpoints.io import CastReader

    want = {"w": torch.randn(64, 33).half(), "b": torch.randn(7).bfloat16(), "i": torch.arange(4)}
    path = write_safetensors_atomic(tmp_path / "half.safetensors", want)
    mapped, _ = read_state_dict(path)
    reader = CastReader(path, mapped)
    for tensor in mapped.values():  # a private map: the file keeps its bytes
        tensor.zero_()
    for key in ("w", "b"):
        got = reader.cast(mapped[key], torch.float32)
        assert got.dtype == torch.float32 and torch.equal(got, want[key].float()), key
    stranger = torch.ones(3).half()  # not from the file: cast as it is
    assert torch.equal(reader.cast(stranger, torch.float32), torch.ones(3))
