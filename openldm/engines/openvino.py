"""OpenVINO on the CPU in fp32 (`pip install "openldm[cpu]"`): about 1.34x eager on the SD1.5 UNet.

A component is traced once per input signature (`openvino.convert_model`), its dimensions fixed to
that signature, saved as IR in the conversion cache (see `cache`) and compiled with the f32
precision hint, so images stay within 1/255 of eager. `openvino-bf16` (`make_bf16`) compiles the same
IR with the bf16 hint: inexact, an opt-in fast mode, about twice as fast where the CPU computes bf16
natively (AVX512_BF16 or AMX) and slower where it does not (docs/engines.md). OpenVINO keeps the
compiled program beside the IR (`CACHE_DIR`), so a later process imports it instead of compiling again.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from openldm.engines import cache, pages
from openldm.engines.base import Call, Component, EngineError

IR = "model.xml"
COMPILED = "compiled"  # OpenVINO's own cache of the compiled program, inside the entry
# what an entry holds; part of the key, so entries of an older layout are converted afresh
# (2: static input shapes, compiled from the file with CACHE_DIR; 3: fp16 weights where exact, see `_save`)
LAYOUT = 3


class _Traced(nn.Module):
    """The component's call with its absent (None) arguments fixed, as OpenVINO traces a forward."""

    def __init__(self, component: Component, present: tuple[bool, ...]):
        super().__init__()
        self.owner, self.call, self.present = component.module, component.call, present

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        values = iter(tensors)
        return self.call(*(next(values) if p else None for p in self.present))


def node_pattern(module: str) -> str:
    """A regex for the OpenVINO nodes traced from `module` (a path in the component, e.g. `time_embed`)."""
    return rf"__module\.owner\.{re.escape(module)}[./].*"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass(frozen=True)
class OpenVINO:
    """Components on the CPU whose role is in `roles` run as OpenVINO programs; the others eagerly."""

    name: str = "openvino"
    config: dict[str, str] = field(default_factory=lambda: {"INFERENCE_PRECISION_HINT": "f32"})
    root: Path | None = None  # the cache folder; None: `cache.cache_root()`
    log: Callable[[str], None] = field(default=_stderr, compare=False)
    roles: frozenset[str] = frozenset({"unet", "vae_decoder"})
    # Its programs hold their own weights, found in the cache by the file's identity: a model loaded for
    # it need not read its UNet (`loading.load`), and drops torch's copy once compiled.
    bakes_weights: bool = True

    def settings(self) -> dict[str, Any]:
        import openvino

        return {**self.config, "version": openvino.__version__, "layout": LAYOUT}

    def role_settings(self, role: str) -> dict[str, Any]:
        """The settings that make the program of a component in `role`: its cache key's."""
        return self.settings()

    def build(self, component: Component, example: Sequence[torch.Tensor | None]) -> Call:
        import openvino

        if component.role not in self.roles or component.device.type != "cpu":
            return _eager(component)  # a role left out, or a model on an accelerator
        present = tuple(a is not None for a in example)
        tensors = [a for a in example if a is not None]
        shapes = [(tuple(t.shape), str(t.dtype)) for t in tensors]
        model = cache.weights_hash(component, self.root)
        key = cache.cache_key(model, component.role, self.name, self.role_settings(component.role), shapes)
        folder = cache.entry(key, self.root)
        if not (folder / IR).exists():
            component.ready()
            _save(self.convert(component, present, example), folder)
        # from the file, not a model object: OpenVINO then keys its compiled-program cache by the file and
        # imports the program, sparing the compile (SD1.5 UNet 12.7 s -> 7.4 s); memory is unchanged, as the
        # plugin's repacked weights and the mapped constants both stay (docs/engines.md)
        start = time.perf_counter()
        with pages.dropping_mapped_pages(folder):  # the mapped IR and blob: read to compile, barely after
            compiled = openvino.Core().compile_model(str(folder / IR), "CPU", self.runtime_config(folder))
        if not compiled.get_property("LOADED_FROM_CACHE"):
            seconds = time.perf_counter() - start
            self.log(f"{self.name}: {component.role} compiled in {seconds:.1f} s (once; cached)")
        component.release()  # the program holds the weights now; torch's copy comes back from the file
        return _caller(compiled, present)

    def runtime_config(self, folder: Path) -> dict[str, str]:
        """The compile options: the settings, torch's thread count (`--threads`, which the IR ignores) and
        where OpenVINO keeps the compiled program (it keys that by these options and its version)."""
        return {"INFERENCE_NUM_THREADS": str(torch.get_num_threads()), "CACHE_DIR": str(folder / COMPILED),
                **self.config}

    def convert(self, component: Component, present: tuple[bool, ...],
                example: Sequence[torch.Tensor | None]) -> Any:
        """The component traced into an OpenVINO model (what the cache stores), with progress lines."""
        import openvino

        tensors = tuple(a for a in example if a is not None)
        shapes = " ".join("x".join(map(str, t.shape)) for t in tensors)
        self.log(f"{self.name}: converting {component.role} for {shapes} (once; cached)")
        start = time.perf_counter()
        with torch.no_grad():
            ir = openvino.convert_model(_Traced(component, present), example_input=tensors)
        # the traced IR keeps dynamic dimensions; fixed to this entry's shapes (part of its key), the first
        # call skips shape inference (full-size SD1.5 UNet at 256 px: first step 2.2 s -> 0.6 s)
        ir.reshape({port: openvino.PartialShape(list(t.shape)) for port, t in zip(ir.inputs, tensors)})
        self.log(f"{self.name}: {component.role} converted in {time.perf_counter() - start:.1f} s")
        return ir


def _save(ir: Any, folder: Path) -> None:
    """Write the IR into the cache; a killed conversion leaves no entry that looks whole.

    Weights that fp16 holds exactly (all of a model read from an fp16 file, as downloads are) are
    stored in fp16 and widened by the plugin: the compiled program then maps half the bytes beside
    its own fp32 copy (full-size SD1.5 UNet: 6.6 -> 5.0 GiB resident, outputs within 7e-6). Constants
    fp16 would round (the timestep frequencies) stay fp32, so the computation is unchanged.
    """
    import openvino

    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    kept = _not_half_exact(ir)
    if kept is None:  # mostly fp32-only weights (a model trained or merged in fp32): fp16 would round
        openvino.save_model(ir, partial / IR, compress_to_fp16=False)
    else:
        half = partial / "half.xml"
        openvino.save_model(ir, half, compress_to_fp16=True)
        if not _restore_fp32(openvino.Core().read_model(half), kept, partial / IR):
            openvino.save_model(ir, partial / IR, compress_to_fp16=False)  # not all found: stay exact
        half.unlink()
        half.with_suffix(".bin").unlink()
    partial.rename(folder)


def _not_half_exact(ir: Any) -> dict[str, np.ndarray] | None:
    """The fp32 constants fp16 would round, by name; None when they outweigh 1% of the rest."""
    import openvino

    kept: dict[str, np.ndarray] = {}
    exact = 0
    for op in ir.get_ops():
        if op.get_type_name() == "Constant" and op.get_element_type() == openvino.Type.f32:
            value = op.get_data()
            if np.array_equal(value.astype(np.float16).astype(np.float32), value):
                exact += value.nbytes
            else:
                kept[op.get_friendly_name()] = value.copy()
    return kept if sum(v.nbytes for v in kept.values()) * 100 <= exact else None


def _restore_fp32(model: Any, kept: dict[str, np.ndarray], path: Path) -> bool:
    """`model` (saved with fp16 compression) with the constants in `kept` put back in fp32, saved to
    `path`; False (nothing saved) unless each of them is found there, compressed or not.

    fp16 compression turns each float constant into an fp16 one and a `Convert` named like it; those
    named in `kept` are replaced by their exact fp32 values."""
    import openvino
    import openvino.opset13 as ops

    found = set()
    for op in model.get_ops():
        name, kind = op.get_friendly_name(), op.get_type_name()
        if kind == "Constant" and op.get_element_type() == openvino.Type.f32 and name in kept:
            found.add(name)  # left in fp32 by the compression itself
        elif kind == "Convert" and name in kept:
            exact = ops.constant(kept[name])
            exact.set_friendly_name(name)
            for target in op.output(0).get_target_inputs():
                target.replace_source_output(exact.output(0))
            found.add(name)
    if found != set(kept):
        return False
    openvino.save_model(model, path, compress_to_fp16=False)
    return True


def _eager(component: Component) -> Call:
    """The component's own call, its weights read back first if an engine had dropped them."""
    if component.weights is None:
        return component.call

    def run(*args: Any) -> Any:
        component.ready()
        return component.call(*args)

    return run


def _caller(compiled: Any, present: tuple[bool, ...]) -> Call:
    """Torch tensors in, torch tensors out, absent arguments dropped as when traced."""

    def run(*args: Any) -> torch.Tensor:
        feeds = [a.detach().cpu().numpy() for a, p in zip(args, present) if p]
        outputs = compiled(feeds)
        values = [torch.from_numpy(np.asarray(outputs[o])) for o in compiled.outputs]
        return values[0] if len(values) == 1 else tuple(values)

    return run


def _require(name: str) -> None:
    try:
        import openvino  # noqa: F401
    except ImportError as e:
        raise EngineError(f'the {name} engine needs OpenVINO: pip install "openldm[cpu]"') from e


def make() -> OpenVINO:
    _require("openvino")
    return OpenVINO()


def native_bf16() -> bool:
    """Whether OpenVINO's CPU plugin lists bf16 among this CPU's capabilities (AVX512_BF16 or AMX)."""
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def make_bf16() -> OpenVINO:
    """`openvino-bf16`: the UNet and VAE decoder computed in bf16, the opt-in fast mode of CPUs with
    native bf16; its error is measured in docs/engines.md (PSNR against eager, the shapes eval)."""
    _require("openvino-bf16")
    engine = OpenVINO(name="openvino-bf16", config={"INFERENCE_PRECISION_HINT": "bf16"})
    if not native_bf16():
        engine.log("openvino-bf16: this CPU lists no native bf16; expect it slower than openvino")
    return engine
