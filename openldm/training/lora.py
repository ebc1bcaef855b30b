"""LoRA training (Hu et al. 2021): low-rank deltas on a frozen model, saved in kohya's format.

Each adapted layer keeps its weights and gains `up(down(x)) * alpha / rank` on its output, through
a forward hook, so the model's own modules and names stay untouched and the generation pipeline
samples with the adapters in place. The layers are kohya's defaults: every Linear and Conv2d of the
UNet's transformers (`SpatialTransformer`) and, optionally, of the text encoder's attention and MLP
blocks. The file is kohya's (`lora_unet_*` / `lora_te_*`, `.lora_down.weight`, `.lora_up.weight`,
`.alpha`), with diffusers module names for SD1/SD2 UNets and ldm names for SDXL, as kohya writes
them, so `openldm.networks` and other SD tools merge it unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from openldm.checkpoints import diffusers_layout
from openldm.checkpoints.io import write_safetensors_atomic
from openldm.config import ModelConfig
from openldm.models.clip import CLIPMLP, CLIPAttention
from openldm.nn.transformer import SpatialTransformer
from openldm.training.config import TrainConfig
from openldm.training.ldm import FrozenModelTask

LORA_FILE = "lora.safetensors"
_HOSTS = {"unet": (SpatialTransformer,), "text_encoder": (CLIPAttention, CLIPMLP)}


class LoRAModule(nn.Module):
    """kohya's LoRA for one layer: down (rank outputs, the layer's kernel) then a 1x1 / linear up.

    `up` starts at zero, so training starts from the unchanged model.
    """

    def __init__(self, layer: nn.Linear | nn.Conv2d, rank: int, alpha: float):
        super().__init__()
        if isinstance(layer, nn.Conv2d):
            kernel = {"kernel_size": layer.kernel_size, "stride": layer.stride, "padding": layer.padding}
            self.lora_down = nn.Conv2d(layer.in_channels, rank, bias=False, **kernel)
            self.lora_up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(layer.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, layer.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.lora_down(x)) * self.scale


def target_layers(component: str, model: nn.Module) -> Iterator[tuple[str, nn.Linear | nn.Conv2d]]:
    """(name, layer) of every Linear / Conv2d inside the component's kohya host blocks."""
    for host_name, host in model.named_modules():
        if isinstance(host, _HOSTS[component]):
            for name, layer in host.named_modules():
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    yield f"{host_name}.{name}", layer


def kohya_name(component: str, name: str, layer: nn.Module, config: ModelConfig) -> str:
    """`lora_unet_<path>` / `lora_te_<path>` with the module path's dots as underscores."""
    if component == "unet" and config.family != "sdxl":  # kohya names SD1/SD2 UNet layers as diffusers does
        renamed = diffusers_layout.to_diffusers("unet", {f"{name}.weight": layer.weight}, config)
        name = next(iter(renamed)).removesuffix(".weight")
    prefix = "lora_unet_" if component == "unet" else "lora_te_"
    return prefix + name.replace(".", "_")


class LoRANetwork(nn.Module):
    """The adapters of one model, keyed by kohya name; `attach` hooks them into the layers."""

    def __init__(self, models: dict[str, nn.Module], config: ModelConfig, rank: int, alpha: float):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self._targets: dict[str, nn.Module] = {}
        for component, model in models.items():
            for name, layer in target_layers(component, model):
                key = kohya_name(component, name, layer, config)
                self.adapters[key] = LoRAModule(layer, rank, alpha).to(layer.weight.device)
                self._targets[key] = layer
        self._hooks = [self._targets[key].register_forward_hook(_add_output(adapter))
                       for key, adapter in self.adapters.items()]

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{key}.{name}": value.detach().to("cpu").contiguous()
                for key, adapter in self.adapters.items() for name, value in adapter.state_dict().items()}

    def detach_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def _add_output(adapter: LoRAModule):
    def hook(layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return output + adapter(inputs[0])

    return hook


class LoRATask(FrozenModelTask):
    """The LDM loss, with every weight of the model frozen and only the adapters trained.

    One process only: the adapters run inside the model's forward through hooks, where DDP cannot
    follow them.
    """

    what = "LoRA"

    def __init__(self, config: TrainConfig, rank: int = 0, world: int = 1):
        super().__init__(config, rank, world)
        options = config.lora
        models: dict[str, nn.Module] = {"unet": self.unet}
        if options.text_encoder:
            models["text_encoder"] = self.text_encoder
        alpha = float(options.rank) if options.alpha is None else options.alpha
        self.network = LoRANetwork(models, self.model_config, options.rank, alpha)

    def trainable(self) -> dict[str, nn.Module]:
        return {"lora": self.network}

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.network.parameters()]}]

    def export(self, output_dir: Path) -> list[Path]:
        options = self.config.lora
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(options.rank),
                    "ss_network_alpha": str(float(options.rank) if options.alpha is None else options.alpha),
                    "openldm.trained_by": "openldm train lora", "openldm.preset": self.model_config.name}
        path = Path(output_dir) / LORA_FILE
        return [write_safetensors_atomic(path, self.network.kohya_state_dict(), metadata=metadata)]
