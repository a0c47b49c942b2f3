"""Building nodes in a captured graph: the one place rewrites create nodes and inputs.

Inserted nodes carry `ADAPTER` meta (module path, adapter name, method) so inspection and the
fold pass can find every node a rewrite added, and copy the base op's `nn_module_stack` so
provenance survives the rewrite.
"""

from __future__ import annotations

import copy
import operator
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from .capture import STATE, USER
from .sites import ADAPTER

aten = torch.ops.aten

ADDED_STATE = "peftc_added_state"  # placeholder meta: a tensor a rewrite added (adapter tensors), not a traced one

# applies an aten op to its arguments: `SiteBuilder.call` in a graph (a method's `emit`), `eager` on
# tensors (its `fold`, its `create`), so one function computes a method's tensors both ways
Call = Callable[..., Any]
# node meta: (the state tensor's name, whether a later write of it may replace this one) for a value the call
# writes to that tensor afterwards, as torch.export's mutated buffers are written (MonteCLoRA's sampled variance
# and expert weights, VeLoRA's batch projection: tensors PEFT's forward reassigns)
STATE_WRITE = "peftc_state_write"


def write_state(value: torch.fx.Node, state: torch.fx.Node, last_wins: bool = False) -> None:
    """Have each call write `value` to the state input `state` after running (passes/state_writes.py).
    `last_wins`: where the module runs several times per call, the last run's value is kept (PEFT keeps the
    last assignment); otherwise a second write to one tensor is refused."""
    value.meta[STATE_WRITE] = (state.meta[STATE], last_wins)


def eager(op: Any, *args: Any, **kwargs: Any) -> Any:
    """`Call` on tensors: run the op now."""
    return op(*args, **kwargs)


def add_state_input(gm: torch.fx.GraphModule, fqn: str, example: torch.Tensor) -> torch.fx.Node:
    """A placeholder for a model tensor, placed after the other state inputs (the calling convention)."""
    graph = gm.graph
    for node in graph.find_nodes(op="placeholder"):
        if node.meta.get(STATE) == fqn:
            return node
    first_user = next((n for n in graph.find_nodes(op="placeholder") if USER in n.meta), None)
    ctx = graph.inserting_before(first_user) if first_user is not None else graph.inserting_after(
        list(graph.find_nodes(op="placeholder"))[-1]
    )
    with ctx:
        node = graph.placeholder(_node_name(fqn, {n.target for n in graph.find_nodes(op="placeholder")}))
    node.meta[STATE] = fqn
    node.meta[ADDED_STATE] = True
    node.meta["val"] = torch.empty(example.shape, dtype=example.dtype, device="meta")
    return node


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule over a copy of `gm`'s graph (node meta shallow-copied, constants shared):
    rewrites run on copies, so one capture serves every variant (adapters, folded, mixed)."""
    return torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))


def boxed(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`gm` called as `gm(inputs)` with one list it empties (fx's boxed calling convention), in place. fx frees
    each value after its last use, but an input passed as `gm(*inputs)` stays alive in the caller's argument
    tuple until the call returns: boxed, an input the caller handed over (a decode step's past keys and
    values) is freed once the graph has read it. A torch without the convention leaves `gm` as it is."""
    codegen = getattr(torch.fx.graph, "_BoxedCodeGen", None)
    if codegen is not None:
        gm.graph.set_codegen(codegen())
        gm.recompile()
    return gm


def outline(gm: torch.fx.GraphModule, name: str, nodes: list[torch.fx.Node],
            wrap: Callable[[torch.fx.GraphModule], nn.Module], at: torch.fx.Node | None = None) -> torch.fx.Node:
    """Move `nodes` (in graph order) into a sub-GraphModule, wrapped by `wrap` and called from `gm` as `name`
    before `at` (default: where the last of them was; no node outside them may read one before that);
    returns the call. Its outputs, a tuple, are the moved nodes that nodes outside read."""
    inside = set(nodes)
    inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]

    body = torch.fx.Graph()
    env = {a: body.placeholder(a.name) for a in inputs}
    for a in inputs:
        env[a].meta = dict(a.meta)
    for n in nodes:
        env[n] = body.node_copy(n, env.__getitem__)
    body.output(tuple(env[o] for o in outputs))
    # GraphModule(gm, ...) copies the get_attr targets the body reads (constants, higher-order op bodies)
    gm.add_submodule(name, wrap(torch.fx.GraphModule(gm, body)))

    graph = gm.graph
    with graph.inserting_before(nodes[-1] if at is None else at):
        call = graph.call_module(name, tuple(inputs))
        for k, out in enumerate(outputs):
            item = graph.call_function(operator.getitem, (call, k))
            item.meta = dict(out.meta)
            out.replace_all_uses_with(item, delete_user_cb=lambda user: user not in inside)
    for n in reversed(nodes):
        graph.erase_node(n)
    return call


def drop_unused_state(gm: torch.fx.GraphModule, candidates: list[torch.fx.Node]) -> None:
    """Remove those of `candidates` (state placeholders) that no node reads any more."""
    for node in dict.fromkeys(candidates):
        if not node.users:
            gm.graph.erase_node(node)


def _node_name(fqn: str, taken: set[str]) -> str:
    """A placeholder name for the tensor `fqn`, not in `taken`. fx writes it into Python source as an argument
    name, so it must be an identifier: adapter names may hold any character ("my-adapter", "a b", a NUL)."""
    text = unicodedata.normalize("NFKC", fqn.removeprefix("base_model.model."))  # as Python reads identifiers
    name = "p_" + "".join(c if ("_" + c).isidentifier() else "_" for c in text)
    unique, i = name, 1
    while unique in taken:  # "my-adapter" and "my_adapter" are two inputs
        unique, i = f"{name}_{i}", i + 1
    return unique


@dataclass
class SiteBuilder:
    """Appends nodes after `anchor`, in order, tagged as belonging to one adapter at one site."""

    graph: torch.fx.Graph
    anchor: torch.fx.Node
    tag: tuple[str, str, str]
    site: str | None = None  # the name of the base op these nodes adapt (inspection groups by it)
    nodes: list[torch.fx.Node] = field(default_factory=list)

    def call(self, op: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
        with self.graph.inserting_after(self.nodes[-1] if self.nodes else self.anchor):
            node = self.graph.call_function(op, args, kwargs)
        node.meta[ADAPTER] = self.tag
        node.meta[SITE] = self.site or self.anchor.name
        if "nn_module_stack" in self.anchor.meta:
            node.meta["nn_module_stack"] = dict(self.anchor.meta["nn_module_stack"])
        self.nodes.append(node)
        return node

    def rerun(self, op: torch.fx.Node, replace: dict[int, Any]) -> torch.fx.Node:
        """The base op `op` again, with the arguments at the positions in `replace` replaced (a method that
        transforms the op's input or weight: IA3 feed-forward, OFT). Tagged `REISSUED`: it is the site's op,
        moved, not an inserted one; once rerouted, `op` is left without users and the adapt pass drops it."""
        args = list(op.args)
        for index, value in replace.items():
            args[index] = value
        new = self.call(op.target, *args, **op.kwargs)
        new.meta[REISSUED] = True
        if "val" in op.meta:
            new.meta["val"] = op.meta["val"]
        return new

    def reroute(self, new: torch.fx.Node) -> None:
        """Make the anchor's consumers read `new`, except the inserted nodes that compute it."""
        inserted = set(self.nodes)
        self.anchor.replace_all_uses_with(new, delete_user_cb=lambda user: user not in inserted)


REISSUED = "peftc_reissued"  # node meta on a base op a method ran again in place of the original
SITE = "peftc_site"  # node meta on inserted nodes: the name of the base op they adapt


def adapter_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """Every node a rewrite inserted."""
    return [n for n in graph.nodes if ADAPTER in n.meta]


def example_value(node: object) -> torch.Tensor | None:
    """A node's example tensor from the capture (`meta["val"]`); None for a non-tensor value, or where a
    rewrite inserted the node without one."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def dtype_of(node: torch.fx.Node) -> torch.dtype | None:
    val = example_value(node)
    return None if val is None else val.dtype


def cast(b: SiteBuilder, x: torch.fx.Node, src: torch.dtype | None, dst: torch.dtype | None) -> torch.fx.Node:
    """`x` converted from `src` to `dst` (no node when they agree or are unknown)."""
    if src is None or dst is None or src == dst:
        return x
    return b.call(aten.to.dtype, x, dst)


def cast_like(b: SiteBuilder, x: torch.fx.Node, like: torch.fx.Node) -> torch.fx.Node:
    """Cast `x` to `like`'s dtype where they differ (fp32 adapters over a low-precision base)."""
    return cast(b, x, dtype_of(x), dtype_of(like))


def shape_of(b: SiteBuilder, node: torch.fx.Node) -> list[torch.fx.Node]:
    """`node`'s (possibly symbolic) shape as graph values, for reshapes back to it."""
    return [b.call(aten.sym_size.int, node, d) for d in range(node.meta["val"].dim())]
