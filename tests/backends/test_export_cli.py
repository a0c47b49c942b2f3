"""`peftc export`: a saved tiny GPT-2 (Conv1D layers) and two adapters saved by PEFT, exported in switch
mode and served by name in onnxruntime, against PEFT's own mixed-batch forward on the same weights."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peftc.backends.onnx import OnnxAdapterSession

from peftc.cli import main
from tests import zoo

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")  # PEFT on Conv1D


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("cli")
    model = zoo.gpt2().model
    model.save_pretrained(root / "model")
    pm = None
    for i, name in enumerate(["alpha", "beta"]):
        config = peft.LoraConfig(r=4, lora_alpha=8 * (i + 1), target_modules=["c_attn", "c_fc"])
        if pm is None:
            pm = peft.get_peft_model(copy.deepcopy(model), config, adapter_name=name)
        else:
            pm.add_adapter(name, config)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for key, p in pm.named_parameters():
                if f"lora_B.{name}." in key:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    pm.save_pretrained(root / "adapters")  # PEFT's layout: a subfolder per adapter not named "default"
    return {"root": root, "model": str(root / "model"), "peft": pm.eval(),
            "alpha": str(root / "adapters" / "alpha"), "beta": str(root / "adapters" / "beta")}


def test_export_switch(saved, capsys) -> None:
    out = saved["root"] / "switch.onnx"
    code = main(["export", saved["model"], "--adapter", f"alpha={saved['alpha']}", "--adapter", saved["beta"],
                 "--mode", "switch", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert f"wrote {out}" in capsys.readouterr().out
    session = OnnxAdapterSession(out, providers=["CPUExecutionProvider"])
    assert session.mode == "switch" and session.adapter_names == ["alpha", "beta"]
    ids = torch.randint(1, zoo.VOCAB, (4, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    per_sample = ["beta", "__base__", "alpha", "beta"]
    got = session.run({"input_ids": ids, "attention_mask": mask}, adapter_names=per_sample)
    with torch.no_grad():
        want = saved["peft"](input_ids=ids, attention_mask=mask, adapter_names=per_sample).logits
    torch.testing.assert_close(torch.from_numpy(got["logits"]), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--adapter", "/nonexistent/adapter"], "/nonexistent/adapter: --adapter takes an adapter folder"),
    (["--adapter", "{alpha}", "--adapter", "x={alpha}", "--adapter", "x={beta}"], "two adapters named 'x'"),
    (["--adapter", "{root}"], "adapter_config.json"),
    (["--adapter", "{alpha}", "--ort-fusions", "cpu"], "--ort-fusions cpu: fuses decoders (--task text-generation)"),
])
def test_bad_input(saved, capsys, args: list[str], message: str) -> None:
    args = [a.format(**saved) for a in args]
    code = main(["export", saved["model"], *args, "-o", str(saved["root"] / "bad.onnx")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("peftc: error: ") and message in err, err


def test_bad_mode(saved, capsys) -> None:
    assert main(["export", saved["model"], "--adapter", saved["alpha"], "--mode", "fused", "-o", "x.onnx"]) == 2
    assert "invalid choice: 'fused'" in capsys.readouterr().err
