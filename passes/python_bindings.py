"""Eager lowering: the graph's most frequent aten ops called through torch's Python bindings, as eager
model code calls them.

An fx graph calls `torch.ops.aten.linear.default(x, w)`: an `OpOverload` whose Python `__call__` then calls
the operator through its schema. Eager code calls `torch._C._nn.linear(x, w)` or `x.view(...)`: bindings
generated to parse their arguments in C++. Per call that is about 1 us less (4.7 vs 3.3 us for a one-row
linear, 3.3 vs 1.4 us for a view), and a decode step of the bench's 8-layer Llama runs ~600 such calls. In a
paired A/B of the same program with and without this pass (30 rounds, 32-token generate), a step took 0.94x
for the adapted model and 0.98x for the folded one at batch 1, 0.96x adapted at batch 8.

The bindings dispatch to the same kernels. Only the ops in `BINDINGS` are rebound: each binding takes the
overload's arguments, positional and keyword, as the graph passes them (`tests/passes/test_python_bindings.py`
checks each one against its overload); every other op keeps its OpOverload.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

aten = torch.ops.aten

BINDINGS: dict[torch._ops.OpOverload, Callable[..., object]] = {
    aten.linear.default: torch._C._nn.linear,
    aten.silu.default: torch._C._nn.silu,
    aten.view.default: torch.Tensor.view,
    aten.to.dtype: torch.Tensor.to,
    aten.addmm_.default: torch.Tensor.addmm_,
    aten.mul.Tensor: torch.mul,
    aten.add.Tensor: torch.add,
    aten.neg.default: torch.neg,
    aten.rsqrt.default: torch.rsqrt,
    aten.pow.Tensor_Scalar: torch.pow,
    aten.mean.dim: torch.mean,
    aten.cat.default: torch.cat,
    aten.transpose.int: torch.transpose,
    aten.unsqueeze.default: torch.unsqueeze,
    aten.reshape.default: torch.reshape,
    aten.flatten.using_ints: torch.flatten,
    aten.t.default: torch.t,
}


class CallPythonBindings(PassBase):
    """before: linear = torch.ops.aten.linear.default(x, w)
    after:  linear = torch._C._nn.linear(x, w)"""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        rebound = [node for node in gm.graph.nodes if node.op == "call_function" and node.target in BINDINGS]
        for node in rebound:
            node.target = BINDINGS[node.target]
        if rebound:
            gm.recompile()
        return PassResult(gm, bool(rebound))

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        left = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target in BINDINGS]
        if left:
            raise AssertionError(f"ops still called through their OpOverload: {left[:4]}")
