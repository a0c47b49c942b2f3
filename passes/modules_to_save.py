"""`modules_to_save`: whole modules trained as a copy per adapter (a classifier head), for every method whose
config has the field (LoRA, IA3, LoHa, LoKr, OFT, BOFT, HRA, VeRA, ...), as PEFT's `_set_trainable` is.

PEFT's ModulesToSaveWrapper: the module keeps its original at `<module>.original_module.<param>`, each
adapter a trainable copy at `<module>.modules_to_save.<adapter>.<param>`, saved as `<module>.<param>`.
Here every parameter of the module is rebound, inside the module, to the active adapter's copy
(passes/rebind.py); folding is the same rebinding, so a merged copy is just the copy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn

from peftc.config import AdapterConfig
from peftc.errors import ConfigError
from peftc.method import (
    ANY,
    AdapterTensors,
    EmitContext,
    Method,
    ModuleAdapter,
    Placed,
    Placement,
    Target,
    TensorKey,
    register_method,
)
from peftc.names import MODULES_TO_SAVE, ORIGINAL_MODULE


@dataclass
class CopyAdapter(ModuleAdapter):
    """One adapter's trainable copy of a whole module (keyed, and named, by the module's path)."""

    @property
    def wrapper(self) -> str:
        """Where the module's own tensors live: `<module>.original_module`."""
        return f"{self.module_path}.{ORIGINAL_MODULE}"


@register_method
class ModulesToSave(Method):
    """`modules_to_save`: a part of any method's config that has the field, placed at the modules it names."""

    peft_type = ANY
    config_cls = AdapterConfig
    placement = Placement.WEIGHT
    part_of_field = "modules_to_save"
    description = "trained copies (and the heads task_type SEQ_CLS/TOKEN_CLS/QUESTION_ANS adds)"
    example_config = {"peft_type": "LORA", "r": 2, "target_modules": ["lin0"], "modules_to_save": ["lin1"]}
    groups = (MODULES_TO_SAVE,)
    layer_types = {"module": "any module (a trained copy)"}
    site_ops = {"module": ()}

    def targets(self, config: AdapterConfig, model: nn.Module, adapter: str, placed: Placed) -> list[Target]:
        """The modules named (PEFT: the outermost whose name ends with an entry), adapted by nothing else."""
        if not config.modules_to_save:
            return []
        paths = modules_to_save(config, model)
        tokens = placed.part_paths("trainable_token_indices")
        for path in paths:
            if path in tokens:
                raise ConfigError(f"module {path!r} is in modules_to_save and has trainable_token_indices; "
                                  "choose one (PEFT refuses both too)")
            if any(not isinstance(ma, CopyAdapter) for ma in placed.modules.get(path, [])):
                raise ConfigError(f"module {path!r} is in modules_to_save but another adapter adapts it")
        return [Target(path, path, model.get_submodule(path), "module") for path in paths]

    def adapter(self, target: Target, adapter: str, config: AdapterConfig,
                tensors: dict[TensorKey, tuple[str, torch.Tensor]]) -> CopyAdapter:
        return CopyAdapter(target.names_at, adapter, self, target.kind, config, tensors)

    def create(self, config: AdapterConfig, module_name: str, module: nn.Module, kind: str) -> AdapterTensors:
        if any(True for _ in module.buffers()):
            raise ConfigError(f"modules_to_save: {module_name!r} ({type(module).__name__}) has buffers; peftc trains "
                              "copies of modules with parameters only")
        return AdapterTensors(params={(MODULES_TO_SAVE, name): p.detach().clone()
                                      for name, p in module.named_parameters()})

    def emit(self, ctx: EmitContext) -> torch.fx.Node:
        """The adapter's copy of the parameter `ctx.site.param` (a ParamSite), in place of its value `ctx.y`."""
        return ctx.tensors[(MODULES_TO_SAVE, ctx.site.param)]

    def fold(self, kind: str, config: AdapterConfig, module: nn.Module, tensors: dict[TensorKey, torch.Tensor],
             base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {leaf: t.clone() for (_, leaf), t in tensors.items()}


def modules_to_save(config: AdapterConfig, model: nn.Module) -> list[str]:
    """Paths of the modules `config.modules_to_save` names (PEFT: a module whose name ends with an entry,
    the outermost one where they nest; the config already lists the heads its task type adds)."""
    wanted = list(config.modules_to_save or [])
    found: list[str] = []
    for path, _ in model.named_modules():
        if path and any(path.endswith(w) for w in wanted) and not any(path.startswith(f + ".") for f in found):
            found.append(path)
    if wanted and not found:
        raise ConfigError(f"modules_to_save={config.modules_to_save!r} matched no module of {type(model).__name__}")
    return found


def excluded_by_copies(path: str, wanted: list[str] | None) -> bool:
    """PEFT leaves a module inside a `modules_to_save` entry out of target_modules."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in wanted or ())

