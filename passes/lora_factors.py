"""LoRA's variants that reshape its factors on a Linear: KaSA (`kasa_config`) and BD-LoRA (`use_bdlora`).

    KaSA:    y = W_t x + s·B (d ⊙ A x),   W_t = W less its r smallest singular components, d = lora_diag
    BD-LoRA: y = W x + s·B A x,           with A or B block-diagonal (only the blocks are stored)

As PEFT's `KasaLinearVariant` and `BdLoraLinearVariant`: KaSA truncates the base weight once at init (peftc
keeps the truncated weight as a new base tensor, `AdapterTensors.base`; the user's stays as it was) and learns
a diagonal between A and B; BD-LoRA stores a block-diagonal factor as its nblocks blocks stacked, (rows,
cols / nblocks), under the factor's usual key. A factor narrower than its dense shape is block-diagonal,
with as many blocks as it is narrower: the tensors say it, so `emit` and `fold` need nothing else.

`branch` is the one definition of the update, over a `Call` (graph nodes in `emit`, tensors in `fold`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from peftc.config import LoraConfig
from peftc.errors import ConfigError
from peftc.graph import Call
from peftc.method import TensorKey

aten = torch.ops.aten

DIAG = ("lora_diag", None)  # KaSA's learned singular values: `...lora_diag.<adapter>` live, `...lora_diag` saved


def _shape(t: Any) -> torch.Size:
    return t.meta["val"].shape if isinstance(t, torch.fx.Node) else t.shape


def blocks(a: Any, b: Any, in_features: int) -> tuple[int, int]:
    """(blocks of A, blocks of B): 1 for a dense factor."""
    (r, a_cols), (_, b_cols) = _shape(a)[:2], _shape(b)[:2]
    return in_features // a_cols, r // b_cols


def project(call: Call, x: Any, w: Any, nblocks: int, bias: Any = None) -> Any:
    """x @ Wᵀ (+ bias) for W = block_diag of the nblocks row blocks of `w` (PEFT's `BlockDiagonalLinear`)."""
    if nblocks == 1:
        return call(aten.linear.default, x, w, bias)
    rows, cols = _shape(w)
    parts = call(aten.unflatten.int, x, -1, [nblocks, cols])  # (..., nblocks, cols)
    w3 = call(aten.view.default, w, [nblocks, rows // nblocks, cols])
    out = call(aten.flatten.using_ints, call(aten.einsum.default, "...im,inm->...in", [parts, w3]), -2, -1)
    return out if bias is None else call(aten.add.Tensor, out, bias)


def dense(w: torch.Tensor, nblocks: int) -> torch.Tensor:
    """The block-diagonal matrix whose nblocks diagonal blocks are `w`'s row blocks."""
    return torch.block_diag(*torch.chunk(w, nblocks, dim=0)) if nblocks > 1 else w


def branch(call: Call, x: Any, tensors: dict[TensorKey, Any], keys: tuple[TensorKey, TensorKey, TensorKey],
           in_features: int) -> Any:
    """B (d ⊙ A x) (+ B's bias), unscaled: the LoRA update of a Linear with any of these variants (or none)."""
    key_a, key_b, key_bias = keys
    nb_a, nb_b = blocks(tensors[key_a], tensors[key_b], in_features)
    h = project(call, x, tensors[key_a], nb_a)
    if DIAG in tensors:
        h = call(aten.mul.Tensor, h, tensors[DIAG])
    return project(call, h, tensors[key_b], nb_b, tensors.get(key_bias))


def dense_factors(tensors: dict[TensorKey, torch.Tensor], keys: tuple[TensorKey, TensorKey], in_features: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as dense matrices with d folded into B's columns: B·A is the update `branch` applies."""
    key_a, key_b = keys
    nb_a, nb_b = blocks(tensors[key_a], tensors[key_b], in_features)
    a, b = dense(tensors[key_a], nb_a), dense(tensors[key_b], nb_b)
    return a, b * tensors[DIAG] if DIAG in tensors else b


def kasa_init(module_name: str, weight: torch.Tensor, r: int, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_diag, truncated base weight): d drawn as PEFT draws it, W without its r smallest singular
    components (SVD in fp32, the result in the weight's dtype)."""
    k = min(weight.shape)
    if r >= k:
        raise ConfigError(f"r={r} for module {module_name!r}: KaSA keeps min(in, out) - r = {k - r} singular "
                          f"components of its {tuple(weight.shape)} weight, and needs at least one (r < {k})")
    diag = torch.randn(r, dtype=dtype)
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    return diag, ((u[:, :k - r] * s[:k - r]) @ vh[:k - r]).to(weight.dtype)


def bdlora_side(config: LoraConfig, module_name: str) -> str | None:
    """"A" or "B": which factor `use_bdlora` makes block-diagonal at this module (PEFT's substring match)."""
    bd = config.use_bdlora
    on_a = any(p in module_name for p in bd["target_modules_bd_a"] or [])
    on_b = any(p in module_name for p in bd["target_modules_bd_b"] or [])
    if on_a and on_b:
        raise ConfigError(f"use_bdlora: module {module_name!r} matches both target_modules_bd_a and "
                          "target_modules_bd_b")
    if bd["match_strict"] and not (on_a or on_b):
        raise ConfigError(f"use_bdlora: module {module_name!r} matches neither target_modules_bd_a nor "
                          "target_modules_bd_b (set match_strict=False to leave it a plain LoRA)")
    return "A" if on_a else "B" if on_b else None


def bdlora_factor(config: LoraConfig, module_name: str, side: str, shape: tuple[int, int],
                  dtype: torch.dtype) -> torch.Tensor:
    """The stacked blocks of the block-diagonal factor of dense `shape` (rows, cols), drawn as PEFT's
    `BlockDiagonalLinear`: A Kaiming-uniform (a=0), B zero."""
    nblocks = config.use_bdlora["nblocks"]
    if shape[0] % nblocks or shape[1] % nblocks:
        raise ConfigError(f"use_bdlora: lora_{side} of module {module_name!r} is {shape[0]}x{shape[1]}, not "
                          f"divisible into nblocks={nblocks} blocks")
    w = torch.empty(shape[0], shape[1] // nblocks, dtype=dtype)
    if side == "A":
        nn.init.kaiming_uniform_(w)
    else:
        nn.init.zeros_(w)
    return w
