"""Bad input: each gives an error naming the file, layer or field, and loses nothing on disk.

Covered elsewhere, not repeated here (tests/peftc/test_checkpoint.py): truncated, empty and
bad-length safetensors files, checkpoints with other keys or shapes, a missing weights file, a
.bin refused by default, a failed load leaving the adapter untouched, and a save that fails
while writing the weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import peftc
import peftc.checkpoint
from tests import zoo
from tests.oracle import randomize_adapters

WEIGHTS, CONFIG, PICKLE = "adapter_model.safetensors", "adapter_config.json", "adapter_model.bin"
LORA = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lin0", "lin1"]}


def _mlp_adapter(**fields: Any) -> tuple[zoo.Case, peftc.AdaptedModel]:
    case = zoo.mlp()
    am = peftc.apply(case.model, {**LORA, **fields}, example_inputs=case.inputs)
    randomize_adapters(am)
    return case, am


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("mlp_adapter")
    _mlp_adapter()[1].save_adapter(directory)
    return directory


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root`, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _copy(src: Path, dst: Path, *names: str) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _load_fails(error: type[Exception], directory: Path, *fragments: str, case: zoo.Case | None = None,
                **kwargs: Any) -> str:
    """peftc.load raises `error` with every fragment in its message; the model and the files are unchanged."""
    case = case or zoo.mlp()
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    files = _snapshot(directory)
    with pytest.raises(error) as e:
        peftc.load(case.model, directory, example_inputs=case.inputs, **kwargs)
    message = str(e.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert all(torch.equal(v, before[k]) for k, v in case.model.state_dict().items())
    assert _snapshot(directory) == files
    return message


def _output(case: zoo.Case, model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return case.call(model.eval())


# -- damaged files ---------------------------------------------------------------------------------


def test_safetensors_with_a_garbled_header_names_the_file(saved: Path, tmp_path: Path):
    data = bytearray((saved / WEIGHTS).read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    data[8 + header_len // 2: 8 + header_len // 2 + 6] = b"\x00\xff{]\"\x01"  # inside the JSON header, length kept
    bad = _copy(saved, tmp_path / "bad", CONFIG)
    (bad / WEIGHTS).write_bytes(bytes(data))
    _load_fails(peftc.CheckpointError, bad, str(bad / WEIGHTS), "not a readable safetensors file")


def test_config_that_is_not_json_names_the_file(saved: Path, tmp_path: Path):
    bad = _copy(saved, tmp_path / "bad", WEIGHTS)
    (bad / CONFIG).write_text((saved / CONFIG).read_text()[:40])
    _load_fails(peftc.ConfigError, bad, str(bad / CONFIG), "not valid JSON")


# -- a checkpoint for another model ------------------------------------------------------------------


def test_adapter_for_another_model_names_the_config_and_its_targets(saved: Path):
    cnn = zoo.cnn()
    _load_fails(peftc.TargetError, saved, str(saved / CONFIG), "'lin0'", "matched no module of CNN", case=cnn)


def test_pissa_rank_above_the_layer_size_names_the_config_and_layer(tmp_path: Path):
    """PiSSA takes r singular components of W: r=10 cannot come from this MLP's lin1 (24 -> 8). (A plain LoRA
    may have r above a layer's size, as in PEFT: tests/passes/test_lora.py.)"""
    folder = tmp_path / "wide"
    folder.mkdir()
    (folder / CONFIG).write_text(json.dumps({**LORA, "r": 10, "init_lora_weights": "pissa"}))
    _load_fails(peftc.ConfigError, folder, str(folder / CONFIG), "r=10", "'lin1'", "has only 8")


# -- pickle (.bin) adapters -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_bin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A PEFT adapter saved in PEFT's older pickle format, and PEFT's output with it."""
    directory = tmp_path_factory.mktemp("peft_bin")
    case = zoo.mlp()
    torch.manual_seed(3)
    pm = peft.get_peft_model(case.model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin0", "lin1"],
                                                         init_lora_weights=False))
    pm.save_pretrained(directory, safe_serialization=False)
    assert (directory / PICKLE).is_file() and not (directory / WEIGHTS).exists()
    return directory, _output(case, pm)


def test_pickle_adapter_loads_only_with_allow_pickle(peft_bin: tuple[Path, torch.Tensor]):
    directory, want = peft_bin
    _load_fails(peftc.CheckpointError, directory, str(directory / PICKLE), "allow_pickle=True")
    case = zoo.mlp()
    am = peftc.load(case.model, directory, example_inputs=case.inputs, allow_pickle=True)
    torch.testing.assert_close(_output(case, am), want, atol=1e-6, rtol=0)
    base = zoo.mlp()
    assert not torch.allclose(_output(base, base.model), want, atol=1e-4)  # the adapter is really there


class _Payload:
    """Unpickling this runs code (it touches a file): what weights_only=True must refuse."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_pickle_that_would_run_code_is_refused_even_with_allow_pickle(saved: Path, tmp_path: Path):
    marker = tmp_path / "pwned"
    folder = _copy(saved, tmp_path / "evil", CONFIG)
    torch.save({**load_file(saved / WEIGHTS), "x": _Payload(str(marker))}, folder / PICKLE)
    _load_fails(peftc.CheckpointError, folder, str(folder / PICKLE), "refused by torch.load(weights_only=True)",
                "Unsupported global: GLOBAL exec", allow_pickle=True)
    assert not marker.exists()
    torch.load(folder / PICKLE, weights_only=False)  # the payload is real: an unrestricted load runs it
    assert marker.exists()


@pytest.mark.parametrize("content", ["list", "truncated"])
def test_pickle_that_is_not_a_state_dict_is_refused(content: str, saved: Path, tmp_path: Path):
    folder = _copy(saved, tmp_path / content, CONFIG)
    tensors = load_file(saved / WEIGHTS)
    if content == "list":
        torch.save(list(tensors.values()), folder / PICKLE)
        expected = "expected a dict of named tensors, got list"
    else:
        torch.save(tensors, folder / PICKLE)
        data = (folder / PICKLE).read_bytes()
        (folder / PICKLE).write_bytes(data[: len(data) // 2])
        expected = "refused by torch.load(weights_only=True)"
    _load_fails(peftc.CheckpointError, folder, str(folder / PICKLE), expected, allow_pickle=True)


# -- adapter names that would leave the folder -----------------------------------------------------

ESCAPING = ["../x", "../../x", "/tmp/peftc-escape", "a/b", "..", "a\\b", ""]


@pytest.mark.parametrize("name", ESCAPING)
def test_adapter_dir_refuses_names_that_are_not_one_folder(name: str, tmp_path: Path):
    with pytest.raises(peftc.CheckpointError, match="not a plain folder name"):
        peftc.checkpoint.adapter_dir(tmp_path / "out", name)
    assert peftc.checkpoint.adapter_dir(tmp_path / "out", "other") == str(tmp_path / "out" / "other")


@pytest.mark.parametrize("name", ["../x", "/tmp/peftc-escape"])
def test_save_and_load_refuse_escaping_adapter_names(name: str, saved: Path, tmp_path: Path):
    _, am = _mlp_adapter()
    out = tmp_path / "out"
    with pytest.raises(peftc.CheckpointError, match=f"adapter name {name!r}"):
        am.save_adapter(out, name)
    assert _snapshot(tmp_path) == {} and not os.path.exists("/tmp/peftc-escape")
    _load_fails(peftc.CheckpointError, saved, f"adapter name {name!r}", adapter_name=name)


# -- ranks and ops a layer cannot take -------------------------------------------------------------


class _MatmulLinear(nn.Linear):
    """A Linear whose weight reaches the graph through aten.matmul, not aten.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight) + self.bias


class _ElementwiseLinear(nn.Linear):
    """A Linear computed by broadcasting and summing: the weight reaches only a transpose and a mul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.unsqueeze(-1) * self.weight.T).sum(-2) + self.bias


class _Pair(nn.Module):
    def __init__(self, first: type[nn.Linear]):
        super().__init__()
        self.a = first(6, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_weight_used_by_an_op_the_method_cannot_adapt_names_module_and_op():
    torch.manual_seed(0)
    with pytest.raises(peftc.TargetError, match=r"module 'a' \(nn.Linear\) is used by aten.matmul.*aten.linear"):
        peftc.apply(_Pair(_MatmulLinear), {**LORA, "target_modules": ["a", "b"]}, example_inputs=(torch.randn(3, 6),))


def test_targeted_module_whose_weight_reaches_no_adaptable_op_is_an_error():
    torch.manual_seed(0)
    with pytest.raises(peftc.TargetError, match=r"module 'a' is targeted, but its parameters reach only .*numpy_T"):
        peftc.apply(_Pair(_ElementwiseLinear), {**LORA, "target_modules": ["a", "b"]},
                    example_inputs=(torch.randn(3, 6),))


# -- no silent overwrite ------------------------------------------------------------------------------


def test_folder_holding_another_adapter_is_not_overwritten(saved: Path, tmp_path: Path):
    out = _copy(saved, tmp_path / "out", CONFIG, WEIGHTS)
    files = _snapshot(tmp_path)
    _, other = _mlp_adapter(r=4)
    with pytest.raises(peftc.CheckpointError) as e:
        other.save_adapter(out)
    message = str(e.value)
    assert str(out) in message and "already holds a different adapter" in message and "overwrite=True" in message
    assert "r=2 there, 4 now" in message
    assert _snapshot(tmp_path) == files
    # asked for explicitly, it replaces the old adapter
    peftc.checkpoint.save_adapter(other, out, "default", overwrite=True)
    assert json.loads((out / CONFIG).read_text())["r"] == 4


class _OtherMLP(zoo.MLP):
    """Same layers and names as the zoo's MLP, another model."""


def test_folder_holding_an_adapter_for_another_base_model_is_not_overwritten(saved: Path, tmp_path: Path):
    out = _copy(saved, tmp_path / "out", CONFIG, WEIGHTS)
    files = _snapshot(tmp_path)
    torch.manual_seed(0)
    am = peftc.apply(_OtherMLP().eval(), LORA, example_inputs=zoo.mlp().inputs)
    with pytest.raises(peftc.CheckpointError, match="auto_mapping=.*'MLP'.*'_OtherMLP'"):
        am.save_adapter(out)
    assert _snapshot(tmp_path) == files


def test_same_adapter_saves_again_into_its_folder_even_one_peft_wrote(tmp_path: Path):
    case = zoo.mlp()
    torch.manual_seed(5)
    pm = peft.get_peft_model(zoo.mlp().model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin1", "lin0"],
                                                               init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    am = peftc.load(case.model, tmp_path, is_trainable=True, example_inputs=case.inputs)
    with torch.no_grad():
        for _, p in am.adapter_parameters():
            p.mul_(2.0)  # trained further: same adapter, new values
    am.save_adapter(tmp_path)
    saved = load_file(tmp_path / WEIGHTS)
    assert all(torch.equal(saved[k.replace(".default", "")], p) for k, p in am.adapter_parameters())


# -- interrupted saves ---------------------------------------------------------------------------------


def _fail_on(monkeypatch: pytest.MonkeyPatch, name: str, target: Any, is_config_step: Any) -> None:
    """Make `target.name` raise OSError on the step that writes or renames the config."""
    real = getattr(target, name)

    def failing(*args: Any, **kwargs: Any) -> Any:
        if is_config_step(*args):
            raise OSError("simulated failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)


@pytest.mark.parametrize("step", ["config_write", "config_rename"])
@pytest.mark.parametrize("existing", [True, False])
def test_save_interrupted_at_the_config_leaves_the_folder_as_it_was(step: str, existing: bool, saved: Path,
                                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = _copy(saved, tmp_path / "out", CONFIG, WEIGHTS) if existing else tmp_path / "out"
    files = _snapshot(tmp_path)
    _, am = _mlp_adapter()
    with torch.no_grad():
        for _, p in am.adapter_parameters():
            p.add_(1.0)  # new values: the same adapter, so the save is allowed
    if step == "config_write":
        _fail_on(monkeypatch, "_atomic_write", peftc.checkpoint, lambda path, *_: path.endswith(CONFIG))
    else:
        _fail_on(monkeypatch, "replace", os, lambda src, dst: str(dst).endswith(CONFIG))
    with pytest.raises(OSError, match="simulated failure"):
        am.save_adapter(out)
    monkeypatch.undo()
    after = _snapshot(tmp_path)
    assert after == files, sorted(set(after) ^ set(files))  # old files intact, no temp files, no half adapter


# -- a safe merge refuses non-finite weights -----------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_safe_merge_refuses_non_finite_adapter_weights(bad: float):
    case, am = _mlp_adapter()
    before = _output(case, am)
    with torch.no_grad():
        dict(am.adapter_parameters())["base_model.model.lin1.lora_B.default.weight"][3, 1] = bad
    for merge in (am.fold, am.merge_and_unload):
        with pytest.raises(peftc.PeftcError, match="'lin1'.*non-finite"):
            merge(safe_merge=True)
    # nothing was merged: the adapted model still runs unmerged, and only the poisoned row is affected
    out = _output(case, am)
    assert not torch.isfinite(out[:, 3]).all() and torch.equal(out[:, :3], before[:, :3])
    assert not am.merged
    # an unsafe merge goes ahead, as PEFT's does
    assert not torch.isfinite(am.merge_and_unload().lin1.weight).all()



@pytest.mark.parametrize("config", [
    # PiSSA rewrites base weights; VeRA shares tensors across modules
    {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": "pissa"},
    {"peft_type": "VERA", "r": 4, "target_modules": ["q_proj", "v_proj"]},
], ids=["pissa", "vera"])
def test_adapter_that_fails_halfway_leaves_the_model_as_it_was(config: dict[str, Any], monkeypatch):
    from peftc.passes import METHODS

    case = zoo.llama()
    am = peftc.apply(case.model, {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]})
    randomize_adapters(am)
    before = {k: v.clone() for k, v in am.state_dict().items()}
    with torch.no_grad():
        out = case.call(am)
    method = METHODS[config["peft_type"]]
    create, calls = method.create, []

    def create_then_fail(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[1])
        if len(calls) == 3:
            am.get_base_model()  # the source copy synced halfway (it looks its tensors' holders up once)
            raise peftc.ConfigError(f"module {args[1]!r}: refused")
        return create(*args, **kwargs)

    monkeypatch.setattr(method, "create", create_then_fail)
    with pytest.raises(peftc.ConfigError, match="refused"):
        am.add_adapter("second", config)
    assert len(calls) == 3  # two modules were adapted (and PiSSA rewrote their base weights) before it failed
    after = am.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert list(am.peft_config) == ["default"] and am.adapter_order == ["default"]
    with torch.no_grad():
        torch.testing.assert_close(case.call(am), out, rtol=0, atol=0)
    tree = am.parameter_tree
    assert all(p is tree.tensor(tree.names[name]) for name, p in am.get_base_model().named_parameters())

    monkeypatch.setattr(method, "create", create)
    am.add_adapter("second", config)  # the same name is free again, and the adapter goes on whole
    assert sorted(am.peft_config) == ["default", "second"]
