"""`create_arrow_model`: PEFT's entry point for Arrow routing, over LoRA experts saved by PEFT or peftc.

    am = peftc.create_arrow_model(model, ["experts/0", "experts/1", "experts/2"],
                                  {"top_k": 2, "router_temperature": 1.0, "rng_seed": 0},
                                  general_adapter_paths=["general/0"])   # with "use_gks": True

As PEFT's `peft.create_arrow_model`: the task adapters load as `task_0, task_1, ...`, the general ones (for
GenKnowSub) as `gks_0, ...`; all must be LoRA adapters of one rank on the same modules. A LoRA adapter named
`arrow_router` with the `arrow_config` is then added on those modules and activated (passes/lora_arrow.py
computes its routing). The experts stay loaded as they were, frozen: `set_adapter("task_1")` runs one alone.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from .api import load
from .config import ARROW_FIELDS
from .errors import ConfigError
from .model import AdaptedModel

TASK_ADAPTER_PREFIX, GKS_ADAPTER_PREFIX, ROUTER = "task_", "gks_", "arrow_router"


def create_arrow_model(
    base_model: nn.Module,
    task_specific_adapter_paths: Sequence[str | os.PathLike],
    arrow_config: Any,
    general_adapter_paths: Sequence[str | os.PathLike] | None = None,
    example_inputs: Any = None,
) -> AdaptedModel:
    """Load the task adapters (and, with `use_gks`, the general adapters) from their folders into `base_model`,
    add the Arrow router over them and activate it (PEFT's `create_arrow_model`). `arrow_config` is PEFT's
    `ArrowConfig` or a dict of its fields; `example_inputs` as in `peftc.apply`."""
    if not task_specific_adapter_paths:
        raise ConfigError("task_specific_adapter_paths should contain at least one adapter path")
    arrow = _fields(arrow_config)
    tasks = [f"{TASK_ADAPTER_PREFIX}{i}" for i in range(len(task_specific_adapter_paths))]
    general: list[str] = []
    if arrow["use_gks"]:
        if not general_adapter_paths:
            raise ConfigError("arrow_config['use_gks']=True: give the general LoRA adapters' folders "
                              "(general_adapter_paths) to subtract")
        general = [f"{GKS_ADAPTER_PREFIX}{i}" for i in range(len(general_adapter_paths))]
    folders = dict(zip(tasks, map(os.fspath, task_specific_adapter_paths)))
    folders.update(zip(general, map(os.fspath, general_adapter_paths or [])))

    am = load(base_model, folders[tasks[0]], adapter_name=tasks[0], example_inputs=example_inputs)
    for name in [*tasks[1:], *general]:
        am.load_adapter(folders[name], adapter_name=name)
    paths, r = _common_layout(am, folders)
    router = {"peft_type": "LORA", "r": r, "target_modules": paths,
              "arrow_config": {**arrow, "task_adapter_names": tasks, "gks_adapter_names": general}}
    am.add_adapter(ROUTER, router)
    am.set_adapter(ROUTER)
    return am


def _fields(arrow_config: Any) -> dict[str, Any]:
    """PEFT's ArrowConfig (a dataclass) or a dict, as a dict of its fields."""
    if dataclasses.is_dataclass(arrow_config) and not isinstance(arrow_config, type):
        arrow_config = dataclasses.asdict(arrow_config)
    if not isinstance(arrow_config, dict):
        raise ConfigError(f"arrow_config must be PEFT's ArrowConfig or a dict of {sorted(ARROW_FIELDS)}, "
                          f"got {arrow_config!r}")
    return {**ARROW_FIELDS, **arrow_config}


def _common_layout(am: AdaptedModel, folders: dict[str, str]) -> tuple[list[str], int]:
    """The modules and the rank every expert shares (PEFT's check_loaded_lora_compatibility_arrow and
    ensure_adapters_target_linear_layers_only), or an error naming the adapter's folder."""
    layouts = {name: _layout(am, name, folder) for name, folder in folders.items()}
    first, (first_paths, r) = next(iter(layouts.items()))
    for name, (paths, rank) in layouts.items():
        if rank != r:
            raise ConfigError(f"{folders[name]}: rank {rank} differs from the rank {r} of {folders[first]}; Arrow's "
                              "experts share one rank (as in PEFT)")
        if paths != first_paths:
            raise ConfigError(f"{folders[name]}: the adapter's modules differ from those of {folders[first]} (only "
                              f"here: {sorted(set(paths) - set(first_paths))}, only there: "
                              f"{sorted(set(first_paths) - set(paths))}); Arrow's experts share their modules")
    return first_paths, r


def _layout(am: AdaptedModel, name: str, folder: str) -> tuple[list[str], int]:
    """One loaded expert's module paths and rank, checked to be a LoRA adapter of one rank on Linear layers."""
    config, placed = am.peft_config[name], am.adapter_set.of(name)
    if config.peft_type != "LORA" or config.arrow_config is not None:
        raise ConfigError(f"{folder}: an Arrow expert must be a LoRA adapter, not {config.peft_type}"
                          + (" with arrow_config" if config.arrow_config is not None else ""))
    not_linear = sorted(ma.module_path for ma in placed if ma.kind not in ("linear", "conv1d"))
    if not_linear:
        raise ConfigError(f"{folder}: Arrow routes LoRA experts on Linear layers (nn.Linear, transformers' Conv1D) "
                          f"only; this adapter is also on {not_linear}")
    ranks = sorted({ma.tensors[("lora_A", "weight")][1].shape[0] for ma in placed})
    if len(ranks) != 1:
        raise ConfigError(f"{folder}: the adapter's rank differs between its modules ({ranks}); Arrow stacks its "
                          "experts, which need one rank")
    return sorted({ma.module_path for ma in placed}), ranks[0]
