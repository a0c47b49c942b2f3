"""The rewrite pipeline: from a captured base graph to the graph a variant runs.

    base graph ──bind──▶ state inputs named as the parameter tree names them
      variant "active":   ──fold──▶ merged adapters' sites read merged tensors    (passes/fold.py, rebind.py)
                          ──adapt─▶ adapter subgraphs at op sites                 (passes/adapt.py)
                          ──rebind▶ targeted parameters, module copies            (lora_params.py, rebind.py)
      variant "mixed":    ──dispatch▶ every adapter, picked per sample           (passes/dispatch.py)
      variant "disabled": the base graph as it is

Lowerings for a backend come after (`backends/eager.py: eager_lowering`, `backends/compile.py`).
"""

from __future__ import annotations

import dataclasses

import torch.fx

from peftc.passes import insert_adapters
from peftc.passes.dispatch import dispatch_adapters
from peftc.passes.fold import fold_adapters
from peftc.passes.lora_params import ParamAdapter, rebind_parameters
from peftc.passes.modules_to_save import CopyAdapter
from peftc.passes.rebind import partition, rebind_to_tensors

from .adapters import AdapterSet
from .capture import STATE, CapturedGraph
from .errors import ConfigError
from .graph import copy_graph_module
from .merge import MergedState
from .state import ParameterTree


def rewrite(base: CapturedGraph, variant: tuple, tree: ParameterTree, adapters: AdapterSet,
            merged: MergedState) -> CapturedGraph:
    """A new graph for `variant` (`Programs.variant`); `base` is never changed."""
    gm = copy_graph_module(base.gm)
    bind_tree_names(gm, tree)
    extra: tuple[str, ...] = ()
    kind = variant[0]
    if kind == "mixed":
        if partition(adapters.modules, (ParamAdapter, CopyAdapter))[1]:
            raise ConfigError("mixed batches (adapter_names / adapter_index) do not support target_parameters "
                              "(PEFT refuses them too) or modules_to_save yet; call with one active set")
        dispatch_adapters(gm, adapters.modules, adapters.order, base.training)
        extra = ("adapter_index",)
    elif kind == "active":
        if merged.tensors:
            fold_merged(gm, tree, adapters, merged)
        unmerged = [a for a in adapters.active if a not in merged.adapters]
        sites, params = partition(adapters.named(unmerged), ParamAdapter)
        sites, copies = partition(sites, CopyAdapter)
        insert_adapters(gm, sites, base.training)
        rebind_parameters(gm, [(tree.state_names(mas[0].key), mas) for mas in params.values()])
        rebind_to_tensors(gm, copy_bindings(tree, copies))
    mutated = [tree.names[f] for f in base.mutated_state]
    return dataclasses.replace(base, gm=gm, mutated_state=mutated, extra_inputs=extra)


def bind_tree_names(gm: torch.fx.GraphModule, tree: ParameterTree) -> None:
    """State inputs are captured under the source's names; the adapted model holds them under PEFT's."""
    for node in gm.graph.find_nodes(op="placeholder"):
        if STATE in node.meta:
            node.meta[STATE] = tree.names[node.meta[STATE]]


def fold_merged(gm: torch.fx.GraphModule, tree: ParameterTree, adapters: AdapterSet, merged: MergedState) -> None:
    """Rebind adapted modules' sites, and targeted parameters inside their modules, to merged tensors."""
    rebound = adapters.rebound_keys()
    sites: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    bindings = []
    for path, tensors in merged.tensors.items():
        for leaf, fqn in tensors.items():
            if f"{path}.{leaf}" in rebound:
                bindings.append((tree.state_names(f"{path}.{leaf}"), path, fqn, tree.tensor(fqn)))
            else:
                sites.setdefault(path, {})[leaf] = (fqn, tree.tensor(fqn))
    fold_adapters(gm, sites)
    rebind_to_tensors(gm, bindings)


def copy_bindings(tree: ParameterTree, copies: dict[str, list[CopyAdapter]],
                  ) -> list[tuple[frozenset[str], str, str, torch.Tensor]]:
    """Each parameter of a module trained as copies, bound to the active adapter's copy (one at most, as PEFT)."""
    out = []
    for path, mas in copies.items():
        if len(mas) > 1:
            raise ConfigError(f"module {path!r} is in modules_to_save of several active adapters "
                              f"({[ma.adapter for ma in mas]}); PEFT allows one at a time")
        for (_, leaf), (fqn, t) in mas[0].tensors.items():
            out.append((tree.state_names(f"{path}.{leaf}"), path, fqn, t))
    return out
