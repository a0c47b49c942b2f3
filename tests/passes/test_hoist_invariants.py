"""Inference programs compute what depends on the adapters' tensors alone once (passes/hoist_invariants.py):
structurally on a small graph, kept across calls with the same unmodified inputs, recomputed after
in-place writes, `.data` assignment or another adapter index, and never kept where autograd needs it."""

from __future__ import annotations

import pytest
import torch
from peftc.passes import hoist_invariants
from peftc.passes.hoist_invariants import HOISTED, HoistAdapterInvariants, invariant_nodes

import peftc
from peftc.unchanged import state_unchanged
from tests import zoo
from tests.oracle import example, randomize_adapters

aten = torch.ops.aten


def two_adapters() -> tuple[peftc.AdaptedModel, torch.Tensor]:
    case = zoo.mlp()
    spec = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": case.targets, "init_lora_weights": False}
    am = peftc.apply(case.model, spec, adapter_name="a", example_inputs=example(case))
    am.add_adapter("b", {**spec, "r": 2})
    for seed, name in enumerate(["a", "b"]):
        am.set_adapter(name)
        randomize_adapters(am, seed=seed)
    return am.eval(), case.inputs[0]


def mixed_program(am: peftc.AdaptedModel):
    (program,) = [p for p in am.programs.live() if p.captured.extra_inputs == ("adapter_index",)]
    return program


def reference(am: peftc.AdaptedModel, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Each sample through its adapter alone."""
    rows = []
    for i, name in enumerate(names):
        am.set_adapter(name)
        rows.append(am(x[i:i + 1]))
    return torch.cat(rows)


def test_mixed_lora_stacks_and_gathers_outside_the_per_call_graph():
    am, x = two_adapters()
    with torch.no_grad():
        am(x, adapter_names=["a", "b", "b", "a"])
    program = mixed_program(am)
    inline = [n.target for n in program.run.graph.nodes if n.op == "call_function"]
    for op in (aten.stack.default, aten.constant_pad_nd.default, aten.index_select.default):
        assert op in [n.target for n in program.captured.gm.graph.nodes], op  # the graph compile/ONNX see
        assert op not in inline, op
    hoisted = getattr(program.run, HOISTED).body
    # A and B·s gathered per sample, at 2 sites (an inference graph stacks each adapter's B·s: no per-sample scale)
    assert [n.target for n in hoisted.graph.nodes].count(aten.index_select.default) == 4
    assert not invariant_nodes(program.run.graph)


def test_the_pass_leaves_a_graph_without_adapters_alone():
    gm = torch.export.export(zoo.mlp().model, zoo.mlp().inputs).module()
    result = HoistAdapterInvariants()(torch.fx.GraphModule(gm, gm.graph))
    assert not result.modified


def test_kept_while_unchanged_and_recomputed_after_writes():
    am, x = two_adapters()
    names = ["a", "b", "b", "a"]
    with torch.no_grad():
        first = am(x, adapter_names=names)
        kept = getattr(mixed_program(am).run, HOISTED)
        outputs = kept._outputs
        assert torch.equal(am(x, adapter_names=names), first)
        assert kept._outputs is outputs  # not recomputed

        lora_b = am.get_parameter("base_model.model.lin1.lora_B.b.weight")
        lora_b.mul_(3)  # in place: a hot-swap's copy, an optimizer step
        after_write = am(x, adapter_names=names)
        assert kept._outputs is not outputs
        torch.testing.assert_close(after_write, reference(am, x, names), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(after_write, first)

        lora_b.data = lora_b.data * 2  # new storage, no version bump
        torch.testing.assert_close(am(x, adapter_names=names), reference(am, x, names), atol=1e-6, rtol=1e-6)

        other = ["b", "a", "__base__", "b"]
        torch.testing.assert_close(am(x, adapter_names=other), reference_with_base(am, x, other), atol=1e-6,
                                   rtol=1e-6)


def test_in_a_state_unchanged_region_inputs_are_checked_at_the_first_call(monkeypatch):
    am, x = two_adapters()
    names, other = ["a", "b", "b", "a"], ["b", "a", "__base__", "b"]
    with torch.no_grad():
        want, want_other = reference(am, x, names), reference_with_base(am, x, other)
    checks = []
    key = hoist_invariants._key
    monkeypatch.setattr(hoist_invariants, "_key", lambda *a: checks.append(a) or key(*a))
    with torch.no_grad(), state_unchanged():
        for _ in range(4):
            torch.testing.assert_close(am(x, adapter_names=names), want, atol=1e-6, rtol=1e-6)
        assert len(checks) == 1  # the adapters' tensors: once, not at every call
        # another adapter index is still another choice
        torch.testing.assert_close(am(x, adapter_names=other), want_other, atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # outside a region: at every call
        am(x, adapter_names=names)
        am(x, adapter_names=names)
    assert len(checks) == 4


def reference_with_base(am: peftc.AdaptedModel, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with am.disable_adapter():
                rows.append(am(x[i:i + 1]))
        else:
            am.set_adapter(name)
            rows.append(am(x[i:i + 1]))
    return torch.cat(rows)


@pytest.mark.parametrize("calls", [1, 2])
def test_gradients_flow_in_eval_where_autograd_needs_the_graph(calls):
    am, x = two_adapters()
    names = ["a", "b", "b", "a"]
    all_trainable(am)
    with torch.no_grad():
        am(x, adapter_names=names)  # fills the kept values
    for _ in range(calls):
        am.zero_grad()
        am(x, adapter_names=names).square().sum().backward()
    got = {n: p.grad.clone() for n, p in am.named_parameters() if p.grad is not None}
    am.zero_grad()
    reference(am, x, names)  # warm single-adapter programs
    am.zero_grad()
    for i, name in enumerate(names):
        am.set_adapter(name)
        all_trainable(am)
        am(x[i:i + 1]).square().sum().backward()
    want = {n: p.grad for n, p in am.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and any(".lora_A.b." in n for n in got)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-5)


def all_trainable(am: peftc.AdaptedModel) -> None:
    """Every adapter trainable (set_adapter leaves only the active one so, as in PEFT)."""
    for name, p in am.named_parameters():
        p.requires_grad_(".lora_" in name)
