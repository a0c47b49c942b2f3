"""LoRA's `target_parameters` against PEFT's ParamWrapper: adapters on raw parameters (2-D weights and
3-D expert stacks used by einsum / bmm / matmul), rebound inside their module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import torch.nn as nn
from peftc.passes.lora_params import ParamAdapter
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import peftc
from peftc.capture import STATE
from peftc.errors import ConfigError, TargetError
from peftc.graph import adapter_nodes
from tests import zoo
from tests.oracle import MethodPair, check_checkpoints, check_eval, check_fold, check_train, make_pair

pytestmark = pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning")


class Experts(nn.Module):
    """An MoE-style block: parameters read by functional ops, not by Linear modules."""

    def __init__(self, is_transposed: bool = False) -> None:
        super().__init__()
        self.is_transposed = is_transposed
        shape = (3, 8, 12) if is_transposed else (3, 12, 8)  # (E, in, out) when transposed, else (E, out, in)
        self.gate_up_proj = nn.Parameter(torch.randn(shape) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(3, 6, 8) * 0.3)
        self.w2d = nn.Parameter(torch.randn(5, 8) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = "bd,edf->ebf" if self.is_transposed else "bd,efd->ebf"
        h = torch.einsum(spec, x, self.gate_up_proj)[..., :6]
        return torch.bmm(torch.relu(h), self.down_proj).sum(0) + (x @ self.w2d.T).sum(1, keepdim=True)


class MoE(nn.Module):
    def __init__(self, is_transposed: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.experts = Experts(is_transposed)
        self.tied = self.experts.w2d  # the same parameter, used outside `experts` too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a use of w2d outside its module: PEFT's ParamWrapper adapts it only inside `experts`
        return self.experts(self.lin(x)) + self.tied.sum()


def moe(is_transposed: bool = False) -> zoo.Case:
    torch.manual_seed(0)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    return zoo.Case("moe", MoE(is_transposed).eval(), (x,), [], False)


def qwen3_moe() -> zoo.Case:
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=zoo.VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                         num_experts_per_tok=2, max_position_embeddings=64, head_dim=8)
    return zoo.Case("qwen3_moe", Qwen3MoeForCausalLM(cfg).eval(), {"input_ids": zoo._ids()}, [], True)


TARGETS = ["experts.gate_up_proj", "experts.down_proj", "w2d"]


def pair_of(monkeypatch: pytest.MonkeyPatch, case: Any, targets: list[str], **extra: Any) -> MethodPair:
    monkeypatch.setitem(zoo.FACTORIES, case().name, case)
    fields = {"r": 2, "lora_alpha": 6, "target_modules": [], "target_parameters": targets, **extra}
    return make_pair(case().name, {"peft_type": "LORA", **fields}, peft.LoraConfig(**fields))


@pytest.mark.parametrize("transposed", [False, True])
def test_target_parameters_match_peft(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, transposed: bool):
    pair = pair_of(monkeypatch, lambda: moe(transposed), TARGETS)
    check_eval(pair)
    check_checkpoints(pair, tmp_path)
    check_train(pair)
    check_fold(pair)


def test_nested_keys_and_shapes_are_peft_s(monkeypatch: pytest.MonkeyPatch):
    pair = pair_of(monkeypatch, moe, TARGETS, init_lora_weights=True)
    ours = {k: tuple(v.shape) for k, v in pair.am.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in pair.pm.state_dict().items()}
    # registration order nests: gate_up_proj innermost, w2d outermost; lora_A (r·E, in), lora_B (out, r·E)
    assert ours["base_model.model.experts.base_layer.base_layer.lora_A.default.weight"] == (6, 8)
    assert ours["base_model.model.experts.base_layer.base_layer.lora_B.default.weight"] == (12, 6)
    assert ours["base_model.model.experts.lora_A.default.weight"] == (2, 8)
    assert "base_model.model.experts.base_layer.base_layer.base_layer.w2d" in ours
    # B starts at zero, as PEFT's: the fresh adapter is the base model
    fresh = peftc.apply(moe().model, {"peft_type": "LORA", "r": 2, "target_modules": [], "target_parameters": TARGETS},
                        example_inputs=moe().inputs)
    with torch.no_grad():
        torch.testing.assert_close(fresh(*moe().inputs), moe().model(*moe().inputs))


def test_graph_rebinds_uses_inside_the_module_only(monkeypatch: pytest.MonkeyPatch):
    pair = pair_of(monkeypatch, moe, ["w2d", "experts.gate_up_proj"])
    graph = pair.am.graph_for(*moe().inputs).gm.graph
    ops = [n.target for n in adapter_nodes(graph)]
    assert ops.count(torch.ops.aten.bmm.default) == 1 and ops.count(torch.ops.aten.mm.default) == 1  # 3-D, 2-D
    w2d = state(graph, "base_model.model.experts.base_layer.base_layer.w2d")
    users = sorted(n.target.__name__ for n in w2d.users)
    assert users == ["add.Tensor", "sum.default"]  # W + ΔW inside `experts`, the outside sum on the base tensor
    untouched = state(graph, "base_model.model.experts.base_layer.base_layer.down_proj")
    assert [u.target for u in untouched.users] == [torch.ops.aten.bmm.default]
    assert all(isinstance(ma, ParamAdapter) for mas in pair.am.targeted_modules.values() for ma in mas)
    # folded: no adapter nodes, the merged parameter is read instead
    folded = pair.am.fold()
    assert adapter_nodes(folded.graph_for(*moe().inputs).gm.graph) == []


def state(graph: torch.fx.Graph, fqn: str) -> torch.fx.Node:
    return next(n for n in graph.find_nodes(op="placeholder") if n.meta.get(STATE) == fqn)


def test_qwen3_moe_experts_match_peft(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    pair = pair_of(monkeypatch, qwen3_moe, ["experts.gate_up_proj", "experts.down_proj"])
    check_eval(pair)
    check_checkpoints(pair, tmp_path)
    check_fold(pair)


def test_refused_combinations(monkeypatch: pytest.MonkeyPatch):
    base = {"peft_type": "LORA", "r": 2, "target_modules": [], "target_parameters": TARGETS}
    for bad in ({"lora_dropout": 0.1}, {"use_dora": True}, {"lora_bias": True}, {"target_parameters": "w2d"}):
        with pytest.raises(ConfigError):
            peftc.apply(moe().model, {**base, **bad}, example_inputs=moe().inputs)
    with pytest.raises(TargetError, match="gate_up_prj"):
        peftc.apply(moe().model, {**base, "target_parameters": ["gate_up_prj"]}, example_inputs=moe().inputs)
    am = peftc.apply(moe().model, base, example_inputs=moe().inputs)
    with pytest.raises(ConfigError, match="same ones"):
        am.add_adapter("other", {**base, "target_parameters": ["w2d"]})
    am.add_adapter("second", base)
    with pytest.raises(ConfigError, match="mixed batches"):
        am(*moe().inputs, adapter_names=["default", "second", "default", "second"])
