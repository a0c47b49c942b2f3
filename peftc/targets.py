"""Target selection with PEFT's semantics, over the model's module names.

- `target_modules` list: a module matches if its name equals an entry or ends with `.entry`;
  a string is a regex that must fullmatch the name; "all-linear" is every Linear/Conv1D
  except the output head.
- `exclude_modules`: same rules, applied first.
- `layers_to_transform` (+ `layers_pattern`): keep matches whose first numbered segment (after
  the pattern, if given) is one of the indices.
- `rank_pattern` / `alpha_pattern`: the first key `k` for which `(.*\\.)?(k)$` matches the name.
"""

from __future__ import annotations

import re
from typing import Any

import torch.nn as nn

from .errors import TargetError, closest

ALL_LINEAR = "all-linear"


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def output_head_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((name for name, m in model.named_modules() if m is head), None)


def expand_all_linear(model: nn.Module) -> list[str]:
    """PEFT's "all-linear": every Linear/Conv1D module except the output head."""
    head = output_head_name(model)
    return sorted(name for name, m in model.named_modules() if name and is_linear(m) and name != head)


def _matches_list(key: str, names: list[str] | set[str]) -> bool:
    return key in names or any(key.endswith(f".{n}") for n in names)


def _layer_index(key: str, layers_pattern: list[str] | str | None) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def is_target(config: Any, key: str) -> bool:
    """PEFT's `check_target_module_exists` for one module name."""
    exclude = getattr(config, "exclude_modules", None)
    if exclude:
        if isinstance(exclude, str) and re.fullmatch(exclude, key):
            return False
        if not isinstance(exclude, str) and _matches_list(key, exclude):
            return False
    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    layers = getattr(config, "layers_to_transform", None)
    if found and layers is not None and (not isinstance(layers, list) or layers):
        index = _layer_index(key, getattr(config, "layers_pattern", None))
        if index is None:
            return False
        return index == layers if isinstance(layers, int) else index in layers
    return found


def resolve_all_linear(config: Any, model: nn.Module) -> Any:
    """Replace target_modules="all-linear" by the module names it stands for (as PEFT does)."""
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        config.target_modules = expand_all_linear(model)
    return config


def select_targets(config: Any, model: nn.Module) -> list[str]:
    """Names of the modules `config` targets, in model order; an error if there are none."""
    names = [name for name, _ in model.named_modules() if name]
    matched = [name for name in names if is_target(config, name)]
    if not matched:
        targets = config.target_modules
        wanted = [targets] if isinstance(targets, str) else list(targets)
        hints = {t: closest(t, names) for t in wanted}
        raise TargetError(
            f"target_modules={targets!r} matched no module of {type(model).__name__}"
            + (f" (after exclude_modules={config.exclude_modules!r})" if getattr(config, "exclude_modules", None)
               else "")
            + (f" (with layers_to_transform={config.layers_to_transform!r})"
               if getattr(config, "layers_to_transform", None) is not None else "")
            + "; closest module names: "
            + "; ".join(f"{t!r} -> {h}" for t, h in hints.items())
        )
    return matched


def pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """PEFT's `get_pattern_key`: the first pattern matching the end of the module name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default
