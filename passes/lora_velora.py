"""VeLoRA (`velora_config`): LoRA whose A learns from compressed input activations, as PEFT's `VeloraFunction`.

The forward is LoRA's. In training, A's gradient is computed from the input compressed to one number per
group of `group_dim` features (its projection on a unit vector v) and expanded back: gᵀ·(scale·(x̃·v)vᵀ),
while the input's gradient stays exact. In the graph that is

    A x = linear(x, A.detach()) + (linear(x_r, A) - linear(x_r, A).detach())

whose value is A x (the second term is exactly zero) and whose gradients are exact for x and use the
reconstruction x_r for A. v is `lora_velora_embed`: drawn at init ("random"), or, under "batch_average",
the normalised mean of the groups of each training batch (PEFT recomputes it at every training step and
keeps the last one in the buffer; peftc computes it in the graph and keeps the saved buffer as it was).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from peftc.graph import SiteBuilder, dtype_of
from peftc.method import TensorKey

aten = torch.ops.aten

EMBED = ("lora_velora_embed", None)  # live `...lora_velora_embed.<adapter>`, saved `...lora_velora_embed`


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
    else:  # "batch_average": the normalised mean group of this batch
        mean = b.call(aten.mean.dim, b.call(aten.reshape.default, groups, [-1, size]), [0])
        mean = b.call(aten._to_copy.default, mean, dtype=torch.float32)
        norm = b.call(aten.linalg_vector_norm.default, mean, 2)
        ones = b.call(aten.div.Scalar, b.call(aten.ones_like.default, mean), math.sqrt(size))
        v = b.call(aten.where.self, b.call(aten.eq.Scalar, norm, 0), ones, b.call(aten.div.Tensor, mean, norm))
        v = b.call(aten._to_copy.default, v, dtype=dtype_of(tensors[EMBED]))  # as PEFT stores it
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
