"""Combining LoRA adapters into one (PEFT's `add_weighted_adapter`), as pure tensor functions.

Two layers, both independent of any model object:

- merge functions over a list of same-shape "task tensors" (PEFT's `merge_utils`): `task_arithmetic`,
  `magnitude_prune`, `ties`, `dare_linear`, `dare_ties` (with `prune`, `majority_sign_mask`,
  `disjoint_merge` as building blocks). DARE draws its masks with `torch.bernoulli`, from torch's
  global RNG unless a `generator` is given, so a seeded run gives PEFT's masks.
- `combine_lora`: one module's new lora_A / lora_B from the adapters' A, B and scalings, exactly as
  PEFT computes them, plus `combined_rank_alpha`: the new adapter's r and lora_alpha (PEFT sets both
  to the new rank, so the new adapter's scale alpha / r is 1 and every weight and scaling is folded
  into A and B).

How each `combination_type` builds the new adapter (c_i = weight_i * scaling_i, ΔW_i = B_i A_i):

- "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune": the A's are merged with
  sign(c_i)·sqrt(|c_i|) and the B's, separately, with sqrt(|c_i|) (the sign goes on one side only).
  All adapters must have the same rank. With one adapter every type is "linear" (PEFT's rule).
- "cat": A' = cat_i(c_i·A_i), B' = cat_i(B_i); rank Σ r_i.
- "svd" and the "_svd" forms ("ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"):
  the s_i·ΔW_i are merged in weight space with the weights w_i, then truncated to `svd_rank`
  (default: the largest rank) by SVD: B' = U·diag(S), A' = Vh, optionally clamped at the `svd_clamp` quantile.
- "delta" (peftc's, not PEFT's): A' = cat_i(A_i), B' = cat_i(c_i·B_i); rank Σ r_i, B'A' = Σ c_i ΔW_i.

Why "linear" is not the weighted sum of the deltas: A and B are weighted and summed separately, so

    B'A' = Σ_i Σ_j sign(c_j)·sqrt(|c_i|·|c_j|)·B_i A_j
         = Σ_i c_i·ΔW_i  +  Σ_{i≠j} sign(c_j)·sqrt(|c_i|·|c_j|)·B_i A_j.

The diagonal terms are the weighted deltas; the cross terms B_i A_j (adapter i's up-projection
applied to adapter j's down-projection) are extra. The two coincide only when the cross terms
vanish: a single adapter (or all weights but one zero), or adapters with B_i A_j = 0 for i ≠ j, e.g.
adapters that use disjoint rank slots (where A_i has nonzero rows, every other B_j has zero columns).
In general they cannot coincide: Σ c_i ΔW_i may have rank up to Σ r_i, more than a rank-r LoRA holds.
"delta" represents Σ c_i ΔW_i exactly with rank Σ r_i and scale 1 (r' = alpha'). PEFT's "cat" is
the same product with each c_i put on A_i instead of B_i, so the two agree up to rounding; "delta"
leaves A' the plain concatenation of the source A's. "svd" is exact only when svd_rank reaches the
rank of Σ c_i ΔW_i.

Tensor layouts are PEFT's: linear / Conv1D: A (r, in), B (out, r); embedding: lora_embedding_A
(r, num_embeddings), lora_embedding_B (dim, r); conv2d: A (r, in, kh, kw), B (out, r, 1, 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .errors import ConfigError, closest

Tensor = torch.Tensor
Weights = Tensor | Sequence[float]  # one per task tensor; a list becomes float32, as in PEFT

# merges applied to each factor (A's, then B's): (prune method, rescale after pruning, elect signs)
_RECIPES: dict[str, tuple[str | None, bool, bool]] = {
    "linear": (None, False, False),
    "magnitude_prune": ("magnitude", False, False),
    "ties": ("magnitude", False, True),
    "dare_linear": ("random", True, False),
    "dare_ties": ("random", True, True),
}
# merges applied to the weight-space deltas, followed by a truncated SVD
_SVD_TYPES = {"svd": "linear", **{f"{name}_svd": name for name in _RECIPES if name != "linear"}}
CONCAT_TYPES = ("cat", "delta")
COMBINATION_TYPES = (*_RECIPES, *CONCAT_TYPES, *_SVD_TYPES)
SIGN_METHODS = ("total", "frequency")
KINDS = ("linear", "conv1d", "conv2d", "embedding")


# ---------------------------------------------------------------------------------------------
# merge functions over task tensors (PEFT's merge_utils)


def prune(
    tensor: Tensor, density: float, method: str, *, rescale: bool = False, generator: torch.Generator | None = None
) -> Tensor:
    """Keep a fraction `density` of `tensor`'s entries: the largest in magnitude ("magnitude") or
    random ones ("random", rescaled by 1/density when `rescale`). density 1 keeps everything."""
    _check_density(density, "density")
    if density >= 1:
        return tensor
    if method == "magnitude":
        keep = torch.zeros_like(tensor).reshape(-1)
        keep[tensor.abs().reshape(-1).topk(int(density * tensor.numel())).indices] = 1
        return tensor * keep.reshape(tensor.shape)
    if method == "random":
        # full_like keeps `tensor`'s layout, so the mask is drawn as PEFT draws it
        pruned = tensor * torch.bernoulli(torch.full_like(tensor, density), generator=generator)
        return pruned / density if rescale else pruned
    raise ConfigError(f"unknown prune method {method!r}: expected 'magnitude' or 'random'")


def majority_sign_mask(stacked: Tensor, method: str = "total") -> Tensor:
    """Where each task tensor (stacked on dim 0) agrees with the elected sign: the sign of the sum
    ("total") or of the sign count ("frequency"); ties elect +."""
    _check_sign_method(method)
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def disjoint_merge(weighted: Tensor, mask: Tensor) -> Tensor:
    """Mean over dim 0 of the entries `mask` keeps (0 where none is kept)."""
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def merge_tensors(
    merge: str,
    tensors: Sequence[Tensor],
    weights: Weights,
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Merge same-shape task tensors by name: "linear" (task arithmetic), "magnitude_prune", "ties",
    "dare_linear" or "dare_ties"."""
    if merge not in _RECIPES:
        raise ConfigError(f"unknown merge {merge!r}; expected one of {list(_RECIPES)}")
    prune_method, rescale, elect_sign = _RECIPES[merge]
    if elect_sign:  # before any random mask is drawn
        _check_sign_method(majority_sign_method)
    if prune_method is not None:
        _check_density(density, f"density (required by merge {merge!r})")
        tensors = [prune(t, density, prune_method, rescale=rescale, generator=generator) for t in tensors]
    stacked = torch.stack(list(tensors), dim=0)
    if not isinstance(weights, Tensor):
        weights = torch.tensor(list(weights))
    if weights.shape != stacked.shape[:1]:
        raise ConfigError(f"weights has {weights.numel()} entries for {len(stacked)} tensors")
    weighted = stacked * weights.to(stacked.device).view(-1, *(1,) * (stacked.dim() - 1))
    if elect_sign:
        return disjoint_merge(weighted, majority_sign_mask(stacked, majority_sign_method))
    return weighted.sum(dim=0)


def task_arithmetic(tensors: Sequence[Tensor], weights: Weights) -> Tensor:
    """Σ w_i·t_i."""
    return merge_tensors("linear", tensors, weights)


def magnitude_prune(tensors: Sequence[Tensor], weights: Weights, density: float) -> Tensor:
    """Σ w_i·t_i after keeping each t_i's largest-magnitude entries."""
    return merge_tensors("magnitude_prune", tensors, weights, density=density)


def ties(
    tensors: Sequence[Tensor], weights: Weights, density: float, majority_sign_method: str = "total"
) -> Tensor:
    """TIES: magnitude-prune, elect a sign per entry, average the weighted entries that agree with it."""
    return merge_tensors("ties", tensors, weights, density=density, majority_sign_method=majority_sign_method)


def dare_linear(
    tensors: Sequence[Tensor], weights: Weights, density: float, *, generator: torch.Generator | None = None
) -> Tensor:
    """DARE: Σ w_i·t_i after dropping entries at random and rescaling the rest by 1/density."""
    return merge_tensors("dare_linear", tensors, weights, density=density, generator=generator)


def dare_ties(
    tensors: Sequence[Tensor],
    weights: Weights,
    density: float,
    majority_sign_method: str = "total",
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE's random pruning, then TIES's sign election and disjoint merge."""
    return merge_tensors(
        "dare_ties", tensors, weights, density=density, majority_sign_method=majority_sign_method, generator=generator
    )


# ---------------------------------------------------------------------------------------------
# LoRA combination


def delta_weight(A: Tensor, B: Tensor, scaling: float, kind: str = "linear", fan_in_fan_out: bool = False) -> Tensor:
    """A LoRA's update in the base weight's layout, computed as PEFT's `get_delta_weight` does (same
    ops, same memory layout, so PEFT's random masks over it are reproduced)."""
    kind, fan_in_fan_out = _check_kind(kind, fan_in_fan_out)
    dtype = A.dtype
    if A.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):  # as PEFT: no half matmuls on CPU
        A, B = A.float(), B.float()
    if kind == "conv2d":
        if A.shape[2:] == (1, 1):
            delta = (B.flatten(1) @ A.flatten(1))[:, :, None, None] * scaling
        else:
            delta = F.conv2d(A.transpose(0, 1), B).transpose(0, 1) * scaling
    else:
        delta = B @ A
        delta = (delta.T if kind == "embedding" or fan_in_fan_out else delta) * scaling
    return delta.to(dtype)


def combined_rank_alpha(combination_type: str, ranks: Sequence[int], svd_rank: int | None = None) -> tuple[int, int]:
    """The new adapter's (r, lora_alpha), PEFT's rule: the common rank for the "linear" family, the sum
    for "cat" (and "delta"), `svd_rank` or the largest rank for the SVD forms; alpha = r (scale 1).

    `ranks` are the source adapters' r, as PEFT allocates them (max of r and rank_pattern values).
    PEFT's new config keeps the first adapter's other fields, use_rslora included: under rsLoRA its
    scale is alpha / sqrt(r) = sqrt(r), not 1, which PEFT's combination does not account for.
    """
    if not ranks:
        raise ConfigError("add_weighted_adapter needs at least one adapter (adapters is empty)")
    combination_type = _check_type(combination_type, len(ranks))
    if combination_type in _RECIPES:
        r = _common_rank(combination_type, ranks)
    elif combination_type in CONCAT_TYPES:
        r = sum(ranks)
    else:
        r = svd_rank or max(ranks)
    return r, r


def combine_lora(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    scalings: Sequence[float],
    weights: Sequence[float],
    combination_type: str,
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    kind: str = "linear",
    fan_in_fan_out: bool = False,
    pad_to: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The new adapter's (A, B) at one module, to be used with scale 1 (r = lora_alpha).

    As, Bs, scalings: the source adapters present at this module (PEFT skips the absent ones);
    weights: one per adapter, may be negative. `kind` is "linear", "conv1d" (transformers' Conv1D,
    i.e. fan_in_fan_out), "conv2d" or "embedding". `pad_to` zero-pads the rank to the new adapter's
    r (PEFT allocates one rank for every module, e.g. the sum of the configs' ranks for "cat").
    DARE masks come from `generator`, or torch's global RNG as in PEFT; PEFT visits modules in
    `named_modules()` order, A's before B's, so follow that order for seeded parity.
    """
    n = len(As)
    for field, values in (("Bs", Bs), ("scalings", scalings), ("weights", weights)):
        if len(values) != n:
            raise ConfigError(f"{field} has {len(values)} entries but there are {n} adapters (As)")
    if n == 0:
        raise ConfigError("add_weighted_adapter needs at least one adapter (adapters is empty)")
    combination_type = _check_type(combination_type, n)
    kind, fan_in_fan_out = _check_kind(kind, fan_in_fan_out)
    ranks = _check_shapes(As, Bs, kind, combination_type)
    merge = combination_type if combination_type in _RECIPES else _SVD_TYPES.get(combination_type)
    if merge is not None and _RECIPES[merge][0] is not None:
        _check_density(density, f"density (required by combination_type={combination_type!r})")
    if merge in ("ties", "dare_ties"):
        _check_sign_method(majority_sign_method)
    scalings = [float(s) for s in scalings]
    merge_args = dict(density=density, majority_sign_method=majority_sign_method, generator=generator)

    if combination_type in _RECIPES:
        _common_rank(combination_type, ranks)
        A, B = _merge_factors(As, Bs, scalings, weights, combination_type, merge_args)
    elif combination_type == "cat":
        A = torch.cat([a * w * s for a, w, s in zip(As, weights, scalings)], dim=0)
        B = torch.cat(list(Bs), dim=1)
    elif combination_type == "delta":
        A = torch.cat(list(As), dim=0)
        B = torch.cat([b * (w * s) for b, w, s in zip(Bs, weights, scalings)], dim=1)
    else:
        deltas = [delta_weight(a, b, s, kind, fan_in_fan_out) for a, b, s in zip(As, Bs, scalings)]
        merged = merge_tensors(merge, deltas, weights, **merge_args)
        A, B = _truncated_svd(merged, As[0], kind, fan_in_fan_out, svd_rank or max(ranks), svd_clamp,
                              svd_full_matrices, svd_driver)
    return _pad_rank(A, B, pad_to)


def _merge_factors(
    As: Sequence[Tensor], Bs: Sequence[Tensor], scalings: list[float], weights: Sequence[float], merge: str,
    merge_args: dict,
) -> tuple[Tensor, Tensor]:
    """Merge the A's and the B's separately; each c_i = w_i·s_i is split as sqrt(|c_i|) on both
    sides, its sign on A only (else two negative factors would cancel it)."""
    roots = [math.sqrt(abs(w * s)) for w, s in zip(weights, scalings)]
    signs = [1 if w * s >= 0 else -1 for w, s in zip(weights, scalings)]
    A = merge_tensors(merge, As, [r * sign for r, sign in zip(roots, signs)], **merge_args)
    B = merge_tensors(merge, Bs, roots, **merge_args)
    return A.to(As[0].dtype), B.to(As[0].dtype)


def _truncated_svd(
    delta: Tensor, like_A: Tensor, kind: str, fan_in_fan_out: bool, rank: int, clamp: float | None,
    full_matrices: bool, driver: str | None,
) -> tuple[Tensor, Tensor]:
    """(A, B) of the best rank-`rank` approximation of a weight-space delta (kohya's svd_merge_lora)."""
    if kind == "conv2d":
        delta = delta.flatten(1)  # (out, in·kh·kw)
    if kind == "embedding" or fan_in_fan_out:
        delta = delta.T  # back to (out, in), B @ A's layout
    if not 0 < rank <= min(delta.shape):
        raise ConfigError(f"svd_rank={rank} must be between 1 and {min(delta.shape)} (the layer's smaller dimension)")
    if clamp is not None and not 0 <= clamp <= 1:
        raise ConfigError(f"svd_clamp={clamp} is a quantile and must be in [0, 1]")
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    B = U[:, :rank] @ torch.diag(S[:rank])
    A = Vh[:rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-high, high), A.clamp(-high, high)
    if kind == "conv2d":
        return A.reshape(rank, *like_A.shape[1:]), B.reshape(B.shape[0], rank, 1, 1)
    return A.clone(), B  # clone: a view would keep the full Vh alive


def _pad_rank(A: Tensor, B: Tensor, rank: int | None) -> tuple[Tensor, Tensor]:
    if rank is None or rank == A.shape[0]:
        return A, B
    if rank < A.shape[0]:
        raise ConfigError(f"pad_to={rank} is smaller than the combined rank {A.shape[0]}")
    extra = rank - A.shape[0]
    A = torch.cat([A, A.new_zeros(extra, *A.shape[1:])], dim=0)
    B = torch.cat([B, B.new_zeros(B.shape[0], extra, *B.shape[2:])], dim=1)
    return A, B


# ---------------------------------------------------------------------------------------------
# validation


def _check_type(combination_type: str, n_adapters: int) -> str:
    if combination_type not in COMBINATION_TYPES:
        hint = closest(combination_type, COMBINATION_TYPES)
        raise ConfigError(
            f"unknown combination_type {combination_type!r}; expected one of {list(COMBINATION_TYPES)}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )
    # PEFT: a single adapter can only be combined linearly ("delta" of one adapter is exact anyway)
    return "linear" if n_adapters == 1 and combination_type != "delta" else combination_type


def _common_rank(combination_type: str, ranks: Sequence[int]) -> int:
    if len(set(ranks)) != 1:
        raise ConfigError(
            f"combination_type={combination_type!r} needs every adapter to have the same r, got ranks "
            f"{list(ranks)}; use 'cat', 'delta' or an SVD form ('svd', 'ties_svd', ...) to combine different ranks"
        )
    return ranks[0]


def _check_kind(kind: str, fan_in_fan_out: bool) -> tuple[str, bool]:
    if kind not in KINDS:
        raise ConfigError(f"add_weighted_adapter does not combine adapters on {kind!r} layers (nn.Conv1d / nn.Conv3d) "
                          f"yet; it combines {list(KINDS)}")
    return kind, fan_in_fan_out or kind == "conv1d"


def _check_density(density: float | None, field: str) -> None:
    if density is None or not 0 <= density <= 1:
        raise ConfigError(f"{field} must be a fraction in [0, 1], got {density!r}")


def _check_sign_method(method: str) -> None:
    if method not in SIGN_METHODS:
        raise ConfigError(f"majority_sign_method={method!r} must be one of {list(SIGN_METHODS)}")


def _check_shapes(As: Sequence[Tensor], Bs: Sequence[Tensor], kind: str, combination_type: str) -> list[int]:
    """Each adapter's rank; every adapter must factor the same layer."""
    dims = 4 if kind == "conv2d" else 2
    for i, (a, b) in enumerate(zip(As, Bs)):
        if a.dim() != dims or b.dim() != dims:
            raise ConfigError(
                f"adapter {i}: a {kind} LoRA has {dims}-d A and B, got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        if (a.shape[1:], b.shape[0], b.shape[2:]) != (As[0].shape[1:], Bs[0].shape[0], Bs[0].shape[2:]):
            raise ConfigError(
                f"adapter {i} factors a different layer: A {tuple(a.shape)}, B {tuple(b.shape)} vs "
                f"A {tuple(As[0].shape)}, B {tuple(Bs[0].shape)}"
            )
        if b.shape[1] != a.shape[0] and (kind != "conv2d" or combination_type not in _RECIPES):
            # a grouped conv's B (out, r/groups, 1, 1) is block-diagonal: concatenating ranks or
            # rebuilding it from an SVD is not a grouped kernel (PEFT's result is wrong or fails there)
            raise ConfigError(
                f"adapter {i}: A {tuple(a.shape)} and B {tuple(b.shape)} do not compose"
                + (f" (grouped conv): combination_type={combination_type!r} needs groups=1" if kind == "conv2d" else "")
            )
    return [a.shape[0] for a in As]
