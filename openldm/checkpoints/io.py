"""Reading and writing checkpoint files, safely: no file can make us run its code.

`.safetensors` is read through a memory map. Pickle-based files (`.ckpt`, `.pt`, `.pth`, `.bin`) go
only through `torch.load(weights_only=True)`, which refuses any global outside torch's allow-list.
The one widening: the PyTorch Lightning bookkeeping inside original SD 1.x `.ckpt` files (a
`ModelCheckpoint` callback and the numpy scalars in it) is unpickled into an inert stand-in, which
runs nothing and is thrown away with everything else that is not a tensor.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from openldm.atomic import atomic_path
from openldm.checkpoints.errors import CheckpointError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_CONVERT_HINT = "convert it to .safetensors with a tool you trust, or use a .safetensors release of it"


class _Inert:
    """Stand-in for harmless training bookkeeping: accepts any state and does nothing with it."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


def _inert(*args, **kwargs) -> _Inert:
    return _Inert()


# Globals that real SD checkpoints carry beside the weights, mapped to stand-ins that run nothing.
_BOOKKEEPING_GLOBALS = [
    (_Inert, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_inert, "numpy.core.multiarray.scalar"),
    (_inert, "numpy._core.multiarray.scalar"),
    (_Inert, "numpy.dtype"),
]


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One checkpoint file -> (tensors by key, safetensors header metadata; `{}` for pickles)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        tensors, metadata = _read_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        tensors, metadata = _read_pickle(path), {}
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint type {suffix!r}; expected .safetensors or one of {PICKLE_SUFFIXES}"
        )
    if not tensors:
        raise CheckpointError(f"{path}: the file holds no tensors")
    return tensors, metadata


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors header, without touching the tensor data."""
    path = Path(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors come out of a memory map, so pages are read only when a tensor is used."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    return tensors, metadata


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class CastReader:
    """Casts a safetensors file's tensors to another dtype reading each from the file, not from its map.

    A memory-mapped tensor that is cast leaves its pages in the process (RSS) until the whole map
    goes: an fp16 file computed in fp32 would hold both copies. Read with plain file reads instead,
    only the cast copy stays. `tensors` are the file's mapped tensors; any other tensor is cast as is.
    """

    def __init__(self, path: Path, tensors: Mapping[str, torch.Tensor]):
        self.path = path
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        start = 8 + size
        self._where = {id(tensors[k]): (start + v["data_offsets"][0], v) for k, v in header.items()
                       if k in tensors}

    def cast(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        found = self._where.get(id(tensor))
        if found is None or tensor.dtype == dtype or not tensor.is_floating_point():
            return tensor.to(dtype=dtype)
        offset, entry = found
        raw = torch.empty(entry["data_offsets"][1] - entry["data_offsets"][0], dtype=torch.uint8)
        with self.path.open("rb") as f:
            f.seek(offset)
            f.readinto(raw.numpy())
        return raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"]).to(dtype)


def _torch_load(path: Path):
    with torch.serialization.safe_globals(_BOOKKEEPING_GLOBALS):
        try:  # zip-format files can be memory-mapped; the legacy format cannot
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)


def _unsafe_globals(path: Path) -> str:
    """The globals a refused pickle asks for, to name in the error (best effort)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # the listing is a courtesy: any failure just leaves it out
        return ""
    return f" (it asks for {', '.join(names[:5])})" if names else ""


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = _torch_load(path)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused: the file is not a plain tensor checkpoint; loading it would execute code "
            f"from inside it{_unsafe_globals(path)}. Nothing was run; {_CONVERT_HINT}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({e})") from None
    return _unwrap(obj, path)


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """Lightning/ldm files nest the weights under `state_dict`; anything not a tensor is dropped."""
    while isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def write_safetensors_atomic(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write beside the target and rename into place, so a failure never leaves a partial file."""
    path = Path(path)
    bad = {k: type(v).__name__ for k, v in (metadata or {}).items() if not isinstance(v, str)}
    if bad:
        raise CheckpointError(f"safetensors metadata values must be strings; got {bad}")
    with atomic_path(path) as tmp:
        save_file(dict(tensors), tmp, metadata=dict(metadata) if metadata else None)
        _sort_metadata(tmp)
    return path


def _sort_metadata(path: Path) -> None:
    """Rewrite the header with `__metadata__` in sorted order, in place and at the same length.

    safetensors serialises the metadata from a Rust HashMap, whose order changes from call to call;
    sorted, the same tensors and metadata always give the same bytes.
    """
    with path.open("r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # cannot happen for the same content; keep the file as written
            return
        f.seek(8)
        f.write(text.ljust(size, b" "))
