"""The adapted model: one PEFT-shaped parameter tree, and a cache of rewritten graphs.

    model --capture--> graph --select/adapt--> adapted graph --eager backend--> outputs
                            +-fold---------> merged graph
                            +-dispatch-----> mixed-adapter graph (adapter_index input)

`AdaptedModel` never runs the user's modules: it captures them once per call signature and
mode, and keeps that base graph; each variant (the active adapters, merged adapters, a
mixed batch, adapters disabled) is a rewrite of a copy of it, so switching adapters never
re-captures. Graphs run on the adapted model's own tensors. Its state-dict keys are
PEFT's (`base_model.model.<path>.base_layer.weight`, `...lora_A.default.weight`); base
tensors share storage with the user's model but are separate, frozen Parameter objects, so
nothing here changes the user's model's `requires_grad` or values.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from peftc.backends.eager import EagerProgram, TensorRef, eager_lowering
from peftc.passes import METHODS, insert_adapters
from peftc.passes.dispatch import BASE_NAME, BASE_ONLY, dispatch_adapters, slot_indices
from peftc.passes.fold import fold_adapters
from peftc.passes.lora_params import PARAMETER, LoraParam, ParamAdapter, parameter_targets, rebind_parameters
from peftc.passes.modules_to_save import CopyAdapter, ModulesToSave, excluded_by_copies, modules_to_save
from peftc.passes.rebind import partition, rebind_to_tensors
from peftc.passes.remat import RematPlan, remat_plan
from peftc.passes.trainable_tokens import TokenAdapter, TrainableTokens, tied_heads, token_targets, wrapper_path

from . import names
from .capture import (
    STATE,
    CapturedGraph,
    capture,
    default_call_kwargs,
    flatten_call,
    signature_key,
    synthesize_inputs,
)
from .config import AdapterConfig, load_config
from .errors import ConfigError, PeftcError, TargetError
from .graph import copy_graph_module
from .method import AdapterTensors, Method, ModuleAdapter, TensorKey
from .targets import resolve_all_linear, select_targets


class Slot(nn.Module):
    """A node of the parameter tree, standing for one module of the original model."""

    def __init__(self, kind: str = ""):
        super().__init__()
        self._kind = kind

    def extra_repr(self) -> str:
        return self._kind


def _set_tensor(root: nn.Module, fqn: str, tensor: torch.Tensor, persistent: bool = True) -> None:
    """Register `tensor` at dotted path `fqn`, creating Slot modules on the way."""
    module = root
    *parts, leaf = fqn.split(".")
    for part in parts:
        if part not in module._modules:
            module.add_module(part, Slot())
        module = module._modules[part]
    if isinstance(tensor, nn.Parameter):
        module.register_parameter(leaf, tensor)
    else:
        module.register_buffer(leaf, tensor, persistent=persistent)


class AdaptedModel(nn.Module):
    """What `peftc.apply` returns: call it like the original model. Each instance is of a subclass per
    base model class (`AdaptedLlamaForCausalLM`), whose `forward` signature is the base class's: what
    tools reading the class rather than the instance see (Trainer's label names)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> AdaptedModel:
        model = args[0] if args else kwargs.get("model")
        if cls is AdaptedModel and model is not None:  # (copy and pickle call __new__ with no arguments)
            cls = _adapted_class(type(model))
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        config: AdapterConfig,
        adapter_name: str = "default",
        example_inputs: Any = None,
        training: bool | None = None,
    ):
        super().__init__()
        self.peft_config: dict[str, AdapterConfig] = {}
        self.training = model.training if training is None else training
        self._call_defaults = default_call_kwargs(model)
        self._active: list[str] = []
        self._disabled = False
        self._remat: RematPlan | None = None  # gradient checkpointing: train graphs get the remat pass
        self._merged: dict[str, dict[str, str]] = {}  # module path -> {"weight": fqn of the merged tensor}
        self._merged_adapters: list[str] = []
        self._padded: set[str] = set()  # adapters hot-swapped in at a smaller rank (zero-padded)
        # base graphs (named by the source's FQNs), and the rewritten programs run from them
        self._captures: dict[tuple, list[CapturedGraph]] = {}
        self._programs: dict[tuple, EagerProgram] = {}

        # captures trace a structural copy whose tensors are this model's own (no data copied): the
        # user's model is never mutated, and later changes to it cannot desync the graphs
        self.__dict__["_source"] = _structural_copy(model)
        self.base_model = Slot(type(model).__name__)
        self.base_model.add_module("model", Slot(type(model).__name__))
        self._tree_name = self._register_base(self._source, set())
        self._adapters: dict[str, list[ModuleAdapter]] = {}
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

        # callers that inspect forward's signature (Trainer's column filter) see the model's own
        self.forward = functools.update_wrapper(functools.partial(AdaptedModel.forward, self), self._source.forward)
        args, kwargs = _split_inputs(synthesize_inputs(model) if example_inputs is None else example_inputs)
        self._program(args, {**self._call_defaults, **kwargs})

    # -- construction -------------------------------------------------------------------------

    @staticmethod
    def _layer_kinds(model: nn.Module, method: Method, config: AdapterConfig) -> dict[str, str]:
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

    def _register_base(self, source: nn.Module, adapted: set[str]) -> dict[str, str]:
        """Register the source's tensors under PEFT's key layout; returns source FQN -> tree FQN."""
        tree_name = {}
        for fqn, p in source.named_parameters(remove_duplicate=False):
            tree_name[fqn] = names.base_key(fqn, adapted)
            _set_tensor(self, tree_name[fqn], p)
        for module_path, module in source.named_modules(remove_duplicate=False):
            for name, buf in module._buffers.items():
                if buf is not None:
                    fqn = f"{module_path}.{name}" if module_path else name
                    tree_name[fqn] = names.base_key(fqn, adapted)
                    _set_tensor(self, tree_name[fqn], buf, name not in module._non_persistent_buffers_set)
        return tree_name

    def _rename_base(self) -> None:
        """Move base tensors to PEFT's names for the modules adapted now (`<module>.base_layer.<name>`)."""
        adapted = {getattr(ma, "wrapper", ma.module_path) for mas in self._adapters.values() for ma in mas}
        for fqn, old in list(self._tree_name.items()):
            new = names.base_key(fqn, adapted)
            if new == old:
                continue
            module, attr = self._resolve(old)
            tensor = getattr(module, attr)
            persistent = attr not in module._non_persistent_buffers_set
            delattr(module, attr)
            _set_tensor(self, new, tensor, persistent)
            self._tree_name[fqn] = new
        _prune_empty_slots(self)
        self._programs.clear()

    def _sync_source(self) -> None:
        """Point the source copy at the tree's current tensors (`.to()` replaces buffers, loads may swap)."""
        for fqn, tree_fqn in self._tree_name.items():
            module_path, attr = names.split_module(fqn)
            module = self._source.get_submodule(module_path)
            table = module._parameters if attr in module._parameters else module._buffers
            table[attr] = getattr(*self._resolve(tree_fqn))

    def _add_module_adapter(
        self, module: nn.Module, path: str, adapter: str, method: Method, kind: str, config: AdapterConfig,
        shared: dict[TensorKey, tuple[str, torch.Tensor]],
    ) -> None:
        created = method.create(config, path, module, kind)
        tensors = self._register_created(path, adapter, created, config)
        for key, (fqn, tensor) in shared.items():
            # PEFT's state dict lists a shared tensor under each module too: the module holding it is
            # registered there as well (one BufferDict, many parents), so both keys name one tensor
            holder, _ = names.split_module(fqn)  # base_model.vera_A (holding .<adapter>)
            alias, _ = names.split_module(names.live_key(path, *_group_leaf(key, adapter)))  # <path>.vera_A
            parent, child = names.split_module(alias)
            self.get_submodule(parent).add_module(child, self.get_submodule(holder))
            tensors[key] = (fqn, tensor)
        for leaf, value in created.base.items():
            self._replace_base(module, path, leaf, value)
        self._adapters.setdefault(path, []).append(ModuleAdapter(path, adapter, method, kind, config, tensors))

    def _register_created(self, path: str, adapter: str, created: AdapterTensors, config: AdapterConfig,
                          ) -> dict[TensorKey, tuple[str, torch.Tensor]]:
        """Register one adapter's new tensors under PEFT's live names at module `path`."""
        tensors = {}
        for key, value in created.params.items():
            fqn = names.live_key(path, *_group_leaf(key, adapter))
            tensors[key] = (fqn, nn.Parameter(value, requires_grad=not config.inference_mode))
        for key, value in created.buffers.items():
            tensors[key] = (names.live_key(path, *_group_leaf(key, adapter)), value)
        for fqn, tensor in tensors.values():
            _set_tensor(self, fqn, tensor, persistent=False)
        return tensors

    def _parameter_targets(self, adapter: str, config: AdapterConfig, kinds: dict[str, str],
                           ) -> list[tuple[str, str, str]]:
        """LoRA's `target_parameters`, checked: (owner module, parameter, PEFT's wrapper path) of each."""
        if not getattr(config, "target_parameters", None):
            return []
        targets = parameter_targets(config, self._source)
        for other, other_config in self.peft_config.items():
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
        tokens = token_targets(config, self._source)
        paths = {*tokens, *(head for path in tokens for head in tied_heads(self._source, path))}
        for path in paths:
            if path in kinds or any(not isinstance(ma, TokenAdapter) for ma in self._adapters.get(path, [])):
                raise ConfigError(f"module {path!r} has trainable_token_indices and is targeted by an adapter too "
                                  "(PEFT wraps a layer one way or the other); leave it out of target_modules")
        for path in kinds:
            if any(isinstance(ma, TokenAdapter) for ma in self._adapters.get(path, [])):
                raise ConfigError(f"module {path!r} has trainable token rows from another adapter; it cannot be "
                                  "targeted by target_modules as well")
        return tokens

    def _copy_targets(self, config: AdapterConfig, tokens: dict[str, list[int]]) -> list[str]:
        """LoRA's `modules_to_save`, checked: the paths of the modules trained as copies."""
        if not getattr(config, "modules_to_save", None):
            return []
        paths = modules_to_save(config, self._source)
        for path in paths:
            if path in tokens:
                raise ConfigError(f"module {path!r} is in modules_to_save and has trainable_token_indices; "
                                  "choose one (PEFT refuses both too)")
            if any(not isinstance(ma, CopyAdapter) for ma in self._adapters.get(path, [])):
                raise ConfigError(f"module {path!r} is in modules_to_save but another adapter adapts it")
        return paths

    def _add_token_adapters(self, adapter: str, config: AdapterConfig, tokens: dict[str, list[int]]) -> None:
        """Trainable rows per embedding; a head tied to it gets an adapter on the same tensors (PEFT's names)."""
        method = TrainableTokens()
        for path, indices in tokens.items():
            created = method.create_rows(path, self._source.get_submodule(path), indices)
            tensors = self._register_created(wrapper_path(path), adapter, created, config)
            self._adapters.setdefault(path, []).append(
                TokenAdapter(wrapper_path(path), adapter, method, "embedding", config, tensors))
            for head in tied_heads(self._source, path):
                alias = {key: (names.live_key(wrapper_path(head), *_group_leaf(key, adapter)), t)
                         for key, (_, t) in tensors.items()}
                for fqn, t in alias.values():
                    _set_tensor(self, fqn, t, persistent=False)
                self._adapters.setdefault(head, []).append(
                    TokenAdapter(wrapper_path(head), adapter, method, "linear", config, alias, tied=path))

    def _add_param_adapters(self, adapter: str, config: AdapterConfig, targets: list[tuple[str, str, str]]) -> None:
        """An adapter per targeted parameter, named at PEFT's (nested) wrapper path."""
        method = LoraParam()
        for owner, param, path in targets:
            module = self._source.get_submodule(owner)
            tensors = self._register_created(path, adapter, method.create_param(config, owner, module, param), config)
            self._adapters.setdefault(path, []).append(ParamAdapter(
                path, adapter, method, PARAMETER, config, tensors, owner=owner, param=param,
                transposed=getattr(module, "is_transposed", False)))

    def _replace_base(self, module: nn.Module, path: str, leaf: str, value: torch.Tensor) -> None:
        """A new frozen base tensor for `module` (PiSSA/OLoRA's residual), in the tree and the source copy;
        the graphs read base tensors by tree name, and the user's tensor is left as it was."""
        old = getattr(module, leaf)
        if any(p is old for fqn, p in self._source.named_parameters(remove_duplicate=False) if fqn != f"{path}.{leaf}"):
            raise ConfigError(
                f"module {path!r}: its {leaf} is tied to another module's, and this adapter's init rewrites it "
                "(PiSSA/OLoRA would change both uses); target the module without tied weights"
            )
        new = nn.Parameter(value, requires_grad=False)
        _set_tensor(self, self._tree_name[f"{path}.{leaf}"], new)
        module._parameters[leaf] = new

    # -- graphs ---------------------------------------------------------------------------------

    def _resolve(self, fqn: str) -> TensorRef:
        module_path, attr = names.split_module(fqn)
        return self.get_submodule(module_path), attr

    def _program(self, args: tuple, kwargs: dict, mixed: bool = False, kind: Any = None,
                 ) -> tuple[EagerProgram, list[Any]]:
        """The program for this call; `kind` (a `peftc.generation.ProgramKind`) captures another kind of
        program than the plain forward (the KV-cache graph generate runs), cached under its name."""
        flat, spec = flatten_call(args, kwargs)
        key = signature_key(flat, spec, self.training) + ((kind.name,) if kind is not None else ())
        base = next((c for c in self._captures.get(key, []) if c.accepts(flat)), None)
        if base is None:
            self._sync_source()
            base = (capture if kind is None else kind.capture)(self._source, args, kwargs, self.training)
            self._captures.setdefault(key, []).append(base)
        variant = self._variant(mixed)
        program = self._programs.get((id(base), variant))
        if program is None:
            captured = self._rewrite(base, variant)
            run = eager_lowering(captured.gm, self._remat, captured.training)
            program = EagerProgram(captured, self._resolve, run)
            self._programs[(id(base), variant)] = program
        return program, flat

    def _variant(self, mixed: bool) -> tuple:
        """What the rewrite of a base graph depends on besides the graph itself."""
        if mixed:
            return ("mixed", tuple(self.peft_config))
        if self._disabled:
            return ("disabled",)
        return ("active", tuple(self._active), tuple(self._merged_adapters))

    def _rewrite(self, base: CapturedGraph, variant: tuple) -> CapturedGraph:
        """The pipeline after capture: bind base tensors to the tree, then fold / adapt / dispatch."""
        gm = copy_graph_module(base.gm)
        for node in gm.graph.find_nodes(op="placeholder"):
            if STATE in node.meta:
                node.meta[STATE] = self._tree_name[node.meta[STATE]]
        extra: tuple[str, ...] = ()
        if variant[0] == "mixed":
            if partition(self._adapters, (ParamAdapter, CopyAdapter))[1]:
                raise ConfigError("mixed batches (adapter_names / adapter_index) do not support target_parameters "
                                  "(PEFT refuses them too) or modules_to_save yet; call with one active set")
            dispatch_adapters(gm, self._adapters, list(self.peft_config), self.training)
            extra = ("adapter_index",)
        elif variant[0] == "active":
            if self._merged:
                self._fold_merged(gm)
            unmerged = [a for a in self._active if a not in self._merged_adapters]
            sites, params = partition(self._adapters_named(unmerged), ParamAdapter)
            sites, copies = partition(sites, CopyAdapter)
            insert_adapters(gm, sites, self.training)
            rebind_parameters(gm, [(self._state_names(mas[0].key), mas) for mas in params.values()])
            rebind_to_tensors(gm, self._copy_bindings(copies))
        mutated = [self._tree_name[f] for f in base.mutated_state]
        return dataclasses.replace(base, gm=gm, mutated_state=mutated, extra_inputs=extra)

    def _tensor(self, fqn: str) -> torch.Tensor:
        return getattr(*self._resolve(fqn))

    def _rebound_keys(self) -> set[str]:
        """Source names of the tensors adapters replace inside their module rather than at op sites: targeted
        parameters, and every parameter of a module trained as copies."""
        keys = set()
        for mas in self._adapters.values():
            for ma in mas:
                if isinstance(ma, ParamAdapter):
                    keys.add(ma.key)
                elif isinstance(ma, CopyAdapter):
                    keys |= {f"{ma.module_path}.{leaf}" for _, leaf in ma.tensors}
        return keys

    def _copy_bindings(self, copies: dict[str, list[CopyAdapter]],
                       ) -> list[tuple[frozenset[str], str, str, torch.Tensor]]:
        """Each parameter of a module trained as copies, bound to the active adapter's copy (one at most, as PEFT)."""
        out = []
        for path, mas in copies.items():
            if len(mas) > 1:
                raise ConfigError(f"module {path!r} is in modules_to_save of several active adapters "
                                  f"({[ma.adapter for ma in mas]}); PEFT allows one at a time")
            for (_, leaf), (fqn, t) in mas[0].tensors.items():
                out.append((self._state_names(f"{path}.{leaf}"), path, fqn, t))
        return out

    def _state_names(self, key: str) -> frozenset[str]:
        """The tree names of the source tensor `key` and of every tensor tied to it (a graph reads it by one)."""
        tensor = self._source.get_parameter(key)
        return frozenset(self._tree_name[fqn] for fqn, p in self._source.named_parameters(remove_duplicate=False)
                         if p is tensor)

    def _fold_merged(self, gm: torch.fx.GraphModule) -> None:
        """Rebind adapted modules' sites, and targeted parameters inside their modules, to merged tensors."""
        rebound = self._rebound_keys()
        sites: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
        bindings = []
        for path, merged in self._merged.items():
            for leaf, fqn in merged.items():
                if f"{path}.{leaf}" in rebound:
                    bindings.append((self._state_names(f"{path}.{leaf}"), path, fqn, self._tensor(fqn)))
                else:
                    sites.setdefault(path, {})[leaf] = (fqn, self._tensor(fqn))
        fold_adapters(gm, sites)
        rebind_to_tensors(gm, bindings)

    def _adapters_named(self, adapter_names: Sequence[str]) -> dict[str, list[ModuleAdapter]]:
        """Module path -> its adapters among `adapter_names`, in the order given."""
        out = {}
        for path, mas in self._adapters.items():
            chosen = [ma for name in adapter_names for ma in mas if ma.adapter == name]
            if chosen:
                out[path] = chosen
        return out

    def _apply(self, fn: Any, recurse: bool = True) -> AdaptedModel:
        # .to()/.half()/.cuda(): graphs bake dtypes and devices in, so capture anew if any moved
        before = self._placement()
        super()._apply(fn, recurse)
        self._refresh_adapter_tensors()
        if self._placement() != before:
            self._captures.clear()
            self._programs.clear()
        return self

    def _refresh_adapter_tensors(self) -> None:
        """Point adapters at the tensors registered now: `.to()` makes new buffers, and FSDP2's
        `fully_shard` / `unshard` / `reshard` register new Parameter objects on the modules."""
        for mas in self._adapters.values():
            for ma in mas:
                ma.tensors = {key: (fqn, self._tensor(fqn)) for key, (fqn, _) in ma.tensors.items()}

    def _placement(self) -> set[tuple[torch.dtype, torch.device]]:
        return {(t.dtype, t.device) for t in (*self.parameters(), *self.buffers())}

    def forward(
        self, *args: Any, adapter_names: Sequence[str] | None = None, adapter_index: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call like the base model. `adapter_names` (one adapter name per sample, "__base__" for none,
        as PEFT) or `adapter_index` (int tensor, one entry per sample, -1 for none, indices into
        `adapter_order`) run a mixed batch: every sample through its own adapter."""
        if adapter_names is not None and adapter_index is not None:
            raise ConfigError("pass adapter_names or adapter_index, not both")
        if adapter_names is not None:
            adapter_index = self.adapter_index(adapter_names)
        kwargs = {**self._call_defaults, **kwargs}
        if adapter_index is None:
            program, flat = self._program(args, kwargs)
            return program(flat)
        program, flat = self._program(args, kwargs, mixed=True)
        return program(flat, {"adapter_index": self._checked_index(adapter_index, flat)})

    def adapter_index(self, adapter_names: Sequence[str]) -> torch.Tensor:
        """The `adapter_index` tensor for per-sample adapter names ("__base__": the base model)."""
        order = self.adapter_order
        unknown = sorted({n for n in adapter_names if n != BASE_NAME and n not in order})
        if unknown:
            raise ConfigError(f"adapter_names: unknown adapter(s) {unknown}; loaded: {order} (or {BASE_NAME!r})")
        device = next(iter(self.parameters())).device
        return torch.tensor(slot_indices(adapter_names, order), device=device)

    def _checked_index(self, index: torch.Tensor, flat: list[Any]) -> torch.Tensor:
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.is_floating_point():
            raise ConfigError("adapter_index must be a 1-d integer tensor with one entry per sample")
        batch = next((v.shape[0] for v in flat if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        if batch is not None and index.shape[0] != batch:
            raise ConfigError(f"adapter_index has {index.shape[0]} entries for a batch of {batch}")
        n = len(self.adapter_order)
        if index.numel() and (int(index.min()) < BASE_ONLY or int(index.max()) >= n):
            raise ConfigError(
                f"adapter_index entries must be in [-1, {n - 1}] (-1: base model; 0..{n - 1}: {self.adapter_order}), "
                f"got {index.tolist()}"
            )
        return index.to(torch.int64)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None,
                 adapter_index: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """transformers' `generate` (its loop and options) running the model's KV-cache graph; per-sample
        adapters as in forward, for the whole generation (see `peftc.generation`)."""
        from .generation import generate

        return generate(self, args, kwargs, adapter_names, adapter_index)

    @property
    def graphs(self) -> list[CapturedGraph]:
        """The rewritten graphs built so far (one per call signature, mode and adapter variant)."""
        return [p.captured for p in self._programs.values()]

    @property
    def eager_graphs(self) -> list[tuple[CapturedGraph, torch.fx.GraphModule]]:
        """Each of `graphs` with the module its eager calls run: the graph after `eager_lowering`
        (trivial attention masks dropped; train graphs checkpointed or with gated activations recomputed)."""
        return [(p.captured, p.run) for p in self._programs.values()]

    def graph_for(self, *args: Any, **kwargs: Any) -> CapturedGraph:
        """The rewritten graph that a call with these inputs runs (captured if new)."""
        return self._program(args, {**self._call_defaults, **kwargs})[0].captured

    # -- adapters (PEFT's API) -------------------------------------------------------------------

    @property
    def adapter_order(self) -> list[str]:
        """Loaded adapters in the order `adapter_index` numbers them."""
        return list(self.peft_config)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        return self._active[0] if len(self._active) == 1 else list(self._active)

    def add_adapter(self, adapter_name: str, peft_config: AdapterConfig | dict | str) -> None:
        """Place another adapter (not activated, as in PEFT); any registered method, even beside another."""
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ConfigError(f"an adapter named {adapter_name!r} is already loaded")
        config = load_config(peft_config)
        method = METHODS[config.peft_type]
        config = resolve_all_linear(copy.deepcopy(config), self._source)
        kinds = self._layer_kinds(self._source, method, config)
        # as PEFT, target_modules skips modules inside those trained as copies
        kinds = {p: k for p, k in kinds.items() if not excluded_by_copies(p, getattr(config, "modules_to_save", None))}
        param_targets = self._parameter_targets(adapter_name, config, kinds)
        tokens = self._token_targets(config, kinds)
        copies = self._copy_targets(config, tokens)
        with self._all_or_nothing():
            self._register_adapter(adapter_name, config, method, kinds, param_targets, tokens, copies)

    def _register_adapter(
        self, adapter_name: str, config: AdapterConfig, method: Method, kinds: dict[str, str],
        param_targets: list[tuple[str, str, str]], tokens: dict[str, list[int]], copies: list[str],
    ) -> None:
        self.peft_config[adapter_name] = config
        new = (set(kinds) | {path for *_, path in param_targets} | set(tokens) | set(copies)) - set(self._adapters)
        # tensors the method shares across this adapter's modules (VeRA's projections), at the tuner level
        targets = {path: (self._source.get_submodule(path), kind) for path, kind in kinds.items()}
        shared = {key: (names.shared_live_key(*_group_leaf(key, adapter_name)), t)
                  for key, t in method.create_shared(config, targets).items()}
        for fqn, t in shared.values():
            _set_tensor(self, fqn, t, persistent=method.saves_shared(config))
        for path, kind in kinds.items():
            self._add_module_adapter(self._source.get_submodule(path), path, adapter_name, method, kind, config,
                                     shared)
        self._add_param_adapters(adapter_name, config, param_targets)
        self._add_token_adapters(adapter_name, config, tokens)
        for path in copies:
            module = self._source.get_submodule(path)
            tensors = self._register_created(path, adapter_name, ModulesToSave().create(config, path, module, "module"),
                                             config)
            self._adapters.setdefault(path, []).append(
                CopyAdapter(path, adapter_name, ModulesToSave(), "module", config, tensors))
        if new:
            self._rename_base()
        self._set_trainable()
        self._programs.clear()

    @contextlib.contextmanager
    def _all_or_nothing(self) -> Iterator[None]:
        """If the block raises (a method's create refusing a layer halfway), put back every module's
        tensors and submodules, here and in the source copy, and the adapter bookkeeping: adding an
        adapter either completes or leaves the model as it was."""
        modules = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers), set(m._non_persistent_buffers_set))
                   for root in (self, self._source) for m in root.modules()]
        books = dict(self.peft_config), {p: list(mas) for p, mas in self._adapters.items()}, dict(self._tree_name)
        try:
            yield
        except BaseException:
            for m, *saved in modules:
                for live, before in zip((m._modules, m._parameters, m._buffers, m._non_persistent_buffers_set), saved):
                    live.clear()
                    live.update(before)
            self.peft_config, self._adapters, self._tree_name = books
            self._programs.clear()
            raise

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False) -> None:
        """Load an adapter saved by peftc or PEFT from the folder `model_id` (not activated, as in PEFT)."""
        from .checkpoint import load_adapter_weights, read_config

        config = read_config(model_id)
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config)
        try:
            load_adapter_weights(self, model_id, adapter_name)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise

    def hotswap_adapter(self, model_name_or_path: str, adapter_name: str = "default") -> None:
        """Replace a loaded adapter's weights and scales by a saved adapter's, in place (PEFT's
        `hotswap_adapter`): same method and targets, each tensor the same size or smaller (a smaller
        rank is zero-padded, which adds nothing). No graph is captured or rewritten again."""
        from .checkpoint import WEIGHTS_NAME, adapter_state_dict, read_config, read_weights

        if adapter_name not in self.peft_config:
            raise ConfigError(f"no adapter named {adapter_name!r} to hot-swap; loaded: {self.adapter_order}")
        config = read_config(model_name_or_path)
        live = self.peft_config[adapter_name]
        where = f"{model_name_or_path}: cannot hot-swap into {adapter_name!r}"
        if config.peft_type != live.peft_type:
            raise ConfigError(f"{where}: it is {config.peft_type}, the loaded adapter {live.peft_type}")
        mas = [ma for mas in self._adapters.values() for ma in mas if ma.adapter == adapter_name]
        if _has_extras(live) or _has_extras(config):
            raise ConfigError(f"{where}: hot-swapping adapters with {', '.join(EXTRAS)} is not supported yet")
        config_targets = resolve_all_linear(copy.deepcopy(config), self._source)
        targets = self._layer_kinds(self._source, mas[0].method, config_targets)
        if set(targets) != {ma.module_path for ma in mas}:
            raise ConfigError(f"{where}: it targets other modules ({_listing_diff(targets, mas)})")
        saved = read_weights(os.path.join(os.fspath(model_name_or_path), WEIGHTS_NAME))
        expected = adapter_state_dict(self, adapter_name)
        if set(saved) != set(expected):
            raise ConfigError(f"{where}: its tensors differ ({_listing_diff(saved, expected)})")
        too_big = [k for k, t in saved.items() if t.dim() != expected[k].dim()
                   or any(a > b for a, b in zip(t.shape, expected[k].shape))]
        if too_big:
            raise ConfigError(f"{where}: larger than the loaded adapter at {too_big[:4]}")
        with torch.random.fork_rng(devices=[]):  # create() draws fresh parameters we discard: keep the RNG as is
            buffers = {
                ma.module_path: ma.method.create(config, ma.module_path, self._source.get_submodule(ma.module_path),
                                                 ma.kind).buffers
                for ma in mas
            }
        with torch.no_grad():
            for key, t in saved.items():
                target = expected[key]
                target.zero_()
                target[tuple(slice(0, n) for n in t.shape)].copy_(t)
                if t.shape != target.shape:
                    self._padded.add(adapter_name)
            for ma in mas:
                for key, value in buffers[ma.module_path].items():
                    ma.tensors[key][1].copy_(value)
        config.inference_mode = live.inference_mode
        self.peft_config[adapter_name] = config

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """A new LoRA adapter combining LoRA `adapters` (PEFT's `add_weighted_adapter`, same types and
        numerics), plus "delta": exactly Σ wᵢ·sᵢ·BᵢAᵢ at scale 1 (see `peftc.combine`)."""
        from .combine import combined_rank_alpha

        configs = []
        for name in adapters:
            if name not in self.peft_config:
                raise ConfigError(f"adapters: no adapter named {name!r}; loaded: {self.adapter_order}")
            if self.peft_config[name].peft_type != "LORA":
                kind = self.peft_config[name].peft_type
                raise ConfigError(f"adapters: {name!r} is a {kind} adapter; only LoRA adapters combine")
            if _has_extras(self.peft_config[name]):
                raise ConfigError(f"adapters: {name!r} has {', '.join(EXTRAS)} set; add_weighted_adapter combines "
                                  "the low-rank factors of plain LoRA adapters only")
            configs.append(self.peft_config[name])
        if len(weights) != len(adapters):
            raise ConfigError(f"weights has {len(weights)} entries for {len(adapters)} adapters")
        ranks = [max([c.r, *c.rank_pattern.values()]) for c in configs]
        r, alpha = combined_rank_alpha(combination_type, ranks, svd_rank)
        targets = sorted({path for name in adapters for path, mas in self._adapters.items()
                          if any(ma.adapter == name for ma in mas)})
        config = dataclasses.replace(  # targets: exactly the modules any source adapts (a full-match regex)
            configs[0], r=r, lora_alpha=alpha, target_modules="|".join(re.escape(t) for t in targets),
            rank_pattern={}, alpha_pattern={}, layers_to_transform=None, layers_pattern=None, exclude_modules=None,
            # "delta" is exact at scale 1 even for rsLoRA sources (PEFT's combinations keep use_rslora)
            use_rslora=configs[0].use_rslora and combination_type != "delta",
        )
        self.add_adapter(adapter_name, config)
        try:
            self._combine_into(adapter_name, adapters, weights, dict(
                combination_type=combination_type, svd_rank=r, svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices,
                svd_driver=svd_driver, density=density, majority_sign_method=majority_sign_method, pad_to=r,
            ))
        except BaseException:
            self.delete_adapter(adapter_name)  # no half-made adapter left behind
            raise

    def _combine_into(
        self, adapter_name: str, adapters: Sequence[str], weights: Sequence[float], options: dict
    ) -> None:
        from .combine import combine_lora

        with torch.no_grad():
            for mas in self._adapters.values():
                new = next((ma for ma in mas if ma.adapter == adapter_name), None)
                sources = [(ma, w) for name, w in zip(adapters, weights) for ma in mas if ma.adapter == name]
                if new is None or not sources:
                    continue
                a_key, b_key = _lora_factor_keys(new)
                a, b = combine_lora(
                    [ma.tensors[a_key][1] for ma, _ in sources], [ma.tensors[b_key][1] for ma, _ in sources],
                    [float(ma.tensors[("lora_scaling", None)][1]) for ma, _ in sources], [w for _, w in sources],
                    kind=new.kind, **options,
                )
                new.tensors[a_key][1].copy_(a)
                new.tensors[b_key][1].copy_(b)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Activate one adapter, or several (their outputs add up, as in PEFT). Active adapters are
        trainable unless loaded for inference; the others are frozen."""
        wanted = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in wanted if n not in self.peft_config]
        if unknown or not wanted:
            raise ConfigError(f"unknown adapter(s) {unknown or wanted}; loaded: {self.adapter_order}")
        self._active = wanted
        self._set_trainable()

    def _set_trainable(self) -> None:
        for mas in self._adapters.values():
            for ma in mas:
                trainable = ma.adapter in self._active and not ma.config.inference_mode
                for _, t in ma.tensors.values():
                    if isinstance(t, nn.Parameter):
                        t.requires_grad_(trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ConfigError(f"no adapter named {adapter_name!r}; loaded: {self.adapter_order}")
        if adapter_name in self._merged_adapters:
            self.unmerge_adapter()
        for path in list(self._adapters):
            for ma in [ma for ma in self._adapters[path] if ma.adapter == adapter_name]:
                for fqn, _ in ma.tensors.values():
                    module, attr = self._resolve(fqn)
                    if hasattr(module, attr):  # a shared tensor goes with the first of its modules
                        delattr(module, attr)
                self._adapters[path].remove(ma)
            if not self._adapters[path]:
                del self._adapters[path]
        del self.peft_config[adapter_name]
        self._active = [a for a in self._active if a != adapter_name] or self.adapter_order[:1]
        self._rename_base()
        self._set_trainable()

    # -- activation checkpointing (transformers' and PEFT's names) --------------------------------

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """Recompute each layer's activations in backward: train graphs run every layer (every n-th)
        through `torch.utils.checkpoint.checkpoint` (kwargs default to `use_reentrant=False`)."""
        self._remat = remat_plan(self._source, gradient_checkpointing_kwargs, every_n_layers, offload)
        self._programs.clear()

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """transformers 5's name for `gradient_checkpointing_enable` (what Trainer calls)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_disable(self) -> None:
        self._remat = None
        self._programs.clear()

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._remat is not None

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """`with am.disable_adapter():` calls run the base model alone (PEFT's name)."""
        before, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = before

    # -- merging ----------------------------------------------------------------------------------

    def merged_tensors(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False,
                       ) -> dict[str, dict[str, torch.Tensor]]:
        """Module path -> its tensors with the adapters merged in (new tensors; nothing is written).

        Each method's fold runs in fp32 (fp64 stays fp64) and the result is cast to the base dtype
        once. With `safe_merge`, a non-finite result is an error naming the layer."""
        adapter_names = list(self._active if adapter_names is None else adapter_names)
        unknown = [n for n in adapter_names if n not in self.peft_config]
        if unknown:
            raise ConfigError(f"unknown adapter(s) {unknown}; loaded: {self.adapter_order}")
        out = {}
        for path, mas in self._adapters_named(adapter_names).items():
            # an adapter on a parameter (target_parameters) merges into that parameter of its module; a module
            # trained as copies (modules_to_save) into all of its parameters
            path = getattr(mas[0], "owner", path)
            module = self._source.get_submodule(path)
            own = dict(module.named_parameters())
            leaves = ((mas[0].param,) if isinstance(mas[0], ParamAdapter) else tuple(own)
                      if isinstance(mas[0], CopyAdapter) else ("weight", "bias"))
            base = {leaf: self._tensor(self._tree_name[f"{path}.{leaf}"])
                    for leaf in leaves if own.get(leaf) is not None or getattr(module, leaf, None) is not None}
            work = {leaf: t.detach().to(_compute_dtype(t)) for leaf, t in base.items()}
            changed: set[str] = set()
            for ma in mas:
                if not ma.method.mergeable:
                    raise ConfigError(f"adapter {ma.adapter!r} ({ma.method.peft_type}) cannot be merged")
                tensors = {key: t.detach().to(_compute_dtype(t)) if t.is_floating_point() else t.detach()
                           for key, (_, t) in ma.tensors.items()}  # integer buffers (token ids) stay as they are
                update = ma.method.fold(ma.kind, ma.config, module, tensors, dict(work))
                work.update(update)
                changed |= set(update)
            merged = {leaf: work[leaf].to(base[leaf].dtype) for leaf in sorted(changed)}
            if safe_merge:
                for leaf, t in merged.items():
                    if not torch.isfinite(t).all():
                        raise PeftcError(
                            f"merging {', '.join(ma.adapter for ma in mas)} into {path!r} gives non-finite "
                            f"values in its {leaf}; nothing was merged"
                        )
            for leaf, t in merged.items():  # keyed by the module holding each tensor
                holder, name = names.split_module(f"{path}.{leaf}")
                out.setdefault(holder, {})[name] = t
        return out

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Run with the adapters folded into the weights (PEFT's name). The folded tensors are new;
        the base weights are untouched, so `unmerge_adapter` is exact to the bit."""
        merged = self.merged_tensors(adapter_names, safe_merge)
        self._install_merged(merged, list(self._active if adapter_names is None else adapter_names))

    def unmerge_adapter(self) -> None:
        for tensors in self._merged.values():
            for fqn in tensors.values():
                delattr(*self._resolve(fqn))
        _prune_empty_slots(self)
        self._merged, self._merged_adapters = {}, []

    @property
    def merged(self) -> bool:
        return bool(self._merged_adapters)

    def fold(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> AdaptedModel:
        """A new adapted model running with these adapters merged: its graphs have no adapter nodes.
        It shares every tensor with this one except the merged weights; this model is unchanged."""
        merged = self.merged_tensors(adapter_names, safe_merge)
        captures, programs = self._captures, self._programs
        self._captures, self._programs = {}, {}
        try:
            clone = _structural_copy(self, keep_requires_grad=True)
        finally:
            self._captures, self._programs = captures, programs
        clone._captures = {key: list(cs) for key, cs in captures.items()}  # base graphs are never mutated
        clone._active = list(self._active if adapter_names is None else adapter_names)
        clone._install_merged(merged, clone._active)
        return clone

    def _install_merged(self, merged: dict[str, dict[str, torch.Tensor]], adapter_names: list[str]) -> None:
        self.unmerge_adapter()
        for path, tensors in merged.items():
            self._merged[path] = {}
            for leaf, t in tensors.items():
                fqn = f"{names.PREFIX}{path}.merged.{leaf}"
                _set_tensor(self, fqn, t, persistent=False)
                self._merged[path][leaf] = fqn
        self._merged_adapters = adapter_names

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> nn.Module:
        """The base model's class with the adapters merged into its weights (PEFT's name and meaning),
        ready for `save_pretrained` and `generate`. A copy: this adapted model is unchanged; tensors
        the merge does not touch share storage with the model given to `apply`, as under PEFT."""
        del progressbar  # merging is one pass over tensors; kept for PEFT's signature
        merged = self.merged_tensors(adapter_names, safe_merge)
        self._sync_source()
        model = _structural_copy(self._source)
        uses: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
        untied = False
        for path, tensors in merged.items():
            module = model.get_submodule(path)
            for leaf, t in tensors.items():
                untied |= uses[id(getattr(module, leaf))] > 1
                module.register_parameter(leaf, nn.Parameter(t, requires_grad=False))
        if untied and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            # a merged embedding no longer equals the head it was tied to: keep them apart when saved
            model.config.tie_word_embeddings = False
        return model.train(self.training)

    def unload(self) -> nn.Module:
        """The base model without any adapter (PEFT's name): a copy sharing the base tensors."""
        self._sync_source()
        return _structural_copy(self._source).train(self.training)

    # -- the rest of PEFT's API ----------------------------------------------------------------------

    @property
    def targeted_modules(self) -> dict[str, list[ModuleAdapter]]:
        """Module path -> the adapters placed on it."""
        self._refresh_adapter_tensors()
        return dict(self._adapters)

    def adapter_parameters(self, adapter: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of one adapter, or of the active adapters."""
        wanted = self._active if adapter is None else [adapter]
        for mas in self.targeted_modules.values():
            for ma in mas:
                if ma.adapter in wanted and not getattr(ma, "tied", None):  # a tied head's are the embedding's
                    for fqn, t in ma.tensors.values():
                        if isinstance(t, nn.Parameter):
                            yield fqn, t

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    def get_base_model(self) -> nn.Module:
        """The base model without adapters (PEFT's name): peftc's structural copy of the model it
        was given, holding the adapted model's frozen base tensors."""
        self._sync_source()
        return self._source

    def save_adapter(self, directory: str, adapter_name: str | None = None,
                     path_initial_model_for_weight_conversion: str | None = None) -> None:
        """Write one adapter (default: the active one) as `adapter_config.json` +
        `adapter_model.safetensors` in PEFT's format and layout. With
        `path_initial_model_for_weight_conversion` (the folder of the adapter saved right after a
        PiSSA/OLoRA init), write PEFT's conversion: a plain LoRA for the original base weights."""
        from .checkpoint import save_adapter

        adapter_name = adapter_name or self._active[0]
        if adapter_name in self._padded:
            raise ConfigError(
                f"adapter {adapter_name!r} was hot-swapped in at a smaller rank and is zero-padded here; "
                "its checkpoint is the folder it was swapped in from"
            )
        save_adapter(self, directory, adapter_name, path_initial_model_for_weight_conversion)

    def save_pretrained(self, save_directory: str, selected_adapters: Sequence[str] | None = None,
                        path_initial_model_for_weight_conversion: str | None = None) -> None:
        """PEFT's name: every adapter (or the selected ones), "default" in the folder, others in subfolders."""
        for name in selected_adapters or self.adapter_order:
            self.save_adapter(save_directory, name, path_initial_model_for_weight_conversion)




EXTRAS = ("target_parameters", "trainable_token_indices", "modules_to_save")  # LoRA's non-factor parts


def _has_extras(config: AdapterConfig) -> bool:
    return any(getattr(config, name, None) for name in EXTRAS)


def _check_adapter_name(adapter_name: Any) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name or "/" in adapter_name \
            or "\\" in adapter_name or adapter_name == BASE_NAME:
        raise ConfigError(f"adapter name {adapter_name!r} must be a non-empty name without '.', '/' or '\\'")


def _listing_diff(got: Any, want: Any) -> str:
    got = set(got)
    want = {w.module_path if isinstance(w, ModuleAdapter) else w for w in want}
    extra, missing = sorted(got - want)[:3], sorted(want - got)[:3]
    return f"only in the new one: {extra}; only in the loaded one: {missing}"


def _lora_factor_keys(ma: ModuleAdapter) -> tuple[tuple[str, str | None], tuple[str, str | None]]:
    if ma.kind == "embedding":
        return ("lora_embedding_A", None), ("lora_embedding_B", None)
    return ("lora_A", "weight"), ("lora_B", "weight")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _prune_empty_slots(root: nn.Module) -> None:
    for name, child in list(root._modules.items()):
        if isinstance(child, Slot):
            _prune_empty_slots(child)
            if not child._modules and not child._parameters and not child._buffers:
                del root._modules[name]


@functools.cache
def _adapted_class(base: type) -> type[AdaptedModel]:
    """AdaptedModel's subclass for models of class `base`: its forward declares `base.forward`'s
    parameters (transformers' Trainer finds `labels` there, as it does through PeftModel)."""

    def forward(self: AdaptedModel, *args: Any, **kwargs: Any) -> Any:
        return AdaptedModel.forward(self, *args, **kwargs)

    ours = inspect.signature(AdaptedModel.forward).parameters
    extra = [ours["adapter_names"], ours["adapter_index"]]
    params = [p for p in inspect.signature(base.forward).parameters.values() if p.name not in {e.name for e in extra}]
    tail = [p for p in params if p.kind == inspect.Parameter.VAR_KEYWORD]
    head = [p for p in params if p.kind != inspect.Parameter.VAR_KEYWORD]
    forward.__signature__ = inspect.Signature(head + extra + tail)  # type: ignore[attr-defined]
    forward.__doc__ = AdaptedModel.forward.__doc__
    name = f"Adapted{base.__name__}"
    return type(name, (AdaptedModel,), {"forward": forward, "__module__": __name__, "__qualname__": name})


def _structural_copy(model: nn.Module, keep_requires_grad: bool = False) -> nn.Module:
    """A deep copy of the module tree whose tensors are fresh Parameters / cloned buffers.

    Parameters share storage with the original (no memory is copied) and are frozen unless
    `keep_requires_grad`; buffers are cloned because the model may update them in place
    (BatchNorm statistics). Tied tensors stay tied.
    """
    memo: dict[int, Any] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        memo.setdefault(id(p), nn.Parameter(p.detach(), requires_grad=keep_requires_grad and p.requires_grad))
    for _, b in model.named_buffers(remove_duplicate=False):
        memo.setdefault(id(b), b.detach().clone())
    return copy.deepcopy(model, memo)


def _group_leaf(key: tuple[str, str | None], adapter: str) -> tuple[str, str, str | None]:
    group, leaf = key
    return group, adapter, leaf


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise ConfigError(
        f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
        f"got {type(example_inputs).__name__}"
    )


def apply(
    model: nn.Module,
    config: AdapterConfig | dict | str,
    adapter_name: str = "default",
    example_inputs: Any = None,
) -> AdaptedModel:
    """Capture `model`, place the adapter `config` describes, and return the adapted model.

    `config` is a peftc config, a dict with PEFT's field names, or a path to an
    `adapter_config.json`. `example_inputs` (a tensor, tuple, or dict of kwargs) is needed for
    models that are not transformers models; use a batch of 2 or more.
    """
    return AdaptedModel(model, load_config(config), adapter_name, example_inputs)
