"""How `save_adapter` writes its files: never a torn folder, even under `kill -9`; no temp files left
behind for good; files with an ordinary file's mode (0666 less the umask)."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import peftc
import peftc.checkpoint
from peftc.checkpoint import adapter_state_dict, read_config, read_weights

fcntl = pytest.importorskip("fcntl")  # POSIX: saves lock their temp folder with flock

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


class _Wide(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _wide_adapter(width: int = 512, depth: int = 4, r: int = 512) -> peftc.AdaptedModel:
    """LoRA on `depth` square Linears: 2 * width * r * depth fp32 values (32 MiB by default)."""
    torch.manual_seed(0)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["0", "1", "2", "3"][:depth]}
    return peftc.apply(_Wide(width, depth).eval(), config, example_inputs=(torch.randn(2, width),))


def _set_version(am: peftc.AdaptedModel, values: dict[str, torch.Tensor]) -> None:
    """Point every adapter parameter at the tensors of one version (no copy, no computation)."""
    for name, p in am.adapter_parameters():
        p.data = values[name]


def _versions(am: peftc.AdaptedModel) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Two distinct sets of adapter values, and the saved tensors (PEFT keys) of each."""
    values, saved = [], []
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        values.append({name: torch.randn(p.shape, generator=gen) for name, p in am.adapter_parameters()})
        _set_version(am, values[-1])
        saved.append({k: t.detach().clone() for k, t in adapter_state_dict(am, "default").items()})
    return values, saved


def _leftovers(folder: Path) -> list[str]:
    """Everything in `folder` besides the adapter's two files."""
    return sorted(set(os.listdir(folder)) - {WEIGHTS, CONFIG})


def _which_version(folder: Path, saved: list[dict[str, torch.Tensor]], config: dict) -> int:
    """Which of the versions the folder holds, complete (config and every tensor); fails otherwise."""
    assert read_config(folder).to_dict() == config
    weights = read_weights(str(folder / WEIGHTS))  # a torn or truncated file fails to parse here
    for i, version in enumerate(saved):
        if weights.keys() == version.keys() and all(torch.equal(weights[k], t) for k, t in version.items()):
            return i
    raise AssertionError("the saved weights are neither the old nor the new adapter")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked saving process")
def test_saves_killed_at_random_points_leave_a_complete_adapter_and_no_temp_files(tmp_path: Path):
    """A child process saves two versions of a 32 MiB adapter in turn, and is killed (SIGKILL) at a
    random moment; each time the folder holds one version whole, and the next save (the next child's
    first) removes whatever the killed one left."""
    am = _wide_adapter()
    values, saved = _versions(am)
    out = tmp_path / "adapter"
    rng = random.Random(15)
    left_by_kills = []
    config = None
    for _ in range(10):
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: save version 0, wait for the go, then save versions 1, 0, 1, ... until killed
            code = 1
            try:
                _set_version(am, values[0])
                am.save_adapter(str(out))
                os.write(ready_w, b"r")
                os.read(go_r, 1)
                for i in range(1, 1000):
                    _set_version(am, values[i % 2])
                    am.save_adapter(str(out))
                code = 0
            finally:
                os._exit(code)
        os.close(ready_w)
        os.close(go_r)
        try:
            assert os.read(ready_r, 1) == b"r", "the saving child died"
            # its first save removed what the previous, killed, child left
            assert _leftovers(out) == []
            config = config or json.loads((out / CONFIG).read_text())
            assert _which_version(out, saved, config) == 0
            os.write(go_w, b"g")
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            os.close(ready_r)
            os.close(go_w)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the child stopped saving"
        _which_version(out, saved, config)  # old or new, whole
        left_by_kills.append(_leftovers(out))
    assert any(left_by_kills), "no kill landed inside a save: the test checks nothing"
    assert all(len(left) == 1 and left[0].startswith(".peftc-save-") for left in left_by_kills if left)
    # a save in this process cleans up too, and writes what it is given
    _set_version(am, values[1])
    am.save_adapter(str(out))
    assert _leftovers(out) == []
    assert _which_version(out, saved, config) == 1


def test_a_save_keeps_one_temp_copy_in_its_own_temp_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """During the write, the folder holds the old files and one temp folder with the new weights in it (no
    second full-size copy beside them); after it, the two files only."""
    am = _wide_adapter(width=64, depth=2, r=8)
    am.save_adapter(str(tmp_path))
    seen = []
    real = peftc.checkpoint.save_file

    def save_and_look(tensors: dict, path: str, metadata: dict | None = None) -> None:
        real(tensors, path, metadata=metadata)
        temp = [name for name in os.listdir(tmp_path) if name not in (WEIGHTS, CONFIG)]
        seen.append((temp, os.listdir(tmp_path / temp[0]) if len(temp) == 1 else None))

    monkeypatch.setattr(peftc.checkpoint, "save_file", save_and_look)
    am.save_adapter(str(tmp_path))
    [(temp, inside)] = seen
    assert len(temp) == 1 and temp[0].startswith(".peftc-save-") and temp[0].endswith(".tmp")
    assert inside == [WEIGHTS]
    assert sorted(os.listdir(tmp_path)) == [CONFIG, WEIGHTS]


def _stale_temp_dir(folder: Path, name: str = ".peftc-save-abc123_z.tmp") -> Path:
    """What a save killed half-way leaves: its temp folder with a partial safetensors temp file."""
    temp = folder / name
    temp.mkdir()
    (temp / ".tmpAb3dE9").write_bytes(b"\0" * 1000)
    (temp / WEIGHTS).write_bytes(b"partial")
    return temp


def test_next_save_removes_stale_temp_files_and_nothing_else(tmp_path: Path):
    am = _wide_adapter(width=64, depth=2, r=8)
    am.save_adapter(str(tmp_path))
    stale = _stale_temp_dir(tmp_path)
    hour_ago = time.time() - 2 * 3600
    old_scheme = [tmp_path / f".{WEIGHTS}.k2j_x9qa.tmp", tmp_path / f".{CONFIG}.0abcdefg.tmp"]
    for path in old_scheme:  # earlier peftc versions' temp files, from a save killed long ago
        path.write_bytes(b"x")
        os.utime(path, (hour_ago, hour_ago))
    recent_old_scheme = tmp_path / f".{WEIGHTS}.recent_1.tmp"  # maybe a running older peftc's: kept
    recent_old_scheme.write_bytes(b"x")
    # not peftc's writer's: names it never makes, and a user's file inside a folder named like a temp one
    others = [tmp_path / ".tmpAb3dE9", tmp_path / f".{WEIGHTS}.tmp", tmp_path / "notes.txt",
              tmp_path / f".{WEIGHTS}.toolong12.tmp"]
    for path in others:
        path.write_bytes(b"mine")
    kept = _stale_temp_dir(tmp_path, ".peftc-save-keepme00.tmp")
    (kept / "keep.txt").write_text("mine")

    am.save_adapter(str(tmp_path))
    assert not stale.exists()
    assert not any(path.exists() for path in old_scheme)
    assert recent_old_scheme.exists()
    assert all(path.read_bytes() == b"mine" for path in others)
    assert os.listdir(kept) == ["keep.txt"]  # the temp files went, the user's file and so its folder stay


def test_a_running_saves_temp_folder_is_left_alone(tmp_path: Path):
    """A temp folder whose lock is held (a save running in another process) is not removed."""
    am = _wide_adapter(width=64, depth=2, r=8)
    running = _stale_temp_dir(tmp_path)
    fd = os.open(running, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description: conflicts as another process's would
        am.save_adapter(str(tmp_path))
        assert sorted(os.listdir(running)) == [".tmpAb3dE9", WEIGHTS]
    finally:
        os.close(fd)
    am.save_adapter(str(tmp_path))  # its lock released: now it is a killed save's
    assert sorted(os.listdir(tmp_path)) == [CONFIG, WEIGHTS]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_saved_files_have_an_ordinary_files_mode(umask: int, tmp_path: Path):
    """0666 less the umask, as `open(path, "w")` gives (not tempfile's 0600), for new and replaced files."""
    am = _wide_adapter(width=64, depth=2, r=8)
    previous = os.umask(umask)
    try:
        for _ in range(2):  # a new folder, then files replaced
            am.save_adapter(str(tmp_path))
            modes = {name: oct(os.stat(tmp_path / name).st_mode & 0o777) for name in (CONFIG, WEIGHTS)}
            assert modes == {CONFIG: oct(0o666 & ~umask), WEIGHTS: oct(0o666 & ~umask)}
    finally:
        os.umask(previous)
