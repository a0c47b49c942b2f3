"""The adapted model: one PEFT-shaped parameter tree, and a cache of rewritten graphs.

    model --capture--> graph --select/adapt--> adapted graph --eager backend--> outputs

`AdaptedModel` never runs the user's modules: it captures them once per call signature and
mode, rewrites the capture, and runs the graph on its own tensors. Its state-dict keys are
PEFT's (`base_model.model.<path>.base_layer.weight`, `...lora_A.default.weight`); base
tensors share storage with the user's model but are separate, frozen Parameter objects, so
nothing here changes the user's model's `requires_grad` or values.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from peftc.backends.eager import EagerProgram, TensorRef
from peftc.passes import METHODS, insert_adapters

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
from .errors import ConfigError, TargetError
from .method import Method, ModuleAdapter
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
    """What `peftc.apply` returns: call it like the original model."""

    def __init__(
        self,
        model: nn.Module,
        config: AdapterConfig,
        adapter_name: str = "default",
        example_inputs: Any = None,
        training: bool | None = None,
    ):
        super().__init__()
        if adapter_name in ("", None) or "." in adapter_name or "/" in adapter_name:
            raise ConfigError(f"adapter name {adapter_name!r} must be a non-empty name without '.' or '/'")
        method = METHODS[config.peft_type]
        config = resolve_all_linear(copy.deepcopy(config), model)
        self.peft_config: dict[str, AdapterConfig] = {adapter_name: config}
        self.active_adapter = adapter_name
        self.training = model.training if training is None else training
        self._call_defaults = default_call_kwargs(model)
        self._graphs: dict[tuple, list[EagerProgram]] = {}

        kinds = self._layer_kinds(model, method, config)
        # captures trace a structural copy whose tensors are this model's own (no data copied): the
        # user's model is never mutated, and later changes to it cannot desync the graphs
        self.__dict__["_source"] = _structural_copy(model)
        self.base_model = Slot(type(model).__name__)
        self.base_model.add_module("model", Slot(type(model).__name__))
        self._tree_name = self._register_base(self._source, set(kinds))
        self._adapters: dict[str, list[ModuleAdapter]] = {}
        for path, kind in kinds.items():
            self._add_module_adapter(self._source.get_submodule(path), path, adapter_name, method, kind, config)

        # callers that inspect forward's signature (Trainer's column filter) see the model's own
        self.forward = functools.update_wrapper(functools.partial(AdaptedModel.forward, self), self._source.forward)
        args, kwargs = _split_inputs(synthesize_inputs(model) if example_inputs is None else example_inputs)
        self._program(args, {**self._call_defaults, **kwargs})

    # -- construction -------------------------------------------------------------------------

    @staticmethod
    def _layer_kinds(model: nn.Module, method: Method, config: AdapterConfig) -> dict[str, str]:
        kinds = {}
        for path in select_targets(config, model):
            module = model.get_submodule(path)
            kind = method.layer_kind(module)
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

    def _sync_source(self) -> None:
        """Point the source copy at the tree's current tensors (`.to()` replaces buffers, loads may swap)."""
        for fqn, tree_fqn in self._tree_name.items():
            module_path, attr = names.split_module(fqn)
            module = self._source.get_submodule(module_path)
            table = module._parameters if attr in module._parameters else module._buffers
            table[attr] = getattr(*self._resolve(tree_fqn))

    def _add_module_adapter(
        self, module: nn.Module, path: str, adapter: str, method: Method, kind: str, config: AdapterConfig
    ) -> None:
        created = method.create(config, path, module, kind)
        tensors = {}
        for key, value in created.params.items():
            fqn = names.live_key(path, *_group_leaf(key, adapter))
            tensors[key] = (fqn, nn.Parameter(value, requires_grad=not config.inference_mode))
        for key, value in created.buffers.items():
            tensors[key] = (names.live_key(path, *_group_leaf(key, adapter)), value)
        for fqn, tensor in tensors.values():
            _set_tensor(self, fqn, tensor, persistent=False)
        self._adapters.setdefault(path, []).append(ModuleAdapter(path, adapter, method, kind, config, tensors))

    # -- graphs ---------------------------------------------------------------------------------

    def _resolve(self, fqn: str) -> TensorRef:
        module_path, attr = names.split_module(fqn)
        return self.get_submodule(module_path), attr

    def _program(self, args: tuple, kwargs: dict) -> tuple[EagerProgram, list[Any]]:
        flat, spec = flatten_call(args, kwargs)
        key = signature_key(flat, spec, self.training)
        for program in self._graphs.get(key, []):
            if program.captured.accepts(flat):
                return program, flat
        program = EagerProgram(self._build(args, kwargs), self._resolve)
        self._graphs.setdefault(key, []).append(program)
        return program, flat

    def _build(self, args: tuple, kwargs: dict) -> CapturedGraph:
        """The pipeline: capture, bind base tensors to the tree, splice in the active adapters."""
        self._sync_source()
        captured = capture(self._source, args, kwargs, self.training)
        for node in captured.gm.graph.find_nodes(op="placeholder"):
            if STATE in node.meta:
                node.meta[STATE] = self._tree_name[node.meta[STATE]]
        captured.mutated_state = [self._tree_name[f] for f in captured.mutated_state]
        insert_adapters(captured.gm, self._active_adapters(), self.training)
        return captured

    def _active_adapters(self) -> dict[str, list[ModuleAdapter]]:
        return {
            path: [ma for ma in mas if ma.adapter == self.active_adapter]
            for path, mas in self._adapters.items()
        }

    def _apply(self, fn: Any, recurse: bool = True) -> AdaptedModel:
        # .to()/.half()/.cuda(): graphs bake dtypes and devices in, so capture anew if any moved
        before = self._placement()
        super()._apply(fn, recurse)
        if self._placement() != before:
            self._graphs.clear()
        return self

    def _placement(self) -> set[tuple[torch.dtype, torch.device]]:
        return {(t.dtype, t.device) for t in (*self.parameters(), *self.buffers())}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        program, flat = self._program(args, {**self._call_defaults, **kwargs})
        return program(flat)

    @property
    def graphs(self) -> list[CapturedGraph]:
        """The rewritten graphs captured so far (one per call signature and mode)."""
        return [p.captured for programs in self._graphs.values() for p in programs]

    def graph_for(self, *args: Any, **kwargs: Any) -> CapturedGraph:
        """The rewritten graph that a call with these inputs runs (captured if new)."""
        return self._program(args, {**self._call_defaults, **kwargs})[0].captured

    # -- PEFT's API ------------------------------------------------------------------------------

    @property
    def targeted_modules(self) -> dict[str, list[ModuleAdapter]]:
        """Module path -> the adapters placed on it."""
        return dict(self._adapters)

    def adapter_parameters(self, adapter: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        adapter = adapter or self.active_adapter
        for mas in self._adapters.values():
            for ma in mas:
                if ma.adapter == adapter:
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

    def save_adapter(self, directory: str, adapter_name: str | None = None) -> None:
        """Write `adapter_config.json` + `adapter_model.safetensors` in PEFT's format."""
        from .checkpoint import save_adapter

        save_adapter(self, directory, adapter_name or self.active_adapter)

    save_pretrained = save_adapter  # PEFT's name


def _structural_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the module tree whose tensors are fresh frozen Parameters / cloned buffers.

    Parameters share storage with the original (no memory is copied); buffers are cloned because
    the model may update them in place (BatchNorm statistics). Tied tensors stay tied.
    """
    memo: dict[int, Any] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        memo.setdefault(id(p), nn.Parameter(p.detach(), requires_grad=False))
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
