"""Mixed precision: a bf16 or fp16 base with fp32 adapters, and `torch.autocast` around the forward.

peftc's graphs hold aten ops, and autocast acts at run time on those ops as it does on the eager
modules: a graph captured outside autocast runs under it, and one captured inside does not bake
the casts in. Outputs and adapter gradients are compared with PEFT on the same weights and setup.
"""

from __future__ import annotations

import contextlib

import peft
import pytest
import torch

import peftc
from tests import oracle, zoo

CONFIG = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]}
# bf16 keeps 8 bits of mantissa: torch.testing's bf16 rtol, and an atol for values near 0 after a matmul
BF16_TOL = {"atol": 2e-2, "rtol": 1.6e-2}
FP16_TOL = {"atol": 2e-3, "rtol": 2e-3}  # 11 bits of mantissa

SETUPS = {  # name -> (base dtype, autocast dtype or None, tolerance)
    "bf16 base": (torch.bfloat16, None, BF16_TOL),
    "fp16 base": (torch.float16, None, FP16_TOL),
    "bf16 base + autocast": (torch.bfloat16, torch.bfloat16, BF16_TOL),
    "fp32 base + autocast": (torch.float32, torch.bfloat16, BF16_TOL),  # what Trainer(bf16=True) runs
}


def _pair(dtype: torch.dtype) -> oracle.MethodPair:
    case, ref = zoo.llama(), zoo.llama()
    case.model.to(dtype)
    ref.model.to(dtype)
    am = peftc.apply(case.model, {"peft_type": "LORA", **CONFIG})
    oracle.randomize_adapters(am)
    pm = peft.get_peft_model(ref.model, peft.LoraConfig(**CONFIG)).eval()  # its new LoRA layers start in train mode
    pm.load_state_dict(am.state_dict(), strict=True)
    return oracle.MethodPair(case, ref, am, pm)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_outputs_and_grads_match_peft(setup: str):
    dtype, autocast, tol = SETUPS[setup]
    pair = _pair(dtype)
    adapters = dict(pair.am.adapter_parameters())
    # adapters stay fp32 over a bf16 base, as PEFT keeps them (autocast_adapter_dtype)
    assert {p.dtype for p in adapters.values()} == {torch.float32}
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:
        oracle.check_eval(pair, tol)
        oracle.check_train(pair, tol)  # outputs, then every adapter's gradient, in train mode
    assert all(p.grad.dtype == torch.float32 for p in adapters.values())


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
    torch.testing.assert_close(low, low_ref, **BF16_TOL)
    torch.testing.assert_close(full, ref(**case.inputs).logits.detach(), **oracle.TOL)
    assert (low.float() - full).abs().max() > 1e-4  # autocast really ran in bf16
