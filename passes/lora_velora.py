"""VeLoRA (`velora_config`): LoRA whose A learns from compressed input activations, as PEFT's `VeloraFunction`.

The forward is LoRA's. In training, A's gradient is computed from the input compressed to one number per
group of `group_dim` features (its projection on a unit vector v) and expanded back: gᵀ·(scale·(x̃·v)vᵀ),
while the input's gradient stays exact. In the graph that is

    A x = linear(x, A.detach()) + (linear(x_r, A) - linear(x_r, A).detach())

whose value is A x (the second term is exactly zero) and whose gradients are exact for x and use the
reconstruction x_r for A. v is `lora_velora_embed`: drawn at init ("random"), or the normalised mean of the
groups of a training batch, computed in the graph: every batch's under "batch_average", the first's under
"batch_average_once", as PEFT's `_maybe_update_embed`. Like PEFT, which assigns it to its buffer, the graph writes
v back to `lora_velora_embed` (so checkpoints hold the last one), and for "batch_average_once" sets a flag, a
run-time tensor as PEFT's `lora_velora_initialized` is a dict outside the state dict: false at creation and at
load, so a loaded adapter takes its projection from its first training batch again, as PEFT's does. PEFT updates
v only when gradients are on: `before_call` records the grad mode of each training call for the graph.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from peftc.graph import SiteBuilder, dtype_of, write_state
from peftc.method import TensorKey

aten = torch.ops.aten

EMBED = ("lora_velora_embed", None)  # live `...lora_velora_embed.<adapter>`, saved `...lora_velora_embed`
# run-time (unsaved) flags of the batch inits: gradients on in this call; "batch_average_once"'s v set
GRAD_ON, INITIALIZED = ("lora_velora_grad_enabled", None), ("lora_velora_initialized", None)


def group_dim(in_features: int, num_groups: int) -> int:
    return -(-in_features // num_groups)


def normalized(embed: torch.Tensor) -> torch.Tensor:
    """PEFT's `_normalize_projection` (a zero vector becomes the normalised ones vector)."""
    embed = embed.float()
    norm = torch.linalg.vector_norm(embed)
    return torch.ones_like(embed) / math.sqrt(embed.numel()) if norm == 0 else embed / norm


def init_embed(in_features: int, velora: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    """The projection at init, drawn as PEFT draws it: random (normalised) or zeros until the first batch."""
    size = group_dim(in_features, velora["num_groups"])
    if velora["init_type"] == "random":
        return normalized(torch.randn(size, dtype=dtype)).to(dtype)
    return torch.zeros(size, dtype=dtype)


def flags(velora: dict[str, Any], device: torch.device) -> dict[TensorKey, torch.Tensor]:
    """The run-time flags a batch init reads (none for "random")."""
    if velora["init_type"] == "random":
        return {}
    out = {GRAD_ON: torch.tensor(True, device=device)}
    if velora["init_type"] == "batch_average_once":
        out[INITIALIZED] = torch.tensor(False, device=device)
    return out


def record_grad_mode(tensors: dict[TensorKey, torch.Tensor]) -> None:
    """Before a training call: whether it runs with gradients (PEFT's VeLoRA updates v only then)."""
    if GRAD_ON in tensors:
        tensors[GRAD_ON].fill_(torch.is_grad_enabled())


def project(b: SiteBuilder, x: torch.fx.Node, tensors: dict[TensorKey, torch.fx.Node], key_a: TensorKey,
            velora: dict[str, Any], in_features: int) -> torch.fx.Node:
    """A x with VeLoRA's gradient for A (training only; elsewhere it is `linear(x, A)`). `x` is in A's dtype."""
    num_groups, size = velora["num_groups"], group_dim(in_features, velora["num_groups"])
    a, dtype = tensors[key_a], dtype_of(tensors[key_a])
    xd = b.call(aten.detach.default, x)
    pad = num_groups * size - in_features
    if pad:
        xd = b.call(aten.constant_pad_nd.default, xd, [0, pad])
    groups = b.call(aten.unflatten.int, xd, -1, [num_groups, size])  # (..., num_groups, group_dim)
    if velora["init_type"] == "random":
        v = tensors[EMBED]
    else:  # "batch_average(_once)": the normalised mean group of this batch, or the one kept
        mean = b.call(aten.mean.dim, b.call(aten.reshape.default, groups, [-1, size]), [0])
        mean = b.call(aten._to_copy.default, mean, dtype=torch.float32)
        norm = b.call(aten.linalg_vector_norm.default, mean, 2)
        ones = b.call(aten.div.Scalar, b.call(aten.ones_like.default, mean), math.sqrt(size))
        v = b.call(aten.where.self, b.call(aten.eq.Scalar, norm, 0), ones, b.call(aten.div.Tensor, mean, norm))
        v = b.call(aten._to_copy.default, v, dtype=dtype_of(tensors[EMBED]))  # as PEFT stores it
        v = kept(b, tensors, velora, v)
    v = b.call(aten._to_copy.default, v, dtype=dtype)
    compressed = b.call(aten.einsum.default, "...gd,d->...g", [groups, v])
    expanded = b.call(aten.mul.Tensor, b.call(aten.unsqueeze.default, compressed, -1), v)
    recon = b.call(aten.flatten.using_ints, expanded, -2, -1)
    if pad:
        recon = b.call(aten.slice.Tensor, recon, -1, 0, in_features)
    recon = b.call(aten.mul.Scalar, recon, velora["scale"])
    through_a = b.call(aten.linear.default, recon, a)  # the path A's gradient takes
    zero = b.call(aten.sub.Tensor, through_a, b.call(aten.detach.default, through_a))
    return b.call(aten.add.Tensor, b.call(aten.linear.default, x, b.call(aten.detach.default, a)), zero)


def kept(b: SiteBuilder, tensors: dict[TensorKey, torch.fx.Node], velora: dict[str, Any],
         batch: torch.fx.Node) -> torch.fx.Node:
    """The v PEFT's `_maybe_update_embed` leaves: this batch's (when gradients are on and, for
    "batch_average_once", none was set yet) or the stored one; written back, as PEFT assigns its buffer (where
    the module runs twice per call, PEFT keeps the last batch's; a once-set v is refused there)."""
    once = velora["init_type"] == "batch_average_once"
    refresh = tensors[GRAD_ON]
    if once:
        refresh = b.call(aten.logical_and.default, refresh, b.call(aten.logical_not.default, tensors[INITIALIZED]))
        write_state(b.call(aten.logical_or.default, tensors[INITIALIZED], tensors[GRAD_ON]), tensors[INITIALIZED])
    v = b.call(aten.where.self, refresh, batch, tensors[EMBED])
    write_state(v, tensors[EMBED], last_wins=not once)
    return v
