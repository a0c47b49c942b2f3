"""CorDA (`init_lora_weights="corda"`): LoRA factors from the SVD of W·C, C the covariance of the layer's inputs.

`peftc.preprocess_corda(model, config, run_model=...)` is PEFT's `preprocess_corda`: forward hooks on the targeted
nn.Linear / Conv1D modules collect each call's input covariance while `run_model()` runs the user's data through
the model; then per layer W·C (C damped until it inverts) is decomposed, U·S·Vᵀ, and V becomes (Vᵀ C⁻¹)ᵀ. IPM keeps
the r largest components, KPM the r smallest. `peftc.apply` then sets A = √(S/s)·Vᵀ, B = U·√(S/s) and the base
weight becomes the residual W − s·B·A, as PiSSA does (`AdapterTensors.base`; the user's weight is not written).
Formulas, order of operations and dtypes are PEFT's (peft/tuners/lora/corda.py and `LoraLayer.corda_init`), and
`cache_file` / `covariance_file` hold what PEFT's hold, so either library reads the other's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from peftc.config import LoraConfig
from peftc.errors import ConfigError
from peftc.targets import pattern_value

from .lora_data import cached, data_config, data_targets, hold, load_cache, save_cache, take

EIGENS = ("S_WC", "U_WC", "V_WC")


def out_first(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The weight in fp32 as (out, in): transformers' Conv1D stores (in, out)."""
    w = weight.detach().float()
    return w.T if kind == "conv1d" else w


@torch.no_grad()
def preprocess_corda(
    model: nn.Module,
    lora_config: Any,
    run_model: Callable[[], None] | None = None,
    hooked_model: nn.Module | None = None,
) -> None:
    """PEFT's `preprocess_corda`: call before `peftc.apply(model, lora_config)`.

    `run_model()` runs the model on the data that orients the decomposition (with batches of one sample, or 2-D
    inputs, as in PEFT); `hooked_model` is a model with the same module names to collect inputs from instead.
    With `corda_config["cache_file"]` (or `covariance_file`) present, nothing is run. The model's weights,
    modules and training mode are left as they were.
    """
    config = data_config(lora_config, model, "corda_config", "corda")
    corda = config.corda_config
    targets = data_targets(model, config)
    cache = load_cache(corda["cache_file"], "CorDA cache file")
    if cache is not None:
        eigens = {name: {e: cached(cache, f"{name}.eigens.{e}", corda["cache_file"], module.weight) for e in EIGENS}
                  for name, module in targets}
    else:
        if corda["corda_method"] is None:
            raise ConfigError("corda_config['corda_method'] is required when cache_file is not provided")
        ranks = {name: pattern_value(config.rank_pattern, name, config.r) for name, _ in targets}
        for name, module in targets:
            kind = "conv1d" if type(module).__name__ == "Conv1D" else "linear"
            smallest = min(out_first(module.weight, kind).shape)
            if ranks[name] > smallest:
                raise ConfigError(f"r={ranks[name]} for module {name!r}: CorDA takes r components of the weight, "
                                  f"which has only {smallest}")
        covariances = input_covariances(model, config, targets, run_model, hooked_model)
        progress = _progress(targets, corda["verbose"])
        eigens = {name: crop(decompose(module, covariances[name]), corda["corda_method"], ranks[name])
                  for name, module in progress}
        if corda["cache_file"] is not None:
            save_cache(corda["cache_file"], {f"{name}.eigens.{e}": t for name, es in eigens.items()
                                             for e, t in es.items()})
    for name, module in targets:
        hold(module.weight, "corda", eigens[name])


def _progress(targets: list[tuple[str, nn.Module]], verbose: bool) -> Any:
    if not verbose:
        return targets
    from tqdm import tqdm

    return tqdm(targets, desc="Collecting eigens", file=sys.stderr)


def input_covariances(model: nn.Module, config: LoraConfig, targets: list[tuple[str, nn.Module]],
                      run_model: Callable[[], None] | None, hooked_model: nn.Module | None) -> dict[str, torch.Tensor]:
    """PEFT's `calib_cov_distribution`: the mean over calls of XᵀX / max(X) per target, X one call's input."""
    path = config.corda_config["covariance_file"]
    saved = load_cache(path, "CorDA covariance file")
    if saved is not None:
        return {name: cached(saved, name, path, module.weight) for name, module in targets}
    if run_model is None:
        raise ConfigError("preprocess_corda: run_model must be given when corda_config's cache_file and "
                          "covariance_file do not exist yet")
    hooked = model if hooked_model is None else hooked_model
    half = config.corda_config["use_float16_for_covariance"]
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def collect(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            x = inputs[0].detach().squeeze(0)
            if x.dim() != 2:
                raise ConfigError(f"preprocess_corda: module {name!r} got an input of shape {tuple(inputs[0].shape)};"
                                  " CorDA takes each call's input as one (tokens, features) sample, as PEFT does: "
                                  "run the model on one sample at a time")
            if not half:  # use_float16_for_covariance keeps the input's own dtype, as in PEFT
                x = x.float()
            x = x / torch.max(x).abs()
            if torch.isnan(x).any() or torch.isinf(x).any():
                raise ConfigError(f"preprocess_corda: invalid values (NaN/inf) in the input of module {name!r}")
            covariance = x.t().matmul(x)
            if torch.isnan(covariance).any() or torch.isinf(covariance).any():
                raise ConfigError(f"preprocess_corda: invalid values (NaN/inf) in the covariance of module {name!r}")
            counts[name] = counts.get(name, 0) + 1
            sums[name] = sums.get(name, 0) + covariance
        return collect

    training = hooked.training
    handles = [module.register_forward_hook(hook(name)) for name, module in data_targets(hooked, config)]
    hooked.eval()
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
        hooked.train(training)
    missing = [name for name, _ in targets if not counts.get(name)]
    if missing:
        raise ConfigError(f"preprocess_corda: module(s) {missing} never ran during run_model(): no covariance")
    covariances = {name: sums[name] / counts[name] for name, _ in targets}
    if path is not None:
        save_cache(path, covariances)
    return covariances


def decompose(module: nn.Module, covariance: torch.Tensor) -> dict[str, torch.Tensor]:
    """PEFT's `collect_eigens_for_layer`: SVD of W·C (C damped until its inverse is good to 0.05), V = (Vᵀ C⁻¹)ᵀ."""
    w = out_first(module.weight, "conv1d" if type(module).__name__ == "Conv1D" else "linear")
    covariance = covariance.float()
    damp = 0.01
    while True:
        compensate = torch.diag(torch.ones(covariance.size(0)).to(covariance.device)
                                * torch.mean(torch.diag(covariance)) * damp)
        fixed = covariance + compensate
        inverse = torch.linalg.inv(fixed)
        error = torch.dist(fixed @ inverse, torch.eye(covariance.size(0)).to(covariance.device)).item()
        if error < 0.05:
            break
        damp = damp * 2
    u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    return {"S_WC": s, "U_WC": u, "V_WC": (vh @ inverse).transpose(0, 1)}


def crop(eigens: dict[str, torch.Tensor], method: str, r: int) -> dict[str, torch.Tensor]:
    """PEFT's `crop_corda_eigens`: IPM keeps the r largest components, KPM the r smallest."""
    s, u, v = eigens["S_WC"], eigens["U_WC"], eigens["V_WC"]
    if method == "ipm":
        return {"S_WC": s[:r].clone(), "U_WC": u[:, :r].clone(), "V_WC": v[:, :r].clone()}
    return {"S_WC": s[-r:].clone(), "U_WC": u[:, -r:].clone(), "V_WC": v[:, -r:].clone()}


def corda_init(module_name: str, kind: str, weight: torch.Tensor, r: int, scale: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's `corda_init` (A, B, residual base weight in the weight's layout and dtype), from what
    `preprocess_corda` held for this weight."""
    if kind not in ("linear", "conv1d"):
        raise ConfigError(f"init_lora_weights='corda' is not available for module {module_name!r}: PEFT implements "
                          "it for nn.Linear and transformers Conv1D")
    eigens = take(weight, "corda")
    if eigens is None:
        raise ConfigError(f"init_lora_weights='corda': no CorDA statistics for module {module_name!r}: call "
                          "peftc.preprocess_corda(model, config, run_model=...) on this model first (as PEFT's "
                          "preprocess_corda before get_peft_model; also to load a saved CorDA adapter), and do not "
                          "move or convert the model in between: the statistics are found by the weight's storage")
    s, u, v = eigens["S_WC"], eigens["U_WC"], eigens["V_WC"]
    w = out_first(weight, kind)
    for name, t in (("S", s), ("U", u), ("V", v)):
        if torch.isnan(t).any() or torch.isinf(t).any():
            raise ConfigError(f"init_lora_weights='corda': invalid values in matrix {name} of module {module_name!r}")
    out_dim, in_dim = w.shape
    if tuple(u.shape) != (out_dim, r) or tuple(s.shape) != (r,) or tuple(v.shape) != (in_dim, r):
        raise ConfigError(f"init_lora_weights='corda': the statistics of module {module_name!r} (U {tuple(u.shape)}, "
                          f"S {tuple(s.shape)}, V {tuple(v.shape)}) do not fit r={r} and its weight ({out_dim}, "
                          f"{in_dim}): preprocess with the same config and model (a cache_file built for another "
                          "r or model?)")
    s = s / scale
    a = v.t().mul(s.sqrt().view(-1, 1)).contiguous()
    b = u.mul(s.sqrt()).contiguous()
    delta = scale * b @ a
    residual = weight.detach().float() - (delta.T if kind == "conv1d" else delta)
    # PEFT then moves A and B to the base layer's dtype (and autocasts a bf16/fp16 adapter back to fp32):
    # the factors are rounded to the base dtype, the residual is not computed from the rounded ones
    return a.to(weight.dtype), b.to(weight.dtype), residual.to(weight.dtype)
