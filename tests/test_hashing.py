"""Model hashes: A1111's SHA-256 of the file, remembered by the file's identity between runs."""

import hashlib
import os

from openldm.checkpoints.hashing import model_hash, sha256
from openldm.user_cache import CACHE_ENV


def test_a_file_hashes_as_a1111_and_the_hash_is_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights" * 1000)
    expected = hashlib.sha256(model.read_bytes()).hexdigest()
    assert sha256(model) == expected and model_hash(model) == expected[:10]
    assert len(list((tmp_path / "cache" / "hashes").iterdir())) == 1

    # same path, size and modification time: the remembered hash, without reading the bytes again
    stat = model.stat()
    model.write_bytes(b"WEIGHTS" * 1000)
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert sha256(model) == expected
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rewritten later: hashed afresh
    assert sha256(model) == hashlib.sha256(model.read_bytes()).hexdigest() != expected


def test_a_folder_hash_changes_with_its_weight_files(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "a.safetensors").write_bytes(b"a")
    (folder / "model_index.json").write_text("{}")
    first = sha256(folder)
    digest = hashlib.sha256(b"unet/a.safetensors\0a").hexdigest()
    assert first == digest
    (folder / "vae").mkdir()
    (folder / "vae" / "b.safetensors").write_bytes(b"b")
    assert sha256(folder) != first


def test_an_unwritable_cache_still_gives_the_hash(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker))
    model = tmp_path / "m.ckpt"
    model.write_bytes(b"x")
    assert sha256(model) == hashlib.sha256(b"x").hexdigest()
