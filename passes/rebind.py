"""Rebinding a model tensor inside one module: the uses of a state placeholder by nodes traced in that
module (or below it) read a new value instead, built in the graph right before the first such use.

The rewrite for adapters that act on a weight itself rather than beside an op (LoRA's
`target_parameters`), for modules trained as copies (`modules_to_save`: the copy's placeholder), and for
folding them (the merged tensor's placeholder).
Uses outside the module, a tied copy elsewhere, keep reading the base tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from peftc.capture import STATE
from peftc.errors import TargetError
from peftc.graph import SiteBuilder, add_state_input, drop_unused_state
from peftc.method import ModuleAdapter
from peftc.sites import module_path


def inside(path: str, owner: str) -> bool:
    return not owner or path == owner or path.startswith(owner + ".")


def rebind_uses(
    gm: torch.fx.GraphModule, fqns: Collection[str], owner: str,
    build: Callable[[SiteBuilder, torch.fx.Node], torch.fx.Node], tag: tuple[str, str, str],
) -> bool:
    """Make the nodes traced inside module `owner` read `build(builder, placeholder)` in place of the state
    placeholder of the tensor named `fqns` (a tied tensor has several names, the graph one of them); False
    if the graph never reads it. An error if it is read only outside `owner`."""
    # a tied tensor may be lifted once per name (each with its own uses): rebind the uses of all of them
    placeholders = [n for n in gm.graph.find_nodes(op="placeholder") if n.meta.get(STATE) in fqns and n.users]
    if not placeholders:
        return False
    uses = [(p, u) for p in placeholders for u in p.users if inside(module_path(u), owner)]
    if not uses:
        where = sorted({module_path(u) for p in placeholders for u in p.users})
        raise TargetError(f"{placeholders[0].meta[STATE]} is targeted in module {owner!r}, but the graph reads it "
                          f"only in {where}")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    placeholder, first = min(uses, key=lambda use: order[use[1]])
    b = SiteBuilder(gm.graph, first.prev, tag, first.name)
    new = build(b, placeholder)
    for node in b.nodes:  # they belong to the module that reads them, not to the node they follow
        node.meta["nn_module_stack"] = dict(first.meta.get("nn_module_stack", {}))
    for p, user in uses:
        user.replace_input_with(p, new)
    drop_unused_state(gm, placeholders)
    return True


# (state names of a tensor, the module whose nodes read it, the new tensor's name, the new tensor)
Binding = tuple[frozenset[str], str, str, torch.Tensor]


class RebindToTensors(PassBase):
    """before: h = op(..., W, ...)         (nodes traced inside the binding's module)
    after:  h = op(..., W_new, ...)     (a merged parameter, a module's trained copy); no node is inserted"""

    def __init__(self, bindings: list[Binding]) -> None:
        self.bindings = bindings

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        modified = False
        for fqns, owner, fqn, t in self.bindings:
            modified |= rebind_uses(gm, fqns, owner, lambda b, w, fqn=fqn, t=t: add_state_input(gm, fqn, t),
                                    (owner, "", "REBIND"))
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, modified)


def partition(adapters: dict[str, list[ModuleAdapter]], cls: type) -> tuple[dict, dict]:
    """(the other adapters, those of type `cls`), each by module path."""
    others, chosen = {}, {}
    for path, mas in adapters.items():
        (chosen if isinstance(mas[0], cls) else others)[path] = mas
    return others, chosen
