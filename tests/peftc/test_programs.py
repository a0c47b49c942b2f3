"""Which captured graph serves a call: the bounded capture cache, the trace's guards, and scalar kwargs
that become graph inputs instead of new captures."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import peftc
from peftc.programs import CaptureCache
from tests import zoo

pytestmark = [pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning")]


@dataclass(eq=False)
class Graph:
    """Stands for a CapturedGraph: accepts inputs whose first value is its size."""

    size: int

    def accepts(self, flat_inputs: list) -> bool:
        return flat_inputs[0] == self.size


def test_cache_keeps_at_most_limit_graphs_and_evicts_the_least_recently_used() -> None:
    cache = CaptureCache(limit=2)
    a, b, c = Graph(1), Graph(2), Graph(3)
    assert cache.add("k", a) == [] and cache.add("k", b) == []
    assert cache.lookup("k", [1]) is a  # a is now the most recently used
    assert cache.add("k", c) == [b]
    assert list(cache) == [a, c] and len(cache) == 2
    assert cache.lookup("k", [2]) is None
    assert cache.lookup("other", [1]) is None  # another signature never matches
    copied = cache.copy()
    copied.add("k", b)
    assert len(cache) == 2 and list(copied) == [c, b]
    with pytest.raises(ValueError, match="at least one"):
        CaptureCache(limit=0)


def test_evicted_graphs_take_their_programs_with_them() -> None:
    case = zoo.mlp()
    am = peftc.apply(case.model, {"peft_type": "LORA", "r": 2, "target_modules": ["lin0"]},
                     example_inputs=case.inputs)
    am.programs.captures.limit = 1
    (x,) = case.inputs
    first = am(x)
    am.train()
    am(x)  # a train-mode capture evicts the eval one
    am.eval()
    assert len(am.programs.captures) == 1 and len(am.graphs) == 1
    torch.testing.assert_close(am(x), first)


def test_logits_to_keep_is_a_graph_input_not_a_capture_per_value() -> None:
    """`logits_to_keep=k` for k = 0..12: at most three captures besides the first (0 keeps all; a 1-position
    tensor specialises), and every output equals the base model's."""
    case = zoo.llama()
    am = peftc.apply(case.model, {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]})
    ids = case.inputs["input_ids"]  # 9 tokens: k above that keeps them all, as slicing does
    with torch.no_grad(), am.disable_adapter():
        for k in range(13):
            got = am(input_ids=ids, logits_to_keep=k).logits
            want = case.model(input_ids=ids, logits_to_keep=k, use_cache=False).logits
            assert got.shape == want.shape and torch.equal(got, want), k
    assert len(am.programs.captures) <= 4


class Branchy(nn.Module):
    """A forward that branches on the relation of two batch sizes: the trace guards on it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return h * 2 if x.shape[0] > y.shape[0] else h * 3


def test_a_graph_is_not_reused_where_the_traces_guards_fail() -> None:
    """Traced with 3 > 2 rows; sizes 4 and 5 are within each size's range but take the other branch."""
    torch.manual_seed(0)
    model = Branchy().eval()
    am = peftc.apply(model, {"peft_type": "LORA", "r": 2, "target_modules": ["lin"]},
                     example_inputs=(torch.randn(3, 4), torch.randn(2, 4)))
    x, y = torch.randn(4, 4), torch.randn(5, 4)
    with torch.no_grad(), am.disable_adapter():
        torch.testing.assert_close(am(x, y), model(x, y))
    assert len(am.programs.captures) == 2


def test_a_graph_captured_from_a_view_serves_other_tensors() -> None:
    """A view as the first input (ids[:2, :5]) must not make the graph guard on the view's base tensor:
    later calls with plain tensors of other sizes reuse it."""
    case = zoo.llama()
    ids = case.inputs["input_ids"]
    am = peftc.apply(case.model, {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]},
                     example_inputs={"input_ids": ids[:2, :5]})
    assert all(g.guards is None or "_base" not in repr(g.guards) for g in am.programs.captures)
    with torch.no_grad(), am.disable_adapter():
        got = am(input_ids=ids.clone()).logits
    torch.testing.assert_close(got, case.model(input_ids=ids, use_cache=False).logits)
    assert len(am.programs.captures) == 1


def test_a_guard_that_cannot_be_evaluated_rejects_the_graph() -> None:
    """A guard about something a call lacks (a view's base, for a plain tensor) means: not this graph."""
    from torch.utils import _pytree as pytree

    from peftc.capture import _guard_function

    def forward(x: torch.Tensor) -> torch.Tensor:
        return x

    flat, spec = pytree.tree_flatten(((torch.zeros(2, 3),), {}))
    guards = _guard_function(["L['x']._base.size()[1] != L['x'].size()[1]"], __import__("inspect").signature(forward),
                             spec)
    assert guards(flat) is False
