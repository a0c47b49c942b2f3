"""LoRA on `torch.nn.MultiheadAttention`, as PEFT 0.21.2's `lora.MultiheadAttention` does it.

An nn.MultiheadAttention never calls a Linear's forward: `F.multi_head_attention_forward` reads the packed
`in_proj_weight` (q, k and v stacked, (3E, E)) and `out_proj.weight` itself (in `aten.linear` on the slow
path, `aten._native_multi_head_attention` on the fast one). So PEFT merges W + s·B·A into both weights before
each call and unmerges after, and peftc places the same sums as two `target_parameters`-style rewrites
(passes/lora_params.py): each weight is rebound, inside the attention module, to W + s·ΔW, whichever op
consumes it. Targeting the attention module by name adapts both, with PEFT's names: in_proj's factors at
`<mha>.lora_A/B`, out_proj's at `<mha>.base_layer.out_proj.lora_A/B` (PEFT's wrapper holds out_proj, itself
wrapped), the base tensors at `<mha>.base_layer.in_proj_weight` and `<mha>.base_layer.out_proj.base_layer.weight`.
Both get the attention module's rank and alpha (`rank_pattern` / `alpha_pattern` keys match its name).

What PEFT's merge-based forward implies, kept here: `lora_dropout` does not apply (the weights are merged,
no input is dropped). What it gets wrong, not kept: PEFT 0.21.2 adds out_proj's update twice in value (its
`merge` adds it by hand and again through the wrapped out_proj's own `merge`; huggingface/peft#3774) while
its gradient is that of one update (the second is a `.data` write autograd never sees), so its forward is
W + 2·ΔW and its gradient is not that forward's. peftc computes the LoRA formula, W + ΔW, with autograd's
gradient: tests compare with PEFT carrying the upstream fix, and pin the difference from PEFT as released.
Refused, naming the module: separate q/k/v weights (`kdim`/`vdim` other than `embed_dim`; PEFT refuses them),
and the options PEFT's layer refuses or mis-handles there (see `REFUSED`). Mixed batches are refused for
every rebound weight (peftc/pipeline.py), as PEFT refuses them for MultiheadAttention.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from peftc.config import LoraConfig
from peftc.errors import ConfigError, TargetError
from peftc.method import Target
from peftc.names import BASE_LAYER
from peftc.targets import select_targets

MHA = "mha"  # LoRA's layer kind for a targeted nn.MultiheadAttention (placed by passes/lora_params.py)
MHA_IN, MHA_OUT = "mha_in_proj", "mha_out_proj"  # the kinds of its two rebound weights
PARAMS = {MHA_IN: "in_proj_weight", MHA_OUT: "out_proj.weight"}

# config options refused on an nn.MultiheadAttention, with the reason
REFUSED = {
    "use_dora": "PEFT's MultiheadAttention does not support DoRA",
    "velora_config": "PEFT's MultiheadAttention does not support VeLoRA",
    "kasa_config": "PEFT's MultiheadAttention does not support KaSA",
    "use_bdlora": "PEFT's MultiheadAttention has no BD-LoRA variant",
    "monteclora_config": "PEFT's MultiheadAttention has no MonteCLoRA variant",
    "lora_bias": "PEFT's MultiheadAttention ignores in_proj's lora_B bias and adds out_proj's by an in-place "
                 "write autograd never sees (it would not train)",
}
# init_lora_weights values PEFT cannot apply there: they read the layer's `.weight`, which the module lacks
REFUSED_INITS = ("pissa", "olora", "orthogonal", "mica")


def is_mha(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention)


def mha_targets(config: LoraConfig, model: nn.Module, excluded: Any) -> list[Target]:
    """The two rebound weights of every nn.MultiheadAttention `config.target_modules` selects (not inside a
    module `excluded(path)` says is trained as copies), in model order: in_proj, then out_proj."""
    if not config.target_modules:
        return []
    out = []
    for path in select_targets(config, model):
        module = model.get_submodule(path)
        if not is_mha(module) or excluded(path):
            continue
        check_mha(config, path, module)
        out.append(Target(path, path, module, MHA_IN, extra={"owner": path, "param": PARAMS[MHA_IN]}))
        # PEFT wraps out_proj in a LoRA Linear: `bias="lora_only"` trains its bias (never in_proj_bias)
        out.append(Target(f"{path}.{BASE_LAYER}.out_proj", path, module, MHA_OUT, bias_module=f"{path}.out_proj",
                          extra={"owner": path, "param": PARAMS[MHA_OUT]}))
    return out


def check_mha(config: LoraConfig, path: str, module: nn.MultiheadAttention) -> None:
    """An error naming the module for what PEFT's layer cannot adapt there, or adapts wrongly."""
    if not module._qkv_same_embed_dim:
        raise TargetError(
            f"module {path!r} (nn.MultiheadAttention) has separate q/k/v weights (kdim={module.kdim}, "
            f"vdim={module.vdim}, embed_dim={module.embed_dim}); LoRA adapts only the packed in_proj_weight "
            "(PEFT refuses this layout too)"
        )
    for name, reason in REFUSED.items():
        if getattr(config, name):
            raise ConfigError(f"{name}={getattr(config, name)!r} for module {path!r} (nn.MultiheadAttention): "
                              f"{reason}")
    if config.init_method in REFUSED_INITS:
        raise ConfigError(f"init_lora_weights={config.init_lora_weights!r} for module {path!r} "
                          "(nn.MultiheadAttention): it decomposes a layer's `weight`, which the module does not "
                          "have (PEFT fails there too); use True, False or 'gaussian'")


def refuse_out_proj(model: nn.Module, paths: list[str]) -> None:
    """An nn.MultiheadAttention's `out_proj` targeted as a Linear of its own (by name, or by "all-linear"), by
    any method: the attention module never calls it, so PEFT's adapter there is inert in forward but merged by
    `merge_and_unload` (LoRA's). peftc refuses it rather than pick one of the two."""
    parents = {name: m for name, m in model.named_modules() if is_mha(m)}
    for path in paths:
        parent, _, leaf = path.rpartition(".")
        if leaf == "out_proj" and parent in parents:
            raise TargetError(
                f"module {path!r} is the out_proj of nn.MultiheadAttention {parent!r}, which reads its weight "
                f"directly and never calls it: an adapter there would do nothing (PEFT's forward ignores it, "
                f"its merge does not). Target {parent!r} (LoRA on in_proj and out_proj), or leave {path!r} "
                "out (exclude_modules)"
            )
