"""LoRA on raw parameters (`target_parameters`): a parameter used by any op (an MoE expert stack read
by bmm / einsum / indexing) is replaced, inside its module, by W + s·ΔW.

This is PEFT's `lora.ParamWrapper`, as a rewrite at the parameter's placeholder instead of a
parametrization: the uses of the placeholder by nodes traced inside the owning module read the
adapted weight; uses elsewhere (a tied copy) keep the base tensor, as PEFT's parametrization is only
active during the module's forward. Folding is the same rebinding, to W + ΔW computed once.

Shapes and order are PEFT's: a 2-D parameter (out, in) gets lora_A (r, in), lora_B (out, r); a 3-D
expert stack (E, d1, d2) gets lora_A (r·E, d2), lora_B (d1, r·E), expert e using A's rows e·r..e·r+r
and B's columns e, e+E, ... (ΔW[e] = B_e·A_e); a module with `is_transposed = True` stores its experts
the other way round, so A and B trade places (ΔW[e] = (B_e·A_e)ᵀ with A (r·E, d1), B (d2, r·E)).
Several targeted parameters of one module nest as PEFT's wrappers do: the first registered is the
innermost, so its adapter lives at `<module>.base_layer...` (one `base_layer` per later one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from peftc.config import LoraConfig
from peftc.errors import ConfigError, TargetError, closest
from peftc.graph import Call, SiteBuilder, add_state_input, cast, dtype_of, eager
from peftc.method import (
    AdapterTensors,
    EmitContext,
    Method,
    ModuleAdapter,
    ParamSite,
    Placed,
    Placement,
    Target,
    TensorKey,
    adapter_dtype,
    register_method,
)
from peftc.names import BASE_LAYER

from .lora import SCALE, A, B, init_factors, linear_like, lora_rank_alpha, lora_scale
from .lora_mha import MHA_IN, MHA_OUT, PARAMS, mha_targets
from .modules_to_save import excluded_by_copies
from .rebind import rebind_uses

aten = torch.ops.aten

PARAMETER = "parameter"  # the layer kind of a targeted parameter


@dataclass
class ParamAdapter(ModuleAdapter):
    """A LoRA adapter on one parameter; `module_path` is PEFT's wrapper path (`owner` + `.base_layer`
    per wrapper nested around it), where its tensors are named."""

    owner: str = ""  # the module holding the parameter
    param: str = ""  # the parameter's name in it
    transposed: bool = False  # the owner's `is_transposed`: experts stored (E, in, out)

    @property
    def key(self) -> str:
        """The parameter's name in the model."""
        return f"{self.owner}.{self.param}"


def parameter_targets(config: LoraConfig, model: nn.Module) -> list[tuple[str, str, str]]:
    """(owner module, parameter name, wrapper path) of every parameter `config.target_parameters` names,
    matched as PEFT does (the full name, or a suffix after a dot), in PEFT's nesting order."""
    wanted = config.target_parameters or []
    found: list[tuple[str, str]] = []
    for owner, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            key = f"{owner}.{name}" if owner else name
            if key in wanted or any(key.endswith(f".{t}") for t in wanted):
                if not owner:
                    raise TargetError(f"target_parameters: {key!r} belongs to the model itself, not to a submodule "
                                      "(PEFT wraps the module holding a targeted parameter)")
                found.append((owner, name))
    if wanted and not found:
        names = [n for n, _ in model.named_parameters()]
        hints = "; ".join(f"{t!r} -> {closest(t, names)}" for t in wanted)
        raise TargetError(f"target_parameters={wanted!r} matched no parameter of {type(model).__name__}; "
                          f"closest parameter names: {hints}")
    per_owner: dict[str, list[str]] = {}
    for owner, name in found:
        per_owner.setdefault(owner, []).append(name)
    out = []
    for owner, params in per_owner.items():
        for i, name in enumerate(params):  # the last registered wraps all others: it is outermost
            depth = len(params) - 1 - i
            out.append((owner, name, ".".join([owner, *[BASE_LAYER] * depth])))
    return out


@register_method
class LoraParam(Method):
    """LoRA's `target_parameters` form: a part of a LoRA config, placed at the parameters it names."""

    peft_type = "LORA"
    config_cls = LoraConfig
    placement = Placement.WEIGHT
    part_of_field = "target_parameters"
    example_config = {"peft_type": "LORA", "r": 2, "lora_alpha": 6, "target_modules": [],
                      "target_parameters": ["lin0.weight"]}
    groups = ("lora_A", "lora_B")
    layer_types = {PARAMETER: "nn.Parameter (`target_parameters`)",
                   MHA_IN: "nn.MultiheadAttention in_proj_weight", MHA_OUT: "nn.MultiheadAttention out_proj.weight"}
    site_ops = {PARAMETER: (), MHA_IN: (), MHA_OUT: ()}

    def targets(self, config: LoraConfig, model: nn.Module, adapter: str, placed: Placed) -> list[Target]:
        """The two weights of each nn.MultiheadAttention `target_modules` selects (passes/lora_mha.py), and each
        parameter `target_parameters` names, at PEFT's (nested) wrapper path; adapters on parameters must all
        target the same ones, and a module is targeted by modules or by parameters, not both."""
        mha = mha_targets(config, model, lambda path: excluded_by_copies(path, config.modules_to_save))
        if not config.target_parameters:
            return mha
        found = parameter_targets(config, model)
        for other, other_config in placed.configs.items():
            theirs = getattr(other_config, "target_parameters", None)
            if other != adapter and theirs and theirs != config.target_parameters:
                raise ConfigError(f"adapter {adapter!r} targets parameters {config.target_parameters}, adapter "
                                  f"{other!r} {theirs}: as in PEFT, adapters on parameters must target the same ones")
        both = sorted({owner for owner, _, _ in found} & (placed.own_paths() | {t.module_name for t in mha}))
        if both:
            raise ConfigError(f"modules {both} are targeted both by target_modules and by target_parameters")
        out = mha
        for owner, param, path in found:
            module = model.get_submodule(owner)
            transposed = getattr(module, "is_transposed", False)
            out.append(Target(path, f"{owner}.{param}", module, PARAMETER,
                              extra={"owner": owner, "param": param, "transposed": transposed}))
        return out

    def adapter(self, target: Target, adapter: str, config: LoraConfig,
                tensors: dict[TensorKey, tuple[str, torch.Tensor]]) -> ParamAdapter:
        return ParamAdapter(target.names_at, adapter, self, target.kind, config, tensors, **target.extra)

    def create(self, config: LoraConfig, module_name: str, module: nn.Module, kind: str) -> AdapterTensors:
        """`module_name` is the parameter's full name (`<owner>.<param>`), `module` its owner; for an
        nn.MultiheadAttention's weight (kind MHA_IN / MHA_OUT) the module's name, whose rank both get (PEFT's)."""
        key = module_name
        w = module.get_parameter(PARAMS[kind]) if kind in PARAMS else getattr(module, key.rsplit(".", 1)[-1])
        r, alpha = lora_rank_alpha(config, key)
        if w.dim() == 2:
            experts, fan_in, fan_out = 1, w.shape[1], w.shape[0]
        elif w.dim() == 3:
            transposed = getattr(module, "is_transposed", False)
            experts, fan_out, fan_in = (w.shape[0], w.shape[2], w.shape[1]) if transposed else tuple(w.shape)
        else:
            raise ConfigError(f"target_parameters: {key!r} is {w.dim()}-D {tuple(w.shape)}; LoRA adapts 2-D "
                              "weights and 3-D expert stacks only (as PEFT)")
        # PEFT's factors are an nn.Linear(in, r·E) and an nn.Linear(r·E, out), drawn in that order
        a, b = linear_like((r * experts, fan_in)), linear_like((fan_out, r * experts))
        params = {A: a, B: b}
        init_factors(config.init_lora_weights, params, r)
        dtype = adapter_dtype(w)
        params = {k: v.to(device=w.device, dtype=dtype) for k, v in params.items()}
        scale = torch.tensor(lora_scale(config, r, alpha), dtype=dtype, device=w.device)
        return AdapterTensors(params=params, buffers={SCALE: scale})

    def emit(self, ctx: EmitContext) -> torch.fx.Node:
        """W + s·ΔW, from the parameter's current value `ctx.y` inside its module (`ctx.site`: a ParamSite)."""
        b, w, tensors = ctx.builder, ctx.y, ctx.tensors
        d = delta(b.call, tuple(w.meta["val"].shape), ctx.site.transposed, tensors[A], tensors[B])
        d = cast(b, b.call(aten.mul.Tensor, d, tensors[SCALE]), dtype_of(tensors[SCALE]), dtype_of(w))
        return b.call(aten.add.Tensor, w, d)

    def fold(self, kind: str, config: LoraConfig, module: nn.Module, tensors: dict[TensorKey, torch.Tensor],
             base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ((param, w),) = base.items()
        transposed = getattr(module, "is_transposed", False)
        d = delta(eager, tuple(w.shape), transposed, tensors[A], tensors[B]) * tensors[SCALE]
        return {param: w + d}


def delta(call: Call, shape: tuple[int, ...], transposed: bool, a: Any, b: Any) -> Any:
    """ΔW (before scaling) of a parameter of `shape`, in its own layout, from PEFT's lora_A / lora_B."""
    if len(shape) == 2:
        return call(aten.mm.default, b, a)
    experts, (rank_e, a_in), (b_out, _) = shape[0], _shape(a), _shape(b)
    r = rank_e // experts
    a3 = call(aten.reshape.default, a, [experts, r, a_in])  # (E, r, in)
    b3 = call(aten.permute.default, call(aten.reshape.default, b, [b_out, r, experts]), [2, 0, 1])  # (E, out, r)
    if transposed:
        return call(aten.bmm.default, call(aten.transpose.int, a3, 1, 2), call(aten.transpose.int, b3, 1, 2))
    return call(aten.bmm.default, b3, a3)


def _shape(x: torch.Tensor | torch.fx.Node) -> tuple[int, ...]:
    return tuple(x.meta["val"].shape if isinstance(x, torch.fx.Node) else x.shape)


class RebindParameters(PassBase):
    """before: h = op(..., W, ...)             (nodes traced inside the parameter's module)
    after:  h = op(..., W + Σ s·ΔW, ...)    (each targeted parameter's adapters applied in order)

    `adapters` lists (the parameter's state names, its adapters)."""

    def __init__(self, adapters: list[tuple[frozenset[str], list[ParamAdapter]]], training: bool) -> None:
        self.adapters = adapters
        self.training = training

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        modified = False
        for fqns, mas in self.adapters:
            inputs = [{key: add_state_input(gm, t_fqn, t) for key, (t_fqn, t) in ma.tensors.items()} for ma in mas]

            def build(b: SiteBuilder, w: torch.fx.Node, mas: list[ParamAdapter] = mas, inputs: list = inputs) -> Any:
                val = w.meta["val"]
                for ma, tensors in zip(mas, inputs):
                    site = ParamSite(ma.owner, ma.param, ma.transposed)
                    w = ma.method.emit(EmitContext(b, site, w, ma.kind, self.training, tensors=tensors,
                                                   config=ma.config))
                    w.meta["val"] = val  # W + ΔW: the next adapter reads its shape as W's
                return w

            tag = (mas[0].module_path, ",".join(ma.adapter for ma in mas), "LORA")
            modified |= rebind_uses(gm, fqns, mas[0].owner, build, tag)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, modified)
