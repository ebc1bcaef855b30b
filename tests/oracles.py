"""Import the independent reference implementations that the tests compare against.

k-diffusion's package `__init__` imports its training code, which needs torchvision (it does not
import beside the CPU torch wheel). Its `sampling` module only needs `utils.append_dims`, so we load
`utils.py` and `sampling.py` from the installed package under a private name, with an empty
stand-in for `torchvision.transforms.functional` present only while `utils.py` is imported.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from functools import cache
from pathlib import Path


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@cache
def k_sampling() -> types.ModuleType:
    """k-diffusion's `sampling` module (PyPI k-diffusion==0.1.1.post1)."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed: pip install --no-deps k-diffusion==0.1.1.post1")
    root = Path(next(iter(spec.submodule_search_locations)))
    package = types.ModuleType("_kdiff_oracle")
    package.__path__ = [str(root)]
    sys.modules["_kdiff_oracle"] = package
    stand_ins = {}
    if importlib.util.find_spec("torchvision") is None:
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            stand_ins[name] = sys.modules.setdefault(name, types.ModuleType(name))
    try:
        package.utils = _load("_kdiff_oracle.utils", root / "utils.py")
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)
    return _load("_kdiff_oracle.sampling", root / "sampling.py")


@cache
def openclip_tokenizer() -> types.ModuleType:
    """open_clip's `tokenizer` module (PyPI open-clip-torch==3.3.0), without the model code."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open-clip-torch is not installed: pip install --no-deps open-clip-torch==3.3.0")
    root = Path(next(iter(spec.submodule_search_locations)))
    return _load("_openclip_oracle_tokenizer", root / "tokenizer.py")


@cache
def k_external() -> types.ModuleType:
    """k-diffusion's `external` module (discrete-model denoisers and DiscreteSchedule)."""
    sampling = k_sampling()
    return _load("_kdiff_oracle.external", Path(sampling.__file__).with_name("external.py"))
