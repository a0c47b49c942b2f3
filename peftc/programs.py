"""The capture cache: base graphs by call signature, bounded, least recently used first out.

A base graph is specialised on its signature (`capture.signature_key`) and guarded on shapes and
symbolic ints (`CapturedGraph.accepts`); several graphs may share a signature (a batch of 1
beside a dynamic batch). Each costs seconds to capture and holds a graph in memory, so the cache
keeps at most `limit` of them and forgets the one used least recently, as torch.compile's
`cache_size_limit` bounds recompiles.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from .capture import CapturedGraph

DEFAULT_LIMIT = 16


class CaptureCache:
    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 1:
            raise ValueError(f"a capture cache holds at least one graph, got limit={limit}")
        self.limit = limit
        self._graphs: OrderedDict[int, tuple[tuple, CapturedGraph]] = OrderedDict()  # id -> (key, graph)

    def __len__(self) -> int:
        return len(self._graphs)

    def __iter__(self):
        return (graph for _, graph in self._graphs.values())

    def lookup(self, key: tuple, flat_inputs: list[Any]) -> CapturedGraph | None:
        """The graph of this signature that accepts these inputs (now the most recently used), or None."""
        for ident, (graph_key, graph) in reversed(self._graphs.items()):
            if graph_key == key and graph.accepts(flat_inputs):
                self._graphs.move_to_end(ident)
                return graph
        return None

    def add(self, key: tuple, graph: CapturedGraph) -> list[CapturedGraph]:
        """Keep `graph`; returns the graphs evicted to stay within the limit (their programs must go too)."""
        self._graphs[id(graph)] = (key, graph)
        evicted = []
        while len(self._graphs) > self.limit:
            _, (_, old) = self._graphs.popitem(last=False)
            evicted.append(old)
        return evicted

    def clear(self) -> None:
        self._graphs.clear()

    def copy(self) -> CaptureCache:
        """A cache holding the same graphs (base graphs are never mutated, so they can be shared)."""
        other = CaptureCache(self.limit)
        other._graphs = OrderedDict(self._graphs)
        return other
