"""Mixed precision: a bf16 or fp16 base with fp32 adapters, and `torch.autocast` around the forward.

peftc's graphs hold aten ops, and autocast acts at run time on those ops as it does on the eager
modules: a graph captured outside autocast runs under it, and one captured inside does not bake
the casts in. Outputs and adapter gradients are compared with PEFT on the same weights and setup.
"""

from __future__ import annotations

import contextlib
import copy

import peft
import pytest
import torch

import peftc
from tests import oracle, zoo

CONFIG = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]}
# Tolerances are relative to the compared values: |got - want| <= REL x |want| (Frobenius norms), with |want|
# asserted to be well above 0. An absolute tolerance cannot work here: the adapters' gradients range from 3e-3 to
# 0.2 in norm (largest entry 6e-2), so bf16's atol of 2e-2 would pass all-zero gradients for most tensors.
# Measured against PEFT (Llama of tests/zoo.py): relative error <= 1.4e-2 in bf16 (8 bits of mantissa, eps
# 3.9e-3, accumulated over the layers), <= 1.6e-3 in fp16 (11 bits); the limits are about 3x that, so a gradient
# off by 10% in scale (a missing factor, one term of a sum lost) fails.
BF16_REL = 4e-2
FP16_REL = 5e-3
SMALLEST = 1e-4  # every reference gradient here is >= 2.5e-3 in norm: a smaller one would compare nothing

SETUPS = {  # name -> (base dtype, autocast dtype or None, relative tolerance)
    "bf16 base": (torch.bfloat16, None, BF16_REL),
    "fp16 base": (torch.float16, None, FP16_REL),
    "bf16 base + autocast": (torch.bfloat16, torch.bfloat16, BF16_REL),
    "fp32 base + autocast": (torch.float32, torch.bfloat16, BF16_REL),  # what Trainer(bf16=True) runs
}


def assert_close_relative(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    """|got - want| <= rel x |want|, for a reference |want| that is not ~0 (zeros or noise would pass anything)."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    got, want = got.detach().double(), want.detach().double()
    scale = want.norm().item()
    assert scale > SMALLEST and torch.isfinite(want).all(), f"{what}: the reference is ~0 ({scale:.1e})"
    err = (got - want).norm().item()
    assert err <= rel * scale, f"{what}: |got - want| = {err:.3e} > {rel} x |want| = {rel * scale:.3e}"


def _pair(dtype: torch.dtype) -> oracle.MethodPair:
    case, ref = zoo.llama(), zoo.llama()
    case.model.to(dtype)
    ref.model.to(dtype)
    am = peftc.apply(case.model, {"peft_type": "LORA", **CONFIG})
    oracle.randomize_adapters(am)
    pm = peft.get_peft_model(ref.model, peft.LoraConfig(**CONFIG)).eval()  # its new LoRA layers start in train mode
    pm.load_state_dict(am.state_dict(), strict=True)
    return oracle.MethodPair(case, ref, am, pm)


def check_eval(pair: oracle.MethodPair, rel: float) -> None:
    """Eval outputs equal PEFT's at two shapes, and the adapter changes them by far more than the tolerance."""
    case, am, pm = pair.case, pair.am, pair.pm
    with torch.no_grad():
        for inputs in (case.inputs, oracle.second_inputs(case)):
            got = case.call(am, inputs).logits
            assert_close_relative(got, case.call(pm, inputs).logits, rel, "eval logits")
        base = case.call(case.model, inputs).logits
        assert (got.double() - base.double()).norm() > 10 * rel * base.double().norm(), "the adapter had no effect"


def check_train(pair: oracle.MethodPair, rel: float) -> None:
    """Train-mode loss, logits and every adapter's gradient equal PEFT's; frozen weights get no gradient."""
    case, am, pm = pair.case, pair.am, pair.pm
    am.train()
    pm.train()
    inputs = oracle.train_inputs(case)
    torch.manual_seed(1234)  # the same dropout masks
    out = case.call(am, inputs)
    torch.manual_seed(1234)
    ref = case.call(pm, inputs)
    assert_close_relative(out.logits, ref.logits, rel, "train logits")
    assert_close_relative(out.loss, ref.loss, rel, "loss")
    out.loss.backward()
    ref.loss.backward()
    adapters = dict(am.adapter_parameters())
    theirs = dict(pm.named_parameters())
    assert {n for n, p in theirs.items() if p.requires_grad} == set(adapters)
    assert all(p.grad is None for n, p in am.named_parameters() if n not in adapters)
    for name, p in adapters.items():
        assert p.grad.dtype == torch.float32, name
        assert_close_relative(p.grad, theirs[name].grad, rel, name)
    am.eval()
    pm.eval()


@pytest.mark.parametrize("setup", list(SETUPS))
def test_outputs_and_grads_match_peft(setup: str):
    dtype, autocast, rel = SETUPS[setup]
    pair = _pair(dtype)
    adapters = dict(pair.am.adapter_parameters())
    # adapters stay fp32 over a bf16 base, as PEFT keeps them (autocast_adapter_dtype)
    assert {p.dtype for p in adapters.values()} == {torch.float32}
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:
        check_eval(pair, rel)
        check_train(pair, rel)


def test_autocast_is_applied_at_run_time_not_captured():
    """One graph serves calls with and without autocast: each call gets what eager gives it."""
    case = zoo.llama()
    am = peftc.apply(case.model, {"peft_type": "LORA", **CONFIG})
    oracle.randomize_adapters(am)
    ref = peft.get_peft_model(zoo.llama().model, peft.LoraConfig(**CONFIG)).eval()
    ref.load_state_dict(am.state_dict())
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = am(**case.inputs).logits
            low_ref = ref(**case.inputs).logits
        full = am(**case.inputs).logits
    assert len(am.graphs) == 1
    assert low.dtype == low_ref.dtype == torch.bfloat16 and full.dtype == torch.float32
    assert_close_relative(low, low_ref, BF16_REL, "autocast logits")
    torch.testing.assert_close(full, ref(**case.inputs).logits.detach(), **oracle.TOL)
    assert (low.float() - full).abs().max() > 1e-4  # autocast really ran in bf16


def test_an_adapted_layer_reading_another_casts_its_input():
    """A bf16 base whose adapted layers feed each other directly (a -> b): b's fp32 adapter reads a's adapted
    bf16 output cast to fp32, as PEFT's does; outputs and adapter gradients equal PEFT's in training."""
    case, ref = zoo.chain(), zoo.chain()
    case.model.to(torch.bfloat16)
    ref.model.to(torch.bfloat16)
    x = case.inputs[0].to(torch.bfloat16)
    config = {"r": 2, "lora_alpha": 4, "target_modules": ["a", "b", "c"]}
    am = peftc.apply(case.model, {"peft_type": "LORA", **config}, example_inputs=(x,))
    oracle.randomize_adapters(am)
    pm = peft.get_peft_model(ref.model, peft.LoraConfig(**config))
    pm.load_state_dict(am.state_dict(), strict=True)
    am.train()
    pm.train()
    got, want = am(x), pm(x)
    assert_close_relative(got, want, BF16_REL, "output")
    got.float().square().sum().backward()
    want.float().square().sum().backward()
    theirs = dict(pm.named_parameters())
    for name, p in am.adapter_parameters():
        assert_close_relative(p.grad, theirs[name].grad, BF16_REL, name)


TARGETS = ["q_proj", "v_proj"]
SEEDED = {  # one config per method (and LoRA's inits that compute from the base weight, and DoRA's magnitude)
    "LORA": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": TARGETS},
    "LORA gaussian + DoRA": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": TARGETS,
                             "init_lora_weights": "gaussian", "use_dora": True},
    "LORA pissa": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": TARGETS,
                   "init_lora_weights": "pissa"},
    "ADALORA": {"peft_type": "ADALORA", "init_r": 4, "target_r": 2, "target_modules": TARGETS, "total_step": 10},
    "LOHA": {"peft_type": "LOHA", "r": 4, "alpha": 8, "target_modules": TARGETS},
    "LOKR": {"peft_type": "LOKR", "r": 4, "alpha": 8, "target_modules": TARGETS},
    "VERA": {"peft_type": "VERA", "r": 4, "target_modules": TARGETS},
    "HRA": {"peft_type": "HRA", "r": 4, "target_modules": TARGETS},
    "OFT": {"peft_type": "OFT", "r": 4, "oft_block_size": 0, "target_modules": TARGETS, "init_weights": False},
    "BOFT": {"peft_type": "BOFT", "boft_block_size": 4, "target_modules": TARGETS, "init_weights": False},
}


@pytest.mark.parametrize(("name", "dtype"), [pytest.param(n, torch.bfloat16, id=f"{n} bf16") for n in SEEDED]
                         + [pytest.param("LORA", torch.float16, id="LORA fp16")])
def test_initial_adapter_equals_peft_from_one_seed(name: str, dtype: torch.dtype) -> None:
    """From the same seed over a bf16/fp16 base, the adapter starts with PEFT's values to the bit: PEFT draws in
    fp32, moves the adapter to the base dtype and casts it back to fp32, so its values are rounded to the base
    dtype (the residual base weights of PiSSA, and DoRA's magnitude, follow)."""
    config = SEEDED[name]
    base = zoo.llama().model.to(dtype)
    ref = zoo.llama().model.to(dtype)
    torch.manual_seed(0)
    am = peftc.apply(base, copy.deepcopy(config))
    torch.manual_seed(0)
    pm = peft.get_peft_model(ref, peft.get_peft_config(copy.deepcopy(config)))
    theirs = pm.state_dict()
    ours = {k: t for k, t in am.state_dict().items() if k in theirs}
    rounded = 0
    for key, t in ours.items():
        assert t.dtype == theirs[key].dtype and torch.equal(t, theirs[key]), key
        rounded += t.dtype == torch.float32 and not torch.equal(t, t.to(dtype).float())
    assert len(ours) > 2 * len(TARGETS)
    assert rounded == 0  # every fp32 adapter value is one of the base dtype's (none escaped the rounding)
