"""Inference programs add a LoRA branch into its linear's output in place (passes/accumulate_in_place.py):
structurally on small graphs, the cases it must leave alone, and end to end against PEFT, with autograd."""

from __future__ import annotations

import peft
import torch
import torch.nn as nn
from peftc.passes.accumulate_in_place import AccumulateLowRankInPlace, low_rank_sum

from tests import oracle

aten = torch.ops.aten
LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


class Branch(nn.Module):
    """A linear and a rank-2 branch on the same input, summed; `tap` also returns the base output (a second
    reader), `other` feeds the branch another input."""

    def __init__(self, tap: bool = False, other: bool = False) -> None:
        super().__init__()
        self.w, self.a, self.b = nn.Linear(6, 5, bias=False), nn.Linear(6, 2, bias=False), nn.Linear(2, 5, bias=False)
        self.tap, self.other = tap, other

    def forward(self, x: torch.Tensor) -> object:
        y = self.w(x)
        out = y + self.b(self.a(x.relu() if self.other else x))
        return (out, y) if self.tap else out


def lowered(module: nn.Module, x: torch.Tensor) -> tuple[torch.fx.GraphModule, bool]:
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    gm = torch.export.export(module, (x,), dynamic_shapes=(dims,)).module()
    gm = torch.fx.GraphModule(gm, gm.graph)
    return gm, AccumulateLowRankInPlace()(gm).modified


def ops(gm: torch.fx.GraphModule) -> list[object]:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_a_branch_beside_a_linear_becomes_one_addmm_into_its_output():
    torch.manual_seed(0)
    module, x = Branch(), torch.randn(3, 4, 6)
    gm, modified = lowered(module, x)
    assert modified
    assert ops(gm).count(aten.addmm_.default) == 1
    assert aten.add.Tensor not in ops(gm)
    assert ops(gm).count(aten.linear.default) == 2  # the base linear and A; B is read by the addmm
    torch.testing.assert_close(gm(x), module(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gm(x[:2, :1]), module(x[:2, :1]), atol=1e-6, rtol=1e-6)  # the view takes any rows


def test_sums_it_cannot_rewrite_exactly_are_left_alone():
    """The base output read elsewhere (the in-place add would change what that reader sees), and a branch
    from another input (its rows need not be the linear's)."""
    x = torch.randn(3, 4, 6)
    for module in (Branch(tap=True), Branch(other=True)):
        gm, modified = lowered(module, x)
        assert not modified and aten.addmm_.default not in ops(gm)
        assert not any(low_rank_sum(n) for n in gm.graph.nodes if n.op == "call_function")


def test_llama_inference_program_adds_every_site_in_place_and_matches_peft():
    pair = oracle.make_pair("llama", LORA, peft.LoraConfig(**{k: v for k, v in LORA.items() if k != "peft_type"}))
    oracle.check_eval(pair)
    ((captured, run),) = pair.am.eager_graphs
    sites = 3 * 2  # three targets in each of two layers (the program calls addmm_ as a tensor method)
    assert ops(run).count(torch.Tensor.addmm_) == sites
    assert ops(run).count(torch.flatten) == 2 * 2  # q and v read one input: its rows are made once
    assert aten.addmm_.default not in ops(captured.gm)  # compile and ONNX see the functional graph


def test_grad_through_an_inference_program_equals_peft():
    """An eval-mode call with grad enabled runs the in-place program: autograd sees the addmm_."""
    pair = oracle.make_pair("llama", LORA, peft.LoraConfig(**{k: v for k, v in LORA.items() if k != "peft_type"}))
    ids = pair.case.inputs["input_ids"]
    for m in (pair.am, pair.pm):
        m(input_ids=ids).logits.square().mean().backward()
    ((_, run),) = pair.am.eager_graphs
    assert torch.Tensor.addmm_ in ops(run)
    theirs = dict(pair.pm.named_parameters())
    for name, p in pair.am.adapter_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, **oracle.TOL)


def test_train_programs_keep_the_out_of_place_sum():
    pair = oracle.make_pair("llama", LORA, peft.LoraConfig(**{k: v for k, v in LORA.items() if k != "peft_type"}),
                            training=True)
    pair.am(**oracle.train_inputs(pair.case))
    ((_, run),) = pair.am.eager_graphs
    assert torch.Tensor.addmm_ not in ops(run)


def test_calls_under_autocast_run_a_program_without_the_in_place_sum():
    """autocast picks each op's dtype at run time; an in-place addmm_ would mix bf16 and fp32."""
    pair = oracle.make_pair("llama", LORA, peft.LoraConfig(**{k: v for k, v in LORA.items() if k != "peft_type"}))
    ids = pair.case.inputs["input_ids"]
    with torch.no_grad():
        plain = pair.am(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = pair.am(input_ids=ids).logits, pair.pm(input_ids=ids).logits
    ((_, run),) = pair.am.eager_graphs  # one graph; the program outside autocast adds in place
    assert torch.Tensor.addmm_ in ops(run)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert got.dtype == torch.bfloat16 and plain.dtype == torch.float32
