"""LoHa: y = base(x) + op(x, ΔW), ΔW = ((W1a W1b) ⊙ (W2a W2b)) * alpha / r, op the site's linear/conv.

Also the LyCORIS family's shared part (PEFT's `LycorisConfig` / `LycorisLayer`), which LoKr
reuses: the config fields, the supported layers (nn.Linear, nn.Conv1d, nn.Conv2d), the
forward (the delta weight is built in the graph from the adapter's parameters and applied
with the site's own op and geometry, plus PEFT's rank and module dropout in training) and
the fold. A method only says which parameters it has and how they make ΔW, in one function
that `emit` runs on graph nodes and `fold` on tensors, so the fold is what the graph computes.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx
import torch.nn as nn

from peftc.config import AdapterConfig, check_probability, check_ranks, check_targets
from peftc.errors import ConfigError
from peftc.graph import Call, SiteBuilder, cast, dtype_of, eager
from peftc.method import AdapterTensors, EmitContext, Method, TensorKey, adapter_dtype, register_method
from peftc.targets import pattern_value

aten = torch.ops.aten

KAIMING, ZEROS = "kaiming", "zeros"
# (key, shape, init), in the order PEFT draws their initial values
ParamSpec = tuple[TensorKey, tuple[int, ...], str]


@dataclass
class LycorisConfig(AdapterConfig):
    """The fields PEFT's LoHaConfig and LoKrConfig share, same names and defaults."""


    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_targets(self)
        check_ranks(self)
        for name in ("rank_dropout", "module_dropout"):
            check_probability(self, name)


class Lycoris(Method):
    """A LyCORIS method: ΔW from the adapter's parameters, applied beside the base op."""

    # "nn_conv1d": elsewhere in peftc "conv1d" is transformers' Conv1D, which PEFT's LyCORIS layers do not adapt
    layer_types = {"linear": "nn.Linear", "nn_conv1d": "nn.Conv1d", "conv2d": "nn.Conv2d"}
    site_ops = {"linear": ("linear",), "nn_conv1d": ("conv1d", "convolution"), "conv2d": ("conv2d", "convolution")}
    scale_key: TensorKey  # alpha / r, a run-time buffer (never saved, as in PEFT)

    @abstractmethod
    def parameter_specs(self, config: LycorisConfig, r: int, weight_shape: tuple[int, ...]) -> list[ParamSpec]:
        """The adapter's parameters for a base weight of this shape, in PEFT's init order."""

    @abstractmethod
    def delta_weight(self, call: Call, t: dict[TensorKey, Any], shape: list[int]) -> Any:
        """ΔW in the base weight's `shape`, scale included, built with `call` (graph or eager)."""

    def rank_dropout_rescales(self, config: LycorisConfig) -> bool:
        """Whether rank dropout divides the kept rows by their mean (LoHa always; LoKr if asked)."""
        return True

    def layer_kind(self, module: nn.Module) -> str | None:
        for kind, cls in (("linear", nn.Linear), ("nn_conv1d", nn.Conv1d), ("conv2d", nn.Conv2d)):
            if isinstance(module, cls):
                return kind
        return None

    def settings(self, config: LycorisConfig, module_name: str) -> dict[str, float]:
        return {"r": pattern_value(config.rank_pattern, module_name, config.r),
                "alpha": pattern_value(config.alpha_pattern, module_name, config.alpha)}

    def create(self, config: LycorisConfig, module_name: str, module: nn.Module, kind: str) -> AdapterTensors:
        settings = self.settings(config, module_name)
        r, alpha = settings["r"], settings["alpha"]
        w = module.weight
        params = {}
        for key, shape, init in self.parameter_specs(config, r, tuple(w.shape)):
            t = torch.empty(shape)
            if init == KAIMING:  # what PEFT draws for every non-zero factor
                nn.init.kaiming_uniform_(t, a=math.sqrt(5))
            else:
                nn.init.zeros_(t)
            params[key] = t
        dtype = adapter_dtype(w)
        params = {k: v.to(device=w.device, dtype=dtype) for k, v in params.items()}
        scale = torch.tensor(alpha / r, dtype=dtype, device=w.device)
        return AdapterTensors(params=params, buffers={self.scale_key: scale})

    def emit(self, ctx: EmitContext) -> torch.fx.Node:
        b, site, y, tensors, config, training = ctx.builder, ctx.site, ctx.y, ctx.tensors, ctx.config, ctx.training
        shape = list(site.weight.meta["val"].shape)
        delta = self.delta_weight(b.call, tensors, shape)
        if training:
            delta = self._dropouts(b, delta, shape, config)
        # the site's own op and geometry (stride, padding, dilation, groups) with ΔW as weight, no bias
        dtype = dtype_of(tensors[self.scale_key])
        x = cast(b, site.input, dtype_of(site.input), dtype)
        h = b.call(site.node.target, x, delta, None, *site.node.args[3:], **site.node.kwargs)
        # PEFT adds in the adapter's dtype (fp32 over a bf16 base), then casts the sum back
        out = b.call(aten.add.Tensor, cast(b, y, dtype_of(y), dtype), h)
        return cast(b, out, dtype, dtype_of(y))

    def _dropouts(self, b: SiteBuilder, delta: torch.fx.Node, shape: list[int], config: LycorisConfig) -> torch.fx.Node:
        """PEFT's training-time module dropout (skip the adapter) and rank dropout (drop rows of ΔW)."""
        # PEFT draws the module's coin first, at every adapted layer, even at p=0: drawing it here
        # too keeps the random stream, and so every later dropout, identical to PEFT's
        keep = b.call(aten.gt.Scalar, b.call(aten.rand.default, [1]), config.module_dropout)
        if config.rank_dropout > 0:
            # a Bernoulli mask over output rows, drawn on the CPU generator, then moved to ΔW's
            mask = b.call(aten.gt.Scalar, b.call(aten.rand.default, [shape[0]]), config.rank_dropout)
            mask = b.call(aten.reshape.default, b.call(aten.to.other, mask, delta), [-1] + [1] * (len(shape) - 1))
            if self.rank_dropout_rescales(config):
                mask = b.call(aten.div.Tensor, mask, b.call(aten.mean.default, mask))
            delta = b.call(aten.mul.Tensor, delta, mask)
        return b.call(aten.mul.Tensor, delta, keep)  # a dropped module adds op(x, 0)

    def fold(
        self,
        kind: str,
        config: LycorisConfig,
        module: nn.Module,
        tensors: dict[TensorKey, torch.Tensor],
        base: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        return {"weight": base["weight"] + self.delta_weight(eager, tensors, list(base["weight"].shape))}


def core_shape(r: int, kernel: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The CP core of an effective conv decomposition: (r, r, kh, kw), a Conv1d's as (r, r, k, 1)."""
    return (r, r, *kernel) + (1,) * (2 - len(kernel))


def effective_conv(config: LycorisConfig, kernel: tuple[int, ...]) -> bool:
    # PEFT turns the CP decomposition off for 1x1 (and k=1) kernels, pointwise like a Linear
    return config.use_effective_conv2d and any(k != 1 for k in kernel)


@dataclass
class LoHaConfig(LycorisConfig):
    """PEFT's `LoHaConfig`, same fields and defaults."""

    peft_type_name: ClassVar[str] = "LOHA"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be true or false for LOHA, got {self.init_weights!r}")



W1A, W1B, W2A, W2B = ("hada_w1_a", None), ("hada_w1_b", None), ("hada_w2_a", None), ("hada_w2_b", None)
T1, T2 = ("hada_t1", None), ("hada_t2", None)
# einsum of a CP core with its two mode factors: (r, r, kh, kw), (r, in), (r, out) -> (out, in, kh, kw)
CP = "ijkl,jr,ip->prkl"


@register_method
class LoHa(Lycoris):
    peft_type = "LOHA"
    example_config = {"peft_type": "LOHA", "r": 2, "alpha": 4, "target_modules": ["lin0", "lin1"]}
    config_cls = LoHaConfig
    groups = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    scale_key = ("hada_scaling", None)

    def parameter_specs(self, config: LoHaConfig, r: int, weight_shape: tuple[int, ...]) -> list[ParamSpec]:
        out_dim, in_dim, *kernel = weight_shape  # a conv's in_dim is already in_channels // groups
        kernel = tuple(kernel)
        effective = effective_conv(config, kernel)
        if effective:
            a, b = (r, out_dim), (r, in_dim)
        else:  # a conv's kernel is flattened into the input side
            a, b = (out_dim, r), (r, in_dim * math.prod(kernel))
        # one zero factor makes the initial ΔW zero; init_weights=False draws it too
        w2b_init = ZEROS if config.init_weights else KAIMING
        specs = [(W1A, a, KAIMING), (W1B, b, KAIMING), (W2A, a, KAIMING), (W2B, b, w2b_init)]
        if effective:
            specs += [(T1, core_shape(r, kernel), KAIMING), (T2, core_shape(r, kernel), KAIMING)]
        return specs

    def delta_weight(self, call: Call, t: dict[TensorKey, Any], shape: list[int]) -> Any:
        if T1 in t:
            w1 = call(aten.einsum.default, CP, [t[T1], t[W1B], t[W1A]])
            w2 = call(aten.einsum.default, CP, [t[T2], t[W2B], t[W2A]])
        else:
            w1 = call(aten.mm.default, t[W1A], t[W1B])
            w2 = call(aten.mm.default, t[W2A], t[W2B])
        w = call(aten.mul.Tensor, call(aten.mul.Tensor, w1, w2), t[self.scale_key])
        return call(aten.reshape.default, w, shape)
