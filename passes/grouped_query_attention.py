"""Eager lowering: grouped-query attention reads its keys and values unexpanded (SDPA's `enable_gqa`).

transformers repeats each key/value head for the query heads that share it (`repeat_kv`) whenever it
calls SDPA with a mask, which a captured graph always does; run eagerly with no mask (no padding, the
usual decode step) it passes `enable_gqa=True` instead and expands nothing. The graph's expansion is a
copy of every layer's keys and values, `n_rep` times over, at every call: at a 4,000-token past on a
Llama-3-shaped layer (32 query heads over 8 key/value heads) 500 MiB allocated and copied per layer and
step where `enable_gqa` allocates nothing. SDPA's `enable_gqa` maps query head h to key/value head
h // n_rep, as `repeat_kv` lays them out, and gave bit-equal outputs with and without a mask and causal.

Inference programs only: torch.compile and ONNX see the functional graph, and training keeps the
autograd of the expansion it was captured with.
"""

from __future__ import annotations

import sys

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from peftc.graph import example_value

SDPA = torch.ops.aten.scaled_dot_product_attention.default
aten = torch.ops.aten


class AttendGroupedQueries(PassBase):
    """before: k_rep = reshape(expand(unsqueeze(k, 2), [b, kv, n, s, d]), [b, kv * n, s, d]) (v likewise);
            sdpa(q, k_rep, v_rep, ...)
    after:  sdpa(q, k, v, ..., enable_gqa=True)"""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        changed = False
        for node in list(gm.graph.find_nodes(op="call_function", target=SDPA)):
            kwargs = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True).kwargs  # args by name
            if kwargs.get("enable_gqa"):
                continue
            key, value = _unexpanded(kwargs["key"]), _unexpanded(kwargs["value"])
            if key is None or value is None:
                continue
            node.args, node.kwargs = (), {**kwargs, "key": key, "value": value, "enable_gqa": True}
            changed = True
        if changed:
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return PassResult(gm, changed)


def _unexpanded(node: object) -> torch.fx.Node | None:
    """The [b, kv, s, d] tensor `node` repeats per query head (transformers' `repeat_kv`), or None."""
    if not _op(node, aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        return None
    expand = node.args[0]
    if not _op(expand, aten.expand.default) or len(expand.args[1]) != 5:
        return None
    heads, n_rep = expand.args[1][1:3]
    source = _through_identity_slices(expand.args[0])
    if not _op(source, aten.unsqueeze.default) or source.args[1] != 2 or len(source.users) != 1:
        return None
    if not (isinstance(heads, int) and isinstance(n_rep, int)) or len(node.args[1]) != 4 or \
            node.args[1][1] != heads * n_rep:
        return None
    keys = _through_identity_slices(source.args[0])
    # the expansion repeats heads only: every other dim is the source's own (no broadcast batch)
    before, after = _shape(keys), _shape(expand)
    if before is None or after is None or before != [after[i] for i in (0, 1, 3, 4)]:
        return None
    return keys


def _shape(node: object) -> list[str] | None:
    value = example_value(node)
    return None if value is None else [str(d) for d in value.shape]


def _through_identity_slices(node: object) -> object:
    """`node` less the whole-dimension slices `x[:, :, None, :, :]` leaves in a traced graph."""
    while _op(node, aten.slice.Tensor) and len(node.users) == 1 and _whole(node):
        node = node.args[0]
    return node


def _whole(node: torch.fx.Node) -> bool:
    start = node.args[2] if len(node.args) > 2 else None
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    return start in (None, 0) and (end is None or (isinstance(end, int) and end >= sys.maxsize)) and step == 1


def _op(node: object, *targets: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets
