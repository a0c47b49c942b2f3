"""The canonical_linear pass on a small graph: `x @ W.T` over a model parameter becomes `aten.linear`."""

from __future__ import annotations

import peft
import torch
import torch.nn as nn
from peftc.passes.canonical_linear import LinearFromTransposedMatmul
from torch.testing import FileCheck

from peftc.capture import capture
from tests import oracle

aten = torch.ops.aten


class TransposedMatmuls(nn.Module):
    """Three spellings of `x @ W.T`, and a matmul by a parameter that is not transposed (left alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 5))
        self.w2 = nn.Parameter(torch.randn(7, 6))
        self.w3 = nn.Parameter(torch.randn(4, 7))
        self.w4 = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.w1.T
        h = torch.matmul(h, self.w2.t())
        h = h @ self.w3.permute(1, 0)
        return h @ self.w4


def test_transposed_matmuls_become_linears_with_identical_values() -> None:
    model, x = TransposedMatmuls(), torch.randn(3, 2, 5)
    captured = capture(model, (x,), {}, training=False)
    before = captured.gm(*[p for p in model.parameters()], x)
    result = LinearFromTransposedMatmul()(captured.gm)
    assert result.modified
    FileCheck().check_count("aten.linear", 3, exactly=True).run(captured.gm.code)
    FileCheck().check_count("aten.matmul", 1, exactly=True).run(captured.gm.code)  # w4 is used untransposed
    for transpose in ("numpy_T", "aten.t.", "permute"):
        assert transpose not in captured.gm.code
    after = captured.gm(*[p for p in model.parameters()], x)
    assert torch.equal(before[0], after[0])
    assert not LinearFromTransposedMatmul()(captured.gm).modified


def test_falcon_query_key_value_matches_peft() -> None:
    """Falcon's FalconLinear (`x @ self.weight.T`): LoRA on query_key_value, as PEFT does it."""
    fields = {"r": 2, "lora_alpha": 4, "target_modules": ["query_key_value"], "init_lora_weights": False}
    pair = oracle.make_pair("falcon", {"peft_type": "LORA", **fields}, peft.LoraConfig(**fields))
    oracle.check_eval(pair)
    assert len(pair.am.targeted_modules) == 2
