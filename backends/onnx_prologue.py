"""ONNX Runtime's counterpart of `passes.hoist_invariants`: what an exported model computes from inputs
that stay the same across calls runs once, in a prologue session, and the model's own session reads the
results as inputs.

    before: model(input_ids, ..., adapter_index)      each call gathers every sample's LoRA rows
    after:  rows = prologue(adapter_index)            once per distinct adapter_index
            model(input_ids, ..., *rows)

The inputs that stay fixed are the adapter choice: a switch model's `adapter_index`, an inputs model's
adapter tensors. In a decode loop they are the same at every step, and the work that reads only them
and initializers (LoRA's per-sample gathers, 112 Gather kernels per step on a 42M Llama; the adapters'
transposes and scalings in mode "inputs") is a tenth of a small decoder's step. ONNX Runtime cannot
keep a value across runs, so the graph is cut in two where that work ends, and `FixedInputPrologue`
keeps the cut's values while the fixed inputs are unchanged.

A batch whose samples all use one adapter runs the prologue for one sample where every cut value is a
gathered row read only as a MatMul's right-hand side: MatMul broadcasts a batch of one, so the step
computes the same values as with a row per sample, with 2-d-sized reads instead of one matrix per sample.

What is kept costs memory: a row per sample and site (about a batch's worth of adapters), as the torch
prologue of `backends.compile` keeps. A model with external data (over ONNX's 2 GB) is not cut: its
file's weights would have to be rewritten into two new files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

INDEX = "adapter_index"


@dataclasses.dataclass
class FixedInputSplit:
    """A model cut in two (`split_fixed_inputs`): `prologue` maps the fixed inputs to the `carried` values,
    which `step` takes as inputs in place of the fixed ones. `one_row_broadcasts`: every carried value is a
    per-sample row that a batch on one adapter may give for one sample only."""

    prologue: Any  # onnx.ModelProto
    step: Any  # onnx.ModelProto
    carried: list[str]
    one_row_broadcasts: bool


def split_fixed_inputs(model: Any, fixed: Sequence[str]) -> FixedInputSplit | None:
    """before: `model` computes from its `fixed` inputs (and initializers) at every call
    after:  a prologue model computes that once; the step model reads its outputs as inputs
    None where nothing but the fixed inputs themselves would be carried (nothing to hoist)."""
    from onnx import AttributeProto, helper, shape_inference

    graph = model.graph
    if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for node in graph.node for a in node.attribute):
        return None  # a subgraph reads outer names its node does not list as inputs: not cut
    fixed = set(fixed)
    initializers = {t.name: t for t in graph.initializer if t.name not in fixed}  # fixed: overridable ones
    constant = set(initializers) | {""}  # "": an omitted optional input
    varies_with_fixed = set(fixed)
    hoisted, kept = [], []
    for node in graph.node:  # ONNX keeps nodes in topological order
        reads = set(node.input)
        if reads & varies_with_fixed and reads <= constant | varies_with_fixed:
            hoisted.append(node)
            varies_with_fixed.update(node.output)
        else:
            kept.append(node)
            if reads <= constant:
                constant.update(node.output)
    if not hoisted:
        return None
    outputs = {o.name for o in graph.output}
    reads_of_kept = {name for node in kept for name in node.input} | outputs
    carried = [name for name in sorted(varies_with_fixed) if name in reads_of_kept]
    if not [name for name in carried if name not in fixed]:
        return None
    producer = {out: node for node in graph.node for out in node.output}
    prologue_nodes = _with_constant_ancestors(hoisted, producer, varies_with_fixed, graph.node)
    kept = _without_unread(kept, outputs)
    types = {v.name: v for v in [*graph.input, *graph.value_info, *graph.output]}
    fixed_inputs = [v for v in graph.input if v.name in fixed]

    def model_of(nodes: list[Any], name: str, inputs: list[Any], graph_outputs: list[Any]) -> Any:
        reads = {i for node in nodes for i in node.input} | {o.name for o in graph_outputs}
        produced = {o for node in nodes for o in node.output}
        body = helper.make_graph(nodes, name, inputs, graph_outputs,
                                 [initializers[n] for n in initializers if n in reads],
                                 value_info=[v for v in graph.value_info if v.name in produced])
        out = helper.make_model(body, opset_imports=model.opset_import, ir_version=model.ir_version)
        out.functions.extend(model.functions)
        return out

    prologue = model_of(prologue_nodes, "prologue", fixed_inputs,
                        [types.get(n) or helper.make_empty_tensor_value_info(n) for n in carried])
    if any(n not in types for n in carried):  # the exporter left no type: infer it on the (adapter-sized) prologue
        prologue = shape_inference.infer_shapes(prologue)
        types.update({v.name: v for v in prologue.graph.output})
    step_inputs = [v for v in graph.input if v.name not in fixed] + [types[n] for n in carried]
    step = model_of(kept, graph.name, step_inputs, list(graph.output))
    step.metadata_props.extend(model.metadata_props)
    return FixedInputSplit(prologue, step, carried, _rows_broadcast(carried, producer, kept))


def _with_constant_ancestors(hoisted: list[Any], producer: dict[str, Any], hoisted_values: set[str],
                             order: Sequence[Any]) -> list[Any]:
    """`hoisted` with the initializer-only nodes they read (the adapters' stacking), in graph order."""
    wanted = {id(node) for node in hoisted}
    pending = [name for node in hoisted for name in node.input]
    while pending:
        name = pending.pop()
        node = producer.get(name)
        if node is not None and id(node) not in wanted and name not in hoisted_values:
            wanted.add(id(node))
            pending.extend(node.input)
    return [node for node in order if id(node) in wanted]


def _without_unread(nodes: list[Any], outputs: set[str]) -> list[Any]:
    """`nodes` less those whose outputs nothing reads (the stacking only the prologue needs now)."""
    nodes = list(nodes)
    while True:
        reads = {name for node in nodes for name in node.input} | outputs
        unread = [node for node in nodes if not set(node.output) & reads]
        if not unread:
            return nodes
        nodes = [node for node in nodes if node not in unread]


def _rows_broadcast(carried: list[str], producer: dict[str, Any], step_nodes: list[Any]) -> bool:
    """Every carried value is gathered along dim 0 (a row per sample) and read only as a MatMul's
    right-hand side, whose batch dims broadcast."""
    for name in carried:
        node = producer.get(name)
        if node is None or node.op_type != "Gather" or any(a.name == "axis" and a.i != 0 for a in node.attribute):
            return False
        for reader in step_nodes:
            if name in reader.input and (reader.op_type != "MatMul" or list(reader.input).index(name) != 1):
                return False
    return True


class FixedInputPrologue:
    """Runs a split's prologue and keeps its values while the fixed inputs are the same: equal arrays (the
    adapter index, made anew for each call), or the same OrtValue objects (a loaded adapter's tensors)."""

    def __init__(self, session: Any, split: FixedInputSplit, device: str = "cpu") -> None:
        self.session = session
        self.device = device
        self.carried = split.carried
        self.one_row_broadcasts = split.one_row_broadcasts
        self.fixed = [i.name for i in session.get_inputs()]
        self._key: list[Any] | None = None
        self._values: dict[str, Any] = {}

    def __call__(self, fixed: dict[str, Any]) -> dict[str, Any]:
        """The carried values (OrtValues) for the fixed inputs `fixed` (numpy arrays or OrtValues)."""
        index = fixed.get(INDEX)
        if index is not None and self.one_row_broadcasts and len(index) > 1 and (index == index[0]).all():
            fixed = {**fixed, INDEX: index[:1]}  # one adapter for the whole batch: its rows once
        key = [fixed[name] for name in self.fixed]
        if self._key is None or not all(map(_same_value, key, self._key)):
            carried = run_ort(self.session, ort_values(fixed, self.device), self.carried, self.device,
                              on_device=self.carried)
            self._values = dict(zip(self.carried, carried))
            self._key = key
        return self._values


def _same_value(new: Any, old: Any) -> bool:
    if isinstance(new, np.ndarray) and isinstance(old, np.ndarray):
        return new.shape == old.shape and new.dtype == old.dtype and bool(np.array_equal(new, old))
    return new is old


def ort_values(values: Mapping[str, Any], device: str = "cpu") -> dict[str, Any]:
    """`values` (numpy arrays or OrtValues) as OrtValues; the arrays copied to `device` (C-ordered first: a
    decode loop feeds slices of its token and mask buffers)."""
    import onnxruntime as ort

    return {k: v if isinstance(v, ort.OrtValue)
            else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), device, 0) for k, v in values.items()}


def run_ort(session: Any, feed: dict[str, Any], outputs: Sequence[str], device: str = "cpu",
            on_device: Collection[str] = ()) -> list[Any]:
    """`session`'s `outputs` (OrtValues) for a feed of OrtValues: one run through an IO binding (`BoundRuns`)."""
    return BoundRuns(session, device).run(feed, outputs, on_device)


class BoundRuns:
    """Runs of one session through one IO binding, kept for a loop. The inputs `fixed` (a decode loop's
    adapter choice: the rows its prologue gathered, 2 per LoRA site) are bound once, when the binding is
    made; of the inputs each run gives, one given the same OrtValue as in the previous run is not bound again.
    On a GPU (`device` "cuda") the outputs named in `on_device` (a decode loop's presents, a prologue's values:
    read again by the next run) are bound to stay in device memory, the rest come to the host. On the CPU too
    a binding is faster than `run_with_ort_values`: a 64-token generate of the bench's 42M Llama took 0.93x
    the time (paired), and 0.91x for a switch decoder whose rows stay bound. Outputs are bound anew for each
    run, so that a run never writes into what an earlier one returned. One loop's: not shared between threads."""

    def __init__(self, session: Any, device: str = "cpu", fixed: Mapping[str, Any] | None = None) -> None:
        self.session = session
        self.device = device
        self.binding = session.io_binding()
        self.fixed = dict(fixed or {})
        self._bound: dict[str, Any] = {}  # input name -> the OrtValue of the last run bound to it
        self._bind_fixed()

    def _bind_fixed(self) -> None:
        for name, value in self.fixed.items():
            self.binding.bind_ortvalue_input(name, value)

    def run(self, feed: Mapping[str, Any], outputs: Sequence[str], on_device: Collection[str] = ()) -> list[Any]:
        """`outputs` (OrtValues) of a run on the inputs `feed` (OrtValues) and the fixed ones."""
        if self._bound and self._bound.keys() != feed.keys():  # other inputs than the last run's: unbind them
            self.binding.clear_binding_inputs()
            self._bind_fixed()
            self._bound = {}
        for name, value in feed.items():
            if self._bound.get(name) is not value:
                self.binding.bind_ortvalue_input(name, value)
                self._bound[name] = value
        self.binding.clear_binding_outputs()
        for name in outputs:
            self.binding.bind_output(name, self.device if name in on_device else "cpu")
        self.session.run_with_iobinding(self.binding)
        return self.binding.get_outputs()
