"""LoKr: y = base(x) + op(x, ΔW), ΔW = (W1 ⊗ W2) * alpha / r, op the site's linear/conv.

The base weight (out, in[, kernel]) is split as out = a*b, in = c*d by PEFT's `factorization`;
W1 is (a, c), W2 is (b, d[, kernel]). Either factor is a full matrix (`lokr_w1`, `lokr_w2`) or
a rank-r product (`lokr_w1_a @ lokr_w1_b`; `lokr_w2_a @ lokr_w2_b`, or a CP core `lokr_t2`
with `use_effective_conv2d`), by PEFT's rules: W2 is full when r >= max(b, d) / 2, W1 is
decomposed only with `decompose_both` and r < max(a, c) / 2. The forward, dropouts and fold
are the LyCORIS family's (passes/loha.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from peftc.errors import ConfigError
from peftc.graph import Call
from peftc.method import TensorKey, register_method

from .loha import KAIMING, ZEROS, Lycoris, LycorisConfig, ParamSpec, core_shape, effective_conv

aten = torch.ops.aten


@dataclass
class LoKrConfig(LycorisConfig):
    """PEFT's `LoKrConfig`, same fields and defaults."""

    peft_type_name: ClassVar[str] = "LOKR"

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (True, False, "lycoris"):
            raise ConfigError(f"init_weights must be true, false or 'lycoris' for LOKR, got {self.init_weights!r}")




def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (LyCORIS's) split of `dimension` into m * n.

    `factor` dividing the dimension gives (factor, dimension // factor) as is. Otherwise the
    divisors m of the dimension are walked upwards, up to `factor` (any, for -1), while m < n;
    the last pair taken is returned smaller first.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        nxt = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if nxt > limit:
            break
        m, n = nxt, dimension // nxt
    return min(m, n), max(m, n)


W1, W1A, W1B = ("lokr_w1", None), ("lokr_w1_a", None), ("lokr_w1_b", None)
W2, W2A, W2B, T2 = ("lokr_w2", None), ("lokr_w2_a", None), ("lokr_w2_b", None), ("lokr_t2", None)
# einsum of the CP core with its mode factors: (r, r, kh, kw), (r, b), (r, d) -> (b, d, kh, kw)
CP = "ijkl,ip,jr->prkl"


@register_method
class LoKr(Lycoris):
    peft_type = "LOKR"
    example_config = {"peft_type": "LOKR", "r": 2, "alpha": 4, "target_modules": ["lin0", "lin1"]}
    config_cls = LoKrConfig
    groups = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    scale_key = ("lokr_scaling", None)

    def rank_dropout_rescales(self, config: LoKrConfig) -> bool:
        return config.rank_dropout_scale

    def parameter_specs(self, config: LoKrConfig, r: int, weight_shape: tuple[int, ...]) -> list[ParamSpec]:
        out_dim, in_dim, *kernel = weight_shape  # a conv's in_dim is already in_channels // groups
        kernel = tuple(kernel)
        (a, b), (c, d) = factorization(out_dim, config.decompose_factor), factorization(in_dim, config.decompose_factor)
        init = config.init_weights
        # PEFT's default zeroes W1 (or W1a); "lycoris" zeroes W2 (or W2b) instead; False zeroes nothing
        w1_init = ZEROS if init is True else KAIMING
        w2_init = ZEROS if init == "lycoris" else KAIMING
        if config.decompose_both and r < max(a, c) / 2:
            specs = [(W1A, (a, r), w1_init), (W1B, (r, c), KAIMING)]
        else:
            specs = [(W1, (a, c), w1_init)]
        if r >= max(b, d) / 2:
            specs.append((W2, (b, d, *kernel), w2_init))
        elif effective_conv(config, kernel):
            specs += [(W2A, (r, b), KAIMING), (W2B, (r, d), w2_init), (T2, core_shape(r, kernel), KAIMING)]
        else:  # a conv's kernel is flattened into W2's input side
            specs += [(W2A, (b, r), KAIMING), (W2B, (r, d * math.prod(kernel)), w2_init)]
        return specs

    def delta_weight(self, call: Call, t: dict[TensorKey, Any], shape: list[int]) -> Any:
        w1 = t[W1] if W1 in t else call(aten.mm.default, t[W1A], t[W1B])
        if W2 in t:
            w2 = t[W2]
        elif T2 in t:
            w2 = call(aten.einsum.default, CP, [t[T2], t[W2A], t[W2B]])
        else:
            w2 = call(aten.mm.default, t[W2A], t[W2B])
        if T2 in t or (W2 in t and len(shape) == 4):  # a 4-d W2: W1 gets two unit kernel dims
            w1 = call(aten.unsqueeze.default, call(aten.unsqueeze.default, w1, 2), 2)
        # kron views its inputs, which a Conv1d's CP product (b, d, k, 1) with an odd stride on its unit dim
        # does not allow though it counts as contiguous: PEFT's `.contiguous()` keeps it and its forward
        # fails; a copy with standard strides gives the same values everywhere else
        w2 = call(aten.clone.default, w2, memory_format=torch.contiguous_format)
        # PEFT reshapes the Kronecker product to the base weight as is (a Conv1d's full W2 included)
        w = call(aten.mul.Tensor, call(aten.kron.default, w1, w2), t[self.scale_key])
        return call(aten.reshape.default, w, shape)
