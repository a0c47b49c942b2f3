"""EVA (Explained Variance Adaptation): LoRA's data-driven init, PEFT's `initialize_lora_eva_weights`.

    am = peftc.apply(model, {..., "init_lora_weights": "eva", "eva_config": {"rho": 2.0}})
    peftc.initialize_lora_eva_weights(am, dataloader)
    # or in two steps: sd = peftc.get_eva_state_dict(am, dataloader)
    #                  peftc.initialize_lora_eva_weights(am, eva_state_dict=sd)

Over batches of the user's data, each targeted Linear/Conv1D layer's inputs (padding and, with
`use_label_mask`, positions whose label is `label_mask_value` left out) feed an incremental PCA; a layer
is done when its leading components stop turning (cosine similarity >= `tau` between two steps). The
rank budget (the sum of the layers' ranks) then goes to the components with the largest explained
variance ratio across layers, at most `r·rho` per layer; A is each layer's top components (divided by
the square roots of their singular values with `whiten`), B stays zero, so the model's outputs are
still the base model's. A layer's rank may change: its alpha follows (`adjust_scaling_factors`: the
scale alpha/r is kept), `rank_pattern` / `alpha_pattern` record it, and a layer given rank 0 loses its
adapter (`target_modules` becomes the list of adapted modules, shortened as PEFT does from 20 on).
An embedding PEFT does not cover gets the default init (fresh draws, in PEFT's order).

The layer inputs come from the base model run eagerly with forward hooks (the adapted model's source
copy, which shares its weights), not from the captured graph: a LoRA layer's input with the adapter
disabled is its base layer's input, so these are the tensors PEFT's hooks see, bit for bit. That keeps
PEFT's bookkeeping exact (layers with equal inputs share one PCA; convergence is decided at the same
step), and `forward_fn` / `prepare_layer_inputs_fn` receive what PEFT gives them. The statistics pass
runs once, with no adapter in it: a capture of a graph returning every site's input would buy nothing.

The PCA is PEFT's (`peft.utils.incremental_pca.IncrementalPCA`, fixed by PEFT's hook to
`torch.svd_lowrank` with q = 2·components, 4 iterations and seed 42), ported op for op, so A, the ranks
and the alphas equal PEFT's on the same model, data and seed. One difference: with `whiten`, PEFT divides
the components in place, and layers sharing one PCA (q/k/v fed the same input) hold views of one tensor,
so each row ends up divided once per layer of the group whose rank covers it (q, k and v by s^(3/2) rather
than s^(1/2)); peftc divides each layer's copy once, as the method defines whitening.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from copy import deepcopy
from itertools import cycle
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from peftc.config import AdapterConfig, LoraConfig, load_config
from peftc.errors import ConfigError
from peftc.method import METHODS, TensorKey
from peftc.targets import is_target

from .lora import A, lora_rank_alpha

# the layer kinds EVA initialises (PEFT's: Linear and Conv1D; its Embedding gets the default init)
EVA_KINDS = ("linear", "conv1d")
# PEFT writes target_modules as their shortest separating suffixes from this many modules on
MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20
RHO_THRESHOLD = 1000  # PEFT caps larger rho at (largest parameter dimension) / r


class IncrementalPCA:
    """PEFT's incremental PCA as its EVA hook configures it (low-rank SVD, seeded): `partial_fit` only."""

    def __init__(self, n_components: int, lowrank_niter: int = 4, lowrank_seed: int = 42) -> None:
        self.n_components = n_components
        self.lowrank_q = 2 * n_components
        self.lowrank_niter = lowrank_niter
        self.lowrank_seed = lowrank_seed
        self.fitted = False

    def _svd(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.random.fork_rng():
            torch.manual_seed(self.lowrank_seed)
            u, s, v = torch.svd_lowrank(x, q=self.lowrank_q, niter=self.lowrank_niter)
        return u, s, v.mH

    @staticmethod
    def _mean_and_var(x: torch.Tensor, last_mean: torch.Tensor | None, last_var: torch.Tensor | None,
                      last_count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        new_count = torch.tensor([x.shape[0]], device=x.device)
        count = last_count + new_count
        last_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device) if last_mean is None \
            else last_mean * last_count
        new_sum = x.sum(dim=0, dtype=torch.float64)
        mean = (last_sum + new_sum) / count
        temp = x - new_sum / new_count
        correction = temp.sum(dim=0, dtype=torch.float64).square()
        temp.square_()
        new_unnormalized = temp.sum(dim=0, dtype=torch.float64) - correction / new_count
        if last_var is None:
            return mean, new_unnormalized / count, count
        ratio = last_count.double() / new_count
        unnormalized = last_var * last_count + new_unnormalized + ratio / count * (last_sum / ratio - new_sum).square()
        return mean, unnormalized / count, count

    def partial_fit(self, x: torch.Tensor) -> None:
        x = x.clone()
        n_samples, n_features = x.shape
        if self.n_components > n_features:
            raise ConfigError(f"EVA asks for {self.n_components} components (r·rho) of inputs with only {n_features} "
                              "features: lower r or rho for this layer (rank_pattern)")
        if not self.fitted:
            self.mean_, self.var_, self.n_samples_seen_ = None, None, torch.tensor([0], device=x.device)
        mean, var, total = self._mean_and_var(x, self.mean_, self.var_, self.n_samples_seen_)
        if not self.fitted:
            x -= mean
        else:
            batch_mean = torch.mean(x, dim=0)
            x -= batch_mean
            factor = torch.sqrt((self.n_samples_seen_.double() / total) * n_samples)
            x = torch.vstack((self.singular_values_.view((-1, 1)) * self.components_, x,
                              factor * (self.mean_ - batch_mean)))
        _, s, vt = self._svd(x)
        # PEFT's svd_flip (v-based): each component's largest entry positive, for a deterministic sign
        signs = torch.sign(vt[range(vt.shape[0]), torch.argmax(torch.abs(vt), dim=1)])
        vt = vt * signs.view(-1, 1)
        self.n_samples_seen_, self.mean_, self.var_ = total, mean, var
        self.components_ = vt[: self.n_components]
        self.singular_values_ = s[: self.n_components]
        self.explained_variance_ratio_ = (s**2 / torch.sum(var * total))[: self.n_components]
        self.fitted = True


# -- PEFT's default input preparation for language modelling (same names, arguments and results) -----------------

def prepare_model_inputs_fn_language_modeling(model_input: Any, peft_config: LoraConfig) -> torch.Tensor:
    """The (batch, position) indices whose layer inputs EVA uses: not padding (`attention_mask`) and, with
    `use_label_mask`, not labelled `label_mask_value`."""
    if not isinstance(model_input, dict):
        raise ConfigError("EVA's default prepare_model_inputs_fn needs each batch as a dict (input_ids, ...); "
                          "give prepare_model_inputs_fn=None and prepare_layer_inputs_fn=None for other inputs")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    eva = peft_config.eva_config
    if eva["use_label_mask"] and "labels" in model_input:
        mask = torch.logical_and(mask, model_input["labels"] != eva["label_mask_value"])
    return mask.nonzero()


def _first_input(layer_input: Any, layer_name: str) -> torch.Tensor:
    if isinstance(layer_input, (tuple, list)):
        layer_input = layer_input[0]
    if not isinstance(layer_input, torch.Tensor):
        raise ConfigError(f"EVA: unsupported input type {type(layer_input).__name__} of layer {layer_name!r}; "
                          "give a prepare_layer_inputs_fn for it")
    return layer_input


def prepare_layer_inputs_fn_language_modeling(layer_input: Any, model_input: torch.Tensor,
                                              layer_name: str) -> torch.Tensor:
    """The layer's input at the positions `prepare_model_inputs_fn_language_modeling` selected."""
    return _first_input(layer_input, layer_name)[model_input.T.unbind()]


def _prepare_layer_inputs_default(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """With prepare_layer_inputs_fn=None: every position, flattened to (tokens, features)."""
    x = _first_input(layer_input, layer_name)
    return x.view(-1, x.size(-1)) if x.ndim > 2 else x


def forward_fn_dict(model: nn.Module, inputs: dict[str, Any]) -> Any:
    return model(**inputs)


# -- hooks ------------------------------------------------------------------------------------------------------

class _Hook:
    def __init__(self, name: str, prepare_layer_inputs_fn: Callable | None, gather_distributed_inputs: bool) -> None:
        self.name = name
        self.prepare_fn = prepare_layer_inputs_fn or _prepare_layer_inputs_default
        self.gather_distributed_inputs = gather_distributed_inputs
        self.model_input: Any = None

    def inputs(self, layer_input: Any) -> torch.Tensor:
        x = self.prepare_fn(layer_input, self.model_input, self.name)
        if not (dist.is_initialized() and self.gather_distributed_inputs):
            return x
        # every rank's rows, padded to the largest count for all_gather and trimmed again (PEFT's gather)
        size = torch.tensor([x.shape[0]], device=x.device)
        sizes = torch.empty(dist.get_world_size(), dtype=size.dtype, device=x.device)
        dist.all_gather_into_tensor(sizes, size)
        sizes = sizes.tolist()
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.shape[0]] = x
        gathered = [torch.zeros_like(padded) for _ in sizes]
        dist.all_gather(gathered, padded.contiguous())
        return torch.cat([t[:n] for t, n in zip(gathered, sizes)], dim=0)


class _HashHook(_Hook):
    """Fingerprints a layer's inputs in the first batch: layers whose inputs are equal share one PCA."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.hashed: list[int] = []

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        x = self.inputs(args).detach().cpu().contiguous()
        self.hashed.append(hash((x.dtype, tuple(x.shape), x.numpy().tobytes())))


class _SVDHook(_Hook):
    """One incremental-PCA step per batch, and per component whether it has stopped turning."""

    def __init__(self, n_components: int, tau: float, *args: Any) -> None:
        super().__init__(*args)
        self.n_components, self.tau = n_components, tau
        self.svd = IncrementalPCA(n_components)
        self.converged = torch.zeros((n_components,), dtype=torch.bool)

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        previous = self.svd.components_.clone() if self.svd.fitted else None
        states = self.inputs(args)
        if states.size(0) < self.n_components:
            warnings.warn(f"EVA: skipping the SVD step of {self.name!r}: fewer than {self.n_components} inputs in "
                          "this batch", UserWarning, stacklevel=2)
            return
        self.svd.partial_fit(states.to(torch.float32))
        if previous is None:
            return
        self.converged = torch.nn.functional.cosine_similarity(self.svd.components_, previous) >= self.tau


# -- EVA's state dict: each layer's A ---------------------------------------------------------------------------

def _move(inputs: Any, device: torch.device) -> Any:
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _move(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_move(v, device) for v in inputs)
    return inputs


def _eva_targets(model: nn.Module, peft_config: AdapterConfig | dict | str | None,
                 adapter_name: str) -> tuple[nn.Module, LoraConfig, list[str]]:
    """(the base model to run, the config, the module paths EVA initialises, in model order)."""
    lora = METHODS["LORA"]
    adapter_set = getattr(model, "adapter_set", None)
    if adapter_set is not None:  # an adapted model: its adapter's Linear/Conv1D placements, on its source copy
        if adapter_name not in adapter_set.configs:
            raise ConfigError(f"no adapter named {adapter_name!r}; loaded: {adapter_set.order}")
        config = load_config(peft_config) if peft_config is not None else adapter_set.configs[adapter_name]
        base = model.parameter_tree.source
        placed = {ma.module_path for ma in adapter_set.of(adapter_name) if ma.method is lora and ma.kind in EVA_KINDS}
    else:  # a plain model: PEFT's target rules on its Linear/Conv1D modules
        if peft_config is None:
            raise ConfigError("get_eva_state_dict: peft_config is required when the model is not a peftc adapted model")
        config, base = load_config(peft_config), model
        placed = {name for name, m in model.named_modules()
                  if name and lora.layer_kind(m) in EVA_KINDS and is_target(config, name)}
    if not isinstance(config, LoraConfig) or config.eva_config is None:
        raise ConfigError("EVA needs a LoRA config with init_lora_weights='eva' (its eva_config: rho, tau, ...)")
    paths = [name for name, _ in base.named_modules() if name in placed]
    if not paths:
        raise ConfigError("EVA found no nn.Linear or transformers Conv1D module among the targets")
    return base, config, paths


@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable,
    peft_config: AdapterConfig | dict | str | None = None,
    forward_fn: Callable = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | dict[str, Callable] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """PEFT's `get_eva_state_dict`: module path -> EVA's A for that layer (rank x in_features; rank 0 rows
    for a layer that gets no rank). `model` is a peftc adapted model (its adapter's targets, run on its
    base weights) or a plain model with `peft_config`. Keys and `prepare_layer_inputs_fn`'s keys are the
    base model's module paths ("model.layers.0.self_attn.q_proj"). `forward_fn(model, batch)` is called with
    the base model (PEFT calls it with the PeftModel, adapters disabled: the same computation)."""
    base, config, paths = _eva_targets(model, peft_config, adapter_name)
    eva = config.eva_config
    if len(dataloader) == 0:
        raise ConfigError("get_eva_state_dict: the dataloader is empty")
    if dist.is_initialized() and gather_distributed_inputs:
        warnings.warn("torch.distributed is initialized and `gather_distributed_inputs` is True, therefore EVA "
                      "initialization will gather tensors from all ranks. Ensure the model does not receive the same "
                      "inputs on different ranks.", UserWarning, stacklevel=3)
    rho = eva["rho"]
    if rho > RHO_THRESHOLD:
        rho = min(rho, max(max(p.shape) for p in base.parameters()) // config.r)
    devices = {p.device for p in base.parameters() if p.device.type != "meta"}
    device = next(iter(devices)) if len(devices) == 1 else None
    layer_fns = dict(prepare_layer_inputs_fn) if isinstance(prepare_layer_inputs_fn, Mapping) else None
    if layer_fns is not None and set(layer_fns) - set(paths):
        raise ConfigError(f"prepare_layer_inputs_fn names module(s) EVA does not initialise: "
                          f"{sorted(set(layer_fns) - set(paths))}; EVA's modules: {paths}")
    training = base.training
    base.eval()

    def batch_inputs(batch: Any) -> tuple[Any, Any]:
        batch = _move(batch, device) if device is not None else batch
        return batch, (prepare_model_inputs_fn(batch, config) if prepare_model_inputs_fn is not None
                       else deepcopy(batch))

    handles, live = [], {}
    try:
        first, model_input = batch_inputs(next(iter(dataloader)))
        max_components, rank_budget, hash_hooks = {}, 0, {}
        for path in paths:
            fn = layer_fns.get(path) if layer_fns is not None else prepare_layer_inputs_fn
            hook = _HashHook(path, fn, gather_distributed_inputs)
            hook.model_input = model_input
            handles.append(base.get_submodule(path).register_forward_hook(hook))
            hash_hooks[path] = hook
            layer_rank, _ = lora_rank_alpha(config, path)
            max_components[path] = round(layer_rank * rho)
            rank_budget += layer_rank
        forward_fn(base, first)
        for handle in handles:
            handle.remove()
        handles = []
        groups = defaultdict(list)
        for path, hook in hash_hooks.items():
            groups[hook.hashed[0]].append(path)
        equal = [g for g in groups.values() if len(g) > 1]
        equal_map = {other: g[0] for g in equal for other in g[1:]}  # a layer -> the layer whose PCA it shares
        for g in equal:
            top = max(max_components[p] for p in g)
            for p in g:
                max_components[p] = top
        hooks = {}
        for path in paths:
            if path in equal_map:
                continue
            hooks[path] = _SVDHook(max_components[path], eva["tau"], path, hash_hooks[path].prepare_fn,
                                   gather_distributed_inputs)
            live[path] = base.get_submodule(path).register_forward_hook(hooks[path])
        layer_hook = {**{p: p for p in hooks}, **equal_map}
        rank_dist = max_components.copy()
        converged = dict.fromkeys(hooks, False)
        batches = tqdm(cycle(dataloader), leave=False) if show_progress_bar else cycle(dataloader)
        for batch in batches:
            batch, model_input = batch_inputs(batch)
            for path, hook in hooks.items():
                done = bool(torch.all(hook.converged[: rank_dist[path]]))
                if not converged[path] and done and live.get(path) is not None:
                    live.pop(path).remove()
                    converged[path] = True
                    continue
                if converged[path] and not done:
                    live[path] = base.get_submodule(path).register_forward_hook(hook)
                    converged[path] = False
                hook.model_input = model_input
            if show_progress_bar:
                batches.set_description(f"{sum(converged.values())}/{len(converged)} layers have converged")
            if all(converged.values()):
                break
            forward_fn(base, batch)
            if all(h.svd.fitted for h in hooks.values()):
                rank_dist = _rank_distribution(hooks, layer_hook, equal_map, rank_budget, max_components)
    finally:
        for handle in [*handles, *live.values()]:
            handle.remove()
        base.train(training)
    out = {}
    for path, rank in rank_dist.items():
        hook = hooks[layer_hook[path]]
        u = hook.svd.components_[:rank].clone()
        if eva["whiten"]:
            u /= hook.svd.singular_values_[:rank].sqrt().reshape(-1, 1)
        out[path] = u.to(device) if device is not None else u
    return out


def _rank_distribution(hooks: dict[str, _SVDHook], layer_hook: dict[str, str], equal_map: dict[str, str],
                       budget: int, max_components: dict[str, int]) -> dict[str, int]:
    """PEFT's redistribution: the budget's components with the largest explained variance ratios, across layers
    (at most r·rho each); a layer sharing another's PCA takes the larger of the two counts first."""
    ratios = {p: h.svd.explained_variance_ratio_[: max_components[p]] for p, h in hooks.items()}
    keys, values = zip(*[(p, c) for p, name in layer_hook.items() for c in ratios[name]])
    order = torch.stack(values).argsort(descending=True)
    counts = Counter([keys[i] for i in order[:budget]])
    counts = {p: counts.get(p, 0) for p in layer_hook}
    for path, shared in equal_map.items():
        if counts[shared] < counts[path]:
            counts[shared], counts[path] = counts[path], counts[shared]
    return counts


# -- applying it ------------------------------------------------------------------------------------------------

@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Iterable | None = None,
    eva_state_dict: dict[str, torch.Tensor] | None = None,
    forward_fn: Callable = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | dict[str, Callable] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> None:
    """PEFT's `initialize_lora_eva_weights` on a peftc adapted model whose adapter has init_lora_weights='eva':
    A from `eva_state_dict` (computed from `dataloader` when not given), ranks and alphas redistributed, and
    the adapter's config updated (rank_pattern, alpha_pattern, target_modules) as PEFT updates it."""
    if getattr(model, "adapter_set", None) is None:
        raise ConfigError("initialize_lora_eva_weights needs a peftc adapted model (peftc.apply(model, config))")
    if len(model.active_adapters) > 1:
        raise ConfigError("initialize_lora_eva_weights works with a single active adapter, as in PEFT; active: "
                          f"{model.active_adapters}")
    config = model.peft_config.get(adapter_name)
    if config is None or getattr(config, "init_lora_weights", None) != "eva":
        raise ConfigError(f"initialize_lora_eva_weights needs adapter {adapter_name!r} created with "
                          "init_lora_weights='eva'")
    if eva_state_dict is None:
        if dataloader is None:
            raise ConfigError("initialize_lora_eva_weights: give a dataloader or an eva_state_dict")
        eva_state_dict = get_eva_state_dict(model, dataloader, None, forward_fn, prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn, adapter_name, gather_distributed_inputs,
                                            show_progress_bar)
    load_eva_state_dict(model, eva_state_dict, adapter_name)


def load_eva_state_dict(am: nn.Module, eva_state_dict: dict[str, torch.Tensor], adapter_name: str) -> None:
    """PEFT's `_load_eva_state_dict`: per adapted module, in model order, A from the state dict at its rank
    (a new rank re-creates the module's tensors, drawing as PEFT's `update_layer` draws; rank 0 drops the
    adapter); a module without an entry (an embedding) is re-created with the default init, as in PEFT."""
    lora = METHODS["LORA"]
    config: LoraConfig = am.peft_config[adapter_name]
    source = am.parameter_tree.source
    placed = {ma.module_path: ma for ma in am.adapter_set.of(adapter_name) if ma.method is lora}
    unknown = sorted(p for p in eva_state_dict if p not in placed or placed[p].kind not in EVA_KINDS)
    if unknown:
        raise ConfigError(f"eva_state_dict names module(s) that are not nn.Linear / Conv1D layers adapter "
                          f"{adapter_name!r} adapts: {unknown}")
    plain = dataclasses.replace(config, rank_pattern={}, alpha_pattern={})
    rank_pattern, alpha_pattern, kept, missing, others = {}, {}, [], [], []
    values: dict[str, dict[TensorKey, torch.Tensor]] = {}
    for path, module in source.named_modules():
        if path not in placed:
            if path:
                others.append(path)
            continue
        kind = placed[path].kind
        r, alpha = lora_rank_alpha(config, path)
        if path in eva_state_dict:
            w = eva_state_dict[path]
            fan_in = module.weight.shape[0 if kind == "conv1d" else 1]
            if w.dim() != 2 or w.shape[1] != fan_in:
                raise ConfigError(f"eva_state_dict[{path!r}] has shape {tuple(w.shape)}: module {path!r} needs "
                                  f"(rank, {fan_in})")
            new_rank = w.shape[0]
            if new_rank == 0:  # PEFT puts the base layer back
                others.append(path)
                continue
            if new_rank != r and config.eva_config["adjust_scaling_factors"]:
                alpha *= new_rank / r
            values[path] = {} if new_rank == r else dict(lora.create(
                dataclasses.replace(plain, r=new_rank, lora_alpha=alpha), path, module, kind).params)
            values[path][A] = w
            kept.append(path)
        else:
            values[path] = dict(lora.create(dataclasses.replace(plain, r=r, lora_alpha=alpha, init_lora_weights=True),
                                            path, module, kind).params)
            missing.append(path)
            new_rank = r
        if new_rank != config.r:
            rank_pattern[path] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[path] = alpha
    targets = kept + missing
    if not targets:
        raise ConfigError(f"eva_state_dict gives every module of adapter {adapter_name!r} rank 0")
    if len(targets) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        targets = sorted(minimal_target_modules(targets, others))
    if config.use_rslora and (rank_pattern or alpha_pattern):
        raise ConfigError(f"EVA redistributed the ranks of adapter {adapter_name!r}, which needs rank_pattern / "
                          "alpha_pattern, and peftc does not combine them with use_rslora; use rho=1.0 (no "
                          "redistribution) or use_rslora=False")
    _replace_adapter(am, adapter_name, dataclasses.replace(config, target_modules=targets, rank_pattern=rank_pattern,
                                                           alpha_pattern=alpha_pattern), values)
    if missing:
        warnings.warn(f"the following layers were initialized with init_lora_weights=True because they were not "
                      f"found in the eva state_dict: {missing}\ncurrently EVA covers nn.Linear and transformers "
                      "Conv1D layers only", UserWarning, stacklevel=3)


def _replace_adapter(am: nn.Module, adapter_name: str, config: LoraConfig,
                     values: dict[str, dict[TensorKey, torch.Tensor]]) -> None:
    """Place the adapter again under its new config, keeping its place in the adapter order and which adapters
    are active, then write `values` (module path -> tensors by key) over the new tensors. The new tensors' draws
    run on a forked RNG: the draws PEFT makes were made in `load_eva_state_dict`, in PEFT's order."""
    order, active = am.adapter_order, am.active_adapters
    kept: dict[str, dict[TensorKey, torch.Tensor]] = {}
    for ma in am.adapter_set.of(adapter_name):  # (a module may hold several of its parts: keys differ)
        kept.setdefault(ma.module_path, {}).update({key: t.detach().clone() for key, (_, t) in ma.tensors.items()})
    with torch.random.fork_rng(devices=[]):
        am.delete_adapter(adapter_name)
        am.add_adapter(adapter_name, config)
    am.adapter_set.configs = {name: am.adapter_set.configs[name] for name in order}
    am.set_adapter(active)
    for ma in am.adapter_set.of(adapter_name):
        fresh = values.get(ma.module_path, {})
        for key, (_, tensor) in ma.tensors.items():
            value = fresh.get(key, kept.get(ma.module_path, {}).get(key))
            if value is not None and value.shape == tensor.shape:
                tensor.copy_(value)


def minimal_target_modules(targets: list[str], others: list[str]) -> set[str]:
    """PEFT's `_find_minimal_target_modules`: the shortest name suffixes that select `targets` and none of
    `others` (so a saved config lists q_proj, v_proj rather than every layer's)."""
    def suffixes(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))][::-1]

    other_suffixes = {s for name in others for s in suffixes(name)}
    required: set[str] = set()
    for name, options in sorted({t: suffixes(t) for t in set(targets)}.items(), key=lambda item: item[1]):
        for suffix in options:
            if suffix in required or suffix in other_suffixes:
                continue
            if not any(name.endswith("." + req) for req in required):
                required.add(suffix)
                break
    return required or set(targets)
