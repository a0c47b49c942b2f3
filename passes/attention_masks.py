"""Eager lowering: an attention mask that says nothing beyond "causal" or "attend everywhere" is
dropped at run time, and SDPA runs as transformers runs it eagerly (`is_causal=True`, or no mask).

torch.export cannot ask whether a mask is trivial (that reads its values), so transformers builds an
explicit boolean mask in a captured graph even where, run eagerly, it calls SDPA with no mask (no
padding, query length == key length). The explicit mask costs twice: SDPA turns it into a float
mask at every call and keeps that for backward (a [batch, 1, seq, seq] float per layer: what peftc
trained with over PEFT's memory), and its kernel computes the blocks a causal kernel skips.

An eager program can read values, so this pass inserts the check: one comparison per mask per call,
then SDPA with the mask replaced by (None, is_causal=True) where it is exactly the lower triangle,
by (None, False) where it is all True, and unchanged otherwise (padding). The result is the same
attention, computed the way PEFT's model computes it. torch.compile (fullgraph) and ONNX graphs
cannot hold this data-dependent choice, so only eager programs get the pass; they keep the mask.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from peftc.graph import dtype_of

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def simplified_mask(mask: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for SDPA equal to attending with the boolean `mask`."""
    if bool(mask.all()):
        return None, False
    q, k = mask.shape[-2:]
    if q == k and torch.equal(mask, torch.ones(q, k, dtype=torch.bool, device=mask.device).tril_().expand_as(mask)):
        return None, True
    return mask, False


class ElideAttentionMasks(PassBase):
    """before: sdpa(q, k, v, attn_mask=mask)      (mask boolean)
    after:  m, causal = simplified_mask(mask);  sdpa(q, k, v, attn_mask=m, is_causal=causal)

    One check per mask node, shared by every attention that reads it."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        return _elide(gm)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        for node in gm.graph.find_nodes(op="call_function", target=SDPA):
            mask = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True).kwargs["attn_mask"]
            if isinstance(mask, torch.fx.Node) and dtype_of(mask) == torch.bool:
                raise AssertionError(f"{node.name} still reads the boolean mask {mask.name} unchecked")


def _elide(gm: torch.fx.GraphModule) -> PassResult:
    graph = gm.graph
    checked: dict[torch.fx.Node, tuple[torch.fx.Node, torch.fx.Node]] = {}
    for node in list(graph.find_nodes(op="call_function", target=SDPA)):
        kwargs = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True).kwargs  # args by name
        mask = kwargs["attn_mask"]
        if not isinstance(mask, torch.fx.Node) or kwargs["is_causal"] or dtype_of(mask) != torch.bool:
            continue
        if mask not in checked:
            with graph.inserting_after(mask):
                check = graph.call_function(simplified_mask, (mask,))
            with graph.inserting_after(check):
                checked[mask] = (graph.call_function(operator.getitem, (check, 0)),
                                 graph.call_function(operator.getitem, (check, 1)))
        node.args, node.kwargs = (), {**kwargs, "attn_mask": checked[mask][0], "is_causal": checked[mask][1]}
    if checked:
        graph.lint()
        gm.recompile()
    return PassResult(gm, bool(checked))
