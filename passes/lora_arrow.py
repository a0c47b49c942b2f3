"""Arrow: a LoRA adapter with `arrow_config` is a router over the LoRA experts placed on the same module.

PEFT's `ArrowLoraLinearLayer` (peft/tuners/lora/arrow.py), per token x at each adapted Linear:

    p_e    = top right singular vector of B_e·A_e (15 power-iteration steps in fp32 from one seeded
             random vector), for each expert e: the prototypes
    s_e    = |x · p_e|, the k largest kept, softmax(s / router_temperature) over them: coefficients c_e
    delta  = Σ_e c_e · scale_e · B_e A_e x      (then the router's lora_dropout), y' = y + delta

The experts at a module are its LoRA adapters other than routers and the general adapters (PEFT's rule:
names `gks_<n>`, and those the config lists), in the order they were placed. With `use_gks` (GenKnowSub)
the mean A and mean B of the general adapters are subtracted from each expert's A and B first. PEFT does
that in place, once, on the experts' parameters at the first forward, and caches the prototypes in a
buffer; here both are nodes of the router's graph, so the loaded experts keep their values (saving one
writes what was loaded) and an inference graph computes them once (the hoisting stage keeps what depends
on adapter tensors alone) while a changed or hot-swapped expert is read afresh. The prototypes are
computed from detached factors, as PEFT's buffer is: no gradient flows through the routing's prototypes.

The power iteration's start vector is drawn when the router is created: from `rng_seed` (a generator
on the weight's device, as PEFT seeds one per expert, so every expert starts from the same vector) or,
without a seed, from torch's global generator (PEFT draws per expert at its first forward; both are
a random start of a converging iteration, not reproducible in PEFT either).
"""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
import torch.fx

from peftc.config import AdapterConfig
from peftc.errors import ConfigError
from peftc.graph import Call, cast, cast_like, dtype_of, shape_of
from peftc.method import EmitContext, TensorKey

aten = torch.ops.aten

START = ("lora_arrow_start", None)  # the power iteration's start vector (a run-time buffer, not saved)
ITERATIONS, EPS = 15, 1e-8  # PEFT's top_right_singular_vec_from_BA defaults
GKS_NAME = re.compile(r"gks_\d+")  # PEFT's on_adapter_change never counts these as task experts


def start_vector(arrow: dict[str, Any], in_features: int, device: torch.device) -> torch.Tensor:
    """The fp32 start vector of the prototypes' power iteration, drawn as PEFT draws it."""
    seed = arrow["rng_seed"]
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device.type)
        gen.manual_seed(int(seed))
    return torch.randn(in_features, dtype=torch.float32, device=device, generator=gen)


def prototypes(call: Call, a: Any, b: Any, start: Any, experts: int, dtype: torch.dtype | None) -> Any:
    """The top right singular vector of each B_e·A_e, rows of (E, in), by power iteration on Aᵀ(BᵀB)A in fp32
    (PEFT's numerics, batched over the experts): `a` (E, r, in), `b` (E, out, r), `start` (in,), E = `experts`
    (a number: a size read from the graph would keep the computation from being hoisted as an invariant)."""
    a = call(aten._to_copy.default, a, dtype=torch.float32)
    b = call(aten._to_copy.default, b, dtype=torch.float32)
    gram = call(aten.bmm.default, call(aten.transpose.int, b, 1, 2), b)  # (E, r, r)
    v = call(aten.div.Tensor, start, call(aten.add.Scalar, call(aten.linalg_vector_norm.default, start), EPS))
    v = call(aten.expand.default, call(aten.reshape.default, v, [1, -1, 1]), [experts, -1, 1])  # (E, in, 1)
    a_t = call(aten.transpose.int, a, 1, 2)
    for _ in range(ITERATIONS):
        w = call(aten.bmm.default, a_t, call(aten.bmm.default, gram, call(aten.bmm.default, a, v)))
        norm = call(aten.linalg_vector_norm.default, w, 2, [1], True)
        v = call(aten.div.Tensor, w, call(aten.add.Scalar, norm, EPS))
    v = call(aten.squeeze.dim, v, 2)
    return v if dtype in (None, torch.float32) else call(aten._to_copy.default, v, dtype=dtype)


def experts_of(ctx: EmitContext) -> tuple[list[tuple[str, dict[TensorKey, torch.fx.Node]]],
                                          list[tuple[str, dict[TensorKey, torch.fx.Node]]]]:
    """The task experts and the general (GKS) adapters beside the router at this module."""
    arrow = ctx.config.arrow_config
    general_names = arrow["gks_adapter_names"] or []
    lora = [(name, config, tensors) for name, config, tensors in ctx.beside if _is_lora(config)]
    experts = [(name, tensors) for name, config, tensors in lora
               if config.arrow_config is None and name not in general_names and not GKS_NAME.fullmatch(name)]
    general = []
    if arrow["use_gks"]:
        by_name = {name: tensors for name, _, tensors in lora}
        missing = [name for name in general_names if name not in by_name]
        if missing:
            raise ConfigError(f"arrow_config['gks_adapter_names']: no LoRA adapter {missing} on module "
                              f"{ctx.builder.tag[0]!r}; load the general adapters first (create_arrow_model does)")
        general = [(name, by_name[name]) for name in general_names]
    return experts, general


def _is_lora(config: AdapterConfig) -> bool:
    return config.peft_type == "LORA"


def emit_arrow(ctx: EmitContext, keys: tuple[TensorKey, TensorKey, TensorKey], in_features: int) -> torch.fx.Node:
    """y + Σ_e c_e(x) · scale_e · B_e A_e x at a Linear / Conv1D site (see the module's docstring); `keys`
    are LoRA's (A, B, scale) tensor keys."""
    b, site, y, config = ctx.builder, ctx.site, ctx.y, ctx.config
    arrow, module = config.arrow_config, ctx.builder.tag[0]
    key_a, key_b, key_scale = keys
    experts, general = experts_of(ctx)
    if not experts:
        raise ConfigError(f"arrow_config: the Arrow router {ctx.builder.tag[1]!r} has no LoRA expert on module "
                          f"{module!r}: load the task adapters first (peftc.create_arrow_model does)")
    shapes = {name: (t[key_a].meta["val"].shape, t[key_b].meta["val"].shape) for name, t in experts + general}
    if len(set(shapes.values())) > 1:
        raise ConfigError(f"arrow_config: the LoRA experts on module {module!r} differ in rank or shape "
                          f"({ {n: [tuple(s) for s in v] for n, v in shapes.items()} }); Arrow stacks them, as "
                          "PEFT's create_arrow_model requires one rank and shape")
    if arrow["top_k"] > len(experts):
        raise ConfigError(f"arrow_config['top_k']={arrow['top_k']} but module {module!r} has {len(experts)} "
                          f"expert(s) ({[n for n, _ in experts]}); PEFT's torch.topk fails there too")
    first = experts[0][1]
    rank = first[key_a].meta["val"].shape[0]
    out_features = first[key_b].meta["val"].shape[0]
    count = len(experts)

    def stacked(key: TensorKey, adapters: list[tuple[str, dict[TensorKey, torch.fx.Node]]]) -> torch.fx.Node:
        return b.call(aten.stack.default, [t[key] for _, t in adapters])

    a, bb = stacked(key_a, experts), stacked(key_b, experts)  # (E, r, in), (E, out, r)
    if general:  # GenKnowSub: the general adapters' mean A and mean B subtracted from every expert's
        a = b.call(aten.sub.Tensor, a, b.call(aten.mean.dim, stacked(key_a, general), [0]))
        bb = b.call(aten.sub.Tensor, bb, b.call(aten.mean.dim, stacked(key_b, general), [0]))
    protos = prototypes(b.call, b.call(aten.detach.default, a), b.call(aten.detach.default, bb),
                        ctx.tensors[START], len(experts), dtype_of(first[key_a]))  # (E, in)

    x = cast_like(b, site.input, first[key_a])
    tok = b.call(aten.reshape.default, x, [-1, in_features])  # (t, in)
    sim = b.call(aten.abs.default, b.call(aten.mm.default, tok, b.call(aten.t.default, protos)))  # (t, E)
    top = b.call(aten.topk.default, sim, arrow["top_k"], 1)
    top_v, top_i = b.call(operator.getitem, top, 0), b.call(operator.getitem, top, 1)
    # the experts outside the top k get -inf: a softmax over all E gives them 0
    full = b.call(aten.full_like.default, sim, float("-inf"))
    full = b.call(aten.scatter.src, full, 1, top_i, top_v)
    coeff = b.call(aten._softmax.default, b.call(aten.div.Tensor, full, float(arrow["router_temperature"])), 1, False)
    weights = b.call(aten.mul.Tensor, coeff, stacked(key_scale, experts))  # c_e · scale_e, (t, E)
    # Σ_e w_e B_e A_e x as two matmuls over the experts side by side: [A_1; ...; A_E] x, each expert's r rows
    # weighted, then [B_1 ... B_E]
    z = b.call(aten.mm.default, tok, b.call(aten.t.default, b.call(aten.reshape.default, a, [count * rank, -1])))
    z = b.call(aten.mul.Tensor, b.call(aten.reshape.default, z, [-1, count, rank]),
               b.call(aten.unsqueeze.default, weights, 2))
    b_cols = b.call(aten.reshape.default, b.call(aten.permute.default, bb, [0, 2, 1]), [count * rank, out_features])
    delta = b.call(aten.mm.default, b.call(aten.reshape.default, z, [-1, count * rank]), b_cols)  # (t, out)
    if ctx.training and config.lora_dropout > 0:  # PEFT drops out the routed delta, with the router's p
        delta = b.call(aten.dropout.default, delta, config.lora_dropout, True)
    # (the site's op gives the shape and dtype: `y` may be a previous adapter's sum, without metadata)
    delta = b.call(aten.reshape.default, delta, shape_of(b, site.node))
    return b.call(aten.add.Tensor, y, cast(b, delta, dtype_of(first[key_a]), dtype_of(site.node)))
