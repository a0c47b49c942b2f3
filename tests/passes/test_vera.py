"""VeRA against PEFT: outputs, gradients, checkpoints (with and without the projections), the shared
projections in the graph and the state dict, and folding."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import peftc
from peftc.capture import STATE
from peftc.graph import ADAPTER, adapter_nodes
from tests import oracle, zoo

aten = torch.ops.aten

pytestmark = [
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
    pytest.mark.filterwarnings("ignore:Specified to not (save|load) vera_A:UserWarning"),
]


def vera(targets: list[str], **extra) -> tuple[dict, peft.VeraConfig]:
    """The same config for peftc (a dict, as a user writes it) and for PEFT."""
    fields = {"r": 4, "target_modules": targets, **extra}
    return {"peft_type": "VERA", **fields}, peft.VeraConfig(**fields)


# targets of different shapes, so the projections are sliced differently per layer
CASES = {
    "llama": vera(["q_proj", "v_proj", "down_proj"], vera_dropout=0.1),
    "gpt2": vera(["c_attn", "c_fc"], projection_prng_key=7),
    "mlp": vera(["lin0", "lin1"], r=6, d_initial=0.5),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_peft(name: str, tmp_path: Path):
    oracle.check_method(name, *CASES[name], tmp_path)
    saved = load_file(tmp_path / "peftc" / "adapter_model.safetensors")
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(saved)


@pytest.fixture(scope="module")
def mlp_pair() -> oracle.MethodPair:
    return oracle.make_pair("mlp", *CASES["mlp"])


def test_projections_are_drawn_as_peft_draws_them(mlp_pair: oracle.MethodPair):
    # largest targets: lin0 (12 -> 24), lin1 (24 -> 8): A is (r, 24), B is (24, r)
    ours, theirs = mlp_pair.am.state_dict(), mlp_pair.pm.state_dict()
    assert ours["base_model.vera_A.default"].shape == (6, 24) and ours["base_model.vera_B.default"].shape == (24, 6)
    fresh = peft.get_peft_model(zoo.mlp().model, CASES["mlp"][1])  # not loaded from peftc: PEFT's own draw
    for key in ("base_model.vera_A.default", "base_model.vera_B.default"):
        assert torch.equal(ours[key], fresh.state_dict()[key]) and torch.equal(ours[key], theirs[key])


def test_projections_are_one_tensor_under_every_key(mlp_pair: oracle.MethodPair):
    am = mlp_pair.am
    sd = am.state_dict(keep_vars=True)
    for name in ("vera_A", "vera_B"):
        shared = sd[f"base_model.{name}.default"]
        assert all(sd[f"base_model.model.{m}.{name}.default"] is shared for m in ("lin0", "lin1"))
    # the graph reads each projection once, as one input, sliced per layer
    graph = am.graphs[0].gm.graph
    inputs = [n for n in graph.find_nodes(op="placeholder") if n.meta.get(STATE, "").startswith("base_model.vera_")]
    assert sorted(n.meta[STATE] for n in inputs) == ["base_model.vera_A.default", "base_model.vera_B.default"]
    slices = {(n.meta[ADAPTER][0], n.args[0].meta[STATE], n.args[1:]) for n in adapter_nodes(graph)
              if n.target == aten.slice.Tensor}
    assert slices == {
        ("lin0", "base_model.vera_A.default", (1, 0, 12)), ("lin0", "base_model.vera_B.default", (0, 0, 24)),
        ("lin1", "base_model.vera_A.default", (1, 0, 24)), ("lin1", "base_model.vera_B.default", (0, 0, 8)),
    }
    per_site = Counter(n.meta[ADAPTER][0] for n in adapter_nodes(graph))
    assert per_site == {"lin0": 7, "lin1": 7}  # 2 slices, 2 linears, 2 muls (lambda_d, lambda_b), 1 add


def test_fold_matches_the_unfolded_adapter_and_peft_merge(mlp_pair: oracle.MethodPair):
    folded = oracle.check_fold(mlp_pair)
    assert all(set(tensors) == {"weight"} for tensors in folded.values())


def test_fold_conv1d():
    folded = oracle.check_fold(oracle.make_pair("gpt2", *CASES["gpt2"]))
    assert folded["transformer.h.0.attn.c_attn"]["weight"].shape == (32, 96)  # Conv1D's (in, out) layout


def test_without_saved_projections_checkpoints_hold_only_the_vectors(tmp_path: Path):
    config, peft_config = vera(["lin0", "lin1"], save_projection=False)
    pair = oracle.make_pair("mlp", config, peft_config)
    assert not any(k.startswith("base_model.vera_") for k in pair.am.state_dict())  # as PEFT: not persistent
    oracle.check_checkpoints(pair, tmp_path)  # both sides rebuild the projections from projection_prng_key
    saved = load_file(tmp_path / "peftc" / "adapter_model.safetensors")
    assert set(saved) == {f"base_model.model.{m}.vera_lambda_{v}" for m in ("lin0", "lin1") for v in "bd"}


def test_a_checkpoint_without_its_projections_is_refused(tmp_path: Path):
    config, _ = vera(["lin0", "lin1"])
    case = zoo.mlp()
    am = peftc.apply(case.model, config, example_inputs=case.inputs)
    am.save_adapter(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"

    save_file({k: v for k, v in load_file(weights).items() if "vera_A" not in k}, weights)
    with pytest.raises(peftc.CheckpointError, match="missing keys: base_model.vera_A"):
        peftc.load(zoo.mlp().model, tmp_path, example_inputs=case.inputs)


def test_bf16_base_matches_peft_with_fp32_adapter():
    config, peft_config = CASES["mlp"]
    case, ref = zoo.mlp(), zoo.mlp()
    x = case.inputs[0].bfloat16()
    am = peftc.apply(case.model.bfloat16(), config, example_inputs=(x,))
    oracle.randomize_adapters(am)
    pm = peft.get_peft_model(ref.model.bfloat16(), peft_config)
    pm.load_state_dict(am.state_dict(), strict=True)
    assert {t.dtype for t in am.state_dict().values() if t.dtype != torch.bfloat16} == {torch.float32}
    with torch.no_grad():
        y = am(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, pm(x), atol=0, rtol=0)


def test_second_adapter_gets_its_own_projections_and_deleting_it_removes_them():
    case = zoo.mlp()
    am = peftc.apply(case.model, CASES["mlp"][0], example_inputs=case.inputs)
    before = set(am.state_dict())
    am.add_adapter("other", vera(["lin1"], r=2)[0])
    added = set(am.state_dict()) - before
    assert added == {"base_model.vera_A.other", "base_model.vera_B.other", "base_model.model.lin0.vera_A.other",
                     "base_model.model.lin0.vera_B.other", "base_model.model.lin1.vera_A.other",
                     "base_model.model.lin1.vera_B.other", "base_model.model.lin1.vera_lambda_b.other",
                     "base_model.model.lin1.vera_lambda_d.other"}  # PEFT's keys: one BufferDict in every layer
    # drawn for its own r and targets (PEFT reuses the first adapter's projections here, and fails at
    # run time when the ranks differ)
    assert am.state_dict()["base_model.vera_A.other"].shape == (2, 24)
    am.delete_adapter("other")
    assert set(am.state_dict()) == before
    am.delete_adapter("default")
    assert not any("vera" in k for k in am.state_dict())


def test_config_errors():
    with pytest.raises(peftc.ConfigError, match="r must be a positive integer"):
        peftc.load_config(vera(["lin0"], r=0)[0])
    with pytest.raises(peftc.ConfigError, match="bias"):
        peftc.load_config({**vera(["lin0"])[0], "bias": "vera"})  # (PEFT: "none", "all" or "<method>_only")
    with pytest.raises(peftc.TargetError, match="VERA cannot adapt it"):
        peftc.apply(zoo.cnn().model, vera(["conv0"])[0], example_inputs=zoo.cnn().inputs)
