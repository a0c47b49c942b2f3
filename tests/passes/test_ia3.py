"""(IA)^3 against PEFT: outputs, gradients, checkpoints, the inserted nodes, and folding."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import peft
import pytest
import torch
import torch.nn as nn
from peftc.passes.ia3 import IA3

import peftc
from peftc.capture import STATE
from peftc.graph import ADAPTER, adapter_nodes
from peftc.sites import module_path, sites_by_module
from tests import oracle, zoo

aten = torch.ops.aten

pytestmark = [
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
]

# zoo model -> (target_modules, feedforward_modules): every layer kind, with and without feed-forward
CASES = {
    "llama": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "c_fc"], ["c_fc"]),
    "bert": (["query", "value", "intermediate.dense", "output.dense"], ["output.dense"]),
    "mlp": (["lin0", "lin1"], ["lin1"]),
    "cnn": (["conv0", "conv1", "head"], ["conv1"]),
}


def ia3_dict(targets: list[str], ff: list[str], **extra) -> dict:
    return {"peft_type": "IA3", "target_modules": targets, "feedforward_modules": ff, **extra}


def peft_config(targets: list[str], ff: list[str], **extra) -> peft.IA3Config:
    return peft.IA3Config(target_modules=targets, feedforward_modules=ff, **extra)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_peft(name: str, tmp_path: Path):
    targets, ff = CASES[name]
    # oracle.check_method's checks, with the checkpoints before the train step: training moves the CNN's
    # BatchNorm statistics, which adapter checkpoints do not carry into the fresh models they load into
    pair = oracle.make_pair(name, ia3_dict(targets, ff), peft_config(targets, ff))
    oracle.check_eval(pair)
    oracle.check_checkpoints(pair, tmp_path)
    oracle.check_train(pair)
    kinds = {path: mas[0].kind for path, mas in pair.am.targeted_modules.items()}
    assert any(k.endswith("_ff") for k in kinds.values()) and any(not k.endswith("_ff") for k in kinds.values())


@pytest.fixture(scope="module")
def cnn_pair() -> oracle.MethodPair:
    return oracle.make_pair("cnn", ia3_dict(*CASES["cnn"]), peft_config(*CASES["cnn"]))


@pytest.fixture(scope="module")
def gpt2_pair() -> oracle.MethodPair:
    return oracle.make_pair("gpt2", ia3_dict(*CASES["gpt2"]), peft_config(*CASES["gpt2"]))


def _per_site(graph: torch.fx.Graph) -> dict[str, Counter]:
    counts: dict[str, Counter] = {}
    for node in adapter_nodes(graph):
        counts.setdefault(node.meta[ADAPTER][0], Counter())[node.target] += 1
    return counts


def test_inserted_nodes_per_site(cnn_pair: oracle.MethodPair, gpt2_pair: oracle.MethodPair):
    cnn = _per_site(cnn_pair.am.graphs[0].gm.graph)
    assert cnn["conv0"] == Counter({aten.mul.Tensor: 1})  # output scale: y * l (1, C, 1, 1)
    assert cnn["conv1"] == Counter({aten.mul.Tensor: 1, aten.conv2d.default: 1})  # the conv again on x * l
    assert cnn["head"] == Counter({aten.reshape.default: 1, aten.mul.Tensor: 1})  # (out, 1) -> (out,)
    gpt2 = _per_site(gpt2_pair.am.graphs[0].gm.graph)
    assert set(gpt2) == {f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc")}
    for path, counts in gpt2.items():
        if path.endswith("c_fc"):
            assert counts == Counter({aten.reshape.default: 1, aten.mul.Tensor: 1, aten.addmm.default: 1})
        else:
            assert counts == Counter({aten.reshape.default: 1, aten.mul.Tensor: 1})


def test_feedforward_site_recomputes_the_op_on_the_scaled_input(gpt2_pair: oracle.MethodPair):
    graph = gpt2_pair.am.graphs[0].gm.graph
    path = "transformer.h.0.mlp.c_fc"
    at_c_fc = [n for n in graph.find_nodes(op="call_function", target=aten.addmm.default) if module_path(n) == path]
    (node,) = at_c_fc  # the unscaled op is gone: only the recomputed one remains
    assert ADAPTER in node.meta
    mul = node.args[1]  # addmm(bias, x * ia3_l, W): same bias and weight, input scaled
    assert mul.target == aten.mul.Tensor and ADAPTER in mul.meta
    assert mul.args[1].args[0].meta[STATE].endswith("c_fc.ia3_l.default")
    assert node.args[2].meta[STATE].endswith("c_fc.base_layer.weight")
    assert sites_by_module(graph).get(path) is None  # inserted ops are not sites


@pytest.mark.parametrize("pair_name", ["cnn_pair", "gpt2_pair"])
def test_fold_matches_the_unfolded_adapter_and_peft_merge(pair_name: str, request: pytest.FixtureRequest):
    folded = oracle.check_fold(request.getfixturevalue(pair_name))
    for path, tensors in folded.items():
        ff = path.endswith(("conv1", "c_fc"))
        assert set(tensors) == ({"weight"} if ff else {"weight", "bias"})  # an output scale scales the bias too


class Conv3dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv3d(4, 6, 3, padding=1, groups=2)
        self.point = nn.Conv3d(6, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point(torch.relu(self.grouped(x)))


def test_grouped_conv3d_feedforward_matches_peft_and_folds():
    torch.manual_seed(0)
    model = Conv3dNet().eval()
    x = torch.randn(2, 4, 5, 5, 5)
    am = peftc.apply(copy.deepcopy(model), ia3_dict(["grouped", "point"], ["grouped"]), example_inputs=(x,))
    oracle.randomize_adapters(am)
    pm = peft.get_peft_model(copy.deepcopy(model), peft_config(["grouped", "point"], ["grouped"])).eval()
    assert pm.load_state_dict(am.state_dict(), strict=True).missing_keys == []
    with torch.no_grad():
        torch.testing.assert_close(am(x), pm(x), **oracle.TOL)
        merged = pm.merge_and_unload()
        for path, (ma,) in am.targeted_modules.items():
            module = model.get_submodule(path)
            out = ma.method.fold(ma.kind, ma.config, module, {k: t for k, (_, t) in ma.tensors.items()},
                                 {"weight": module.weight, "bias": module.bias})
            torch.testing.assert_close(out["weight"], merged.get_submodule(path).weight, atol=1e-6, rtol=1e-6)
            assert ("bias" in out) == (path == "point")


def test_bf16_base_matches_peft_with_fp32_vectors():
    targets, ff = CASES["mlp"]
    case, ref = zoo.mlp(), zoo.mlp()
    x = case.inputs[0].bfloat16()
    am = peftc.apply(case.model.bfloat16(), ia3_dict(targets, ff), example_inputs=(x,))
    oracle.randomize_adapters(am)
    pm = peft.get_peft_model(ref.model.bfloat16(), peft_config(targets, ff))
    pm.load_state_dict(am.state_dict(), strict=True)
    assert all(p.dtype == torch.float32 for _, p in am.adapter_parameters())
    with torch.no_grad():
        y = am(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, pm(x), atol=0, rtol=0)
    casts = [n.args[1] for n in adapter_nodes(am.graphs[0].gm.graph) if n.target == aten.to.dtype]
    assert casts == [torch.bfloat16, torch.bfloat16]  # each fp32 product back to the activation's dtype


def test_init_weights_are_ones_unless_disabled():
    case = zoo.mlp()
    am = peftc.apply(case.model, ia3_dict(*CASES["mlp"]), example_inputs=case.inputs)
    shapes = {fqn: tuple(p.shape) for fqn, p in am.adapter_parameters()}
    assert shapes == {"base_model.model.lin0.ia3_l.default": (24, 1), "base_model.model.lin1.ia3_l.default": (1, 24)}
    assert all(torch.equal(p, torch.ones_like(p)) for _, p in am.adapter_parameters())
    torch.testing.assert_close(am(*case.inputs), case.model(*case.inputs))
    torch.manual_seed(3)
    am = peftc.apply(zoo.mlp().model, ia3_dict(*CASES["mlp"], init_ia3_weights=False), example_inputs=case.inputs)
    torch.manual_seed(3)
    pm = peft.get_peft_model(zoo.mlp().model, peft_config(*CASES["mlp"], init_ia3_weights=False))
    ours, theirs = dict(am.adapter_parameters()), dict(pm.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in ours.items())  # same randn draws, in the same order
    assert not any(torch.equal(p, torch.ones_like(p)) for p in ours.values())


def test_config_errors():
    with pytest.raises(peftc.ConfigError, match="feedforward_modules"):
        peftc.load_config({"peft_type": "IA3", "target_modules": ["lin0"]})
    with pytest.raises(peftc.ConfigError, match=r"\['lin1'\] are not in target_modules"):
        peftc.load_config(ia3_dict(["lin0"], ["lin1"]))
    with pytest.raises(peftc.TargetError, match="IA3 cannot adapt it"):
        peftc.apply(zoo.embedding_model().model, ia3_dict(["emb"], []), example_inputs=zoo.embedding_model().inputs)


def test_feedforward_names_follow_peft_matching():
    # a list entry need only end the name (PEFT's rule, no '.' boundary); a string is a full regex
    method, lin = IA3(), nn.Linear(2, 2)
    config = peftc.load_config(ia3_dict(".*proj", ["up_proj"]))
    assert method.module_kind(config, "mlp.up_proj", lin) == "linear_ff"
    assert method.module_kind(config, "mlp.gate_up_proj", lin) == "linear_ff"
    assert method.module_kind(config, "mlp.down_proj", lin) == "linear"
    config = peftc.load_config(ia3_dict(".*proj", r"mlp\..*_proj"))
    assert method.module_kind(config, "mlp.down_proj", lin) == "linear_ff"
    assert method.module_kind(config, "attn.mlp.down_proj", lin) == "linear"


def test_two_active_adapters_multiply_as_in_peft():
    targets, ff = CASES["mlp"]
    case, ref = zoo.mlp(), zoo.mlp()
    am = peftc.apply(case.model, ia3_dict(targets, ff), example_inputs=case.inputs)
    am.add_adapter("other", ia3_dict(targets, ff))
    am.set_adapter(["default", "other"])
    oracle.randomize_adapters(am)
    pm = peft.get_peft_model(ref.model, peft_config(targets, ff))
    pm.add_adapter("other", peft_config(targets, ff))
    pm.base_model.set_adapter(["default", "other"])
    pm.load_state_dict(am.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(am(*case.inputs), pm(*case.inputs), **oracle.TOL)
    # at the feed-forward lin1 the second adapter scales the first one's scaled input, and one linear stays live
    graph = am.graphs[-1].gm.graph
    live = [n for n in graph.nodes if n.target == aten.linear.default and n.users and "lin1" in str(n.args[1])]
    (linear,) = live
    assert [n.meta[ADAPTER][1] for n in (linear, linear.args[0])] == ["other", "other"]
    assert linear.args[0].args[0].meta[ADAPTER][1] == "default"
