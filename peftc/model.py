"""The adapted model: call it like the original model; PEFT's names for everything else.

    model --capture--> graph --pipeline: fold / adapt / dispatch--> program --backend--> outputs

`AdaptedModel` is a facade over parts with one job each:
  - `parameter_tree` (`peftc/state.py`): every tensor under PEFT's state-dict keys, and the structural
    copy of the user's model that captures trace (the user's model is never mutated);
  - `adapter_set` (`peftc/adapters.py`): loaded adapters, their placements, the active ones;
  - `programs` (`peftc/programs.py`): captured graphs by call signature and mode, and the programs the
    rewrite pipeline (`peftc/pipeline.py`) makes from them: switching adapters never re-captures;
  - merging (`peftc/merge.py`), checkpoints and hot-swap (`peftc/checkpoint.py`), weighted combinations
    (`peftc/weighted.py`) are functions over these parts.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from peftc.passes.adalora import rank_allocator
from peftc.passes.dispatch import BASE_NAME, slot_indices
from peftc.passes.lora_monteclora import monteclora_loss
from peftc.passes.remat import remat_plan

from . import checkpoint, merge, weighted
from .adapters import AdapterSet
from .capture import CapturedGraph, default_call_kwargs, is_transformers_model, split_inputs, synthesize_inputs
from .config import AdapterConfig, load_config
from .errors import CheckpointError, ConfigError
from .method import ModuleAdapter
from .programs import Programs
from .state import ParameterTree, Slot, replicate_layers, structural_copy


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
        self.training = model.training if training is None else training
        self.base_model = Slot(type(model).__name__)
        self.base_model.add_module("model", Slot(type(model).__name__))
        config = load_config(config)
        source = structural_copy(model)
        replication = getattr(config, "layer_replication", None)
        if replication:  # the base model's structure changes before capture, for every adapter
            replicate_layers(source, replication)
        self.parameter_tree = ParameterTree(self, source)
        self.parameter_tree.replicated = replication
        self.adapter_set = AdapterSet(self.parameter_tree)
        self.programs = Programs(self.parameter_tree, self.adapter_set, default_call_kwargs(model),
                                 is_transformers_model(model))
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

        # callers that inspect forward's signature (Trainer's column filter) see the model's own
        self.forward = functools.update_wrapper(functools.partial(AdaptedModel.forward, self),
                                                self.parameter_tree.source.forward)
        args, kwargs = split_inputs(synthesize_inputs(model) if example_inputs is None else example_inputs)
        self.programs.program(args, kwargs, self.training)

    def _apply(self, fn: Any, recurse: bool = True) -> AdaptedModel:
        # .to()/.half()/.cuda(): graphs bake dtypes and devices in, so capture anew if any moved
        before = self.parameter_tree.placement()
        super()._apply(fn, recurse)
        self.adapter_set.refresh_tensors()
        if self.parameter_tree.placement() != before:
            self.programs.reset()
        return self

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
        if adapter_index is None:
            program, flat = self.programs.program(args, kwargs, self.training)
            return program(flat)
        program, flat = self.programs.program(args, kwargs, self.training, mixed=True)
        return program(flat, {"adapter_index": self.programs.checked_index(adapter_index, flat)})

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None,
                 adapter_index: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """transformers' `generate` (its loop and options) running the model's KV-cache graph; per-sample
        adapters as in forward, for the whole generation (see `peftc.generation`)."""
        from .generation import generate

        return generate(self, args, kwargs, adapter_names, adapter_index)

    def adapter_index(self, adapter_names: Sequence[str]) -> torch.Tensor:
        """The `adapter_index` tensor for per-sample adapter names ("__base__": the base model)."""
        order = self.adapter_order
        unknown = sorted({n for n in adapter_names if n != BASE_NAME and n not in order})
        if unknown:
            raise ConfigError(f"adapter_names: unknown adapter(s) {unknown}; loaded: {order} (or {BASE_NAME!r})")
        device = next(iter(self.parameters())).device
        return torch.tensor(slot_indices(adapter_names, order), device=device)

    # -- graphs -----------------------------------------------------------------------------------

    @property
    def graphs(self) -> list[CapturedGraph]:
        """The rewritten graphs built so far (one per call signature, mode and adapter variant)."""
        return [p.captured for p in self.programs.live()]

    @property
    def eager_graphs(self) -> list[tuple[CapturedGraph, torch.fx.GraphModule]]:
        """Each of `graphs` with the module its eager calls run: the graph after `eager_lowering`
        (trivial attention masks dropped; train graphs checkpointed or with gated activations recomputed)."""
        return [(p.captured, p.run) for p in self.programs.live()]

    def graph_for(self, *args: Any, **kwargs: Any) -> CapturedGraph:
        """The rewritten graph that a call with these inputs runs (captured if new)."""
        return self.programs.program(args, kwargs, self.training)[0].captured

    # -- adapters (PEFT's API) -------------------------------------------------------------------

    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        return self.adapter_set.configs

    @property
    def adapter_order(self) -> list[str]:
        """Loaded adapters in the order `adapter_index` numbers them."""
        return self.adapter_set.order

    @property
    def active_adapters(self) -> list[str]:
        return list(self.adapter_set.active)

    @property
    def active_adapter(self) -> str | list[str]:
        active = self.adapter_set.active
        return active[0] if len(active) == 1 else list(active)

    def add_adapter(self, adapter_name: str, peft_config: AdapterConfig | dict | str) -> None:
        """Place another adapter (not activated, as in PEFT); any registered method, even beside another."""
        try:
            self.adapter_set.add(adapter_name, peft_config)
        finally:
            self.programs.clear()

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False) -> None:
        """Load an adapter saved by peftc or PEFT from the folder `model_id` (not activated, as in PEFT)."""
        checkpoint.load_adapter(self, model_id, adapter_name, is_trainable)

    def update_and_allocate(self, global_step: int) -> None:
        """AdaLoRA's rank allocation for the trainable AdaLoRA adapter (PEFT's `AdaLoraModel.update_and_allocate`):
        call after each optimizer step and before zero_grad, or let `AdaLoraCallback` call it in a Trainer."""
        rank_allocator(self).update_and_allocate(global_step)

    def monteclora_loss(self, adapter_names: str | Sequence[str] | None = None) -> torch.Tensor | float:
        """MonteCLoRA's variational loss (PEFT's `_get_monteclora_loss`), to add to the task loss after a training
        call, as PEFT's users and `MontecloraTrainerMixin` do: the model's `loss` output is the task's alone.
        Averaged over the samplers of `adapter_names` (default: the active adapters); 0.0 outside training."""
        return monteclora_loss(self, adapter_names)

    _get_monteclora_loss = monteclora_loss  # PEFT's name

    def hotswap_adapter(self, model_name_or_path: str, adapter_name: str = "default") -> None:
        """Replace a loaded adapter's weights and scales by a saved adapter's, in place (PEFT's
        `hotswap_adapter`): same method and targets, each tensor the same size or smaller (a smaller
        rank is zero-padded, which adds nothing). No graph is captured or rewritten again."""
        checkpoint.hotswap_adapter(self, model_name_or_path, adapter_name)

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
        weighted.add_weighted_adapter(
            self, adapters, weights, adapter_name, combination_type, svd_rank=svd_rank, svd_clamp=svd_clamp,
            svd_full_matrices=svd_full_matrices, svd_driver=svd_driver, density=density,
            majority_sign_method=majority_sign_method,
        )

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Activate one adapter, or several (their outputs add up, as in PEFT). Active adapters are
        trainable unless loaded for inference; the others are frozen."""
        self.adapter_set.activate([adapter_name] if isinstance(adapter_name, str) else list(adapter_name))

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.programs.merged.adapters:
            self.unmerge_adapter()
        self.adapter_set.delete(adapter_name)
        self.programs.clear()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """`with am.disable_adapter():` calls run the base model alone (PEFT's name)."""
        before, self.programs.disabled = self.programs.disabled, True
        try:
            yield
        finally:
            self.programs.disabled = before

    # -- activation checkpointing (transformers' and PEFT's names) --------------------------------

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """Recompute each layer's activations in backward: train graphs run every layer (every n-th)
        through `torch.utils.checkpoint.checkpoint` (kwargs default to `use_reentrant=False`)."""
        self.programs.remat = remat_plan(self.parameter_tree.source, gradient_checkpointing_kwargs, every_n_layers,
                                         offload)
        self.programs.clear()

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """transformers 5's name for `gradient_checkpointing_enable` (what Trainer calls)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_disable(self) -> None:
        self.programs.remat = None
        self.programs.clear()

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.programs.remat is not None

    # -- merging ----------------------------------------------------------------------------------

    def merged_tensors(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False,
                       ) -> dict[str, dict[str, torch.Tensor]]:
        """Module path -> its tensors with the adapters (default: the active ones) merged in: new tensors,
        nothing is written. With `safe_merge`, a non-finite result is an error naming the layer."""
        return merge.merged_tensors(self.parameter_tree, self.adapter_set, self._chosen(adapter_names), safe_merge)

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Run with the adapters folded into the weights (PEFT's name). The folded tensors are new;
        the base weights are untouched, so `unmerge_adapter` is exact to the bit."""
        merged = self.merged_tensors(adapter_names, safe_merge)
        self.programs.merge(merged, self._chosen(adapter_names))

    def unmerge_adapter(self) -> None:
        self.programs.unmerge()

    @property
    def merged(self) -> bool:
        return bool(self.programs.merged.adapters)

    def fold(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> AdaptedModel:
        """A new adapted model running with these adapters merged: its graphs have no adapter nodes.
        It shares every tensor with this one except the merged weights; this model is unchanged."""
        merged = self.merged_tensors(adapter_names, safe_merge)
        programs = self.programs
        self.programs = None  # the clone gets the base captures, not a deep copy of every graph
        try:
            clone = structural_copy(self, keep_requires_grad=True)
        finally:
            self.programs = programs
        clone.programs = programs.detached_copy(clone.parameter_tree, clone.adapter_set)
        clone.adapter_set.active = self._chosen(adapter_names)
        clone.programs.merge(merged, clone.adapter_set.active)
        return clone

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> nn.Module:
        """The base model's class with the adapters merged into its weights (PEFT's name and meaning),
        ready for `save_pretrained` and `generate`. A copy: this adapted model is unchanged; tensors
        the merge does not touch share storage with the model given to `apply`, as under PEFT."""
        del progressbar  # merging is one pass over tensors; kept for PEFT's signature
        return merge.merge_and_unload(self.parameter_tree, self.merged_tensors(adapter_names, safe_merge),
                                      self.training)

    def unload(self) -> nn.Module:
        """The base model without any adapter (PEFT's name): a copy sharing the base tensors."""
        return merge.unload(self.parameter_tree, self.training)

    def _chosen(self, adapter_names: Sequence[str] | None) -> list[str]:
        return list(self.adapter_set.active if adapter_names is None else adapter_names)

    # -- the rest of PEFT's API ----------------------------------------------------------------------

    @property
    def targeted_modules(self) -> dict[str, list[ModuleAdapter]]:
        """Module path -> the adapters placed on it."""
        self.adapter_set.refresh_tensors()
        return dict(self.adapter_set.modules)

    def adapter_parameters(self, adapter: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of what one adapter, or the active adapters, train: their parameters but those the
        method keeps frozen (MiCA's lora_B), and the base biases their `bias` option trains."""
        wanted = self.adapter_set.active if adapter is None else [adapter]
        for mas in self.targeted_modules.values():
            for ma in mas:
                if ma.adapter in wanted and not getattr(ma, "tied", None):  # a tied head's are the embedding's
                    frozen = ma.method.frozen(ma.config)
                    for key, (fqn, t) in ma.tensors.items():
                        if isinstance(t, nn.Parameter) and key not in frozen:
                            yield fqn, t
        biases = {fqn: t for name in wanted for fqn, t in self.adapter_set.bias_parameters(name, trained=True).items()}
        yield from biases.items()

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
        self.parameter_tree.sync_source()
        return self.parameter_tree.source

    def save_adapter(self, directory: str, adapter_name: str | None = None,
                     path_initial_model_for_weight_conversion: str | None = None) -> None:
        """Write one adapter (default: the active one) as `adapter_config.json` +
        `adapter_model.safetensors` in PEFT's format and layout. With
        `path_initial_model_for_weight_conversion` (the folder of the adapter saved right after a
        PiSSA/OLoRA init), write PEFT's conversion: a plain LoRA for the original base weights."""
        if adapter_name is None and not self.adapter_set.active:
            raise CheckpointError(_NOTHING_TO_SAVE)
        adapter_name = adapter_name or self.adapter_set.active[0]
        if adapter_name in self.adapter_set.padded:
            raise ConfigError(
                f"adapter {adapter_name!r} was hot-swapped in at a smaller rank and is zero-padded here; "
                "its checkpoint is the folder it was swapped in from"
            )
        checkpoint.save_adapter(self, directory, adapter_name, path_initial_model_for_weight_conversion)

    def save_pretrained(self, save_directory: str, selected_adapters: Sequence[str] | None = None,
                        path_initial_model_for_weight_conversion: str | None = None) -> None:
        """PEFT's name: every adapter (or the selected ones), "default" in the folder, others in subfolders."""
        if not (selected_adapters or self.adapter_order):
            raise CheckpointError(_NOTHING_TO_SAVE)
        for name in selected_adapters or self.adapter_order:
            self.save_adapter(save_directory, name, path_initial_model_for_weight_conversion)


# (PEFT raises KeyError: 'default')
_NOTHING_TO_SAVE = "no adapter to save: the last one was deleted (delete_adapter); add or load an adapter first"


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
