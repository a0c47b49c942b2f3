"""The adapt pass: splice each adapter's subgraph beside the ops that consume its module's weight.

Method-agnostic: it finds the sites of every adapted module, adds the adapter's tensors as
graph inputs, lets the method emit its subgraph, and reroutes the base op's consumers.
"""

from __future__ import annotations

import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from peftc.errors import TargetError
from peftc.graph import SiteBuilder, add_state_input
from peftc.method import ModuleAdapter
from peftc.sites import sites_by_module


def insert_adapters(
    gm: torch.fx.GraphModule, adapters: dict[str, list[ModuleAdapter]], training: bool
) -> PassResult:
    """Rewrite `gm` in place; `adapters` maps module path -> adapters active there, applied in order."""
    sites = sites_by_module(gm.graph)
    modified = False
    for path, module_adapters in adapters.items():
        for site in sites.get(path, []):
            y = site.node
            for ma in module_adapters:
                allowed = ma.method.site_ops[ma.kind]
                if site.op not in allowed:
                    raise TargetError(
                        f"module {path!r} ({ma.method.layer_types[ma.kind]}) is used by aten.{site.op} in the "
                        f"graph; {ma.method.peft_type} adapts it only at {', '.join('aten.' + o for o in allowed)}"
                    )
                inputs = {key: add_state_input(gm, fqn, t) for key, (fqn, t) in ma.tensors.items()}
                b = SiteBuilder(gm.graph, y, (path, ma.adapter, ma.method.peft_type))
                new = ma.method.emit(b, site, y, ma.kind, inputs, ma.config, training)
                b.reroute(new)
                y = new
                modified = True
            if not site.node.users:  # a method recomputed the op (IA3 feed-forward, OFT): drop the old one
                gm.graph.erase_node(site.node)
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, modified)
