"""Fully sharded data parallel training (FSDP2, `torch.distributed.fsdp.fully_shard`).

DDP keeps a whole copy of the weights, gradients and optimizer state on every rank; FSDP keeps
1/world of each and all-gathers one block's weights just before the block runs, freeing them after,
so the peak is the shards plus the largest block. The blocks are the units below; whatever is
outside them (embeddings, the UNet's `out`, the VAE's `conv_in`/`conv_out`) is the root unit.

Checkpoints keep the single-process layout: tensors gathered whole to rank 0, optimizer state keyed
by parameter index as `Optimizer.state_dict` keys it. So a sharded run resumes on any number of
processes, sharded or not, and exports exactly what a DDP run exports.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from openldm.models import clip, unet, vae

UNIT_TYPES = (unet.Block, vae.Level, vae.Mid, clip.CLIPEncoderLayer)  # one all-gather each
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0 only
_SCATTER = StateDictOptions(full_state_dict=True)  # every rank holds the whole tensors and keeps its shard


def units(module: nn.Module) -> list[nn.Module]:
    """The submodules sharded as units of their own (UNet blocks, VAE levels, CLIP layers)."""
    return [m for m in module.modules() if isinstance(m, UNIT_TYPES) and m is not module]


def shard(module: nn.Module, mesh: DeviceMesh) -> None:
    """Shard in place: every rank starts from rank 0's weights (as DDP does), then each unit, then the root.

    The module's parameters become DTensor shards: build optimizers and EMAs after this.
    """
    for tensor in module.state_dict().values():
        torch_dist.broadcast(tensor, src=0)
    for unit in units(module):
        fully_shard(unit, mesh=mesh)
    fully_shard(module, mesh=mesh)


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's whole state dict on rank 0, on the CPU ({} elsewhere); every rank must call it."""
    return get_model_state_dict(module, options=_GATHER)


def load_full_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(module, state, options=_SCATTER)


def _names(modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimized parameter, in the optimizer's index order."""
    named = {id(p): f"{name}.{key}" for name, m in modules.items() for key, p in m.named_parameters()}
    return [named[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> dict:
    """Rank 0's whole optimizer state in `Optimizer.state_dict`'s layout; every rank must call it.

    torch's gathered form keys parameters by name; the checkpoint keeps indices, like an unsharded run.
    """
    state = get_optimizer_state_dict(nn.ModuleDict(modules), optimizer, options=_GATHER)
    if not state:
        return {}
    index = {name: i for i, name in enumerate(_names(modules, optimizer))}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


def load_full_optimizer_state(modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                              state: dict) -> None:
    """The inverse of `full_optimizer_state`, on every rank (each keeps its shard)."""
    names = _names(modules, optimizer)
    by_name = {"state": {names[i]: value for i, value in state["state"].items()},
               "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                for group in state["param_groups"]]}
    set_optimizer_state_dict(nn.ModuleDict(modules), optimizer, by_name, options=_SCATTER)


def gather(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Whole CPU copies of (possibly sharded) tensors, such as the EMA's; every rank must call it."""
    return [t.full_tensor().cpu() if isinstance(t, DTensor) else t for t in tensors]


def scatter_like(whole: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each whole tensor sharded as its counterpart in `like`; every rank holds `whole`, none sends."""
    return [distribute_tensor(w.to(t.device), t.device_mesh, t.placements, src_data_rank=None)
            if isinstance(t, DTensor) else w for w, t in zip(whole, like, strict=True)]
