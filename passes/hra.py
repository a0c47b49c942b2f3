"""HRA: Householder reflection adaptation, y = base(x) with W replaced by W H.

H = (I - 2 u_1 u_1^T) ... (I - 2 u_r u_r^T) for the normalised columns u_i of the trainable
`hra_u` (in_features, r), or I - 2 U U^T for their Gram-Schmidt orthonormalisation U with
`apply_GS`. As in PEFT 0.21, the layer runs with the reflected weight (a Conv2d's flattened
(C, kh, kw) filters), in the adapter's dtype, so the adapter folds exactly. peftc applies the
reflections to W one by one (rank-1 updates) instead of forming the in x in matrix H.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx
import torch.nn as nn

from peftc.config import AdapterConfig, check_ranks
from peftc.graph import Call, cast, dtype_of, eager
from peftc.method import AdapterTensors, EmitContext, TensorKey, adapter_dtype, register_method
from peftc.sites import WEIGHT_OPS

from .boft import check_weight_conv
from .fold import BIAS_ARG
from .oft import RotationMethod, check_shared_fields, current_base_op

aten = torch.ops.aten

U: TensorKey = ("hra_u", None)


@dataclass
class HRAConfig(AdapterConfig):
    """PEFT's `HRAConfig`, same fields and defaults."""

    peft_type_name: ClassVar[str] = "HRA"

    r: int = 8
    apply_GS: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_shared_fields(self)
        check_ranks(self)


def _normalised(call: Call, v: Any, dim: list[int] | None = None) -> Any:
    return call(aten.div.Tensor, v, call(aten.linalg_vector_norm.default, v, 2, dim, dim is not None))


def reflected(call: Call, w: Any, u: Any, r: int, gram_schmidt: bool) -> Any:
    """W H for W (out, d) and the reflection vectors `u` (d, r)."""
    if gram_schmidt:
        basis: list[Any] = []
        for i in range(r):
            v = call(aten.select.int, u, 1, i)
            for prev in basis:
                v = call(aten.sub.Tensor, v, call(aten.mul.Tensor, prev, call(aten.dot.default, prev, v)))
            basis.append(_normalised(call, v))
        ortho = call(aten.stack.default, basis, 1)
        # W (I - 2 U U^T) = W - 2 (W U) U^T
        return call(aten.addmm.default, w, call(aten.mm.default, w, ortho), call(aten.t.default, ortho), alpha=-2)
    unit = _normalised(call, u, [0])
    for i in range(r):  # W (I - 2 u u^T) = W - 2 (W u) u^T, reflection by reflection
        ui = call(aten.select.int, unit, 1, i)
        w = call(aten.addr.default, w, call(aten.mv.default, w, ui), ui, alpha=-2)
    return w


def reflected_weight(call: Call, w: Any, u: Any, r: int, gram_schmidt: bool) -> Any:
    """The layer's weight (out, in) or (out, C, kh, kw) with its flattened rows reflected."""
    return call(aten.view_as.default, reflected(call, call(aten.flatten.using_ints, w, 1), u, r, gram_schmidt), w)


@register_method
class HRA(RotationMethod):
    peft_type = "HRA"
    example_config = {"peft_type": "HRA", "r": 2, "target_modules": ["lin0", "lin1"]}
    config_cls = HRAConfig
    groups = ("hra_u",)

    def check_conv(self, module_name: str, module: nn.Conv2d) -> None:
        check_weight_conv(self.peft_type, module_name, module)

    def create(self, config: HRAConfig, module_name: str, module: nn.Module, kind: str) -> AdapterTensors:
        features = self.features(module_name, module, kind)
        symmetric = config.init_weights and config.r % 2 == 0
        if config.init_weights and not symmetric:
            warnings.warn(f"{module_name}: HRA's symmetric (identity) initialisation needs an even r, got "
                          f"r={config.r}; initialising randomly, as PEFT does", stacklevel=2)
        # the symmetric init repeats each vector, so the pairs of equal reflections cancel: H = I
        u = torch.empty(features, config.r // 2 if symmetric else config.r)
        nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        if symmetric:
            u = torch.repeat_interleave(u, 2, dim=1)
        return AdapterTensors(params={U: u.to(device=module.weight.device, dtype=adapter_dtype(module.weight))})

    def emit(self, ctx: EmitContext) -> torch.fx.Node:
        b, site, y, tensors, config = ctx.builder, ctx.site, ctx.y, ctx.tensors, ctx.config
        op = current_base_op(site, y, self.peft_type)
        adapter, base = dtype_of(tensors[U]), dtype_of(site.weight)
        x_i, w_i = WEIGHT_OPS[op.target]
        bias_i = BIAS_ARG[op.target]
        # PEFT runs the layer in the adapter's dtype (fp32 over a bf16 base) and casts the output back; op's
        # weight is the base weight, or an earlier HRA adapter's W H1 (PEFT's composition: W H1 H2)
        replace = {x_i: cast(b, op.args[x_i], dtype_of(site.input), adapter),
                   w_i: reflected_weight(b.call, cast(b, op.args[w_i], base, adapter), tensors[U], config.r,
                                         config.apply_GS)}
        if len(op.args) > bias_i and op.args[bias_i] is not None:
            replace[bias_i] = cast(b, op.args[bias_i], base, adapter)
        return cast(b, b.rerun(op, replace), adapter, dtype_of(site.input))

    def fold(
        self,
        kind: str,
        config: HRAConfig,
        module: nn.Module,
        tensors: dict[TensorKey, torch.Tensor],
        base: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        return {"weight": reflected_weight(eager, base["weight"], tensors[U], config.r, config.apply_GS)}
