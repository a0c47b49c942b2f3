"""PEFT as the oracle: shared helpers every method's tests use to compare peftc with peft.

`check_method(case_name, config)` is the whole comparison for one method on one zoo model:
the same weights in both (peftc's state dict loaded strictly into the PEFT model, with random
adapter weights so no adapter is an identity), the same outputs at two shapes, the same
gradients in train mode, and checkpoints that load across in both directions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors.torch import load_file

import peftc
from tests import zoo

TOL = {"atol": 1e-5, "rtol": 1e-5}
CAUSAL_LM = ("llama", "gpt2", "falcon")


def tensors(out: Any) -> dict[str, torch.Tensor]:
    """The tensor fields of a model output (a bare tensor or an HF ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return {"output": out}
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def assert_same_outputs(got: Any, want: Any, tol: dict[str, float] = TOL) -> None:
    got, want = tensors(got), tensors(want)
    assert set(got) == set(want)
    for key in got:
        torch.testing.assert_close(got[key], want[key], **tol, msg=lambda m, k=key: f"{k}: {m}")


def loss_of(case: zoo.Case, out: Any) -> torch.Tensor:
    if case.name in CAUSAL_LM:
        return out.loss
    # every float output, so that adapters feeding only a secondary output (BERT's pooler) get grads
    return sum(t.float().mean() for t in tensors(out).values() if t.is_floating_point())


def second_inputs(case: zoo.Case) -> dict[str, Any] | tuple:
    """Inputs with the same call signature but other sizes along the dims peftc keeps dynamic
    (batch everywhere; the sequence too for transformers models)."""
    gen = torch.Generator().manual_seed(11)
    if case.transformers:
        ids = torch.randint(1, zoo.VOCAB, (2, 6), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 4:] = 0  # a padded row
        out = {"input_ids": ids, "attention_mask": mask}
        return {k: out[k] for k in case.inputs}
    (x,) = case.inputs
    if not x.is_floating_point():  # token ids
        return (torch.randint(1, zoo.VOCAB, (7, x.shape[1]), generator=gen),)
    return (torch.randn(7, *x.shape[1:], generator=gen),)


def train_inputs(case: zoo.Case) -> dict[str, Any] | tuple:
    if case.name in CAUSAL_LM:
        return {**case.inputs, "labels": case.inputs["input_ids"]}
    return case.inputs


def example(case: zoo.Case, inputs: Any = None) -> Any:
    """What to pass as `example_inputs` (None where peftc synthesises them itself)."""
    inputs = case.inputs if inputs is None else inputs
    return None if case.transformers and set(inputs) == {"input_ids"} else inputs


def randomize_adapters(am: peftc.AdaptedModel, seed: int = 0, std: float = 0.1) -> None:
    """Give every adapter parameter random values around its initial ones, so none is an identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(am.adapter_parameters()):
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def peft_model(case: zoo.Case, peft_config: peft.PeftConfig) -> peft.PeftModel:
    return peft.get_peft_model(case.model, copy.deepcopy(peft_config))


@dataclass
class MethodPair:
    case: zoo.Case  # the model peftc adapted
    ref: zoo.Case  # an identical model, given to peft
    am: peftc.AdaptedModel
    pm: peft.PeftModel


def make_pair(case_name: str, config: dict[str, Any], peft_config: peft.PeftConfig, randomize: bool = True,
              training: bool = False) -> MethodPair:
    """peftc and peft on two identical copies of a zoo model, with the same adapter weights."""
    case, ref = zoo.FACTORIES[case_name](), zoo.FACTORIES[case_name]()
    inputs = train_inputs(case) if training else case.inputs
    case.model.train(training)
    am = peftc.apply(case.model, config, example_inputs=example(case, inputs))
    if randomize:
        randomize_adapters(am)
    pm = peft_model(ref, peft_config)
    result = pm.load_state_dict(am.state_dict(), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    am.train(training)
    pm.train(training)
    return MethodPair(case, ref, am, pm)


def seeded_lora_pair(name: str, targets: list[str], **extra: Any) -> MethodPair:
    """peftc and PEFT LoRA (r=4) on zoo model `name`, each initialising its adapter from the same RNG state
    (nothing loaded across): for the inits and variants whose random draws must equal PEFT's."""
    fields = {"r": 4, "lora_alpha": 8, "target_modules": targets, **extra}
    case, ref = zoo.FACTORIES[name](), zoo.FACTORIES[name]()
    torch.manual_seed(7)
    am = peftc.apply(case.model, {"peft_type": "LORA", **fields}, example_inputs=example(case))
    torch.manual_seed(7)
    pm = peft.get_peft_model(ref.model, peft.LoraConfig(**copy.deepcopy(fields)))
    return MethodPair(case, ref, am, pm)


def check_eval(pair: MethodPair, tol: dict[str, float] = TOL) -> None:
    """Same outputs at two shapes, and the adapter changes the output (it is not an identity)."""
    case, am, pm = pair.case, pair.am, pair.pm
    with torch.no_grad():
        got = case.call(am)
        assert_same_outputs(got, case.call(pm), tol)
        base = tensors(case.call(case.model))
        assert any(not torch.allclose(t, base[k]) for k, t in tensors(got).items()), "adapter had no effect"
        other = second_inputs(case)
        assert_same_outputs(case.call(am, other), case.call(pm, other), tol)


def check_train(pair: MethodPair, tol: dict[str, float] = TOL) -> None:
    """Same outputs and adapter gradients in train mode; frozen weights get no gradient."""
    case, am, pm = pair.case, pair.am, pair.pm
    am.train()
    pm.train()
    am.zero_grad(set_to_none=True)
    pm.zero_grad(set_to_none=True)
    inputs = train_inputs(case)
    torch.manual_seed(1234)
    out = case.call(am, inputs)
    torch.manual_seed(1234)
    ref = case.call(pm, inputs)
    assert_same_outputs(out, ref, tol)
    loss_of(case, out).backward()
    loss_of(case, ref).backward()
    adapters = dict(am.adapter_parameters())
    assert adapters
    theirs = dict(pm.named_parameters())
    assert {n for n, p in theirs.items() if p.requires_grad} == set(adapters)
    for name, p in am.named_parameters():
        if name not in adapters:
            assert p.grad is None, name
    for name, p in adapters.items():
        assert p.grad is not None and theirs[name].grad is not None, name
        torch.testing.assert_close(p.grad, theirs[name].grad, **tol, msg=lambda m, n=name: f"{n}: {m}")
    am.eval()
    pm.eval()


def saved_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(folder / "adapter_model.safetensors").items()}


def check_checkpoints(pair: MethodPair, tmp_path: Path, tol: dict[str, float] = TOL) -> None:
    """peftc's save loads in PEFT, PEFT's save loads in peftc; same keys, same outputs. (peftc.load on a
    fresh model is tests/peftc/test_checkpoint.py's; here PEFT's save loads into the adapted model.)"""
    case, am, pm = pair.case, pair.am, pair.pm
    am.eval()
    pm.eval()
    ours, theirs = tmp_path / "peftc", tmp_path / "peft"
    am.save_adapter(ours)
    pm.save_pretrained(theirs)  # PEFT's default also saves a targeted embed_tokens' base weight; peftc loads it
    pm.save_pretrained(tmp_path / "peft_adapters_only", save_embedding_layers=False)
    assert saved_shapes(ours) == saved_shapes(tmp_path / "peft_adapters_only")
    with torch.no_grad():
        want = case.call(am)
        fresh = zoo.FACTORIES[case.name]()
        loaded_in_peft = peft.PeftModel.from_pretrained(fresh.model, ours).eval()
        assert_same_outputs(case.call(loaded_in_peft), want, tol)
        if any(getattr(c, "bias", "none") != "none" for c in am.peft_config.values()):
            # one adapter only may train biases (PEFT refuses a second too): PEFT's save loads into a fresh model
            fresh = zoo.FACTORIES[case.name]()
            loaded = peftc.load(fresh.model, theirs, example_inputs=example(fresh)).eval()
            assert_same_outputs(case.call(loaded), case.call(pm), tol)
            return
        # into the adapted model beside its own adapter: the same loader as peftc.load, and no new capture
        active = am.active_adapters
        am.load_adapter(theirs, "from_peft")
        am.set_adapter("from_peft")
        try:
            assert_same_outputs(case.call(am), case.call(pm), tol)
        finally:
            am.set_adapter(active)
            am.delete_adapter("from_peft")


def check_method(case_name: str, config: dict[str, Any], peft_config: peft.PeftConfig, tmp_path: Path,
                 tol: dict[str, float] = TOL) -> MethodPair:
    """The whole comparison for one method config on one zoo model."""
    pair = make_pair(case_name, config, peft_config)
    check_eval(pair, tol)
    check_checkpoints(pair, tmp_path, tol)  # before training moves BatchNorm statistics away from a fresh model's
    check_train(pair, tol)
    return pair


def check_fold(pair: MethodPair, tol: dict[str, float] = TOL) -> dict[str, dict[str, torch.Tensor]]:
    """Folding, through the fold pass and merge_and_unload: the folded graph has no adapter nodes and
    computes the adapted outputs; the merged weights equal PEFT's merge_and_unload on the same values.
    Returns the merged tensors per module."""
    from peftc.graph import adapter_nodes

    case, am = pair.case, pair.am
    am.eval()
    pair.pm.eval()
    folded = am.fold(safe_merge=True)
    with torch.no_grad():
        want = case.call(am)
        assert_same_outputs(case.call(folded), want, tol)
        assert all(adapter_nodes(g.gm.graph) == [] for g in folded.graphs)
        merged_model = am.merge_and_unload()
        assert_same_outputs(case.call(merged_model), want, tol)
    merged = am.merged_tensors()
    theirs = copy.deepcopy(pair.pm).merge_and_unload()
    for path, tensors in merged.items():
        module = theirs.get_submodule(path)
        for leaf, value in tensors.items():
            torch.testing.assert_close(value, getattr(module, leaf), **tol, msg=lambda m, p=path: f"{p}: {m}")
    return merged
