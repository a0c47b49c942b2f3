"""Adapters through their life: names PEFT accepts, hot-swapping down and back up, saving after deletes."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch

import peftc
from tests import zoo
from tests.oracle import TOL, randomize_adapters


def _lora(r: int = 4, targets: tuple[str, ...] = ("lin0", "lin1"), **extra) -> dict:
    return {"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": list(targets), **extra}


def _saved(tmp_path: Path, name: str, r: int, seed: int) -> tuple[Path, torch.Tensor]:
    """An MLP adapter of rank r with random values saved to tmp_path/name, and the output it gives."""
    case = zoo.mlp()
    am = peftc.apply(case.model, _lora(r), example_inputs=case.inputs)
    randomize_adapters(am, seed=seed)
    am.save_adapter(str(tmp_path / name))
    with torch.no_grad():
        return tmp_path / name, case.call(am)


# -- hot-swap --------------------------------------------------------------------------------------------


def test_hotswap_down_then_back_to_full_rank_saves_again(tmp_path: Path):
    """Swapping a smaller adapter in zero-pads it (and its save is refused: the checkpoint is the folder it
    came from); swapping a full-size one back makes it savable again, and the save is that adapter."""
    full, full_out = _saved(tmp_path, "full", r=4, seed=1)
    small, small_out = _saved(tmp_path, "small", r=2, seed=2)
    case = zoo.mlp()
    am = peftc.load(case.model, full, example_inputs=case.inputs)
    am.hotswap_adapter(small, "default")
    with torch.no_grad():
        torch.testing.assert_close(case.call(am), small_out, **TOL)
    with pytest.raises(peftc.ConfigError, match="hot-swapped in at a smaller rank"):
        am.save_adapter(str(tmp_path / "padded"))
    am.hotswap_adapter(full, "default")
    with torch.no_grad():
        torch.testing.assert_close(case.call(am), full_out, **TOL)
    am.save_adapter(str(tmp_path / "again"))  # refused before: "zero-padded"
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == \
        (full / "adapter_model.safetensors").read_bytes()


def test_a_deleted_padded_adapters_name_can_be_reused_and_saved(tmp_path: Path):
    full, _ = _saved(tmp_path, "full", r=4, seed=1)
    small, _ = _saved(tmp_path, "small", r=2, seed=2)
    case = zoo.mlp()
    am = peftc.load(case.model, full, example_inputs=case.inputs)
    am.add_adapter("x", _lora(4))
    am.hotswap_adapter(small, "x")
    am.delete_adapter("x")
    am.add_adapter("x", _lora(4))
    am.save_adapter(str(tmp_path / "out"), "x")
    assert (tmp_path / "out" / "x" / "adapter_config.json").exists()


# -- saving with no adapter left ----------------------------------------------------------------------------


def test_saving_after_the_last_adapter_was_deleted_is_a_clear_error(tmp_path: Path):
    """PEFT raises KeyError: 'default' here; peftc says what happened (it was an IndexError)."""
    case = zoo.mlp()
    am = peftc.apply(case.model, _lora(), example_inputs=case.inputs)
    am.delete_adapter("default")
    for save in (lambda: am.save_adapter(str(tmp_path)), lambda: am.save_pretrained(str(tmp_path))):
        with pytest.raises(peftc.CheckpointError, match=r"^no adapter to save: the last one was deleted"):
            save()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(peftc.CheckpointError, match="no adapter named 'default'"):
        am.save_adapter(str(tmp_path), "default")  # named: the error names it


# -- adapter names ------------------------------------------------------------------------------------------

# names PEFT accepts (a ModuleDict key: anything without "."); each used to reach torch.fx as part of a
# Python argument name, and fail to compile (SyntaxError) unless it was an identifier
NAMES = ["my-adapter", "a b", "x#y", "it's", 'say "hi"', "tab\there", "new\nline", "nul\0byte", "del\x7f",
         "\u2028sep", "ﬁne"]


@pytest.mark.parametrize("name", NAMES)
def test_adapter_names_peft_accepts_work(name: str):
    """Forward, a mixed batch beside a second adapter whose name differs only in characters an identifier
    cannot hold (or by Unicode normalisation), and a merge, all equal to PEFT's with the same names."""
    other = {"ﬁne": "fine"}.get(name, "".join(c if c.isalnum() else "_" for c in name))
    case, ref = zoo.mlp(), zoo.mlp()
    am = peftc.apply(case.model, _lora(), adapter_name=name, example_inputs=case.inputs)
    am.add_adapter(other, _lora(2, ("lin1",)))
    randomize_adapters(am)
    pm = peft.get_peft_model(ref.model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"]),
                             adapter_name=name)
    pm.add_adapter(other, peft.LoraConfig(r=2, lora_alpha=8, target_modules=["lin1"]))
    pm.load_state_dict(am.state_dict(), strict=True)
    pm.eval()
    names = [name, other, "__base__", name]
    with torch.no_grad():
        for adapter in (name, other):
            am.set_adapter(adapter)
            pm.set_adapter(adapter)
            torch.testing.assert_close(case.call(am), case.call(pm), **TOL)
        torch.testing.assert_close(am(*case.inputs, adapter_names=names), pm(*ref.inputs, adapter_names=names),
                                   **TOL)
        am.set_adapter(name)
        pm.set_adapter(name)
        torch.testing.assert_close(am.merge_and_unload()(*case.inputs), pm(*ref.inputs), **TOL)


def test_names_that_cannot_be_folders_are_refused_at_save_and_load(tmp_path: Path):
    """A NUL works in memory, but no folder can be named by it: saving it (PEFT's layout puts a non-default
    adapter in a subfolder) is a CheckpointError naming it, not a ValueError from the OS."""
    case = zoo.mlp()
    am = peftc.apply(case.model, _lora(), adapter_name="nul\0byte", example_inputs=case.inputs)
    with pytest.raises(peftc.CheckpointError, match=r"adapter name 'nul\\x00byte' holds a NUL character"):
        am.save_pretrained(str(tmp_path))
    am.add_adapter("default", _lora())
    am.save_pretrained(str(tmp_path), selected_adapters=["default"])
    with pytest.raises(peftc.CheckpointError, match="holds a NUL character"):
        peftc.load(zoo.mlp().model, tmp_path, adapter_name="nul\0byte", example_inputs=case.inputs)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 4
