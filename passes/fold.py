"""The fold pass: adapted modules read merged tensors instead of their base tensors.

Folding runs on the captured base graph, not on an adapted one: merging is only rebinding
each site of an adapted module from its base weight (and bias) to the merged tensor, so the
folded graph has the base graph's nodes exactly, no adapter nodes, and the base tensors stay
untouched (unmerging is dropping the fold, exact to the bit). Sites are rebound one by one,
so a tied weight folded at one use (an adapted `embed_tokens`) keeps its other uses
(`lm_head`) on the base tensor.
"""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from peftc.capture import STATE
from peftc.graph import add_state_input, drop_unused_state
from peftc.sites import WEIGHT_OPS, sites_by_module

aten = torch.ops.aten

# op -> index of its bias argument (ops without one are absent)
BIAS_ARG = {
    aten.linear.default: 2,
    aten.addmm.default: 0,
    aten.conv1d.default: 2,
    aten.conv2d.default: 2,
    aten.conv3d.default: 2,
    aten.convolution.default: 2,
}


class FoldAdapters(PassBase):
    """before: y = op(x, W, b)            (each site of a folded module)
    after:  y = op(x, W_merged, b_merged)

    `folded` maps module path -> {"weight"/"bias": (tree name of the merged tensor, example tensor)}."""

    def __init__(self, folded: dict[str, dict[str, tuple[str, torch.Tensor]]]) -> None:
        self.folded = folded

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        sites = sites_by_module(gm.graph)
        replaced = []
        for path, tensors in self.folded.items():
            for site in sites.get(path, []):
                node = site.node
                args = list(node.args)
                for leaf, (fqn, example) in tensors.items():
                    index = _argument_index(node, leaf)
                    if index is None or index >= len(args) or args[index] is None:
                        raise ValueError(f"cannot fold {leaf!r} of {path!r}: aten.{site.op} there has no {leaf} input")
                    replaced.append(args[index])
                    args[index] = add_state_input(gm, fqn, example)
                node.args = tuple(args)
        drop_unused_state(gm, replaced)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, bool(replaced))

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        for path, sites in sites_by_module(gm.graph).items():
            for site in sites:
                for leaf, (fqn, _) in self.folded.get(path, {}).items():
                    read = site.node.args[_argument_index(site.node, leaf)]
                    if read.meta.get(STATE) != fqn:
                        raise AssertionError(f"{site.node.name} in {path!r} reads {read.name}, not the merged {leaf}")


def _argument_index(node: torch.fx.Node, leaf: str) -> int | None:
    return WEIGHT_OPS[node.target][1] if leaf == "weight" else BIAS_ARG.get(node.target)
