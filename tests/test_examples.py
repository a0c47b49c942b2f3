"""The examples run, in their reduced (CI) mode, and do what they print."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the suite's two longest tests, last in collection order: as a group (--dist loadgroup hands out units of several
# tests before single tests) they start early, instead of ending the run on one worker while the other idles
pytestmark = pytest.mark.xdist_group("examples")


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _accuracy(out: str, what: str) -> float:
    (value,) = re.findall(rf"held-out accuracy{re.escape(what)}: ([0-9.]+)", out)
    return float(value)


def test_classify_minilm_quick(tmp_path: Path):
    out = _run("classify_minilm.py", "--quick", "--out", str(tmp_path))
    n_test = int(re.search(r"/ (\d+) held-out", out).group(1))
    before, after = _accuracy(out, " before training"), _accuracy(out, " after training")
    folded, onnx = _accuracy(out, ", folded"), _accuracy(out, ", ONNX Runtime")
    assert after > before + 0.2, out
    # folding and ONNX Runtime classify the same sentences the same way (one sample of slack for float noise)
    assert abs(folded - after) <= 1 / n_test + 1e-9, out
    assert abs(onnx - folded) <= 1 / n_test + 1e-9, out
    assert {p.name for p in tmp_path.iterdir()} == {"adapter", "head.safetensors", "minilm_topics.onnx"}
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_train_causal_lm_quick():
    # the quick run with the options on: activation checkpointing and LoRA+ groups
    out = _run("train_causal_lm.py", "--quick", "--checkpointing", "--loraplus-ratio", "4")
    before, after = (float(re.search(rf"held-out loss {w}: ([0-9.]+)", out).group(1)) for w in ("before", "after"))
    assert after < before - 1.0, out
    assert "adapter_model.safetensors" in out
