"""AdaLoRA: LoRA in SVD form, whose rank is allocated during training.

y = base(x) + B((A * E)(dropout(x))) * scaling / (ranknum + 1e-5), with A (r, in) the right singular
vectors, E (r, 1) the singular values, B (out, r) the left ones, scaling = lora_alpha (r when alpha is 0)
and ranknum = init_r, a frozen value PEFT keeps in the state dict but not in checkpoints. A Conv2d adds
the convolution by the reshaped B @ (A * E) (PEFT's `SVDConv2d`). Names, shapes, initialisation (drawn in
PEFT's order) and dtypes follow PEFT's `adalora.SVDLinear` / `SVDConv2d`; transformers' Conv1D is a Linear
stored transposed.

Training, as PEFT's AdaLoraModel:
  - the orthogonal regularisation orth_reg_weight * mean(‖AAᵀ - I‖, ‖BᵀB - I‖) over the trainable
    adapter's modules is added to the model's loss (`loss_term`, placed by passes/loss_terms.py) when the
    config has a task_type, as PEFT does (its PeftModel for a task type adds it; without one it does not);
  - `AdaptedModel.update_and_allocate(global_step)` (or peftc.trainer_callbacks' `AdaLoraCallback` in a
    transformers Trainer), after each optimizer step, runs PEFT's RankAllocator: importance |p · ∂L/∂p|
    smoothed by two EMAs, a cubic budget from init_r to target_r per module between tinit and
    total_step - tfinal, and the least important triplets' E masked to zero;
    the kept triplets are the config's `rank_pattern`.
Checkpoints hold only the triplets `rank_pattern` keeps (PEFT's `resize_state_dict_by_rank_pattern`), and
a config with a `rank_pattern` creates each module at its kept rank (PEFT's resize when it loads one).

PEFT's AdaLoraModel is a LoraModel, so LoRA's model-level fields act as for LoRA: `modules_to_save` (and the
head task_type SEQ_CLS adds) trains copies (passes/modules_to_save.py), `bias` trains base biases, and
`layer_replication` repeats decoder layers with shared base weights. The allocator and the regularisation read
the AdaLoRA triplets only, as PEFT's read only `lora_` parameters.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx
import torch.nn as nn

from peftc.config import AdapterConfig, LoraConfig, check_layer_replication, check_probability, check_targets
from peftc.errors import ConfigError
from peftc.graph import Call, cast, cast_like, dtype_of, eager
from peftc.method import AdapterTensors, EmitContext, Method, TensorKey, adapter_dtype, in_out_features, register_method

aten = torch.ops.aten

A, E, B = ("lora_A", None), ("lora_E", None), ("lora_B", None)
RANKNUM = ("ranknum", None)  # state: in the state dict, not in checkpoints
SCALING = ("adalora_scaling", None)  # a run-time buffer (PEFT's python float `scaling`)
EPS = 1e-5  # PEFT's ranknum + 1e-5


@dataclass
class AdaLoraConfig(LoraConfig):
    """PEFT's `AdaLoraConfig` (a LoraConfig), same fields and defaults. `r` is not used (init_r is)."""

    peft_type_name: ClassVar[str] = "ADALORA"
    unsupported: ClassVar[dict[str, str]] = {
        **LoraConfig.unsupported,
        # PEFT's AdaLoRA layers ignore these LoRA fields: refused rather than silently dropped
        "lora_bias": "PEFT's AdaLoRA layers have no bias on B and ignore lora_bias",
        "alpha_pattern": "PEFT's AdaLoRA builds every layer with lora_alpha and ignores alpha_pattern",
        "use_rslora": "AdaLoRA scales by lora_alpha / ranknum; PEFT ignores use_rslora",
        "use_dora": "PEFT's AdaLoRA does not support DoRA",
        "loftq_config": "PEFT's AdaLoRA does not support LoftQ (its config refuses loftq_config)",
        "target_parameters": "LoRA's target_parameters part is placed for peft_type LORA only",
        "trainable_token_indices": "LoRA's trainable-tokens part is placed for peft_type LORA only",
        "velora_config": "a LoRA variant; PEFT's AdaLoRA layers do not apply it",
        "monteclora_config": "a LoRA variant; PEFT's AdaLoRA layers do not apply it",
        "kasa_config": "a LoRA variant; PEFT's AdaLoRA layers do not apply it",
        "use_bdlora": "a LoRA variant; PEFT's AdaLoRA layers do not apply it",
        "arrow_config": "a LoRA variant; PEFT's AdaLoRA layers do not apply it",
        "eva_config": "EVA is an init of LoRA's; PEFT's AdaLoRA layers take init_lora_weights True or False only",
        "corda_config": "CorDA is an init of LoRA's; PEFT's AdaLoRA layers take init_lora_weights True or False only",
        "lora_ga_config": "LoRA-GA is an init of LoRA's; PEFT's AdaLoRA layers take init_lora_weights True or False "
                          "only",
    }

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 (PEFT's field name)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None  # kept triplets by `<module>.lora_E` (PEFT's saved form)

    def __post_init__(self) -> None:
        # LoraConfig's own checks are LoRA's (rank_pattern of ranks, its inits): AdaLoRA's are below
        AdapterConfig.__post_init__(self)
        check_targets(self)
        check_probability(self, "lora_dropout")
        if self.bias not in ("none", "all", "lora_only"):  # LoRA's values: PEFT's AdaLoraModel is a LoraModel
            raise ConfigError(f"bias={self.bias!r} must be 'none', 'all' or 'lora_only'")
        check_layer_replication(self)
        if not isinstance(self.init_lora_weights, bool):
            raise ConfigError(f"init_lora_weights={self.init_lora_weights!r}: AdaLoRA initialises with True "
                              "(E zero, A and B normal) or False (all random); PEFT's AdaLoRA layers take no "
                              "other init")
        if self.r != 8:  # as PEFT
            warnings.warn("Note that `r` is not used in AdaLora and will be ignored."
                          "If you intended to set the initial rank, use `init_r` instead.", stacklevel=3)
        for name in ("init_r", "target_r", "deltaT"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.tinit < 0 or self.tfinal < 0:
            raise ConfigError(f"tinit and tfinal must be >= 0, got {self.tinit} and {self.tfinal}")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ConfigError(f"beta1 and beta2 must be in (0, 1), got {self.beta1} and {self.beta2}")
        # PEFT's checks
        if self.total_step is None or self.total_step <= 0:
            raise ConfigError(f"total_step must be a positive integer (AdaLoRA's schedule needs it), "
                              f"got {self.total_step!r}")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(f"tinit={self.tinit}, tfinal={self.tfinal}, total_step={self.total_step} leave no "
                              "budgeting phase: decrease tfinal/tinit or increase total_step")
        for key, mask in (self.rank_pattern or {}).items():
            if not isinstance(mask, list) or not all(isinstance(m, bool) for m in mask):
                raise ConfigError(f"rank_pattern[{key!r}] must be a list of True/False (the kept triplets), "
                                  f"got {mask!r}")


def pattern_mask(config: AdaLoraConfig, module_name: str) -> list[bool] | None:
    """The kept triplets `rank_pattern` gives module `module_name` (keys `<module>.lora_E`, also with the
    adapter name after it as PEFT holds them in memory), or None."""
    for key, mask in (config.rank_pattern or {}).items():
        if key == f"{module_name}.lora_E" or key.startswith(f"{module_name}.lora_E."):
            return mask
    return None


def delta_weight(call: Call, kind: str, tensors: dict[TensorKey, Any], weight_shape: Any) -> Any:
    """B @ (A * E) * scaling / (ranknum + 1e-5) in the base weight's layout (PEFT's `get_delta_weight`)."""
    ae = call(aten.mul.Tensor, tensors[A], tensors[E])
    delta = call(aten.mul.Tensor, call(aten.mm.default, tensors[B], ae), tensors[SCALING])
    delta = call(aten.div.Tensor, delta, call(aten.add.Tensor, tensors[RANKNUM], EPS))
    if kind == "conv1d":
        return call(aten.t.default, delta)
    if kind == "conv2d":
        return call(aten.reshape.default, delta, weight_shape)
    return delta


@register_method
class AdaLora(Method):
    peft_type = "ADALORA"
    config_cls = AdaLoraConfig
    example_config = {"peft_type": "ADALORA", "init_r": 3, "target_r": 2, "lora_alpha": 4, "total_step": 10,
                      "target_modules": ["lin0", "lin1"], "init_lora_weights": False}
    groups = ("lora_A", "lora_E", "lora_B")
    layer_types = {"linear": "nn.Linear", "conv1d": "transformers Conv1D", "conv2d": "nn.Conv2d"}
    site_ops = {"linear": ("linear",), "conv1d": ("addmm",), "conv2d": ("conv2d", "convolution")}
    variants = {
        "rank allocation (`update_and_allocate`, `AdaLoraCallback`) and orthogonal regularisation in the loss":
            ("linear", "conv1d", "conv2d"),
    }

    def settings(self, config: AdaLoraConfig, module_name: str) -> dict[str, float]:
        mask = pattern_mask(config, module_name)
        return {"r": config.init_r if mask is None else sum(mask), "lora_alpha": config.lora_alpha}

    def create(self, config: AdaLoraConfig, module_name: str, module: nn.Module, kind: str) -> AdapterTensors:
        w = module.weight
        fan_in, fan_out = in_out_features(module, kind)
        if kind == "conv2d":
            if module.groups != 1:
                raise ConfigError(f"module {module_name!r}: PEFT's AdaLoRA Conv2d needs groups=1, "
                                  f"got groups={module.groups}")
            fan_in *= module.kernel_size[0] * module.kernel_size[1]
        mask = pattern_mask(config, module_name)
        r = config.init_r if mask is None else sum(mask)
        # PEFT's update_layer draws A, E, B and ranknum in this order, then re-initialises A and B
        a, e, b = torch.randn(r, fan_in), torch.randn(r, 1), torch.randn(fan_out, r)
        torch.randn(1)  # ranknum's draw, overwritten by its value
        if config.init_lora_weights:
            nn.init.zeros_(e)
            nn.init.normal_(a, mean=0.0, std=0.02)
            nn.init.normal_(b, mean=0.0, std=0.02)
        dtype = adapter_dtype(w)
        params = {k: v.to(device=w.device, dtype=dtype) for k, v in {A: a, E: e, B: b}.items()}
        # a module loaded at a kept rank keeps the scale of init_r, as PEFT's resize copies ranknum over
        ranknum = float(config.init_r) if r > 0 else 0.0
        scaling = config.lora_alpha if config.lora_alpha > 0 else float(r)
        return AdapterTensors(
            params=params,
            buffers={SCALING: torch.tensor(scaling, dtype=dtype, device=w.device)},
            state={RANKNUM: torch.tensor([ranknum], dtype=dtype, device=w.device)},
        )

    def emit(self, ctx: EmitContext) -> torch.fx.Node:
        b, site, y, kind, tensors, config = ctx.builder, ctx.site, ctx.y, ctx.kind, ctx.tensors, ctx.config
        x = cast_like(b, site.input, tensors[A])
        if ctx.training and config.lora_dropout > 0:
            x = b.call(aten.dropout.default, x, config.lora_dropout, True)
        if kind == "conv2d":
            args = site.node.args
            stride, padding = list(args[3]) if len(args) > 3 else [1, 1], list(args[4]) if len(args) > 4 else [0, 0]
            dilation = list(args[5]) if len(args) > 5 else [1, 1]
            shape = list(site.node.args[1].meta["val"].shape)
            h = b.call(aten.conv2d.default, x, delta_weight(b.call, kind, tensors, shape), None, stride, padding,
                       dilation)
        else:  # (x @ (A * E)ᵀ @ Bᵀ) * scaling / (ranknum + 1e-5), in PEFT's order
            h = b.call(aten.linear.default, x, b.call(aten.mul.Tensor, tensors[A], tensors[E]))
            h = b.call(aten.mul.Tensor, b.call(aten.linear.default, h, tensors[B]), tensors[SCALING])
            h = b.call(aten.div.Tensor, h, b.call(aten.add.Tensor, tensors[RANKNUM], EPS))
        return b.call(aten.add.Tensor, y, cast(b, h, dtype_of(h), dtype_of(y)))

    def fold(self, kind: str, config: AdaLoraConfig, module: nn.Module, tensors: dict[TensorKey, torch.Tensor],
             base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"weight": base["weight"] + delta_weight(eager, kind, tensors, base["weight"].shape)}

    def saved_tensors(self, config: AdaLoraConfig, module_path: str,
                      tensors: dict[TensorKey, torch.Tensor]) -> dict[TensorKey, torch.Tensor]:
        """The kept triplets only, where `rank_pattern` drops some of the live ones (PEFT's
        `resize_state_dict_by_rank_pattern`)."""
        mask = pattern_mask(config, module_path)
        if mask is None or sum(mask) == tensors[A].shape[0]:
            return tensors
        if len(mask) != tensors[A].shape[0]:
            raise ConfigError(f"rank_pattern for {module_path!r} has {len(mask)} entries, the module rank "
                              f"{tensors[A].shape[0]}")
        keep = torch.tensor(mask, device=tensors[A].device)
        return {A: tensors[A][keep], E: tensors[E][keep], B: tensors[B][:, keep]}

    def has_loss_term(self, config: AdaLoraConfig) -> bool:
        # PEFT's trainable adapter (it refuses a second one), under a task type: PEFT's model for a task calls
        # AdaLoraModel.forward, which adds the term; its PeftModel without one calls the base model directly
        return not config.inference_mode and config.task_type is not None

    def loss_term(self, call: Call, config: AdaLoraConfig, modules: list[dict[TensorKey, Any]]) -> Any:
        """orth_reg_weight * the mean of ‖AAᵀ - I‖_F and ‖BᵀB - I‖_F over the modules (PEFT's order: each
        module's A, then its B)."""
        total, count = None, 0
        for tensors in modules:
            for key in (A, B):
                p = tensors[key]
                pt = call(aten.t.default, p)
                cov = call(aten.mm.default, p, pt) if key == A else call(aten.mm.default, pt, p)
                eye = call(aten.diag_embed.default, call(aten.ones_like.default, call(aten.diagonal.default, cov)))
                norm = call(aten.linalg_vector_norm.default, call(aten.sub.Tensor, cov, eye))
                total = norm if total is None else call(aten.add.Tensor, total, norm)
                count += 1
        return call(aten.mul.Tensor, call(aten.div.Tensor, total, count), config.orth_reg_weight)


@dataclass
class RankAllocator:
    """PEFT's RankAllocator for one trainable AdaLoRA adapter: importance scores of its A, E, B entries and
    the budget schedule that masks the least important triplets' singular values."""

    config: AdaLoraConfig
    modules: dict[str, dict[TensorKey, torch.Tensor]]  # module path -> its A, E, B parameters (model order)
    ipt: dict[tuple[str, TensorKey], torch.Tensor] = field(default_factory=dict)
    exp_avg_ipt: dict[tuple[str, TensorKey], torch.Tensor] = field(default_factory=dict)
    exp_avg_unc: dict[tuple[str, TensorKey], torch.Tensor] = field(default_factory=dict)

    @property
    def init_bgt(self) -> int:
        return sum(t[A].shape[0] for t in self.modules.values())

    @property
    def target_bgt(self) -> int:
        return self.config.target_r * len(self.modules)

    def reset_ipt(self) -> None:
        self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        c = self.config
        if step <= c.tinit:  # warm-up
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:  # final fine-tuning
            return self.target_bgt, True
        mul_coeff = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)  # a cubic decrease
        return int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt), step % c.deltaT == 0

    def update_ipt(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for path, tensors in self.modules.items():
                for key in (A, B, E):
                    p, n = tensors[key], (path, key)
                    if p.grad is None:
                        raise ConfigError(f"update_and_allocate: {path}.{key[0]} has no gradient; call it after "
                                          "loss.backward() and before zero_grad()")
                    if n not in self.ipt:
                        self.ipt[n], self.exp_avg_ipt[n], self.exp_avg_unc[n] = (torch.zeros_like(p) for _ in range(3))
                    self.ipt[n] = (p * p.grad).abs().detach()
                    self.exp_avg_ipt[n] = b1 * self.exp_avg_ipt[n] + (1 - b1) * self.ipt[n]  # sensitivity
                    spread = (self.ipt[n] - self.exp_avg_ipt[n]).abs()  # uncertainty
                    self.exp_avg_unc[n] = b2 * self.exp_avg_unc[n] + (1 - b2) * spread

    def _score(self, path: str, key: TensorKey) -> torch.Tensor:
        return self.exp_avg_ipt[(path, key)] * self.exp_avg_unc[(path, key)]

    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        triplet = {}
        for path in self.modules:
            ipt_ab = torch.cat([self._score(path, A).mean(dim=1, keepdim=True),
                                self._score(path, B).mean(dim=0, keepdim=False).view(-1, 1)], dim=1)
            triplet[path] = (self._score(path, E).view(-1) + ipt_ab.sum(dim=1, keepdim=False).view(-1)).view(-1, 1)
        threshold = torch.kthvalue(torch.cat([t.view(-1) for t in triplet.values()]), k=self.init_bgt - budget)[0]
        pattern = {}
        with torch.no_grad():
            for path, tensors in self.modules.items():
                dropped = triplet[path] <= threshold.item()
                tensors[E].masked_fill_(dropped, 0.0)
                pattern[f"{path}.lora_E"] = (~dropped).view(-1).tolist()
        return pattern

    def mask_using_rank_pattern(self, pattern: dict[str, list[bool]]) -> None:
        with torch.no_grad():
            for path, tensors in self.modules.items():
                keep = torch.tensor(pattern[f"{path}.lora_E"], device=tensors[E].device).unsqueeze(-1)
                tensors[E].masked_fill_(~keep, 0.0)

    def update_and_allocate(self, global_step: int) -> None:
        """PEFT's `AdaLoraModel.update_and_allocate`: call after the optimizer step, before zero_grad."""
        c = self.config
        final = c.total_step - c.tfinal
        if global_step < final:
            self.update_ipt()
            budget, mask_ind = self.budget_schedule(global_step)
            if mask_ind:
                c.rank_pattern = self.mask_to_budget(budget)
        elif global_step == final:  # the final allocation
            budget, _ = self.budget_schedule(global_step)
            c.rank_pattern = self.mask_to_budget(budget)
            self.reset_ipt()
        elif c.rank_pattern:  # afterwards the masked singular values stay zero
            self.mask_using_rank_pattern(c.rank_pattern)


def rank_allocator(model: Any) -> RankAllocator:
    """The allocator of `model`'s trainable AdaLoRA adapter (an AdaptedModel), made on first use."""
    configs = model.peft_config
    trainable = [n for n, c in configs.items() if isinstance(c, AdaLoraConfig) and not c.inference_mode]
    if len(trainable) != 1:
        raise ConfigError(f"update_and_allocate needs exactly one trainable AdaLoRA adapter (PEFT allows one); "
                          f"found {trainable or 'none'} among {sorted(configs)}")
    name = trainable[0]
    allocators = model.__dict__.setdefault("_rank_allocators", {})
    if name not in allocators or allocators[name].config is not configs[name]:  # (a new adapter of that name)
        allocators[name] = RankAllocator(configs[name], {})
    # the live parameters, each call (moving or sharding the model registers new ones)
    # (its AdaLoRA modules only: PEFT's allocator reads `lora_` parameters, never a modules_to_save copy)
    allocators[name].modules = {ma.module_path: {key: t for key, (_, t) in ma.tensors.items() if key in (A, E, B)}
                                for mas in model.targeted_modules.values() for ma in mas
                                if ma.adapter == name and isinstance(ma.method, AdaLora)}
    return allocators[name]
