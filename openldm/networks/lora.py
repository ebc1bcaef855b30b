"""Merging LoRA / LyCORIS networks into a loaded model's weights, and taking them out again.

Each targeted weight becomes `W + sum_n multiplier_n * delta_n`, summed in float32 and rounded to
the weight's dtype once. Removal does not subtract: a merged weight is a *new* tensor put in the
parameter, and the original tensor is kept (moved to the CPU when it lived elsewhere). Putting it
back restores the weights bit for bit, whatever the dtype; subtracting would leave fp16 rounding
behind after every image that used a different network. The cost is one copy of the touched weights
in CPU memory (none for a model on the CPU: the kept tensor is the original).

A network names modules in several ways (`_`-joined or dotted; our ldm names or diffusers names for
the UNet). Each model gets an index from every such spelling of each of its modules to the module;
a spelling two modules share is marked ambiguous and never used.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from openldm.checkpoints import diffusers_layout
from openldm.checkpoints.io import CheckpointError
from openldm.config import ModelConfig
from openldm.networks.deltas import module_delta
from openldm.networks.formats import LoadedNetwork, NetworkModule

_AMBIGUOUS = ""  # index value for a spelling that names more than one module
_SHOWN = 8  # keys listed per category in `summary` before "... and N more"


class ModuleIndex:
    """Every weight-bearing module of one component, found by any name a network file uses."""

    def __init__(self, component: str, model: nn.Module, config: ModelConfig) -> None:
        self.component = component
        self.modules = {
            name: module for name, module in model.named_modules()
            if isinstance(getattr(module, "weight", None), Tensor)
        }
        self.names: dict[str, str] = {}
        for name, module in self.modules.items():
            for spelling in self._spellings(name, module, config):
                for alias in (spelling, spelling.replace(".", "_")):
                    self.names[alias] = name if self.names.get(alias, name) == name else _AMBIGUOUS

    def _spellings(self, name: str, module: nn.Module, config: ModelConfig) -> list[str]:
        """Our name, plus the diffusers name of a UNet module (kohya SD1/SD2 files and PEFT use it)."""
        if self.component != "unet":
            return [name]
        try:
            renamed = diffusers_layout.to_diffusers("unet", {f"{name}.weight": module.weight}, config)
        except CheckpointError:  # a module diffusers has no name for: only ours can reach it
            return [name]
        return [name, next(iter(renamed)).removesuffix(".weight")]

    def find(self, path: str) -> str | None:
        """Our module name for a path as a network file spells it; None if it names none."""
        name = self.names.get(path)
        if name == _AMBIGUOUS:
            raise CheckpointError(f"{self.component}: {path!r} could name several modules")
        return name


@dataclass
class NetworkReport:
    """What one network did to the model: keys applied per component, and every key it did not use."""

    name: str
    multiplier: float
    matched: dict[str, int] = field(default_factory=dict)  # component -> keys applied
    unmatched: list[str] = field(default_factory=list)  # keys naming no module of the model
    unsupported: list[str] = field(default_factory=list)  # kinds we do not apply (DoRA, OFT, ...)
    rejected: list[str] = field(default_factory=list)  # "key: reason" (shape mismatch, incomplete)

    @property
    def ok(self) -> bool:
        return not (self.unmatched or self.unsupported or self.rejected)

    def summary(self) -> str:
        """A few lines for the caller to print."""
        counts = ", ".join(f"{n} {c}" for c, n in self.matched.items()) or "nothing"
        lines = [f"{self.name} x{self.multiplier:g}: applied {counts} keys"]
        for label, keys in (("match no module", self.unmatched), ("are of unsupported kinds",
                            self.unsupported), ("were rejected", self.rejected)):
            if keys:
                more = f" ... and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
                lines.append(f"  {len(keys)} keys {label}: {', '.join(keys[:_SHOWN])}{more}")
        return "\n".join(lines)


@dataclass
class _Target:
    """One parameter's pending change, summed over networks."""

    parameter: nn.Parameter
    delta: Tensor


@dataclass
class AppliedNetworks:
    """Networks merged into a model: their reports, and what `remove` needs to undo the merge."""

    reports: list[NetworkReport]
    _kept: list[tuple[nn.Parameter, Tensor, Tensor]] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        return "\n".join(report.summary() for report in self.reports)

    @property
    def active(self) -> bool:
        """Whether merged weights sit in the model now: something was merged and not yet removed."""
        return bool(self._kept)

    def remove(self) -> None:
        """Put the original weights back, bit for bit; removals must run in reverse order of applies."""
        for parameter, original, merged in reversed(self._kept):
            if parameter.data_ptr() != merged.data_ptr():
                raise RuntimeError("a weight changed since these networks were applied: "
                                   "remove networks in the reverse order they were applied")
            parameter.data = original.to(merged.device)
        self._kept.clear()

    def __enter__(self) -> AppliedNetworks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _resolve(module: NetworkModule, indexes: Mapping[str, ModuleIndex]) -> tuple[str, str] | None:
    """(component, our module name), searching every component when the file does not say which."""
    candidates = [module.component] if module.component else list(indexes)
    found = [(c, name) for c in candidates if c in indexes and (name := indexes[c].find(module.path))]
    if len(found) > 1:
        raise CheckpointError(f"{module.path!r} names a module in each of {[c for c, _ in found]}")
    return found[0] if found else None


def _add(targets: dict[int, _Target], parameter: nn.Parameter, delta: Tensor) -> None:
    target = targets.setdefault(id(parameter), _Target(parameter, torch.zeros_like(delta)))
    target.delta += delta


def _collect(
    network: LoadedNetwork, multiplier: float, indexes: Mapping[str, ModuleIndex], targets: dict[int, _Target]
) -> NetworkReport:
    """Add one network's scaled deltas to `targets`; report every key it did not use."""
    report = NetworkReport(network.name, multiplier, unmatched=list(network.unknown))
    for module in network.modules:
        try:
            where = _resolve(module, indexes)
        except CheckpointError as e:
            report.rejected += [f"{key}: {e}" for key in module.keys]
            continue
        if where is None:
            report.unmatched += module.keys
            continue
        if module.unsupported:
            report.unsupported += module.keys
            continue
        component, name = where
        layer = indexes[component].modules[name]
        try:
            weight, bias = _deltas(module, layer)
        except ValueError as e:
            report.rejected += [f"{key}: {e}" for key in module.keys]
            continue
        if weight is not None:
            _add(targets, layer.weight, weight * multiplier)
        if bias is not None:
            _add(targets, layer.bias, bias * multiplier)
        report.matched[component] = report.matched.get(component, 0) + len(module.keys)
    return report


def _deltas(module: NetworkModule, layer: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    """The module's float32 deltas on the layer's device, checked against the layer's shapes."""
    device = layer.weight.device
    tensors = {role: value.to(device) for role, value in module.tensors.items()}
    weight, bias = module_delta(tensors, layer.weight.shape)
    if bias is not None:
        if getattr(layer, "bias", None) is None:
            raise ValueError("bias delta for a layer without bias")
        if bias.shape != layer.bias.shape:
            raise ValueError(f"bias delta {tuple(bias.shape)} vs bias {tuple(layer.bias.shape)}")
    return weight, bias


def apply_networks(
    models: Mapping[str, nn.Module],
    networks: Iterable[tuple[LoadedNetwork, float]],
    config: ModelConfig,
) -> AppliedNetworks:
    """Merge `(network, multiplier)` pairs into `models` ({"unet": ..., "text_encoder": ...}).

    `config` is the model's preset (it tells the UNet's diffusers names). Returns the reports, to be
    printed by the caller, and the handle whose `remove()` (or `with` exit) restores the weights.
    """
    indexes = {component: ModuleIndex(component, model, config) for component, model in models.items()}
    targets: dict[int, _Target] = {}
    reports = [_collect(network, multiplier, indexes, targets) for network, multiplier in networks]
    applied = AppliedNetworks(reports)
    with torch.no_grad():
        for target in targets.values():
            original = target.parameter.data
            merged = (original.float() + target.delta).to(original.dtype)
            target.parameter.data = merged
            applied._kept.append((target.parameter, original.to("cpu"), merged))
    return applied
