"""OFT: orthogonal fine-tuning, y = base(x R) with R block-diagonal and orthogonal.

Each block of R is the Cayley transform of a skew-symmetric matrix Q whose upper triangle is
the trainable `oft_R.weight` (one row per block, or one shared row with `block_share`):
R = (I - Q)(I + Q)^-1 exactly, or its Cayley-Neumann series I + 2Q + 2Q^2 + ... + Q^k.
As in PEFT 0.21, R rotates the layer's input: a Linear's features, an Embedding's output, and
a Conv2d's unfolded kh x kw patches (stride 1, no padding), which are summed back in place
with `col2im` (PEFT's `F.fold`) before the base convolution. That overlap-add makes a k > 1
convolution's unmerged output differ from any rotated kernel, so only 1x1 convolutions fold.

The rotation is built in the graph from the parameter input with aten ops, and the same ops
run eagerly in `fold`, so the merged weight uses the very R the graph computes. PEFT's
`module_dropout` is accepted and, as in PEFT 0.21 (whose forward never calls its dropout
layer), has no effect. Constrained OFT (`coft`) projects the parameter in place before each call
(`before_call`), as PEFT's forward does; the graph then reads the projected value.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx
import torch.nn as nn

from peftc.config import AdapterConfig, check_probability, check_targets
from peftc.errors import ConfigError, TargetError
from peftc.graph import Call, SiteBuilder, cast, dtype_of, eager
from peftc.method import AdapterTensors, EmitContext, Method, TensorKey, adapter_dtype, register_method
from peftc.sites import WEIGHT_OPS, Site

aten = torch.ops.aten

ROT: TensorKey = ("oft_R", "weight")
EMB_ROT: TensorKey = ("oft_embedding_R", "weight")

@dataclass
class OFTConfig(AdapterConfig):
    """PEFT's `OFTConfig`, same fields and defaults."""

    peft_type_name: ClassVar[str] = "OFT"
    unsupported: ClassVar[dict[str, str]] = {
        "fan_in_fan_out": "OFT adapts nn.Linear and nn.Conv2d only, whose weights are never stored transposed "
                          "(PEFT resets it to False)",
    }

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_shared_fields(self)
        check_one_of(self, "r", "oft_block_size", "r x oft_block_size = the layer's input dimension")
        if not isinstance(self.num_cayley_neumann_terms, int) or self.num_cayley_neumann_terms < 0:
            raise ConfigError(f"num_cayley_neumann_terms must be a non-negative integer, "
                              f"got {self.num_cayley_neumann_terms!r}")
        check_probability(self, "module_dropout")


def check_shared_fields(config: AdapterConfig) -> None:
    """What every config of the OFT family (OFT, BOFT, HRA) checks: PEFT's target fields, a boolean
    init_weights."""
    check_targets(config)
    if not isinstance(config.init_weights, bool):
        raise ConfigError(f"init_weights must be True or False, got {config.init_weights!r}")


def check_one_of(config: AdapterConfig, a: str, b: str, why: str) -> None:
    """Two non-negative sizes of which exactly one is set (PEFT rejects both set and both zero)."""
    for name in (a, b):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    if (getattr(config, a) == 0) == (getattr(config, b) == 0):
        raise ConfigError(f"set exactly one of {a} ({getattr(config, a)}) and {b} ({getattr(config, b)}) to a "
                          f"non-zero value ({why}; the other is inferred)")


def nearest_divisor(n: int, k: int) -> int:
    """The divisor of n closest to k, the smaller on a tie (PEFT's `adjust_oft_parameters`)."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))


def block_layout(r: int, block_size: int, features: int) -> tuple[int, int]:
    """(number of blocks, block size) tiling `features`; one of r / block_size is 0 and inferred."""
    if r == 0:
        block_size = nearest_divisor(features, block_size)
        return features // block_size, block_size
    r = nearest_divisor(features, r)
    return r, features // r


def rotated_features(kind: str, weight_shape: torch.Size, in_channels: int) -> int:
    """The size of the vectors R rotates: a Linear's inputs, an Embedding's dim, a conv patch."""
    if kind == "conv2d":
        return in_channels * weight_shape[2] * weight_shape[3]
    return weight_shape[1]


def skew_symmetric(call: Call, packed: Any, rows: int, block_size: int) -> Any:
    """Q (rows, bs, bs) with `packed` (rows, bs(bs-1)/2) as its upper triangle, row-major."""
    mask = call(aten.triu.default, call(aten.new_ones.default, packed, [block_size, block_size], dtype=torch.bool), 1)
    upper = call(aten.masked_scatter.default, call(aten.new_zeros.default, packed, [rows, block_size, block_size]),
                 mask, packed)
    return call(aten.sub.Tensor, upper, call(aten.transpose.int, upper, -2, -1))


def cayley(call: Call, q: Any, rows: int, block_size: int, exact: bool, terms: int) -> Any:
    """(I - Q)(I + Q)^-1, or its Neumann series to `terms` terms as PEFT sums it:
    I + 2Q + 2Q^2 + ... + 2Q^(m-1) + Q^m with m = max(3, terms - 1) (I + 2Q for 2 terms, I for 1)."""
    eye = call(aten.diag_embed.default, call(aten.new_ones.default, q, [rows, block_size]))
    if exact:
        return call(aten.linalg_solve.default, call(aten.add.Tensor, eye, q), call(aten.sub.Tensor, eye, q),
                    left=False)
    r = eye
    if terms > 1:
        r = call(aten.add.Tensor, r, q, alpha=2.0)
    if terms > 2:
        power, top = q, max(3, terms - 1)
        for k in range(2, top + 1):
            power = call(aten.bmm.default, power, q)
            r = call(aten.add.Tensor, r, power, alpha=2.0 if k < top else 1.0)
    return r


def rotation_blocks(call: Call, packed: Any, blocks: int, block_size: int, config: OFTConfig) -> Any:
    """The diagonal blocks of R, (blocks, bs, bs), from the packed parameter."""
    rows = 1 if config.block_share else blocks
    q = skew_symmetric(call, packed, rows, block_size)
    r = cayley(call, q, rows, block_size, not config.use_cayley_neumann, config.num_cayley_neumann_terms)
    if rows != blocks:  # one shared block
        r = call(aten.repeat.default, r, [blocks, 1, 1])
    return r


def rotate_last_dim(call: Call, x: Any, r: Any, blocks: int, block_size: int) -> Any:
    """x R over the last dim, block by block: x (..., blocks * bs) times R's blocks (blocks, bs, bs)."""
    xb = call(aten.unflatten.int, x, -1, [blocks, block_size])
    return call(aten.flatten.using_ints, call(aten.einsum.default, "...rk,rkc->...rc", [xb, r]), -2, -1)


class RotationMethod(Method):
    """A method of the OFT family: its layers (Linear and Conv2d, OFT adds Embedding) and their checks."""

    layer_classes: ClassVar[dict[str, type[nn.Module]]] = {"linear": nn.Linear, "conv2d": nn.Conv2d}
    layer_types = {"linear": "nn.Linear", "conv2d": "nn.Conv2d"}
    site_ops = {"linear": ("linear",), "conv2d": ("conv2d", "convolution")}

    def layer_kind(self, module: nn.Module) -> str | None:
        return next((kind for kind, cls in self.layer_classes.items() if isinstance(module, cls)), None)

    def check_conv(self, module_name: str, module: nn.Conv2d) -> None:
        check_conv(self.peft_type, module_name, module)

    def features(self, module_name: str, module: nn.Module, kind: str) -> int:
        """The size of the vectors the method transforms, once the layer is known to be supported."""
        if kind == "conv2d":
            self.check_conv(module_name, module)
        return rotated_features(kind, module.weight.shape, getattr(module, "in_channels", 0))


@register_method
class OFT(RotationMethod):
    peft_type = "OFT"
    example_config = {"peft_type": "OFT", "oft_block_size": 4, "target_modules": ["lin0", "lin1"]}
    config_cls = OFTConfig
    groups = ("oft_R", "oft_embedding_R")
    layer_classes = {**RotationMethod.layer_classes, "embedding": nn.Embedding}
    layer_types = {**RotationMethod.layer_types, "embedding": "nn.Embedding"}
    site_ops = {**RotationMethod.site_ops, "embedding": ("embedding",)}

    def create(self, config: OFTConfig, module_name: str, module: nn.Module, kind: str) -> AdapterTensors:
        features = self.features(module_name, module, kind)
        blocks, block_size = block_layout(config.r, config.oft_block_size, features)
        requested = ("oft_block_size", config.oft_block_size, block_size) if config.r == 0 else ("r", config.r, blocks)
        if requested[1] != requested[2]:
            warnings.warn(f"{module_name}: {requested[0]}={requested[1]} does not divide the layer's {features} "
                          f"input features; using {requested[0]}={requested[2]}, as PEFT does", stacklevel=2)
        packed = torch.zeros(1 if config.block_share else blocks, block_size * (block_size - 1) // 2)
        if not config.init_weights:
            nn.init.normal_(packed, std=0.1)
        key = EMB_ROT if kind == "embedding" else ROT
        w = module.weight
        return AdapterTensors(params={key: packed.to(device=w.device, dtype=adapter_dtype(w))})

    def before_call(self, config: OFTConfig, tensors: dict[TensorKey, torch.Tensor], training: bool) -> None:
        """Constrained OFT (`coft`): as PEFT's forward, project the parameter in place before it is used (no
        gradient flows through the projection; the graph reads the projected value)."""
        if not config.coft:
            return
        packed = tensors.get(ROT, tensors.get(EMB_ROT))
        with torch.no_grad():
            packed.copy_(project(packed, packed_block_size(packed), config.eps))

    def emit(self, ctx: EmitContext) -> torch.fx.Node:
        b, site, y, kind, tensors, config = ctx.builder, ctx.site, ctx.y, ctx.kind, ctx.tensors, ctx.config
        packed = tensors[EMB_ROT if kind == "embedding" else ROT]
        weight_shape = site.weight.meta["val"].shape
        channels = site.input.meta["val"].shape[1] if kind == "conv2d" else 0
        blocks, block_size = block_layout(config.r, config.oft_block_size,
                                          rotated_features(kind, weight_shape, channels))
        r = rotation_blocks(b.call, packed, blocks, block_size, config)

        def rotate(v: torch.fx.Node) -> torch.fx.Node:
            return rotate_last_dim(b.call, v, r, blocks, block_size)

        if kind == "embedding":  # the lookup's output is what rotates
            return in_dtype_of(b, y, packed, rotate)
        op = current_base_op(site, y, self.peft_type)
        x_i = WEIGHT_OPS[op.target][0]

        def rotate_input(v: torch.fx.Node) -> torch.fx.Node:
            return rotate_patches(b, v, site.input, tuple(weight_shape[2:]), rotate) if kind == "conv2d" else rotate(v)

        return b.rerun(op, {x_i: in_dtype_of(b, op.args[x_i], packed, rotate_input)})

    def fold(
        self,
        kind: str,
        config: OFTConfig,
        module: nn.Module,
        tensors: dict[TensorKey, torch.Tensor],
        base: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        w = base["weight"]
        if kind == "conv2d":
            check_conv_foldable(self.peft_type, module)
        packed = tensors[EMB_ROT if kind == "embedding" else ROT]
        blocks, block_size = block_layout(config.r, config.oft_block_size,
                                          rotated_features(kind, w.shape, getattr(module, "in_channels", 0)))
        if config.coft:  # PEFT's merge projects first too (and writes it back; the next forward does that here)
            packed = project(packed, block_size, config.eps)
        return {"weight": rotate_weight(kind, w, torch.block_diag(*rotation_blocks(eager, packed, blocks, block_size,
                                                                                 config)))}


def packed_block_size(packed: torch.Tensor) -> int:
    """bs of a packed (rows, bs(bs-1)/2) parameter."""
    return round((1 + (1 + 8 * packed.shape[1]) ** 0.5) / 2)


def project(packed: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """PEFT's `_project_batch` (constrained OFT): each block's skew-symmetric Q scaled back onto the ball of
    radius eps / sqrt(rows) when it lies outside, returned packed again."""
    rows = packed.shape[0]
    q = skew_symmetric(eager, packed, rows, block_size)
    eps = eps * 1 / torch.sqrt(torch.tensor(rows))  # PEFT's arithmetic, for the same rounding
    norm = torch.norm(q, dim=(1, 2), keepdim=True)
    out = torch.where(norm <= eps, q, eps * (q / norm))
    upper = torch.triu_indices(block_size, block_size, 1, device=packed.device)
    return out[:, upper[0], upper[1]]


def rotate_weight(kind: str, w: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """The weight whose layer computes base(x R) (an Embedding: base(ids) R), as PEFT merges it."""
    if kind == "embedding":  # (num, dim): rows are the vectors R rotates
        return w @ rotation
    flat = w.reshape(w.shape[0], -1)  # (out, in) or a 1x1 conv's (out, in, 1, 1)
    return (rotation @ flat.T).T.reshape(w.shape)


def check_conv(peft_type: str, module_name: str, module: nn.Conv2d) -> None:
    """The Conv2d layers PEFT's rotation of input patches handles."""
    if module.dilation[0] > 1 or module.dilation[1] > 1:
        raise ConfigError(f"{module_name!r}: {peft_type} does not support a Conv2d with dilation > 1 "
                          f"(got {module.dilation}; PEFT rejects it too)")
    if module.kernel_size[0] != module.kernel_size[1]:
        raise ConfigError(f"{module_name!r}: {peft_type} needs a square Conv2d kernel, got {module.kernel_size} "
                          "(PEFT sizes its blocks from kernel_size[0] only)")


def check_conv_foldable(peft_type: str, module: nn.Conv2d) -> None:
    kernel = tuple(module.kernel_size)
    if kernel != (1, 1):
        raise ConfigError(
            f"cannot merge {peft_type} into a Conv2d with kernel {kernel}: the unmerged adapter rotates overlapping "
            "input patches and sums them back (PEFT's forward), which no rotated kernel reproduces (PEFT's merge "
            "changes such a layer's outputs); keep the adapter unmerged"
        )
    if module.groups != 1:
        raise ConfigError(
            f"cannot merge {peft_type} into a Conv2d with groups={module.groups}: the rotation mixes channels across "
            "groups, which a grouped kernel cannot hold; keep the adapter unmerged"
        )


def current_base_op(site: Site, y: torch.fx.Node, peft_type: str) -> torch.fx.Node:
    """The base op whose output is `y`: the site's op, or its re-emission by an earlier adapter that transforms
    the op's input or weight, so that several such adapters chain as PEFT composes them."""
    if y.target != site.node.target:
        raise TargetError(
            f"module {site.module_path!r}: {peft_type} transforms the layer's input or weight, so it must come "
            "before adapters of other methods at its site"
        )
    return y


def in_dtype_of(
    b: SiteBuilder, x: torch.fx.Node, param: torch.fx.Node, transform: Callable[[torch.fx.Node], torch.fx.Node]
) -> torch.fx.Node:
    """`transform(x)` computed in the adapter's dtype (fp32 over a bf16 base) and cast back, as PEFT does."""
    src, dst = dtype_of(x), dtype_of(param)
    return cast(b, transform(cast(b, x, src, dst)), dst, src)


def _size(b: SiteBuilder, x: torch.fx.Node, dim: int) -> int | torch.fx.Node:
    size = x.meta["val"].shape[dim]
    return size if isinstance(size, int) else b.call(aten.sym_size.int, x, dim)


def rotate_patches(
    b: SiteBuilder, x: torch.fx.Node, like: torch.fx.Node, kernel: tuple[int, int],
    rotate: Callable[[torch.fx.Node], torch.fx.Node],
) -> torch.fx.Node:
    """PEFT's Conv2d input transform: unfold x (B, C, H, W) (shaped as `like`) into its kh x kw patches
    (stride 1, no padding), `rotate` each patch flattened as (C, kh, kw), and fold them back into
    (B, C, H, W) by overlap-add. PEFT reads the rotated patches back in another order than it wrote
    them (a `view` of a permuted copy); that is reproduced, since it is the function PEFT computes."""
    kh, kw = kernel
    channels = like.meta["val"].shape[1]
    out_size = [_size(b, like, 2), _size(b, like, 3)]
    patches = b.call(aten.unfold.default, b.call(aten.unfold.default, x, 2, kh, 1), 3, kw, 1)  # B C H' W' kh kw
    patches = b.call(aten.flatten.using_ints, b.call(aten.permute.default, patches, [0, 2, 3, 1, 4, 5]), 3)
    patches = b.call(aten.unflatten.int, rotate(patches), 3, [channels, kh, kw])  # B H' W' C kh kw
    patches = b.call(aten.flatten.using_ints, b.call(aten.permute.default, patches, [0, 3, 1, 2, 4, 5]), 1)
    columns = b.call(aten.unflatten.int, patches, 1, [channels * kh * kw, -1])
    return b.call(aten.col2im.default, columns, out_size, [kh, kw], [1, 1], [0, 0], [1, 1])
