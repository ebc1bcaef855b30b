"""CLIP text encoder parity with transformers, and the reversible OpenCLIP key conversion.

SD1-style encoders load our state dict into `transformers.CLIPTextModel` as it is. OpenCLIP ones go
ours -> OpenCLIP layout (our converter) -> HF layout (diffusers' own `convert_open_clip_checkpoint`)
-> transformers, so a mistake in our converter cannot cancel against the same mistake in the test.
"""

import subprocess
import sys
from dataclasses import replace
from functools import cache

import pytest
import torch
import transformers
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

from openldm.checkpoints.io import CheckpointError
from openldm.checkpoints.openclip import hf_to_openclip, openclip_to_hf, split_extras
from openldm.config import CLIP_L, OPENCLIP_BIGG, OPENCLIP_H, TINY_SD1, TINY_SD2, TINY_SDXL, CLIPTextConfig
from openldm.models.clip import CLIPTextModel
from openldm.models.tokenizer import CLIPTokenizer
from openldm.nn.lookup import Embedding

TOL = 1e-5
SDXL_PREFIX = "conditioner.embedders.1.model."  # not SD2's: diffusers drops SD2's resblock 23 there
MEDIUM_CLIP = replace(CLIP_L, hidden_size=128, intermediate_size=512, num_layers=5, num_heads=4)
MEDIUM_BIGG = replace(OPENCLIP_BIGG, hidden_size=128, intermediate_size=512, num_layers=5, num_heads=8,
                      projection_dim=96)
ENCODERS = {
    "tiny-sd1": TINY_SD1.text_encoders[0], "tiny-sd2": TINY_SD2.text_encoders[0],
    "tiny-sdxl-l": TINY_SDXL.text_encoders[0], "tiny-sdxl-g": TINY_SDXL.text_encoders[1],
    "medium-clip-l": MEDIUM_CLIP, "medium-bigg": MEDIUM_BIGG,
}
PROMPTS = ["a photo of a cat", "masterpiece, best quality, (a castle:1.2) on a hill at sunset!!",
           "a <|endoftext|> in the middle", "x " * 90]


def random_state_dict(cfg: CLIPTextConfig) -> dict[str, torch.Tensor]:
    """Random weights everywhere, norms included, so a misplaced tensor changes the output."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CLIPTextModel(cfg).state_dict().items()}
    out = {k: torch.randn(shape) * 0.05 for k, shape in shapes.items()}
    for key in out:
        if "norm" in key and key.endswith("weight"):
            out[key] = 1 + out[key]
    return out


def load_ours(cfg: CLIPTextConfig, state_dict) -> CLIPTextModel:
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def transformers_config(cfg: CLIPTextConfig) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_length, hidden_act=cfg.activation,
        projection_dim=cfg.projection_dim or cfg.hidden_size, attn_implementation="eager",
    )


def load_transformers(cfg: CLIPTextConfig, state_dict) -> torch.nn.Module:
    """The same weights in transformers, through diffusers' converter for OpenCLIP encoders.

    transformers 5's `CLIPTextModel` is the text transformer itself (no `text_model` attribute);
    its files keep the `text_model.` prefix (see `test_transformers_reads_our_keys_from_a_file`).
    """
    kind = transformers.CLIPTextModelWithProjection if cfg.projection_dim else transformers.CLIPTextModel
    model = kind(transformers_config(cfg))
    if cfg.openclip_layout:
        original = {SDXL_PREFIX + k: v for k, v in hf_to_openclip(state_dict, cfg).items()}
        state_dict = convert_open_clip_checkpoint(model, original, prefix=SDXL_PREFIX)
    if not cfg.projection_dim:
        state_dict = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _text_transformer(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "text_model", model)


@cache
def _rows(cleaning_like: CLIPTextConfig) -> torch.Tensor:
    return CLIPTokenizer.for_config(cleaning_like)(PROMPTS)


def input_ids(cfg: CLIPTextConfig) -> torch.Tensor:
    """The prompts tokenized for `cfg` (built once per tokenizer kind: reading the vocab takes time)."""
    return _rows(CLIP_L if not cfg.openclip_layout else OPENCLIP_BIGG).clone()


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", ENCODERS)
def test_hidden_states_and_pooled_match_transformers(name):
    cfg = ENCODERS[name]
    sd = random_state_dict(cfg)
    theirs = load_transformers(cfg, sd)
    ids = input_ids(cfg)
    with torch.no_grad():
        ref = theirs(ids, output_hidden_states=True)
        norm = _text_transformer(theirs).final_layer_norm
        expected = {
            ("last", True): ref.last_hidden_state, ("last", False): ref.hidden_states[-1],
            ("penultimate", True): norm(ref.hidden_states[-2]), ("penultimate", False): ref.hidden_states[-2],
        }
        for (layer, final_norm), want in expected.items():
            hidden, pooled = load_ours(replace(cfg, layer=layer, final_norm=final_norm), sd)(ids)
            err = _err(hidden, want)
            print(f"{name} {layer} final_norm={final_norm}: max abs error {err:.2e}")
            assert err <= TOL, f"{name} {layer} final_norm={final_norm}: max abs error {err:.2e}"
    if cfg.projection_dim:
        err = _err(pooled, ref.text_embeds)
        print(f"{name} pooled: max abs error {err:.2e}")
        assert err <= TOL, f"{name} pooled: max abs error {err:.2e}"
    else:
        assert pooled is None and not hasattr(load_ours(cfg, sd), "text_projection")


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [CLIP_L, OPENCLIP_H], ids=["clip-l", "openclip-h"])
def test_full_size_encoder_matches_transformers(cfg):
    """SD1's and SD2's encoders at full size (SDXL's bigG is OpenCLIP-H's code at another width)."""
    sd = random_state_dict(cfg)
    theirs, ours = load_transformers(cfg, sd), load_ours(cfg, sd)
    ids = input_ids(cfg)
    with torch.no_grad():
        ref = theirs(ids, output_hidden_states=True)
        want = ref.last_hidden_state if cfg.layer == "last" else (
            _text_transformer(theirs).final_layer_norm(ref.hidden_states[-2]))
        err = _err(ours(ids)[0], want)
    print(f"full-size {cfg.hidden_size}-wide {cfg.layer}: max abs error {err:.2e}")
    assert err <= TOL, f"max abs error {err:.2e}"


def test_clip_skip_picks_layer_from_the_end():
    cfg = MEDIUM_CLIP
    sd = random_state_dict(cfg)
    theirs, ours = load_transformers(cfg, sd), load_ours(cfg, sd)
    ids = input_ids(cfg)
    with torch.no_grad():
        ref = theirs(ids, output_hidden_states=True)
        for skip in range(1, cfg.num_layers + 1):
            want = _text_transformer(theirs).final_layer_norm(ref.hidden_states[-skip])
            err = _err(ours(ids, skip=skip)[0], want)
            assert err <= TOL, f"skip={skip}: max abs error {err:.2e}"
    with pytest.raises(ValueError, match="skip must be in 1..5"):
        ours(ids, skip=0)


def test_config_layer_is_the_default_skip():
    cfg = TINY_SDXL.text_encoders[1]
    model = load_ours(cfg, random_state_dict(cfg))
    ids = input_ids(cfg)
    with torch.no_grad():
        default, pooled = model(ids)
        penultimate, pooled2 = model(ids, skip=2)
        last, _ = model(ids, skip=1)
    assert torch.equal(default, penultimate) and torch.equal(pooled, pooled2)
    assert _err(default, last) > 1e-2, "penultimate and last layer should differ"


def test_token_embeds_replace_the_lookup():
    cfg = TINY_SDXL.text_encoders[1]
    model = load_ours(cfg, random_state_dict(cfg))
    ids = input_ids(cfg)
    embeds = model.text_model.embeddings.token_embedding(ids).detach()
    with torch.no_grad():
        plain, same = model(ids), model(ids, token_embeds=embeds)
        embeds[:, 1] += 1.0
        changed = model(ids, token_embeds=embeds)
    assert torch.equal(plain[0], same[0]) and torch.equal(plain[1], same[1])
    assert _err(changed[0][:, 1:], plain[0][:, 1:]) > 1e-3 and torch.equal(changed[0][:, 0], plain[0][:, 0])


def test_math_backend_matches_sdpa():
    cfg = MEDIUM_BIGG
    model = load_ours(cfg, random_state_dict(cfg))
    ids = input_ids(cfg)
    with torch.no_grad():
        (h1, p1), (h2, p2) = model(ids), model(ids, backend="math")
    err = max(_err(h1, h2), _err(p1, p2))
    assert err <= TOL, f"sdpa vs math: max abs error {err:.2e}"


def test_transformers_reads_our_keys_from_a_file(tmp_path):
    """A diffusers `text_encoder/` folder written from our state dict loads with nothing missing."""
    from safetensors.torch import save_file

    cfg = TINY_SD1.text_encoders[0]
    sd = random_state_dict(cfg)
    transformers_config(cfg).save_pretrained(tmp_path)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model, info = transformers.CLIPTextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert torch.equal(model.final_layer_norm.weight, sd["text_model.final_layer_norm.weight"])


def test_no_buffers_and_hf_names():
    model = CLIPTextModel(TINY_SDXL.text_encoders[1])
    assert not list(model.buffers())
    keys = set(model.state_dict())
    assert "text_model.embeddings.position_ids" not in keys
    assert {"text_projection.weight", "text_model.encoder.layers.1.self_attn.q_proj.bias",
            "text_model.final_layer_norm.weight"} <= keys


# --- OpenCLIP key conversion ---------------------------------------------------------------

def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.parametrize("name", ["tiny-sdxl-g", "medium-bigg", "tiny-sd2"])
def test_conversion_round_trips_exactly(name):
    cfg = ENCODERS[name]
    ours = random_state_dict(cfg)
    theirs = hf_to_openclip(ours, cfg)
    assert _same(openclip_to_hf(theirs, cfg), ours)
    assert _same(hf_to_openclip(openclip_to_hf(theirs, cfg), cfg), theirs)
    width = cfg.hidden_size
    assert theirs["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
    if cfg.projection_dim:
        assert theirs["text_projection"].shape == (width, cfg.projection_dim)


def test_projection_is_applied_as_x_at_p():
    cfg = MEDIUM_BIGG
    theirs = hf_to_openclip(random_state_dict(cfg), cfg)
    model = load_ours(cfg, openclip_to_hf(theirs, cfg))
    x = torch.randn(3, cfg.hidden_size)
    err = _err(model.text_projection(x), x @ theirs["text_projection"])
    assert err <= TOL, f"max abs error {err:.2e}"


def test_extras_are_split_off_and_dropped():
    cfg = TINY_SDXL.text_encoders[1]
    theirs = hf_to_openclip(random_state_dict(cfg), cfg)
    extras = {"logit_scale": torch.tensor(4.6), "attn_mask": torch.ones(77, 77).triu(1),
              "visual.conv1.weight": torch.zeros(2, 3, 4, 4)}
    tower, found = split_extras(theirs | extras)
    assert _same(tower, theirs) and _same(found, extras)
    assert _same(openclip_to_hf(theirs | extras, cfg), openclip_to_hf(theirs, cfg))


def test_unused_sd2_projection_is_dropped():
    cfg = TINY_SD2.text_encoders[0]
    theirs = hf_to_openclip(random_state_dict(cfg), cfg) | {"text_projection": torch.randn(32, 32)}
    converted = openclip_to_hf(theirs, cfg)
    assert "text_projection.weight" not in converted
    load_ours(cfg, converted)  # strict
    assert "text_projection.weight" in openclip_to_hf(theirs)  # no config: everything kept


def test_unknown_keys_raise_and_are_listed():
    cfg = TINY_SDXL.text_encoders[1]
    theirs = hf_to_openclip(random_state_dict(cfg), cfg)
    bogus = ("transformer.resblocks.0.attn.bogus", "token_embedding.bias")
    bad = theirs | {key: torch.zeros(1) for key in bogus}
    with pytest.raises(CheckpointError, match=r"2 keys .*token_embedding\.bias, transformer\.resblocks"):
        openclip_to_hf(bad, cfg)
    with pytest.raises(CheckpointError, match="text_model.embeddings.position_ids"):
        hf_to_openclip(openclip_to_hf(theirs) | {"text_model.embeddings.position_ids": torch.arange(77)})


def test_building_on_meta_skips_the_init_that_imports_dynamo():
    """A checkpoint's modules are built on `meta`; torch's `normal_` there would import torch._dynamo."""
    code = ("import sys, torch\n"
            "from openldm.checkpoints.load import build_component\n"
            "from openldm.config import SD15, SD_X4_UPSCALER\n"
            "for name in ('text_encoder', 'unet', 'vae'):\n"
            "    build_component(name, SD15)\n"
            "build_component('unet', SD_X4_UPSCALER)\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_embeddings_built_off_meta_are_initialised_as_torchs():
    torch.manual_seed(3)
    ours = Embedding(50, 8)
    torch.manual_seed(3)
    assert torch.equal(ours.weight, torch.nn.Embedding(50, 8).weight)
