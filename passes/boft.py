"""BOFT: butterfly orthogonal fine-tuning, y = s * (W R^T x) + b with R block-diagonal orthogonal.

Each block of R is the exact Cayley transform of the skew-symmetric part of a full trainable
block, 0.5 (A - A^T), and `boft_s` scales the layer's outputs (not its bias). The layer runs with
the rotated, scaled weight s * (W R^T) (a Conv2d's flattened (C, kh, kw) filters), as PEFT's
Conv2d does; PEFT's Linear rotates its input instead, the same function up to rounding. So the
adapter folds exactly, and several active BOFT adapters compose as in PEFT.

`boft_dropout` replaces a random `int(p * blocks)` blocks by the identity in training, drawing
from the CPU generator exactly as PEFT does (a `randint` for the butterfly factor, then a
`randperm` of the blocks), so a seeded train step matches PEFT's.

`boft_n_butterfly_factor` = N > 1 multiplies N block-diagonal factors, each conjugated by PEFT's
butterfly permutation (`boft_P`, a run-time buffer): R = B_{N-1} ... B_0 with B_i = P_i diag(R_i) P_i^T,
applied as a dense (in, in) matrix. PEFT computes that only where its CUDA extension builds; without
it PEFT silently uses one factor (and creates a boft_R of one), so its N > 1 checkpoints only load in
PEFT where the extension builds. peftc computes the maths on any device.
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
P: TensorKey = ("boft_P", None)  # the butterfly permutations, a run-time buffer (unsaved, as PEFT's)


@dataclass
class BOFTConfig(AdapterConfig):
    """PEFT's `BOFTConfig`, same fields and defaults."""

    peft_type_name: ClassVar[str] = "BOFT"
    unsupported: ClassVar[dict[str, str]] = {
        "fan_in_fan_out": "BOFT adapts nn.Linear and nn.Conv2d only, whose weights are never stored transposed",
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
        n = self.boft_n_butterfly_factor
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"boft_n_butterfly_factor must be a positive integer, got {n!r}")


def boft_layout(config: BOFTConfig, module_name: str, features: int) -> tuple[int, int]:
    """(number of blocks, block size); unlike OFT, PEFT requires an exact division here, and for butterfly
    factors an even block size and number with 2^(N-1) dividing the number of blocks."""
    given = config.boft_block_size or config.boft_block_num
    if features % given:
        field = "boft_block_size" if config.boft_block_size else "boft_block_num"
        raise ConfigError(f"{field}={given} does not divide the {features} input features of {module_name!r}")
    blocks, size = (features // given, given) if config.boft_block_size else (given, features // given)
    extra = config.boft_n_butterfly_factor - 1
    if extra and (blocks % (2 ** extra) or size % 2 or blocks % 2):
        raise ConfigError(f"boft_n_butterfly_factor={extra + 1} for {module_name!r}: its {blocks} blocks of size "
                          f"{size} must both be even, and the blocks a multiple of {2 ** extra} (PEFT's rule)")
    return blocks, size


def butterfly_permutations(features: int, blocks: int, block_size: int, factors: int) -> torch.Tensor:
    """PEFT's `boft_P`: one permutation matrix (features, features) per butterfly factor (identities for 1)."""
    out = torch.empty(factors, features, features)
    for i in range(factors):
        perm = _butterfly_perm(features, blocks // 2 ** i, block_size // 2) if factors > 1 else torch.arange(features)
        out[i] = torch.zeros(features, features).index_put_((torch.arange(features), perm), torch.tensor(1.0))
    return out


def _butterfly_perm(n: int, b: int, r: int) -> torch.Tensor:
    """PEFT's `block_butterfly_perm(n, b, r)`: within each of b chunks, the r-sized groups at even positions
    first, then those at odd positions."""
    size = n // b
    groups = list(range(0, size // r, 2)) + list(range(1, size // r, 2))
    order = torch.cat([torch.arange(g * r, g * r + r) for g in groups])
    return torch.cat([start + order for start in range(0, n, size)])


def boft_rotation(call: Call, param: Any, blocks: int, block_size: int, config: BOFTConfig, training: bool) -> Any:
    """The blocks of R, (N * blocks, bs, bs) for N butterfly factors, from `boft_R` (N, blocks, bs, bs); with
    `boft_dropout` in training, a random int(p * blocks) blocks of one random factor are the identity (PEFT's
    MultiplicativeDropoutLayer)."""
    factors = config.boft_n_butterfly_factor
    rows = factors * blocks
    a = call(aten.reshape.default, param, [rows, block_size, block_size])
    q = call(aten.mul.Tensor, call(aten.sub.Tensor, a, call(aten.transpose.int, a, -2, -1)), 0.5)
    r = cayley(call, q, rows, block_size, exact=True, terms=0)
    if not (training and config.boft_dropout > 0):
        return r
    # PEFT draws the butterfly factor to drop in first, then which of its blocks: block i becomes the identity
    # when the permutation puts it among the first int(p * blocks)
    factor = call(aten.randint.low, 0, factors, [1], device=torch.device("cpu"))
    perm = call(aten.randperm.default, blocks, device=torch.device("cpu"))
    mask = call(aten.lt.Scalar, perm, int(config.boft_dropout * blocks))
    if factors > 1:
        chosen = call(aten.eq.Tensor, call(aten.arange.default, factors, device=torch.device("cpu")), factor)
        mask = call(aten.logical_and.default, call(aten.unsqueeze.default, chosen, 1),
                    call(aten.unsqueeze.default, mask, 0))
    mask = call(aten.view.default, call(aten.to.other, mask, r), [rows, 1, 1])
    eye = call(aten.diag_embed.default, call(aten.new_ones.default, r, [rows, block_size]))
    kept = call(aten.mul.Tensor, call(aten.rsub.Scalar, mask, 1), r)
    return call(aten.add.Tensor, kept, call(aten.mul.Tensor, mask, eye))


def butterfly_matrix(call: Call, r: Any, perms: Any, factors: int, blocks: int, block_size: int) -> Any:
    """PEFT's dense rotation for N factors: B_{N-1} ... B_0, B_i = P_i diag(R_i) P_i^T, (features, features)."""
    n = blocks * block_size
    eye = call(aten.new_ones.default, r, [blocks])
    mask = call(aten.view.default, call(aten.diag_embed.default, eye), [1, blocks, 1, blocks, 1])
    blocks_r = call(aten.view.default, r, [factors, blocks, block_size, 1, block_size])
    dense = call(aten.view.default, call(aten.mul.Tensor, blocks_r, mask), [factors, n, n])  # diag(R_i)
    perms = call(aten.to.other, perms, dense)
    each = call(aten.bmm.default, perms, call(aten.bmm.default, dense, call(aten.transpose.int, perms, 1, 2)))
    out = call(aten.select.int, each, 0, 0)
    for i in range(1, factors):
        out = call(aten.mm.default, call(aten.select.int, each, 0, i), out)
    return out


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
        features = self.features(module_name, module, kind)
        blocks, block_size = boft_layout(config, module_name, features)
        factors = config.boft_n_butterfly_factor
        rotation = torch.zeros(factors, blocks, block_size, block_size)
        scale = torch.ones((w.shape[0], 1) if kind == "linear" else (1, w.shape[0]))
        if not config.init_weights:
            nn.init.normal_(rotation, std=0.1)
            nn.init.normal_(scale, mean=1.0, std=0.1)
        dtype = adapter_dtype(w)
        buffers = {P: butterfly_permutations(features, blocks, block_size, factors).to(w.device)} if factors > 1 else {}
        return AdapterTensors(params={R: rotation.to(w.device, dtype), S: scale.to(w.device, dtype)}, buffers=buffers)

    def emit(self, ctx: EmitContext) -> torch.fx.Node:
        b, site, y, tensors, config, training = ctx.builder, ctx.site, ctx.y, ctx.tensors, ctx.config, ctx.training
        op = current_base_op(site, y, self.peft_type)
        blocks, block_size = tensors[R].meta["val"].shape[1:3]
        adapter, base = dtype_of(tensors[R]), dtype_of(site.weight)
        r = boft_rotation(b.call, tensors[R], blocks, block_size, config, training)
        scale = b.call(aten.view.default, tensors[S], [-1])
        w_i = WEIGHT_OPS[op.target][1]
        # op's weight is the base weight, or an earlier BOFT adapter's: W R1^T R2^T, PEFT's composition
        weight = rotated_scaled_weight(b.call, cast(b, op.args[w_i], base, adapter), r, scale, blocks, block_size,
                                       tensors.get(P), config.boft_n_butterfly_factor)
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
        return {"weight": rotated_scaled_weight(eager, base["weight"], r, tensors[S].flatten(), blocks, block_size,
                                                tensors.get(P), config.boft_n_butterfly_factor)}


def rotated_scaled_weight(call: Call, w: Any, r: Any, scale: Any, blocks: int, block_size: int,
                          perms: Any = None, factors: int = 1) -> Any:
    """(R W_flat^T)^T * s, back in W's shape: the weight of base(x R) * s, for W (out, in) or (out, C, kh, kw);
    R block-diagonal, or for several butterfly factors the dense product of their permuted block diagonals."""
    flat = call(aten.flatten.using_ints, w, 1)
    if factors > 1:
        dense = butterfly_matrix(call, r, perms, factors, blocks, block_size)
        rotated = call(aten.mm.default, flat, call(aten.t.default, dense))
    else:
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
