"""Programs: which graph a call runs. Base graphs are captured once per call signature and mode, kept in a
bounded cache, and rewritten (`pipeline.rewrite`) into one program per variant: the active adapters, merged
adapters, a mixed batch, adapters disabled.

A base graph is specialised on its signature (`capture.signature_key`) and guarded on shapes and the
trace's guards (`CapturedGraph.accepts`); several graphs may share a signature (a batch of 1
beside a dynamic batch). Each costs seconds to capture and holds a graph in memory, so the cache
keeps at most `limit` of them and forgets the one used least recently, as torch.compile's
`cache_size_limit` bounds recompiles.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from peftc.backends.eager import EagerProgram
from peftc.passes.dispatch import BASE_ONLY
from peftc.passes.remat import RematPlan

from .adapters import AdapterSet
from .capture import CapturedGraph, capture, flatten_call, leading_size, signature_key, tensor_call_kwargs
from .errors import ConfigError
from .merge import MergedState
from .method import methods_for
from .pipeline import canonicalize, eager_lowering, rewrite
from .state import ParameterTree

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

    def entries(self) -> list[tuple[tuple, CapturedGraph]]:
        """(signature key, graph) of every graph held, least recently used first."""
        return list(self._graphs.values())

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


class Programs:
    """Everything that decides which graph a call runs: the capture cache, the rewritten programs made from it,
    and the state a rewrite depends on besides the adapters (adapters disabled, adapters merged, remat).

    The public API the backends use: `program(args, kwargs, mixed)` gives the eager program for a call (and
    the flattened call), `checked_index` validates a per-sample `adapter_index`, `live` lists the programs
    still current (a backend drops what it derived from the others)."""

    def __init__(self, tree: ParameterTree, adapters: AdapterSet, call_defaults: dict[str, Any],
                 transformers: bool) -> None:
        self.tree = tree
        self.adapters = adapters
        self.call_defaults = call_defaults
        self.transformers = transformers
        self.captures = CaptureCache()
        self._programs: dict[tuple, EagerProgram] = {}
        self._under_autocast: dict[tuple, EagerProgram] = {}  # inference programs for calls under autocast
        self.disabled = False
        self.remat: RematPlan | None = None  # gradient checkpointing: train graphs get the remat pass
        self.merged = MergedState()
        # the state values the last calls wrote (`write_state`), with their gradient, by tensor name
        self.written: dict[str, torch.Tensor] = {}
        self._facts: dict[str, Any] = {}  # what `remembered` read off the model as captured

    def call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The kwargs a graph is called with: peftc's defaults (use_cache=False), scalars in tensor form."""
        kwargs = {**self.call_defaults, **kwargs}
        return tensor_call_kwargs(kwargs) if self.transformers else kwargs

    def program(self, args: tuple, kwargs: dict, training: bool, mixed: bool = False, kind: Any = None,
                ) -> tuple[EagerProgram, list[Any]]:
        """The program for this call (capturing and rewriting once per signature and variant), and its flat inputs.
        `kind` (a `peftc.generation.ProgramKind`) captures another kind of program than the model's forward
        (the KV-cache graph generate runs), called with that kind's own inputs and cached under its name."""
        kwargs = self.call_kwargs(kwargs) if kind is None else kwargs
        flat, spec = flatten_call(args, kwargs)
        key = signature_key(flat, spec, training) + ((kind.name,) if kind is not None else ())
        base = self.captures.lookup(key, flat)
        if base is None:
            self.tree.sync_source()
            base = (capture if kind is None else kind.capture)(self.tree.source, args, kwargs, training)
            canonicalize(base)
            for evicted in self.captures.add(key, base):
                self._forget(evicted)
        variant = self.variant(mixed)
        self.before_call(variant, training)
        slot = (id(base), variant)
        program = self._programs.get(slot)
        if program is None:
            captured = rewrite(base, variant, self.tree, self.adapters, self.merged)
            program = self._programs[slot] = self._lowered(captured)
        if not training and _autocast(flat):  # autocast picks each op's dtype: the same graph, lowered for it
            if slot not in self._under_autocast:
                self._under_autocast[slot] = self._lowered(program.captured, autocast=True)
            program = self._under_autocast[slot]
        return program, flat

    def _forget(self, base: CapturedGraph) -> None:
        """Drop the programs rewritten from an evicted base graph, both lowerings."""
        for programs in (self._programs, self._under_autocast):
            for slot in [slot for slot in programs if slot[0] == id(base)]:
                del programs[slot]

    def _lowered(self, captured: CapturedGraph, autocast: bool = False) -> EagerProgram:
        run = eager_lowering(captured.gm, self.remat, captured.training, autocast)
        return EagerProgram(captured, self.tree.resolve, run, self.written)

    def remembered(self, name: str, read: Callable[[], Any]) -> Any:
        """`read()`, kept until the captures go (the tensors moved to another dtype or device): a fact read off
        the model as its graphs were captured, such as its KV-cache layout, not read again at every call."""
        if name not in self._facts:
            self._facts[name] = read()
        return self._facts[name]

    def before_call(self, variant: tuple, training: bool) -> None:
        """Let the methods of the adapters this call runs unmerged update their parameters first, as PEFT's
        forward does (`Method.before_call`); in a mixed batch, every loaded adapter."""
        if variant[0] == "disabled":
            return
        running = set(variant[1]) - set(variant[2] if variant[0] == "active" else ())
        # (most methods have no such update: skip the walk over every adapted module, at every decode step)
        configs = self.adapters.configs
        running = {name for name in running
                   if any(m.runs_before_call(configs[name]) for m in methods_for(configs[name].peft_type))}
        if not running:
            return
        for mas in self.adapters.named(sorted(running)).values():
            for ma in mas:
                ma.method.before_call(ma.config, {key: t for key, (_, t) in ma.tensors.items()}, training)

    def variant(self, mixed: bool) -> tuple:
        """What the rewrite of a base graph depends on besides the graph itself."""
        if mixed:
            return ("mixed", tuple(self.adapters.configs))
        if self.disabled:
            return ("disabled",)
        return ("active", tuple(self.adapters.active), tuple(self.merged.adapters))

    def checked_index(self, index: torch.Tensor, flat: list[Any]) -> torch.Tensor:
        """A per-sample `adapter_index`: one integer per sample, each a loaded adapter's slot or -1."""
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.is_floating_point():
            raise ConfigError("adapter_index must be a 1-d integer tensor with one entry per sample")
        batch = leading_size(flat)
        if batch is not None and index.shape[0] != batch:
            raise ConfigError(f"adapter_index has {index.shape[0]} entries for a batch of {batch}")
        order = self.adapters.order
        n = len(order)
        if index.numel() and (int(index.min()) < BASE_ONLY or int(index.max()) >= n):
            raise ConfigError(
                f"adapter_index entries must be in [-1, {n - 1}] (-1: base model; 0..{n - 1}: {order}), "
                f"got {index.tolist()}"
            )
        return index.to(torch.int64)

    def merge(self, merged: dict[str, dict[str, torch.Tensor]], adapter_names: list[str]) -> None:
        """Run with `merged` (module path -> merged tensors of `adapter_names`) in place of those adapters."""
        self.merged.install(self.tree, merged, adapter_names)
        self.clear()  # programs bind tensors once: a merged program must not outlive the tensors it read

    def unmerge(self) -> None:
        self.merged.uninstall(self.tree)
        self.clear()

    def live(self) -> list[EagerProgram]:
        return list(self._programs.values())

    def by_variant(self, base: CapturedGraph) -> dict[tuple, EagerProgram]:
        """The programs made so far from the base graph `base`, by variant."""
        return {variant: p for (ident, variant), p in self._programs.items() if ident == id(base)}

    def clear(self) -> None:
        """Forget the rewritten programs (the adapters changed); base captures stay valid."""
        self._programs.clear()
        self._under_autocast.clear()

    def reset(self) -> None:
        """Forget the captures too (tensors moved to another dtype or device, which graphs bake in), and the
        values the last calls wrote (the tensors now hold them moved)."""
        self.captures.clear()
        self.clear()
        self.written.clear()
        self._facts.clear()

    def detached_copy(self, tree: ParameterTree, adapters: AdapterSet) -> Programs:
        """Programs for a structural copy of the model (`fold`): the same base captures, no programs yet."""
        other = Programs(tree, adapters, self.call_defaults, self.transformers)
        other.captures = self.captures.copy()
        other.remat = self.remat
        return other


def _autocast(flat: list[Any]) -> bool:
    """Whether autocast is on for the device of the call's first tensor."""
    device = next((t.device.type for t in flat if isinstance(t, torch.Tensor)), "cpu")
    return torch.is_autocast_enabled(device)
