"""DoRA, LoRA's weight-decomposed variant: y = m / ‖W + s·BA‖ ⊙ (W x + s·B A x) + b, per output channel.

Computed as PEFT's `DoraLinearLayer`, `DoraEmbeddingLayer` and `DoraConv2dLayer` do: the norm is
taken over each output channel of W + s·BA (an embedding's channels are its embedding dims), it is
recomputed from the base weight and the adapter at every call and detached (DoRA paper, 4.3), so
only the magnitude m and the LoRA factors learn. The base output is reused without its bias, or,
under lora_dropout in training, recomputed from the dropped-out input, as PEFT does.

The formulas are written once over a `call` that runs an aten op: `eager` evaluates them on
tensors (the magnitude's init and `fold`), `SiteBuilder.call` emits them as graph nodes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from peftc.graph import Call, SiteBuilder, cast, cast_like, dtype_of, eager
from peftc.sites import Site

from .fold import BIAS_ARG

aten = torch.ops.aten

MAGNITUDE = ("lora_magnitude_vector", "weight")
# nn.Conv1d, nn.Conv2d, nn.Conv3d -> their spatial dims: a weight (out, in / groups, *kernel), a bias per channel
CONV_DIMS = {"nn_conv1d": 1, "conv2d": 2, "conv3d": 3}
CONV_KINDS = tuple(CONV_DIMS)

def _shape(x: torch.Tensor | torch.fx.Node) -> torch.Size:
    return x.meta["val"].shape if isinstance(x, torch.fx.Node) else x.shape


def out_first(call: Call, kind: str, w: Any) -> Any:
    """Between a module's weight layout and output-channels-first (its own inverse): Conv1D stores
    (in, out), an embedding (num, dim) whose output channels are the dims."""
    return call(aten.t.default, w) if kind in ("conv1d", "embedding") else w


def lora_weight(call: Call, kind: str, a: Any, b: Any) -> Any:
    """B·A, output channels first: (out, in), or a conv's (out, in / groups, *kernel). For a grouped conv this
    is PEFT's definition (B's (out / groups, r) rows times A, reshaped to the weight's shape), which only
    enters DoRA's norm; groups=1 gives the true B·A."""
    if kind in CONV_KINDS:
        a_shape, r = _shape(a), _shape(a)[0]
        flat = call(aten.mm.default, call(aten.reshape.default, b, [-1, r]), call(aten.reshape.default, a, [r, -1]))
        return call(aten.reshape.default, flat, [_shape(b)[0], -1, *a_shape[2:]])
    return call(aten.mm.default, b, a)


def weight_norm(call: Call, kind: str, w: Any, lw: Any, scale: Any) -> Any:
    """‖W + s·BA‖ per output channel, shaped as PEFT's magnitude: (out,), or (1, out, 1, ...) for a conv."""
    total = call(aten.add.Tensor, out_first(call, kind, w), call(aten.mul.Tensor, lw, scale))
    if kind in CONV_KINDS:
        norm = call(aten.linalg_vector_norm.default, total, 2, list(range(1, CONV_DIMS[kind] + 2)), True)
        return call(aten.transpose.int, norm, 1, 0)
    return call(aten.linalg_vector_norm.default, total, 2, [1])


def emit_dora(
    b: SiteBuilder,
    site: Site,
    y: torch.fx.Node,
    kind: str,
    x: torch.fx.Node,
    h: torch.fx.Node,
    lw: torch.fx.Node,
    magnitude: torch.fx.Node,
    scale: torch.fx.Node,
    dropped: bool,
) -> torch.fx.Node:
    """The site's new output, given the adapter's input `x` (dropped out when `dropped`) and B(A(x)) `h`.

    Computed in the adapter's dtype (the magnitude's; fp32 over a bf16/fp16 base) and cast back, as PEFT does.
    """
    w = cast_like(b, site.weight, magnitude)
    norm = b.call(aten.detach.default, weight_norm(b.call, kind, w, lw, scale))
    ratio = b.call(aten.div.Tensor, magnitude, norm)  # m / ‖W + s·BA‖
    lora = b.call(aten.mul.Tensor, b.call(aten.mul.Tensor, ratio, h), scale)
    if kind == "embedding":  # no bias, no dropout: ratio ⊙ y + ratio ⊙ s·h
        out = b.call(aten.add.Tensor, b.call(aten.mul.Tensor, ratio, cast_like(b, y, magnitude)), lora)
        return cast(b, out, dtype_of(magnitude), dtype_of(y))
    # W x in the base dtype without dropout (the multiplication by `ratio` promotes it), as PEFT has it
    wx = _base_without_bias(b, site, kind, x, w) if dropped else _minus_bias(b, site, y, kind)
    wx = b.call(aten.mul.Tensor, b.call(aten.sub.Tensor, ratio, 1), wx)
    dora = b.call(aten.add.Tensor, wx, lora)  # (ratio - 1) ⊙ W x + ratio ⊙ s·h, added to y
    return b.call(aten.add.Tensor, y, cast(b, dora, dtype_of(magnitude), dtype_of(y)))


def _minus_bias(b: SiteBuilder, site: Site, y: torch.fx.Node, kind: str) -> torch.fx.Node:
    """W x: the base output with its bias taken off again."""
    index = BIAS_ARG.get(site.node.target)
    bias = site.node.args[index] if index is not None and index < len(site.node.args) else None
    if bias is None:
        return y
    if kind in CONV_KINDS:
        bias = b.call(aten.reshape.default, bias, [-1, *[1] * CONV_DIMS[kind]])
    return b.call(aten.sub.Tensor, y, bias)


def _base_without_bias(b: SiteBuilder, site: Site, kind: str, x: torch.fx.Node, w: torch.fx.Node) -> torch.fx.Node:
    """W x for the dropped-out `x`: the base op again, without bias, same geometry."""
    if kind == "linear":
        return b.call(aten.linear.default, x, w)
    if kind == "conv1d":
        return b.call(aten.mm.default, x, w)
    node = site.node  # convNd(x, w, bias, stride, ...) / convolution(x, w, bias, stride, ...)
    return b.call(node.target, x, w, None, *node.args[3:])


def fold_dora(kind: str, merged: torch.Tensor, base_weight: torch.Tensor, lw: torch.Tensor,
              magnitude: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """m / ‖W + s·BA‖ ⊙ (W + s·BA), per output channel; `merged` is W + s·BA in the module's layout."""
    ratio = magnitude / weight_norm(eager, kind, base_weight, lw, scale)
    merged = out_first(eager, kind, merged)
    return out_first(eager, kind, ratio.reshape(-1, *[1] * (merged.dim() - 1)) * merged)
