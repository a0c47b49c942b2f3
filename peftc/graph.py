"""Building nodes in a captured graph: the one place rewrites create nodes and inputs.

Inserted nodes carry `ADAPTER` meta (module path, adapter name, method) so inspection and the
fold pass can find every node a rewrite added, and copy the base op's `nn_module_stack` so
provenance survives the rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from .capture import STATE, USER

aten = torch.ops.aten

ADAPTER = "peftc_adapter"  # node meta on inserted nodes: (module_path, adapter, method)


def add_state_input(gm: torch.fx.GraphModule, fqn: str, example: torch.Tensor) -> torch.fx.Node:
    """A placeholder for a model tensor, placed after the other state inputs (the calling convention)."""
    graph = gm.graph
    for node in graph.find_nodes(op="placeholder"):
        if node.meta.get(STATE) == fqn:
            return node
    first_user = next((n for n in graph.find_nodes(op="placeholder") if USER in n.meta), None)
    ctx = graph.inserting_before(first_user) if first_user is not None else graph.inserting_after(
        list(graph.find_nodes(op="placeholder"))[-1]
    )
    with ctx:
        node = graph.placeholder(_node_name(fqn))
    node.meta[STATE] = fqn
    node.meta["val"] = torch.empty(example.shape, dtype=example.dtype, device="meta")
    return node


def _node_name(fqn: str) -> str:
    return "p_" + fqn.removeprefix("base_model.model.").replace(".", "_")


@dataclass
class SiteBuilder:
    """Appends nodes after `anchor`, in order, tagged as belonging to one adapter at one site."""

    graph: torch.fx.Graph
    anchor: torch.fx.Node
    tag: tuple[str, str, str]
    nodes: list[torch.fx.Node] = field(default_factory=list)

    def call(self, op: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
        with self.graph.inserting_after(self.nodes[-1] if self.nodes else self.anchor):
            node = self.graph.call_function(op, args, kwargs)
        node.meta[ADAPTER] = self.tag
        if "nn_module_stack" in self.anchor.meta:
            node.meta["nn_module_stack"] = dict(self.anchor.meta["nn_module_stack"])
        self.nodes.append(node)
        return node

    def reroute(self, new: torch.fx.Node) -> None:
        """Make the anchor's consumers read `new`, except the inserted nodes that compute it."""
        inserted = set(self.nodes)
        self.anchor.replace_all_uses_with(new, delete_user_cb=lambda user: user not in inserted)


def adapter_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """Every node a rewrite inserted."""
    return [n for n in graph.nodes if ADAPTER in n.meta]
