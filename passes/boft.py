"""BOFT: butterfly orthogonal fine-tuning, y = s * (W R^T x) + b with R block-diagonal orthogonal.

Each block of R is the exact Cayley transform of the skew-symmetric part of a full trainable
block, 0.5 (A - A^T), and `boft_s` scales the layer's outputs (not its bias). The layer runs with
the rotated, scaled weight s * (W R^T) (a Conv2d's flattened (C, kh, kw) filters), as PEFT's
Conv2d does; PEFT's Linear rotates its input instead, the same function up to rounding. So the
adapter folds exactly, and several active BOFT adapters compose as in PEFT.

`boft_dropout` replaces a random `int(p * blocks)` blocks by the identity in training, drawing
from the CPU generator exactly as PEFT does (a `randint` for the butterfly factor, then a
`randperm` of the blocks), so a seeded train step matches PEFT's.

Only `boft_n_butterfly_factor=1` (plain block-diagonal OFT) is implemented: without its CUDA
extension PEFT silently replaces any other factor by 1, so on most machines that is also PEFT's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx
import torch.nn as nn

from peftc.config import AdapterConfig, check_probability
from peftc.errors import ConfigError
from peftc.graph import Call, cast, dtype_of, eager
from peftc.method import AdapterTensors, EmitContext, TensorKey, adapter_dtype, register_method
from peftc.sites import WEIGHT_OPS

from .oft import (
    RotationMethod,
    cayley,
    check_conv,
    check_one_of,
    check_shared_fields,
    current_base_op,
    rotate_last_dim,
)

aten = torch.ops.aten

R: TensorKey = ("boft_R", None)
S: TensorKey = ("boft_s", None)


@dataclass
class BOFTConfig(AdapterConfig):
    """PEFT's `BOFTConfig`, same fields and defaults."""

    peft_type_name: ClassVar[str] = "BOFT"
    unsupported: ClassVar[dict[str, str]] = {
        "fan_in_fan_out": "BOFT adapts nn.Linear and nn.Conv2d only, whose weights are never stored transposed",
        "boft_n_butterfly_factor": "butterfly factors > 1 are not implemented yet (PEFT itself uses 1 whenever "
                                   "its CUDA extension is not available)",
    }

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_shared_fields(self)
        check_one_of(self, "boft_block_size", "boft_block_num", "their product is the layer's input dimension")
        check_probability(self, "boft_dropout")


def boft_layout(config: BOFTConfig, module_name: str, features: int) -> tuple[int, int]:
    """(number of blocks, block size); unlike OFT, PEFT requires an exact division here."""
    given = config.boft_block_size or config.boft_block_num
    if features % given:
        field = "boft_block_size" if config.boft_block_size else "boft_block_num"
        raise ConfigError(f"{field}={given} does not divide the {features} input features of {module_name!r}")
    return (features // given, given) if config.boft_block_size else (given, features // given)


def boft_rotation(call: Call, param: Any, blocks: int, block_size: int, config: BOFTConfig, training: bool) -> Any:
    """The blocks of R, (blocks, bs, bs), from `boft_R` (1, blocks, bs, bs); with `boft_dropout` in training,
    a random int(p * blocks) of them are the identity (PEFT's MultiplicativeDropoutLayer)."""
    a = call(aten.squeeze.dim, param, 0)
    q = call(aten.mul.Tensor, call(aten.sub.Tensor, a, call(aten.transpose.int, a, -2, -1)), 0.5)
    r = cayley(call, q, blocks, block_size, exact=True, terms=0)
    if not (training and config.boft_dropout > 0):
        return r
    # PEFT draws the butterfly factor to drop in first (there is one), then which blocks: block i becomes the
    # identity when the permutation puts it among the first int(p * blocks)
    call(aten.randint.low, 0, 1, [1], device=torch.device("cpu"))
    perm = call(aten.randperm.default, blocks, device=torch.device("cpu"))
    mask = call(aten.to.other, call(aten.lt.Scalar, perm, int(config.boft_dropout * blocks)), r)
    mask = call(aten.view.default, mask, [blocks, 1, 1])
    eye = call(aten.diag_embed.default, call(aten.new_ones.default, r, [blocks, block_size]))
    kept = call(aten.mul.Tensor, call(aten.rsub.Scalar, mask, 1), r)
    return call(aten.add.Tensor, kept, call(aten.mul.Tensor, mask, eye))


@register_method
class BOFT(RotationMethod):
    peft_type = "BOFT"
    example_config = {"peft_type": "BOFT", "boft_block_size": 4, "target_modules": ["lin0", "lin1"]}
    config_cls = BOFTConfig
    groups = ("boft_R", "boft_s")

    def check_conv(self, module_name: str, module: nn.Conv2d) -> None:
        check_weight_conv(self.peft_type, module_name, module)

    def create(self, config: BOFTConfig, module_name: str, module: nn.Module, kind: str) -> AdapterTensors:
        w = module.weight
        blocks, block_size = boft_layout(config, module_name, self.features(module_name, module, kind))
        rotation = torch.zeros(1, blocks, block_size, block_size)
        scale = torch.ones((w.shape[0], 1) if kind == "linear" else (1, w.shape[0]))
        if not config.init_weights:
            nn.init.normal_(rotation, std=0.1)
            nn.init.normal_(scale, mean=1.0, std=0.1)
        dtype = adapter_dtype(w)
        return AdapterTensors(params={R: rotation.to(w.device, dtype), S: scale.to(w.device, dtype)})

    def emit(self, ctx: EmitContext) -> torch.fx.Node:
        b, site, y, tensors, config, training = ctx.builder, ctx.site, ctx.y, ctx.tensors, ctx.config, ctx.training
        op = current_base_op(site, y, self.peft_type)
        blocks, block_size = tensors[R].meta["val"].shape[1:3]
        adapter, base = dtype_of(tensors[R]), dtype_of(site.weight)
        r = boft_rotation(b.call, tensors[R], blocks, block_size, config, training)
        scale = b.call(aten.view.default, tensors[S], [-1])
        w_i = WEIGHT_OPS[op.target][1]
        # op's weight is the base weight, or an earlier BOFT adapter's: W R1^T R2^T, PEFT's composition
        weight = rotated_scaled_weight(b.call, cast(b, op.args[w_i], base, adapter), r, scale, blocks, block_size)
        return b.rerun(op, {w_i: cast(b, weight, adapter, base)})

    def fold(
        self,
        kind: str,
        config: BOFTConfig,
        module: nn.Module,
        tensors: dict[TensorKey, torch.Tensor],
        base: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        blocks, block_size = tensors[R].shape[1:3]
        r = boft_rotation(eager, tensors[R], blocks, block_size, config, training=False)
        return {"weight": rotated_scaled_weight(eager, base["weight"], r, tensors[S].flatten(), blocks, block_size)}


def rotated_scaled_weight(call: Call, w: Any, r: Any, scale: Any, blocks: int, block_size: int) -> Any:
    """(R W_flat^T)^T * s, back in W's shape: the weight of base(x R) * s, for W (out, in) or (out, C, kh, kw)."""
    flat = call(aten.flatten.using_ints, w, 1)
    rotated = rotate_last_dim(call, flat, call(aten.transpose.int, r, -2, -1), blocks, block_size)
    scaled = call(aten.mul.Tensor, rotated, call(aten.unsqueeze.default, scale, 1))
    return call(aten.view_as.default, scaled, w)


def check_weight_conv(peft_type: str, module_name: str, module: nn.Conv2d) -> None:
    """PEFT's BOFT and HRA re-run a Conv2d as F.conv2d(x, W', b, stride[0], padding[0]): the layers where that
    is the layer's own convolution."""
    check_conv(peft_type, module_name, module)
    square = module.stride[0] == module.stride[1] and module.padding[0] == module.padding[1]
    if module.groups != 1 or not square or isinstance(module.padding, str) or module.padding_mode != "zeros":
        raise ConfigError(
            f"{module_name!r}: {peft_type} supports a Conv2d with groups=1, square stride and padding and zero "
            f"padding (got groups={module.groups}, stride={module.stride}, padding={module.padding}, "
            f"padding_mode={module.padding_mode!r}); PEFT rejects groups > 1 and ignores the rest"
        )
