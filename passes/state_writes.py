"""State writes: values a rewrite marks (`peftc.graph.write_state`) become outputs the call writes back to
model tensors, as torch.export's mutated buffers are (MonteCLoRA's sampled variance and expert weights,
VeLoRA's batch projection: tensors PEFT's forward reassigns).

before: output(mutated..., outputs...)                with values v₁.. marked "write to tensor t₁.."
after:  output(v₁.., mutated..., outputs...)          and the graph's mutated state [t₁.., mutated...]

A tensor written at several sites (a module run twice per call) keeps the last run's value where every mark
allows it (PEFT keeps its last assignment); otherwise the graph is refused: one value per call could not be
what PEFT's runs, each reading the previous one's, compute. A written tensor the graph also reads is read through
a copy taken at the start: the write then never changes a value autograd saved, nor what a checkpointed layer
(passes/remat.py) recomputes from in backward. It runs last, so the passes before it (loss terms) index the
outputs as the capture left them.
"""

from __future__ import annotations

import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from peftc.capture import STATE
from peftc.errors import ConfigError
from peftc.graph import STATE_WRITE
from peftc.sites import ADAPTER

aten = torch.ops.aten


class WriteBackState(PassBase):
    """Marked values as leading outputs; `written` then names the tensors they go to, in output order."""

    def __init__(self) -> None:
        self.written: list[str] = []

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        last: dict[str, torch.fx.Node] = {}  # tensor -> its last write, in graph (execution) order
        refused: dict[str, set[str]] = {}  # tensor -> modules writing it more than once without last_wins
        for node in gm.graph.nodes:
            if STATE_WRITE not in node.meta:
                continue
            name, last_wins = node.meta[STATE_WRITE]
            if name in last and not (last_wins and last[name].meta[STATE_WRITE][1]):
                refused.setdefault(name, set()).add(node.meta[ADAPTER][0])
            last[name] = node
        if refused:
            modules = sorted(set().union(*refused.values()))
            raise ConfigError(f"module(s) {modules} run more than once per call, and each run would write "
                              f"{sorted(refused)[:2]}, a tensor PEFT's forward updates at every run for the next "
                              "(MonteCLoRA's sample, VeLoRA's batch_average_once projection); peftc keeps one "
                              "value per call: target modules that run once per forward")
        self.written = list(last)
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        for read in placeholders:
            if read.meta.get(STATE) in last and read.users:
                with gm.graph.inserting_after(placeholders[-1]):
                    copy = gm.graph.call_function(aten.clone.default, (read,))
                copy.meta["val"] = read.meta.get("val")
                read.replace_all_uses_with(copy, delete_user_cb=lambda user, c=copy: user is not c)
        if last:
            output = next(iter(gm.graph.find_nodes(op="output")))
            output.args = (type(output.args[0])([*last.values(), *output.args[0]]),)
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, bool(last))
