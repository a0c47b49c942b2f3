"""Merging as functions over the adapted model's parts: merged tensors, the merged state a fold reads,
`merge_and_unload` and `unload`.

Merged tensors are new: the base tensors are never written, so unmerging is forgetting them (exact
to the bit). Each method's `fold` runs in fp32 (fp64 stays fp64) and the result is cast to the base
dtype once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from peftc.passes.lora_params import ParamAdapter
from peftc.passes.modules_to_save import CopyAdapter

from . import names
from .adapters import AdapterSet
from .errors import ConfigError, PeftcError
from .method import adapter_dtype
from .state import ParameterTree, structural_copy


@dataclass
class MergedState:
    """The merged tensors a fold rebinds sites to: module path -> {"weight": tree name of the merged tensor}."""

    tensors: dict[str, dict[str, str]] = field(default_factory=dict)
    adapters: list[str] = field(default_factory=list)  # what was merged, in order

    def install(self, tree: ParameterTree, merged: dict[str, dict[str, torch.Tensor]], adapters: list[str]) -> None:
        self.uninstall(tree)
        for path, tensors in merged.items():
            self.tensors[path] = {}
            for leaf, t in tensors.items():
                fqn = f"{names.PREFIX}{path}.merged.{leaf}"
                tree.set(fqn, t, persistent=False)
                self.tensors[path][leaf] = fqn
        self.adapters = adapters

    def uninstall(self, tree: ParameterTree) -> None:
        for tensors in self.tensors.values():
            for fqn in tensors.values():
                tree.remove(fqn)
        tree.prune()
        self.tensors, self.adapters = {}, []


def merged_tensors(tree: ParameterTree, adapters: AdapterSet, adapter_names: Sequence[str], safe_merge: bool = False,
                   ) -> dict[str, dict[str, torch.Tensor]]:
    """Module path -> its tensors with `adapter_names` merged in, in order (new tensors; nothing is written).
    With `safe_merge`, a non-finite result is an error naming the layer."""
    unknown = [n for n in adapter_names if n not in adapters.configs]
    if unknown:
        raise ConfigError(f"unknown adapter(s) {unknown}; loaded: {adapters.order}")
    if tree.replicated:
        raise ConfigError("cannot merge LoRA layers when base model layers are replicated (layer_replication): the "
                          "replicas share one base weight, each with its own adapter (PEFT refuses too)")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for path, mas in adapters.named(adapter_names).items():
        # an adapter on a parameter (target_parameters) merges into that parameter of its module; a module
        # trained as copies (modules_to_save) into all of its parameters
        path = getattr(mas[0], "owner", path)
        module = tree.source.get_submodule(path)
        own = dict(module.named_parameters())
        leaves = ((mas[0].param,) if isinstance(mas[0], ParamAdapter) else tuple(own)
                  if isinstance(mas[0], CopyAdapter) else ("weight", "bias"))
        base = {leaf: tree.tensor(tree.names[f"{path}.{leaf}"])
                for leaf in leaves if own.get(leaf) is not None or getattr(module, leaf, None) is not None}
        work = {leaf: t.detach().to(adapter_dtype(t)) for leaf, t in base.items()}
        changed: set[str] = set()
        for ma in mas:
            if not ma.method.mergeable:
                raise ConfigError(f"adapter {ma.adapter!r} ({ma.method.peft_type}) cannot be merged")
            tensors = {key: t.detach().to(adapter_dtype(t)) if t.is_floating_point() else t.detach()
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


def merge_and_unload(tree: ParameterTree, merged: dict[str, dict[str, torch.Tensor]], training: bool) -> nn.Module:
    """The base model's class holding `merged` in place of its tensors (PEFT's `merge_and_unload`): a copy
    whose other tensors share storage with the model given to `apply`, as under PEFT."""
    tree.sync_source()
    model = structural_copy(tree.source)
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
    return model.train(training)


def unload(tree: ParameterTree, training: bool) -> nn.Module:
    """The base model without any adapter (PEFT's `unload`): a copy sharing the base tensors."""
    tree.sync_source()
    return structural_copy(tree.source).train(training)
