"""Eager lowering for inference: a low-rank branch beside a linear adds into the linear's output in place.

LoRA's site computes `y = x W^T` and `d = (x A^T) B^T` and returns `y + d`. Run eagerly that is two
output-sized tensors made and dropped per site: `d`, then the sum. Over a prompt (thousands of rows) they
are most of what an adapter costs: each is written, read back and freed, and a fresh large allocation
page-faults. `addmm_` computes `y += h B^T` in the matmul's own write: the branch then costs its two thin
matmuls and nothing else (on the bench's Llama, a site at 4,096 prompt rows: 3.7 ms -> 0.8 ms; at one decode
row, 19.6 -> 14.8 us). The rank-r product is formed before it is added, as in `y + d`: the results were
bit-equal in every shape measured.

Only inference programs get the pass (train graphs keep one definition for autograd and remat), and only
where the rewrite is exactly the same value: `y` is a linear's fresh output read by the add alone, and the
branch starts from that linear's own input, so both have the same rows. Under autocast each op's dtype is
chosen at run time, and `addmm_` (in place) would mix them: calls under autocast run programs lowered
without this pass (`peftc.programs.Programs.program`).
"""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from peftc.graph import example_value

aten = torch.ops.aten
LINEAR = aten.linear.default


class AccumulateLowRankInPlace(PassBase):
    """before: y = linear(x, W);  h = linear(x, A);  d = linear(h, B);  out = add(y, d)
    after:  rows = flatten(x);  h = linear(rows, A);  addmm_(view(y, [-1, n]), h, t(B));  out = y

    `rows` is shared by the branches reading one x (q, k and v): each site then costs its two thin matmuls,
    one of them writing into y, and a view."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        sites = [(node, *match) for node in graph.find_nodes(op="call_function", target=aten.add.Tensor)
                 if (match := low_rank_sum(node)) is not None]
        rows: dict[torch.fx.Node, torch.fx.Node] = {}
        for add, y, h, b in sites:
            x = h.args[0]
            if x not in rows:
                with graph.inserting_after(x):
                    rows[x] = graph.call_function(aten.flatten.using_ints, (x, 0, -2))
            h.args = (rows[x], *h.args[1:])
            with graph.inserting_before(add):
                # a view, never a copy: a sum written into a copy would be lost (a view that cannot be made
                # is an error instead)
                out = graph.call_function(aten.view.default, (y, [-1, y.meta["val"].shape[-1]]))
                graph.call_function(aten.addmm_.default, (out, h, graph.call_function(aten.t.default, (b,))))
            delta = add.args[1] if add.args[0] is y else add.args[0]
            add.replace_all_uses_with(y)
            graph.erase_node(add)
            graph.erase_node(delta)
        if sites:
            graph.lint()
            gm.recompile()
        return PassResult(gm, bool(sites))

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        left = [n.name for n in gm.graph.find_nodes(op="call_function", target=aten.add.Tensor) if low_rank_sum(n)]
        if left:
            raise AssertionError(f"low-rank sums still made out of place: {left[:4]}")


def low_rank_sum(add: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node] | None:
    """(y, h, B) where `add` is `linear(x, W) + linear(linear(x, A), B)` (either order) and the rewrite is
    exact: y, h and the branch's output are read once (by the add, the branch), B is a plain weight (no bias),
    x has rows and y a static width.
    (All three linears read x's dtype: aten.linear refuses mixed dtypes, and a mixed-precision branch casts x
    first, so it does not match.)"""
    if len(add.args) != 2 or add.kwargs or not all(isinstance(a, torch.fx.Node) for a in add.args):
        return None
    for y, d in (add.args, add.args[::-1]):
        if not (_linear(y) and _linear(d) and len(d.args) == 2 and len(y.users) == 1 and len(d.users) == 1):
            continue
        h = d.args[0]
        x, out = example_value(y.args[0]), example_value(y)  # None where a rewrite inserted it: not rewritten
        if (_linear(h) and h.args[0] is y.args[0] and len(h.users) == 1 and x is not None and x.dim() >= 2
                and out is not None and isinstance(out.shape[-1], int)):
            return y, h, d.args[1]
    return None


def _linear(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is LINEAR
