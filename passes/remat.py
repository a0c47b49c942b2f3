"""Activation checkpointing as a graph pass: recompute each layer's activations in backward.

A train graph keeps every activation its backward needs alive from forward to backward. This
pass cuts the graph at layer boundaries: a layer is a module path (`model.layers.3`), and its
region is the span of nodes from the first to the last node traced inside that module (each
node's `nn_module_stack` says where it came from). Each region is outlined into a GraphModule
called through `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`: forward keeps only
the region's inputs, and backward reruns the region to get the rest. Checkpoint restores the RNG
state before the rerun, so dropout (base or adapter) draws the same masks.

The regions are those `gradient_checkpointing_enable()` checkpoints in transformers (the
repeated decoder/encoder blocks), found from the module tree by `repeated_blocks`, so the
result is the same trade as PEFT's, on any model with a stack of identical blocks.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.utils.checkpoint import checkpoint

from peftc.errors import ConfigError
from peftc.graph import outline
from peftc.sites import module_path

REMAT = "peftc_remat"  # meta on the call node of an outlined region: the layer's module path


@dataclass(frozen=True)
class RematPlan:
    """Which layers to checkpoint, and the keyword arguments for `torch.utils.checkpoint.checkpoint`."""

    layers: tuple[str, ...]
    checkpoint_kwargs: dict[str, Any] = field(default_factory=dict)


def repeated_blocks(model: nn.Module) -> list[str]:
    """Module paths of the model's repeated blocks: the children of each outermost `nn.ModuleList`
    holding two or more modules of one class (Llama's `model.layers.<i>`, BERT's
    `encoder.layer.<i>`, GPT-2's `transformer.h.<i>`). Lists nested in a block (experts) are inside
    the block's region already."""
    blocks: list[str] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2 or len({type(m) for m in module}) > 1:
            continue
        if any(path.startswith(b + ".") for b in blocks):
            continue
        blocks += [f"{path}.{i}" if path else str(i) for i in range(len(module))]
    return blocks


def remat_plan(
    model: nn.Module, checkpoint_kwargs: dict[str, Any] | None = None, every_n_layers: int = 1, offload: bool = False
) -> RematPlan:
    """What `gradient_checkpointing_enable(...)` asks for, checked against `model` (transformers' arguments:
    the checkpoint kwargs default to `use_reentrant=False`; `every_n_layers` checkpoints layers 0, n, 2n, ...)."""
    if offload:
        raise ConfigError("gradient checkpointing: offload=True is not supported by peftc (activations stay in place)")
    if not isinstance(every_n_layers, int) or every_n_layers < 1:
        raise ConfigError(f"gradient checkpointing: every_n_layers must be an integer >= 1, got {every_n_layers!r}")
    blocks = repeated_blocks(model)
    if not blocks:
        raise ConfigError(
            f"gradient checkpointing: {type(model).__name__} has no stack of repeated layers (an nn.ModuleList of "
            "two or more modules of one class) to checkpoint"
        )
    kwargs = {"use_reentrant": False, **(checkpoint_kwargs or {})}
    return RematPlan(tuple(blocks[::every_n_layers]), kwargs)


class Checkpointed(nn.Module):
    """One outlined region, run through `torch.utils.checkpoint.checkpoint` (its outputs as a tuple)."""

    def __init__(self, body: torch.fx.GraphModule, checkpoint_kwargs: dict[str, Any]):
        super().__init__()
        self.body = body
        self.checkpoint_kwargs = checkpoint_kwargs

    def forward(self, *args: Any) -> tuple[Any, ...]:
        return checkpoint(self.body, *args, **self.checkpoint_kwargs)

    @staticmethod
    def wrapping(checkpoint_kwargs: dict[str, Any]) -> Callable[[torch.fx.GraphModule], nn.Module]:
        """`outline`'s wrap: the outlined body, checkpointed with `checkpoint_kwargs`."""
        return lambda body: Checkpointed(body, checkpoint_kwargs)


def find_regions(graph: torch.fx.Graph, layers: Sequence[str]) -> dict[str, list[torch.fx.Node]]:
    """Layer path -> its region: the nodes from the first to the last one traced inside that layer.
    Layers with no node in the graph have no region; regions never overlap."""
    wanted = set(layers)
    nodes = list(graph.nodes)
    spans: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        if node.op != "call_function":
            continue
        path = module_path(node)
        layer = next((p for p in _prefixes(path) if p in wanted), None)
        if layer is not None:
            spans.setdefault(layer, [i, i])[1] = i
    regions, end = {}, -1
    for layer, (first, last) in sorted(spans.items(), key=lambda kv: kv[1][0]):
        if first <= end:
            raise ConfigError(f"gradient checkpointing: layer {layer!r} is traced interleaved with another layer")
        regions[layer] = nodes[first:last + 1]
        end = last
    return regions


def _prefixes(path: str) -> list[str]:
    """'a.b.c' -> ['a.b.c', 'a.b', 'a']: the module and each of its parents."""
    parts = path.split(".")
    return [".".join(parts[:k]) for k in range(len(parts), 0, -1)]


class CheckpointLayers(PassBase):
    """before: the nodes traced inside layer `model.layers.i`, inline
    after:  out = checkpoint(remat_i, *inputs)     (remat_i: those nodes, outlined; one call per layer)"""

    def __init__(self, plan: RematPlan) -> None:
        self.plan = plan

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        regions = find_regions(gm.graph, self.plan.layers)
        for i, (layer, nodes) in enumerate(regions.items()):
            outline(gm, f"remat_{i}", nodes, Checkpointed.wrapping(self.plan.checkpoint_kwargs)).meta[REMAT] = layer
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, bool(regions))

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        for layer, nodes in find_regions(gm.graph, self.plan.layers).items():
            inline = [n.name for n in nodes if not (n.target is operator.getitem and REMAT in n.args[0].meta)]
            if inline:
                raise AssertionError(f"layer {layer!r} still runs inline: {inline[:4]}")
