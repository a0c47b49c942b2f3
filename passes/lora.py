"""LoRA: y = base(x) + B(A(dropout(x))) * scale, with scale = alpha / r (alpha / sqrt(r) for rsLoRA).

Parameters, names and initialisation follow PEFT's `lora.Linear`, `lora.Embedding` and
`lora.Conv2d` (transformers' Conv1D is a Linear stored transposed): same shapes, same
distributions, drawn in the same order. The scale is a tensor input of the graph, so changing
it never re-captures or recompiles.
"""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn as nn

from peftc.config import LoraConfig
from peftc.errors import ConfigError
from peftc.graph import SiteBuilder
from peftc.method import AdapterTensors, Method, TensorKey
from peftc.sites import Site
from peftc.targets import pattern_value

aten = torch.ops.aten

A, B = ("lora_A", "weight"), ("lora_B", "weight")
EMB_A, EMB_B = ("lora_embedding_A", None), ("lora_embedding_B", None)
SCALE = ("lora_scaling", None)


def lora_rank_alpha(config: LoraConfig, module_name: str) -> tuple[int, float]:
    r = pattern_value(config.rank_pattern, module_name, config.r)
    alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
    return r, alpha


def lora_scale(config: LoraConfig, r: int, alpha: float) -> float:
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def _linear_like(shape: tuple[int, ...]) -> torch.Tensor:
    """A weight initialised like a fresh nn.Linear / nn.ConvNd (what PEFT's layers start from)."""
    w = torch.empty(shape)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    return w


class Lora(Method):
    peft_type = "LORA"
    config_cls = LoraConfig
    groups = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
    layer_types = {
        "linear": "nn.Linear",
        "conv1d": "transformers Conv1D",
        "embedding": "nn.Embedding",
        "conv2d": "nn.Conv2d",
    }
    site_ops = {
        "linear": ("linear",),
        "conv1d": ("addmm",),
        "embedding": ("embedding",),
        "conv2d": ("conv2d", "convolution"),
    }

    def layer_kind(self, module: nn.Module) -> str | None:
        if isinstance(module, nn.Linear):
            return "linear"
        if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            return "conv1d"
        if isinstance(module, nn.Embedding):
            return "embedding"
        if isinstance(module, nn.Conv2d):
            return "conv2d"
        return None

    def create(self, config: LoraConfig, module_name: str, module: nn.Module, kind: str) -> AdapterTensors:
        r, alpha = lora_rank_alpha(config, module_name)
        w = module.weight
        if kind == "embedding":
            fan_in, fan_out = w.shape  # (num_embeddings, dim)
        elif kind == "conv1d":
            fan_in, fan_out = w.shape  # Conv1D stores (in, out)
        elif kind == "conv2d":
            fan_out, fan_in = w.shape[0], w.shape[1] * w.shape[2] * w.shape[3]
        else:
            fan_out, fan_in = w.shape
        if r > min(fan_in, fan_out):
            raise ConfigError(
                f"r={r} for module {module_name!r} ({self.layer_types[kind]} {tuple(w.shape)}) is larger than "
                f"the layer's dimensions ({fan_in} in, {fan_out} out): the update could not be low-rank"
            )
        init = config.init_lora_weights
        if kind == "embedding":
            a, b = torch.randn(r, fan_in), torch.randn(fan_out, r)
            if init is not False:
                nn.init.zeros_(a)
                nn.init.normal_(b)
            params = {EMB_A: a, EMB_B: b}
        else:
            if kind == "conv2d":
                if fan_out % module.groups or r % module.groups:
                    raise ConfigError(
                        f"r={r} for module {module_name!r}: PEFT's LoRA for a Conv2d with groups={module.groups} "
                        "needs r divisible by groups"
                    )
                a = _linear_like((r, w.shape[1] * module.groups, *w.shape[2:]))
                b = _linear_like((fan_out, r // module.groups, 1, 1))
            else:
                a, b = _linear_like((r, fan_in)), _linear_like((fan_out, r))
            if init is True:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            elif isinstance(init, str):  # "gaussian"
                nn.init.normal_(a, std=1 / r)
            if init is not False:
                nn.init.zeros_(b)
            params = {A: a, B: b}
        # PEFT keeps float adapters in fp32 over a bf16/fp16 base (autocast_adapter_dtype)
        dtype = w.dtype if w.dtype == torch.float64 else torch.float32
        params = {k: v.to(device=w.device, dtype=dtype) for k, v in params.items()}
        scale = torch.tensor(lora_scale(config, r, alpha), dtype=dtype, device=w.device)
        return AdapterTensors(params=params, buffers={SCALE: scale})

    def emit(
        self,
        b: SiteBuilder,
        site: Site,
        y: torch.fx.Node,
        kind: str,
        tensors: dict[TensorKey, torch.fx.Node],
        config: LoraConfig,
        training: bool,
    ) -> torch.fx.Node:
        scale = tensors[SCALE]
        if kind == "embedding":
            a_t = b.call(aten.t.default, tensors[EMB_A])
            h = b.call(aten.embedding.default, a_t, site.input, *site.node.args[2:])
            h = b.call(aten.matmul.default, h, b.call(aten.t.default, tensors[EMB_B]))
        else:
            x = _cast_like(b, site.input, tensors[A])
            if training and config.lora_dropout > 0:
                x = b.call(aten.dropout.default, x, config.lora_dropout, True)
            if kind == "conv2d":
                stride, padding = _conv_geometry(site.node)
                groups = _conv_groups(site.node)
                h = b.call(aten.conv2d.default, x, tensors[A], None, stride, padding)
                h = b.call(aten.conv2d.default, h, tensors[B], None, [1, 1], [0, 0], [1, 1], groups)
            else:
                h = b.call(aten.linear.default, b.call(aten.linear.default, x, tensors[A]), tensors[B])
        # the delta is in the adapter's dtype (fp32 over a bf16/fp16 base): cast back, as PEFT does
        delta = _cast(b, b.call(aten.mul.Tensor, h, scale), _dtype(scale), _dtype(y))
        return b.call(aten.add.Tensor, y, delta)

    def fold(
        self,
        kind: str,
        config: LoraConfig,
        module: nn.Module,
        tensors: dict[TensorKey, torch.Tensor],
        base: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        scale = tensors[SCALE]
        if kind == "embedding":  # weight (num, dim) = (B @ A).T
            delta = (tensors[EMB_B] @ tensors[EMB_A]).T
        elif kind == "conv2d":
            delta = _conv_delta(module, tensors[A], tensors[B])
        else:
            delta = tensors[B] @ tensors[A]
            if kind == "conv1d":  # Conv1D stores its weight as (in, out)
                delta = delta.T
        return {"weight": base["weight"] + delta * scale}


def _conv_delta(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The weight-space update of conv(conv(x, A), B): B (out, r, 1, 1) composed with A (r, in, kh, kw)."""
    if module.groups > 1:
        raise ConfigError(
            f"cannot merge LoRA into a Conv2d with groups={module.groups}: the adapter's update is not a "
            "grouped kernel (PEFT's merge is not exact there either); keep the adapter unmerged"
        )
    return torch.einsum("or,rikl->oikl", b.flatten(1), a)


def _dtype(node: torch.fx.Node) -> torch.dtype | None:
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else None


def _cast(b: SiteBuilder, x: torch.fx.Node, src: torch.dtype | None, dst: torch.dtype | None) -> torch.fx.Node:
    if src is None or dst is None or src == dst:
        return x
    return b.call(aten.to.dtype, x, dst)


def _cast_like(b: SiteBuilder, x: torch.fx.Node, like: torch.fx.Node) -> torch.fx.Node:
    """Cast `x` to `like`'s dtype where they differ (fp32 adapters over a low-precision base)."""
    return _cast(b, x, _dtype(x), _dtype(like))


def _conv_geometry(node: torch.fx.Node) -> tuple[list[int], list[int]]:
    """stride and padding of conv2d(x, w, b, stride, padding, ...) / convolution(...), defaults filled in."""
    args = node.args
    return list(args[3]) if len(args) > 3 else [1, 1], list(args[4]) if len(args) > 4 else [0, 0]


def _conv_groups(node: torch.fx.Node) -> int:
    if node.target == aten.convolution.default:  # (x, w, b, stride, padding, dilation, transposed, out_pad, groups)
        return node.args[8]
    return node.args[6] if len(node.args) > 6 else 1
