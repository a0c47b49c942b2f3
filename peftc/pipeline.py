"""The pipeline: the named stages from a captured base graph to the graph a program runs.

    base graph ──canonicalize──▶ x @ W.T as aten.linear                 passes/canonical_linear.py
               ──bind─────────▶ state inputs named as the parameter tree names them
      variant "active":   ──fold────▶ merged adapters' sites read merged tensors   passes/fold.py, rebind.py
                          ──adapt───▶ adapter subgraphs at op sites                passes/adapt.py + methods
                          ──rebind──▶ targeted parameters, module copies           lora_params.py, rebind.py
      variant "mixed":    ──dispatch▶ every adapter, picked per sample            passes/dispatch.py
      variant "disabled": the base graph
      every variant:      ──loss terms▶ regularisers added to a returned loss    passes/loss_terms.py
                          ──state writes▶ values written back to model tensors passes/state_writes.py
    lowering for eager execution:
               ──elide masks──▶ trivial attention masks dropped at run time   passes/attention_masks.py
               ──remat────────▶ layers recomputed in backward (train)          passes/remat.py
               or gates ──────▶ gated activations recomputed (train)          passes/recompute_gates.py
               or accumulate ─▶ low-rank branches added in place (inference,  passes/accumulate_in_place.py
                                not under autocast)
               ──gqa──────────▶ SDPA reads grouped keys/values unexpanded     passes/grouped_query_attention.py
                                (inference)
               ──cache────────▶ KV cache written in place, not concatenated  passes/write_cache_in_place.py
                                (inference)
               ──hoist────────▶ adapter-only work computed once (inference)  passes/hoist_invariants.py
               ──bindings─────▶ ops called as eager code calls them         passes/python_bindings.py
               then boxed ────▶ inputs taken over, each freed after its last use   graph.boxed

Every stage is a torch.fx `PassBase` with the conditions it requires and ensures; each list runs in a
`PassManager`. `CHECK_PASSES` (set by the test suite) lints the graph after every pass.
"""

from __future__ import annotations

import dataclasses
import os

import torch.fx
from torch.fx.passes.infra.pass_base import PassBase
from torch.fx.passes.infra.pass_manager import PassManager

from peftc.passes import InsertAdapters
from peftc.passes.accumulate_in_place import AccumulateLowRankInPlace
from peftc.passes.attention_masks import ElideAttentionMasks
from peftc.passes.canonical_linear import LinearFromTransposedMatmul
from peftc.passes.dispatch import DispatchAdapters
from peftc.passes.fold import FoldAdapters
from peftc.passes.grouped_query_attention import AttendGroupedQueries
from peftc.passes.hoist_invariants import HoistAdapterInvariants
from peftc.passes.lora_params import ParamAdapter, RebindParameters
from peftc.passes.loss_terms import AddLossTerms, loss_output_index, loss_terms
from peftc.passes.modules_to_save import CopyAdapter
from peftc.passes.python_bindings import CallPythonBindings
from peftc.passes.rebind import Binding, RebindToTensors, partition
from peftc.passes.recompute_gates import RecomputeGatedActivations
from peftc.passes.remat import CheckpointLayers, RematPlan
from peftc.passes.state_writes import WriteBackState
from peftc.passes.write_cache_in_place import WriteCacheInPlace

from .adapters import AdapterSet
from .capture import STATE, CapturedGraph
from .errors import ConfigError, PeftcError
from .graph import boxed, copy_graph_module
from .merge import MergedState
from .method import Placement
from .state import ParameterTree

CHECK_PASSES = os.environ.get("PEFTC_CHECK_PASSES", "") == "1"


def run_passes(gm: torch.fx.GraphModule, passes: list[PassBase]) -> torch.fx.GraphModule:
    """Run `passes` in order on `gm` (in place); with `CHECK_PASSES`, lint the graph after each one.
    A peftc error raised by a pass (a layer the method refuses) reaches the caller as itself."""
    manager = PassManager(passes, run_checks_after_each_pass=CHECK_PASSES)
    manager.add_checks(_lint)
    try:
        return manager(gm).graph_module
    except Exception as e:  # PassManager wraps what a pass raises in a plain Exception naming the pass
        if isinstance(e.__cause__, PeftcError):
            raise e.__cause__ from None
        raise


def _lint(gm: torch.nn.Module) -> None:
    if isinstance(gm, torch.fx.GraphModule):
        gm.graph.lint()


def canonicalize(base: CapturedGraph) -> None:
    """The stages every base graph gets once, right after capture."""
    run_passes(base.gm, [LinearFromTransposedMatmul()])


def rewrite(base: CapturedGraph, variant: tuple, tree: ParameterTree, adapters: AdapterSet,
            merged: MergedState) -> CapturedGraph:
    """A new graph for `variant` (`Programs.variant`); `base` is never changed."""
    gm = copy_graph_module(base.gm)
    bind_tree_names(gm, tree)
    writes = WriteBackState()
    run_passes(gm, [*variant_passes(variant, tree, adapters, merged, base.training), *loss_passes(base, adapters),
                    writes])
    mutated = writes.written + [tree.names[f] for f in base.mutated_state]
    extra = ("adapter_index",) if variant[0] == "mixed" else ()
    return dataclasses.replace(base, gm=gm, mutated_state=mutated, extra_inputs=extra)


def variant_passes(variant: tuple, tree: ParameterTree, adapters: AdapterSet, merged: MergedState,
                   training: bool) -> list[PassBase]:
    kind = variant[0]
    if kind == "mixed":
        rebound = sorted({getattr(ma, "owner", path) for path, mas in adapters.modules.items() for ma in mas
                          if ma.method.placement is Placement.WEIGHT})
        if rebound:
            raise ConfigError(f"mixed batches (adapter_names / adapter_index) do not support adapters rebinding "
                              f"weights inside modules {rebound[:4]}: target_parameters and nn.MultiheadAttention "
                              "(PEFT refuses both too), or modules_to_save (not yet); call with one active set "
                              "(compile_model runs every call through this graph: compile a folded model instead)")
        return [DispatchAdapters(adapters.modules, adapters.order, training)]
    if kind == "disabled":
        return []
    passes: list[PassBase] = [*fold_passes(tree, adapters, merged)] if merged.tensors else []
    unmerged = [a for a in adapters.active if a not in merged.adapters]
    sites, params = partition(adapters.named(unmerged), ParamAdapter)
    sites, copies = partition(sites, CopyAdapter)
    return passes + [
        InsertAdapters(sites, training, adapters.modules),
        RebindParameters([(tree.state_names(mas[0].key), mas) for mas in params.values()], training),
        RebindToTensors(copy_bindings(tree, copies)),
    ]


def loss_passes(base: CapturedGraph, adapters: AdapterSet) -> list[PassBase]:
    """Where the call returns a loss, the loaded adapters' loss terms (AdaLoRA's orthogonal regularisation),
    in every variant: PEFT adds them in its forward whatever adapters are active, merged or disabled."""
    terms = loss_terms(adapters)
    index = loss_output_index(base) if terms else None
    return [AddLossTerms(terms, index)] if index is not None else []


def eager_lowering(gm: torch.fx.GraphModule, remat: RematPlan | None, training: bool,
                   autocast: bool = False) -> torch.fx.GraphModule:
    """What an eager program runs for the graph `gm`: a copy lowered for eager execution. Attention
    masks that are trivial at run time are dropped (a choice made from tensor values, which only
    eager code can hold); train graphs then checkpoint whole layers where `remat` asks for it, and
    otherwise recompute gated activations; inference graphs add low-rank branches into their linear's
    output in place (not for calls under `autocast`, which picks dtypes per op), attend with grouped keys and
    values unexpanded, write the KV cache in place, and compute what depends on the adapters' tensors alone
    once, not at every call.
    Last, the most frequent ops are called through torch's Python bindings, as eager code calls them, and the
    program takes its inputs boxed (`graph.boxed`: each freed after its last use). None of this changes a
    value: `gm` stays the graph that inspection, torch.compile and ONNX see (torch.compile runs the remat
    stage alone)."""
    stages: list[PassBase] = [ElideAttentionMasks()]
    if training:
        stages.append(CheckpointLayers(remat) if remat is not None else RecomputeGatedActivations())
    else:
        if not autocast:
            stages.append(AccumulateLowRankInPlace())
        stages += [AttendGroupedQueries(), WriteCacheInPlace(), HoistAdapterInvariants()]
    return boxed(run_passes(copy_graph_module(gm), [*stages, CallPythonBindings()]))


def bind_tree_names(gm: torch.fx.GraphModule, tree: ParameterTree) -> None:
    """State inputs are captured under the source's names; the adapted model holds them under PEFT's."""
    for node in gm.graph.find_nodes(op="placeholder"):
        if STATE in node.meta:
            node.meta[STATE] = tree.names[node.meta[STATE]]


def fold_passes(tree: ParameterTree, adapters: AdapterSet, merged: MergedState) -> list[PassBase]:
    """Adapted modules' sites, and targeted parameters inside their modules, read merged tensors."""
    rebound = adapters.rebound_keys()
    sites: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    bindings = []
    for path, tensors in merged.tensors.items():
        for leaf, fqn in tensors.items():
            key = f"{path}.{leaf}"
            if key in rebound:
                bindings.append((tree.state_names(key), rebound[key], fqn, tree.tensor(fqn)))
            else:
                sites.setdefault(path, {})[leaf] = (fqn, tree.tensor(fqn))
    return [FoldAdapters(sites), RebindToTensors(bindings)]


def copy_bindings(tree: ParameterTree, copies: dict[str, list[CopyAdapter]]) -> list[Binding]:
    """Each parameter of a module trained as copies, bound to the active adapter's copy (one at most, as PEFT)."""
    out = []
    for path, mas in copies.items():
        if len(mas) > 1:
            raise ConfigError(f"module {path!r} is in modules_to_save of several active adapters "
                              f"({[ma.adapter for ma in mas]}); PEFT allows one at a time")
        for (_, leaf), (fqn, t) in mas[0].tensors.items():
            out.append((tree.state_names(f"{path}.{leaf}"), path, fqn, t))
    return out
