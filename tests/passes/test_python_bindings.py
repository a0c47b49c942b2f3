"""Eager programs call their most frequent ops through torch's Python bindings (passes/python_bindings.py):
each binding against its overload on the arguments a graph passes, and a program end to end."""

from __future__ import annotations

import peft
import pytest
import torch
from peftc.passes.python_bindings import BINDINGS

from tests import oracle

aten = torch.ops.aten


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


# overload -> (args, kwargs) as a captured graph passes them
CALLS = {
    aten.linear.default: ((_x(2, 3, 4), _x(5, 4), _x(5)), {}),
    aten.silu.default: ((_x(3, 4),), {}),
    aten.view.default: ((_x(2, 3, 4), [-1, 4]), {}),
    aten.to.dtype: ((_x(3, 4), torch.float64), {}),
    aten.addmm_.default: ((_x(6, 5), _x(6, 2), _x(2, 5)), {"beta": 0.5, "alpha": 2.0}),
    aten.mul.Tensor: ((_x(3, 4), 1.5), {}),
    aten.add.Tensor: ((_x(3, 4), _x(4)), {"alpha": 2}),
    aten.neg.default: ((_x(3, 4),), {}),
    aten.rsqrt.default: ((_x(3, 4).abs(),), {}),
    aten.pow.Tensor_Scalar: ((_x(3, 4), 2), {}),
    aten.mean.dim: ((_x(3, 4), [-1], True), {}),
    aten.cat.default: (([_x(2, 3), _x(1, 3)], 0), {}),
    aten.transpose.int: ((_x(2, 3, 4), 1, 2), {}),
    aten.unsqueeze.default: ((_x(3, 4), 1), {}),
    aten.reshape.default: ((_x(2, 3, 4), [6, 4]), {}),
    aten.flatten.using_ints: ((_x(2, 3, 4), 0, -2), {}),
    aten.t.default: ((_x(3, 4),), {}),
}


@pytest.mark.parametrize("overload", list(BINDINGS), ids=str)
def test_each_binding_computes_what_its_overload_computes(overload: torch._ops.OpOverload):
    args, kwargs = CALLS[overload]
    clone = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]  # addmm_ writes its first argument
    want = overload(*args, **kwargs)
    got = BINDINGS[overload](*clone, **kwargs)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_an_eager_program_calls_the_bindings_and_its_graph_keeps_the_overloads():
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    pair = oracle.make_pair("llama", {"peft_type": "LORA", **config}, peft.LoraConfig(**config))
    oracle.check_eval(pair)
    ((captured, run),) = pair.am.eager_graphs
    called = [n.target for n in run.graph.nodes if n.op == "call_function"]
    assert torch._C._nn.linear in called and not set(called) & set(BINDINGS)
    assert aten.linear.default in [n.target for n in captured.gm.graph.nodes]  # compile and ONNX see aten ops
