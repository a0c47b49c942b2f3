"""The method contract: what a PEFT method provides so every pass can be written once.

A method is data plus functions:
  - `config_cls`: its config (PEFT field names and defaults), registered with the method by
    `@register_method` (one registry for methods and configs);
  - `placement`: where its subgraph goes (`Placement`);
  - `layer_kind` / `create`: which modules it adapts and their parameters + initialisation;
  - `emit(ctx)`: the subgraph inserted at its placement (the unmerged, activation-path form);
  - `fold`: the module's merged tensors (W + delta, or the method's transform of W), where the
    method is mergeable;
  - `example_config`: a small config with PEFT's field names that adapts an MLP-like model; the
    contract test (tests/passes/test_contract.py) checks every registered method with it.
Folding, dispatch, save/load and export are written against this, never per method.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
import torch.fx
import torch.nn as nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .config import AdapterConfig, register_config
from .errors import CheckpointError
from .graph import Call, SiteBuilder
from .targets import pattern_value, resolve_all_linear

# (group, leaf): PEFT's name parts around the adapter name, e.g. ("lora_A", "weight")
TensorKey = tuple[str, "str | None"]


def adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    """The dtype of float adapter tensors over `base_weight`: fp32 over a bf16/fp16 base, as PEFT keeps
    them (autocast_adapter_dtype); fp64 stays fp64."""
    return torch.float64 if base_weight.dtype == torch.float64 else torch.float32


def base_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight whose device and dtype PEFT gives a layer's adapter (an nn.MultiheadAttention's out_proj's)."""
    if isinstance(module, nn.MultiheadAttention):
        module = module.out_proj
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def as_peft_stores(value: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """A created adapter tensor as PEFT holds it over a layer whose base `weight` is given: PEFT initialises in
    fp32, moves the adapter to that weight's dtype (`_move_adapter_to_device_of_base_layer`) and casts it back
    (`autocast_adapter_dtype`), so over a bf16/fp16 base it keeps that dtype's rounding of the drawn value."""
    if weight is not None and weight.dtype in (torch.bfloat16, torch.float16) and value.is_floating_point():
        return value.to(weight.dtype).to(value.dtype)
    return value


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


class Placement(str, enum.Enum):
    """Where a method's subgraph goes (docs/method-contract.md)."""

    OP_SITE = "op_site"  # beside an op that consumes a frozen weight (linear, addmm, conv, embedding)
    WEIGHT = "weight"  # a parameter rebound inside its module (target_parameters, modules_to_save)
    INPUT = "input"  # the input embeddings (prompt tuning, p-tuning): none implemented yet
    ATTENTION_KV = "attention_kv"  # the keys and values attention sees (prefix tuning): none implemented yet


@dataclass
class SiteContext:
    """What a method's `emit` / `emit_mixed` is given at one site.

    At an OP_SITE, `site` is the weight-consuming op and `y` its current output (the base op's, or the
    previous adapter's there). At a WEIGHT placement, `site` is a `ParamSite` and `y` the parameter's
    current value inside its module (the base tensor, or the previous adapter's result)."""

    builder: SiteBuilder
    site: Any  # Site (OP_SITE) or ParamSite (WEIGHT)
    y: torch.fx.Node
    kind: str
    training: bool


@dataclass
class EmitContext(SiteContext):
    """One adapter at one site: its tensors (graph inputs, by PEFT's key) and its config. For a method whose
    `reads_beside(config)` is true, `beside` holds every other adapter placed on the module, active or not, in
    placement order: (name, config, tensors as graph inputs) (an Arrow router reads its experts there)."""

    tensors: dict[TensorKey, torch.fx.Node] = field(default_factory=dict)
    config: AdapterConfig | None = None
    beside: list[tuple[str, AdapterConfig, dict[TensorKey, torch.fx.Node]]] = field(default_factory=list)


@dataclass
class MixedEmitContext(SiteContext):
    """Several adapters of one method at one site, each sample picking slot `index[i]` (-1: none);
    a None slot does not adapt this module."""

    slots: list[tuple[dict[TensorKey, torch.fx.Node], AdapterConfig] | None] = field(default_factory=list)
    index: torch.fx.Node | None = None
    rows: Any = None  # the batch size (a symbol or an int) that `index` has one entry per; None where unknown

    def batch_first(self, node: torch.fx.Node) -> bool:
        """Whether `node`'s dim 0 is provably the batch `index` runs over (a sample per row)."""
        val = node.meta.get("val")
        return (self.rows is not None and isinstance(val, torch.Tensor) and val.dim() > 0
                and statically_known_true(val.shape[0] == self.rows))


@dataclass(frozen=True)
class ParamSite:
    """A WEIGHT placement's site: parameter `param` of module `owner`, read inside that module
    (`transposed`: the owner's `is_transposed`, an expert stack stored (E, in, out))."""

    owner: str
    param: str
    transposed: bool = False


@dataclass
class Target:
    """One place a method puts one adapter: found by `Method.targets` (or, for a method's own
    `target_modules`, by peftc.targets), created by `Method.create`, recorded by `Method.adapter`."""

    path: str  # the module the adapter set keys the adapter by
    module_name: str  # the name `create` gets: the module's path, or a parameter's full name
    module: nn.Module  # the module `create` gets: the layer, or the parameter's owner
    kind: str
    name_path: str = ""  # where PEFT names the adapter's tensors (a wrapper path), when not `path`
    tied: str | None = None  # the path of an earlier target whose tensors this one shows, unsaved
    extra: dict[str, Any] = field(default_factory=dict)  # fields of the method's ModuleAdapter subclass
    # a part's target that PEFT makes a layer of the method: the module whose bias `bias="<method>_only"` trains
    # (an nn.MultiheadAttention's wrapped out_proj); a method's own targets train their own module's
    bias_module: str | None = None

    @property
    def names_at(self) -> str:
        return self.name_path or self.path


@dataclass
class AdapterTensors:
    """One adapter's tensors at one module."""

    params: dict[TensorKey, torch.Tensor]  # trainable, saved in checkpoints
    buffers: dict[TensorKey, torch.Tensor] = field(default_factory=dict)  # run-time values (scales), not saved
    # frozen values in the state dict but not in checkpoints (AdaLoRA's `ranknum`, which PEFT keeps as a frozen
    # parameter and leaves out of its saved files)
    state: dict[TensorKey, torch.Tensor] = field(default_factory=dict)
    # replacement base tensors of the module ("weight": a residual), for inits that rewrite the base weight
    # (PiSSA, OLoRA): the adapted model registers them in place of its base tensors; the user's stay as they were
    base: dict[str, torch.Tensor] = field(default_factory=dict)


class Method(ABC):
    peft_type: str
    config_cls: type[AdapterConfig]
    placement: ClassVar[Placement] = Placement.OP_SITE
    # a small config (PEFT's field names) the contract test (tests/passes/test_contract.py) checks the method
    # with, on `example_model` (a tests/zoo.py model: "mlp" has Linear layers lin0 (12->24) and lin1 (24->8));
    # the kinds the method supports are `layer_types`'s keys
    example_config: ClassVar[dict[str, Any]] = {}
    example_model: ClassVar[str] = "mlp"
    # the config field that selects this method as a part of another method's config (LoRA's
    # `target_parameters`, ...); None for a method of its own, selected by `peft_type`. A part whose
    # `peft_type` is ANY is a part of every method whose config has that field (`modules_to_save`)
    part_of_field: ClassVar[str | None] = None
    description: ClassVar[str] = ""  # a part of every method (ANY): what its README table row says
    groups: tuple[str, ...]  # parameter groups as PEFT names them (the saved key's last segments)
    layer_types: dict[str, str]  # kind -> the module type it stands for, for messages and the README
    site_ops: dict[str, tuple[str, ...]]  # kind -> aten ops (overload packet names) a site of it may be
    mergeable: bool = True  # whether `fold` is defined
    # config-selected variants -> the kinds they support, for the README's method table
    variants: dict[str, tuple[str, ...]] = {}
    unmergeable_variants: frozenset[str] = frozenset()  # those of `variants` whose `fold` refuses (Arrow's router)

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

    def prepare_config(self, config: AdapterConfig, model: nn.Module) -> AdapterConfig:
        """The config with the fields that depend on the model filled in, as PEFT's `_prepare_adapter_config`
        does (a copy the caller owns): by default `target_modules="all-linear"` expanded to module names."""
        return resolve_all_linear(config, model)

    def own_targets(self, config: AdapterConfig, model: nn.Module, found: list[Target]) -> list[Target]:
        """The method's own targets, from those its `target_modules` select (`found`, in model order): by
        default as found; a method adapting more than it is pointed at adds those here (trainable tokens:
        the heads tied to each embedding)."""
        return found

    def targets(self, config: AdapterConfig, model: nn.Module, adapter: str, placed: Placed) -> list[Target]:
        """Where a part (`part_of_field`) places `config`'s adapter in `model`, with PEFT's names and
        nesting, checked against the adapters already `placed`. A method's own `target_modules` are
        resolved by the adapter set, the same for every method."""
        return []

    def adapter(self, target: Target, adapter: str, config: AdapterConfig,
                tensors: dict[TensorKey, tuple[str, torch.Tensor]]) -> ModuleAdapter:
        """The record the passes read for one placed adapter (a part adds fields of its own)."""
        return ModuleAdapter(target.names_at, adapter, self, target.kind, config, tensors)

    def create_shared(
        self, config: AdapterConfig, targets: dict[str, tuple[nn.Module, str]]
    ) -> dict[TensorKey, torch.Tensor]:
        """Frozen tensors one adapter shares across all its modules (VeRA's random projections), made
        once from every target (module path -> (module, kind)); each module's `emit` and `fold` get
        them among its tensors. Default: none."""
        return {}

    def saved_tensors(self, config: AdapterConfig, module_path: str,
                      tensors: dict[TensorKey, torch.Tensor]) -> dict[TensorKey, torch.Tensor]:
        """One module's parameters as checkpoints hold them: by default as they are (AdaLoRA saves only the
        rank triplets its `rank_pattern` keeps)."""
        return tensors

    def has_loss_term(self, config: AdapterConfig) -> bool:
        """Whether an adapter of this config adds `loss_term` to the model's loss (AdaLoRA's trainable adapter)."""
        return False

    def loss_term(self, call: Call, config: AdapterConfig, modules: list[dict[TensorKey, Any]]) -> Any:
        """The term added to the model's loss wherever its output has one, from the adapter's tensors at every
        module it is placed on (in model order), through `call` (a graph builder's, or `eager`)."""
        raise NotImplementedError(f"{self.peft_type} adds nothing to the loss")

    def check_beside(self, config: AdapterConfig, loaded: dict[str, AdapterConfig]) -> None:
        """Raise a ConfigError if an adapter of `config` cannot be added beside the `loaded` ones. Default: it can."""
        return None

    def frozen(self, config: AdapterConfig) -> frozenset[TensorKey]:
        """The adapter parameters that stay frozen in training, though saved (MiCA's lora_B). Default: none."""
        return frozenset()

    def saves_shared(self, config: AdapterConfig) -> bool:
        """Whether checkpoints carry the shared tensors (otherwise they are rebuilt from the config)."""
        return True

    def reads_beside(self, config: AdapterConfig) -> bool:
        """Whether `emit` reads the other adapters placed on its module (`EmitContext.beside`: an Arrow router's
        experts), so that the adapt pass gives it their tensors. Default: no."""
        return False

    @abstractmethod
    def emit(self, ctx: EmitContext) -> torch.fx.Node:
        """Insert the adapter at `ctx.site`, whose current value is `ctx.y`; return the new value."""

    def runs_before_call(self, config: AdapterConfig) -> bool:
        """Whether `before_call` does anything for an adapter of `config` (the call skips the walk over the
        adapted modules otherwise, at every decode step). Default: whether the method defines one."""
        return type(self).before_call is not Method.before_call

    def before_call(self, config: AdapterConfig, tensors: dict[TensorKey, torch.Tensor], training: bool) -> None:
        """What PEFT's forward does to the adapter's tensors in place before using them, run before every
        call that uses the adapter (OFT's `coft` projection; MonteCLoRA's next sample, in training). Default:
        nothing."""
        return None

    def emit_mixed(self, ctx: MixedEmitContext) -> torch.fx.Node | None:
        """Optional batched lowering of several adapters of this method at one site, each sample
        picking slot `ctx.index[i]` (-1: none; None slots do not adapt this module). Return None to
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


@dataclass
class Placed:
    """What `Method.targets` checks a new adapter's targets against: the adapters loaded (configs, and
    placements by module path) and the targets of the new one found so far, by method."""

    configs: dict[str, AdapterConfig]
    modules: dict[str, list[ModuleAdapter]]
    new: list[tuple[Method, list[Target]]]

    def own_paths(self) -> set[str]:
        """Modules the new adapter's own method targets (its `target_modules`)."""
        return {t.path for t in self.new[0][1]} if self.new else set()

    def part_paths(self, part_of_field: str) -> set[str]:
        """Modules the new adapter's part selected by `part_of_field` targets, if placed already."""
        return {t.path for m, ts in self.new if m.part_of_field == part_of_field for t in ts}


# the registry: peft_type -> the method its config selects; peft_type -> the methods placed by fields of
# that config (parts: LoRA's target_parameters, trainable_token_indices), in order; parts under ANY belong
# to every method whose config has their field (modules_to_save)
METHODS: dict[str, Method] = {}
PARTS: dict[str, list[Method]] = {}
ANY = "*"

M = TypeVar("M", bound=type[Method])


def register_method(cls: M) -> M:
    """Register a method class (a decorator): one instance in `METHODS` under its `peft_type`, and its
    config under the same name, or, for a part (`part_of_field` set), among `PARTS[peft_type]`."""
    method = cls()
    if cls.part_of_field is not None:
        PARTS.setdefault(cls.peft_type, []).append(method)
        return cls
    if cls.peft_type in METHODS:
        raise ValueError(f"a method is already registered for {cls.peft_type!r}")
    if cls.config_cls.peft_type_name != cls.peft_type:
        raise ValueError(f"{cls.__name__}.config_cls is for {cls.config_cls.peft_type_name!r}, not {cls.peft_type!r}")
    register_config(cls.config_cls)
    METHODS[cls.peft_type] = method
    return cls


def registered_methods() -> dict[str, Method]:
    """Every registered method and part, by a test id: `LORA`, `LORA.target_parameters`, ..."""
    import peftc.passes  # noqa: F401  (each method's module registers itself on import)

    out: dict[str, Method] = dict(METHODS)
    for peft_type, parts in PARTS.items():
        out.update({f"{peft_type}.{part.part_of_field}": part for part in parts})
    return out


def methods_for(peft_type: str) -> list[Method]:
    """The methods a config of `peft_type` places, in order: its method, then its parts, its own and those
    of every method whose config has their field (each finds no target where the config leaves it unset)."""
    method = METHODS[peft_type]
    fields = {f.name for f in dataclasses.fields(method.config_cls)}
    return [method, *PARTS.get(peft_type, []), *(p for p in PARTS.get(ANY, []) if p.part_of_field in fields)]
