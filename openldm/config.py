"""Model family presets: every architectural fact about SD1, SD2 and SDXL lives here, once.

Field names follow the original ldm/sgm configs where one exists, so a reader can hold this
file next to `v1-inference.yaml` or `sd_xl_base.yaml` and see the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Prediction = Literal["eps", "v"]


@dataclass(frozen=True)
class UNetConfig:
    """The ldm/sgm `UNetModel`. `transformer_depth[i] == 0` means level i has no attention.

    Distilled and block-removed models (SSD-1B, Vega, BK-SDM) vary what SD keeps uniform: res blocks
    per level, transformer depth per block and between the down and up paths, the middle block itself.
    The per-block fields are None when a level's depth holds for all its blocks (every preset).
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int | tuple[int, ...] = 2  # per level where levels differ
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int | None = 1  # None: no middle block (BK-SDM-Small)
    transformer_depth_input: tuple[int, ...] | None = None  # per input res block, level by level
    transformer_depth_output: tuple[int, ...] | None = None  # per output block, deepest level first
    context_dim: int = 768
    num_heads: int | None = 8  # SD1 fixes the head count ...
    num_head_channels: int | None = None  # ... SD2 and SDXL fix the head width instead.
    use_linear_in_transformer: bool = False  # SD1: 1x1 conv proj_in/proj_out; SD2+: linear
    adm_in_channels: int | None = None  # SDXL: size of the vector conditioning `y`
    num_classes: int | None = None  # x4 upscaler: `y` is a class label (its noise level), ldm's `num_classes`
    # Per level: the transformers' first attention attends to the text instead of the pixels (ldm's
    # `disable_self_attentions`, diffusers' `only_cross_attention`); the middle block's never does.
    disable_self_attentions: tuple[bool, ...] | None = None
    norm_groups: int = 32  # GroupNorm groups (SD: 32); see VAEConfig.norm_groups

    def heads_at(self, channels: int) -> int:
        """Attention heads for a block of `channels` width."""
        if self.num_head_channels is not None:
            return channels // self.num_head_channels
        assert self.num_heads is not None
        return self.num_heads

    def res_blocks(self, level: int) -> int:
        """Res blocks of one level on the down path (the up path has one more)."""
        n = self.num_res_blocks
        return n if isinstance(n, int) else n[level]

    def self_attends(self, level: int) -> bool:
        """Whether level `level`'s transformers start with self-attention (all but the x4 upscaler's)."""
        return not (self.disable_self_attentions and self.disable_self_attentions[level])

    def input_depths(self) -> tuple[tuple[int, ...], ...]:
        """Transformer depth of each down-path block, grouped by level."""
        flat = iter(self.transformer_depth_input or ())
        return tuple(
            tuple(next(flat) for _ in range(self.res_blocks(i))) if self.transformer_depth_input
            else (depth,) * self.res_blocks(i)
            for i, depth in enumerate(self.transformer_depth)
        )

    def output_depths(self) -> tuple[tuple[int, ...], ...]:
        """Transformer depth of each up-path block, grouped by level, deepest level first."""
        levels = list(reversed(range(len(self.channel_mult))))
        flat = iter(self.transformer_depth_output or ())
        return tuple(
            tuple(next(flat) for _ in range(self.res_blocks(i) + 1)) if self.transformer_depth_output
            else (self.transformer_depth[i],) * (self.res_blocks(i) + 1)
            for i in levels
        )


def unet_from_blocks(
    res_blocks: tuple[int, ...], inputs: tuple[tuple[int, ...], ...], outputs: tuple[tuple[int, ...], ...],
    **fields,
) -> UNetConfig:
    """The one `UNetConfig` for per-block facts, per-level fields wherever they say it all (as presets do)."""
    depth = tuple(max(level, default=0) for level in inputs)
    config = UNetConfig(
        num_res_blocks=res_blocks[0] if len(set(res_blocks)) == 1 else tuple(res_blocks),
        transformer_depth=depth, **fields,
    )
    if config.input_depths() != tuple(inputs):
        config = replace(config, transformer_depth_input=tuple(d for level in inputs for d in level))
    if config.output_depths() != tuple(outputs):
        config = replace(config, transformer_depth_output=tuple(d for level in outputs for d in level))
    return config


@dataclass(frozen=True)
class VAEConfig:
    """The ldm `AutoencoderKL` (encoder/decoder with mid-block attention, 32-group norms)."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    # GroupNorm groups (SD: 32). A norm group must span several channels for a flat colour to
    # survive normalisation (one or two channels per group keep only the sign of a contrast), so
    # narrow VAEs trained on flat-colour images use fewer groups.
    norm_groups: int = 32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class CLIPTextConfig:
    """One CLIP text transformer; the last four fields say how SD uses its output."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_length: int = 77
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"
    projection_dim: int | None = None  # has `text_projection` (pooled output used by SDXL)
    layer: Literal["last", "penultimate"] = "last"  # hidden state given to the UNet
    final_norm: bool = True  # apply final_layer_norm to that hidden state
    pad_token: int = 49407  # OpenAI CLIP (SD1) pads with the end token; OpenCLIP with 0
    openclip_layout: bool = False  # stored in OpenCLIP key layout in original checkpoints


@dataclass(frozen=True)
class LatentFormat:
    """How VAE latents are scaled before the UNet sees them (kept outside the VAE)."""

    scale_factor: float = 0.18215
    shift_factor: float = 0.0
    channels: int = 4
    # A fast preview: RGB ~= latent (model space, one row per channel) @ rgb_factors + rgb_bias, in [-1, 1].
    # None: no fitted map (the preview then shows the first three channels, normalised).
    rgb_factors: tuple[tuple[float, float, float], ...] | None = None
    rgb_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def to_model(self, z):
        """VAE latent -> the unit-variance latent the UNet was trained on."""
        return (z - self.shift_factor) * self.scale_factor

    def from_model(self, z):
        """UNet-space latent -> what the VAE decoder expects."""
        return z / self.scale_factor + self.shift_factor


@dataclass(frozen=True)
class NoiseAugmentation:
    """The x4 upscaler's low-resolution input, noised to `noise_level` before the UNet sees it.

    ldm's `ImageConcatWithNoiseAugmentation`: a DDPM schedule of its own in image space (betas from
    `linear_start` to `linear_end` on a square-root scale, ldm's "linear"), and the noise level given
    to the UNet as its class label. `factor` is how much larger the output is than the input.
    """

    linear_start: float = 0.0001
    linear_end: float = 0.02
    timesteps: int = 1000
    max_noise_level: int = 350
    factor: int = 4


@dataclass(frozen=True)
class ModelConfig:
    """A whole latent diffusion model: what `detect()` returns and what loaders build."""

    name: str
    family: Literal["sd1", "sd2", "sdxl", "sdxl_refiner", "x4"]
    unet: UNetConfig
    vae: VAEConfig
    text_encoders: tuple[CLIPTextConfig, ...]
    latent_format: LatentFormat
    prediction: Prediction = "eps"
    image_size: int = 512
    # The discrete DDPM schedule every SD family was trained with (ldm `linear_start/end`).
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000
    # SDXL vector conditioning, in the order its embeddings are concatenated after the pooled text.
    vector_conds: tuple[str, ...] = ()
    # The classifier-free guidance scale generation uses when none is given.
    guidance: float = 7.0
    # The x4 upscaler's noise augmentation of its low-resolution input (None: a text-to-image model).
    low_res: NoiseAugmentation | None = None

    @property
    def is_inpainting(self) -> bool:
        return self.unet.in_channels == self.latent_format.channels * 2 + 1


# --- text encoders -----------------------------------------------------------------------

CLIP_L = CLIPTextConfig()  # OpenAI CLIP ViT-L/14
OPENCLIP_H = CLIPTextConfig(
    hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, activation="gelu",
    layer="penultimate", final_norm=True, pad_token=0, openclip_layout=True,
)
# SDXL takes the penultimate hidden state of both encoders without the final norm.
CLIP_L_SDXL = replace(CLIP_L, layer="penultimate", final_norm=False)
OPENCLIP_BIGG = CLIPTextConfig(
    hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=20, activation="gelu",
    projection_dim=1280, layer="penultimate", final_norm=False, pad_token=0, openclip_layout=True,
)

# Preview factors: least-squares fits of RGB on the scaled latent of the SD 1.x/2.x VAE and of the SDXL
# VAE, as published in ComfyUI's comfy/latent_formats.py (SD15 and SDXL classes; SDXL adds a bias).
SD_LATENT = LatentFormat(scale_factor=0.18215, rgb_factors=(
    (0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177),
))
SDXL_LATENT = LatentFormat(scale_factor=0.13025, rgb_factors=(
    (0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188),
), rgb_bias=(0.1084, -0.0175, -0.0011))
SDXL_SIZE_CONDS = ("original_size", "crop_coords", "target_size")
SDXL_REFINER_CONDS = ("original_size", "crop_coords", "aesthetic_score")
WEIGHT_DTYPES = ("fp16", "bf16", "fp32")  # the names `--dtype` takes; checkpoints.save maps them to torch
SIZE_EMBED_DIM = 256  # sgm embeds each vector-conditioning number with 256 Fourier channels

# --- full-size presets -------------------------------------------------------------------

SD15 = ModelConfig(
    name="sd15", family="sd1", unet=UNetConfig(), vae=VAEConfig(), text_encoders=(CLIP_L,),
    latent_format=SD_LATENT,
)
SD15_INPAINT = replace(SD15, name="sd15-inpaint", unet=replace(SD15.unet, in_channels=9))

_SD2_UNET = UNetConfig(
    context_dim=1024, num_heads=None, num_head_channels=64, use_linear_in_transformer=True
)
SD2_BASE = ModelConfig(
    name="sd2-base", family="sd2", unet=_SD2_UNET, vae=VAEConfig(), text_encoders=(OPENCLIP_H,),
    latent_format=SD_LATENT,
)
SD2_V = replace(SD2_BASE, name="sd2-v", prediction="v", image_size=768)
SD2_INPAINT = replace(SD2_BASE, name="sd2-inpaint", unet=replace(_SD2_UNET, in_channels=9))

_SDXL_UNET = UNetConfig(
    channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), transformer_depth_middle=10,
    context_dim=2048, num_heads=None, num_head_channels=64, use_linear_in_transformer=True,
    adm_in_channels=1280 + len(SDXL_SIZE_CONDS) * 2 * SIZE_EMBED_DIM,
)
SDXL_BASE = ModelConfig(
    name="sdxl-base", family="sdxl", unet=_SDXL_UNET, vae=VAEConfig(),
    text_encoders=(CLIP_L_SDXL, OPENCLIP_BIGG), latent_format=SDXL_LATENT, image_size=1024,
    vector_conds=SDXL_SIZE_CONDS,
)
SDXL_INPAINT = replace(SDXL_BASE, name="sdxl-inpaint", unet=replace(_SDXL_UNET, in_channels=9))
SDXL_REFINER = ModelConfig(
    name="sdxl-refiner", family="sdxl_refiner",
    unet=UNetConfig(
        model_channels=384, channel_mult=(1, 2, 4, 4), transformer_depth=(0, 4, 4, 0),
        transformer_depth_middle=4, context_dim=1280, num_heads=None, num_head_channels=64,
        use_linear_in_transformer=True,
        adm_in_channels=1280 + (2 + 2 + 1) * SIZE_EMBED_DIM,
    ),
    vae=VAEConfig(), text_encoders=(OPENCLIP_BIGG,), latent_format=SDXL_LATENT, image_size=1024,
    vector_conds=SDXL_REFINER_CONDS,
)

# SD 2's x4 upscaler (`x4-upscaling.yaml`): the latent concatenated with the noised low-resolution
# image (4 + 3 channels), the noise level as a class label, no attention at the first level and only
# cross-attention at the next two, an f=4 VAE, v-prediction on ldm's default (sqrt-scaled) schedule
# from 0.0001 to 0.02. Latents are 1/4 of the output: the input image's own size.
SD_X4_UPSCALER = ModelConfig(
    name="sd-x4-upscaler", family="x4",
    unet=UNetConfig(
        in_channels=7, model_channels=256, channel_mult=(1, 2, 2, 4), transformer_depth=(0, 1, 1, 1),
        context_dim=1024, num_heads=8, use_linear_in_transformer=True, num_classes=1000,
        disable_self_attentions=(True, True, True, False),
    ),
    vae=VAEConfig(ch_mult=(1, 2, 4)), text_encoders=(OPENCLIP_H,),
    latent_format=LatentFormat(scale_factor=0.08333), prediction="v", image_size=512,
    linear_start=0.0001, linear_end=0.02, guidance=9.0, low_res=NoiseAugmentation(),
)

# --- tiny presets: the same structures at a size that runs in milliseconds on a CPU --------

_TINY_CLIP = replace(CLIP_L, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
_TINY_OPENCLIP = replace(OPENCLIP_H, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
_TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
_TINY_UNET = UNetConfig(
    model_channels=32, channel_mult=(1, 2), transformer_depth=(1, 1), context_dim=32, num_heads=2
)
TINY_SD1 = ModelConfig(
    name="tiny-sd1", family="sd1", unet=_TINY_UNET, vae=_TINY_VAE, text_encoders=(_TINY_CLIP,),
    latent_format=SD_LATENT, image_size=32,
)
TINY_SD1_INPAINT = replace(TINY_SD1, name="tiny-sd1-inpaint", unet=replace(_TINY_UNET, in_channels=9))
TINY_SD2 = ModelConfig(
    name="tiny-sd2", family="sd2",
    unet=replace(_TINY_UNET, num_heads=None, num_head_channels=16, use_linear_in_transformer=True),
    vae=_TINY_VAE, text_encoders=(_TINY_OPENCLIP,), latent_format=SD_LATENT, image_size=32,
)
TINY_SD2_V = replace(TINY_SD2, name="tiny-sd2-v", prediction="v")
TINY_SDXL = ModelConfig(
    name="tiny-sdxl", family="sdxl",
    unet=UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(0, 2, 2),
        transformer_depth_middle=2, context_dim=64, num_heads=None, num_head_channels=16,
        use_linear_in_transformer=True, adm_in_channels=32 + len(SDXL_SIZE_CONDS) * 2 * SIZE_EMBED_DIM,
    ),
    vae=_TINY_VAE,
    text_encoders=(
        replace(_TINY_CLIP, layer="penultimate", final_norm=False),
        replace(OPENCLIP_BIGG, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                projection_dim=32),
    ),
    latent_format=SDXL_LATENT, image_size=32, vector_conds=SDXL_SIZE_CONDS,
)
TINY_X4_UPSCALER = replace(
    SD_X4_UPSCALER, name="tiny-x4-upscaler",
    unet=UNetConfig(
        in_channels=7, model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 1),
        context_dim=32, num_heads=2, use_linear_in_transformer=True, num_classes=1000,
        disable_self_attentions=(True, True, False),
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1), text_encoders=(_TINY_OPENCLIP,), image_size=64,
)
# The refiner's shape in small: one OpenCLIP-bigG-like encoder, no attention at the first level.
TINY_SDXL_REFINER = ModelConfig(
    name="tiny-sdxl-refiner", family="sdxl_refiner",
    unet=UNetConfig(
        model_channels=32, channel_mult=(1, 2), transformer_depth=(0, 2), transformer_depth_middle=2,
        context_dim=32, num_heads=None, num_head_channels=16, use_linear_in_transformer=True,
        adm_in_channels=32 + (2 + 2 + 1) * SIZE_EMBED_DIM,
    ),
    vae=_TINY_VAE, text_encoders=(TINY_SDXL.text_encoders[1],), latent_format=SDXL_LATENT, image_size=32,
    vector_conds=SDXL_REFINER_CONDS,
)

# --- ControlNet: a trainable copy of a UNet's encoder half, steered by a control image ----------

@dataclass(frozen=True)
class ControlNetConfig:
    """ldm's `ControlNet` (cldm.py): the base UNet's input and middle blocks plus the hint encoder.

    `unet` is the base model's UNet config (in_channels: the plain latent's, as the copy never sees an
    inpainting model's extra channels); `hint_channels` are the control image's; `hint_widths` are the
    widths of the hint encoder's stages, each after the first halving the size (the originals' 16, 32,
    96, 256: from pixels to the latent's 1/8).
    """

    family: Literal["sd1", "sd2", "sdxl"]
    unet: UNetConfig
    hint_channels: int = 3
    hint_widths: tuple[int, ...] = (16, 32, 96, 256)

    @property
    def hint_factor(self) -> int:
        """How much smaller the latent is than the control image: the VAE's factor, in the originals 8."""
        return 2 ** (len(self.hint_widths) - 1)

    @property
    def outputs(self) -> int:
        """Residuals it returns: one per UNet input block, then the middle block's."""
        return 1 + len(self.unet.channel_mult) * (self.unet.num_res_blocks + 1)


def controlnet_config(model: ModelConfig) -> ControlNetConfig:
    """The ControlNet that fits a base model: its UNet's encoder half, on plain latents."""
    if model.family not in ("sd1", "sd2", "sdxl"):
        raise ValueError(f"no ControlNet family for {model.name} ({model.family}): SD1, SD2 and SDXL have")
    stages = model.vae.downsample_factor.bit_length()  # 8 -> 4 widths, the originals'; tiny VAEs' 2 -> 2
    return ControlNetConfig(model.family, replace(model.unet, in_channels=model.latent_format.channels),
                            hint_widths=(16, 32, 96, 256)[:stages])


# --- the embedded model: a small SD1-structured model trained by openldm on the shapes dataset ---

SHAPES_VOCAB_SIZE = 596  # 512 byte symbols + 82 merges learned from the captions + start + end
SHAPES = ModelConfig(
    name="shapes", family="sd1",
    unet=UNetConfig(
        model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(0, 1, 1),
        transformer_depth_middle=1, context_dim=128, num_heads=None, num_head_channels=32,
        use_linear_in_transformer=True, norm_groups=8,
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=4),
    text_encoders=(
        CLIPTextConfig(vocab_size=SHAPES_VOCAB_SIZE, hidden_size=128, intermediate_size=512, num_layers=2,
                       num_heads=4, max_length=32, pad_token=SHAPES_VOCAB_SIZE - 1),
    ),
    # 1 / std of the trained VAE's latent means over 2,048 training images (see docs/embedded.md).
    # Preview map fitted by scripts/fit_preview_factors.py (128 images; mean abs error 0.30 in [-1, 1]).
    latent_format=LatentFormat(scale_factor=0.36262, rgb_factors=(
        (0.4841, 0.5321, -0.0879), (0.0284, 0.2233, 0.4894),
        (-0.3649, 0.0810, 0.1501), (0.0725, -0.3863, -0.1133),
    ), rgb_bias=(-0.0351, -0.4102, -0.1770)),
    image_size=128,
    # Shape accuracy on a validation split (docs/embedded.md) falls as guidance rises: 95% at 2, 86% at 3.
    guidance=2.0,
)
# The shipped embedded model: `shapes` fine-tuned on the phrasing grammar, its vocabulary grown so that
# each of the grammar's words is one token (configs/shapes-ldm-phrasing.yaml, `ldm.extend_vocabulary`).
SHAPES_PHRASING_VOCAB_SIZE = 632  # the 596 above + 36 merges for the grammar's new words
SHAPES_PHRASING = replace(SHAPES, name="shapes-phrasing", text_encoders=(
    replace(SHAPES.text_encoders[0], vocab_size=SHAPES_PHRASING_VOCAB_SIZE,
            pad_token=SHAPES_PHRASING_VOCAB_SIZE - 1),
))

PRESETS: dict[str, ModelConfig] = {
    p.name: p
    for p in (
        SD15, SD15_INPAINT, SD2_BASE, SD2_V, SD2_INPAINT, SDXL_BASE, SDXL_INPAINT, SDXL_REFINER,
        TINY_SD1, TINY_SD1_INPAINT, TINY_SD2, TINY_SD2_V, TINY_SDXL, TINY_SDXL_REFINER, SHAPES,
        SHAPES_PHRASING, SD_X4_UPSCALER, TINY_X4_UPSCALER,
    )
}
FULL_SIZE_PRESETS = (SD15, SD15_INPAINT, SD2_BASE, SD2_V, SD2_INPAINT, SDXL_BASE, SDXL_INPAINT, SDXL_REFINER)


def get_preset(name: str) -> ModelConfig:
    """Look a preset up by name, with an error that lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None

# ControlNets by the base preset they fit (SD2's 768-v and base share one UNet shape).
CONTROLNET_PRESETS: dict[str, ControlNetConfig] = {
    p.name: controlnet_config(p) for p in (SD15, SD2_BASE, SDXL_BASE, TINY_SD1, TINY_SD2, TINY_SDXL)
}
