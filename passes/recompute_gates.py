"""Gated activations recomputed in backward: for `act(gate) * up`, autograd keeps `gate` and `up`,
not also `act(gate)`.

GLU feed-forwards (SwiGLU in Llama, Mistral and Qwen; GeGLU in Gemma) compute `act(gate) * up`,
and autograd keeps three [tokens, intermediate] tensors per layer for it: `gate` for the
activation's backward, `act(gate)` and `up` for the product's. `act(gate)` is one pointwise op away
from `gate`, so this pass outlines each pair into a checkpointed region: forward keeps `gate` and
`up`, backward recomputes the activation. On a Llama MLP that is a third of the feed-forward's
saved activations, for one pointwise op per layer in backward. Train graphs get it where whole
layers are not checkpointed already (their regions recompute everything anyway).
"""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from peftc.graph import outline

from .remat import Checkpointed

aten = torch.ops.aten

RECOMPUTED = "peftc_recomputed"  # meta on the call node of an outlined pair: the activation's op name

# pointwise activations whose output autograd would keep for the product's backward
ACTIVATIONS = {aten.silu.default, aten.gelu.default, aten.sigmoid.default, aten.tanh.default, aten.mish.default}


class RecomputeGatedActivations(PassBase):
    """before: a = act(gate);  h = mul(a, up)        (a used by the mul alone)
    after:  h = checkpoint(gate_i, gate, up)       (gate_i: the pair, outlined)"""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        return _outline_pairs(gm)


def _outline_pairs(gm: torch.fx.GraphModule) -> PassResult:
    pairs = []
    for act in (n for target in ACTIVATIONS for n in gm.graph.find_nodes(op="call_function", target=target)):
        if len(act.users) != 1:
            continue
        (mul,) = act.users
        if mul.target == aten.mul.Tensor and all(isinstance(a, torch.fx.Node) for a in mul.args):
            pairs.append((act, mul))
    for i, (act, mul) in enumerate(pairs):
        call = outline(gm, f"gate_{i}", [act, mul], Checkpointed.wrapping({"use_reentrant": False}))
        call.meta[RECOMPUTED] = act.target.name()
    if pairs:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, bool(pairs))
