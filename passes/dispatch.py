"""The dispatch pass: every sample of a batch picks its own adapter, by a graph input.

The rewritten graph takes one more input, `adapter_index` (int64, one entry per sample):
entry i selects the i-th of the pass's `slots` (adapter names), -1 the base model alone. Each
adapted site asks its method for a batched lowering first (LoRA: gather of stacked A/B, then
two batched matmuls, as Punica/vLLM's BGMV); otherwise the generic per-sample form runs every
adapter of the site on the batch and keeps, per sample, the output of the one it picked
(`where`, so each adapter gets gradients only from its own samples, also in training).

Activations are assumed batch-major: a site's input and output lead with the batch dim, or
with batch x tokens flattened (GPT-2's Conv1D); rows of one sample stay contiguous.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from peftc.capture import USER, leading_size
from peftc.graph import SiteBuilder, add_state_input, shape_of
from peftc.method import EmitContext, MixedEmitContext, ModuleAdapter, TensorKey
from peftc.sites import Site, sites_by_module

from .adapt import check_site_op

aten = torch.ops.aten

INDEX = "peftc_adapter_index"  # placeholder meta: the per-sample adapter index input
BASE_ONLY = -1  # adapter_index entry meaning "no adapter for this sample"
BASE_NAME = "__base__"  # PEFT's adapter_names entry for the same


def slot_indices(adapter_names: Sequence[str], slots: Sequence[str]) -> list[int]:
    """`adapter_index` entries for per-sample adapter names (already checked to be in `slots` or BASE_NAME)."""
    return [BASE_ONLY if n == BASE_NAME else slots.index(n) for n in adapter_names]

# the inputs of one adapter at one site, or None where that adapter does not adapt the module
Slot = tuple[ModuleAdapter, dict[TensorKey, torch.fx.Node]] | None


class DispatchAdapters(PassBase):
    """before: y = op(x, W)                       (each site of an adapted module)
    after:  y' = the output of adapter slots[adapter_index[i]] for each sample i (-1: y itself)

    The graph gains the input `adapter_index`; `adapters` maps module path -> every adapter placed there."""

    def __init__(self, adapters: dict[str, list[ModuleAdapter]], slots: list[str], training: bool) -> None:
        self.adapters = adapters
        self.slots = slots
        self.training = training

    def requires(self, gm: torch.fx.GraphModule) -> None:
        if _index_inputs(gm):
            raise AssertionError("the graph already takes an adapter_index")

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        index, rows = add_index_input(gm), batch_rows(gm)
        sites = sites_by_module(gm.graph)
        position = {name: i for i, name in enumerate(self.slots)}
        for path, module_adapters in self.adapters.items():
            chosen = [ma for ma in module_adapters if ma.adapter in position]
            if not chosen:
                continue
            for site in sites.get(path, []):
                per_slot: list[Slot] = [None] * len(self.slots)
                for ma in chosen:
                    check_site_op(site, ma)
                    inputs = {key: add_state_input(gm, fqn, t) for key, (fqn, t) in ma.tensors.items()}
                    per_slot[position[ma.adapter]] = (ma, inputs)
                b = SiteBuilder(gm.graph, site.node, (path, ",".join(ma.adapter for ma in chosen), "DISPATCH"))
                b.reroute(_emit_site(b, site, per_slot, index, rows, self.training))
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        if len(_index_inputs(gm)) != 1:
            raise AssertionError("the dispatched graph must take exactly one adapter_index input")


def _index_inputs(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.find_nodes(op="placeholder") if INDEX in n.meta]


def add_index_input(gm: torch.fx.GraphModule) -> torch.fx.Node:
    """The `adapter_index` placeholder, after every other input."""
    last = list(gm.graph.find_nodes(op="placeholder"))[-1]
    with gm.graph.inserting_after(last):
        node = gm.graph.placeholder("adapter_index")
    node.meta[INDEX] = True
    node.meta["val"] = torch.empty(2, dtype=torch.int64, device="meta")
    return node


def batch_rows(gm: torch.fx.GraphModule) -> Any:
    """The batch size `adapter_index` is checked against at run time (programs.checked_index), as the graph
    knows it: the same rule over the user inputs' example values."""
    users = sorted((n for n in gm.graph.find_nodes(op="placeholder") if USER in n.meta), key=lambda n: n.meta[USER])
    return leading_size(n.meta.get("val") for n in users)


def _emit_site(b: SiteBuilder, site: Site, per_slot: list[Slot], index: torch.fx.Node, rows: Any,
               training: bool) -> torch.fx.Node:
    y = site.node
    present = [s for s in per_slot if s is not None]
    methods = {type(ma.method) for ma, _ in present}
    kinds = {ma.kind for ma, _ in present}
    if len(methods) == 1 and len(kinds) == 1:
        ma = present[0][0]
        slots = [None if s is None else (s[1], s[0].config) for s in per_slot]
        context = MixedEmitContext(b, site, y, ma.kind, training, slots=slots, index=index, rows=rows)
        batched = ma.method.emit_mixed(context)
        if batched is not None:
            return batched
    return _per_sample(b, site, per_slot, index, training)


def _per_sample(
    b: SiteBuilder, site: Site, per_slot: list[Slot], index: torch.fx.Node, training: bool
) -> torch.fx.Node:
    """Run each adapter on the whole batch, keep per sample the output of the adapter it picked."""
    y = site.node
    batch = b.call(aten.sym_size.int, index, 0)
    rows = b.call(aten.reshape.default, y, [batch, -1])
    out = rows
    for position, slot in enumerate(per_slot):
        if slot is None:
            continue
        ma, inputs = slot
        # every adapter on the module is a slot: a method reading those beside it (an Arrow router) finds them here
        beside = [(other.adapter, other.config, other_inputs) for other, other_inputs in filter(None, per_slot)
                  if other is not ma] if ma.method.reads_beside(ma.config) else []
        adapted = ma.method.emit(EmitContext(b, site, y, ma.kind, training, tensors=inputs, config=ma.config,
                                             beside=beside))
        picked = b.call(aten.unsqueeze.default, b.call(aten.eq.Scalar, index, position), 1)
        out = b.call(aten.where.self, picked, b.call(aten.reshape.default, adapted, [batch, -1]), out)
    return b.call(aten.reshape.default, out, shape_of(b, y))
