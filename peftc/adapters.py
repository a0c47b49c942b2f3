"""The adapter set: which adapters are loaded, where each is placed, which are active.

Adding an adapter resolves its targets: its method's `target_modules` (the same for every method), then
those of the parts its config selects (LoRA's `target_parameters`, `trainable_token_indices`,
`modules_to_save`: each part's `Method.targets`, with PEFT's names and nesting). Then, in one loop, each
method creates the tensors of each of its targets, registered in the parameter tree under PEFT's names.
It is all or nothing: a method refusing a layer halfway leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

import peftc.passes  # noqa: F401  (each method's module registers itself)
from peftc.passes.dispatch import BASE_NAME
from peftc.passes.lora_mha import refuse_out_proj
from peftc.passes.lora_params import ParamAdapter
from peftc.passes.modules_to_save import CopyAdapter, excluded_by_copies

from . import names
from .config import AdapterConfig, load_config
from .errors import ConfigError, TargetError
from .method import (
    PARTS,
    Method,
    ModuleAdapter,
    Placed,
    Target,
    TensorKey,
    as_peft_stores,
    base_weight,
    correct_fan_in_fan_out,
    methods_for,
)
from .state import ParameterTree, group_leaf
from .targets import select_targets

# the config fields that place adapters beside a method's own targets (LoRA's parts), from the registry
EXTRAS = tuple(dict.fromkeys(part.part_of_field for parts in PARTS.values() for part in parts))


def has_extras(config: AdapterConfig) -> bool:
    return any(getattr(config, name, None) for name in EXTRAS)


def check_adapter_name(adapter_name: Any) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name or "/" in adapter_name \
            or "\\" in adapter_name or adapter_name == BASE_NAME:
        raise ConfigError(f"adapter name {adapter_name!r} must be a non-empty name without '.', '/' or '\\'")


def layer_kinds(model: nn.Module, method: Method, config: AdapterConfig) -> dict[str, str]:
    """Module path -> layer kind of every module `config` targets in `model`; an error for one the method
    cannot adapt."""
    kinds = {}
    if config.target_modules == [] and (getattr(config, "target_parameters", None)
                                        or getattr(config, "trainable_token_indices", None) is not None):
        return kinds  # parameters or token rows alone are targeted
    paths = select_targets(config, model)
    refuse_out_proj(model, paths)  # a module an nn.MultiheadAttention holds but never calls, for every method
    for path in paths:
        module = model.get_submodule(path)
        kind = method.module_kind(config, path, module)
        if kind is None:
            raise TargetError(
                f"module {path!r} ({type(module).__name__}) matches target_modules but {method.peft_type} "
                f"cannot adapt it; supported layers: {', '.join(method.layer_types.values())}"
            )
        kinds[path] = kind
    return kinds


def trained_biases(config: AdapterConfig, model: nn.Module, targets: list[str]) -> list[str]:
    """Names (in `model`) of the base biases a config's `bias` field trains, as PEFT selects them: "all"
    every parameter named `bias`, "<method>_only" the biases of the modules the method adapts."""
    bias = getattr(config, "bias", "none")
    if bias == "none":
        return []
    if bias == "all":
        return sorted({fqn for fqn, _ in model.named_parameters() if fqn == "bias" or fqn.endswith(".bias")})
    return [f"{path}.bias" for path in targets if getattr(model.get_submodule(path), "bias", None) is not None]


class AdapterSet:
    """Loaded adapters: their configs (in `adapter_index` order), their placements by module, the active ones."""

    def __init__(self, tree: ParameterTree) -> None:
        self.tree = tree
        self.configs: dict[str, AdapterConfig] = {}
        self.modules: dict[str, list[ModuleAdapter]] = {}  # module path -> adapters placed there, in order
        self.active: list[str] = []
        self.padded: set[str] = set()  # adapters hot-swapped in at a smaller rank (zero-padded)
        # adapter -> source names of the base biases it trains (PEFT's bias="all" / "<method>_only")
        self.biases: dict[str, list[str]] = {}

    @property
    def order(self) -> list[str]:
        """Loaded adapters in the order `adapter_index` numbers them."""
        return list(self.configs)

    def named(self, adapter_names: Sequence[str]) -> dict[str, list[ModuleAdapter]]:
        """Module path -> its adapters among `adapter_names`, in the order given."""
        out = {}
        for path, mas in self.modules.items():
            chosen = [ma for name in adapter_names for ma in mas if ma.adapter == name]
            if chosen:
                out[path] = chosen
        return out

    def of(self, adapter_name: str) -> list[ModuleAdapter]:
        """Every placement of one adapter."""
        return [ma for mas in self.modules.values() for ma in mas if ma.adapter == adapter_name]

    # -- adding -----------------------------------------------------------------------------------

    def add(self, adapter_name: str, peft_config: AdapterConfig | dict | str) -> None:
        """Place another adapter (not activated, as in PEFT); any registered method, even beside another."""
        check_adapter_name(adapter_name)
        if adapter_name in self.configs:
            raise ConfigError(f"an adapter named {adapter_name!r} is already loaded")
        config = load_config(peft_config)
        method, *parts = methods_for(config.peft_type)
        method.check_beside(config, self.configs)
        replication = getattr(config, "layer_replication", None)
        if replication and replication != self.tree.replicated:
            raise ConfigError(f"layer_replication={replication!r}: the model's layers were laid out when it was "
                              f"adapted ({self.tree.replicated!r}); an adapter with another layout cannot be added")
        source = self.tree.source
        config = method.prepare_config(copy.deepcopy(config), source)
        kinds = layer_kinds(source, method, config)
        # as PEFT, target_modules skips modules inside those trained as copies
        kinds = {p: k for p, k in kinds.items() if not excluded_by_copies(p, getattr(config, "modules_to_save", None))}
        correct_fan_in_fan_out(config, {p: source.get_submodule(p) for p in kinds})  # warns, as PEFT
        own = method.own_targets(config, source, [Target(path, path, source.get_submodule(path), kind)
                                                  for path, kind in kinds.items()])
        placed = Placed(self.configs, self.modules, [(method, own)])
        for part in parts:  # the config's other fields that place adapters (LoRA's target_parameters, ...)
            placed.new.append((part, part.targets(config, source, adapter_name, placed)))
        with self._all_or_nothing():
            self._register(adapter_name, config, placed.new)

    def _register(self, adapter_name: str, config: AdapterConfig,
                  placements: list[tuple[Method, list[Target]]]) -> None:
        self._check_one_bias_adapter(adapter_name, config)
        self.configs[adapter_name] = config
        new = {t.path for _, targets in placements for t in targets} - set(self.modules)
        for method, targets in placements:
            self._place(adapter_name, config, method, targets)
        if new:
            self.tree.rename_base(self.adapted_paths())
        layers = [t.path for t in placements[0][1]] + [t.bias_module for _, targets in placements[1:]
                                                        for t in targets if t.bias_module]
        self.biases[adapter_name] = trained_biases(config, self.tree.source, layers)
        for key in self.biases[adapter_name]:  # no other adapter trains biases (checked above)
            self.tree.own_trainable(key)
        self.set_trainable()

    def _check_one_bias_adapter(self, adapter: str, config: AdapterConfig) -> None:
        """PEFT refuses a second adapter with `bias` other than "none": the base biases are shared by every adapter."""
        bias = getattr(config, "bias", "none")
        others = [name for name, c in self.configs.items() if name != adapter and getattr(c, "bias", "none") != "none"]
        if bias != "none" and others:
            raise ConfigError(f"bias={bias!r}: adapter {others[0]!r} already trains biases; only one adapter may "
                              "have bias other than 'none'")

    def _place(self, adapter: str, config: AdapterConfig, method: Method, targets: list[Target]) -> None:
        """One method's adapters at its targets, named as PEFT names them."""
        # tensors the method shares across this adapter's modules (VeRA's projections), at the tuner level
        created_shared = method.create_shared(config, {t.path: (t.module, t.kind) for t in targets})
        first_weight = base_weight(targets[0].module) if targets else None
        shared = {key: (names.shared_live_key(*group_leaf(key, adapter)), as_peft_stores(t, first_weight))
                  for key, t in created_shared.items()}
        for fqn, t in shared.values():
            self.tree.set(fqn, t, persistent=method.saves_shared(config))
        registered: dict[str, dict[TensorKey, tuple[str, torch.Tensor]]] = {}
        for target in targets:
            if target.tied is None:
                created = method.create(config, target.module_name, target.module, target.kind)
                weight = base_weight(target.module)
                created.params = {key: as_peft_stores(t, weight) for key, t in created.params.items()}
                tensors = self.tree.register_created(target.names_at, adapter, created, not config.inference_mode)
                self._alias_shared(target.names_at, adapter, tensors, shared)
                for leaf, value in created.base.items():
                    self.tree.replace_base(target.path, leaf, value)
            else:  # an earlier target's tensors (a head tied to an embedding), under this one's names, unsaved
                tensors = {key: (self.tree.live_key(target.names_at, key, adapter), t)
                           for key, (_, t) in registered[target.tied].items()}
                for fqn, t in tensors.values():
                    self.tree.set(fqn, t, persistent=False)
            registered[target.path] = tensors
            self.modules.setdefault(target.path, []).append(method.adapter(target, adapter, config, tensors))

    def _alias_shared(self, path: str, adapter: str, tensors: dict[TensorKey, tuple[str, torch.Tensor]],
                      shared: dict[TensorKey, tuple[str, torch.Tensor]]) -> None:
        for key, (fqn, tensor) in shared.items():
            # PEFT's state dict lists a shared tensor under each module too: the module holding it is
            # registered there as well (one BufferDict, many parents), so both keys name one tensor
            holder, _ = names.split_module(fqn)  # base_model.vera_A (holding .<adapter>)
            alias, _ = names.split_module(self.tree.live_key(path, key, adapter))  # <path>.vera_A
            parent, child = names.split_module(alias)
            self.tree.root.get_submodule(parent).add_module(child, self.tree.root.get_submodule(holder))
            tensors[key] = (fqn, tensor)

    @contextlib.contextmanager
    def _all_or_nothing(self) -> Iterator[None]:
        """If the block raises (a method's create refusing a layer halfway), put back every module's
        tensors and submodules, in the tree and in the source copy, and the adapter bookkeeping: adding an
        adapter either completes or leaves the model as it was."""
        modules = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers), set(m._non_persistent_buffers_set))
                   for root in (self.tree.root, self.tree.source) for m in root.modules()]
        books = (dict(self.configs), {p: list(mas) for p, mas in self.modules.items()}, dict(self.tree.names),
                 dict(self.biases))
        try:
            yield
        except BaseException:
            for m, *saved in modules:
                for live, before in zip((m._modules, m._parameters, m._buffers, m._non_persistent_buffers_set), saved):
                    live.clear()
                    live.update(before)
            self.configs, self.modules, self.tree.names, self.biases = books
            self.tree.rehomed()
            raise

    # -- activating and removing ----------------------------------------------------------------

    def activate(self, adapter_names: Sequence[str]) -> None:
        """Make these the active adapters (their outputs add up, as in PEFT)."""
        unknown = [n for n in adapter_names if n not in self.configs]
        if unknown or not adapter_names:
            raise ConfigError(f"unknown adapter(s) {unknown or list(adapter_names)}; loaded: {self.order}")
        self.active = list(adapter_names)
        self.set_trainable()

    def set_trainable(self) -> None:
        """Active adapters are trainable unless loaded for inference; the others are frozen. A base bias
        trains while an active adapter's `bias` selects it (PEFT's `_mark_only_adapters_as_trainable`)."""
        for mas in self.modules.values():
            for ma in mas:
                trainable = ma.adapter in self.active and not ma.config.inference_mode
                frozen = ma.method.frozen(ma.config)
                for key, (_, t) in ma.tensors.items():
                    if isinstance(t, nn.Parameter):
                        t.requires_grad_(trainable and key not in frozen)
        training = {key for adapter in self.active if not self.configs[adapter].inference_mode
                    for key in self.biases.get(adapter, ()) if self._trains_bias(adapter, key)}
        for key in {key for keys in self.biases.values() for key in keys}:
            self.tree.tensor(self.tree.names[key]).requires_grad_(key in training)

    def _trains_bias(self, adapter: str, key: str) -> bool:
        # a module trained as copies (modules_to_save) trains its copy's bias; the original's is only saved
        return not excluded_by_copies(key, getattr(self.configs[adapter], "modules_to_save", None))

    def bias_parameters(self, adapter: str, trained: bool = False) -> dict[str, nn.Parameter]:
        """The base biases `adapter`'s `bias` option saves (or with `trained`, trains), by their names in the
        adapted model (PEFT's keys)."""
        return {self.tree.names[key]: self.tree.tensor(self.tree.names[key]) for key in self.biases.get(adapter, ())
                if not trained or self._trains_bias(adapter, key)}

    def delete(self, adapter_name: str) -> None:
        if adapter_name not in self.configs:
            raise ConfigError(f"no adapter named {adapter_name!r}; loaded: {self.order}")
        for path in list(self.modules):
            for ma in [ma for ma in self.modules[path] if ma.adapter == adapter_name]:
                for fqn, _ in ma.tensors.values():
                    self.tree.remove(fqn)  # a shared tensor goes with the first of its modules
                self.modules[path].remove(ma)
            if not self.modules[path]:
                del self.modules[path]
        del self.configs[adapter_name]
        for p in self.bias_parameters(adapter_name).values():  # trained biases stay, frozen, as in PEFT
            p.requires_grad_(False)
        self.biases.pop(adapter_name, None)
        self.padded.discard(adapter_name)  # (an adapter added later under this name is not padded)
        self.active = [a for a in self.active if a != adapter_name] or self.order[:1]
        self.tree.rename_base(self.adapted_paths())
        self.set_trainable()

    # -- what the rest of the model reads ---------------------------------------------------------

    def adapted_paths(self) -> set[str]:
        """Modules PEFT wraps (their base tensors are named `<module>.base_layer.<name>`)."""
        return {getattr(ma, "wrapper", ma.module_path) for mas in self.modules.values() for ma in mas}

    def rebound_keys(self) -> dict[str, str]:
        """Source names of the tensors adapters replace inside a module rather than at op sites (targeted
        parameters, and every parameter of a module trained as copies) -> that module, whose nodes read them
        (an nn.MultiheadAttention reads its `out_proj.weight` itself)."""
        keys = {}
        for mas in self.modules.values():
            for ma in mas:
                if isinstance(ma, ParamAdapter):
                    keys[ma.key] = ma.owner
                elif isinstance(ma, CopyAdapter):
                    keys |= {f"{ma.module_path}.{leaf}": ma.module_path for _, leaf in ma.tensors}
        return keys

    def refresh_tensors(self) -> None:
        """Point placements at the tensors registered now: `.to()` makes new buffers, and FSDP2's
        `fully_shard` / `unshard` / `reshard` register new Parameter objects on the modules."""
        for mas in self.modules.values():
            for ma in mas:
                ma.tensors = {key: (fqn, self.tree.tensor(fqn)) for key, (fqn, _) in ma.tensors.items()}
