"""What the data-driven LoRA inits (CorDA, LoRA-GA) gather from the user's model before `peftc.apply`.

PEFT's `preprocess_corda` / `preprocess_loraga` run the user's data through the model and attach their results
to the targeted modules (`module.eigens`, `module._peft_loraga_grad`), which `get_peft_model` then consumes. peftc
keeps the user's modules free of attributes: the results are held here, keyed by the storage of each targeted
weight. `apply` adapts a structural copy whose parameters share that storage, so `Lora.create` finds them from the
copy's weight; it takes them (as PEFT deletes its attributes), and they are dropped when the weight is freed.
"""

from __future__ import annotations

import copy
import os
import weakref
from typing import Any

import torch
import torch.nn as nn

from peftc.config import LoraConfig, load_config
from peftc.errors import ConfigError
from peftc.method import layer_type
from peftc.targets import resolve_all_linear, select_targets

Key = tuple[Any, ...]
_HELD: dict[Key, dict[str, Any]] = {}


def _key(weight: torch.Tensor) -> Key:
    return (weight.device, weight.untyped_storage().data_ptr(), weight.storage_offset(), tuple(weight.shape),
            tuple(weight.stride()), weight.dtype)


def hold(weight: torch.Tensor, init: str, value: Any) -> None:
    """Keep `value` for the init `init` of the layer owning `weight` until it is taken or `weight` is freed."""
    key = _key(weight)
    if key not in _HELD:
        _HELD[key] = {}
        weakref.finalize(weight, _HELD.pop, key, None)
    _HELD[key][init] = value


def take(weight: torch.Tensor, init: str) -> Any:
    """What `hold` kept for `init` at this weight (or a parameter sharing its storage), removed; None if nothing."""
    return _HELD.get(_key(weight), {}).pop(init, None)


def data_config(config: Any, model: nn.Module, field: str, init: str) -> LoraConfig:
    """The LoRA config a preprocess function reads (PEFT's LoraConfig, a dict, a peftc config or a path), with
    "all-linear" expanded as `apply` will."""
    config = copy.deepcopy(load_config(config))
    if not isinstance(config, LoraConfig) or getattr(config, field) is None:
        raise ConfigError(f"preprocessing for {init} needs a LoRA config with init_lora_weights={init!r} and "
                          f"{field} set")
    return resolve_all_linear(config, model)


def data_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The targeted nn.Linear and transformers Conv1D modules, in model order: where PEFT's preprocess functions
    gather statistics (other targeted layers get the default init, or are refused when the adapter is created)."""
    return [(name, model.get_submodule(name)) for name in select_targets(config, model)
            if layer_type(model.get_submodule(name)) in ("linear", "conv1d")]


def load_cache(path: str | None, what: str) -> dict[str, torch.Tensor] | None:
    """A cache file PEFT's preprocess functions write (`torch.save` of a dict of tensors), if it exists and is not
    empty (as PEFT tests it); read with `weights_only=True`, so it runs no pickled code."""
    if path is None or not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch.load raises many kinds: name the file whatever it is)
        raise ConfigError(f"{path}: cannot read the {what} ({type(e).__name__}: {e})") from None
    if not isinstance(cache, dict) or not all(isinstance(v, torch.Tensor) for v in cache.values()):
        raise ConfigError(f"{path}: not a {what} (a dict of tensors, as PEFT saves it)")
    return cache


def cached(cache: dict[str, torch.Tensor], key: str, path: str, weight: torch.Tensor) -> torch.Tensor:
    if key not in cache:
        raise ConfigError(f"{path}: no {key!r}: the cache was built for other target modules")
    return cache[key].to(weight.device)


def save_cache(path: str, tensors: dict[str, torch.Tensor]) -> None:
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    torch.save(tensors, path)
