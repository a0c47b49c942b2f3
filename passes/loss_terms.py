"""Loss terms: a method's regulariser added to the model's loss output, where the graph returns a loss
(AdaLoRA's orthogonal regularisation, which PEFT adds to `outputs.loss` in its forward).

before: outputs (..., loss, ...)
after:  outputs (..., loss + Σ method.loss_term(adapter's tensors), ...)

The term is part of the graph, so it reaches every backend (eager, torch.compile, ONNX) and its gradient
flows to the adapter's tensors like the loss's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from peftc.capture import CapturedGraph
from peftc.config import AdapterConfig
from peftc.graph import SiteBuilder, add_state_input, cast, dtype_of
from peftc.method import Method, TensorKey

aten = torch.ops.aten


@dataclass
class LossTerm:
    """One adapter's term: its method, config, and its tensors at each module it is placed on (model order)."""

    adapter: str
    method: Method
    config: AdapterConfig
    modules: list[dict[TensorKey, tuple[str, torch.Tensor]]]


def loss_output_index(captured: CapturedGraph) -> int | None:
    """The position of the `loss` output among the graph's outputs (after the mutated state), or None when
    the call returns no loss (no labels)."""
    structure = pytree.tree_unflatten(list(range(captured.out_spec.num_leaves)), captured.out_spec)
    if not isinstance(structure, Mapping) or not isinstance(structure.get("loss"), int):
        return None
    return len(captured.mutated_state) + structure["loss"]


class AddLossTerms(PassBase):
    """before: output(..., loss, ...)   after: output(..., loss + term₁ + ..., ...)"""

    def __init__(self, terms: list[LossTerm], index: int) -> None:
        self.terms = terms
        self.index = index

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        output = next(iter(gm.graph.find_nodes(op="output")))
        outputs = list(output.args[0])
        loss = outputs[self.index]
        for term in self.terms:
            b = SiteBuilder(gm.graph, loss, ("", term.adapter, term.method.peft_type))
            modules = [{key: add_state_input(gm, fqn, t) for key, (fqn, t) in tensors.items()}
                       for tensors in term.modules]
            value = term.method.loss_term(b.call, term.config, modules)
            loss = b.call(aten.add.Tensor, loss, cast(b, value, dtype_of(value), dtype_of(outputs[self.index])))
            loss.meta["val"] = outputs[self.index].meta.get("val")
        outputs[self.index] = loss
        output.args = (type(output.args[0])(outputs),)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, bool(self.terms))


def loss_terms(adapters: Any) -> list[LossTerm]:
    """The loss terms of the loaded adapters (an `AdapterSet`), whether active or not: PEFT adds AdaLoRA's
    for its trainable adapter in every forward."""
    out = []
    for name, config in adapters.configs.items():
        mas = [ma for ma in adapters.of(name) if ma.method.has_loss_term(config)]
        if mas:
            out.append(LossTerm(name, mas[0].method, config, [ma.tensors for ma in mas]))
    return out
