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

import sys
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn as nn

from .config import AdapterConfig
from .errors import CheckpointError
from .graph import SiteBuilder
from .sites import Site
from .targets import pattern_value

# (group, leaf): PEFT's name parts around the adapter name, e.g. ("lora_A", "weight")
TensorKey = tuple[str, "str | None"]


def adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    """The dtype of float adapter tensors over `base_weight`: fp32 over a bf16/fp16 base, as PEFT keeps
    them (autocast_adapter_dtype); fp64 stays fp64."""
    return torch.float64 if base_weight.dtype == torch.float64 else torch.float32


def layer_type(module: nn.Module) -> str | None:
    """The layer kinds methods share, by module type: "linear", "conv1d" (transformers' Conv1D, a Linear
    stored transposed), "nn_conv1d", "conv2d", "conv3d", "embedding"; None for any other module."""
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "conv1d"
    for kind, cls in (("linear", nn.Linear), ("nn_conv1d", nn.Conv1d), ("conv2d", nn.Conv2d),
                      ("conv3d", nn.Conv3d), ("embedding", nn.Embedding)):
        if isinstance(module, cls):
            return kind
    return None


def in_out_features(module: nn.Module, kind: str) -> tuple[int, int]:
    """(in, out) features of a layer of one of the `layer_type` kinds (vocabulary and dim for an embedding)."""
    if kind == "linear":
        return module.in_features, module.out_features
    if kind == "conv1d":
        return tuple(module.weight.shape)  # stored (in, out)
    if kind == "embedding":
        return module.num_embeddings, module.embedding_dim
    return module.in_channels, module.out_channels


def correct_fan_in_fan_out(config: AdapterConfig, modules: dict[str, nn.Module]) -> None:
    """PEFT's correction of `fan_in_fan_out` (for the methods that have the field): an nn.Linear stores its
    weight (out, in), so True is wrong there; transformers' Conv1D stores it (in, out), so False is. As
    PEFT, warn naming the module and set the value the layer needs, target by target in model order; the
    saved config then holds what PEFT's would. (peftc reads each layer's layout from its type, so the value
    never changes what is computed.)"""
    if not hasattr(config, "fan_in_fan_out"):
        return
    level = _user_stacklevel()
    for path, module in modules.items():
        kind = layer_type(module)
        if kind == "linear" and config.fan_in_fan_out:
            warnings.warn(f"fan_in_fan_out is set to True but the target module {path!r} is `torch.nn.Linear`. "
                          "Setting fan_in_fan_out to False.", stacklevel=level)
            config.fan_in_fan_out = False
        elif kind == "conv1d" and not config.fan_in_fan_out:
            warnings.warn(f"fan_in_fan_out is set to False but the target module {path!r} is `Conv1D`. "
                          "Setting fan_in_fan_out to True.", stacklevel=level)
            config.fan_in_fan_out = True


def _user_stacklevel() -> int:
    """The `stacklevel` of a warning issued by the caller that points at the first frame outside peftc:
    the user's `peftc.apply`, `peftc.load` or `add_adapter` line."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("peftc."):
        frame, level = frame.f_back, level + 1
    return level


@dataclass
class AdapterTensors:
    """One adapter's tensors at one module."""

    params: dict[TensorKey, torch.Tensor]  # trainable, saved in checkpoints
    buffers: dict[TensorKey, torch.Tensor] = field(default_factory=dict)  # run-time values (scales), not saved
    # replacement base tensors of the module ("weight": a residual), for inits that rewrite the base weight
    # (PiSSA, OLoRA): the adapted model registers them in place of its base tensors; the user's stay as they were
    base: dict[str, torch.Tensor] = field(default_factory=dict)


class Method(ABC):
    peft_type: str
    config_cls: type[AdapterConfig]
    groups: tuple[str, ...]  # parameter groups as PEFT names them (the saved key's last segments)
    layer_types: dict[str, str]  # kind -> the module type it stands for, for messages and the README
    site_ops: dict[str, tuple[str, ...]]  # kind -> aten ops (overload packet names) a site of it may be
    mergeable: bool = True  # whether `fold` is defined
    # config-selected variants -> the kinds they support, for the README's method table
    variants: dict[str, tuple[str, ...]] = {}

    def layer_kind(self, module: nn.Module) -> str | None:
        """The kind of layer `module` is for this method, or None if the method cannot adapt it (by default
        its `layer_type`, where the method lists that kind in `layer_types`)."""
        kind = layer_type(module)
        return kind if kind in self.layer_types else None

    def module_kind(self, config: AdapterConfig, module_name: str, module: nn.Module) -> str | None:
        """The kind of the targeted module `module_name` under `config`: its `layer_kind`, unless the
        method treats modules differently by name (IA3's feed-forward modules get kinds of their own)."""
        return self.layer_kind(module)

    def settings(self, config: AdapterConfig, module_name: str) -> dict[str, float]:
        """The hyperparameters in effect at one module, by PEFT's field names (reports and tables):
        by default the rank, where the method has one, after `rank_pattern`."""
        r = getattr(config, "r", None)
        if not isinstance(r, int):
            return {}
        return {"r": pattern_value(getattr(config, "rank_pattern", None) or {}, module_name, r)}

    @abstractmethod
    def create(self, config: AdapterConfig, module_name: str, module: nn.Module, kind: str) -> AdapterTensors:
        """Parameters and run-time buffers for one adapted module, initialised as PEFT does."""

    def create_shared(
        self, config: AdapterConfig, targets: dict[str, tuple[nn.Module, str]]
    ) -> dict[TensorKey, torch.Tensor]:
        """Frozen tensors one adapter shares across all its modules (VeRA's random projections), made
        once from every target (module path -> (module, kind)); each module's `emit` and `fold` get
        them among its tensors. Default: none."""
        return {}

    def saves_shared(self, config: AdapterConfig) -> bool:
        """Whether checkpoints carry the shared tensors (otherwise they are rebuilt from the config)."""
        return True

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

    def emit_mixed(
        self,
        b: SiteBuilder,
        site: Site,
        y: torch.fx.Node,
        kind: str,
        slots: list[tuple[dict[TensorKey, torch.fx.Node], AdapterConfig] | None],
        index: torch.fx.Node,
        training: bool,
    ) -> torch.fx.Node | None:
        """Optional batched lowering of several adapters of this method at one site, each sample
        picking slot `index[i]` (-1: none; None slots do not adapt this module). Return None to
        use the dispatch pass's generic per-sample form."""
        return None

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

    def subtract_mutated_init(
        self,
        config: AdapterConfig,
        tensors: dict[TensorKey, torch.Tensor],
        initial: dict[TensorKey, torch.Tensor],
    ) -> dict[TensorKey, torch.Tensor]:
        """PEFT's `path_initial_model_for_weight_conversion`: the saved tensors of one module for an
        adapter that, on the original (unmutated) base, computes what `tensors` compute on the mutated
        base that `initial` (the adapter's values right after init) came with."""
        raise CheckpointError(f"{self.peft_type} adapters have no conversion against an initial adapter")

    def subtracted_config(self, config: AdapterConfig) -> AdapterConfig:
        """The config saved with `subtract_mutated_init`'s tensors."""
        raise CheckpointError(f"{self.peft_type} adapters have no conversion against an initial adapter")


@dataclass
class ModuleAdapter:
    """An adapter placed on one module: what the adapt pass needs to rewrite its sites."""

    module_path: str
    adapter: str
    method: Method
    kind: str
    config: AdapterConfig
    tensors: dict[TensorKey, tuple[str, torch.Tensor]]  # key -> (fqn in the adapted model, tensor)
