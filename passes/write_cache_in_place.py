"""Inference lowerings: a KV graph writes each step's keys and values after the past in place, where the
captured graph concatenates, copying the whole cache at every step. Eager programs call
`peftc.cache_room.appended` (`WriteCacheInPlace`); torch.compile'd ones write into slot buffers passed in
(`WriteCacheIntoSlots`), which dynamo can trace and inductor writes in place.

transformers' DynamicCache concatenates too, and so does the captured graph: at a 512-token prompt and batch 8
on the bench model, copying the cache was about a third of a CPU decode step. An eager program can keep
room after each layer's keys and values and fill it step by step, as a static cache does, while the
generation loop still holds transformers' DynamicCache (its layers hold views of the buffers). The values
are the concatenation's, bit for bit.

Inference programs only: ONNX sees the functional graph (an ONNX decoder's presents are new tensors, as
onnxruntime-genai expects), and training keeps the autograd of the concatenation.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from peftc.cache_room import appended, mark_latest, room_after
from peftc.graph import example_value

CAT = torch.ops.aten.cat.default
SIZE = torch.ops.aten.sym_size.int
SLICE = torch.ops.aten.slice.Tensor
COPY = torch.ops.aten.copy_.default
SLOT = "peftc_cache_slot"  # placeholder meta: the input is a slot buffer (`cache_room.room_after`)
PAST_LENGTH = "peftc_past_length"  # placeholder meta: the past's length, as the size of its one dim
PRESENT = "peftc_cache_present"  # node meta: a view of a slot buffer the graph returns as a present
NEW_LENGTH = "peftc_new_length"  # graph meta: (input position, dim) whose size is the new tokens' count


class WriteCacheInPlace(PassBase):
    """before: present = cat([past, new], -2)    (past an input nothing else reads but its sizes; present an output)
    after:  present = appended(past, new)"""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        cats = cache_concatenations(gm)
        for node in cats:
            node.target, node.args, node.kwargs = appended, tuple(node.args[0]), {}
        if cats:
            gm.recompile()
        return PassResult(gm, bool(cats))

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        for node in cache_concatenations(gm):
            raise AssertionError(f"{node.name} still concatenates the past {node.args[0][0].name}")


def cache_concatenations(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The graph's cache layer updates: each cat([past, new], -2) the graph returns (`_is_cache_concatenation`)."""
    outputs = set(gm.graph.output_node().all_input_nodes)
    return [n for n in gm.graph.find_nodes(op="call_function", target=CAT)
            if n in outputs and _is_cache_concatenation(n)]


def _is_cache_concatenation(node: torch.fx.Node) -> bool:
    """cat([past, new], -2) of a 4-d input `past` whose values nothing else reads, `new` of its dtype: a cache
    layer's update."""
    tensors, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if len(tensors) != 2 or not all(isinstance(t, torch.fx.Node) for t in tensors):
        return False
    past, new = tensors
    value, added = example_value(past), example_value(new)
    sizes_only = all(user is node or user.target == SIZE for user in past.users)
    return (past.op == "placeholder" and sizes_only and value is not None and value.dim() == 4 and dim in (-2, 2)
            and added is not None and added.dtype == value.dtype)


class WriteCacheIntoSlots(PassBase):
    """before: present = cat([past, new], -2)   (each cache layer; past an input)
    after:  the input is a slot buffer [b, h, capacity, d] holding the past and room after it, and a last
            input's size is the past's length L:
            slot[:, :, L:L + n].copy_(new);  present = slot[:, :, :L + n]

    For torch.compile: dynamo traces the write into an input and inductor performs it in place, writing n
    positions where the concatenation copies L + n. The caller passes `cache_room.room_after(past, n)` for
    each past, and a tensor of size [L] (`past_length_input`), the last input: `CacheSlots.of(gm)` reads
    where from the meta tags, and n is the size of the input dim in `gm.meta[NEW_LENGTH]`. A graph whose
    layers' pasts or new keys differ in length, or whose new length is not an input's size, is left as it
    is."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        cats = cache_concatenations(gm)
        pasts, news = {_size(n.args[0][0], 2) for n in cats}, {_size(n.args[0][1], 2) for n in cats}
        placeholders = list(graph.find_nodes(op="placeholder"))
        new_length = _input_dim(placeholders, next(iter(news))) if len(news) == 1 else None
        if len(pasts) != 1 or new_length is None:
            return PassResult(gm, False)
        with graph.inserting_after(placeholders[-1]):
            carrier = graph.placeholder("past_length")
        carrier.meta[PAST_LENGTH] = True
        with graph.inserting_after(carrier):
            past_length = graph.call_function(SIZE, (carrier, 0))
        for cat in cats:
            past, new = cat.args[0]
            past.meta[SLOT] = True
            for user in list(past.users):
                if user.target == SIZE and user.args[1] == 2:
                    user.replace_all_uses_with(past_length)
                    graph.erase_node(user)
            with graph.inserting_before(cat):
                end = graph.call_function(operator.add, (past_length, graph.call_function(SIZE, (new, 2))))
                graph.call_function(COPY, (graph.call_function(SLICE, (past, 2, past_length, end)), new))
                present = graph.call_function(SLICE, (past, 2, 0, end))
            present.meta[PRESENT] = True
            cat.replace_all_uses_with(present)
            graph.erase_node(cat)
        gm.meta[NEW_LENGTH] = new_length
        graph.lint()
        gm.recompile()
        return PassResult(gm, True)


def past_length_input(length: int, like: torch.Tensor) -> torch.Tensor:
    """A tensor of size [length] holding one element (a broadcast): the past's length as a dynamic size."""
    return like.new_empty(1).expand(length)


def _size(node: torch.fx.Node, dim: int) -> object:
    value = example_value(node)
    size = value.shape[dim] if value is not None and value.dim() > dim else None
    return size.node.expr if isinstance(size, torch.SymInt) else size


def _input_dim(placeholders: list[torch.fx.Node], size: object) -> tuple[int, int] | None:
    """(position, dim) of an input whose size there is `size` (a symbol of the capture)."""
    if size is None or isinstance(size, int):
        return None
    for position, node in enumerate(placeholders):
        value = example_value(node)
        for dim in range(value.dim() if value is not None else 0):
            if _size(node, dim) == size:
                return position, dim
    return None


@dataclasses.dataclass(frozen=True)
class CacheSlots:
    """The cache inputs and outputs of a graph `WriteCacheIntoSlots` rewrote: which inputs take slot buffers,
    where the new tokens' count is read, and which outputs are presents."""

    slots: list[int]  # input positions
    past_length: int  # input position
    new_length: tuple[int, int]  # (input position, dim)
    presents: list[int]  # output positions

    @classmethod
    def of(cls, gm: torch.fx.GraphModule) -> CacheSlots | None:
        if NEW_LENGTH not in gm.meta:
            return None
        inputs = list(gm.graph.find_nodes(op="placeholder"))
        slots = [i for i, node in enumerate(inputs) if node.meta.get(SLOT)]
        (past_length,) = [i for i, node in enumerate(inputs) if node.meta.get(PAST_LENGTH)]
        outputs = pytree.tree_leaves(gm.graph.output_node().args[0])
        presents = [i for i, node in enumerate(outputs) if isinstance(node, torch.fx.Node) and node.meta.get(PRESENT)]
        return cls(slots, past_length, gm.meta[NEW_LENGTH], presents)

    def fill(self, inputs: list[Any]) -> None:
        """A call's inputs made the rewritten graph's: each past replaced by a slot buffer holding it with room
        for the new tokens, and the past's length inserted."""
        position, dim = self.new_length
        count, past = inputs[position].shape[dim], inputs[self.slots[0]]
        length = past.shape[2]
        for i in self.slots:
            inputs[i] = room_after(inputs[i], count)
        inputs.insert(self.past_length, past_length_input(length, past))

    def mark_presents(self, outputs: Sequence[Any]) -> None:
        for i in self.presents:
            mark_latest(outputs[i])
