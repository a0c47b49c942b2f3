"""`add_weighted_adapter` on an adapted model: a new LoRA adapter whose factors combine loaded ones.

The tensor maths is `peftc.combine` (PEFT's numerics, plus the exact "delta"); this module builds the
new adapter's config, places it like any other adapter, and fills its factors module by module.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import torch

from peftc.passes.lora_mha import MHA_IN, MHA_OUT

from .adapters import EXTRAS, has_extras
from .combine import combine_lora, combined_rank_alpha
from .errors import ConfigError
from .method import ModuleAdapter, TensorKey


def add_weighted_adapter(model: Any, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, **options: Any) -> None:
    """Add `adapter_name` to `model` (an AdaptedModel): LoRA `adapters` combined with `weights`. `options` are
    PEFT's (`svd_clamp`, `svd_full_matrices`, `svd_driver`, `density`, `majority_sign_method`)."""
    configs = []
    for name in adapters:
        if name not in model.peft_config:
            raise ConfigError(f"adapters: no adapter named {name!r}; loaded: {model.adapter_order}")
        config = model.peft_config[name]
        if config.peft_type != "LORA":
            raise ConfigError(f"adapters: {name!r} is a {config.peft_type} adapter; only LoRA adapters combine")
        if has_extras(config):
            raise ConfigError(f"adapters: {name!r} has {', '.join(EXTRAS)} set; add_weighted_adapter combines "
                              "the low-rank factors of plain LoRA adapters only")
        reshaped = [f for f in ("kasa_config", "use_bdlora") if getattr(config, f, None) is not None]
        if reshaped:  # (PEFT combines lora_A and lora_B alone here: it drops KaSA's diagonal, misreads BD's blocks)
            raise ConfigError(f"adapters: {name!r} has {reshaped[0]} set; its update is not B·A, which "
                              "add_weighted_adapter combines")
        configs.append(config)
    if len(weights) != len(adapters):
        raise ConfigError(f"weights has {len(weights)} entries for {len(adapters)} adapters")
    ranks = [max([c.r, *c.rank_pattern.values()]) for c in configs]
    r, alpha = combined_rank_alpha(combination_type, ranks, svd_rank)
    modules = model.adapter_set.modules
    targets = sorted({path for path, mas in modules.items() if any(ma.adapter in adapters for ma in mas)})
    config = dataclasses.replace(  # targets: exactly the modules any source adapts (a full-match regex)
        configs[0], r=r, lora_alpha=alpha, target_modules="|".join(re.escape(t) for t in targets),
        rank_pattern={}, alpha_pattern={}, layers_to_transform=None, layers_pattern=None, exclude_modules=None,
        # "delta" is exact at scale 1 even for rsLoRA sources (PEFT's combinations keep use_rslora)
        use_rslora=configs[0].use_rslora and combination_type != "delta",
    )
    model.add_adapter(adapter_name, config)
    try:
        _combine_into(modules, adapter_name, adapters, weights,
                      dict(combination_type=combination_type, svd_rank=r, pad_to=r, **options))
    except BaseException:
        model.delete_adapter(adapter_name)  # no half-made adapter left behind
        raise


# kinds whose factors are laid out as an nn.Linear's: A (r, in), B (out, r) for a weight (out, in)
FACTOR_LAYOUT = {MHA_IN: "linear", MHA_OUT: "linear"}


def _combine_into(modules: dict[str, list[ModuleAdapter]], adapter_name: str, adapters: Sequence[str],
                  weights: Sequence[float], options: dict) -> None:
    with torch.no_grad():
        for mas in modules.values():
            new = next((ma for ma in mas if ma.adapter == adapter_name), None)
            sources = [(ma, w) for name, w in zip(adapters, weights) for ma in mas if ma.adapter == name]
            if new is None or not sources:
                continue
            a_key, b_key = _lora_factor_keys(new)
            a, b = combine_lora(
                [ma.tensors[a_key][1] for ma, _ in sources], [ma.tensors[b_key][1] for ma, _ in sources],
                [float(ma.tensors[("lora_scaling", None)][1]) for ma, _ in sources], [w for _, w in sources],
                kind=FACTOR_LAYOUT.get(new.kind, new.kind), **options,
            )
            new.tensors[a_key][1].copy_(a)
            new.tensors[b_key][1].copy_(b)


def _lora_factor_keys(ma: ModuleAdapter) -> tuple[TensorKey, TensorKey]:
    if ma.kind == "embedding":
        return ("lora_embedding_A", None), ("lora_embedding_B", None)
    return ("lora_A", "weight"), ("lora_B", "weight")
