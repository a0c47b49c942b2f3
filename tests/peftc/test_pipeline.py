"""The pipeline's stages on small graphs: each pass run alone (what it requires and ensures), the stage
list of each variant, and how the pass manager reports a pass's error."""

from __future__ import annotations

import pytest
import torch
from peftc.passes import InsertAdapters
from peftc.passes.dispatch import DispatchAdapters
from peftc.passes.fold import FoldAdapters
from peftc.passes.lora_params import RebindParameters
from peftc.passes.rebind import RebindToTensors
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.testing import FileCheck

import peftc
from peftc import pipeline
from peftc.errors import TargetError
from peftc.graph import adapter_nodes, boxed, copy_graph_module
from tests import zoo

aten = torch.ops.aten


@pytest.fixture(scope="module")
def mlp():
    """An adapted MLP with two LoRA adapters on lin0 and lin1, and its base graph named as the tree names it."""
    case = zoo.mlp()
    config = {"peft_type": "LORA", "r": 2, "target_modules": ["lin0", "lin1"], "init_lora_weights": False}
    am = peftc.apply(case.model, config, example_inputs=case.inputs)
    am.add_adapter("other", config)
    (base,) = list(am.programs.captures)
    gm = copy_graph_module(base.gm)
    pipeline.bind_tree_names(gm, am.parameter_tree)
    return am, gm, case.inputs


def fresh(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    return copy_graph_module(gm)


def test_the_suite_lints_every_pass() -> None:
    assert pipeline.CHECK_PASSES


def test_insert_adapters_adds_each_adapters_subgraph_and_refuses_to_run_twice(mlp) -> None:
    am, base, _ = mlp
    gm = fresh(base)
    pass_ = InsertAdapters(am.adapter_set.named(["default"]), training=False)
    assert pass_(gm).modified
    # per linear site: A, B (two linears), a mul by the scale and the add
    FileCheck().check_count("aten.linear", 2 + 4, exactly=True).run(gm.code)
    assert len(adapter_nodes(gm.graph)) == 8
    with pytest.raises(AssertionError, match="already inserted"):
        pass_(gm)


def test_dispatch_adds_one_index_input_and_refuses_a_second(mlp) -> None:
    am, base, _ = mlp
    gm = fresh(base)
    pass_ = DispatchAdapters(am.adapter_set.modules, am.adapter_order, training=False)
    pass_(gm)
    assert [n.name for n in gm.graph.find_nodes(op="placeholder")][-1] == "adapter_index"
    with pytest.raises(AssertionError, match="already takes an adapter_index"):
        pass_(gm)


def test_fold_rebinds_weights_without_adding_nodes(mlp) -> None:
    am, base, (x,) = mlp
    gm = fresh(base)
    merged = am.merged_tensors(["default"])
    tree = am.parameter_tree
    folded = {path: {leaf: (f"merged.{path}.{leaf}", t) for leaf, t in tensors.items()}
              for path, tensors in merged.items()}
    before = len(gm.graph.nodes)
    FoldAdapters(folded)(gm)
    assert len(gm.graph.nodes) == before and not adapter_nodes(gm.graph)
    state = {n.meta["peftc_state"] for n in gm.graph.find_nodes(op="placeholder") if "peftc_state" in n.meta}
    assert {"merged.lin0.weight", "merged.lin1.weight"} <= state
    assert tree.names["lin0.weight"] not in state  # the base weight is no longer read


def test_fold_ensures_every_site_reads_the_merged_tensor(mlp) -> None:
    _, base, _ = mlp
    gm = fresh(base)
    fold = FoldAdapters({"lin0": {"weight": ("merged.lin0.weight", torch.zeros(24, 12))}})
    with pytest.raises(AssertionError, match="not the merged weight"):
        fold.ensures(gm)  # before the pass ran


def test_each_variant_runs_its_own_stages(mlp) -> None:
    am, _, _ = mlp
    tree, adapters, merged = am.parameter_tree, am.adapter_set, am.programs.merged

    def stages(variant: tuple) -> list[str]:
        return [type(p).__name__ for p in pipeline.variant_passes(variant, tree, adapters, merged, False)]

    assert stages(("active", ("default",), ())) == ["InsertAdapters", "RebindParameters", "RebindToTensors"]
    assert stages(("mixed", ("default", "other"))) == ["DispatchAdapters"]
    assert stages(("disabled",)) == []
    am.merge_adapter(["default"])
    try:
        assert stages(("active", ("default",), ("default",)))[:2] == ["FoldAdapters", "RebindToTensors"]
    finally:
        am.unmerge_adapter()


def test_rebinding_stages_do_nothing_without_targets(mlp) -> None:
    _, base, _ = mlp
    gm = fresh(base)
    assert not RebindParameters([], training=False)(gm).modified
    assert not RebindToTensors([])(gm).modified


class Refuses(PassBase):
    def __init__(self, error: Exception) -> None:
        self.error = error

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        raise self.error


def test_a_pass_refusing_a_layer_reaches_the_caller_as_itself(mlp) -> None:
    """torch.fx's PassManager wraps what a pass raises; a peftc error (a layer a method refuses) comes out
    unwrapped, as the user expects it, and anything else keeps the manager's note naming the pass."""
    _, base, _ = mlp
    with pytest.raises(TargetError, match="no such op"):
        pipeline.run_passes(fresh(base), [Refuses(TargetError("no such op"))])
    with pytest.raises(Exception, match="'Refuses' pass") as e:
        pipeline.run_passes(fresh(base), [Refuses(RuntimeError("bug"))])
    assert isinstance(e.value.__cause__, RuntimeError)


def test_a_boxed_graph_takes_its_inputs_list_over() -> None:
    gm = boxed(torch.fx.symbolic_trace(lambda a, b: torch.cat([a, b]) * 2))
    inputs = [torch.ones(2), torch.zeros(1)]
    assert gm._boxed_call
    assert torch.equal(gm(inputs), torch.tensor([2.0, 2.0, 0.0]))
    assert inputs == []  # emptied: the graph's locals were the last references, dropped after their last use
