"""Gated activations recomputed in backward (passes/recompute_gates.py), part of the eager lowering of
train graphs: `silu(gate) * up` keeps `gate` and `up` for backward, not `silu(gate)` too."""

from __future__ import annotations

import peft
import torch
from peftc.passes.recompute_gates import RECOMPUTED

from peftc.profiling import peak_memory
from tests import oracle, zoo

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _pair() -> oracle.MethodPair:
    return oracle.make_pair("llama", {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": TARGETS},
                            peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), training=True)


def _gate_regions(run: torch.fx.GraphModule) -> list[torch.fx.GraphModule]:
    calls = [n for n in run.graph.nodes if RECOMPUTED in n.meta]
    assert all(n.meta[RECOMPUTED] == "aten::silu" for n in calls)
    return [run.get_submodule(n.target).body for n in calls]


def test_one_region_per_layer_in_train_graphs_only_and_gradients_match_peft():
    pair = _pair()
    oracle.check_train(pair)  # outputs and adapter gradients equal PEFT's; ends in eval mode
    with torch.no_grad():
        pair.case.call(pair.am)
    train, evaluation = sorted(pair.am.eager_graphs, key=lambda g: not g[0].training)
    bodies = _gate_regions(train[1])
    assert len(bodies) == 2  # one per layer
    for body in bodies:
        ops = [n.target for n in body.graph.nodes if n.op == "call_function"]
        assert ops == [torch.ops.aten.silu.default, torch.ops.aten.mul.Tensor]
    assert not _gate_regions(evaluation[1])
    assert not [n for n in train[0].gm.graph.nodes if RECOMPUTED in n.meta]  # the captured graph is untouched

    pair.am.train()
    pair.am.gradient_checkpointing_enable()  # whole layers are recomputed: no separate gate regions
    pair.am(**oracle.train_inputs(pair.case)).loss.backward()
    ((_, run),) = [g for g in pair.am.eager_graphs if g[0].training]
    assert not _gate_regions(run)


def test_training_peak_memory_is_below_peft():
    pair = _pair()
    ids = torch.randint(1, zoo.VOCAB, (8, 64), generator=torch.Generator().manual_seed(3))
    peaks = {}
    for name, model in (("peftc", pair.am), ("peft", pair.pm)):
        def step(model: torch.nn.Module = model) -> None:
            model(input_ids=ids, labels=ids).loss.backward()

        step()  # warm: adapter .grad tensors exist in the measurement
        peaks[name] = peak_memory(step)
    assert peaks["peftc"] < peaks["peft"], peaks
