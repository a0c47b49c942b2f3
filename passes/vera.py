"""VeRA: y = base(x) + lambda_b * (B (lambda_d * (A dropout(x)))), with A and B frozen and random.

One pair of projections serves every module of an adapter: `vera_A` (r, max in) and `vera_B`
(max out, r), sized to the largest targeted layer, drawn from `projection_prng_key` and sliced
per layer; only the vectors `vera_lambda_d` (r) and `vera_lambda_b` (out) are trained. Names,
shapes, initialisation and the draw order follow PEFT's `vera.Linear` (transformers' Conv1D is
a Linear stored transposed). The projections are the method's shared tensors: created once per
adapter at `base_model.vera_A.<adapter>`, graph inputs of every site, saved as `base_model.vera_A`
when `save_projection` is set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx
import torch.nn as nn

from peftc.config import AdapterConfig, check_probability, check_ranks, check_targets
from peftc.graph import cast_like, dtype_of
from peftc.method import AdapterTensors, EmitContext, Method, TensorKey, adapter_dtype, in_out_features, register_method

from .ia3 import promoted

aten = torch.ops.aten

A: TensorKey = ("vera_A", None)
B: TensorKey = ("vera_B", None)
LAMBDA_B: TensorKey = ("vera_lambda_b", None)
LAMBDA_D: TensorKey = ("vera_lambda_d", None)


@dataclass
class VeraConfig(AdapterConfig):
    """PEFT's `VeraConfig`, same fields and defaults."""

    peft_type_name: ClassVar[str] = "VERA"

    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_targets(self)
        check_ranks(self)
        check_probability(self, "vera_dropout")


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's VeRA init: uniform in +-sqrt(3) * gain / sqrt(fan_in), gain sqrt(2), drawn from `generator`."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


@register_method
class Vera(Method):
    peft_type = "VERA"
    example_config = {"peft_type": "VERA", "r": 4, "target_modules": ["lin0", "lin1"]}
    config_cls = VeraConfig
    groups = ("vera_lambda_b", "vera_lambda_d")
    layer_types = {"linear": "nn.Linear", "conv1d": "transformers Conv1D"}
    site_ops = {"linear": ("linear",), "conv1d": ("addmm",)}

    def create_shared(
        self, config: VeraConfig, targets: dict[str, tuple[nn.Module, str]]
    ) -> dict[TensorKey, torch.Tensor]:
        dims = [in_out_features(module, kind) for module, kind in targets.values()]
        max_in, max_out = max(i for i, _ in dims), max(o for _, o in dims)
        generator = torch.Generator().manual_seed(config.projection_prng_key)
        a = _kaiming_uniform((config.r, max_in), generator)
        b = _kaiming_uniform((max_out, config.r), generator)
        w = next(iter(targets.values()))[0].weight
        return {A: a.to(device=w.device, dtype=adapter_dtype(w)), B: b.to(device=w.device, dtype=adapter_dtype(w))}

    def saves_shared(self, config: VeraConfig) -> bool:
        return config.save_projection

    def create(self, config: VeraConfig, module_name: str, module: nn.Module, kind: str) -> AdapterTensors:
        _, fan_out = in_out_features(module, kind)
        lambda_b, lambda_d = torch.ones(fan_out), torch.randn(config.r)  # PEFT's draw order
        if config.init_weights:
            nn.init.zeros_(lambda_b)
            nn.init.constant_(lambda_d, config.d_initial)
        w = module.weight
        params = {LAMBDA_B: lambda_b, LAMBDA_D: lambda_d}
        return AdapterTensors(params={k: v.to(device=w.device, dtype=adapter_dtype(w)) for k, v in params.items()})

    def emit(self, ctx: EmitContext) -> torch.fx.Node:
        b, site, y, kind = ctx.builder, ctx.site, ctx.y, ctx.kind
        tensors, config, training = ctx.tensors, ctx.config, ctx.training
        shape = site.weight.meta["val"].shape
        fan_in, fan_out = (shape[0], shape[1]) if kind == "conv1d" else (shape[1], shape[0])
        x = cast_like(b, site.input, tensors[LAMBDA_D])
        if training and config.vera_dropout > 0:
            x = b.call(aten.dropout.default, x, config.vera_dropout, True)
        a = b.call(aten.slice.Tensor, tensors[A], 1, 0, fan_in)
        proj_b = b.call(aten.slice.Tensor, tensors[B], 0, 0, fan_out)
        h = b.call(aten.mul.Tensor, b.call(aten.linear.default, x, a), tensors[LAMBDA_D])
        h = b.call(aten.mul.Tensor, b.call(aten.linear.default, h, proj_b), tensors[LAMBDA_B])
        return promoted(b, aten.add.Tensor, y, h, dtype_of(tensors[LAMBDA_B]))

    def fold(
        self,
        kind: str,
        config: VeraConfig,
        module: nn.Module,
        tensors: dict[TensorKey, torch.Tensor],
        base: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        fan_in, fan_out = in_out_features(module, kind)
        a = tensors[LAMBDA_D][:, None] * tensors[A][:, :fan_in]
        delta = (tensors[LAMBDA_B][:, None] * tensors[B][:fan_out]) @ a
        return {"weight": base["weight"] + (delta.T if kind == "conv1d" else delta)}
