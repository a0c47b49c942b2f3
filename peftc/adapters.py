"""The adapter set: which adapters are loaded, where each is placed, which are active.

Adding an adapter resolves its targets, lets its method create the tensors of each placement and
registers them in the parameter tree under PEFT's names. It is all or nothing: a method refusing a
layer halfway leaves the model as it was. Placements: op sites (`ModuleAdapter`, every method),
and LoRA's rebinding extras (`target_parameters`, `trainable_token_indices`, `modules_to_save`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from peftc.passes import METHODS
from peftc.passes.dispatch import BASE_NAME
from peftc.passes.lora_params import PARAMETER, LoraParam, ParamAdapter, parameter_targets
from peftc.passes.modules_to_save import CopyAdapter, ModulesToSave, excluded_by_copies, modules_to_save
from peftc.passes.trainable_tokens import TokenAdapter, TrainableTokens, tied_heads, token_targets, wrapper_path

from . import names
from .config import AdapterConfig, load_config
from .errors import ConfigError, TargetError
from .method import Method, ModuleAdapter, TensorKey, correct_fan_in_fan_out
from .state import ParameterTree, group_leaf
from .targets import resolve_all_linear, select_targets

EXTRAS = ("target_parameters", "trainable_token_indices", "modules_to_save")  # LoRA's non-factor parts


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
    for path in select_targets(config, model):
        module = model.get_submodule(path)
        kind = method.module_kind(config, path, module)
        if kind is None:
            raise TargetError(
                f"module {path!r} ({type(module).__name__}) matches target_modules but {method.peft_type} "
                f"cannot adapt it; supported layers: {', '.join(method.layer_types.values())}"
            )
        kinds[path] = kind
    return kinds


class AdapterSet:
    """Loaded adapters: their configs (in `adapter_index` order), their placements by module, the active ones."""

    def __init__(self, tree: ParameterTree) -> None:
        self.tree = tree
        self.configs: dict[str, AdapterConfig] = {}
        self.modules: dict[str, list[ModuleAdapter]] = {}  # module path -> adapters placed there, in order
        self.active: list[str] = []
        self.padded: set[str] = set()  # adapters hot-swapped in at a smaller rank (zero-padded)

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
        method = METHODS[config.peft_type]
        source = self.tree.source
        config = resolve_all_linear(copy.deepcopy(config), source)
        kinds = layer_kinds(source, method, config)
        # as PEFT, target_modules skips modules inside those trained as copies
        kinds = {p: k for p, k in kinds.items() if not excluded_by_copies(p, getattr(config, "modules_to_save", None))}
        correct_fan_in_fan_out(config, {p: source.get_submodule(p) for p in kinds})  # warns, as PEFT
        param_targets = self._parameter_targets(adapter_name, config, kinds)
        tokens = self._token_targets(config, kinds)
        copies = self._copy_targets(config, tokens)
        with self._all_or_nothing():
            self._register(adapter_name, config, method, kinds, param_targets, tokens, copies)

    def _register(
        self, adapter_name: str, config: AdapterConfig, method: Method, kinds: dict[str, str],
        param_targets: list[tuple[str, str, str]], tokens: dict[str, list[int]], copies: list[str],
    ) -> None:
        self.configs[adapter_name] = config
        new = (set(kinds) | {path for *_, path in param_targets} | set(tokens) | set(copies)) - set(self.modules)
        source = self.tree.source
        # tensors the method shares across this adapter's modules (VeRA's projections), at the tuner level
        targets = {path: (source.get_submodule(path), kind) for path, kind in kinds.items()}
        shared = {key: (names.shared_live_key(*group_leaf(key, adapter_name)), t)
                  for key, t in method.create_shared(config, targets).items()}
        for fqn, t in shared.values():
            self.tree.set(fqn, t, persistent=method.saves_shared(config))
        for path, kind in kinds.items():
            self._add_module_adapter(path, adapter_name, method, kind, config, shared)
        self._add_param_adapters(adapter_name, config, param_targets)
        self._add_token_adapters(adapter_name, config, tokens)
        for path in copies:
            created = ModulesToSave().create(config, path, source.get_submodule(path), "module")
            tensors = self.tree.register_created(path, adapter_name, created, not config.inference_mode)
            self.modules.setdefault(path, []).append(
                CopyAdapter(path, adapter_name, ModulesToSave(), "module", config, tensors))
        if new:
            self.tree.rename_base(self.adapted_paths())
        self.set_trainable()

    def _add_module_adapter(self, path: str, adapter: str, method: Method, kind: str, config: AdapterConfig,
                            shared: dict[TensorKey, tuple[str, torch.Tensor]]) -> None:
        module = self.tree.source.get_submodule(path)
        created = method.create(config, path, module, kind)
        tensors = self.tree.register_created(path, adapter, created, not config.inference_mode)
        for key, (fqn, tensor) in shared.items():
            # PEFT's state dict lists a shared tensor under each module too: the module holding it is
            # registered there as well (one BufferDict, many parents), so both keys name one tensor
            holder, _ = names.split_module(fqn)  # base_model.vera_A (holding .<adapter>)
            alias, _ = names.split_module(self.tree.live_key(path, key, adapter))  # <path>.vera_A
            parent, child = names.split_module(alias)
            self.tree.root.get_submodule(parent).add_module(child, self.tree.root.get_submodule(holder))
            tensors[key] = (fqn, tensor)
        for leaf, value in created.base.items():
            self.tree.replace_base(path, leaf, value)
        self.modules.setdefault(path, []).append(ModuleAdapter(path, adapter, method, kind, config, tensors))

    def _parameter_targets(self, adapter: str, config: AdapterConfig, kinds: dict[str, str],
                           ) -> list[tuple[str, str, str]]:
        """LoRA's `target_parameters`, checked: (owner module, parameter, PEFT's wrapper path) of each."""
        if not getattr(config, "target_parameters", None):
            return []
        targets = parameter_targets(config, self.tree.source)
        for other, other_config in self.configs.items():
            theirs = getattr(other_config, "target_parameters", None)
            if other != adapter and theirs and theirs != config.target_parameters:
                raise ConfigError(f"adapter {adapter!r} targets parameters {config.target_parameters}, adapter "
                                  f"{other!r} {theirs}: as in PEFT, adapters on parameters must target the same ones")
        both = sorted({owner for owner, _, _ in targets} & set(kinds))
        if both:
            raise ConfigError(f"modules {both} are targeted both by target_modules and by target_parameters")
        return targets

    def _token_targets(self, config: AdapterConfig, kinds: dict[str, str]) -> dict[str, list[int]]:
        """LoRA's `trainable_token_indices`, checked: embedding path -> token ids."""
        if getattr(config, "trainable_token_indices", None) is None:
            return {}
        source = self.tree.source
        tokens = token_targets(config, source)
        paths = {*tokens, *(head for path in tokens for head in tied_heads(source, path))}
        for path in paths:
            if path in kinds or any(not isinstance(ma, TokenAdapter) for ma in self.modules.get(path, [])):
                raise ConfigError(f"module {path!r} has trainable_token_indices and is targeted by an adapter too "
                                  "(PEFT wraps a layer one way or the other); leave it out of target_modules")
        for path in kinds:
            if any(isinstance(ma, TokenAdapter) for ma in self.modules.get(path, [])):
                raise ConfigError(f"module {path!r} has trainable token rows from another adapter; it cannot be "
                                  "targeted by target_modules as well")
        return tokens

    def _copy_targets(self, config: AdapterConfig, tokens: dict[str, list[int]]) -> list[str]:
        """LoRA's `modules_to_save`, checked: the paths of the modules trained as copies."""
        if not getattr(config, "modules_to_save", None):
            return []
        paths = modules_to_save(config, self.tree.source)
        for path in paths:
            if path in tokens:
                raise ConfigError(f"module {path!r} is in modules_to_save and has trainable_token_indices; "
                                  "choose one (PEFT refuses both too)")
            if any(not isinstance(ma, CopyAdapter) for ma in self.modules.get(path, [])):
                raise ConfigError(f"module {path!r} is in modules_to_save but another adapter adapts it")
        return paths

    def _add_token_adapters(self, adapter: str, config: AdapterConfig, tokens: dict[str, list[int]]) -> None:
        """Trainable rows per embedding; a head tied to it gets an adapter on the same tensors (PEFT's names)."""
        method = TrainableTokens()
        source = self.tree.source
        for path, indices in tokens.items():
            created = method.create_rows(path, source.get_submodule(path), indices)
            tensors = self.tree.register_created(wrapper_path(path), adapter, created, not config.inference_mode)
            self.modules.setdefault(path, []).append(
                TokenAdapter(wrapper_path(path), adapter, method, "embedding", config, tensors))
            for head in tied_heads(source, path):
                alias = {key: (self.tree.live_key(wrapper_path(head), key, adapter), t)
                         for key, (_, t) in tensors.items()}
                for fqn, t in alias.values():
                    self.tree.set(fqn, t, persistent=False)
                self.modules.setdefault(head, []).append(
                    TokenAdapter(wrapper_path(head), adapter, method, "linear", config, alias, tied=path))

    def _add_param_adapters(self, adapter: str, config: AdapterConfig, targets: list[tuple[str, str, str]]) -> None:
        """An adapter per targeted parameter, named at PEFT's (nested) wrapper path."""
        method = LoraParam()
        for owner, param, path in targets:
            module = self.tree.source.get_submodule(owner)
            created = method.create_param(config, owner, module, param)
            tensors = self.tree.register_created(path, adapter, created, not config.inference_mode)
            self.modules.setdefault(path, []).append(ParamAdapter(
                path, adapter, method, PARAMETER, config, tensors, owner=owner, param=param,
                transposed=getattr(module, "is_transposed", False)))

    @contextlib.contextmanager
    def _all_or_nothing(self) -> Iterator[None]:
        """If the block raises (a method's create refusing a layer halfway), put back every module's
        tensors and submodules, in the tree and in the source copy, and the adapter bookkeeping: adding an
        adapter either completes or leaves the model as it was."""
        modules = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers), set(m._non_persistent_buffers_set))
                   for root in (self.tree.root, self.tree.source) for m in root.modules()]
        books = dict(self.configs), {p: list(mas) for p, mas in self.modules.items()}, dict(self.tree.names)
        try:
            yield
        except BaseException:
            for m, *saved in modules:
                for live, before in zip((m._modules, m._parameters, m._buffers, m._non_persistent_buffers_set), saved):
                    live.clear()
                    live.update(before)
            self.configs, self.modules, self.tree.names = books
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
        """Active adapters are trainable unless loaded for inference; the others are frozen."""
        for mas in self.modules.values():
            for ma in mas:
                trainable = ma.adapter in self.active and not ma.config.inference_mode
                for _, t in ma.tensors.values():
                    if isinstance(t, nn.Parameter):
                        t.requires_grad_(trainable)

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
        self.padded.discard(adapter_name)  # (an adapter added later under this name is not padded)
        self.active = [a for a in self.active if a != adapter_name] or self.order[:1]
        self.tree.rename_base(self.adapted_paths())
        self.set_trainable()

    # -- what the rest of the model reads ---------------------------------------------------------

    def adapted_paths(self) -> set[str]:
        """Modules PEFT wraps (their base tensors are named `<module>.base_layer.<name>`)."""
        return {getattr(ma, "wrapper", ma.module_path) for mas in self.modules.values() for ma in mas}

    def rebound_keys(self) -> set[str]:
        """Source names of the tensors adapters replace inside their module rather than at op sites: targeted
        parameters, and every parameter of a module trained as copies."""
        keys = set()
        for mas in self.modules.values():
            for ma in mas:
                if isinstance(ma, ParamAdapter):
                    keys.add(ma.key)
                elif isinstance(ma, CopyAdapter):
                    keys |= {f"{ma.module_path}.{leaf}" for _, leaf in ma.tensors}
        return keys

    def refresh_tensors(self) -> None:
        """Point placements at the tensors registered now: `.to()` makes new buffers, and FSDP2's
        `fully_shard` / `unshard` / `reshard` register new Parameter objects on the modules."""
        for mas in self.modules.values():
            for ma in mas:
                ma.tensors = {key: (fqn, self.tree.tensor(fqn)) for key, (fqn, _) in ma.tensors.items()}
