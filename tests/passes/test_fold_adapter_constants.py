"""Switch exports hold what the graph computes from its adapters alone as constants
(passes/fold_adapter_constants.py): on a small graph, structurally and numerically."""

from __future__ import annotations

import torch
from peftc.passes.fold_adapter_constants import FOLDED, FoldAdapterConstants
from peftc.passes.hoist_invariants import invariant_nodes

from peftc.graph import ADDED_STATE

aten = torch.ops.aten


def small_graph() -> tuple[torch.fx.GraphModule, dict[str, torch.fx.Node]]:
    """out = x @ wᵀ + (x @ rᵀ) * s.float(), r = solve(q, qᵀ): a matrix solved from an adapter parameter q, as BOFT
    builds its rotation; `w` a traced weight; `s` an adapter scale, cast."""
    graph = torch.fx.Graph()
    q, s, w, x = (graph.placeholder(name) for name in ("q", "s", "w", "x"))
    for node in (q, s):
        node.meta[ADDED_STATE] = True
    rotation = graph.call_function(aten.linalg_solve.default, (q, graph.call_function(aten.t.default, (q,))))
    scale = graph.call_function(aten._to_copy.default, (s,), {"dtype": torch.float32})
    base = graph.call_function(aten.matmul.default, (x, graph.call_function(aten.t.default, (w,))))
    rotated = graph.call_function(aten.matmul.default, (x, graph.call_function(aten.t.default, (rotation,))))
    graph.output(graph.call_function(aten.add.Tensor, (base, graph.call_function(aten.mul.Tensor, (rotated, scale)))))
    return torch.fx.GraphModule(torch.nn.Module(), graph), {"q": q, "s": s, "w": w}


def test_adapter_only_work_becomes_constants() -> None:
    gm, placeholders = small_graph()
    draw = torch.Generator().manual_seed(0)
    q, s = torch.randn(4, 4, generator=draw) + 4 * torch.eye(4), torch.tensor(0.5, dtype=torch.float64)
    w, x = torch.randn(4, 4, generator=draw), torch.randn(3, 4, generator=draw)
    want = gm(q, s, w, x)
    # qᵀ, the solve, its transpose and the scale's cast: 4 nodes computed from q and s alone
    assert len(invariant_nodes(gm.graph, index=False, roots={placeholders["q"], placeholders["s"]})) == 4

    assert FoldAdapterConstants({placeholders["q"]: q, placeholders["s"]: s})(gm).modified
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.linalg_solve.default not in targets and aten._to_copy.default not in targets
    # the rotation and the cast scale, one constant each; the rotation's transpose stays a view of its constant,
    # as the traced weight's stays one of the weight
    assert [n.target for n in gm.graph.nodes if n.op == "get_attr"] == [FOLDED % 0, FOLDED % 1]
    (rotation_t,) = [n for n in gm.graph.nodes if n.target == aten.t.default and n.args[0].op == "get_attr"]
    assert rotation_t.args[0].target == FOLDED % 0 and targets.count(aten.t.default) == 2
    torch.testing.assert_close(gm(q, s, w, x), want, rtol=0, atol=0)  # the same torch ops computed it


def test_only_adapter_tensors_are_roots() -> None:
    """A traced weight (not added state) or no values at all: nothing is folded, not even the weight's transpose."""
    gm, placeholders = small_graph()
    before = [n.target for n in gm.graph.nodes]
    assert not FoldAdapterConstants({placeholders["w"]: torch.zeros(4, 4)})(gm).modified
    assert not FoldAdapterConstants({})(gm).modified
    assert [n.target for n in gm.graph.nodes] == before
