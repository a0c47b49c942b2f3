"""Eager lowering for inference: what a call computes from the adapters' tensors alone is computed once.

Some of an adapted graph depends on no input of the call: LoRA's mixed-batch lowering stacks every
adapter's A and B (ranks padded) and gathers each sample's rows by `adapter_index`; OFT builds its
rotations from its parameters; scales are cast. Run eagerly, that work repeats at every call, and
in a decode loop (one token per call, the same adapters and index for the whole generation) it
costs more than the adapters' matmuls. This pass moves those nodes into one sub-graph whose outputs
are kept while its inputs are the same tensors, unchanged (`Tensor._version`: an optimizer step,
a hot-swap's in-place copy or a `load_state_dict` changes it), and recomputed otherwise.

Only tensors a rewrite added (adapter tensors) and the `adapter_index` are roots of hoisted work,
never a traced weight: what is kept is adapter-sized (OFT's rotation, not the rotated weight), so
memory grows by about the adapters' size. Where autograd needs the graph (grad enabled and an input
requiring grad) every call computes afresh, so gradients are never taken through a kept value.
Train programs do not get the pass.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from peftc.graph import ADDED_STATE, outline

from .dispatch import INDEX

HOISTED = "peftc_hoisted"  # the name of the submodule (and call node) holding the hoisted nodes


class KeptWhileInputsUnchanged(nn.Module):
    """Runs `body` and keeps its outputs; returns them again while called with the same inputs, unless
    autograd must see the computation. Float tensors are the same when they are the same tensor, unmodified
    (version counter: in-place writes; storage: `.data =`); integer tensors (the adapter index, made anew
    for each call from `adapter_names`) when their values are equal."""

    def __init__(self, body: torch.fx.GraphModule) -> None:
        super().__init__()
        self.body = body
        self._key: list[Any] | None = None
        self._outputs: Any = None

    def forward(self, *inputs: Any) -> Any:
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            return self.body(*inputs)
        key = _key(inputs)
        if key is not None and self._key is not None and all(map(_same, key, self._key)):
            return self._outputs
        outputs = self.body(*inputs)
        self._key, self._outputs = key, (outputs if key is not None else None)
        return outputs


def _key(inputs: tuple[Any, ...]) -> list[Any] | None:
    """What identifies each input; None where a version is not tracked (inference-mode tensors)."""
    try:
        return [t.clone() if _is_integer(t) else (t, t._version, t.data_ptr()) for t in inputs]
    except RuntimeError:
        return None


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex())


def _same(new: Any, old: Any) -> bool:
    if isinstance(new, torch.Tensor):
        return (isinstance(old, torch.Tensor) and new.shape == old.shape and new.device == old.device
                and bool(torch.equal(new, old)))
    return not isinstance(old, torch.Tensor) and new[0] is old[0] and new[1:] == old[1:]


def invariant_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """Nodes (in graph order) computed from added state tensors and the adapter index alone: calls of
    deterministic ops with tensor outputs whose inputs are such roots or such nodes."""
    invariant: set[torch.fx.Node] = set()
    order = []
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.meta.get(ADDED_STATE) or node.meta.get(INDEX):
                invariant.add(node)
            continue
        if (node.op == "call_function" and node.all_input_nodes and not node.is_impure()
                and _returns_tensors(node) and not _random(node)
                and all(a in invariant for a in node.all_input_nodes)):
            invariant.add(node)
            order.append(node)
    return order


def _returns_tensors(node: torch.fx.Node) -> bool:
    """The op's schema returns tensors only (inserted nodes carry no example value to look at)."""
    if node.target is operator.getitem:
        return _returns_tensors(node.args[0])
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    tensor, tensors = torch._C.TensorType.get(), torch._C.ListType.ofTensors()
    return all(r.type == tensor or r.type == tensors for r in node.target._schema.returns)


def _random(node: torch.fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags


class HoistAdapterInvariants(PassBase):
    """before: t = f(adapter tensors, adapter_index)   (inline, every call)
    after:  t = hoisted(adapter tensors, adapter_index)[k]   (computed once per distinct, unmodified inputs)"""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        nodes = invariant_nodes(gm.graph)
        if not any(not _is_view(n) for n in nodes):  # views alone cost nothing to recompute
            return PassResult(gm, False)
        last_input = list(gm.graph.find_nodes(op="placeholder"))[-1]  # inputs need not all come first
        outline(gm, HOISTED, nodes, KeptWhileInputsUnchanged, at=last_input.next)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        left = [n.name for n in invariant_nodes(gm.graph) if not _is_view(n)]
        if left:
            raise AssertionError(f"adapter invariants still computed at every call: {left[:4]}")


def _is_view(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.target.is_view
