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

import dataclasses
import operator
from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from peftc import unchanged
from peftc.graph import ADDED_STATE, outline

from .dispatch import INDEX

HOISTED = "peftc_hoisted"  # the name of the submodule (and call node) holding the hoisted nodes


class KeptWhileInputsUnchanged(nn.Module):
    """Runs `body` and keeps its outputs; returns them again while called with the same inputs, unless
    autograd must see the computation. Float tensors are the same when they are the same tensor, unmodified
    (version counter: in-place writes; storage: `.data =`); integer tensors (the adapter index, made anew
    for each call from `adapter_names`) when their values are equal. Within `peftc.unchanged.state_unchanged()`
    (a generate call) the float tensors are checked at the first call only."""

    def __init__(self, body: torch.fx.GraphModule) -> None:
        super().__init__()
        self.body = body
        self._key: tuple[Any, ...] | None = None
        self._outputs: Any = None
        self._floats: list[int] = []  # positions of the float and integer inputs (the graph fixes them)
        self._integers: list[int] | None = None

    def forward(self, *inputs: Any) -> Any:
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            return self.body(*inputs)
        if self._integers is None:
            floats = [t.is_floating_point() or t.is_complex() for t in inputs]
            self._floats = [i for i, f in enumerate(floats) if f]
            self._integers = [i for i, f in enumerate(floats) if not f]
        integers = [inputs[i] for i in self._integers]
        kept = unchanged.region()
        if (kept is not None and id(self) in kept and self._key is not None
                and _same_integers(integers, self._key[3])):
            return self._outputs
        key = _key([inputs[i] for i in self._floats], integers)
        if key is not None and self._key is not None and _same(key, self._key):
            outputs = self._outputs
        else:
            outputs = self.body(*inputs)
            self._key, self._outputs = key, (outputs if key is not None else None)
        if kept is not None and key is not None:
            kept[id(self)] = True  # the float inputs were checked in this region
        return outputs


def _key(floats: list[torch.Tensor], integers: list[torch.Tensor]) -> tuple[Any, ...] | None:
    """What identifies the inputs: the float tensors themselves, their versions and storages; the integer
    tensors' values. None where a version is not tracked (inference-mode tensors). Checked at every call over
    every adapter tensor (outside `state_unchanged`), so it is kept to C-level maps."""
    try:
        versions = list(map(_VERSION, floats))
    except RuntimeError:
        return None
    return floats, versions, list(map(torch.Tensor.data_ptr, floats)), [t.clone() for t in integers]


_VERSION = operator.attrgetter("_version")


def _same(new: tuple[Any, ...], old: tuple[Any, ...]) -> bool:
    floats, versions, pointers, integers = new
    old_floats, old_versions, old_pointers, old_integers = old
    return (len(floats) == len(old_floats) and all(map(operator.is_, floats, old_floats)) and versions == old_versions
            and pointers == old_pointers and _same_integers(integers, old_integers))


def _same_integers(new: list[torch.Tensor], old: list[torch.Tensor]) -> bool:
    return len(new) == len(old) and all(a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b))
                                        for a, b in zip(new, old))


def invariant_nodes(graph: torch.fx.Graph, index: bool = True,
                    roots: Collection[torch.fx.Node] | None = None) -> list[torch.fx.Node]:
    """Nodes (in graph order) computed from added state tensors and the adapter index alone (without `index`:
    from added state tensors alone; with `roots`: from those of them alone): calls of deterministic ops with
    tensor outputs whose inputs are such roots or such nodes."""
    invariant: set[torch.fx.Node] = set()
    order = []
    for node in graph.nodes:
        if node.op == "placeholder":
            if (node.meta.get(ADDED_STATE) and (roots is None or node in roots)) or (index and node.meta.get(INDEX)):
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
        if not any(not is_view(n) for n in nodes):  # views alone cost nothing to recompute
            return PassResult(gm, False)
        last_input = list(gm.graph.find_nodes(op="placeholder"))[-1]  # inputs need not all come first
        outline(gm, HOISTED, nodes, KeptWhileInputsUnchanged, at=last_input.next)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        left = [n.name for n in invariant_nodes(gm.graph) if not is_view(n)]
        if left:
            raise AssertionError(f"adapter invariants still computed at every call: {left[:4]}")


def is_view(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.target.is_view


@dataclasses.dataclass
class Prologue:
    """The hoisted sub-graph taken out of a graph (`split_hoisted`): `kept` runs on the graph's inputs at
    `positions`, and its outputs are the graph's last inputs; `per_sample[k]` says output k has a row per
    sample (it was gathered by the adapter index)."""

    kept: KeptWhileInputsUnchanged
    positions: list[int]
    per_sample: list[bool]

    def __call__(self, inputs: Sequence[Any]) -> tuple[Any, ...]:
        with torch.no_grad():  # the kept values are constants of the graph that reads them
            return tuple(self.kept(*[inputs[i] for i in self.positions]))


def split_hoisted(gm: torch.fx.GraphModule) -> Prologue | None:
    """before: the graph computes its adapter invariants inline
    after:  they are inputs of the graph, appended after the others, computed by the returned Prologue

    For torch.compile: the compiled graph reads the invariants, computed eagerly once (None where there
    are none worth hoisting), so the adapters' stacking and gathers stay out of every compiled step."""
    if not HoistAdapterInvariants()(gm).modified:
        return None
    graph = gm.graph
    (call,) = graph.find_nodes(op="call_module", target=HOISTED)
    inputs = list(graph.find_nodes(op="placeholder"))
    body = getattr(gm, HOISTED).body
    indexed = _depends_on_index(body.graph)
    last = inputs[-1]
    per_sample = []
    for item in sorted(call.users, key=lambda n: n.args[1]):
        with graph.inserting_after(last):
            last = graph.placeholder(f"hoisted_{item.args[1]}")
        item.replace_all_uses_with(last)
        graph.erase_node(item)
        per_sample.append(indexed[item.args[1]])
    kept = getattr(gm, HOISTED)
    positions = [inputs.index(a) for a in call.args]
    graph.erase_node(call)
    gm.delete_submodule(HOISTED)
    graph.lint()
    gm.recompile()
    return Prologue(kept, positions, per_sample)


def _depends_on_index(body: torch.fx.Graph) -> list[bool]:
    """For each output of a hoisted body: whether it reads the adapter index."""
    reads: dict[torch.fx.Node, bool] = {}
    for node in body.nodes:
        reads[node] = node.meta.get(INDEX, False) or any(reads[a] for a in node.all_input_nodes)
    (output,) = body.find_nodes(op="output")
    return [reads[n] for n in output.args[0]]
