"""Trainable tokens: chosen rows of an embedding matrix are trained, the rest stay frozen. Two ways in, one
definition: LoRA's `trainable_token_indices` (a part of a LoRA config) and PEFT's standalone method
(`TrainableTokensConfig`, peft_type TRAINABLE_TOKENS).

PEFT's TrainableTokensLayer: the layer runs on W' = W.index_copy(0, indices, delta), `delta` starting as
the rows W[indices]; an output head tied to the embedding (GPT-2's `lm_head`) runs on the same W'.
Here the site's op is run again on W' (the lookup, or the tied head's linear), so it folds to W' itself.

Names are PEFT's. As LoRA's part: the rows live at `<embedding>.token_adapter.trainable_tokens_delta.<adapter>`
(saved without the adapter name), the base weight at `<embedding>.token_adapter.base_layer.weight`; a tied
head shows the same tensors under `<head>.token_adapter....`, and PEFT saves only the embedding's. The
standalone method wraps the layers themselves (`<embedding>.trainable_tokens_delta.<adapter>`), and PEFT
saves a tied head's rows too (a copy of the embedding's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.fx
import torch.nn as nn

from peftc.config import AdapterConfig, LoraConfig, target_names
from peftc.errors import ConfigError
from peftc.graph import cast, dtype_of
from peftc.method import (
    AdapterTensors,
    EmitContext,
    Method,
    ModuleAdapter,
    Placed,
    Placement,
    Target,
    TensorKey,
    adapter_dtype,
    register_method,
)
from peftc.names import TOKEN_ADAPTER
from peftc.sites import WEIGHT_OPS

from .oft import current_base_op

aten = torch.ops.aten

DELTA = ("trainable_tokens_delta", None)
INDICES = ("token_indices", None)  # a run-time buffer (PEFT keeps the indices as a plain list)


@dataclass
class TokenAdapter(ModuleAdapter):
    """Trainable rows at one module (the adapted model keys it by the module itself); `module_path` is
    PEFT's wrapper path, `<module>.token_adapter`. A tied head's adapter shares the embedding's tensors
    (`tied` names the embedding) and is not saved on its own."""

    tied: str | None = None
    saved: bool = True  # whether checkpoints hold its tensors (a tied head's, only in the standalone method)


@dataclass
class TrainableTokensConfig(AdapterConfig):
    """PEFT's `TrainableTokensConfig`, same fields and defaults: `target_modules` None means the model's
    input embedding."""

    peft_type_name: ClassVar[str] = "TRAINABLE_TOKENS"

    token_indices: list[int] = field(default_factory=list)
    target_modules: list[str] | str | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target_modules = target_names(self.target_modules)


@register_method
class TrainableTokens(Method):
    """LoRA's `trainable_token_indices`: a part of a LoRA config, placed at the embeddings it names and at
    the heads tied to them. A transformed weight, lowered where the weight is read: at the lookup's and
    the tied head's op sites, as OFT's rotated weights are."""

    peft_type = "LORA"
    config_cls = LoraConfig
    placement = Placement.OP_SITE
    part_of_field = "trainable_token_indices"
    example_config = {"peft_type": "LORA", "r": 2, "target_modules": ["proj"],
                      "trainable_token_indices": {"emb": [3, 5]}}  # ids in its inputs
    example_model = "embedding_model"
    groups = ("trainable_tokens_delta",)
    layer_types = {"embedding": "nn.Embedding", "linear": "nn.Linear (tied to the embedding)"}
    site_ops = {"embedding": ("embedding",), "linear": ("linear",)}
    indices_field: ClassVar[str] = "trainable_token_indices"  # the config field holding the token ids
    saves_tied_heads: ClassVar[bool] = False  # whether checkpoints hold a tied head's rows again (as PEFT's)

    def targets(self, config: LoraConfig, model: nn.Module, adapter: str, placed: Placed) -> list[Target]:
        """Each embedding named, then each head tied to it (showing the embedding's tensors, unsaved); PEFT
        wraps a layer one way or the other, so none of them may be adapted otherwise."""
        if config.trainable_token_indices is None:
            return []
        tokens = token_targets(config, model)
        heads = {path: tied_heads(model, path) for path in tokens}
        own = placed.own_paths()
        for path in [*tokens, *(head for hs in heads.values() for head in hs)]:
            if path in own or any(not isinstance(ma, TokenAdapter) for ma in placed.modules.get(path, [])):
                raise ConfigError(f"module {path!r} has trainable_token_indices and is targeted by an adapter too "
                                  "(PEFT wraps a layer one way or the other); leave it out of target_modules")
        for path in own:
            if any(isinstance(ma, TokenAdapter) for ma in placed.modules.get(path, [])):
                raise ConfigError(f"module {path!r} has trainable token rows from another adapter; it cannot be "
                                  "targeted by target_modules as well")
        for path in sorted(set(tokens) & placed.part_paths("modules_to_save")):
            raise ConfigError(f"module {path!r} is in modules_to_save and has trainable_token_indices; "
                              "choose one (PEFT refuses both too)")
        out = []
        for path in tokens:
            out.append(Target(path, path, model.get_submodule(path), "embedding", name_path=wrapper_path(path)))
            out += [Target(head, head, model.get_submodule(head), "linear", name_path=wrapper_path(head), tied=path)
                    for head in heads[path]]
        return out

    def adapter(self, target: Target, adapter: str, config: LoraConfig,
                tensors: dict[TensorKey, tuple[str, torch.Tensor]]) -> TokenAdapter:
        return TokenAdapter(target.names_at, adapter, self, target.kind, config, tensors, tied=target.tied,
                            saved=target.tied is None or self.saves_tied_heads)

    def indices(self, config: AdapterConfig, module_name: str) -> list[int]:
        """The token ids whose rows are trained at the embedding `module_name`."""
        return token_indices(config, module_name)

    def init_weights(self, config: AdapterConfig) -> bool:
        """PEFT's `init_weights`: True starts the rows at the embedding's, False draws them at random."""
        return True

    def create(self, config: AdapterConfig, module_name: str, module: nn.Module, kind: str) -> AdapterTensors:
        w = module.weight
        indices = self.indices(config, module_name)
        if not indices or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < w.shape[0]
                              for i in indices):
            raise ConfigError(f"{self.indices_field} for {module_name!r}: expected token ids in "
                              f"[0, {w.shape[0]}), got {indices!r}")
        index = torch.tensor(indices, dtype=torch.int64, device=w.device)
        if self.init_weights(config):
            rows = w.detach()[index].clone()
        else:  # PEFT draws them in the weight's dtype, before its adapters are cast to fp32
            rows = torch.randn((len(indices), w.shape[1]), dtype=w.dtype, device=w.device)
        return AdapterTensors(params={DELTA: rows.to(adapter_dtype(w))}, buffers={INDICES: index})

    def emit(self, ctx: EmitContext) -> torch.fx.Node:
        b, site, y, tensors = ctx.builder, ctx.site, ctx.y, ctx.tensors
        # after another adapter's rows at this site, `y` is its op again: copy ours into its weight
        op = current_base_op(site, y, self.indices_field)
        w_index = WEIGHT_OPS[op.target][1]
        w = op.args[w_index]
        rows = cast(b, tensors[DELTA], dtype_of(tensors[DELTA]), dtype_of(w))
        return b.rerun(op, {w_index: b.call(aten.index_copy.default, w, 0, tensors[INDICES], rows)})

    def fold(self, kind: str, config: LoraConfig, module: nn.Module, tensors: dict[TensorKey, torch.Tensor],
             base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"weight": base["weight"].index_copy(0, tensors[INDICES], tensors[DELTA])}


@register_method
class StandaloneTrainableTokens(TrainableTokens):
    """PEFT's TRAINABLE_TOKENS method: the rows of the embeddings `target_modules` selects (the input
    embedding by default), and of the heads tied to them. The same adapter as LoRA's part, placed by the
    method's own config."""

    peft_type = "TRAINABLE_TOKENS"
    config_cls = TrainableTokensConfig
    part_of_field = None
    example_config = {"peft_type": "TRAINABLE_TOKENS", "target_modules": ["emb"], "token_indices": [3, 5]}
    example_model = "embedding_model"
    layer_types = {"embedding": "nn.Embedding", "linear": "nn.Linear (only as a head tied to a targeted embedding)"}
    indices_field = "token_indices"
    saves_tied_heads = True

    def prepare_config(self, config: TrainableTokensConfig, model: nn.Module) -> TrainableTokensConfig:
        """PEFT's `_prepare_adapter_config`: no `target_modules` means the input embedding (its full name),
        else a module named `embed_tokens`."""
        if config.target_modules is None:
            config.target_modules = input_embedding_path(model) or "embed_tokens"
        return config

    def module_kind(self, config: TrainableTokensConfig, module_name: str, module: nn.Module) -> str | None:
        return "embedding" if isinstance(module, nn.Embedding) else None

    def own_targets(self, config: TrainableTokensConfig, model: nn.Module, found: list[Target]) -> list[Target]:
        """Each embedding, then each head tied to it, showing its tensors (PEFT ties the head's layer to the
        input embedding's)."""
        return [t for target in found for t in [target, *(
            Target(head, head, model.get_submodule(head), "linear", tied=target.path)
            for head in tied_heads(model, target.path))]]

    def indices(self, config: TrainableTokensConfig, module_name: str) -> list[int]:
        return list(config.token_indices)

    def init_weights(self, config: TrainableTokensConfig) -> bool:
        return config.init_weights


def input_embedding_path(model: nn.Module) -> str | None:
    """The module path of the model's input embedding (`get_input_embeddings`), if it has one."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if embedding is None:
        return None
    return next((name for name, m in model.named_modules() if m is embedding), None)


def token_targets(config: LoraConfig, model: nn.Module) -> dict[str, list[int]]:
    """Module path -> token ids, as PEFT resolves `trainable_token_indices`: a list means the input
    embedding; a dict maps module names (matched by suffix) to their ids."""
    wanted = config.trainable_token_indices
    if wanted is None:
        return {}
    if not isinstance(wanted, dict):
        path = input_embedding_path(model)
        if path is None:
            raise ConfigError(f"trainable_token_indices={wanted!r}: {type(model).__name__} has no input embedding "
                              "(get_input_embeddings); name the layer: {'<module name>': [token ids]}")
        wanted = {path: wanted}
    out = {}
    for name, indices in wanted.items():
        matches = [path for path, m in model.named_modules() if path.endswith(name)]
        if not matches:
            raise ConfigError(f"trainable_token_indices: no module named {name!r}")
        for path in matches:
            if not isinstance(model.get_submodule(path), nn.Embedding):
                raise ConfigError(f"trainable_token_indices: {path!r} is a {type(model.get_submodule(path)).__name__};"
                                  " peftc trains token rows of nn.Embedding layers (and heads tied to them)")
            out[path] = list(indices)
    return out


def token_indices(config: LoraConfig, path: str) -> list[int]:
    """The token ids `config.trainable_token_indices` gives the embedding at `path` (one `token_targets`
    found): the list itself, or the ids of the last name `path` ends with."""
    wanted = config.trainable_token_indices
    if not isinstance(wanted, dict):
        return list(wanted)
    return list([ids for name, ids in wanted.items() if path.endswith(name)][-1])


def tied_heads(model: nn.Module, embedding: str) -> list[str]:
    """Linear modules whose weight is the embedding's, where the model ties them (`tie_word_embeddings`)."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return []
    weight = model.get_submodule(embedding).weight
    return [path for path, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight is weight]


def wrapper_path(module_path: str) -> str:
    return f"{module_path}.{TOKEN_ADAPTER}"
