"""The LoRA pass, checked structurally: which nodes it inserts, where, and with what inputs."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn as nn
from torch.testing import FileCheck

import peftc
from peftc.capture import STATE, USER
from peftc.graph import ADAPTER, adapter_nodes
from tests import oracle, zoo

aten = torch.ops.aten


def _lora(case: zoo.Case, **extra) -> peftc.AdaptedModel:
    config = {"peft_type": "LORA", "r": 2, "target_modules": case.targets, "init_lora_weights": False, **extra}
    return peftc.apply(case.model, config, example_inputs=None if case.transformers else case.inputs)


def _count(graph: torch.fx.Graph, target) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_function" and n.target == target)


def _base_graph(case: zoo.Case, training: bool) -> torch.fx.Graph:
    from peftc.capture import capture

    args, kwargs = ((), case.inputs) if isinstance(case.inputs, dict) else (case.inputs, {})
    if case.transformers:
        kwargs = {**kwargs, "use_cache": False} if case.name in ("llama", "gpt2") else kwargs
    return capture(case.model, args, kwargs, training).gm.graph


@pytest.fixture(scope="module")
def mlp_eval():
    case = zoo.mlp()
    return case, _lora(case)


def test_linear_site_gets_two_linears_a_mul_and_an_add(mlp_eval):
    case, am = mlp_eval
    graph = am.graphs[0].gm.graph
    base = _base_graph(case, training=False)
    # two adapted linears -> two more linears each, one mul and one add each
    assert _count(graph, aten.linear.default) == _count(base, aten.linear.default) + 4
    assert _count(graph, aten.mul.Tensor) == _count(base, aten.mul.Tensor) + 2
    assert _count(graph, aten.add.Tensor) == _count(base, aten.add.Tensor) + 2
    assert len(adapter_nodes(graph)) == 8
    # nodes are tagged with their site and adapter
    assert {n.meta[ADAPTER] for n in adapter_nodes(graph)} == {("lin0", "default", "LORA"), ("lin1", "default", "LORA")}


def test_inserted_subgraph_reads_the_site_input_and_replaces_its_output(mlp_eval):
    _, am = mlp_eval
    graph = am.graphs[0].gm.graph
    base_linear = next(n for n in graph.nodes if n.target == aten.linear.default and "lin0" in n.args[1].meta[STATE])
    add = next(n for n in adapter_nodes(graph) if n.target == aten.add.Tensor and n.meta[ADAPTER][0] == "lin0")
    assert add.args[0] is base_linear
    # every consumer of the base output now reads the adapted output instead
    assert {u for u in base_linear.users} == {add}
    lora_a = next(n for n in adapter_nodes(graph) if n.target == aten.linear.default and n.meta[ADAPTER][0] == "lin0"
                  and n.args[0] is base_linear.args[0])
    assert lora_a.args[1].meta[STATE] == "base_model.model.lin0.lora_A.default.weight"
    # provenance survives: inserted nodes carry the site's module stack
    assert list(add.meta["nn_module_stack"].values())[-1][0] == "lin0"


def test_scale_is_a_graph_input_not_a_constant(mlp_eval):
    _, am = mlp_eval
    graph = am.graphs[0].gm.graph
    muls = [n for n in adapter_nodes(graph) if n.target == aten.mul.Tensor]
    assert all(m.args[1].op == "placeholder" and "lora_scaling" in m.args[1].meta[STATE] for m in muls)
    # and changing it changes the output without a new capture
    x = zoo.mlp().inputs[0]
    am.eval()
    before = am(x)
    for fqn, t in am.named_buffers():
        if "lora_scaling" in fqn:
            t.mul_(0)
    torch.testing.assert_close(am(x), am.get_base_model()(x))
    assert len(am.graphs) == 1
    assert not torch.equal(before, am(x))


def test_dropout_is_inserted_only_in_the_train_graph():
    case = zoo.mlp()
    am = _lora(case, lora_dropout=0.25)
    am.eval()
    am(*case.inputs)
    am.train()
    am(*case.inputs)
    graphs = {g.training: g.gm.graph for g in am.graphs}
    drops = {mode: [n for n in adapter_nodes(g) if n.target == aten.dropout.default] for mode, g in graphs.items()}
    assert drops[False] == []
    assert len(drops[True]) == 2 and all(n.args[1:] == (0.25, True) for n in drops[True])


def test_conv1d_site_is_the_addmm_and_lora_reads_its_2d_input():
    case = zoo.gpt2()
    am = _lora(case)
    graph = am.graphs[0].gm.graph
    addmms = [n for n in graph.nodes if n.target == aten.addmm.default and ".c_attn." in n.args[2].meta[STATE]]
    assert len(addmms) == 2  # one per layer
    for addmm in addmms:
        (add,) = addmm.users
        assert add.target == aten.add.Tensor and ADAPTER in add.meta
        lora_a = next(n for n in adapter_nodes(graph) if n.target == aten.linear.default and n.args[0] is addmm.args[1])
        assert lora_a.meta[ADAPTER][0] == addmm.args[2].meta[STATE].removeprefix("base_model.model.").rsplit(".", 2)[0]


def test_embedding_site_uses_a_transposed_embedding_lookup():
    case = zoo.embedding_model()
    am = _lora(case)
    graph = am.graphs[0].gm.graph
    lookups = [n for n in adapter_nodes(graph) if n.target == aten.embedding.default]
    (lookup,) = lookups
    base = next(n for n in graph.nodes if n.target == aten.embedding.default and ADAPTER not in n.meta)
    assert lookup.args[1] is base.args[1]  # the same token ids
    assert lookup.args[2:] == base.args[2:]  # same padding_idx as the base lookup
    assert lookup.args[0].target == aten.t.default
    assert lookup.args[0].args[0].meta[STATE] == "base_model.model.emb.lora_embedding_A.default"


def test_conv2d_site_gets_conv_a_with_base_geometry_and_1x1_conv_b():
    case = zoo.cnn()
    am = _lora(case)
    graph = am.graphs[0].gm.graph
    convs = [n for n in adapter_nodes(graph) if n.target == aten.conv2d.default and n.meta[ADAPTER][0] == "conv1"]
    conv_a, conv_b = convs
    assert conv_a.args[3:5] == ([2, 2], [0, 0])  # conv1 has stride 2, no padding
    assert conv_b.args[0] is conv_a and conv_b.args[3:5] == ([1, 1], [0, 0])
    FileCheck().check_count("torch.ops.aten.conv2d.default", 6, exactly=True).run(am.graphs[0].gm.code)


def test_tied_weight_keeps_its_other_use_unadapted():
    # tiny llama config with tied embeddings: lm_head adapted, the input embedding is not
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    am = peftc.apply(model, {"peft_type": "LORA", "r": 2, "target_modules": ["lm_head"], "init_lora_weights": False})
    graph = am.graphs[0].gm.graph
    (embedding,) = [n for n in graph.nodes if n.target == aten.embedding.default]
    assert all(ADAPTER not in u.meta for u in embedding.users)
    assert {n.meta[ADAPTER][0] for n in adapter_nodes(graph)} == {"lm_head"}
    sd = am.state_dict()
    assert sd["base_model.model.lm_head.base_layer.weight"].data_ptr() == \
        sd["base_model.model.model.embed_tokens.weight"].data_ptr()


def test_user_inputs_stay_last_and_in_order(mlp_eval):
    _, am = mlp_eval
    placeholders = list(am.graphs[0].gm.graph.find_nodes(op="placeholder"))
    kinds = [USER in p.meta for p in placeholders]
    assert kinds == sorted(kinds)  # state first, then user inputs


def test_bf16_base_keeps_fp32_adapters_and_casts_the_delta_back():
    case = zoo.mlp()
    model = case.model.to(torch.bfloat16)
    am = peftc.apply(model, {"peft_type": "LORA", "r": 2, "target_modules": ["lin0"], "init_lora_weights": False},
                     example_inputs=(case.inputs[0].bfloat16(),))
    am.eval()
    y = am(case.inputs[0].bfloat16())
    assert y.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for _, p in am.adapter_parameters())
    casts = [n for n in adapter_nodes(am.graphs[0].gm.graph) if n.target == aten.to.dtype]
    assert [c.args[1] for c in casts] == [torch.float32, torch.bfloat16]  # x in, delta out


class DepthwiseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, groups=8, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dw(x).mean(dim=(2, 3)))


@pytest.mark.parametrize(("model", "inputs", "targets", "r"), [
    (zoo.MLP, (torch.randn(4, 12),), ["lin0", "lin1"], 30),  # lin1 is 24 -> 8
    (zoo.CNN, (torch.randn(2, 3, 10, 10),), ["conv0"], 30),  # 27 inputs
    (zoo.EmbeddingModel, (torch.randint(1, zoo.VOCAB, (4, 6)),), ["emb"], 20),  # 16 dims
    (DepthwiseNet, (torch.randn(2, 8, 6, 6),), ["dw"], 32),  # 9 inputs per group; r divisible by groups=8
])
def test_rank_above_the_layer_size_is_valid_as_in_peft(model, inputs, targets, r):
    """PEFT's own custom-model tests use r above a layer's dimensions; PEFT accepts it, so peftc does too."""
    fields = {"r": r, "lora_alpha": 8, "target_modules": targets, "init_lora_weights": False}
    torch.manual_seed(0)
    base = model().eval()
    ref = copy.deepcopy(base)
    am = peftc.apply(base, {"peft_type": "LORA", **fields}, example_inputs=inputs)
    oracle.randomize_adapters(am)
    pm = peft.get_peft_model(ref, peft.LoraConfig(**fields))
    pm.load_state_dict(am.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(am(*inputs), pm(*inputs), **oracle.TOL)
        assert not torch.allclose(am(*inputs), base(*inputs))


@pytest.mark.parametrize("name", ["conv1d_seq", "conv3d_net"])
@pytest.mark.parametrize("extra", [{}, {"use_dora": True}, {"lora_bias": True}], ids=["lora", "dora", "lora_bias"])
def test_conv1d_and_conv3d_match_peft(name: str, extra: dict, tmp_path):
    """nn.Conv1d / nn.Conv3d (PEFT's lora.Conv1d / Conv3d: lora_A the base kernel, stride and padding; lora_B
    pointwise): outputs, gradients, checkpoints both ways and fold against PEFT; a padded, a strided and a
    pointwise conv."""
    fields = {"r": 2, "lora_alpha": 6, "lora_dropout": 0.1, "target_modules": ["conv0", "conv2"], **extra}
    pair = oracle.check_method(name, {"peft_type": "LORA", **fields}, peft.LoraConfig(**fields), tmp_path)
    if name == "conv1d_seq":
        oracle.check_fold(pair)
    else:  # PEFT 0.21.2 cannot merge a pointwise Conv3d (it takes the 1x1 Conv2d shortcut and fails); the fold
        # is checked against peftc's unmerged outputs instead
        with torch.no_grad():
            torch.testing.assert_close(pair.case.call(pair.am.fold()), pair.case.call(pair.am), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["conv1d_seq", "conv3d_net"])
def test_grouped_conv1d_and_conv3d_match_peft_unmerged(name: str, tmp_path):
    fields = {"r": 2, "lora_alpha": 6, "target_modules": ["conv1"]}  # groups=2, stride 2
    pair = oracle.check_method(name, {"peft_type": "LORA", **fields}, peft.LoraConfig(**fields), tmp_path)
    with pytest.raises(peftc.ConfigError, match="groups=2"):  # not a grouped kernel: PEFT warns it cannot merge
        pair.am.merged_tensors()


@pytest.mark.parametrize("name", ["conv1d_seq", "cnn_grouped", "conv3d_net"])
def test_dora_on_grouped_convs_matches_peft(name: str, tmp_path, monkeypatch: pytest.MonkeyPatch):
    """DoRA on a grouped conv: PEFT's norm of W + s·BA (its B·A of a grouped B, reshaped to W's shape)."""
    monkeypatch.setitem(zoo.FACTORIES, "cnn_grouped", cnn_grouped)
    fields = {"r": 4, "lora_alpha": 6, "target_modules": ["conv1"], "use_dora": True}
    pair = oracle.check_method(name, {"peft_type": "LORA", **fields}, peft.LoraConfig(**fields), tmp_path)
    with pytest.raises(peftc.ConfigError, match="groups=2"):
        pair.am.merged_tensors()


def cnn_grouped() -> zoo.Case:
    """A Conv2d with groups=2 (the Conv1d/Conv3d zoo models have theirs)."""
    case = zoo.cnn()
    torch.manual_seed(0)
    case.model.conv1 = nn.Conv2d(8, 8, 3, stride=2, groups=2)
    return zoo.Case("cnn_grouped", case.model, case.inputs, ["conv1"], False)
