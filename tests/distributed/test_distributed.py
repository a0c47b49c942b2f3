"""Data-parallel (DDP) and sharded (FSDP2) training of an adapted model: 2 processes, gloo, this CPU.

One torchrun launch of `tests/distributed/worker.py` trains the same LoRA adapter alone on the whole
global batches (the reference, on rank 0), then under DDP, then under FSDP2. This process does not
import the worker: it only reads what rank 0 wrote, so it loads neither transformers nor a model.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from peftc.checkpoint import CONFIG_NAME, WEIGHTS_NAME

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 420  # seconds; a launch takes ~15-20 s on an idle 2-core machine
TOL = {"atol": 1e-5, "rtol": 1e-5}
# one worker runs the module, so the `runs` launch happens once and two launches (2 processes each) never share
# the 2 cores (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("distributed")


def _launch(cmd: list[str], out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([*cmd, str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(proc: subprocess.Popen) -> str:
    try:
        log, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
    assert proc.returncode == 0, f"{' '.join(map(str, proc.args))} failed:\n{log[-4000:]}"
    return log


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("distributed")
    _finish(_launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     "-m", "tests.distributed.worker"], out))
    return {"out": out, **torch.load(out / "results.pt")}


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_ddp_matches_single_process(runs):
    assert runs["world"] == 2
    assert runs["ddp_losses"] == pytest.approx(runs["single_losses"], abs=1e-5)
    _assert_same_weights(runs["ddp"], runs["single"])
    # every adapter tensor moved, so this compares trained values, not initial ones
    assert all(not torch.allclose(runs["initial"][n], p) for n, p in runs["single"].items())


def test_ddp_all_reduces_only_adapter_gradients(runs):
    params, adapters = runs["params"], runs["adapters"]
    trainable = sum(math.prod(shape) for shape, grad in params.values() if grad)
    frozen = sum(math.prod(shape) for shape, grad in params.values() if not grad)
    assert trainable == sum(math.prod(params[n][0]) for n in adapters) and frozen > 10 * trainable
    # the reducer's buckets hold the adapter gradients and nothing else, once per step
    assert runs["ddp_comm"]["allreduce_"] == runs["steps"] * trainable


def test_fsdp2_shards_every_tensor_and_matches_ddp(runs):
    assert runs["fsdp_losses"] == pytest.approx(runs["ddp_losses"], abs=1e-5)
    _assert_same_weights(runs["fsdp"], runs["ddp"])
    params, world = runs["params"], runs["world"]
    local = runs["fsdp_local_numel"]
    assert local.keys() == params.keys()
    for name, (shape, _) in params.items():  # each rank holds its dim-0 slice of every tensor, frozen or not
        assert local[name] == (math.ceil(shape[0] / world) * math.prod(shape[1:]), math.prod(shape)), name
    # gradients are reduce-scattered for the adapter only (dim 0 padded to a multiple of the world size)
    padded = sum(math.ceil(params[n][0][0] / world) * world * math.prod(params[n][0][1:]) for n in runs["adapters"])
    assert runs["fsdp_comm"]["_reduce_scatter_base_"] == runs["steps"] * padded


@pytest.mark.parametrize("run", ["ddp", "fsdp"])
def test_rank0_saves_the_single_process_adapter(runs, run):
    out = runs["out"]
    saved, single = load_file(out / run / WEIGHTS_NAME), load_file(out / "single" / WEIGHTS_NAME)
    _assert_same_weights(saved, single)
    assert all(k.startswith("base_model.model.") and ".default" not in k for k in saved)  # PEFT's saved keys
    config, single_config = (json.loads((out / d / CONFIG_NAME).read_text()) for d in (run, "single"))
    assert config == single_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_runs_the_example(tmp_path):
    # on a CPU-only machine `accelerate launch --cpu` starts one process (several need mpirun);
    # `--multi_gpu` starts them through torchrun, and the example picks gloo when there is no GPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           str(ROOT / "examples" / "distributed_causal_lm.py"), "--fsdp", "--steps", "4", "--out"]
    log = _finish(_launch(cmd, tmp_path / "adapter"))
    losses = [float(line.split()[-1]) for line in log.splitlines() if line.startswith("step ")]
    assert len(losses) == 4 and losses[-1] < losses[0], log[-2000:]
    assert "world size 2" in log
    saved = load_file(tmp_path / "adapter" / WEIGHTS_NAME)
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
