"""The graph index: every op that consumes a parameter, with the module it came from.

A site is found from the graph, not the module tree: the op (linear, addmm, embedding,
conv, mm, matmul), its weight placeholder, its activation input, and the module path from
the node's `nn_module_stack`. Tied weights show up naturally: GPT-2's `lm_head` and `wte`
read the same placeholder, but each op keeps its own module path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx

from .capture import STATE

ADAPTER = "peftc_adapter"  # node meta on nodes a rewrite inserted: (module_path, adapter, method)

aten = torch.ops.aten

# op -> (index of the activation input, index of the weight)
WEIGHT_OPS: dict[object, tuple[int, int]] = {
    aten.linear.default: (0, 1),
    aten.addmm.default: (1, 2),  # transformers Conv1D: bias + x @ W, W stored (in, out)
    aten.mm.default: (0, 1),
    aten.matmul.default: (0, 1),
    aten.embedding.default: (1, 0),
    aten.conv1d.default: (0, 1),
    aten.conv2d.default: (0, 1),
    aten.conv3d.default: (0, 1),
    aten.convolution.default: (0, 1),
}


@dataclass(frozen=True)
class Site:
    node: torch.fx.Node  # the op consuming the weight
    module_path: str  # module the op was called from ("" for the root)
    weight: torch.fx.Node  # placeholder of the weight

    @property
    def input(self) -> torch.fx.Node:
        """The activation (or index) input, read from the op now: a rewrite of an earlier site reroutes its
        consumers, so a value remembered when the site was found could be that site's unadapted output."""
        return self.node.args[WEIGHT_OPS[self.node.target][0]]

    @property
    def op(self) -> str:
        return self.node.target._overloadpacket.__name__  # "linear", "addmm", "embedding", ...

    @property
    def weight_fqn(self) -> str:
        return self.weight.meta[STATE]


def module_path(node: torch.fx.Node) -> str:
    """The innermost module a node was traced in, as a dotted path ("" at the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # strict-mode style paths ("L['self'].layers[0]") and repeated-call suffixes ("@1")
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return re.sub(r"@\d+$", "", path)


def find_sites(graph: torch.fx.Graph) -> list[Site]:
    """Every op in `graph` whose weight argument is a model parameter or buffer."""
    sites = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in WEIGHT_OPS or ADAPTER in node.meta:
            continue  # ops a rewrite inserted (LoHa's factor products) are not sites
        x_i, w_i = WEIGHT_OPS[node.target]
        if len(node.args) <= max(x_i, w_i):
            continue
        weight = node.args[w_i]
        if isinstance(weight, torch.fx.Node) and weight.op == "placeholder" and STATE in weight.meta:
            sites.append(Site(node=node, module_path=module_path(node), weight=weight))
    return sites


def sites_by_module(graph: torch.fx.Graph) -> dict[str, list[Site]]:
    out: dict[str, list[Site]] = {}
    for site in find_sites(graph):
        out.setdefault(site.module_path, []).append(site)
    return out
