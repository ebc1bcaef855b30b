"""Deterministic training (`run.deterministic`): the backend settings under which a config repeats bit
for bit in any fresh process on the same machine.

What varies between otherwise identical CPU runs, and what is set against it:

- MKL chooses kernels by the memory alignment of its arguments, so two processes can round
  differently. Its conditional numerical reproducibility (`MKL_CBWR=COMPATIBLE`) fixes the code
  path. MKL reads that variable once, at its first call: with torch 2.13 it works when set after
  `import torch` but before the first matmul, and is ignored after it (`mkl_cbwr_set` then fails
  too, MKL_CBWR_ERR_MODE_CHANGE_FAILURE). So `openldm train` sets it before anything runs
  (`prepare_environment`), and a run inside a process that already used MKL warns.
- Reductions split over threads add in a different order for a different thread count, and MKL's
  dynamic threading may pick fewer threads than asked: the count is fixed and MKL_DYNAMIC is off.
- torch's few nondeterministic kernels and oneDNN's: `torch.use_deterministic_algorithms` and
  `torch.backends.mkldnn.deterministic` (cuDNN's flags and cuBLAS's workspace on a GPU).

The cost in speed is measured in docs/training.md.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path

import torch

from openldm.training.config import RunConfig

ENVIRONMENT = {  # read by MKL and cuBLAS at their first call, so set before any kernel runs
    "MKL_CBWR": "COMPATIBLE",
    "MKL_DYNAMIC": "FALSE",
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",  # what torch.use_deterministic_algorithms needs on CUDA
}
_MKL_BRANCH = 1  # mkl_cbwr_get(MKL_CBWR_BRANCH) answers MKL_CBWR_BRANCH_OFF (1) when CNR is off
_MKL_OFF = 1


def wanted(run: RunConfig) -> bool:
    """`run.deterministic`, or by default: on for the CPU, off on accelerators (where it costs most)."""
    if run.deterministic is not None:
        return run.deterministic
    return torch.device(run.device).type == "cpu"


def prepare_environment(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set the variables MKL and cuBLAS read at their first call; values already given are kept."""
    for name, value in ENVIRONMENT.items():
        environ.setdefault(name, value)


def mkl_reproducible() -> bool | None:
    """Whether MKL's conditional numerical reproducibility is on; None where torch has no MKL to ask.

    MKL is linked into libtorch_cpu, which exports its `mkl_serv_cbwr_get` (what `mkl_cbwr_get` calls).
    """
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    if not torch.backends.mkl.is_available() or not library.is_file():
        return None
    try:
        get = ctypes.CDLL(str(library)).mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    get.argtypes, get.restype = [ctypes.c_int], ctypes.c_int
    return get(_MKL_BRANCH) != _MKL_OFF


@contextmanager
def deterministic(run: RunConfig) -> Iterator[None]:
    """Run the block under the deterministic settings (or as it is when not `wanted`), then restore
    the process-wide flags it changed."""
    if not wanted(run):
        yield
        return
    prepare_environment()
    if torch.device(run.device).type == "cpu" and mkl_reproducible() is False:
        warnings.warn("run.deterministic: MKL was already in use in this process, so MKL_CBWR cannot take "
                      "effect and the run may differ from one process to the next; use `openldm train`, "
                      "or set MKL_CBWR=COMPATIBLE before the first torch operation", stacklevel=3)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.mkldnn.deterministic,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.get_num_threads())
    torch.use_deterministic_algorithms(True)
    torch.backends.mkldnn.deterministic = True
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.set_num_threads(run.threads or saved[-1])
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.mkldnn.deterministic = saved[1]
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        torch.set_num_threads(saved[4])
