"""(IA)^3: learned vectors rescale a layer's activations.

A feed-forward module (`feedforward_modules`) scales its input, `y = base(x * l)`, with `l` of
shape (1, in); every other target scales its output, `y = base(x) * l`, with `l` of shape
(out, 1) ((1, C, 1, ...) for convolutions). Names, shapes, initialisation (ones) and dtype rules
follow PEFT's `ia3.Linear` / `ia3.Conv2d` / `ia3.Conv3d`; transformers' Conv1D is a Linear stored
transposed (PEFT's `fan_in_fan_out`, which peftc takes from the layer type instead of the config).
Whether a module is feed-forward is part of its kind ("linear" / "linear_ff"), so `emit` and
`fold` see it without the module name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx
import torch.nn as nn

from peftc.config import AdapterConfig, check_targets, target_names
from peftc.errors import ConfigError, TargetError
from peftc.graph import SiteBuilder, cast, dtype_of
from peftc.method import AdapterTensors, EmitContext, Method, TensorKey, adapter_dtype, in_out_features, register_method
from peftc.sites import WEIGHT_OPS

aten = torch.ops.aten

L: TensorKey = ("ia3_l", None)
FF = "_ff"  # kind suffix of a feed-forward module

# layer -> (the module type, the aten ops a site of it may be)
_LAYERS = {
    "linear": ("nn.Linear", ("linear",)),
    "conv1d": ("transformers Conv1D", ("addmm",)),
    "conv2d": ("nn.Conv2d", ("conv2d", "convolution")),
    "conv3d": ("nn.Conv3d", ("conv3d", "convolution")),
}


@dataclass
class IA3Config(AdapterConfig):
    """PEFT's `IA3Config`, same fields and defaults."""

    peft_type_name: ClassVar[str] = "IA3"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_targets(self)
        self.feedforward_modules = target_names(self.feedforward_modules)
        if self.feedforward_modules is None:
            raise ConfigError(
                "feedforward_modules is required (PEFT's per-architecture defaults are not used); "
                "use [] for none"
            )
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:  # PEFT rejects this too
                raise ConfigError(f"feedforward_modules {extra} are not in target_modules {self.target_modules}")


def is_feedforward(config: IA3Config, module_name: str) -> bool:
    """PEFT's rule: a regex must fullmatch the name; a list entry need only end it (no '.' boundary)."""
    ff = config.feedforward_modules
    if isinstance(ff, str):
        return re.fullmatch(ff, module_name) is not None
    return any(module_name.endswith(name) for name in ff)


@register_method
class IA3(Method):
    peft_type = "IA3"
    example_config = {"peft_type": "IA3", "target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin1"]}
    config_cls = IA3Config
    groups = ("ia3_l",)
    layer_types = {
        **{layer: name for layer, (name, _) in _LAYERS.items()},
        **{layer + FF: f"{name} (feed-forward)" for layer, (name, _) in _LAYERS.items()},
    }
    site_ops = {kind: _LAYERS[kind.removesuffix(FF)][1] for kind in layer_types}

    def module_kind(self, config: IA3Config, module_name: str, module: nn.Module) -> str | None:
        kind = self.layer_kind(module)
        return kind + FF if kind is not None and is_feedforward(config, module_name) else kind

    def create(self, config: IA3Config, module_name: str, module: nn.Module, kind: str) -> AdapterTensors:
        layer, ff = _split(kind)
        w = module.weight
        fan_in, fan_out = in_out_features(module, layer)
        if layer in ("linear", "conv1d"):
            shape = (1, fan_in) if ff else (fan_out, 1)
        else:
            shape = (1, fan_in if ff else fan_out, *[1] * (w.dim() - 2))
        vector = torch.randn(shape)  # drawn even when reset to ones, as PEFT does (same RNG stream)
        if config.init_ia3_weights:
            nn.init.ones_(vector)
        return AdapterTensors(params={L: vector.to(device=w.device, dtype=adapter_dtype(w))})

    def emit(self, ctx: EmitContext) -> torch.fx.Node:
        b, site, y, kind, tensors = ctx.builder, ctx.site, ctx.y, ctx.kind, ctx.tensors
        layer, ff = _split(kind)
        vector, dtype = tensors[L], dtype_of(tensors[L])
        if layer in ("linear", "conv1d"):  # (out, 1) / (1, in) -> a vector over the last dim
            vector = b.call(aten.reshape.default, vector, [-1])
        if not ff:
            return promoted(b, aten.mul.Tensor, y, vector, dtype)
        # the base op again, on the scaled input; the op it replaces is left without users. After another
        # feed-forward IA3 adapter at this site, `y` is that adapter's op, whose input is scaled once more.
        x_index, w_index = WEIGHT_OPS[site.node.target]
        if y.target != site.node.target or y.args[w_index] is not site.weight:
            raise TargetError(
                f"module {site.module_path!r}: a feed-forward IA3 adapter scales the layer's input, so only other "
                "feed-forward IA3 adapters may come before it at the same module"
            )
        return b.rerun(y, {x_index: promoted(b, aten.mul.Tensor, y.args[x_index], vector, dtype)})

    def fold(
        self,
        kind: str,
        config: IA3Config,
        module: nn.Module,
        tensors: dict[TensorKey, torch.Tensor],
        base: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        layer, ff = _split(kind)
        vector, w = tensors[L], base["weight"]
        if layer == "conv1d":  # weight (in, out): (1, in) / (out, 1) transposed
            scale = vector.T
        elif layer == "linear":  # weight (out, in)
            scale = vector
        elif ff:  # conv weight (out, in / groups, *k): each output channel sees its group's inputs
            groups = module.groups
            out_per, in_per = w.shape[0] // groups, w.shape[1]
            scale = vector.reshape(groups, 1, in_per).expand(groups, out_per, in_per)
            scale = scale.reshape(w.shape[0], in_per, *[1] * (w.dim() - 2))
        else:
            scale = vector.reshape(-1, *[1] * (w.dim() - 1))
        merged = {"weight": w * scale}
        if not ff and base.get("bias") is not None:  # an output scale scales the bias too
            merged["bias"] = base["bias"] * vector.flatten()
        return merged


def _split(kind: str) -> tuple[str, bool]:
    """("linear", True) from "linear_ff"."""
    return kind.removesuffix(FF), kind.endswith(FF)


def promoted(
    b: SiteBuilder, op: object, x: torch.fx.Node, other: torch.fx.Node, other_dtype: torch.dtype | None
) -> torch.fx.Node:
    """op(x, other) in the promoted dtype (an fp32 adapter over a bf16 base) and cast back to x's dtype,
    as PEFT does."""
    src = dtype_of(x)
    out = b.call(op, x, other)
    return cast(b, out, torch.promote_types(src, other_dtype) if src and other_dtype else None, src)
