"""Eager backend: run a captured graph as a plain PyTorch function, for training and inference.

The graph is lifted (state tensors are inputs), so a program binds the adapted model's
current tensors at every call: `.to()`, `load_state_dict` and optimizers all act on the one
set of parameters every cached graph shares.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from peftc import unchanged
from peftc.capture import CapturedGraph

# (module, attribute) holding a tensor: looked up at call time, so replaced buffers are seen
TensorRef = tuple[nn.Module, str]


class EagerProgram:
    """Calls a captured graph with the model's current tensors. `run` is the module called (default:
    the captured graph itself; the adapted model's programs run its `pipeline.eager_lowering`)."""

    def __init__(
        self, captured: CapturedGraph, resolve: Callable[[str], TensorRef], run: torch.fx.GraphModule | None = None,
        written: dict[str, torch.Tensor] | None = None,
    ):
        """`written`, where given, receives each call's written state values as computed, with their gradient
        (the tensors themselves are updated without it): MonteCLoRA's loss reads the last call's."""
        self.captured = captured
        self.written = written
        self.run = captured.gm if run is None else run
        self.boxed = getattr(self.run, "_boxed_call", False)  # run(list) empties the list (`graph.boxed`)
        self.state = [resolve(name) for name in captured.state_names()]
        self.mutated = [resolve(name) for name in captured.mutated_state]
        # read at every call (every decode step), for each of a few hundred tensors: the module's own dicts first,
        # where nn.Module keeps parameters and buffers, rather than getattr's slower way there
        self._where = [(module._parameters, module._buffers, module, attr) for module, attr in self.state]

    def __call__(self, flat_inputs: list[Any], extras: dict[str, Any] | None = None) -> Any:
        """The outputs for the call's flat inputs. A boxed program takes `flat_inputs` over (empties it)."""
        kept = unchanged.region()  # in a generate call the tensors are the same at every step: bound once
        state = None if kept is None else kept.get(id(self))
        if state is None:
            state = [params[attr] if attr in params else buffers[attr] if attr in buffers else getattr(module, attr)
                     for params, buffers, module, attr in self._where]
            if kept is not None:
                kept[id(self)] = state
        extra = [extras[name] for name in self.captured.extra_inputs] if self.captured.extra_inputs else []
        if self.boxed:  # the inputs are handed over: the graph frees each after its last use
            inputs = [*state, *flat_inputs, *extra]
            flat_inputs.clear()
            outputs = self.run(inputs)
        else:
            outputs = self.run(*state, *flat_inputs, *extra)
        n = len(self.mutated)
        if n:
            # buffers the model updates in place (BatchNorm running stats) come back as outputs
            with torch.no_grad():
                for (module, attr), value in zip(self.mutated, outputs[:n]):
                    getattr(module, attr).copy_(value)
            if self.written is not None:
                self.written.update(zip(self.captured.mutated_state, outputs[:n]))
        return pytree.tree_unflatten(list(outputs[n:]), self.captured.out_spec)
