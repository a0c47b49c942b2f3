"""State writes: values a rewrite marks (`peftc.graph.write_state`) become outputs the call writes back to
model tensors, as torch.export's mutated buffers are (MonteCLoRA's sampled variance and expert weights,
which PEFT assigns to its sampler's buffers in the forward).

before: output(mutated..., outputs...)                with values v₁.. marked "write to tensor t₁.."
after:  output(v₁.., mutated..., outputs...)          and the graph's mutated state [t₁.., mutated...]

It runs last, so the passes before it (loss terms) index the outputs as the capture left them.
"""

from __future__ import annotations

import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from peftc.errors import ConfigError
from peftc.graph import STATE_WRITE
from peftc.sites import ADAPTER


class WriteBackState(PassBase):
    """Marked values as leading outputs; `written` then names the tensors they go to, in output order."""

    def __init__(self) -> None:
        self.written: list[str] = []

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        marked = [n for n in gm.graph.nodes if STATE_WRITE in n.meta]
        targets = [n.meta[STATE_WRITE] for n in marked]
        twice = sorted({t for t in targets if targets.count(t) > 1})
        if twice:
            modules = sorted({n.meta[ADAPTER][0] for n in marked if n.meta[STATE_WRITE] in twice})
            raise ConfigError(f"module(s) {modules} run more than once per call, and each run would write "
                              f"{twice[:2]}: PEFT draws a MonteCLoRA sample per run, which peftc's one sample per "
                              "module and call does not follow; target modules that run once per forward")
        self.written = targets
        if marked:
            output = next(iter(gm.graph.find_nodes(op="output")))
            output.args = (type(output.args[0])([*marked, *output.args[0]]),)
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, bool(marked))
