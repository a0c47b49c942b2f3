"""Optimizers for adapted models: LoRA+ (a higher learning rate for B than for A).

LoRA+ (https://huggingface.co/papers/2402.12354) trains B at `lr * loraplus_lr_ratio`. The
parameter groups are PEFT's (`peft.optimizers.create_loraplus_optimizer`), so a run is the same
under either library: A matrices at `lr`; B matrices and 1-d adapter tensors (DoRA magnitudes,
LoRA biases) at `lr * ratio`, biases without weight decay; the A and B of a LoRA on an
embedding at `loraplus_lr_embedding` (default 1e-6).
"""

from __future__ import annotations

from typing import Any

import torch

from .model import AdaptedModel


def create_loraplus_optimizer(
    model: AdaptedModel, optimizer_cls: type[torch.optim.Optimizer], *, lr: float, loraplus_lr_ratio: float,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An `optimizer_cls` over the trainable parameters of `model`, in LoRA+'s four groups (PEFT's
    name and arguments; `loraplus_weight_decay` and `loraplus_lr_embedding` are read from `kwargs`,
    the rest go to the optimizer)."""
    # PEFT puts every tensor held directly by a LoRA Embedding layer (lora_embedding_A/B) in this group
    embedding = {
        id(t)
        for mas in model.targeted_modules.values() for ma in mas
        if ma.method.peft_type == "LORA" and ma.kind == "embedding"
        for (_, leaf), (_, t) in ma.tensors.items() if leaf is None
    }
    groups: dict[str, list[torch.nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in embedding:
            groups["embedding"].append(p)
        elif "lora_B" in name or p.ndim == 1:
            groups["B_no_decay" if "bias" in name else "B"].append(p)
        else:
            groups["A"].append(p)
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    return optimizer_cls([
        {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ], lr=lr, **kwargs)
