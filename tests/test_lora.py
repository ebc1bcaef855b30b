"""LoRA / LyCORIS merging on tiny models: exact deltas, every key format, reports, exact removal.

Naming is checked against an independent oracle: diffusers' own ldm -> diffusers UNet converter
(diffusers==0.42.1) tells where a diffusers-named LoRA must land in our ldm-named UNet.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import save_file

from openldm.checkpoints import diffusers_layout
from openldm.checkpoints.io import CheckpointError
from openldm.checkpoints.layout import TEXT_ENCODER_NAMES, UNET_PREFIX
from openldm.config import TINY_SD1, TINY_SDXL, ModelConfig
from openldm.models.clip import CLIPTextModel
from openldm.models.unet import UNetModel
from openldm.networks import apply_networks, load_network, parse_network

TOL = 1e-6


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    logging.getLogger("diffusers").setLevel(logging.ERROR)


def _models(config: ModelConfig) -> dict[str, torch.nn.Module]:
    models = {"unet": UNetModel(config.unet)}
    for name, encoder in zip(TEXT_ENCODER_NAMES, config.text_encoders):
        models[name] = CLIPTextModel(encoder)
    return models


def _state(models) -> dict[str, dict[str, torch.Tensor]]:
    return {c: {k: v.detach().clone() for k, v in m.state_dict().items()} for c, m in models.items()}


def _assert_same(models, state) -> None:
    for component, model in models.items():
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[component][k])]
        assert not changed, f"{component}: {changed[:5]}"


def _factors(shape, rank: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) as kohya stores them: conv LoRA down keeps the kernel, up is (out, r, 1, 1)."""
    out, inp, *kernel = shape
    down = torch.randn(rank, inp, *kernel) * 0.1
    up = torch.randn(out, rank, *[1] * len(kernel)) * 0.1
    return down, up


def _expected(down, up, alpha: float, multiplier: float) -> torch.Tensor:
    """multiplier * alpha/r * up @ down, contracted over the rank in float64."""
    rank = down.shape[0]
    full = torch.einsum("or,ri...->oi...", up.flatten(1).double(), down.double())
    return (full * multiplier * alpha / rank).float()


def _kohya(prefix: str, path: str, down, up, alpha: float) -> dict[str, torch.Tensor]:
    stem = prefix + path.replace(".", "_")
    alpha = torch.tensor(alpha)
    return {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": alpha}


def _changed(models, state) -> set[tuple[str, str]]:
    """(component, key) of every tensor that differs from `state`."""
    return {(c, k) for c, model in models.items() for k, v in model.state_dict().items()
            if not torch.equal(v, state[c][k])}


def _to_diffusers(unet_state: dict, config: ModelConfig) -> dict:
    """The oracle: diffusers' single-file converter."""
    prefixed = {UNET_PREFIX + k: v for k, v in unet_state.items()}
    return convert_ldm_unet_checkpoint(prefixed, diffusers_layout.unet_config_json(config))


# --- where deltas land, and by how much ---------------------------------------------------------

def test_kohya_sd1_every_layer_lands_where_diffusers_puts_it():
    """A kohya SD1 LoRA (diffusers module names) on every UNet and CLIP layer; 3x3 convs are LoCon."""
    models, alpha, w = _models(TINY_SD1), 2.0, 0.7
    before = _state(models)
    ref = _to_diffusers(before["unet"], TINY_SD1)
    unet_targets = {k.removesuffix(".weight"): v.shape for k, v in ref.items()
                    if k.endswith(".weight") and v.ndim > 1}
    te_targets = {n: m.weight.shape for n, m in models["text_encoder"].named_modules()
                  if isinstance(m, torch.nn.Linear)}
    factors, state = {}, {}
    for prefix, targets in (("lora_unet_", unet_targets), ("lora_te_", te_targets)):
        for path, shape in targets.items():
            factors[prefix, path] = _factors(shape)
            state |= _kohya(prefix, path, *factors[prefix, path], alpha)

    applied = apply_networks(models, [(parse_network(state, name="all"), w)], TINY_SD1)
    report = applied.reports[0]
    assert report.ok, report.summary()
    assert report.matched == {"unet": 3 * len(unet_targets), "text_encoder": 3 * len(te_targets)}
    after_unet = _to_diffusers(models["unet"].state_dict(), TINY_SD1)
    after_te = models["text_encoder"].state_dict()
    errors = {}
    for (prefix, path), (down, up) in factors.items():
        new, old = (after_unet, ref) if prefix == "lora_unet_" else (after_te, before["text_encoder"])
        change = new[f"{path}.weight"] - old[f"{path}.weight"]
        errors[path] = (change - _expected(down, up, alpha, w)).abs().max().item()
    assert max(errors.values()) <= TOL, max(errors.items(), key=lambda kv: kv[1])
    changed = [k for k in ref if not torch.equal(ref[k], after_unet[k])]
    assert sorted(changed) == sorted(f"{path}.weight" for path in unet_targets)
    applied.remove()
    _assert_same(models, before)


def test_locon_3x3_delta_is_the_composed_convolutions():
    """Merging a LoCon (plain and CP with `lora_mid`) equals running its convolutions in sequence."""
    models = _models(TINY_SD1)
    conv = models["unet"].input_blocks[1][0].in_layers[2]  # diffusers down_blocks.0.resnets.0.conv1
    x = torch.randn(1, conv.in_channels, 8, 8, dtype=torch.float64)
    rank, original = 4, conv.weight.detach().clone()
    down, up = _factors(conv.weight.shape, rank)
    mid = torch.randn(rank, rank, 3, 3) * 0.1
    down1 = torch.randn(rank, conv.in_channels, 1, 1) * 0.1
    for tensors, branch in (
        ({"lora_down.weight": down, "lora_up.weight": up},
         lambda x: F.conv2d(F.conv2d(x, down.double(), padding=1), up.double())),
        ({"lora_down.weight": down1, "lora_mid.weight": mid, "lora_up.weight": up},
         lambda x: F.conv2d(F.conv2d(F.conv2d(x, down1.double()), mid.double(), padding=1), up.double())),
    ):
        state = {f"lora_unet_down_blocks_0_resnets_0_conv1.{k}": v for k, v in tensors.items()}
        with apply_networks(models, [(parse_network(state), 1.0)], TINY_SD1) as applied:
            assert applied.reports[0].matched == {"unet": len(tensors)}
            delta = (conv.weight.detach() - original).double()
            err = (F.conv2d(x, delta, padding=1) - branch(x)).abs().max().item()
            assert err <= 1e-5, err
        assert torch.equal(conv.weight, original)


def _kron_by_blocks(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    rows, cols = w2.shape[:2]
    out = torch.zeros(w1.shape[0] * rows, w1.shape[1] * cols, *w2.shape[2:], dtype=torch.float64)
    for i in range(w1.shape[0]):
        for j in range(w1.shape[1]):
            out[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols] = w1[i, j].double() * w2.double()
    return out


def _tucker_by_sums(t, a, b) -> torch.Tensor:
    """sum over rank pairs (i, j) of outer(a[i], b[j]) weighted by the core's kernel t[i, j]."""
    out = 0
    for i in range(t.shape[0]):
        for j in range(t.shape[1]):
            out = out + torch.outer(a[i], b[j]).double()[:, :, None, None] * t[i, j].double()
    return out


def _lycoris_cases():
    r = lambda *shape: torch.randn(*shape) * 0.3  # noqa: E731
    linear, conv = "down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2", "down_blocks_1_resnets_0_conv1"
    # linear: (64, 256); conv: (64, 32, 3, 3); rank 4, alpha 2 -> scale 0.5 where a rank exists
    loha = {k: r(*s) for k, s in [("hada_w1_a", (64, 4)), ("hada_w1_b", (4, 256)),
                                   ("hada_w2_a", (64, 4)), ("hada_w2_b", (4, 256))]}
    loha_hand = 0.5 * (loha["hada_w1_a"] @ loha["hada_w1_b"]).double() \
        * (loha["hada_w2_a"] @ loha["hada_w2_b"])
    tucker = {k: r(*s) for k, s in [("hada_t1", (4, 4, 3, 3)), ("hada_w1_a", (4, 64)), ("hada_w1_b", (4, 32)),
                                     ("hada_t2", (4, 4, 3, 3)), ("hada_w2_a", (4, 64)),
                                     ("hada_w2_b", (4, 32))]}
    tucker_hand = 0.5 * _tucker_by_sums(tucker["hada_t1"], tucker["hada_w1_a"], tucker["hada_w1_b"]) \
        * _tucker_by_sums(tucker["hada_t2"], tucker["hada_w2_a"], tucker["hada_w2_b"])
    lokr = {"lokr_w1": r(4, 8), "lokr_w2_a": r(16, 4), "lokr_w2_b": r(4, 32)}
    lokr_hand = 0.5 * _kron_by_blocks(lokr["lokr_w1"], lokr["lokr_w2_a"] @ lokr["lokr_w2_b"])
    lokr_conv = {"lokr_w1_a": r(4, 4), "lokr_w1_b": r(4, 4), "lokr_w2": r(16, 8, 3, 3)}
    w1 = lokr_conv["lokr_w1_a"] @ lokr_conv["lokr_w1_b"]
    lokr_conv_hand = 0.5 * _kron_by_blocks(w1, lokr_conv["lokr_w2"])
    full = {"lokr_w1": r(4, 8), "lokr_w2": r(16, 32)}  # both sides full: no rank, alpha ignored
    full_hand = _kron_by_blocks(full["lokr_w1"], full["lokr_w2"])
    return [("loha", linear, loha, loha_hand), ("loha-tucker", conv, tucker, tucker_hand),
            ("lokr", linear, lokr, lokr_hand), ("lokr-conv", conv, lokr_conv, lokr_conv_hand),
            ("lokr-full", linear, full, full_hand)]


@pytest.mark.parametrize("case", _lycoris_cases(), ids=lambda c: c[0])
def test_lycoris_delta_matches_hand_computation(case):
    _, path, tensors, hand = case
    models, w = _models(TINY_SD1), 0.8
    before = _state(models)
    state = {f"lora_unet_{path}.{k}": v for k, v in (tensors | {"alpha": torch.tensor(2.0)}).items()}
    applied = apply_networks(models, [(parse_network(state), w)], TINY_SD1)
    assert applied.reports[0].ok, applied.reports[0].summary()
    changed = _changed(models, before)
    assert len(changed) == 1
    _, key = changed.pop()
    err = ((models["unet"].state_dict()[key] - before["unet"][key]).double() - w * hand).abs().max().item()
    assert err <= TOL, (key, err)
    applied.remove()
    _assert_same(models, before)


def test_full_diff_and_bias():
    models = _models(TINY_SD1)
    layer = models["unet"].input_blocks[1][1].transformer_blocks[0].attn1.to_out[0]
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    diff, diff_b = torch.randn_like(weight), torch.randn_like(bias)
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    network = parse_network({f"{stem}.diff": diff, f"{stem}.diff_b": diff_b})
    with apply_networks(models, [(network, 0.5)], TINY_SD1):
        assert (layer.weight - weight - 0.5 * diff).abs().max() <= TOL
        assert (layer.bias - bias - 0.5 * diff_b).abs().max() <= TOL
    assert torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias)


# --- formats ------------------------------------------------------------------------------------

# (component, our module name, diffusers name) in TINY_SDXL; the UNet rows cover a transformer linear,
# the linear proj_in, a feed-forward and a 3x3 resnet conv.
_FC2, _OUT_PROJ = "text_model.encoder.layers.1.mlp.fc2", "text_model.encoder.layers.0.self_attn.out_proj"
SDXL_TARGETS = [
    ("unet", "input_blocks.4.1.transformer_blocks.1.attn2.to_k",
     "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"),
    ("unet", "middle_block.1.proj_in", "mid_block.attentions.0.proj_in"),
    ("unet", "output_blocks.2.1.transformer_blocks.0.ff.net.0.proj",
     "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.0.proj"),
    ("unet", "output_blocks.4.0.in_layers.2", "up_blocks.1.resnets.1.conv1"),
    ("text_encoder", _FC2, _FC2),
    ("text_encoder_2", _OUT_PROJ, _OUT_PROJ),
]
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def _sdxl_lora(models) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, float]]:
    out = {}
    for i, (component, ours, _) in enumerate(SDXL_TARGETS):
        module = models[component].get_submodule(ours)
        out[component, ours] = (*_factors(module.weight.shape), 2.0 if i == 1 else 8.0)
    return out


def test_sdxl_kohya_and_peft_files_give_identical_weights(tmp_path):
    """kohya (ldm names, te1/te2, .pt) and PEFT (diffusers names, alpha in metadata) of one LoRA."""
    models = _models(TINY_SDXL)
    before = _state(models)
    lora = _sdxl_lora(models)
    kohya, peft, alpha_pattern = {}, {}, {}
    for component, ours, theirs in SDXL_TARGETS:
        down, up, alpha = lora[component, ours]
        kohya |= _kohya(KOHYA_PREFIX[component], ours, down, up, alpha)
        peft[f"{component}.{theirs}.lora_A.weight"] = down
        peft[f"{component}.{theirs}.lora_B.weight"] = up
        if alpha != 8.0:
            alpha_pattern[theirs] = alpha
    metadata = {f"{c}.lora_alpha": 8.0 for c in KOHYA_PREFIX}
    metadata |= {"unet.r": 4, "unet.alpha_pattern": alpha_pattern}
    torch.save(kohya, tmp_path / "kohya.pt")
    save_file(peft, tmp_path / "peft.safetensors", metadata={"lora_adapter_metadata": json.dumps(metadata)})

    results = []
    for name in ("kohya.pt", "peft.safetensors"):
        copies = copy.deepcopy(models)
        network = load_network(tmp_path / name)
        report = apply_networks(copies, [(network, 0.6)], TINY_SDXL).reports[0]
        per_module = 3 if name.startswith("kohya") else 2  # PEFT keeps alpha in the metadata
        assert report.ok, report.summary()
        assert report.matched == {"unet": 4 * per_module, "text_encoder": per_module,
                                  "text_encoder_2": per_module}
        results.append(_state(copies))
        changed = _changed(copies, before)
    _assert_same_states(*results)
    for component, ours, _ in SDXL_TARGETS:  # te1 and te2 layers share names: each went to its own encoder
        down, up, alpha = lora[component, ours]
        change = results[0][component][f"{ours}.weight"] - before[component][f"{ours}.weight"]
        assert (change - _expected(down, up, alpha, 0.6).reshape(change.shape)).abs().max() <= TOL
    assert changed == {(c, f"{ours}.weight") for c, ours, _ in SDXL_TARGETS}


def _assert_same_states(a, b) -> None:
    differing = [(c, k) for c in a for k in a[c] if not torch.equal(a[c][k], b[c][k])]
    assert not differing, differing[:5]


def test_peft_alpha_defaults_to_rank_and_rslora():
    models = _models(TINY_SD1)
    layer = models["unet"].input_blocks[1][1].transformer_blocks[0].attn1.to_q
    original = layer.weight.detach().clone()
    down, up = _factors(layer.weight.shape, rank=4)
    state = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": down,
             "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": up}
    rslora = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8, "unet.use_rslora": True})}
    for metadata, scale in ((None, 1.0), (rslora, 8 / 4**0.5)):
        with apply_networks(models, [(parse_network(state, metadata), 1.0)], TINY_SD1):
            change = layer.weight - original
            assert (change - _expected(down, up, 4.0, scale)).abs().max() <= TOL, metadata


def test_old_diffusers_processor_keys():
    """attn-processor LoRAs (`processor.to_out_lora`) and text-encoder `lora_linear_layer` keys."""
    models = _models(TINY_SD1)
    before = _state(models)
    attn = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor"
    text = "text_encoder.text_model.encoder.layers.1.self_attn.q_proj.lora_linear_layer"
    state = {f"{attn}.to_out_lora.down.weight": torch.randn(2, 64),
             f"{attn}.to_out_lora.up.weight": torch.randn(64, 2),
             f"{text}.down.weight": torch.randn(2, 32), f"{text}.up.weight": torch.randn(32, 2)}
    applied = apply_networks(models, [(parse_network(state), 1.0)], TINY_SD1)
    assert applied.reports[0].ok and applied.reports[0].matched == {"unet": 2, "text_encoder": 2}
    assert _changed(models, before) == {("unet", "middle_block.1.transformer_blocks.0.attn2.to_out.0.weight"),
                       ("text_encoder", "text_model.encoder.layers.1.self_attn.q_proj.weight")}
    expected = state[f"{attn}.to_out_lora.up.weight"] @ state[f"{attn}.to_out_lora.down.weight"]
    key = "middle_block.1.transformer_blocks.0.attn2.to_out.0.weight"
    assert (models["unet"].state_dict()[key] - before["unet"][key] - expected).abs().max() <= 1e-5
    applied.remove()
    _assert_same(models, before)


@pytest.mark.parametrize(("config", "ours", "theirs", "stored"), [
    (TINY_SD1, "input_blocks.4.1.proj_in", "down_blocks.1.attentions.0.proj_in", "2d"),  # conv 1x1 here
    (TINY_SDXL, "input_blocks.4.1.proj_in", "down_blocks.1.attentions.0.proj_in", "4d"),  # linear here
])
def test_linear_and_1x1_conv_loras_fit_either_layer(config, ours, theirs, stored):
    models = _models(config)
    layer = models["unet"].get_submodule(ours)
    original = layer.weight.detach().clone()
    down, up = torch.randn(4, 64) * 0.1, torch.randn(64, 4) * 0.1
    if stored == "4d":
        down, up = down[:, :, None, None], up[:, :, None, None]
    network = parse_network(_kohya("lora_unet_", theirs, down, up, 4.0))
    with apply_networks(models, [(network, 1.0)], config) as a:
        assert a.reports[0].ok, a.reports[0].summary()
        change = layer.weight - original
        assert (change - _expected(down, up, 4.0, 1.0).reshape(change.shape)).abs().max() <= TOL


# --- reports and errors -------------------------------------------------------------------------

def test_unused_keys_are_reported_by_name():
    models = _models(TINY_SD1)
    before = _state(models)
    good = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    state = _kohya("lora_unet_", good, *_factors((32, 32)), 4.0)
    state |= _kohya("lora_unet_", "down_blocks.7.attentions.0.proj_in", *_factors((32, 32)), 4.0)  # no such
    state["lora_unet_" + good.replace(".", "_") + ".mystery"] = torch.zeros(1)  # unknown suffix
    dora = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    state |= {f"{dora}.lora_down.weight": torch.randn(4, 32), f"{dora}.lora_up.weight": torch.randn(64, 4),
              f"{dora}.dora_scale": torch.ones(64, 1)}
    wrong = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_v"  # 32-wide LoRA, 64 layer
    state |= {f"{wrong}.lora_down.weight": torch.randn(4, 32), f"{wrong}.lora_up.weight": torch.randn(32, 4)}
    applied = apply_networks(models, [(parse_network(state, name="mixed"), 1.0)], TINY_SD1)
    report = applied.reports[0]
    assert report.matched == {"unet": 3}
    assert sorted(report.unmatched) == sorted(
        [k for k in state if "blocks_7" in k] + ["lora_unet_" + good.replace(".", "_") + ".mystery"])
    assert sorted(report.unsupported) == sorted(k for k in state if k.startswith(dora))
    assert sorted(r.split(":")[0] for r in report.rejected) == sorted(k for k in state if k.startswith(wrong))
    text = report.summary()
    assert "down_blocks_7" in text and "dora_scale" in text and "does not fit" in text
    assert torch.equal(models["text_encoder"].text_model.encoder.layers[0].mlp.fc1.weight,
                       before["text_encoder"]["text_model.encoder.layers.0.mlp.fc1.weight"])
    applied.remove()
    _assert_same(models, before)


def test_unknown_format_raises_naming_its_keys():
    with pytest.raises(CheckpointError, match="model.diffusion_model.out.2.weight"):
        parse_network({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)})


# --- removal ------------------------------------------------------------------------------------

def test_fp16_merge_rounds_once_and_removal_is_bit_exact():
    models = {"unet": UNetModel(TINY_SD1.unet).half()}
    before = _state(models)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    a, b = _factors((32, 32)), _factors((32, 32))
    first, second = (parse_network(_kohya("lora_unet_", path, *f, 4.0)) for f in (a, b))
    key = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    with apply_networks(models, [(first, 0.5), (second, -1.5)], TINY_SD1) as applied:
        assert applied.reports[0].matched == applied.reports[1].matched == {"unet": 3}
        delta = _expected(*a, 4.0, 0.5) + _expected(*b, 4.0, -1.5)
        assert torch.equal(models["unet"].state_dict()[key], (before["unet"][key].float() + delta).half())
    _assert_same(models, before)


def test_stacked_applies_must_be_removed_in_reverse():
    models = {"unet": UNetModel(TINY_SD1.unet)}
    before = _state(models)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    first, second = (
        apply_networks(models, [(parse_network(_kohya("lora_unet_", path, *_factors((32, 32)), 4.0)), 1.0)],
                       TINY_SD1)
        for _ in range(2)
    )
    with pytest.raises(RuntimeError, match="reverse order"):
        first.remove()
    second.remove()
    first.remove()
    _assert_same(models, before)
