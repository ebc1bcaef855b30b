"""The original ldm/sgm inference yaml (`v1-inference.yaml`, `v2-inference-v.yaml`, `sd_xl_base.yaml`).

Such a file rides beside a checkpoint to say what its tensors cannot: above all whether the UNet
predicts eps or v. We read only that and the UNet facts worth checking against the detected
preset, so a yaml that describes some other model is caught instead of silently trusted.
ldm keeps the UNet under `model.params.unet_config`; sgm (SDXL) under `model.params.network_config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from openldm.checkpoints.io import CheckpointError
from openldm.config import ModelConfig, Prediction

# Conditioner class names -> family. sgm lists several embedders; CLIP-L beside bigG means SDXL base.
_LDM_CONDITIONERS = {"FrozenCLIPEmbedder": "sd1", "FrozenOpenCLIPEmbedder": "sd2"}
_SGM_SCALINGS: dict[str, Prediction] = {"EpsScaling": "eps", "VScaling": "v"}
_PLAIN_FIELDS = ("in_channels", "out_channels", "model_channels", "num_res_blocks")


@dataclass(frozen=True)
class LdmConfig:
    """What an original yaml says: family (None if unrecognised), prediction and UNet facts."""

    path: Path
    family: str | None
    prediction: Prediction
    unet: Mapping[str, object]  # `UNetConfig` field name -> value the yaml states
    scale_factor: float | None = None


def read_ldm_config(path: str | Path) -> LdmConfig:
    """Parse an ldm or sgm inference yaml (with `yaml.safe_load`: no tags, no code)."""
    import yaml  # here, not at the top: yaml costs a noticeable share of every CLI start-up

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
        params = doc["model"].get("params") or {}
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not an ldm/sgm model config ({type(e).__name__}: {e})") from None
    sgm = "network_config" in params
    unet = (params.get("network_config" if sgm else "unet_config") or {}).get("params") or {}
    return LdmConfig(
        path=path,
        family=_sgm_family(params) if sgm else _ldm_family(params),
        prediction=_sgm_prediction(params, path) if sgm else _ldm_prediction(params, path),
        unet=_unet_facts(unet),
        scale_factor=params.get("scale_factor"),
    )


def check_against(ldm: LdmConfig, config: ModelConfig) -> None:
    """Raise if the yaml describes a different model than the checkpoint's detected preset."""
    wrong = [
        f"{name}: yaml {value!r}, checkpoint {getattr(config.unet, name)!r}"
        for name, value in ldm.unet.items() if getattr(config.unet, name) != value
    ]
    if ldm.scale_factor is not None and ldm.scale_factor != config.latent_format.scale_factor:
        wrong.append(f"scale_factor: yaml {ldm.scale_factor}, checkpoint {config.latent_format.scale_factor}")
    if ldm.family is not None and ldm.family != config.family:
        wrong.insert(0, f"family: yaml {ldm.family}, checkpoint {config.family}")
    if wrong:
        raise CheckpointError(
            f"{ldm.path} describes another model than the checkpoint ({config.name}): " + "; ".join(wrong)
        )


def _class_name(node) -> str:
    return str((node or {}).get("target", "")).rsplit(".", 1)[-1]


def _ldm_family(params: Mapping) -> str | None:
    return _LDM_CONDITIONERS.get(_class_name(params.get("cond_stage_config")))


def _sgm_family(params: Mapping) -> str | None:
    embedders = ((params.get("conditioner_config") or {}).get("params") or {}).get("emb_models") or []
    names = {_class_name(e) for e in embedders}
    if "FrozenCLIPEmbedder" in names:
        return "sdxl"
    return "sdxl_refiner" if "FrozenOpenCLIPEmbedder2" in names else None


def _ldm_prediction(params: Mapping, path: Path) -> Prediction:
    kind = params.get("parameterization", "eps")
    if kind not in ("eps", "v"):
        raise CheckpointError(f"{path}: parameterization {kind!r} is not supported (only eps and v)")
    return kind


def _sgm_prediction(params: Mapping, path: Path) -> Prediction:
    denoiser = (params.get("denoiser_config") or {}).get("params") or {}
    scaling = _class_name(denoiser.get("scaling_config")) or "EpsScaling"
    if scaling not in _SGM_SCALINGS:
        raise CheckpointError(f"{path}: denoiser scaling {scaling!r} is not supported (only eps and v)")
    return _SGM_SCALINGS[scaling]


def _unet_facts(p: Mapping) -> dict[str, object]:
    """The yaml's UNet params in `UNetConfig` terms, with ldm's defaults for what it leaves out."""
    if not p:
        return {}
    facts: dict[str, object] = {name: p[name] for name in _PLAIN_FIELDS if name in p}
    if "channel_mult" in p:
        facts["channel_mult"] = tuple(p["channel_mult"])
    levels = len(p.get("channel_mult", ())) or None
    depth = p.get("transformer_depth", 1)
    depths = list(depth) if isinstance(depth, (list, tuple)) else [depth] * (levels or 1)
    if levels and "attention_resolutions" in p:  # a level has attention when its downsampling is listed
        attention = set(p["attention_resolutions"])
        facts["transformer_depth"] = tuple(d if 2**i in attention else 0 for i, d in enumerate(depths))
    facts["transformer_depth_middle"] = p.get("transformer_depth_middle", depths[-1])
    context = p.get("context_dim")
    if isinstance(context, (list, tuple)):
        context = context[0] if len(set(context)) == 1 else tuple(context)
    if context is not None:
        facts["context_dim"] = context
    facts["use_linear_in_transformer"] = bool(p.get("use_linear_in_transformer", False))
    facts["num_heads"] = None if p.get("num_heads", -1) == -1 else p["num_heads"]
    facts["num_head_channels"] = None if p.get("num_head_channels", -1) == -1 else p["num_head_channels"]
    facts["adm_in_channels"] = p.get("adm_in_channels") if p.get("num_classes") == "sequential" else None
    return facts
