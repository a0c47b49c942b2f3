"""LoRA-GA (`init_lora_weights="lora_ga"`): LoRA factors from the SVD of the weight's gradient on the user's data.

`peftc.preprocess_loraga(model, config, train_step)` is PEFT's `preprocess_loraga`: with only the targeted
nn.Linear / Conv1D weights requiring grad, it runs the user's `train_step()` (forward and backward passes) on the
model in train mode and keeps each weight's accumulated gradient divided by the number of backward passes through
its module. `peftc.apply` then takes 2r singular components of the gradient (`torch.svd_lowrank`, so the same
seed gives PEFT's), splits them between A and B by `lora_ga_config["direction"]`, scales them by
`lora_ga_config["scale"]`, and the base weight becomes the residual W − s·B·A (`AdapterTensors.base`; the
user's weight is not written). Formulas, random draws, their order and dtypes are PEFT's (peft/tuners/lora/
loraga.py and `LoraLayer.lora_ga_init`); the `cache_file` holds what PEFT's holds.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from peftc.errors import ConfigError

from .lora_data import cached, data_config, data_targets, hold, load_cache, save_cache, take

GRAD = "_peft_loraga_grad"  # PEFT's attribute name, the key suffix of its cache file


def preprocess_loraga(
    model: nn.Module,
    lora_config: Any,
    train_step: Callable[[], None],
    cache_file: str | None = None,
) -> None:
    """PEFT's `preprocess_loraga`: call before `peftc.apply(model, lora_config)`.

    `train_step()` runs forward and backward passes on the model (no optimizer step); the gradients it leaves on
    the targeted weights are averaged over the backward passes through each. With `cache_file` present, the
    gradients are read from it instead (and written to it after estimating them). The model's weights, their
    `requires_grad` and `.grad`, and its training mode are left as they were.
    """
    config = data_config(lora_config, model, "lora_ga_config", "lora_ga")
    targets = data_targets(model, config)
    if not targets:
        raise ConfigError("preprocess_loraga: no nn.Linear or Conv1D module among the target modules; LoRA-GA "
                          "initialises only these")
    cache = load_cache(cache_file, "LoRA-GA cache file")
    if cache is not None:
        grads = {name: cached(cache, f"{name}.{GRAD}", cache_file, module.weight) for name, module in targets}
    else:
        grads = estimate_gradients(model, targets, train_step)
        if cache_file is not None:
            save_cache(cache_file, {f"{name}.{GRAD}": g for name, g in grads.items()})
    for name, module in targets:
        hold(module.weight, "lora_ga", grads[name])


def estimate_gradients(model: nn.Module, targets: list[tuple[str, nn.Module]],
                       train_step: Callable[[], None]) -> dict[str, torch.Tensor]:
    """PEFT's `estimate_gradients`, leaving the model as it found it (PEFT clears the weights' `.grad`)."""
    training = model.training
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    earlier = {name: module.weight.grad for name, module in targets}
    counts = dict.fromkeys((name for name, _ in targets), 0)

    def counter(name: str) -> Callable[..., None]:
        def count(module: nn.Module, grad_input: Any, grad_output: Any) -> None:
            counts[name] += 1
        return count

    handles = []
    try:
        model.train()
        for p in requires_grad:
            p.requires_grad_(False)
        for name, module in targets:
            module.weight.grad = None
            module.weight.requires_grad_(True)
            handles.append(module.register_full_backward_hook(counter(name)))
        with torch.enable_grad():
            train_step()
        grads = {name: module.weight.grad.detach() / counts[name] for name, module in targets
                 if counts[name] > 0 and module.weight.grad is not None}
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        for name, module in targets:
            module.weight.grad = earlier[name]
        model.train(training)
    missing = [name for name, _ in targets if name not in grads]
    if missing:
        raise ConfigError(f"preprocess_loraga: module(s) {missing} got no gradient in train_step(): run a forward "
                          "and a backward pass through them")
    return grads


def loraga_init(config: Any, module_name: str, kind: str, weight: torch.Tensor, r: int, scale: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """PEFT's `lora_ga_init` (A, B, residual base weight in the weight's layout and dtype), from the gradient
    `preprocess_loraga` held for this weight; None where there is none, and the default init applies, as in PEFT
    (which loads a saved LoRA-GA adapter that way: onto the residual base model the adapter was trained on)."""
    grad = take(weight, "lora_ga")
    if grad is None:
        warnings.warn(f"init_lora_weights='lora_ga': no gradient for module {module_name!r} (call "
                      "peftc.preprocess_loraga(model, config, train_step) first, and do not move or convert the "
                      "model in between): it gets the default LoRA init and "
                      "its base weight is used as given, as in PEFT; right only for loading a LoRA-GA adapter onto "
                      "the residual base model it was trained on", UserWarning, stacklevel=2)
        return None
    ga = config.lora_ga_config
    if ga is None:
        raise ConfigError("init_lora_weights='lora_ga' needs lora_ga_config (PEFT's LoraGAConfig, or a dict)")
    dtype = weight.dtype
    grad = grad.to(torch.float32)
    if kind == "conv1d":
        grad = grad.T
    u, s, v = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=4)
    vh = v.t()
    u, s, vh = u[:, : 2 * r], s[: 2 * r], vh[: 2 * r, :]
    direction = ga["direction"]
    if direction == "ArBr":  # A the odd components, B the even ones
        a, b, s_b = vh[1 : 2 * r : 2, :], u[:, 0 : 2 * r : 2], s[0 : 2 * r : 2]
    elif direction == "A2rBr":
        a, b, s_b = vh[r : 2 * r, :], u[:, :r], s[:r]
    elif direction == "ArB2r":
        a, b, s_b = vh[:r, :], u[:, r : 2 * r], s[r : 2 * r]
    else:  # "random"
        indices = torch.randperm(2 * r)[:r]
        a, b, s_b = vh[indices, :], u[:, indices], s[indices]
    b = b @ torch.diag(s_b)
    if ga["scale"] == "stable":
        # PEFT reads out_features as weight.shape[0]: a Conv1D's in_features, kept so that inits are PEFT's
        b = b * ((weight.shape[0] ** 0.25) / (ga["stable_gamma"] ** 0.5))
    elif ga["scale"] == "weight_svd":
        w = weight.detach().float()
        _, weight_s, _ = torch.svd_lowrank(w.T if kind == "conv1d" else w, q=r, niter=4)
        if s_b[0] > 0:
            b = b * (weight_s[0] / s_b[0])
    elif ga["scale"] == "gd_scale":
        a, b = a / scale, b / scale
    a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
    delta = scale * (b.float() @ a.float())
    w = weight.detach().float()
    residual = (w.T - delta).T if kind == "conv1d" else w - delta
    return a, b, residual.to(dtype)
