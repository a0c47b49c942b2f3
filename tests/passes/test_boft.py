"""BOFT against PEFT: outputs, gradients (with boft_dropout's seeded draws), checkpoints, nodes, folding."""

from __future__ import annotations

from pathlib import Path

import peft
import peft.tuners.boft.layer
import pytest
import torch
import torch.nn as nn

import peftc
from peftc.capture import STATE
from peftc.errors import ConfigError
from peftc.graph import ADAPTER, adapter_nodes
from tests import oracle, zoo
from tests.passes.test_oft import check_against_peft, check_bf16, check_two_adapters

aten = torch.ops.aten

pytestmark = [
    pytest.mark.filterwarnings("ignore:Failed to load the CUDA extension:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting boft_n_butterfly_factor to 1:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
]

# (zoo model, target_modules or None for the case's own, config, checks beyond eval and folding); one
# transformers model, with every check (each costs a capture); boft_dropout is checked in train steps
CASES = {
    "bert-block4": ("bert", ["query", "value", "dense"], {"boft_block_size": 4}, ("checkpoints", "train")),
    "mlp-blocknum2-dropout": ("mlp", None, {"boft_block_num": 2, "boft_block_size": 0, "boft_dropout": 0.5},
                              ("checkpoints", "train")),
    "cnn-block4-dropout": ("cnn", ["conv1", "head"], {"boft_block_size": 4, "boft_dropout": 0.3},
                           ("checkpoints", "train")),
}


def boft_dict(targets: list[str], **extra) -> dict:
    return {"peft_type": "BOFT", "target_modules": targets, **extra}


@pytest.mark.parametrize("case_id", list(CASES))
def test_matches_peft(case_id: str, tmp_path: Path):
    name, targets, extra, checks = CASES[case_id]
    targets = targets or zoo.FACTORIES[name]().targets
    check_against_peft(name, boft_dict(targets, **extra), peft.BOFTConfig(target_modules=targets, **extra), checks,
                       tmp_path)



@pytest.mark.parametrize("name, targets", [("mlp", ["lin0", "lin1"]), ("cnn", ["conv1", "head"])])
def test_two_adapters_stack_and_mix_like_peft(name: str, targets: list[str]):
    check_two_adapters(name, boft_dict(targets, boft_block_size=4),
                       peft.BOFTConfig(target_modules=targets, boft_block_size=4))



@pytest.mark.parametrize("name, targets", [("mlp", ["lin0", "lin1"]), ("cnn", ["conv1", "head"])])
def test_bf16_base_matches_peft(name: str, targets: list[str]):
    # PEFT rotates a Linear's bf16 input with R cast to bf16 and convolves in fp32; peftc rotates the weight in
    # fp32 and runs the layer in bf16: the same up to bf16 rounding
    check_bf16(name, boft_dict(targets, boft_block_size=4), peft.BOFTConfig(target_modules=targets, boft_block_size=4),
               {"atol": 1e-2, "rtol": 1e-2})

def _graph(case: zoo.Case, targets: list[str], training: bool = False, **extra) -> torch.fx.Graph:
    model = case.model.train(training)
    am = peftc.apply(model, boft_dict(targets, init_weights=False, **extra), example_inputs=case.inputs)
    return am.graphs[0].gm.graph


@pytest.mark.parametrize("name, target, op", [("mlp", "lin0", aten.linear.default),
                                               ("cnn", "conv1", aten.conv2d.default)])
def test_site_reruns_its_op_with_the_rotated_scaled_weight(name: str, target: str, op):
    graph = _graph(zoo.FACTORIES[name](), [target], boft_block_size=4)
    prefix = f"base_model.model.{target}"
    state = {n.meta[STATE]: n for n in graph.find_nodes(op="placeholder") if STATE in n.meta}
    (new,) = [n for n in graph.nodes if n.target == op and n.users and ADAPTER in n.meta]
    assert new.meta[ADAPTER] == (target, "default", "BOFT")
    base_weight = state[f"{prefix}.base_layer.weight"]
    assert not [n for n in graph.nodes if n.target == op and n.args[1] is base_weight and n.users]  # none unrotated
    assert new.args[2] is state[f"{prefix}.base_layer.bias"]  # the layer's own bias
    weight = new.args[1]
    assert weight.target == aten.view_as.default and weight.args[1] is base_weight
    rotated, scale = weight.args[0].args  # s * (W R^T): the rotated rows times the scale as (out, 1)
    assert scale.target == aten.unsqueeze.default and rotated.target == aten.flatten.using_ints
    reads = {fqn for fqn, n in state.items() if any(u.meta.get(ADAPTER, ("",))[0] == target for u in n.users)}
    assert reads == {f"{prefix}.base_layer.weight", f"{prefix}.base_layer.bias", f"{prefix}.boft_R.default",
                     f"{prefix}.boft_s.default"}
    assert sum(n.target == aten.linalg_solve.default for n in adapter_nodes(graph)) == 1  # exact Cayley


def test_dropout_draws_only_in_the_train_graph():
    random = (aten.randint.low, aten.randperm.default)
    eval_ops = [n.target for n in adapter_nodes(_graph(zoo.mlp(), ["lin0"], boft_dropout=0.5))]
    train_ops = [n.target for n in adapter_nodes(_graph(zoo.mlp(), ["lin0"], training=True, boft_dropout=0.5))]
    assert not any(t in random for t in eval_ops)
    assert [t for t in train_ops if t in random] == list(random)  # PEFT's order: randint, then randperm


@pytest.mark.parametrize("extra, message", [
    ({"boft_n_butterfly_factor": 2, "boft_block_size": 3}, "blocks of size 3 must both be even"),
    ({"boft_n_butterfly_factor": 0}, "boft_n_butterfly_factor must be a positive integer"),
    ({"boft_block_num": 2}, "exactly one of boft_block_size"),
    ({"boft_block_size": 5}, "boft_block_size=5 does not divide the 12 input features of 'lin0'"),
    ({"bias": "some"}, "bias='some' must be 'none', 'all' or '<method>_only'"),
])
def test_bad_configs(extra: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        peftc.apply(zoo.mlp().model, boft_dict(["lin0"], **extra), example_inputs=zoo.mlp().inputs)


def test_grouped_conv_is_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 1, groups=2))
    with pytest.raises(ConfigError, match="groups=1"):
        peftc.apply(model, boft_dict(["0"], boft_block_size=2), example_inputs=(torch.randn(2, 4, 3, 3),))


class _BlockDiagInTorch:
    """PEFT's fbd_cuda extension (block-diagonal matrices of a (N, D, H, H) batch, and its backward) in plain
    torch: with it PEFT computes butterfly factors > 1 on the CPU instead of silently using one."""

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    @staticmethod
    def backward(grad: torch.Tensor, blocks: torch.Tensor) -> list[torch.Tensor]:
        n, d, h, _ = blocks.shape
        return [torch.stack([torch.stack([g[i * h:(i + 1) * h, i * h:(i + 1) * h] for i in range(d)]) for g in grad])]


@pytest.mark.parametrize("extra", [{"boft_n_butterfly_factor": 2, "target_modules": ["lin0", "lin1"]},
                                   {"boft_n_butterfly_factor": 3, "target_modules": ["lin1"], "boft_dropout": 0.3},
                                   {"boft_n_butterfly_factor": 2, "boft_block_size": 0, "boft_block_num": 6,
                                    "target_modules": ["lin0"], "init_weights": False}],
                         ids=["two", "three-dropout", "block_num"])
def test_butterfly_factors_match_peft(extra: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(peft.tuners.boft.layer, "get_fbd_cuda", lambda: _BlockDiagInTorch)
    fields = {"boft_block_size": 2, **extra}
    pair = oracle.check_method("mlp", {"peft_type": "BOFT", **fields}, peft.BOFTConfig(**fields), tmp_path)
    oracle.check_fold(pair)
    factors = extra["boft_n_butterfly_factor"]
    assert all(t.shape[0] == factors for n, t in pair.am.state_dict().items() if ".boft_R." in n)
