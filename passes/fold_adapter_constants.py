"""Export lowering: what a graph computes from its adapters' tensors alone becomes a constant.

A switch export keeps every adapter in the file as constants, so whatever the graph computes from them
alone (LoRA's stacks of every adapter's A and B·s, scales cast, OFT's and BOFT's rotations built from their
parameters) is a constant too. Views stay views (a transpose, VeRA's slices of its shared projections): as
constants they would copy their sources. Computed here, by the torch ops the eager graph runs, the file holds the
values and ONNX need not express how they were made: BOFT's Cayley transform solves a linear system, which
no standard ONNX operator does. The adapter index and the tensors an export takes as inputs are not roots.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .hoist_invariants import invariant_nodes, is_view

FOLDED = "peftc_folded_%d"  # the buffers holding the folded values


class FoldAdapterConstants(PassBase):
    """before: t = f(adapter tensors)            (computed by the graph)
    after:  t = get_attr peftc_folded_k          (its value, computed once here)
    `values`: the placeholders that are constants of the export (adapter tensors) -> their tensors."""

    def __init__(self, values: Mapping[torch.fx.Node, torch.Tensor]) -> None:
        super().__init__()
        self.values = values

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        nodes = invariant_nodes(gm.graph, index=False, roots=self.values)
        if not nodes:
            return PassResult(gm, False)
        computed = dict(self.values)
        with torch.no_grad():
            for node in nodes:
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), computed.__getitem__)
                computed[node] = node.target(*args, **kwargs)
        folded = set(nodes)
        while True:  # what the graph reads must be a tensor, and a view stays a view of its source (a copy, folded)
            kept = {n for n in folded if _not_a_constant(n) and any(user not in folded for user in n.users)}
            if not kept:
                break
            folded -= kept
        nodes = [n for n in nodes if n in folded]
        if not nodes:
            return PassResult(gm, False)
        read = [n for n in nodes if any(user not in folded for user in n.users)]
        for k, node in enumerate(read):
            name = FOLDED % k
            gm.register_buffer(name, computed[node].detach().clone())  # its strides too: the same products
            with gm.graph.inserting_before(node):
                constant = gm.graph.get_attr(name)
            constant.meta = dict(node.meta)
            node.replace_all_uses_with(constant)
        for node in reversed(nodes):
            gm.graph.erase_node(node)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        left = [n for n in invariant_nodes(gm.graph, index=False, roots=self.values) if not _not_a_constant(n)]
        if left:
            raise AssertionError(f"adapter constants still computed by the graph: {[n.name for n in left[:4]]}")


def _not_a_constant(node: torch.fx.Node) -> bool:
    """A view (as a constant, a copy of its source: a transpose, VeRA's slices of its shared projections), or an
    op returning a list (read whole, it is no tensor to hold)."""
    if is_view(node):
        return True
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and any(
        isinstance(r.type, torch._C.ListType) for r in target._schema.returns)
