"""The method contract: what a PEFT method provides so every pass can be written once.

A method is data plus functions:
  - `config_cls`: its config (PEFT field names and defaults);
  - `layer_kind` / `create`: which modules it adapts and their parameters + initialisation;
  - `emit`: the subgraph inserted beside the base op (the unmerged, activation-path form);
  - `fold`: the module's merged tensors (W + delta, or the method's transform of W), where the
    method is mergeable.
Folding, dispatch, save/load and export are written against this, never per method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn as nn

from .config import AdapterConfig
from .graph import SiteBuilder
from .sites import Site

# (group, leaf): PEFT's name parts around the adapter name, e.g. ("lora_A", "weight")
TensorKey = tuple[str, "str | None"]


@dataclass
class AdapterTensors:
    """One adapter's tensors at one module."""

    params: dict[TensorKey, torch.Tensor]  # trainable, saved in checkpoints
    buffers: dict[TensorKey, torch.Tensor] = field(default_factory=dict)  # run-time values (scales), not saved


class Method(ABC):
    peft_type: str
    config_cls: type[AdapterConfig]
    groups: tuple[str, ...]  # parameter groups as PEFT names them (the saved key's last segments)
    layer_types: dict[str, str]  # kind -> the module type it stands for, for messages and the README
    site_ops: dict[str, tuple[str, ...]]  # kind -> aten ops (overload packet names) a site of it may be
    mergeable: bool = True  # whether `fold` is defined

    @abstractmethod
    def layer_kind(self, module: nn.Module) -> str | None:
        """The kind of layer `module` is for this method, or None if the method cannot adapt it."""

    @abstractmethod
    def create(self, config: AdapterConfig, module_name: str, module: nn.Module, kind: str) -> AdapterTensors:
        """Parameters and run-time buffers for one adapted module, initialised as PEFT does."""

    @abstractmethod
    def emit(
        self,
        b: SiteBuilder,
        site: Site,
        y: torch.fx.Node,
        kind: str,
        tensors: dict[TensorKey, torch.fx.Node],
        config: AdapterConfig,
        training: bool,
    ) -> torch.fx.Node:
        """Insert the adapter after the base op whose current output is `y`; return the new output."""

    def fold(
        self,
        kind: str,
        config: AdapterConfig,
        module: nn.Module,
        tensors: dict[TensorKey, torch.Tensor],
        base: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The module's tensors with this adapter merged in, exactly as `emit` computes.

        `base` holds the module's current "weight" (and "bias" when it has one) in its own layout;
        return the entries the adapter changes. Everything arrives in fp32 (fp64 stays fp64) and
        the caller casts the result to the base dtype once, so methods never round twice.
        """
        raise NotImplementedError(f"{self.peft_type} adapters cannot be merged into the base weights")


@dataclass
class ModuleAdapter:
    """An adapter placed on one module: what the adapt pass needs to rewrite its sites."""

    module_path: str
    adapter: str
    method: Method
    kind: str
    config: AdapterConfig
    tensors: dict[TensorKey, tuple[str, torch.Tensor]]  # key -> (fqn in the adapted model, tensor)
