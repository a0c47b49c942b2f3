"""Activation checkpointing as a graph pass (passes/remat.py), reached the way PEFT and transformers
users reach it: `am.gradient_checkpointing_enable()` or `Trainer(args.activation_checkpointing=True)`.

The train graph is cut at layer boundaries, one checkpointed region per decoder/encoder layer;
gradients equal the un-checkpointed graph's (dropout included: checkpoint replays the RNG), and the
peak tensor memory of a forward + backward is lower.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from peftc.passes.remat import REMAT, Checkpointed, repeated_blocks

import peftc
from peftc.errors import ConfigError
from peftc.graph import adapter_nodes
from peftc.profiling import peak_memory
from peftc.sites import module_path
from tests import oracle, zoo

CASES = {  # zoo model -> (config, its layers)
    "llama": ({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
               "target_modules": ["q_proj", "v_proj", "down_proj"]}, ["model.layers.0", "model.layers.1"]),
    "bert": ({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["query", "value"]},
             ["encoder.layer.0", "encoder.layer.1"]),
}


def _adapted(name: str) -> tuple[zoo.Case, peftc.AdaptedModel]:
    case = zoo.FACTORIES[name]()
    case.model.train()  # apply() captures the train graph: the only one these tests need
    am = peftc.apply(case.model, CASES[name][0], example_inputs=oracle.example(case, oracle.train_inputs(case)))
    oracle.randomize_adapters(am)
    return case, am


def _regions(am: peftc.AdaptedModel) -> dict[str, torch.fx.GraphModule]:
    """Layer path -> the body of its checkpointed region, in what the (single) train graph runs."""
    (gm,) = [run for graph, run in am.eager_graphs if graph.training]
    calls = [n for n in gm.graph.nodes if REMAT in n.meta]
    assert all(isinstance(gm.get_submodule(n.target), Checkpointed) for n in calls)
    return {n.meta[REMAT]: gm.get_submodule(n.target).body for n in calls}


def _grads(case: zoo.Case, am: peftc.AdaptedModel) -> dict[str, torch.Tensor]:
    am.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same lora/attention dropout masks in every run
    oracle.loss_of(case, case.call(am, oracle.train_inputs(case))).backward()
    return {n: p.grad.clone() for n, p in am.adapter_parameters()}


@pytest.mark.parametrize("name", list(CASES))
def test_one_region_per_layer_and_same_gradients(name: str):
    case, am = _adapted(name)
    layers = CASES[name][1]
    assert repeated_blocks(case.model) == layers
    plain = _grads(case, am)
    assert _regions(am) == {}

    am.gradient_checkpointing_enable()
    assert am.is_gradient_checkpointing
    checkpointed = _grads(case, am)
    regions = _regions(am)
    assert list(regions) == layers  # one region per layer, in order
    for layer, body in regions.items():
        # every node of a region was traced inside its layer; the layer's adapters are recomputed with it
        paths = {module_path(n) for n in body.graph.nodes if n.op == "call_function"}
        assert paths and all(p.startswith(layer + ".") or p == layer for p in paths), (layer, paths)
        assert adapter_nodes(body.graph)
    assert len([g for g in am.graphs if g.training]) == 1  # a rewrite of the same capture, not a new one
    assert plain.keys() == checkpointed.keys()
    for n, g in plain.items():
        torch.testing.assert_close(checkpointed[n], g, atol=1e-6, rtol=1e-6, msg=lambda m, n=n: f"{n}: {m}")

    am.gradient_checkpointing_disable()
    assert not am.is_gradient_checkpointing and _grads(case, am) and _regions(am) == {}


def test_every_n_layers_and_eval_graphs_are_not_cut():
    case, am = _adapted("llama")
    am.gradient_checkpointing_enable({"use_reentrant": False}, every_n_layers=2)
    _grads(case, am)
    assert list(_regions(am)) == ["model.layers.0"]
    am.eval()
    with torch.no_grad():
        am(**case.inputs)
    assert all(REMAT not in n.meta for g, run in am.eager_graphs if not g.training for n in run.graph.nodes)


def test_peak_memory_is_lower():
    case, am = _adapted("llama")
    ids = torch.randint(1, zoo.VOCAB, (4, 64), generator=torch.Generator().manual_seed(3))

    def step() -> None:
        am(input_ids=ids, labels=ids).loss.backward()

    step()  # warm: adapter .grad tensors exist in both measurements
    without = peak_memory(step)
    am.gradient_checkpointing_enable()
    step()
    with_ckpt = peak_memory(step)
    assert with_ckpt < 0.8 * without, (with_ckpt, without)


def test_trainer_turns_it_on(tmp_path: Path):
    """Trainer(activation_checkpointing=True) calls the adapted model's activation_checkpointing_enable."""
    case, am = _adapted("llama")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
        max_steps=1, per_device_train_batch_size=3, activation_checkpointing=True,
        activation_checkpointing_kwargs={"every_n_layers": 2},
    )
    ids = case.inputs["input_ids"]
    transformers.Trainer(model=am, args=args, train_dataset=[{"input_ids": i, "labels": i} for i in ids]).train()
    assert am.is_gradient_checkpointing
    assert list(_regions(am)) == ["model.layers.0"]


def test_bad_requests_are_config_errors():
    _, am = _adapted("llama")
    with pytest.raises(ConfigError, match="every_n_layers"):
        am.gradient_checkpointing_enable(every_n_layers=0)
    with pytest.raises(ConfigError, match="offload"):
        am.gradient_checkpointing_enable(offload=True)
    mlp = zoo.mlp()
    flat = peftc.apply(mlp.model, {"peft_type": "LORA", "r": 2, "target_modules": ["lin0"]}, example_inputs=mlp.inputs)
    with pytest.raises(ConfigError, match="no stack of repeated layers"):
        flat.gradient_checkpointing_enable()
