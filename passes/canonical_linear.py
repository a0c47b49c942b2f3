"""Canonical linear sites: a weight used through its transpose in a matmul becomes `aten.linear`.

    before:  wt = aten.numpy_T(W)      (or aten.t / aten.permute(W, [1, 0]); W a 2-D model parameter)
             y  = aten.matmul(x, wt)
    after:   y  = aten.linear(x, W)

Some modules compute `x @ self.weight.T` instead of calling `F.linear` (Falcon's `FalconLinear`);
the weight then reaches no op an adapter can be placed at. Eager `F.linear` without a bias is
that same matmul, so the rewrite changes no value, and every method, fold and dispatch see the
linear site they know. Runs on each base capture, before any adapter pass.
"""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from peftc.capture import STATE

aten = torch.ops.aten

TRANSPOSES = (aten.numpy_T.default, aten.t.default, aten.permute.default)


def _transposed_weight(node: object) -> torch.fx.Node | None:
    """The 2-D model parameter `node` is the transpose of, or None."""
    if not isinstance(node, torch.fx.Node) or node.target not in TRANSPOSES:
        return None
    if node.target is aten.permute.default and [d % 2 for d in node.args[1]] != [1, 0]:
        return None
    weight = node.args[0]
    if isinstance(weight, torch.fx.Node) and weight.op == "placeholder" and STATE in weight.meta:
        val = weight.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() == 2:
            return weight
    return None


class LinearFromTransposedMatmul(PassBase):
    """Rewrite `gm` in place: every `matmul(x, W.T)` over a 2-D model parameter W becomes `linear(x, W)`."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        modified = False
        for node in _transposed_matmuls(gm):
            x, transposed = node.args
            with gm.graph.inserting_before(node):
                linear = gm.graph.call_function(aten.linear.default, (x, _transposed_weight(transposed)))
            linear.meta = dict(node.meta)
            node.replace_all_uses_with(linear)
            gm.graph.erase_node(node)
            if not transposed.users:
                gm.graph.erase_node(transposed)
            modified = True
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        left = _transposed_matmuls(gm)
        if left:
            raise AssertionError(f"matmuls by a transposed parameter left: {[n.name for n in left]}")


def _transposed_matmuls(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    out = []
    for node in gm.graph.find_nodes(op="call_function", target=aten.matmul.default):
        x, transposed = node.args[0], node.args[1]
        if _transposed_weight(transposed) is not None and isinstance(x.meta.get("val"), torch.Tensor) \
                and x.meta["val"].dim() >= 1:
            out.append(node)
    return out
