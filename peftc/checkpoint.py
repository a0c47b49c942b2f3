"""Adapter checkpoints in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Saved keys are PEFT's (`base_model.model.<module>.lora_A.weight`, adapter name stripped), so a
peftc checkpoint loads in `peft.PeftModel.from_pretrained` and a PEFT checkpoint loads here.
Loading is strict: every key and shape is checked before any tensor is touched. Writes go to
temporary files renamed into place, so an interrupted save leaves the previous files intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import names
from .config import CONFIG_NAME, load_config
from .errors import CheckpointError

WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_dir(directory: str | os.PathLike, adapter_name: str) -> str:
    """PEFT's layout: the default adapter in the folder itself, others in a subfolder."""
    directory = os.fspath(directory)
    return directory if adapter_name == "default" else os.path.join(directory, adapter_name)


def adapter_state_dict(model: Any, adapter_name: str) -> dict[str, nn.Parameter]:
    """The adapter's parameters (live, not copies) under PEFT's saved keys."""
    out = {}
    for path, mas in model.targeted_modules.items():
        for ma in mas:
            if ma.adapter != adapter_name:
                continue
            for (group, leaf), (_, tensor) in ma.tensors.items():
                if isinstance(tensor, nn.Parameter):
                    out[names.saved_key(path, group, leaf)] = tensor
    return out


def _config_json(model: Any, adapter_name: str) -> dict[str, Any]:
    data = model.peft_config[adapter_name].to_dict()
    source = model.get_base_model()
    data["inference_mode"] = True  # as PEFT writes it
    name_or_path = getattr(getattr(source, "config", None), "_name_or_path", None)
    if data.get("base_model_name_or_path") is None and name_or_path:
        data["base_model_name_or_path"] = name_or_path
    if data.get("auto_mapping") is None:
        data["auto_mapping"] = {
            "base_model_class": type(source).__name__,
            "parent_library": type(source).__module__,
        }
    return data


def _atomic_write(path: str, write: Any) -> str:
    """Write through `write(tmp_path)` to a temp file beside `path`; return the temp path."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def save_adapter(model: Any, directory: str | os.PathLike, adapter_name: str) -> str:
    """Save one adapter; returns the folder written."""
    if adapter_name not in model.peft_config:
        raise CheckpointError(f"no adapter named {adapter_name!r}; adapters: {sorted(model.peft_config)}")
    out_dir = adapter_dir(directory, adapter_name)
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model, adapter_name).items()}
    config_text = json.dumps(_config_json(model, adapter_name), indent=2, sort_keys=True)

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(config_text + "\n")

    weights_path, config_path = os.path.join(out_dir, WEIGHTS_NAME), os.path.join(out_dir, CONFIG_NAME)
    tmp_weights = _atomic_write(weights_path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    try:
        tmp_config = _atomic_write(config_path, write_json)
    except BaseException:
        os.unlink(tmp_weights)
        raise
    os.replace(tmp_weights, weights_path)
    os.replace(tmp_config, config_path)
    return out_dir


def read_weights(path: str) -> dict[str, torch.Tensor]:
    if not os.path.exists(path):
        bin_path = os.path.join(os.path.dirname(path), "adapter_model.bin")
        extra = f" (found {bin_path}: pickle checkpoints are not loaded)" if os.path.exists(bin_path) else ""
        raise CheckpointError(f"{path}: no such file{extra}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_adapter_weights(model: Any, directory: str, adapter_name: str) -> None:
    """Load `adapter_model.safetensors` into the adapter, after checking every key and shape."""
    path = os.path.join(directory, WEIGHTS_NAME)
    saved = read_weights(path)
    expected = adapter_state_dict(model, adapter_name)
    base = dict(model.named_parameters(remove_duplicate=False))

    missing = sorted(set(expected) - set(saved))
    unexpected, mismatched, base_updates = [], [], {}
    for key, value in saved.items():
        target = expected.get(key)
        if target is None:
            # PEFT saves an adapted embedding's base weight too (for resized vocabularies)
            if f".{names.BASE_LAYER}." in key and key in base:
                target = base[key]
                base_updates[key] = value
            else:
                unexpected.append(key)
                continue
        if tuple(value.shape) != tuple(target.shape):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys (not adapters of this model and config): {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_listing(mismatched)}")
    if problems:
        raise CheckpointError(f"{path} does not fit {type(model.get_base_model()).__name__}: " + "; ".join(problems))

    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(saved[key].to(dtype=target.dtype, device=target.device))
        for fqn, value in base_updates.items():
            _replace_base_tensor(model, fqn, value)


def _replace_base_tensor(model: nn.Module, fqn: str, value: torch.Tensor) -> None:
    """Swap a base tensor for the checkpoint's (and its tied aliases), never writing into shared storage."""
    old = model.get_parameter(fqn)
    if torch.equal(old.detach().cpu(), value.to(old.dtype)):
        return
    new = nn.Parameter(value.to(dtype=old.dtype, device=old.device), requires_grad=False)
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if p is old:
            module_path, attr = names.split_module(name)
            model.get_submodule(module_path).register_parameter(attr, new)


def _listing(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" ... and {len(keys) - n} more" if len(keys) > n else "")


def load(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    example_inputs: Any = None,
) -> Any:
    """Apply the adapter saved in `directory` (by peftc or by PEFT) to `model`.

    As `PeftModel.from_pretrained`: adapters are frozen and the model in eval mode unless
    `is_trainable=True`.
    """
    from .model import AdaptedModel

    directory = os.fspath(directory)
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        what = "no such folder" if not os.path.isdir(directory) else f"no {CONFIG_NAME} in it"
        raise CheckpointError(f"{directory}: {what}")
    config = load_config(config_path)
    config.inference_mode = not is_trainable
    am = AdaptedModel(model, config, adapter_name, example_inputs, training=model.training and is_trainable)
    load_adapter_weights(am, directory, adapter_name)
    return am
