"""The parameter tree: the adapted model's tensors under PEFT's names, and the source copy captures trace.

The adapted model registers every tensor it owns in a tree of `Slot` modules whose paths are
PEFT's state-dict keys (`base_model.model.<path>.base_layer.weight`, `...lora_A.<adapter>.weight`).
Captures trace the *source*: a structural copy of the user's model whose parameters are fresh
frozen Parameters sharing storage with the user's (no memory copied), so the user's model is
never mutated. `names` maps each source FQN to its tree FQN; graphs read tensors by tree name.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from peftc.backends.eager import TensorRef

from . import names
from .errors import ConfigError
from .method import AdapterTensors, TensorKey


class Slot(nn.Module):
    """A node of the parameter tree, standing for one module of the original model."""

    def __init__(self, kind: str = ""):
        super().__init__()
        self._kind = kind

    def extra_repr(self) -> str:
        return self._kind


def set_tensor(root: nn.Module, fqn: str, tensor: torch.Tensor, persistent: bool = True) -> None:
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


def prune_empty_slots(root: nn.Module) -> None:
    for name, child in list(root._modules.items()):
        if isinstance(child, Slot):
            prune_empty_slots(child)
            if not child._modules and not child._parameters and not child._buffers:
                del root._modules[name]


def structural_copy(model: nn.Module, keep_requires_grad: bool = False) -> nn.Module:
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


def replicate_layers(model: nn.Module, layer_map: list[list[int]]) -> None:
    """PEFT's `replicate_layers` (LoRA's `layer_replication`), on the source copy: the decoder layer list
    rebuilt from [start, end) ranges of the original layers, each a copy sharing the original's parameters
    (`layer_idx` renumbered for the KV cache); `config.num_hidden_layers` follows."""
    inner = model
    while hasattr(inner, "model"):
        inner = inner.model
    inner = getattr(inner, "bert", inner)
    if isinstance(getattr(inner, "layers", None), nn.ModuleList):
        owner, attr = inner, "layers"
    elif isinstance(getattr(getattr(inner, "encoder", None), "layer", None), nn.ModuleList):
        owner, attr = inner.encoder, "layer"
    elif isinstance(getattr(inner, "h", None), nn.ModuleList):
        owner, attr = inner, "h"
    else:
        raise ConfigError("layer_replication: no decoder layer list found (PEFT looks for `layers`, "
                          "`encoder.layer` or `h` under the model: Llama, BERT or Falcon compatible architectures)")
    layers = getattr(owner, attr)
    out_of_range = [pair for pair in layer_map if pair[1] > len(layers)]
    if out_of_range:
        raise ConfigError(f"layer_replication: ranges {out_of_range} reach past the model's {len(layers)} layers")
    new: list[nn.Module] = []
    for start, end in layer_map:
        for i in range(start, end):
            clone = copy.deepcopy(layers[i])
            for name, module in layers[i].named_modules():
                for leaf, p in module.named_parameters(recurse=False):
                    clone.get_submodule(name).register_parameter(leaf, p)
            for module in clone.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = len(new)
            new.append(clone)
    setattr(owner, attr, nn.ModuleList(new))
    if hasattr(getattr(inner, "config", None), "num_hidden_layers"):
        inner.config.num_hidden_layers = len(new)


def group_leaf(key: TensorKey, adapter: str) -> tuple[str, str, str | None]:
    """PEFT's name parts of an adapter tensor: (group, adapter, leaf), e.g. ("lora_A", "default", "weight")."""
    group, leaf = key
    return group, adapter, leaf


class ParameterTree:
    """The tensors registered on `root` (the adapted model) under PEFT's names, and the source copy."""

    def __init__(self, root: nn.Module, source: nn.Module) -> None:
        self.root = root
        self.source = source
        self.names: dict[str, str] = {}  # source FQN -> tree FQN
        self.replicated: list[list[int]] | None = None  # the layer_replication the source was built with
        # for sync_source: (the source module's table, name, the tree module, name), while no tensor is re-homed
        self._links: list[tuple[dict[str, Any], str, nn.Module, str]] | None = None
        for fqn, p in source.named_parameters(remove_duplicate=False):
            self.names[fqn] = names.base_key(fqn, set())
            set_tensor(root, self.names[fqn], p)
        for module_path, module in source.named_modules(remove_duplicate=False):
            for name, buf in module._buffers.items():
                if buf is not None:
                    fqn = f"{module_path}.{name}" if module_path else name
                    self.names[fqn] = names.base_key(fqn, set())
                    set_tensor(root, self.names[fqn], buf, name not in module._non_persistent_buffers_set)

    def resolve(self, fqn: str) -> TensorRef:
        module_path, attr = names.split_module(fqn)
        return self.root.get_submodule(module_path), attr

    def tensor(self, fqn: str) -> torch.Tensor:
        return getattr(*self.resolve(fqn))

    def rehomed(self) -> None:
        """Tensors moved between modules (`set`, `remove`, `prune`, an add-adapter rollback): `sync_source` looks
        their holders up anew."""
        self._links = None

    def set(self, fqn: str, tensor: torch.Tensor, persistent: bool = True) -> None:
        self.rehomed()
        set_tensor(self.root, fqn, tensor, persistent)

    def remove(self, fqn: str) -> None:
        """Drop the tensor at `fqn` if it is still there (a shared tensor goes with the first of its holders)."""
        self.rehomed()
        module, attr = self.resolve(fqn)
        if hasattr(module, attr):
            delattr(module, attr)

    def prune(self) -> None:
        self.rehomed()
        prune_empty_slots(self.root)

    def rename_base(self, adapted: set[str]) -> None:
        """Move base tensors to PEFT's names for the modules adapted now (`<module>.base_layer.<name>`)."""
        for fqn, old in list(self.names.items()):
            new = names.base_key(fqn, adapted)
            if new == old:
                continue
            module, attr = self.resolve(old)
            tensor = getattr(module, attr)
            persistent = attr not in module._non_persistent_buffers_set
            delattr(module, attr)
            self.set(new, tensor, persistent)
            self.names[fqn] = new
        self.prune()

    def sync_source(self) -> None:
        """Point the source copy at the tree's current tensors (`.to()` replaces buffers, loads may swap).
        Done before every generate call: the modules holding each tensor are looked up once, not each time."""
        if self._links is None:
            self._links = []
            for fqn, tree_fqn in self.names.items():
                module_path, attr = names.split_module(fqn)
                module = self.source.get_submodule(module_path)
                table = module._parameters if attr in module._parameters else module._buffers
                self._links.append((table, attr, *self.resolve(tree_fqn)))
        for table, attr, holder, tree_attr in self._links:
            table[attr] = getattr(holder, tree_attr)

    def replace_base(self, path: str, leaf: str, value: torch.Tensor) -> None:
        """A new frozen base tensor for module `path` (PiSSA/OLoRA's residual, LoftQ's dequantised weight), in the
        tree and the source copy; the graphs read base tensors by tree name, and the user's tensor is left as it was."""
        module = self.source.get_submodule(path)
        old = getattr(module, leaf)
        if any(p is old for fqn, p in self.source.named_parameters(remove_duplicate=False) if fqn != f"{path}.{leaf}"):
            raise ConfigError(
                f"module {path!r}: its {leaf} is tied to another module's, and this adapter's init rewrites it "
                "(PiSSA/OLoRA/LoftQ would change both uses); target the module without tied weights"
            )
        new = nn.Parameter(value, requires_grad=False)
        self.set(self.names[f"{path}.{leaf}"], new)
        module._parameters[leaf] = new

    def own_trainable(self, key: str) -> None:
        """Give the source tensor `key` (a base bias PEFT's `bias` option trains) a copy of its own, holding its
        current value, so that training it never writes into the user's model."""
        module_path, leaf = names.split_module(key)
        module = self.source.get_submodule(module_path)
        old = module._parameters[leaf]
        if any(p is old for fqn, p in self.source.named_parameters(remove_duplicate=False) if fqn != key):
            raise ConfigError(f"parameter {key!r} is tied to another, and bias training would change both uses")
        new = nn.Parameter(old.detach().clone(), requires_grad=False)
        self.set(self.names[key], new)
        module._parameters[leaf] = new

    def register_created(self, path: str, adapter: str, created: AdapterTensors, trainable: bool,
                         ) -> dict[TensorKey, tuple[str, torch.Tensor]]:
        """Register one adapter's new tensors under PEFT's live names at module `path`."""
        tensors: dict[TensorKey, tuple[str, torch.Tensor]] = {}
        for key, value in created.params.items():
            tensors[key] = (self.live_key(path, key, adapter), nn.Parameter(value, requires_grad=trainable))
        for key, value in created.buffers.items():
            tensors[key] = (self.live_key(path, key, adapter), value)
        for fqn, tensor in tensors.values():
            self.set(fqn, tensor, persistent=False)
        for key, value in created.state.items():  # frozen, in the state dict (a buffer: never made trainable)
            tensors[key] = (self.live_key(path, key, adapter), value)
            self.set(tensors[key][0], value, persistent=True)
        return tensors

    @staticmethod
    def live_key(path: str, key: TensorKey, adapter: str) -> str:
        """PEFT's state-dict key of one adapter tensor at module `path`."""
        return names.live_key(path, *group_leaf(key, adapter))

    def state_names(self, key: str) -> frozenset[str]:
        """The tree names of the source tensor `key` and of every tensor tied to it (a graph reads it by one)."""
        tensor = self.source.get_parameter(key)
        return frozenset(self.names[fqn] for fqn, p in self.source.named_parameters(remove_duplicate=False)
                         if p is tensor)

    def placement(self) -> set[tuple[torch.dtype, torch.device]]:
        return {(t.dtype, t.device) for t in (*self.root.parameters(), *self.root.buffers())}
