"""Adapter checkpoints in PEFT's format, with PEFT as the oracle, in both directions.

peftc save -> `peft.PeftModel.from_pretrained`, and `PeftModel.save_pretrained` -> `peftc.load`,
must give the same outputs; the saved keys, shapes and config must be PEFT's; bad checkpoints
are a `CheckpointError` naming what is wrong, and leave everything as it was.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import peftc
import peftc.checkpoint
from tests import zoo
from tests.groups import grouped

pytestmark = [
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
]

R, ALPHA = 4, 12
ATOL = 1e-5
CASES = ["llama", "gpt2", "bert", "mlp", "cnn", "embedding_model"]
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def lora_fields(case: zoo.Case, **extra: Any) -> dict[str, Any]:
    return {"r": R, "lora_alpha": ALPHA, "target_modules": case.targets, "init_lora_weights": False, **extra}


def peftc_apply(case: zoo.Case, adapter_name: str = "default", **extra: Any) -> peftc.AdaptedModel:
    config = {"peft_type": "LORA", **lora_fields(case, **extra)}
    return peftc.apply(case.model, config, adapter_name=adapter_name, example_inputs=example(case))


def example(case: zoo.Case) -> Any:
    return None if case.transformers else case.inputs


def main_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def eval_output(case: zoo.Case, model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return main_output(case.call(model))


def assert_identical(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def saved(directory: str | Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(os.path.join(directory, WEIGHTS)).items()}


def fresh(name: str) -> zoo.Case:
    return zoo.FACTORIES[name]()


@dataclass
class Saved:
    name: str
    am: peftc.AdaptedModel  # peftc's adapted model, saved in peftc_dir
    am_out: torch.Tensor
    peftc_dir: Path
    pm: peft.PeftModel  # PEFT's own model with its own random adapter, saved in peft_dir
    pm_out: torch.Tensor
    peft_dir: Path


@pytest.fixture(scope="module", params=grouped("checkpoint", CASES))
def ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    name = request.param
    root = tmp_path_factory.mktemp(name)
    case = fresh(name)
    am = peftc_apply(case)
    am.save_adapter(root / "peftc")
    ref = fresh(name)
    torch.manual_seed(99)  # PEFT's random (init_lora_weights=False) adapter differs from peftc's
    pm = peft.get_peft_model(ref.model, peft.LoraConfig(**lora_fields(case)))
    pm.save_pretrained(root / "peft")
    return Saved(name, am, eval_output(case, am), root / "peftc", pm, eval_output(ref, pm), root / "peft")


# -- peftc -> PEFT -------------------------------------------------------------------------------


def test_peftc_checkpoint_loads_in_peft(ckpt: Saved):
    case = fresh(ckpt.name)
    assert sorted(os.listdir(ckpt.peftc_dir)) == [CONFIG, WEIGHTS]
    pm = peft.PeftModel.from_pretrained(case.model, ckpt.peftc_dir)
    out = eval_output(case, pm)
    assert_identical(out, ckpt.am_out)
    base = fresh(ckpt.name)
    assert not torch.allclose(out, eval_output(base, base.model), atol=1e-4)  # the adapter is live
    theirs = dict(pm.named_parameters())
    for name, p in ckpt.am.adapter_parameters():
        assert torch.equal(theirs[name], p), name


def test_saved_keys_and_shapes_are_peft_keys(ckpt: Saved, tmp_path: Path):
    ours = saved(ckpt.peftc_dir)
    # PEFT's adapter keys, as it saves them without embedding base weights
    ckpt.pm.save_pretrained(tmp_path / "adapters_only", save_embedding_layers=False)
    assert ours == saved(tmp_path / "adapters_only")
    # PEFT's default ("auto") also saves the base weight of layers named embed_tokens/lm_head when they
    # are targeted (llama here); that is the only difference peftc's checkpoints have
    extra = {k: v for k, v in saved(ckpt.peft_dir).items() if k not in ours}
    assert set(ours) <= set(saved(ckpt.peft_dir))
    assert all(k.endswith(".base_layer.weight") and ("embed_tokens" in k or "lm_head" in k) for k in extra)
    assert bool(extra) == (ckpt.name == "llama")


def test_saved_config_is_peft_config(ckpt: Saved):
    ours = json.loads((ckpt.peftc_dir / CONFIG).read_text())
    theirs = json.loads((ckpt.peft_dir / CONFIG).read_text())
    assert set(ours) == set(theirs)
    for key in ("peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights", "bias",
                "inference_mode", "rank_pattern", "alpha_pattern", "layers_to_transform", "task_type"):
        assert ours[key] == theirs[key], key
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    config = peft.PeftConfig.from_pretrained(ckpt.peftc_dir)
    assert isinstance(config, peft.LoraConfig)
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (R, ALPHA, set(zoo.FACTORIES[
        ckpt.name]().targets))


# -- PEFT -> peftc -------------------------------------------------------------------------------


def test_peft_checkpoint_loads_in_peftc(ckpt: Saved):
    case = fresh(ckpt.name)
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    am = peftc.load(case.model, ckpt.peft_dir, example_inputs=example(case))
    assert not am.training
    assert_identical(eval_output(case, am), ckpt.pm_out)
    theirs = dict(ckpt.pm.named_parameters())
    for name, p in am.adapter_parameters():
        assert torch.equal(p, theirs[name]), name
        assert not p.requires_grad  # as PeftModel.from_pretrained(is_trainable=False)
    assert am.get_nb_trainable_parameters()[0] == 0
    # the user's model is untouched by the load (PEFT's llama checkpoint also carries embed_tokens)
    assert all(torch.equal(v, before[k]) for k, v in case.model.state_dict().items())


def test_peftc_checkpoint_round_trips_in_peftc(ckpt: Saved):
    case = fresh(ckpt.name)
    am = peftc.load(case.model, ckpt.peftc_dir, is_trainable=True, example_inputs=example(case))
    assert_identical(eval_output(case, am), ckpt.am_out)
    assert am.get_nb_trainable_parameters() == ckpt.am.get_nb_trainable_parameters()


# -- adapter names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "llama"])
def test_non_default_adapter_name_uses_peft_subfolder(name: str, tmp_path: Path):
    case = fresh(name)
    am = peftc_apply(case, adapter_name="other")
    assert any(".lora_A.other." in k for k in am.state_dict())
    am.save_adapter(tmp_path / "peftc")
    assert sorted(os.listdir(tmp_path / "peftc")) == ["other"]
    ref = fresh(name)
    pm = peft.get_peft_model(ref.model, peft.LoraConfig(**lora_fields(case)), adapter_name="other")
    pm.load_state_dict(am.state_dict(), strict=True)
    pm.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    assert (tmp_path / "peft" / "other" / WEIGHTS).is_file()  # (beside PEFT's README.md model card)
    assert saved(tmp_path / "peftc" / "other") == saved(tmp_path / "peft" / "other")
    want = eval_output(case, am)
    assert_identical(eval_output(ref, pm), want)

    loaded = fresh(name)
    pm2 = peft.PeftModel.from_pretrained(loaded.model, tmp_path / "peftc" / "other", adapter_name="other")
    assert_identical(eval_output(loaded, pm2), want)
    if name == "mlp":  # one more capture is enough to show peftc.load takes the name
        loaded = fresh(name)
        am2 = peftc.load(loaded.model, tmp_path / "peft" / "other", adapter_name="other",
                         example_inputs=example(loaded))
        assert am2.active_adapter == "other"
        assert_identical(eval_output(loaded, am2), want)


# -- configs beyond r/alpha: numerics and round trips against PEFT ------------------------------------

CONFIGS = {
    "rslora": {"use_rslora": True, "target_modules": ["q_proj", "v_proj", "embed_tokens"]},
    "patterns": {
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "rank_pattern": {"q_proj": 2, "model.layers.1.self_attn.v_proj": 6},
        "alpha_pattern": {"down_proj": 3, "v_proj": 24},
    },
    "layers": {"target_modules": ["q_proj", "v_proj", "down_proj"], "layers_to_transform": [1],
               "layers_pattern": "layers"},
}


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_config_variants_match_peft_and_round_trip(variant: str, tmp_path: Path):
    case, ref = fresh("llama"), fresh("llama")
    fields = lora_fields(case, **CONFIGS[variant])
    am = peftc.apply(case.model, {"peft_type": "LORA", **fields})
    pm = peft.get_peft_model(ref.model, peft.LoraConfig(**fields))
    pm.load_state_dict(am.state_dict(), strict=True)  # same modules adapted, same ranks
    want = eval_output(case, am)
    assert_identical(eval_output(ref, pm), want)  # same scales
    if variant == "layers":
        assert {k.split(".lora_")[0] for k, _ in am.adapter_parameters()} == {
            f"base_model.model.model.layers.1.{m}" for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
        }
    if variant == "patterns":
        shapes = {k: tuple(p.shape) for k, p in am.adapter_parameters()}
        assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"][0] == 2
        assert shapes["base_model.model.model.layers.1.self_attn.v_proj.lora_A.default.weight"][0] == 6
        assert shapes["base_model.model.model.layers.0.self_attn.v_proj.lora_A.default.weight"][0] == R

    am.save_adapter(tmp_path / "peftc")
    pm.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    assert saved(tmp_path / "peftc") == saved(tmp_path / "peft")
    loaded = fresh("llama")
    assert_identical(eval_output(loaded, peft.PeftModel.from_pretrained(loaded.model, tmp_path / "peftc")), want)
    loaded = fresh("llama")
    assert_identical(eval_output(loaded, peftc.load(loaded.model, tmp_path / "peft")), want)


# -- bad checkpoints -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("mlp_good")
    peftc_apply(zoo.mlp()).save_adapter(directory)
    return directory


def _copy_config(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / CONFIG).write_text((src / CONFIG).read_text())
    return dst


def _assert_load_fails(directory: Path, *fragments: str) -> peftc.CheckpointError:
    case = zoo.mlp()
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in case.model.named_parameters()}
    with pytest.raises(peftc.CheckpointError) as e:
        peftc.load(case.model, directory, example_inputs=case.inputs)
    for fragment in fragments:
        assert fragment in str(e.value), (fragment, str(e.value))
    assert all(torch.equal(v, before[k]) for k, v in case.model.state_dict().items())
    assert {n: p.requires_grad for n, p in case.model.named_parameters()} == flags
    return e.value


def test_checkpoint_of_another_model_names_the_keys(mlp_dir: Path, tmp_path: Path):
    other = tmp_path / "cnn"
    peftc_apply(zoo.cnn()).save_adapter(other)
    bad = _copy_config(mlp_dir, tmp_path / "bad")
    (bad / WEIGHTS).write_bytes((other / WEIGHTS).read_bytes())
    _assert_load_fails(bad, str(bad / WEIGHTS), "missing keys", "base_model.model.lin0.lora_A.weight",
                       "unexpected keys", "base_model.model.conv0.lora_A.weight")


def test_checkpoint_with_other_shapes_names_the_keys(mlp_dir: Path, tmp_path: Path):
    bigger = tmp_path / "r8"
    case = zoo.mlp()
    peftc.apply(case.model, {"peft_type": "LORA", **lora_fields(case, r=8)}, example_inputs=case.inputs)\
        .save_adapter(bigger)
    bad = _copy_config(mlp_dir, tmp_path / "bad")
    (bad / WEIGHTS).write_bytes((bigger / WEIGHTS).read_bytes())
    _assert_load_fails(bad, "shape mismatches", "base_model.model.lin1.lora_B.weight", "(8, 8)", "(8, 4)")


def test_failed_load_leaves_the_adapter_untouched(mlp_dir: Path, tmp_path: Path):
    """Every key and shape is checked before any tensor is written: no half-loaded adapter."""
    case = zoo.mlp()
    am = peftc_apply(case)
    with torch.no_grad():
        for _, p in am.adapter_parameters():
            p.mul_(-2.0)  # differ from the (same-seed) weights in mlp_dir
    before = {k: v.clone() for k, v in am.state_dict().items()}
    weights = load_file(mlp_dir / WEIGHTS)
    assert not torch.equal(weights["base_model.model.lin0.lora_A.weight"],
                           before["base_model.model.lin0.lora_A.default.weight"])
    weights["base_model.model.lin1.lora_B.weight"] = torch.zeros(8, 3)  # one bad shape, the others fine
    bad = _copy_config(mlp_dir, tmp_path / "bad")
    save_file(weights, bad / WEIGHTS)
    with pytest.raises(peftc.CheckpointError, match="lin1.lora_B.weight"):
        peftc.checkpoint.load_adapter_weights(am, str(bad), "default")
    after = am.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("damage", ["truncated", "garbage_header", "empty"])
def test_corrupt_weights_file_names_the_file(damage: str, mlp_dir: Path, tmp_path: Path):
    bad = _copy_config(mlp_dir, tmp_path / "bad")
    data = (mlp_dir / WEIGHTS).read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage_header":
        data = b"\xff" * 8 + data[8:]
    else:
        data = b""
    (bad / WEIGHTS).write_bytes(data)
    _assert_load_fails(bad, str(bad / WEIGHTS))


def test_missing_weights_file_is_a_checkpoint_error(mlp_dir: Path, tmp_path: Path):
    bad = _copy_config(mlp_dir, tmp_path / "bad")
    _assert_load_fails(bad, str(bad / WEIGHTS), "no such file")


def test_pickle_checkpoint_is_refused_by_name(mlp_dir: Path, tmp_path: Path):
    bad = _copy_config(mlp_dir, tmp_path / "bad")
    torch.save(load_file(mlp_dir / WEIGHTS), bad / "adapter_model.bin")
    _assert_load_fails(bad, "adapter_model.bin")


def test_missing_directory_names_the_path(tmp_path: Path):
    case = zoo.mlp()
    with pytest.raises(peftc.CheckpointError, match="nowhere.*no such folder"):
        peftc.load(case.model, tmp_path / "nowhere", example_inputs=case.inputs)


# -- atomic save -----------------------------------------------------------------------------------


def test_saving_twice_overwrites_and_leaves_two_files(tmp_path: Path):
    case = zoo.mlp()
    am = peftc_apply(case)
    am.save_adapter(tmp_path)
    with torch.no_grad():
        for _, p in am.adapter_parameters():
            p.add_(1.0)
    am.save_adapter(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG, WEIGHTS]
    weights = load_file(tmp_path / WEIGHTS)
    for name, p in am.adapter_parameters():
        assert torch.equal(weights[name.replace(".default", "")], p)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    case = zoo.mlp()
    am = peftc_apply(case)
    am.save_adapter(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in (CONFIG, WEIGHTS)}

    def crash(tensors: dict, path: str, metadata: Any = None) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(peftc.checkpoint, "save_file", crash)
    with torch.no_grad():
        for _, p in am.adapter_parameters():
            p.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        am.save_adapter(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG, WEIGHTS]
    assert {name: (tmp_path / name).read_bytes() for name in (CONFIG, WEIGHTS)} == before
