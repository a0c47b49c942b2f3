"""`fan_in_fan_out` set against the layer's layout: PEFT warns and corrects it (False for an nn.Linear, True
for transformers' Conv1D); peftc does the same, naming the module, and computes what PEFT computes."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import peft
import pytest
import torch

import peftc
from tests import zoo
from tests.oracle import TOL, randomize_adapters, tensors

METHODS = {
    "LORA": ({"r": 4, "lora_alpha": 8}, peft.LoraConfig),
    "IA3": ({"feedforward_modules": ["lin1"]}, peft.IA3Config),
    "VERA": ({"r": 4}, peft.VeraConfig),
}


def _saved_value(folder: Path) -> bool:
    return json.loads((folder / "adapter_config.json").read_text())["fan_in_fan_out"]


def _peft_warnings(build) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = build()
    return out, [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)]


@pytest.mark.parametrize("peft_type", sorted(METHODS))
def test_true_on_a_linear_warns_naming_the_module_and_is_set_false_as_peft_does(peft_type: str, tmp_path: Path):
    fields, peft_cls = METHODS[peft_type]
    case, ref = zoo.mlp(), zoo.mlp()
    config = {"peft_type": peft_type, "target_modules": ["lin0", "lin1"], "fan_in_fan_out": True, **fields}
    given = copy.deepcopy(config)
    with pytest.warns(UserWarning) as record:
        am = peftc.apply(case.model, config, example_inputs=case.inputs)
    ours = [str(w.message) for w in record if "fan_in_fan_out" in str(w.message)]
    assert ours == ["fan_in_fan_out is set to True but the target module 'lin0' is `torch.nn.Linear`. "
                    "Setting fan_in_fan_out to False."]  # once: corrected at the first module, as PEFT does
    assert am.peft_config["default"].fan_in_fan_out is False and config == given  # the caller's dict untouched
    randomize_adapters(am)

    peft_config = peft_cls(**{k: v for k, v in config.items() if k != "peft_type"})
    pm, theirs = _peft_warnings(lambda: peft.get_peft_model(ref.model, peft_config))
    assert len(theirs) == 1 and theirs[0].startswith("fan_in_fan_out is set to True")
    pm.load_state_dict(am.state_dict(), strict=True)
    pm.eval()
    with torch.no_grad():
        got, want = tensors(case.call(am)), tensors(case.call(pm))
        base = tensors(case.call(case.model))
    for key in got:
        torch.testing.assert_close(got[key], want[key], **TOL)
    assert any(not torch.allclose(got[k], base[k]) for k in got), "the adapter had no effect"
    am.save_adapter(str(tmp_path / "ours"))
    pm.save_pretrained(str(tmp_path / "theirs"))
    assert _saved_value(tmp_path / "ours") is _saved_value(tmp_path / "theirs") is False


def test_false_on_a_conv1d_warns_naming_the_module_and_is_set_true_as_peft_does(tmp_path: Path):
    case, ref = zoo.gpt2(), zoo.gpt2()
    with pytest.warns(UserWarning) as record:
        am = peftc.apply(case.model, {"peft_type": "LORA", "r": 4, "target_modules": ["c_attn"]})
    ours = [str(w.message) for w in record if "fan_in_fan_out" in str(w.message)]
    assert ours == ["fan_in_fan_out is set to False but the target module 'transformer.h.0.attn.c_attn' is "
                    "`Conv1D`. Setting fan_in_fan_out to True."]
    pm, _ = _peft_warnings(lambda: peft.get_peft_model(ref.model, peft.LoraConfig(r=4, target_modules=["c_attn"])))
    am.save_adapter(str(tmp_path / "ours"))
    pm.save_pretrained(str(tmp_path / "theirs"))
    assert _saved_value(tmp_path / "ours") is _saved_value(tmp_path / "theirs") is True
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fan_in_fan_out")  # a value that fits the layer: no warning
        peftc.load(zoo.gpt2().model, tmp_path / "ours")


def test_an_adapter_saved_with_the_uncorrected_value_saves_again_into_its_folder(tmp_path: Path):
    """Earlier peftc saved fan_in_fan_out=False for Conv1D layers; loaded now it is corrected to True, and saving
    it back into its folder is saving the same adapter, not replacing another."""
    case = zoo.gpt2()
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        am = peftc.apply(case.model, {"peft_type": "LORA", "r": 4, "target_modules": ["c_attn"]})
    am.save_adapter(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": False}))
    am.save_adapter(str(tmp_path))
    assert _saved_value(tmp_path) is True


def test_the_warning_points_at_the_users_line():
    case = zoo.mlp()
    config = {"peft_type": "LORA", "target_modules": ["lin0"], "fan_in_fan_out": True}
    with pytest.warns(UserWarning, match="'lin0' is `torch.nn.Linear`") as record:
        am = peftc.apply(case.model, config, example_inputs=case.inputs)
    with pytest.warns(UserWarning, match="'lin0' is `torch.nn.Linear`") as again:
        am.add_adapter("other", config)
    ours = [w for w in [*record, *again] if "fan_in_fan_out" in str(w.message)]
    assert [Path(w.filename).name for w in ours] == [Path(__file__).name] * 2
