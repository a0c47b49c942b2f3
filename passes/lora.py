"""LoRA: y = base(x) + B(A(dropout(x))) * scale, with scale = alpha / r (alpha / sqrt(r) for rsLoRA).

Parameters, names and initialisation follow PEFT's `lora.Linear`, `lora.Embedding` and
`lora.Conv2d` (transformers' Conv1D is a Linear stored transposed): same shapes, same
distributions, drawn in the same order. The scale is a tensor input of the graph, so changing
it never re-captures or recompiles.

Variants, as PEFT's config fields select them: `use_dora` (passes/dora.py), `lora_bias` (a bias
on B, scaled with it), and the inits that rewrite the base weight, PiSSA and OLoRA
(passes/lora_init.py), LoftQ (passes/lora_loftq.py), CorDA and LoRA-GA (passes/lora_corda.py,
passes/lora_ga.py: from statistics of the user's data), whose residual or dequantised base weight the
adapted model keeps as a new tensor.
The config's parts that are not factors beside an op are rewrites of their own, placed by the adapted
model: `target_parameters` (passes/lora_params.py), `trainable_token_indices` (passes/trainable_tokens.py)
and `modules_to_save` (passes/modules_to_save.py, a part of every method's config that has the field).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from peftc.config import AdapterConfig, LoraConfig
from peftc.errors import CheckpointError, ConfigError
from peftc.graph import cast, cast_like, dtype_of, eager
from peftc.method import (
    AdapterTensors,
    EmitContext,
    Method,
    MixedEmitContext,
    Target,
    TensorKey,
    adapter_dtype,
    register_method,
)
from peftc.targets import pattern_value

from .dora import CONV_DIMS, CONV_KINDS, MAGNITUDE, emit_dora, fold_dora, lora_weight, out_first, weight_norm
from .lora_arrow import START, emit_arrow, start_vector
from .lora_corda import corda_init
from .lora_factors import DIAG, bdlora_factor, bdlora_side, blocks, branch, dense_factors, kasa_init
from .lora_ga import loraga_init
from .lora_init import decompose, mica, orthogonal
from .lora_loftq import loftq
from .lora_mha import MHA, is_mha
from .lora_mixed import emit_mixed_lora
from .lora_monteclora import EXPERT_WEIGHTS, SAMPLER, VAR_PRIOR, advance, perturbed_a, sampler_tensors
from .lora_velora import EMBED, flags, init_embed, project, record_grad_mode

aten = torch.ops.aten

A, B = ("lora_A", "weight"), ("lora_B", "weight")
B_BIAS = ("lora_B", "bias")  # lora_bias=True
EMB_A, EMB_B = ("lora_embedding_A", None), ("lora_embedding_B", None)
SCALE = ("lora_scaling", None)
# the layers PEFT's inits that are not decompositions support (its Conv layers refuse them)
INIT_KINDS = {"orthogonal": ("linear", "conv1d", "embedding"), "mica": ("linear", "conv1d", "embedding")}
# the layers PEFT's LoRA variants with a sub-config support (its `lora_variants` of each layer class)
VARIANT_KINDS = {"arrow_config": ("linear", "conv1d"),
                 "kasa_config": ("linear",), "use_bdlora": ("linear",), "velora_config": ("linear", "conv1d"),
                 "monteclora_config": ("linear", "conv1d")}
ARROW = ("Arrow router (`arrow_config`: per-token top-k routing over the LoRA experts of a module, GenKnowSub; "
         "`peftc.create_arrow_model`)")


def lora_rank_alpha(config: LoraConfig, module_name: str) -> tuple[int, float]:
    r = pattern_value(config.rank_pattern, module_name, config.r)
    alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
    return r, alpha


def lora_scale(config: LoraConfig, r: int, alpha: float) -> float:
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def linear_like(shape: tuple[int, ...]) -> torch.Tensor:
    """A weight initialised like a fresh nn.Linear / nn.ConvNd (what PEFT's layers start from)."""
    w = torch.empty(shape)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    return w


def init_factors(init: bool | str, params: dict[TensorKey, torch.Tensor], r: int) -> None:
    """PEFT's `reset_lora_parameters` for factor pairs (A, B[, B's bias]) drawn like nn.Linear: A redrawn
    (Kaiming, or N(0, 1/r) for "gaussian"), B zero; False keeps the random draws."""
    if init is False:
        return
    if init is True:
        nn.init.kaiming_uniform_(params[A], a=math.sqrt(5))
    else:  # "gaussian"
        nn.init.normal_(params[A], std=1 / r)
    for key in (B, B_BIAS):
        if key in params:
            nn.init.zeros_(params[key])


def _bias_like(weight: torch.Tensor) -> torch.Tensor:
    """The bias a fresh nn.Linear / nn.ConvNd draws after `weight`: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(weight[0].numel())
    return torch.empty(weight.shape[0]).uniform_(-bound, bound)


def _factors(kind: str) -> tuple[TensorKey, TensorKey]:
    return (EMB_A, EMB_B) if kind == "embedding" else (A, B)


@register_method
class Lora(Method):
    peft_type = "LORA"
    example_config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lin0", "lin1"]}
    config_cls = LoraConfig
    groups = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_diag",
              "lora_velora_embed", SAMPLER, "trainable_tokens_delta")
    layer_types = {
        "linear": "nn.Linear",
        "conv1d": "transformers Conv1D",
        "embedding": "nn.Embedding",
        "conv2d": "nn.Conv2d",
        "nn_conv1d": "nn.Conv1d",
        "conv3d": "nn.Conv3d",
        "parameter": "nn.Parameter (2-D, 3-D expert stacks)",  # `target_parameters`: passes/lora_params.py
        MHA: "nn.MultiheadAttention",  # its two weights rebound inside it: passes/lora_mha.py, lora_params.py
    }
    site_ops = {
        "linear": ("linear",),
        "conv1d": ("addmm",),
        "embedding": ("embedding",),
        "conv2d": ("conv2d", "convolution"),
        "nn_conv1d": ("conv1d", "convolution"),
        "conv3d": ("conv3d", "convolution"),
        "parameter": (),  # not an op site: the parameter is rebound inside its module
        MHA: (),  # neither: in_proj_weight and out_proj.weight are rebound inside the module
    }
    variants = {
        "DoRA (`use_dora`)": ("linear", "conv1d", "embedding", "conv2d", "nn_conv1d", "conv3d"),
        "`lora_bias`": ("linear", "conv1d", "conv2d", "nn_conv1d", "conv3d"),
        "`bias=\"lora_only\"` / `\"all\"` (the base biases train, saved under PEFT's keys)": ("linear", "conv1d",
                                                                                                  "conv2d"),
        "PiSSA init (`init_lora_weights=\"pissa\"`)": ("linear", "conv1d"),
        "OLoRA init (`init_lora_weights=\"olora\"`)": ("linear",),
        "LoftQ init (`init_lora_weights=\"loftq\"`, `loftq_config`: NF4 / int8 in pure torch, the dequantised "
        "base weight)": ("linear",),
        "CorDA init (`init_lora_weights=\"corda\"` after `peftc.preprocess_corda`: SVD of W·C, C the inputs' "
        "covariance)": ("linear", "conv1d"),
        "LoRA-GA init (`init_lora_weights=\"lora_ga\"` after `peftc.preprocess_loraga`: SVD of the weight's "
        "gradient)": ("linear", "conv1d"),
        "orthogonal init (`init_lora_weights=\"orthogonal\"`; an embedding gets the default init, as in PEFT)":
            INIT_KINDS["orthogonal"],
        "MiCA (`init_lora_weights=\"mica\"`: B the minor singular vectors, frozen)": INIT_KINDS["mica"],
        "EVA init (`init_lora_weights=\"eva\"`, then `peftc.initialize_lora_eva_weights(am, dataloader)`: A the "
        "principal directions of each layer's inputs, ranks redistributed; an embedding gets the default init)":
            ("linear", "conv1d", "embedding"),
        "KaSA (`kasa_config`: a truncated base weight, a learned diagonal between A and B)":
            VARIANT_KINDS["kasa_config"],
        "BD-LoRA (`use_bdlora`: A or B block-diagonal)": VARIANT_KINDS["use_bdlora"],
        "VeLoRA (`velora_config`: A's gradient from compressed inputs; init_type 'batch_average', "
        "'batch_average_once' or 'random')":
            VARIANT_KINDS["velora_config"],
        "MonteCLoRA (`monteclora_config`: A a mixture of sampled perturbations in training; "
        "`_get_monteclora_loss()`, `peftc.MontecloraTrainerMixin`)":
            VARIANT_KINDS["monteclora_config"],
        ARROW: VARIANT_KINDS["arrow_config"],
        "`target_parameters` (W + ΔW inside the module; no mixed batches)": ("parameter",),
        "`trainable_token_indices` (rows of W; a tied head follows)": ("embedding",),
        "on an nn.MultiheadAttention (in_proj_weight and out_proj.weight, W + ΔW inside the module, once: PEFT "
        "0.21.2 adds out_proj's twice; no mixed batches)": (MHA,),
    }

    unmergeable_variants = frozenset({ARROW})

    def layer_kind(self, module: nn.Module) -> str | None:
        if is_mha(module):  # placed by the target_parameters part (passes/lora_params.py), not at an op
            return MHA
        if isinstance(module, nn.Linear):
            return "linear"
        if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            return "conv1d"
        if isinstance(module, nn.Embedding):
            return "embedding"
        for kind, cls in (("nn_conv1d", nn.Conv1d), ("conv2d", nn.Conv2d), ("conv3d", nn.Conv3d)):
            if isinstance(module, cls):
                return kind
        return None

    def own_targets(self, config: LoraConfig, model: nn.Module, found: list[Target]) -> list[Target]:
        # an nn.MultiheadAttention's weights are rebound inside it: passes/lora_params.py places them
        return [t for t in found if t.kind != MHA]

    def check_beside(self, config: LoraConfig, loaded: dict[str, AdapterConfig]) -> None:
        # KaSA truncates the base weight every adapter reads: PEFT refuses KaSA beside non-KaSA adapters
        for name, other in loaded.items():
            if other.peft_type == self.peft_type and (other.kasa_config is None) != (config.kasa_config is None):
                raise ConfigError(f"KaSA truncates the base weights: an adapter with kasa_config cannot be loaded "
                                  f"beside one without, as adapter {name!r} is")

    def reads_beside(self, config: LoraConfig) -> bool:
        return config.arrow_config is not None  # an Arrow router routes over the experts on its module

    def frozen(self, config: LoraConfig) -> frozenset[TensorKey]:
        # MiCA trains A only: B holds the base weight's minor singular vectors
        # VeLoRA's projection is a saved buffer in PEFT: a frozen parameter here, so checkpoints carry it
        # and so are MonteCLoRA's sampler buffers (written by each training call: passes/lora_monteclora.py)
        return frozenset({B, EMB_B} if config.init_method == "mica" else ()) | \
            frozenset({EMBED} if config.velora_config is not None else ()) | \
            frozenset({VAR_PRIOR, EXPERT_WEIGHTS} if config.monteclora_config is not None else ())

    def settings(self, config: LoraConfig, module_name: str) -> dict[str, float]:
        r, alpha = lora_rank_alpha(config, module_name)
        return {"r": r, "lora_alpha": alpha, "scale": lora_scale(config, r, alpha)}

    def create(self, config: LoraConfig, module_name: str, module: nn.Module, kind: str) -> AdapterTensors:
        r, alpha = lora_rank_alpha(config, module_name)
        scale = lora_scale(config, r, alpha)
        w = module.weight
        if kind == "embedding":
            fan_in, fan_out = w.shape  # (num_embeddings, dim)
        elif kind == "conv1d":
            fan_in, fan_out = w.shape  # Conv1D stores (in, out)
        elif kind in CONV_KINDS:
            fan_out, fan_in = w.shape[0], math.prod(w.shape[1:])
        else:
            fan_out, fan_in = w.shape
        init_method = config.init_method
        if init_method in ("orthogonal", "mica") and kind not in INIT_KINDS[init_method]:
            raise ConfigError(
                f"init_lora_weights={config.init_lora_weights!r} is not available for module {module_name!r} "
                f"({self.layer_types[kind]}): PEFT implements it for {', '.join(INIT_KINDS[init_method])} layers"
            )
        if init_method == "loftq" and kind != "linear":
            raise ConfigError(
                f"init_lora_weights='loftq' is not available for module {module_name!r} ({self.layer_types[kind]}): "
                "PEFT's LoftQ works on nn.Linear only (its Embedding and Conv layers call loftq_init without the "
                "config and fail; on a transformers Conv1D it decomposes the stored (in, out) weight, so its factors "
                "come out transposed)"
            )
        if init_method == "eva" and kind in CONV_KINDS:
            raise ConfigError(
                f"init_lora_weights='eva' is not available for module {module_name!r} ({self.layer_types[kind]}): "
                "PEFT's EVA covers nn.Linear and transformers Conv1D (its convolution layers reject the init)"
            )
        if init_method == "orthogonal" and r % 2:
            raise ConfigError(f"r={r} for module {module_name!r}: init_lora_weights='orthogonal' needs an even rank")
        # any other r is valid, as in PEFT (its own tests use r above a layer's size); only a decomposition of W
        # (or of its gradient: LoRA-GA takes 2r components) cannot give more than min(in, out) components
        taken = {"pissa": r, "olora": r, "mica": r, "corda": r, "loftq": r, "lora_ga": 2 * r}.get(init_method, 0)
        data_driven = init_method in ("corda", "lora_ga")  # their other layers get the default init, or an error
        if taken > min(fan_in, fan_out) and (kind in ("linear", "conv1d") or not data_driven):
            raise ConfigError(
                f"r={r} for module {module_name!r} ({self.layer_types[kind]} {tuple(w.shape)}): "
                f"init_lora_weights={config.init_lora_weights!r} takes {taken} components of the "
                f"{'gradient' if init_method == 'lora_ga' else 'weight'}, which has only {min(fan_in, fan_out)}"
            )
        variant = next((name for name in VARIANT_KINDS if getattr(config, name) is not None), None)
        if variant and kind not in VARIANT_KINDS[variant]:
            raise ConfigError(f"{variant} for module {module_name!r} ({self.layer_types[kind]}): PEFT implements "
                              f"this variant for {', '.join(self.layer_types[k] for k in VARIANT_KINDS[variant])} only")
        init, base = config.init_lora_weights, {}
        drawn: dict[TensorKey, torch.Tensor] = {}  # MonteCLoRA's pre-drawn samples (run-time tensors)
        if kind == "embedding":
            if config.lora_bias:
                raise ConfigError(f"lora_bias=True for module {module_name!r}: PEFT has no bias for Embedding LoRA")
            a, b = torch.randn(r, fan_in), torch.randn(fan_out, r)
            if init_method == "mica":
                a, b = mica(kind, w, r)
            elif init is not False:  # also for PiSSA/OLoRA/orthogonal, which PEFT's Embedding does not implement
                nn.init.zeros_(a)
                nn.init.normal_(b)
            params = {EMB_A: a, EMB_B: b}
        else:
            if kind in CONV_KINDS:
                conv = type(module).__name__
                if fan_out % module.groups or r % module.groups:
                    raise ConfigError(
                        f"r={r} for module {module_name!r}: PEFT's LoRA for a {conv} with groups={module.groups} "
                        "needs r divisible by groups"
                    )
                a = linear_like((r, w.shape[1] * module.groups, *w.shape[2:]))
                b = linear_like((fan_out, r // module.groups, *[1] * (w.dim() - 2)))
            else:
                a, b = linear_like((r, fan_in)), linear_like((fan_out, r))
            params = {A: a, B: b}
            if config.lora_bias:
                params[B_BIAS] = _bias_like(b)
            if init_method in ("pissa", "olora"):
                params[A], params[B], base["weight"] = decompose(config, module_name, kind, w, r, scale)
            elif init_method == "loftq":
                bits, iters = config.loftq_config["loftq_bits"], config.loftq_config["loftq_iter"]
                if bits == 8 and w.detach().abs().max() > torch.finfo(torch.float16).max:
                    raise ConfigError(f"loftq_config['loftq_bits']=8 for module {module_name!r}: int8 LoftQ casts the "
                                      "weight to fp16 as bitsandbytes does, and this weight has values beyond fp16's "
                                      "range (they would quantise to NaN)")
                params[A], params[B], base["weight"] = loftq(w, bits, r, iters)
            elif init_method == "orthogonal":
                params[A], params[B] = orthogonal(fan_in, fan_out, r, w.dtype)
            elif init_method == "mica":
                params[A], params[B] = mica(kind, w, r)
            elif init_method == "eva":  # A keeps its draw until initialize_lora_eva_weights sets it from data
                nn.init.zeros_(params[B])
            elif init_method == "corda":
                params[A], params[B], base["weight"] = corda_init(module_name, kind, w, r, scale)
            elif init_method == "lora_ga" and kind in ("linear", "conv1d") and \
                    (ga := loraga_init(config, module_name, kind, w, r, scale)) is not None:
                params[A], params[B], base["weight"] = ga
            else:  # also LoRA-GA on a conv layer, or without gradients: PEFT's default init (True)
                init_factors(True if init_method == "lora_ga" else config.init_lora_weights, params, r)
            # the variants' own init follows the factors', in PEFT's order (LoraVariant.init)
            side = bdlora_side(config, module_name) if config.use_bdlora is not None else None
            if side is not None:
                key = A if side == "A" else B
                params[key] = bdlora_factor(config, module_name, side, tuple(params[key].shape), w.dtype)
            if config.kasa_config is not None:
                params[DIAG], base["weight"] = kasa_init(module_name, w, r, w.dtype)
            if config.velora_config is not None:
                params[EMBED] = init_embed(fan_in, config.velora_config, w.dtype)
            if config.monteclora_config is not None:  # its parameters, and the samples PEFT pre-draws here
                sampler, drawn = sampler_tensors(config.monteclora_config, fan_in, r, w.device, w.dtype)
                params.update(sampler)
        # PEFT keeps float adapters in fp32 over a bf16/fp16 base (autocast_adapter_dtype)
        dtype = adapter_dtype(w)
        params = {k: v.to(device=w.device, dtype=dtype) for k, v in params.items()}
        scale = torch.tensor(scale, dtype=dtype, device=w.device)
        buffers = {SCALE: scale, **drawn}
        if config.velora_config is not None:
            buffers.update(flags(config.velora_config, w.device))
        if config.arrow_config is not None:  # (the router's own A and B are created and saved, as PEFT's, unused)
            buffers[START] = start_vector(config.arrow_config, fan_in, w.device)
        if config.use_dora:  # m starts at the norm of the (residual) base weight plus the initial update
            key_a, key_b = _factors(kind)
            lw = lora_weight(eager, kind, params[key_a], params[key_b])
            params[MAGNITUDE] = weight_norm(eager, kind, base.get("weight", w).detach().to(dtype), lw, scale)
        return AdapterTensors(params=params, buffers=buffers, base=base)

    def emit(self, ctx: EmitContext) -> torch.fx.Node:
        b, site, y, kind = ctx.builder, ctx.site, ctx.y, ctx.kind
        tensors, config, training = ctx.tensors, ctx.config, ctx.training
        scale = tensors[SCALE]
        key_a, key_b = _factors(kind)
        dropped = training and config.lora_dropout > 0 and kind != "embedding"  # PEFT's Embedding has no dropout
        if config.arrow_config is not None:
            return emit_arrow(ctx, (A, B, SCALE), _in_features(site, kind))
        x = site.input if kind == "embedding" else cast_like(b, site.input, tensors[A])
        if dropped:
            x = b.call(aten.dropout.default, x, config.lora_dropout, True)
        if kind == "embedding":
            a_t = b.call(aten.t.default, tensors[EMB_A])
            h = b.call(aten.embedding.default, a_t, x, *site.node.args[2:])
            h = b.call(aten.matmul.default, h, b.call(aten.t.default, tensors[EMB_B]))
        elif kind in CONV_KINDS:
            # PEFT's lora_A: the base conv's kernel, stride and padding (not its dilation); lora_B: 1x1, grouped
            d = CONV_DIMS[kind]
            stride, padding = _conv_geometry(site.node, d)
            groups = _conv_groups(site.node)
            conv = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)[d - 1]
            h = b.call(conv, x, tensors[A], None, stride, padding)
            h = b.call(conv, h, tensors[B], tensors.get(B_BIAS), [1] * d, [0] * d, [1] * d, groups)
        elif config.monteclora_config is not None and training:  # A perturbed by this call's sample
            h = b.call(aten.linear.default, x, perturbed_a(b, tensors, config.monteclora_config, tensors[A]))
            h = b.call(aten.linear.default, h, tensors[B], tensors.get(B_BIAS))
        elif config.velora_config is not None and training:  # A's gradient from compressed activations
            h = project(b, x, tensors, A, config.velora_config, _in_features(site, kind))
            h = b.call(aten.linear.default, h, tensors[B], tensors.get(B_BIAS))
        elif not training and not config.use_dora and _plain(tensors, _in_features(site, kind)):
            # inference: B·s, not every activation, takes the scale; it depends on the adapter alone, so the
            # eager lowering computes it once (passes/hoist_invariants.py) and each call saves a multiply
            h = b.call(aten.linear.default, x, tensors[A])
            h = b.call(aten.linear.default, h, b.call(aten.mul.Tensor, tensors[B], scale))
            return b.call(aten.add.Tensor, y, cast(b, h, dtype_of(scale), dtype_of(y)))
        else:  # (KaSA's diagonal and BD-LoRA's blocks, where the config has them)
            h = branch(b.call, x, tensors, (A, B, B_BIAS), _in_features(site, kind))
        if config.use_dora:
            lw = lora_weight(b.call, kind, tensors[key_a], tensors[key_b])
            return emit_dora(b, site, y, kind, x, h, lw, tensors[MAGNITUDE], scale, dropped)
        # the delta is in the adapter's dtype (fp32 over a bf16/fp16 base): cast back, as PEFT does
        delta = cast(b, b.call(aten.mul.Tensor, h, scale), dtype_of(scale), dtype_of(y))
        return b.call(aten.add.Tensor, y, delta)

    def runs_before_call(self, config: LoraConfig) -> bool:
        return config.monteclora_config is not None or (config.velora_config or {}).get("init_type") in (
            "batch_average", "batch_average_once")

    def before_call(self, config: LoraConfig, tensors: dict[TensorKey, torch.Tensor], training: bool) -> None:
        if training and config.monteclora_config is not None:
            advance(config.monteclora_config, tensors)  # the sample this call reads, as PEFT's sampler draws it
        if training and config.velora_config is not None:
            record_grad_mode(tensors)

    def emit_mixed(self, ctx: MixedEmitContext) -> torch.fx.Node | None:
        if any(slot is not None and slot[1].arrow_config is not None for slot in ctx.slots):
            return None  # an Arrow router runs on the whole batch in the generic per-sample form
        # in training, MonteCLoRA draws one sample per module and call (PEFT refuses adapter_names in training too),
        # and PEFT computes VeLoRA's batch projection per adapter's sub-batch: peftc's forms see the whole batch
        for field in ("monteclora_config", "velora_config"):
            if ctx.training and any(slot is not None and getattr(slot[1], field) is not None for slot in ctx.slots):
                raise ConfigError(f"mixed batches (adapter_names) in training are not supported with {field}, nor "
                                  "peftc.backends.compile's training graphs (one adapter run as a mixed batch); train "
                                  "one adapter at a time in the eager model, or run mixed batches in eval mode")
        if ctx.kind not in ("linear", "conv1d") or any(
                slot is not None and (slot[1].kasa_config is not None or slot[1].use_bdlora is not None)
                for slot in ctx.slots):
            return None  # embeddings, convs and the variants that reshape the factors take the generic form
        return emit_mixed_lora(ctx, (A, B, SCALE))

    def fold(
        self,
        kind: str,
        config: LoraConfig,
        module: nn.Module,
        tensors: dict[TensorKey, torch.Tensor],
        base: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        if config.arrow_config is not None:
            raise ConfigError("cannot merge an Arrow router (arrow_config): it picks its experts per token, so no one "
                              "weight equals it (PEFT refuses too: 'Cannot merge an active Arrow router adapter'); "
                              "keep it unmerged, or merge the experts themselves")
        if kind in CONV_KINDS and module.groups > 1:
            raise ConfigError(
                f"cannot merge LoRA into a {type(module).__name__} with groups={module.groups}: the adapter's update "
                "is not a grouped kernel (PEFT's merge is not exact there either); keep the adapter unmerged"
            )
        scale = tensors[SCALE]
        key_a, key_b = _factors(kind)
        if kind == "linear":  # B·A as `branch` applies it (KaSA's diagonal and BD-LoRA's blocks made dense)
            lw = torch.mm(*reversed(dense_factors(tensors, (A, B), base["weight"].shape[1])))
        else:
            lw = lora_weight(eager, kind, tensors[key_a], tensors[key_b])
        merged = base["weight"] + out_first(eager, kind, lw) * scale
        if config.use_dora:
            merged = fold_dora(kind, merged, base["weight"], lw, tensors[MAGNITUDE], scale)
        out = {"weight": merged}
        if B_BIAS in tensors:
            if "bias" not in base:
                raise ConfigError(
                    f"cannot merge lora_bias=True into a {type(module).__name__} without a bias (PEFT cannot either); "
                    "keep the adapter unmerged"
                )
            out["bias"] = base["bias"] + tensors[B_BIAS] * scale
        return out

    def subtract_mutated_init(
        self,
        config: LoraConfig,
        tensors: dict[TensorKey, torch.Tensor],
        initial: dict[TensorKey, torch.Tensor],
    ) -> dict[TensorKey, torch.Tensor]:
        # W_res + s·BA = W + s·(BA - B0·A0) = W + s·[B | -B0]·[A ; A0]: a LoRA of twice the rank
        if config.init_method == "loftq":
            # LoftQ's base is Q(W), and W + s·(BA - B0·A0) is Q(W) + s·BA only up to LoftQ's approximation error
            raise CheckpointError("a LoftQ adapter has no exact conversion against its initial adapter: its base is "
                                  "the dequantised weight, not the original one (PEFT warns and writes an "
                                  "approximation); save it as it is, with the dequantised base model")
        variants = [name for name in ("use_dora", "lora_bias", *VARIANT_KINDS) if getattr(config, name)]
        if variants:
            raise CheckpointError(f"only plain LoRA adapters convert against their initial adapter (this one has "
                                  f"{', '.join(variants)})")
        out = {}
        for key, value in tensors.items():
            rows = key in (A, EMB_A)
            out[key] = torch.cat([value, initial[key] if rows else -initial[key]], dim=0 if rows else 1)
        return out

    def subtracted_config(self, config: LoraConfig) -> LoraConfig:
        # twice the rank at the same scale; init True, so loading it decomposes nothing
        factor = math.sqrt(2) if config.use_rslora else 2
        return dataclasses.replace(
            config,
            init_lora_weights=True,
            r=2 * config.r,
            lora_alpha=config.lora_alpha * factor,
            rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
            alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
        )


def _plain(tensors: dict[TensorKey, Any], in_features: int) -> bool:
    """Dense A and B, no diagonal, no bias on B: the update is B·A alone."""
    return DIAG not in tensors and B_BIAS not in tensors and blocks(tensors[A], tensors[B], in_features) == (1, 1)


def _in_features(site: Any, kind: str) -> int:
    """The input features of a linear / Conv1D site, from its weight (stored (out, in) / (in, out))."""
    shape = site.weight.meta["val"].shape
    return shape[0] if kind == "conv1d" else shape[1]


def _conv_geometry(node: torch.fx.Node, dims: int) -> tuple[list[int], list[int]]:
    """stride and padding of convNd(x, w, b, stride, padding, ...) / convolution(...), defaults filled in."""
    args = node.args
    return list(args[3]) if len(args) > 3 else [1] * dims, list(args[4]) if len(args) > 4 else [0] * dims


def _conv_groups(node: torch.fx.Node) -> int:
    if node.target == aten.convolution.default:  # (x, w, b, stride, padding, dilation, transposed, out_pad, groups)
        return node.args[8]
    return node.args[6] if len(node.args) > 6 else 1
