"""torch.compile backend: switching adapters, changing scales, hot-swapping weights and choosing
adapters per sample never recompile.

    compiled = peftc.backends.compile.compile_model(am)              # torch.compile(fullgraph=True)
    compiled(**inputs)                                               # the active adapter
    am.set_adapter("other"); compiled(**inputs)                      # same compiled code
    compiled(**inputs, adapter_names=["a", "__base__", "other"])     # a mixed batch, same code

Every call runs one compiled graph: the mixed-adapter graph of the dispatch pass. Adapter
weights and scales are inputs of that graph, and which adapter a sample uses is its
`adapter_index` input, so nothing a switch changes is a Python value dynamo could guard on. A
call with one active adapter runs it with that adapter's index for every sample; with adapters
disabled, with index -1 (base only). Batch and sequence dims are marked dynamic where the
captured graph has them symbolic.

Inference graphs are lowered before compiling, as the eager ones are where dynamo can trace it: grouped
keys and values read unexpanded, a KV graph's cache written into slot inputs in place (a decode step copies
its new keys, not the cache), and the adapters' invariants computed eagerly and passed in.

What still compiles: a new call signature or mode (it is a new graph), adding or deleting an
adapter (the mixed graph gains or loses inputs), and the states the mixed graph cannot express,
several active adapters summed or merged adapters, which compile their own graph once each.
In training mode with gradients enabled, which adapter parameters require grad is part of what
dynamo guards on, so activating another adapter for training compiles once for it; in eval mode
or under `torch.no_grad()` the state is passed detached and that guard never changes.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from peftc.backends.eager import EagerProgram
from peftc.passes.dispatch import BASE_ONLY
from peftc.passes.grouped_query_attention import AttendGroupedQueries
from peftc.passes.hoist_invariants import Prologue, split_hoisted
from peftc.passes.remat import CheckpointLayers
from peftc.passes.write_cache_in_place import CacheSlots, WriteCacheIntoSlots

from peftc.capture import CapturedGraph, leading_size
from peftc.errors import ConfigError
from peftc.graph import boxed, copy_graph_module

WRAP_GRAD = torch.ops.higher_order.wrap_with_set_grad_enabled


class CompiledModel:
    """An adapted model's graphs under torch.compile, called like the adapted model itself
    (including `adapter_names=` / `adapter_index=`). Adapter state is read from the adapted model
    at every call, so `set_adapter`, `hotswap_adapter`, `load_state_dict` and optimizer steps on it
    are seen at once."""

    def __init__(self, model: Any, **compile_options: Any):
        self.model = model
        self.options = {"fullgraph": True, **compile_options}
        self._compiled: dict[int, tuple[EagerProgram, EagerProgram]] = {}  # id(program) -> (program, compiled)

    def __call__(
        self, *args: Any, adapter_names: Sequence[str] | None = None, adapter_index: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        am = self.model
        if adapter_names is not None and adapter_index is not None:
            raise ConfigError("pass adapter_names or adapter_index, not both")
        if adapter_names is not None:
            adapter_index = am.adapter_index(adapter_names)
        return self._run(args, kwargs, adapter_index)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None,
                 adapter_index: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """transformers' `generate` with every prefill and decode step running the compiled KV-cache graph
        (see `peftc.generation`); adapter switches and per-sample choices do not recompile."""
        from peftc.generation import KV, generate

        def run(call: dict[str, Any], index: torch.Tensor | None, kind: Any = KV) -> Any:
            return self._run((), call, index, kind=kind)

        return generate(self.model, args, kwargs, adapter_names, adapter_index, run=run)

    def _run(self, args: tuple, kwargs: dict, adapter_index: torch.Tensor | None, kind: Any = None) -> Any:
        am = self.model
        slot = self._whole_batch_slot() if adapter_index is None else None
        mixed = adapter_index is not None or slot is not None
        program, flat = am.programs.program(args, kwargs, am.training, mixed=mixed, kind=kind)
        kwargs.clear()  # taken over, as `generation.run_eager` does: the program frees each past once read
        extras = None
        if mixed:
            if adapter_index is None:
                device = next(iter(am.parameters())).device
                adapter_index = torch.full((batch_size(flat),), slot, dtype=torch.int64, device=device)
            extras = {"adapter_index": am.programs.checked_index(adapter_index, flat)}
        return self._compile(program)(flat, extras)

    def _whole_batch_slot(self) -> int | None:
        """The adapter_index that runs the model's current state through the mixed graph, or None
        where it cannot (several active adapters, merged adapters)."""
        am = self.model
        if am.programs.disabled:
            return BASE_ONLY
        if len(am.active_adapters) == 1 and not am.merged:
            return am.adapter_order.index(am.active_adapters[0])
        return None

    def _compile(self, program: EagerProgram) -> EagerProgram:
        entry = self._compiled.get(id(program))
        if entry is not None and entry[0] is program:
            return entry[1]
        live = {id(p) for p in self.model.programs.live()}  # graphs the model dropped (an adapter added)
        self._compiled = {k: v for k, v in self._compiled.items() if k in live}
        gm = copy_graph_module(program.captured.gm)
        inline_grad_blocks(gm)
        if program.captured.training and self.model.programs.remat is not None:
            CheckpointLayers(self.model.programs.remat)(gm)  # as the eager program does (dynamo traces checkpoint)
        prologue = None
        if not program.captured.training:
            AttendGroupedQueries()(gm)  # grouped keys and values read unexpanded: no copy per query head
            WriteCacheIntoSlots()(gm)  # a KV graph writes the cache in place: no copy of it per step
            prologue = split_hoisted(gm)
        run = _compiled_forward(gm, program.captured, self.options, prologue)
        compiled = EagerProgram(dataclasses.replace(program.captured, gm=gm), self.model.parameter_tree.resolve, run)
        self._compiled[id(program)] = (program, compiled)
        return compiled


def compile_model(model: Any, **compile_options: Any) -> CompiledModel:
    """Compile an adapted model's graphs (`torch.compile(..., fullgraph=True, **compile_options)`,
    e.g. `backend=`, `mode=`); returns a callable with the adapted model's call convention."""
    return CompiledModel(model, **compile_options)


def _compiled_forward(gm: torch.fx.GraphModule, captured: CapturedGraph, options: dict[str, Any],
                      prologue: Prologue | None) -> Callable:
    """`gm` compiled, called with the program's inputs as one list it takes over; an inference graph's adapter
    invariants (LoRA's stacked and gathered weights) are computed eagerly by `prologue`, kept across calls,
    and passed in."""
    n_state = len(captured.state_names())
    dynamic = {}  # input position -> the dims the captured graph keeps symbolic
    for i, check in enumerate(captured.input_checks):
        if check[0] == "tensor":
            dims = [d for d, size in enumerate(check[2]) if not isinstance(size, int)]
            if dims:
                dynamic[n_state + i] = dims
    n_inputs = n_state + len(captured.input_checks) + len(captured.extra_inputs)
    for i, _ in enumerate(captured.extra_inputs):  # adapter_index: one entry per sample
        dynamic[n_state + len(captured.input_checks) + i] = [0]
    cache = CacheSlots.of(gm)
    if cache is not None:  # the past's length, an input after the call's own
        dynamic[cache.past_length] = [0]
        n_inputs += 1
    for k, per_sample in enumerate(prologue.per_sample if prologue is not None else []):
        if per_sample:
            dynamic[n_inputs + k] = [0]
    inner = copy_graph_module(gm)  # `gm` keeps its inputs: the program's state names are read from them
    used = drop_unused_inputs(inner)  # the adapters' own tensors, once hoisted, are read by the prologue only
    detached = {k for k, i in enumerate(used) if i < n_state}
    # dims to mark at every call (the call's own inputs) and where the prologue's values are new (a kept
    # value is the same tensor at every decode step, and keeps its mark)
    dynamic_calls = {used.index(i): dims for i, dims in dynamic.items() if i in used and i < n_inputs}
    dynamic_kept = {used.index(i): dims for i, dims in dynamic.items() if i in used and i >= n_inputs}
    steal = hand_over_inputs(inner)
    compiled = torch.compile(inner.forward, **options)
    last_kept: tuple[Any, ...] = ()

    def forward(inputs: list[Any]) -> Any:
        nonlocal last_kept
        if cache is not None:
            cache.fill(inputs)
        kept = prologue(inputs) if prologue is not None else ()
        every = (*inputs, *kept)
        inputs.clear()  # taken over: the compiled graph frees each (a decode step's pasts) after its last use
        inputs = [every[i] for i in used]
        del every
        if not (captured.training and torch.is_grad_enabled()):
            # requires_grad is guarded on and set_adapter flips it: state that needs no grad goes in detached
            inputs = [t.detach() if k in detached else t for k, t in enumerate(inputs)]
        marks = dynamic_calls.items()
        if len(kept) != len(last_kept) or not all(map(operator.is_, kept, last_kept)):
            marks = [*marks, *dynamic_kept.items()]
            last_kept = kept
        for position, dims in marks:
            torch._dynamo.maybe_mark_dynamic(inputs[position], dims)
        outputs = compiled(inputs) if steal else compiled(*inputs)
        if cache is not None:
            cache.mark_presents(outputs)
        return outputs

    forward._boxed_call = True  # the program hands its list over
    return forward


def hand_over_inputs(gm: torch.fx.GraphModule) -> bool:
    """Make `gm` take its inputs as one list that dynamo hands to the compiled graph and empties, as it does
    for compiled autograd's graphs: a compiled frame otherwise keeps every input alive until it returns, so a
    decode step would hold its pasts and presents together. False (nothing changed) where torch lacks it."""
    steal = getattr(torch._dynamo.utils, "set_locals_to_steal", None)
    if steal is None or not boxed(gm)._boxed_call:
        return False
    steal(gm, ["args_list"])  # `graph.boxed`'s code names its list `args_list`
    return True


def drop_unused_inputs(gm: torch.fx.GraphModule) -> list[int]:
    """Remove the placeholders nothing reads; returns the positions of those kept, so every call passes
    (and dynamo guards) only inputs the graph uses."""
    used = []
    for position, node in enumerate(list(gm.graph.find_nodes(op="placeholder"))):
        if node.users:
            used.append(position)
        else:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return used


def inline_grad_blocks(gm: torch.fx.GraphModule) -> int:
    """Inline the `wrap_with_set_grad_enabled` blocks torch.export leaves (around Llama's rotary
    embedding), which dynamo cannot trace with fullgraph=True. The blocks only compute from
    inputs that need no grad, so running them inline gives the same values. Returns how many."""
    graph = gm.graph
    count = 0
    for node in list(graph.find_nodes(op="call_function", target=WRAP_GRAD)):
        _, body_node, *operands = node.args
        body = getattr(gm, body_node.target)
        env = dict(zip(body.graph.find_nodes(op="placeholder"), operands))
        with graph.inserting_before(node):
            outputs = graph.graph_copy(body.graph, env)
        for user in list(node.users):  # operator.getitem(block, i)
            user.replace_all_uses_with(outputs[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(node)
        if not body_node.users:
            graph.erase_node(body_node)
        count += 1
    if count:
        gm.delete_all_unused_submodules()
        graph.lint()
        gm.recompile()
    return count


def batch_size(flat_inputs: list[Any]) -> int:
    size = leading_size(flat_inputs)
    if size is None:
        raise ConfigError("the call has no batched tensor input to run an adapter per sample on")
    return size
