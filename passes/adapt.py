"""The adapt pass: splice each adapter's subgraph beside the ops that consume its module's weight.

Method-agnostic: it finds the sites of every adapted module, adds the adapter's tensors as
graph inputs, lets the method emit its subgraph, and reroutes the base op's consumers.
"""

from __future__ import annotations

import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from peftc.capture import STATE
from peftc.errors import TargetError
from peftc.graph import STATE_WRITE, SiteBuilder, add_state_input
from peftc.method import EmitContext, ModuleAdapter
from peftc.sites import ADAPTER, WEIGHT_OPS, Site, find_sites, module_path, sites_by_module


class InsertAdapters(PassBase):
    """before: y = op(x, W)                      (each site of an adapted module)
    after:  y' = emit(y, x, adapter tensors)   for each adapter there, in order; y's consumers read y'

    `adapters` maps module path -> the adapters active there; `placed` -> every adapter placed there, which
    a method that `reads_beside` (an Arrow router) gets beside its own tensors."""

    def __init__(self, adapters: dict[str, list[ModuleAdapter]], training: bool,
                 placed: dict[str, list[ModuleAdapter]] | None = None) -> None:
        self.adapters = adapters
        self.training = training
        self.placed = placed or {}

    def requires(self, gm: torch.fx.GraphModule) -> None:
        again = {n.meta[ADAPTER][:2] for n in gm.graph.nodes if ADAPTER in n.meta} \
            & {(path, ma.adapter) for path, mas in self.adapters.items() for ma in mas}
        if again:
            raise AssertionError(f"adapters already inserted: {sorted(again)[:4]}")

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        sites = sites_by_module(gm.graph)
        modified, replaced = False, []
        for path, module_adapters in self.adapters.items():
            if path not in sites:
                check_unused_weights(gm.graph, path)
            for site in sites.get(path, []):
                y = site.node
                for ma in module_adapters:
                    check_site_op(site, ma)
                    inputs = {key: add_state_input(gm, fqn, t) for key, (fqn, t) in ma.tensors.items()}
                    beside = [(other.adapter, other.config,
                               {key: add_state_input(gm, fqn, t) for key, (fqn, t) in other.tensors.items()})
                              for other in self.placed.get(path, []) if other is not ma] \
                        if ma.method.reads_beside(ma.config) else []
                    b = SiteBuilder(gm.graph, y, (path, ma.adapter, ma.method.peft_type), site.node.name)
                    new = ma.method.emit(EmitContext(b, site, y, ma.kind, self.training, tensors=inputs,
                                                     config=ma.config, beside=beside))
                    b.reroute(new)
                    if "val" not in new.meta and "val" in y.meta:
                        # the adapted value has the site's shape and dtype: an adapter at a module reading it
                        # (a -> b, nothing between) casts its input to its own dtype by this (bf16 base, fp32 adapter)
                        new.meta["val"] = y.meta["val"]
                    y = new
                    modified = True
                replaced.append(site.node)
        # a method that recomputes the base op (IA3 feed-forward, OFT) leaves the old op without users, and a
        # second such adapter at one site leaves the first one's recomputation: drop them (but keep a draw that
        # only advances the RNG, as BOFT's dropout does to follow PEFT's random stream, and a value written back
        # to a model tensor: passes/state_writes.py makes it an output)
        for node in reversed(list(gm.graph.nodes)):
            if not node.users and (ADAPTER in node.meta or node in replaced) and not node.is_impure() \
                    and STATE_WRITE not in node.meta:
                gm.graph.erase_node(node)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, modified)

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        placed = {n.meta[ADAPTER][:2] for n in gm.graph.nodes if ADAPTER in n.meta}
        sited = {site.module_path for site in find_sites(gm.graph)}
        missing = [(path, ma.adapter) for path, mas in self.adapters.items() if path in sited for ma in mas
                   if (path, ma.adapter) not in placed]
        if missing:
            raise AssertionError(f"adapters with no node at their sites: {missing[:4]}")


def check_site_op(site: Site, ma: ModuleAdapter) -> None:
    """The op consuming the module's weight is one the method knows how to adapt for this layer kind."""
    allowed = ma.method.site_ops[ma.kind]
    if site.op not in allowed:
        raise TargetError(
            f"module {site.module_path!r} ({ma.method.layer_types[ma.kind]}) is used by aten.{site.op} in the "
            f"graph; {ma.method.peft_type} adapts it only at {', '.join('aten.' + o for o in allowed)}"
        )


def check_unused_weights(graph: torch.fx.Graph, path: str) -> None:
    """A targeted module with no site: fine if the graph never calls it (PEFT also adds adapters that
    never run), an error if its parameters reach other ops (the adapter would silently do nothing)."""
    users = sorted({f"aten.{n.target._overloadpacket.__name__}" for n in graph.nodes
                    if n.op == "call_function" and module_path(n) == path and hasattr(n.target, "_overloadpacket")
                    and any(a.op == "placeholder" and STATE in a.meta for a in n.all_input_nodes)})
    if users:
        adaptable = sorted({"aten." + op._overloadpacket.__name__ for op in WEIGHT_OPS})
        raise TargetError(
            f"module {path!r} is targeted, but its parameters reach only {', '.join(users)} in the graph, "
            f"not an op an adapter can be placed at ({', '.join(adaptable)})"
        )
