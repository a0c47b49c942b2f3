"""peftc.inspect: site records, graph diffs, the networkx view, subgraph lookup and drawing."""

from __future__ import annotations

import copy

import networkx as nx
import pytest
import torch

import peftc
import peftc.inspect as pi
from peftc.capture import STATE, capture
from peftc.graph import ADAPTER, adapter_nodes
from tests import zoo

aten = torch.ops.aten
RANKS = {"lin0": 2, "lin1": 3}


def _apply(case: zoo.Case, **fields) -> peftc.AdaptedModel:
    config = {"peft_type": "LORA", "r": 2, "target_modules": case.targets, "init_lora_weights": False, **fields}
    return peftc.apply(case.model, config, example_inputs=case.inputs)


@pytest.fixture(scope="module")
def mlp() -> tuple[zoo.Case, peftc.AdaptedModel]:
    case = zoo.mlp()
    return case, _apply(case, rank_pattern={"lin1": 3})


def test_adapter_sites_name_op_method_rank_params_and_nodes(mlp):
    _, am = mlp
    sites = pi.adapter_sites(am)
    assert [s.module_path for s in sites] == ["lin0", "lin1"]
    params = dict(am.adapter_parameters())
    graph = am.graphs[0].gm.graph
    by_name = {n.name: n for n in graph.nodes}
    for s in sites:
        assert (s.op, s.method, s.adapter, s.rank) == ("aten.linear", "LORA", "default", RANKS[s.module_path])
        # the base op is the linear reading the module's own weight
        base = by_name[s.base_node]
        assert base.args[1].meta[STATE] == f"base_model.model.{s.module_path}.base_layer.weight"
        assert ADAPTER not in base.meta
        # parameters: exactly the adapter's, with their shapes (the scale buffer is not one)
        mine = {k: tuple(p.shape) for k, p in params.items() if f".{s.module_path}." in k}
        assert s.params == mine and len(mine) == 2
        assert all(s.rank in shape for shape in s.params.values())
        # LoRA on a linear in an inference graph: A, B·s (an adapter invariant, computed once by the eager
        # lowering), B, add
        assert s.n_nodes == 4
        assert [by_name[n].target for n in s.nodes] == [aten.linear.default, aten.mul.Tensor, aten.linear.default,
                                                        aten.add.Tensor]
        assert all(by_name[n].meta[ADAPTER] == (s.module_path, "default", "LORA") for n in s.nodes)
    assert sum(s.n_nodes for s in sites) == len(adapter_nodes(graph))


def test_adapter_sites_of_a_bare_graph_have_no_rank(mlp):
    _, am = mlp
    from_model = pi.adapter_sites(am)
    from_graph = pi.adapter_sites(am.graphs[0].gm)
    assert [s.rank for s in from_graph] == [None, None]
    for a, b in zip(from_model, from_graph):
        assert (a.module_path, a.op, a.base_node, a.params, a.nodes) == (b.module_path, b.op, b.base_node, b.params,
                                                                         b.nodes)


def test_graph_diff_counts_exactly_the_inserted_ops(mlp):
    case, am = mlp
    base = capture(case.model, case.inputs, {}, False)
    diff = pi.graph_diff(base, am)
    assert diff.added == {"aten.linear": 4, "aten.mul.Tensor": 2, "aten.add.Tensor": 2}
    assert diff.before["aten.linear"] == 2 and diff.after["aten.linear"] == 6
    assert diff.unexplained == {}
    assert [s.module_path for s in diff.sites] == ["lin0", "lin1"]

    # a node some pass added without tagging it is reported, not hidden
    graph = copy.deepcopy(am.graphs[0].gm.graph)
    out = next(iter(graph.find_nodes(op="output")))
    with graph.inserting_before(out):
        graph.call_function(aten.relu.default, (out.args[0][0],))
    assert pi.graph_diff(base, graph).unexplained == {"aten.relu": 1}


def test_to_networkx_has_every_node_edge_and_tag(mlp):
    _, am = mlp
    graph = am.graphs[0].gm.graph
    g = pi.to_networkx(am)
    assert isinstance(g, nx.DiGraph) and nx.is_directed_acyclic_graph(g)
    assert g.number_of_nodes() == len(graph.nodes)
    assert g.number_of_edges() == sum(len(n.all_input_nodes) for n in graph.nodes)
    inserted = {n for n, d in g.nodes(data=True) if d["adapter"] is not None}
    assert inserted == {n.name for n in adapter_nodes(graph)}
    assert {g.nodes[n]["method"] for n in inserted} == {"LORA"}
    a = next(n for n, d in g.nodes(data=True) if d["tensor"] == "base_model.model.lin0.lora_A.default.weight")
    assert g.nodes[a]["op"] == "placeholder" and g.nodes[a]["shape"] == (2, 12)
    # the adapter's A weight reaches the output only through inserted nodes and later base ops
    assert nx.has_path(g, a, "output")
    base = next(s.base_node for s in pi.adapter_sites(am) if s.module_path == "lin0")
    assert g.nodes[base]["module"] == "lin0" and g.nodes[base]["target"] == "aten.linear"
    assert not nx.has_path(g, a, base)  # the base op does not depend on the adapter


def test_count_ops_takes_overloads_packets_and_names(mlp):
    _, am = mlp
    assert pi.count_ops(am, aten.linear.default) == 6
    assert pi.count_ops(am, aten.linear) == 6
    for name in ("aten.linear", "linear", "aten.linear.default"):
        assert pi.count_ops(am, name) == 6
    assert pi.count_ops(am, aten.mul.Tensor) == pi.count_ops(am, "aten.mul.Tensor") == pi.count_ops(am, "mul") == 2
    assert pi.count_ops(am, aten.mul.Scalar) == 0
    assert pi.count_ops(am, "conv2d") == 0


def test_inserted_subgraph_is_the_site_its_inputs_and_consumers(mlp):
    _, am = mlp
    sub = pi.inserted_subgraph(am, "lin0")
    assert [n.target for n in sub.sites] == [aten.linear.default]
    assert len(sub.nodes) == 4 and all(n.meta[ADAPTER][0] == "lin0" for n in sub.nodes)
    states = {n.meta.get(STATE) for n in sub.inputs} - {None}
    prefix = "base_model.model.lin0."
    assert states == {prefix + t for t in ("base_layer.weight", "base_layer.bias", "lora_A.default.weight",
                                           "lora_B.default.weight", "lora_scaling.default")}
    assert [n.name for n in sub.inputs if n.op == "placeholder" and STATE not in n.meta] == ["x"]
    # the rewrite rerouted the linear's consumer (the ReLU) to the adapted output
    assert [n.target for n in sub.outputs] == [aten.relu.default]
    assert sub.outputs[0].args[0] is sub.nodes[-1]
    with pytest.raises(peftc.TargetError, match="'lin2'.*lin1"):
        pi.inserted_subgraph(am, "lin2")
    with pytest.raises(peftc.TargetError, match="adapter 'other'"):
        pi.inserted_subgraph(am, "lin0", adapter="other")


def test_assert_no_adapter_nodes_names_what_remains(mlp):
    case, am = mlp
    with pytest.raises(AssertionError, match=r"8 adapter node\(s\) remain at 2 site\(s\)") as e:
        pi.assert_no_adapter_nodes(am)
    assert "lin1 [default, LORA]: " in str(e.value)
    pi.assert_no_adapter_nodes(capture(case.model, case.inputs, {}, False))
    folded = am.fold()
    with torch.no_grad():
        torch.testing.assert_close(folded(*case.inputs), am(*case.inputs))
    pi.assert_no_adapter_nodes(folded.graphs[0])


def test_a_module_called_twice_has_two_sites():
    torch.manual_seed(0)
    am = peftc.apply(zoo.Twice(), {"peft_type": "LORA", "r": 2, "target_modules": ["lin"]},
                     example_inputs=(torch.randn(3, 6),))
    sites = pi.adapter_sites(am)
    assert [s.module_path for s in sites] == ["lin", "lin"]
    assert len({s.base_node for s in sites}) == 2 and all(s.n_nodes == 4 for s in sites)
    sub = pi.inserted_subgraph(am, "lin")
    assert len(sub.sites) == 2 and len(sub.nodes) == 8


def test_stacked_adapters_are_one_record_each_at_the_same_base_op():
    case = zoo.mlp()
    am = _apply(case)
    am.add_adapter("other", {"peft_type": "LORA", "r": 3, "target_modules": ["lin1"], "init_lora_weights": False})
    am.set_adapter(["default", "other"])
    with torch.no_grad():
        am(*case.inputs)
    graph = am.graphs[-1]
    sites = [s for s in pi.adapter_sites(graph) if s.module_path == "lin1"]
    assert [s.adapter for s in sites] == ["default", "other"]
    assert sites[0].base_node == sites[1].base_node
    assert len(pi.inserted_subgraph(graph, "lin1").nodes) == 8
    assert len(pi.inserted_subgraph(graph, "lin1", adapter="other").nodes) == 4


@pytest.mark.parametrize("name, op", [("cnn", "aten.conv2d"), ("embedding_model", "aten.embedding")])
def test_sites_of_conv_and_embedding_layers(name: str, op: str):
    case = zoo.FACTORIES[name]()
    am = _apply(case, target_modules=case.targets[:1])
    (site,) = pi.adapter_sites(am)
    assert (site.module_path, site.op, site.rank) == (case.targets[0], op, 2)


def test_ia3_feedforward_site_counts_the_reissued_op():
    case = zoo.mlp()
    am = peftc.apply(case.model, {"peft_type": "IA3", "target_modules": ["lin0", "lin1"],
                                  "feedforward_modules": ["lin1"]}, example_inputs=case.inputs)
    sites = {s.module_path: s for s in pi.adapter_sites(am)}
    assert {p: (s.method, s.op, s.rank) for p, s in sites.items()} == {
        "lin0": ("IA3", "aten.linear", None), "lin1": ("IA3", "aten.linear", None)}
    assert list(sites["lin1"].params) == ["base_model.model.lin1.ia3_l.default"]
    base = capture(case.model, case.inputs, {}, False)
    assert pi.graph_diff(base, am).unexplained == {}


@pytest.mark.parametrize("ext", ["png", "svg"])
def test_draw_site_writes_a_picture(mlp, tmp_path, ext: str):
    _, am = mlp
    path = tmp_path / f"lin1.{ext}"
    sub = pi.draw_site(am, "lin1", path)
    assert len(sub.nodes) == 4
    data = path.read_bytes()
    if ext == "png":
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    else:
        text = data.decode()
        assert "<svg" in text
        for label in ("lora_A.default.weight", "lora_B.default.weight", "base_layer.weight", "base op", "inserted"):
            assert label in text, label


def test_draw_site_refuses_other_formats(mlp, tmp_path):
    _, am = mlp
    with pytest.raises(ValueError, match="png or .svg"):
        pi.draw_site(am, "lin1", tmp_path / "lin1.jpg")
    assert not (tmp_path / "lin1.jpg").exists()
