"""LoKr against PEFT: factorisation, outputs, gradients, checkpoints, initialisation, dropouts, folding."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import peft
import peft.tuners.lokr.layer
import pytest
import torch
import torch.nn as nn
from peftc.passes.lokr import LoKr, LoKrConfig, factorization

from peftc.config import load_config
from peftc.errors import ConfigError
from peftc.graph import ADAPTER, adapter_nodes
from tests import oracle, zoo
from tests.passes.test_loha import check_config_fields, check_init, conv1d_in_zoo  # noqa: F401  (a fixture)

aten = torch.ops.aten

pytestmark = pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning")


def lokr(targets: list[str], **extra) -> tuple[dict, peft.LoKrConfig]:
    """The same config for peftc (a dict, as a user writes it) and for PEFT."""
    return {"peft_type": "LOKR", "target_modules": targets, **extra}, peft.LoKrConfig(target_modules=targets, **extra)


def test_factorization_is_peft_s():
    for dim in range(1, 130):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 200):
            assert factorization(dim, factor) == peft.tuners.lokr.layer.factorization(dim, factor), (dim, factor)


def _parameter_names(pair: oracle.MethodPair) -> dict[str, set[str]]:
    return {path: {group for group, _ in ma.tensors if group.startswith("lokr_w") or group == "lokr_t2"}
            for path, (ma,) in pair.am.targeted_modules.items()}


def test_llama_decompose_both_with_rank_and_alpha_patterns_matches_peft(tmp_path: Path):
    # hidden 32 = 4*8, kv 16 = 4*4, intermediate 48 = 6*8: r=1 decomposes both factors everywhere
    # (decompose_both), r=4 at v_proj keeps both factors full (4 >= max(4, 8) / 2)
    config = lokr(["q_proj", "v_proj", "down_proj"], r=1, alpha=3, decompose_both=True,
                  rank_pattern={"v_proj": 4}, alpha_pattern={"down_proj": 2})
    names = _parameter_names(oracle.check_method("llama", *config, tmp_path))
    assert names["model.layers.0.self_attn.q_proj"] == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}
    assert names["model.layers.0.mlp.down_proj"] == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}
    assert names["model.layers.0.self_attn.v_proj"] == {"lokr_w1", "lokr_w2"}


def test_bert_decompose_factor_and_lycoris_init_matches_peft(tmp_path: Path):
    config = lokr(["query", "value", "dense"], r=2, alpha=4, decompose_factor=4, init_weights="lycoris")
    oracle.check_method("bert", *config, tmp_path)


def test_mlp_matches_peft(tmp_path: Path):
    # lin0 (24, 12) = (4*6, 3*4): r=2 < 3 decomposes W2; lin1 (8, 24) = (2*4, 4*6): r=3 keeps it full
    names = _parameter_names(oracle.check_method("mlp", *lokr(["lin0", "lin1"], r=2, alpha=5, rank_pattern={"lin1": 3}),
                                       tmp_path))
    assert names == {"lin0": {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}, "lin1": {"lokr_w1", "lokr_w2"}}


@pytest.fixture
def peft_kron_of_strided_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT 0.21.2's forward fails on a Conv1d with use_effective_conv2d (see
    test_peft_fails_on_a_conv1d_cp_core); give its Kronecker product a standard-strided W2, as peftc does."""
    original = peft.tuners.lokr.layer.make_kron

    def make_kron(w1: torch.Tensor, w2: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return original(w1, w2.clone(memory_format=torch.contiguous_format), scale)

    monkeypatch.setattr(peft.tuners.lokr.layer, "make_kron", make_kron)


def test_peft_fails_on_a_conv1d_cp_core():
    # why peft_kron_of_strided_cores exists: once this fails, PEFT fixed it and the patch can go
    case = zoo.FACTORIES["conv1d_net"]()
    pm = peft.get_peft_model(case.model, lokr(["conv0"], r=1, use_effective_conv2d=True)[1])
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        case.call(pm)


@pytest.mark.usefixtures("peft_kron_of_strided_cores")
@pytest.mark.parametrize("effective", [False, True])
@pytest.mark.parametrize("name", ["cnn", "conv1d_net"])
def test_conv_matches_peft(name: str, effective: bool, tmp_path: Path):
    targets = zoo.FACTORIES[name]().targets
    # r=1: W2 decomposed at every conv (a CP core with effective); r=2 at conv1d_net.conv1 (6, 3, 3) =
    # (2*3, 1*3, 3) keeps W2 full, a 3-d W2 whose Kronecker product PEFT reshapes as is
    oracle.check_method(name, *lokr(targets, r=1, alpha=2, use_effective_conv2d=effective, rank_pattern={"conv1": 2}),
              tmp_path)


def test_effective_conv_nodes():
    pair = oracle.make_pair("cnn", *lokr(["conv0", "head"], r=1, alpha=2, use_effective_conv2d=True))
    per_site: dict[str, Counter] = {}
    for node in adapter_nodes(pair.am.graphs[0].gm.graph):
        per_site.setdefault(node.meta[ADAPTER][0], Counter())[node.target] += 1
    # conv0: W2 from the CP core, W1 given two unit kernel dims, their Kronecker product, scaled, reshaped
    assert per_site["conv0"] == Counter({
        aten.einsum.default: 1, aten.clone.default: 1, aten.unsqueeze.default: 2, aten.kron.default: 1,
        aten.mul.Tensor: 1, aten.reshape.default: 1, aten.conv2d.default: 1, aten.add.Tensor: 1})
    assert per_site["head"] == Counter({
        aten.mm.default: 1, aten.clone.default: 1, aten.kron.default: 1, aten.mul.Tensor: 1,
        aten.reshape.default: 1, aten.linear.default: 1, aten.add.Tensor: 1})


@pytest.mark.parametrize("scale", [False, True])
def test_rank_dropout_matches_peft(scale: bool):
    config = lokr(["lin0", "lin1"], r=2, alpha=4, rank_dropout=0.3, rank_dropout_scale=scale)
    oracle.check_train(oracle.make_pair("mlp", *config))


@pytest.mark.usefixtures("peft_kron_of_strided_cores")
@pytest.mark.parametrize(("name", "extra"), [
    ("mlp", {"decompose_both": True}),
    ("cnn", {"use_effective_conv2d": True}),
    ("conv1d_net", {"use_effective_conv2d": True, "rank_pattern": {"conv1": 2}}),  # conv1: a 3-d W2
])
def test_fold_gives_the_graph_s_outputs_and_peft_s_merge(name: str, extra: dict):
    targets = zoo.FACTORIES[name]().targets
    oracle.check_fold(oracle.make_pair(name, *lokr(targets, r=1, alpha=3, **extra)))


@pytest.mark.parametrize("init_weights", [True, False, "lycoris"])
@pytest.mark.parametrize(("layer", "extra"), [
    (nn.Linear(12, 24), {"r": 1, "decompose_both": True}),
    (nn.Linear(12, 24), {"r": 4}),
    (nn.Conv2d(8, 6, 3, groups=2), {"r": 1, "use_effective_conv2d": True}),
    (nn.Conv2d(8, 6, 3), {"r": 1}),
    (nn.Conv1d(4, 6, 3), {"r": 1, "use_effective_conv2d": True, "decompose_factor": 2}),
], ids=["linear-both", "linear-full-w2", "conv2d-effective", "conv2d", "conv1d-effective"])
def test_init_draws_what_peft_draws(layer: nn.Module, extra: dict, init_weights: bool | str):
    check_init(LoKr(), layer, peft.LoKrConfig(target_modules=["x"], alpha=5, init_weights=init_weights, **extra),
               peft.tuners.lokr.layer)


def test_config_has_peft_s_fields_and_defaults():
    check_config_fields("LOKR", LoKrConfig, peft.LoKrConfig)
    with pytest.raises(ConfigError, match="init_weights"):
        load_config({"peft_type": "LOKR", "target_modules": ["q"], "init_weights": "gaussian"})

