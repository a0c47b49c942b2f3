"""Inspecting a rewrite: what was inserted where, as data a test or a person can check.

    import peftc.inspect as pi
    pi.adapter_sites(am)                # one record per (site, adapter): op, method, rank, params, nodes
    pi.graph_diff(base, am)             # nodes added per site, op counts before/after
    pi.to_networkx(am)                  # the adapted graph as a networkx DiGraph
    pi.inserted_subgraph(am, "lin0")    # the base op, its inputs, the inserted nodes, their consumers
    pi.draw_site(am, "lin0", "lin0.png")

Everything is read from the graph itself. Nodes a rewrite inserted carry `peftc.graph.ADAPTER`
meta (module path, adapter, method); `SiteBuilder` places them right after the op they adapt,
so the base op of a group of inserted nodes is the nearest op before them that `peftc.sites`
finds for the same module. Wherever a graph is expected, a `torch.fx.Graph`, a `GraphModule`,
a `CapturedGraph` or an `AdaptedModel` (its first graph: the one `apply` built) may be passed.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx

from . import names
from .capture import STATE, USER
from .errors import TargetError, closest
from .graph import ADAPTER, REISSUED, SITE, adapter_nodes
from .sites import module_path


def as_graph(obj: Any) -> torch.fx.Graph:
    """The fx graph `obj` stands for (Graph, GraphModule, CapturedGraph or AdaptedModel)."""
    if isinstance(obj, torch.fx.Graph):
        return obj
    if isinstance(obj, torch.fx.GraphModule):
        return obj.graph
    if isinstance(getattr(obj, "gm", None), torch.fx.GraphModule):  # CapturedGraph
        return obj.gm.graph
    if hasattr(obj, "graphs"):  # AdaptedModel
        if not obj.graphs:
            raise ValueError("the adapted model has built no graph yet: call it once, or pass am.graph_for(...)")
        return obj.graphs[0].gm.graph
    raise TypeError(f"expected a torch.fx Graph, GraphModule, CapturedGraph or AdaptedModel, got {type(obj).__name__}")


def op_name(node: torch.fx.Node) -> str:
    """'aten.linear', 'aten.mul.Tensor': a call's target without the '.default' overload."""
    return str(node.target).removesuffix(".default")


def op_counts(graph_like: Any) -> Counter[str]:
    """How many calls of each op the graph makes."""
    return Counter(op_name(n) for n in as_graph(graph_like).nodes if n.op == "call_function")


def count_ops(graph_like: Any, op: Any) -> int:
    """Calls of `op`: an OpOverload (`aten.linear.default`), a packet (`aten.mul`, every overload),
    or a name ('aten.mul.Tensor', 'aten.linear', 'linear')."""
    graph = as_graph(graph_like)
    if isinstance(op, torch._ops.OpOverload):
        return sum(1 for n in graph.nodes if n.op == "call_function" and n.target == op)
    wanted = str(op)  # a packet prints as 'aten.mul'

    def names_of(n: torch.fx.Node) -> tuple[str, ...]:
        full = str(n.target)  # 'aten.mul.Tensor'
        packet = full.rsplit(".", 1)[0] if isinstance(n.target, torch._ops.OpOverload) else full
        return full, op_name(n), packet, packet.rsplit(".", 1)[-1]

    return sum(1 for n in graph.nodes if n.op == "call_function" and wanted in names_of(n))


@dataclass
class SiteRecord:
    """One adapter at one site: the nodes a rewrite inserted beside one base op."""

    module_path: str
    op: str | None  # the base op ('aten.linear'); None if the graph no longer has it
    base_node: str | None  # its node's name
    method: str  # PEFT's peft_type ('LORA'), or the pass's tag ('DISPATCH')
    adapter: str
    rank: int | None  # where the method has one and the adapted model is known
    params: dict[str, tuple[int, ...]]  # FQN -> shape of the adapter parameters the inserted nodes read
    nodes: tuple[str, ...]  # names of the inserted nodes, in graph order

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)


def _groups(graph: torch.fx.Graph) -> list[tuple[torch.fx.Node | None, tuple[str, str, str], list[torch.fx.Node]]]:
    """(base op, tag, inserted nodes) per site and adapter, in graph order."""
    by_name = {n.name: n for n in graph.nodes}
    groups: dict[tuple[str | None, tuple], list[torch.fx.Node]] = {}
    reissued: dict[tuple[str | None, tuple], torch.fx.Node] = {}
    for node in graph.nodes:
        tag = node.meta.get(ADAPTER)
        if tag is None:
            continue
        key = (node.meta.get(SITE), tag)
        if REISSUED in node.meta:  # the site's op, run again by the method: it stands for the erased original
            reissued[key] = node
        else:
            groups.setdefault(key, []).append(node)
    return [(reissued.get((site, tag), by_name.get(site)), tag, nodes) for (site, tag), nodes in groups.items()]


def _param_groups() -> set[str]:
    """Every registered method's parameter groups ('lora_A', 'ia3_l', ...): what makes an input a parameter."""
    from peftc.passes import METHODS

    return {g for m in METHODS.values() for g in m.groups}


def _shape(node: torch.fx.Node) -> tuple[int | torch.SymInt, ...]:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def _rank(model: Any, path: str, adapter: str) -> int | None:
    config = getattr(model, "peft_config", {}).get(adapter)
    if config is None:
        return None
    from peftc.passes import METHODS

    return METHODS[config.peft_type].settings(config, path).get("r")


def adapter_sites(am_or_graph: Any) -> list[SiteRecord]:
    """One record per adapter per site, in graph order. Ranks need the adapted model (its configs)."""
    graph = as_graph(am_or_graph)
    groups = _param_groups()
    records = []
    for base, (path, adapter, method), nodes in _groups(graph):
        params = {}
        for n in nodes:
            for inp in n.all_input_nodes:
                fqn = inp.meta.get(STATE)
                if fqn and fqn.removeprefix(f"{names.PREFIX}{path}.").split(".")[0] in groups:
                    params.setdefault(fqn, _shape(inp))
        records.append(SiteRecord(
            module_path=path,
            op=op_name(base) if base is not None else None,
            base_node=base.name if base is not None else None,
            method=method,
            adapter=adapter,
            rank=_rank(am_or_graph, path, adapter),
            params=params,
            nodes=tuple(n.name for n in nodes),
        ))
    return records


@dataclass
class GraphDiff:
    """What a rewrite changed: the sites it adapted and the op counts before and after."""

    sites: list[SiteRecord]
    before: Counter[str]
    after: Counter[str]
    inserted: Counter[str]  # op counts of the nodes tagged as inserted

    @property
    def added(self) -> dict[str, int]:
        """op -> change in its count, for every op whose count changed."""
        return {op: self.after[op] - self.before[op] for op in sorted(set(self.before) | set(self.after))
                if self.after[op] != self.before[op]}

    @property
    def unexplained(self) -> dict[str, int]:
        """Ops whose count changed by other than the tagged inserted nodes (empty for a clean rewrite)."""
        return {op: n for op, n in self.added.items() if n != self.inserted[op]} | {
            op: 0 for op in self.inserted if op not in self.added
        }


def graph_diff(base: Any, adapted: Any) -> GraphDiff:
    """Compare a base capture (`peftc.capture.capture(...)`) with its rewrite."""
    adapted_graph = as_graph(adapted)
    return GraphDiff(
        sites=adapter_sites(adapted),
        before=op_counts(base),
        after=op_counts(adapted_graph),
        inserted=Counter(op_name(n) for n in adapter_nodes(adapted_graph)
                         if n.op == "call_function" and REISSUED not in n.meta),
    )


def to_networkx(graph_like: Any, nodes: Iterable[torch.fx.Node] | None = None) -> nx.DiGraph:
    """The graph (or the part of it made of `nodes`) as a DiGraph: one node per fx node, keyed by
    its name, with an edge from each input to its user.

    Node attributes: `op` (fx opcode), `target` ('aten.linear', a tensor's FQN, an input's name),
    `module` (module path), `adapter` / `method` (None unless inserted), `tensor` (the FQN a
    state placeholder stands for), `shape`.
    """
    graph = as_graph(graph_like)
    chosen = list(graph.nodes) if nodes is None else list(nodes)
    keep = set(chosen)
    g = nx.DiGraph()
    for n in chosen:
        tag = n.meta.get(ADAPTER)
        g.add_node(
            n.name,
            op=n.op,
            target=op_name(n) if n.op == "call_function" else str(n.target),
            module=module_path(n),
            adapter=tag[1] if tag else None,
            method=tag[2] if tag else None,
            tensor=n.meta.get(STATE),
            shape=_shape(n),
        )
    for n in chosen:
        for inp in n.all_input_nodes:
            if inp in keep:
                g.add_edge(inp.name, n.name)
    return g


@dataclass
class InsertedSubgraph:
    """The rewrite at one module: its base op(s), the inserted nodes, and what they connect to."""

    module_path: str
    sites: list[torch.fx.Node]  # the base op(s) the adapters sit beside
    nodes: list[torch.fx.Node]  # inserted nodes, in graph order
    inputs: list[torch.fx.Node]  # nodes outside that feed `sites` or `nodes`: activations, weights, adapter tensors
    outputs: list[torch.fx.Node]  # nodes outside that read them: the consumers the rewrite rerouted

    @property
    def all_nodes(self) -> list[torch.fx.Node]:
        return [*self.inputs, *self.sites, *self.nodes, *self.outputs]


def inserted_subgraph(graph_like: Any, module_path: str, adapter: str | None = None) -> InsertedSubgraph:
    """The nodes inserted at `module_path` (those of one adapter if given), with their base op(s)."""
    graph = as_graph(graph_like)
    groups = _groups(graph)
    chosen = [(base, nodes) for base, tag, nodes in groups
              if tag[0] == module_path and (adapter is None or tag[1] == adapter)]
    if not chosen:
        adapted = sorted({tag[0] for _, tag, _ in groups})
        hint = closest(module_path, adapted, 3) or adapted[:5]
        what = f"adapter {adapter!r} at module {module_path!r}" if adapter else f"module {module_path!r}"
        raise TargetError(f"no nodes were inserted for {what}; adapted modules include: {', '.join(hint) or 'none'}")
    sites = list(dict.fromkeys(base for base, _ in chosen if base is not None))
    inserted = [n for _, nodes in chosen for n in nodes]
    inside = set(sites) | set(inserted)
    inputs = [i for n in [*sites, *inserted] for i in n.all_input_nodes if i not in inside]
    outputs = [u for n in [*sites, *inserted] for u in n.users if u not in inside]
    order = {n: i for i, n in enumerate(graph.nodes)}
    return InsertedSubgraph(
        module_path=module_path,
        sites=sites,
        nodes=sorted(inserted, key=order.__getitem__),
        inputs=sorted(dict.fromkeys(inputs), key=order.__getitem__),
        outputs=sorted(dict.fromkeys(outputs), key=order.__getitem__),
    )


def assert_no_adapter_nodes(graph_like: Any) -> None:
    """Raise AssertionError naming every inserted node still in the graph (after a fold, say)."""
    groups = _groups(as_graph(graph_like))
    if not groups:
        return
    lines = [f"{path} [{adapter}, {method}]: {', '.join(n.name for n in nodes)}"
             for _, (path, adapter, method), nodes in groups]
    total = sum(len(nodes) for _, _, nodes in groups)
    raise AssertionError(f"{total} adapter node(s) remain at {len(groups)} site(s):\n  " + "\n  ".join(lines))


# -- drawing ------------------------------------------------------------------------------------------

CHAR_WIDTH = 0.067  # inches per character of 8 pt monospace
TITLE_CHAR_WIDTH = 0.075  # about, for the 10 pt title

COLORS = {
    "base op": "#9ecae1",
    "inserted": "#fdae6b",
    "adapter tensor": "#fee6ce",
    "input / consumer": "#eeeeee",
}


def _role(node: torch.fx.Node, sub: InsertedSubgraph) -> str:
    if node in sub.sites:
        return "base op"
    if node in sub.nodes:
        return "inserted"
    if STATE in node.meta and not any(node in s.all_input_nodes for s in sub.sites):
        return "adapter tensor"
    return "input / consumer"


def _label(node: torch.fx.Node, module: str) -> str:
    has_shape = isinstance(node.meta.get("val"), torch.Tensor)
    shape = "[" + ", ".join(str(d) for d in _shape(node)) + "]" if has_shape else ""
    if node.op == "placeholder":
        fqn = node.meta.get(STATE)
        if fqn is None:
            name = f"input {node.name}" if USER in node.meta else node.name
        else:
            name = fqn.removeprefix(names.PREFIX).removeprefix(f"{module}.")
        return f"{name}\n{shape}".strip()
    if node.op == "call_function":
        return f"{op_name(node).removeprefix('aten.').split('.')[0]}\n{shape}".strip()
    return node.name


def _layers(g: nx.DiGraph) -> dict[Any, int]:
    """A layer per node: longest path from the sources, with each source moved down to sit just
    above its first user (so a weight is drawn beside the op that reads it)."""
    layer = {}
    for depth, generation in enumerate(nx.topological_generations(g)):
        for name in generation:
            layer[name] = depth
    for name in layer:
        if g.in_degree(name) == 0 and g.out_degree(name):
            layer[name] = min(layer[s] for s in g.successors(name)) - 1
    low = min(layer.values())
    return {n: d - low for n, d in layer.items()}


ROW_HEIGHT, GAP, DUMMY_WIDTH = 0.8, 0.3, 0.1  # inches


def _layout(g: nx.DiGraph, widths: dict[str, float], order: dict[str, int]) -> tuple[dict, dict]:
    """A layered (Sugiyama-style) layout in inches: node -> (x, y), and edge -> its route.

    Edges spanning several layers pass through dummy points, so they are routed around the nodes
    in between; rows are ordered by barycentre sweeps, then nodes pulled towards their neighbours.
    """
    layer = _layers(g)
    h = nx.DiGraph()
    h.add_nodes_from(g.nodes)
    routes = {}
    for u, v in g.edges:
        route = [u, *((u, v, k) for k in range(layer[u] + 1, layer[v])), v]
        for k, point in enumerate(route[1:-1], layer[u] + 1):
            layer[point] = k
        nx.add_path(h, route)
        routes[(u, v)] = route
    width = {n: widths.get(n, DUMMY_WIDTH) for n in h}
    rows: dict[int, list] = {}
    for n in sorted(h, key=lambda n: (order[n] if n in order else order[n[0]] + 0.5)):
        rows.setdefault(layer[n], []).append(n)
    depths = sorted(rows)

    def sweep(neighbours: Any, key_of: dict) -> None:
        for d in depths:
            row = rows[d]
            score = {n: [key_of[m] for m in neighbours(n) if m in key_of] for n in row}
            here = {n: i for i, n in enumerate(row)}
            row.sort(key=lambda n: sum(score[n]) / len(score[n]) if score[n] else here[n])
            key_of.update({n: i for i, n in enumerate(row)})

    for _ in range(3):
        sweep(h.predecessors, {})
        depths.reverse()
        sweep(h.successors, {})
        depths.reverse()

    x: dict[Any, float] = {}
    for d in depths:  # packed rows, centred
        total = sum(width[n] for n in rows[d]) + GAP * (len(rows[d]) - 1)
        left = -total / 2
        for n in rows[d]:
            x[n] = left + width[n] / 2
            left += width[n] + GAP
    for _ in range(4):  # pull each node towards its neighbours' mean x, keeping order and spacing
        for neighbours, seq in ((h.predecessors, depths), (h.successors, depths[::-1])):
            for d in seq:
                row = rows[d]
                want = [sum(x[m] for m in neighbours(n)) / len(list(neighbours(n))) if list(neighbours(n)) else x[n]
                        for n in row]
                placed = []
                for i, n in enumerate(row):
                    lo = placed[-1] + (width[row[i - 1]] + width[n]) / 2 + GAP if placed else -float("inf")
                    placed.append(max(want[i], lo))
                shift = sum(w - p for w, p in zip(want, placed)) / len(row)
                for n, p in zip(row, placed):
                    x[n] = p + shift
    pos = {n: (x[n], -ROW_HEIGHT * layer[n]) for n in h}
    return pos, routes


def draw_site(
    graph_like: Any, module_path: str, path: str | os.PathLike, adapter: str | None = None
) -> InsertedSubgraph:
    """Draw the rewrite at one module (base op, its inputs, inserted nodes, consumers) to a .png or .svg."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".png", ".svg"):
        raise ValueError(f"{path}: can draw to .png or .svg, not {ext or 'a file without extension'!r}")
    graph = as_graph(graph_like)
    sub = inserted_subgraph(graph, module_path, adapter)

    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    nodes = sub.all_nodes
    by_name = {n.name: n for n in nodes}
    labels = {n.name: _label(n, module_path) for n in nodes}
    widths = {name: CHAR_WIDTH * max(map(len, text.splitlines())) + 0.2 for name, text in labels.items()}
    g = to_networkx(graph, nodes)
    pos, routes = _layout(g, widths, {n.name: i for i, n in enumerate(graph.nodes)})

    sites = ", ".join(sorted({op_name(s) for s in sub.sites})) or "?"
    tags = "; ".join(f"adapter {a!r} ({m})" for a, m in sorted({n.meta[ADAPTER][1:] for n in sub.nodes}))
    title = f"{module_path}\n{len(sub.nodes)} node(s) inserted beside {sites}: {tags}"

    ys = [y for _, y in pos.values()]
    left = min(x - widths.get(n, 0) / 2 for n, (x, _) in pos.items()) - 0.2
    right = max(x + widths.get(n, 0) / 2 for n, (x, _) in pos.items()) + 0.2
    size = (max(right - left, 6.5, TITLE_CHAR_WIDTH * max(map(len, title.splitlines()))), max(ys) - min(ys) + 2.2)
    fig = Figure(figsize=size, dpi=120)
    ax = fig.add_axes((0, 0, 1, 1))  # axes in inches, 1:1, filling the figure
    ax.set_axis_off()
    centre, bottom = (left + right) / 2, min(ys) - 0.5
    ax.set_xlim(centre - size[0] / 2, centre + size[0] / 2)
    ax.set_ylim(bottom, bottom + size[1])
    ax.text(centre, bottom + size[1] - 0.3, title, ha="center", va="center", fontsize=10, linespacing=1.5)
    ax.legend(handles=[Patch(fc=c, ec="#555555", label=r) for r, c in COLORS.items()], loc="upper center",
              bbox_to_anchor=(0.5, 1 - 0.75 / size[1]), ncol=len(COLORS), fontsize=8, frameon=False)
    boxes = {}
    for name, node in by_name.items():
        # boxes draw before arrows (lower zorder), so each arrow is clipped at the box it meets
        boxes[name] = ax.text(
            *pos[name], labels[name], ha="center", va="center", fontsize=8, family="monospace", zorder=1,
            bbox={"boxstyle": "round,pad=0.4", "fc": COLORS[_role(node, sub)], "ec": "#555555",
                  "ls": "--" if node in sub.outputs else "-"},
        )
    for (u, v), route in routes.items():
        points = [pos[p] for p in route]
        for k, (a, b) in enumerate(zip(points, points[1:])):
            first, last = k == 0, k == len(points) - 2
            ax.annotate(
                "", xy=b, xytext=a, zorder=2,
                arrowprops={"arrowstyle": "-|>" if last else "-", "color": "#444444", "lw": 1.0,
                            "shrinkA": 1 if first else 0, "shrinkB": 1 if last else 0,
                            "patchA": boxes[u].get_bbox_patch() if first else None,
                            "patchB": boxes[v].get_bbox_patch() if last else None},
            )
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG text stays text: searchable, smaller
        fig.savefig(path)
    return sub
