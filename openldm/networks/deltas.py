"""The weight change each network family stores, rebuilt from its factors.

A module's tensors are keyed by *role*, the key's suffix without the module path (`down`, `up`,
`hada_w1_a`, ...). Shapes follow the files:
- LoRA / LoCon: `up` (out, r[, 1, 1]) @ `down` (r, in[, kh, kw]); with a `mid` core (r, r, kh, kw)
  the three factors are a CP/Tucker decomposition (LoCon's `use_cp`);
- LoHa (Hyeon-Woo et al. 2022, FedPara): the Hadamard product of two low-rank products;
- LoKr (Yeh et al. 2023): the Kronecker product `w1 (x) w2`, either side possibly low rank;
- full: `diff` is the delta itself, `diff_b` a bias delta.
Every family is scaled by `alpha / rank`; a file without `alpha` means alpha == rank (scale 1).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

# Role sets that identify each family; the second set lists the roles it may also carry.
FAMILIES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "lora": (frozenset({"down", "up"}), frozenset({"mid", "alpha"})),
    "loha": (
        frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
        frozenset({"hada_t1", "hada_t2", "alpha"}),
    ),
    "lokr": (
        frozenset(),
        frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                   "lokr_t2", "alpha"}),
    ),
    "full": (frozenset(), frozenset({"diff", "diff_b"})),
}
ROLES = frozenset().union(*(need | may for need, may in FAMILIES.values()))


def family_of(roles: frozenset[str] | set[str]) -> str:
    """Which family a module's roles belong to; ValueError names what is missing or mixed."""
    roles = frozenset(roles) - {"diff_b"} or frozenset(roles)
    for name, (need, may) in FAMILIES.items():
        if name == "lokr" and not roles & {"lokr_w1", "lokr_w1_a"}:
            continue
        if need <= roles <= need | may:
            if name == "lokr":
                _check_lokr(roles)
            return name
    raise ValueError(f"incomplete or mixed network tensors: {sorted(roles)}")


def _check_lokr(roles: frozenset[str]) -> None:
    w1 = "lokr_w1" in roles or {"lokr_w1_a", "lokr_w1_b"} <= roles
    w2 = "lokr_w2" in roles or {"lokr_w2_a", "lokr_w2_b"} <= roles
    if not (w1 and w2):
        raise ValueError(f"incomplete LoKr tensors: {sorted(roles)}")


def tucker(core: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """W[p, q, ...] = sum_ij core[i, j, ...] a[i, p] b[j, q]: a Tucker-2 rebuild."""
    return torch.einsum("ij...,ip,jq->pq...", core, a, b)


def _lora(t: Mapping[str, Tensor]) -> tuple[Tensor, int | None]:
    up, down = t["up"].flatten(1), t["down"]
    if "mid" in t:  # up (out, r), mid (r, r, kh, kw), down (r, in): one conv factored in three
        return tucker(t["mid"], up.T, down.flatten(1)), down.shape[0]
    return up @ down.flatten(1), down.shape[0]


def _hadamard_factor(t: Mapping[str, Tensor], i: int) -> Tensor:
    a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
    if f"hada_t{i}" in t:  # Tucker form: a (r, out), b (r, in)
        return tucker(t[f"hada_t{i}"], a, b)
    return a @ b.flatten(1)


def _loha(t: Mapping[str, Tensor]) -> tuple[Tensor, int | None]:
    return _hadamard_factor(t, 1) * _hadamard_factor(t, 2), t["hada_w1_b"].shape[0]


def _lokr(t: Mapping[str, Tensor]) -> tuple[Tensor, int | None]:
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:  # Tucker form: w2_a (r, out2), w2_b (r, in2)
        w2 = tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:  # w2_a (out2, r), w2_b (r, in2[, kh, kw])
        b = t["lokr_w2_b"]
        w2 = (t["lokr_w2_a"] @ b.flatten(1)).reshape(-1, *b.shape[1:])
    w1 = w1.reshape(*w1.shape, *[1] * (w2.ndim - w1.ndim))  # kron pairs dims from the left
    rank = next((t[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in t), None)
    return torch.kron(w1, w2), rank


_REBUILD = {"lora": _lora, "loha": _loha, "lokr": _lokr, "full": lambda t: (t["diff"], None)}


def fit(delta: Tensor, shape: torch.Size) -> Tensor:
    """Reshape a rebuilt delta to the weight's shape: flat conv kernels, and linear vs 1x1 conv.

    The output dimension must agree; the rest only has to hold the same number of values.
    """
    if delta.shape == shape:
        return delta
    if delta.shape[0] == shape[0] and delta[0].numel() == torch.Size(shape[1:]).numel():
        return delta.reshape(shape)
    raise ValueError(f"delta of shape {tuple(delta.shape)} does not fit a weight of shape {tuple(shape)}")


def module_delta(
    tensors: Mapping[str, Tensor], shape: torch.Size, dtype: torch.dtype = torch.float32
) -> tuple[Tensor | None, Tensor | None]:
    """(weight delta, bias delta) of one module, alpha/rank applied, in `dtype`."""
    t = {role: value.to(dtype) for role, value in tensors.items()}
    family = family_of(set(t))
    bias = t.get("diff_b")
    if family == "full" and "diff" not in t:
        return None, bias
    delta, rank = _REBUILD[family](t)
    if rank is not None and "alpha" in t:
        delta = delta * (t["alpha"].item() / rank)
    return fit(delta, shape), bias
