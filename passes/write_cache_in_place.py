"""Eager lowering: a KV graph writes each step's keys and values after the past in place
(`peftc.cache_room.appended`), where the captured graph concatenates, copying the whole cache at every step.

transformers' DynamicCache concatenates too, and so does the captured graph: at a 512-token prompt and batch 8
on the bench model, copying the cache was about a third of a CPU decode step. An eager program can keep
room after each layer's keys and values and fill it step by step, as a static cache does, while the
generation loop still holds transformers' DynamicCache (its layers hold views of the buffers). The values
are the concatenation's, bit for bit.

Inference programs only: torch.compile and ONNX see the functional graph (an ONNX decoder's presents are
new tensors, as onnxruntime-genai expects), and training keeps the autograd of the concatenation.
"""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from peftc.cache_room import appended
from peftc.graph import example_value

CAT = torch.ops.aten.cat.default
SIZE = torch.ops.aten.sym_size.int


class WriteCacheInPlace(PassBase):
    """before: present = cat([past, new], -2)      (past an input read by nothing else, present an output)
    after:  present = appended(past, new)"""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        outputs = set(gm.graph.output_node().all_input_nodes)
        changed = False
        for node in list(gm.graph.find_nodes(op="call_function", target=CAT)):
            if node in outputs and _is_cache_concatenation(node):
                node.target, node.args, node.kwargs = appended, tuple(node.args[0]), {}
                changed = True
        if changed:
            gm.recompile()
        return PassResult(gm, changed)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        outputs = set(gm.graph.output_node().all_input_nodes)
        for node in gm.graph.find_nodes(op="call_function", target=CAT):
            if node in outputs and _is_cache_concatenation(node):
                raise AssertionError(f"{node.name} still concatenates the past {node.args[0][0].name}")


def _is_cache_concatenation(node: torch.fx.Node) -> bool:
    """cat([past, new], -2) of a 4-d input `past` whose values nothing else reads: a cache layer's update."""
    tensors, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if len(tensors) != 2 or not isinstance(tensors[0], torch.fx.Node):
        return False
    past = tensors[0]
    value = example_value(past)
    sizes_only = all(user is node or user.target == SIZE for user in past.users)
    return past.op == "placeholder" and sizes_only and value is not None and value.dim() == 4 and dim in (-2, 2)
