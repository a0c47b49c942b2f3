"""VeLoRA (`velora_config`) against PEFT: LoRA's forward, A's gradient from compressed activations."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import peft
import pytest
import torch

import peftc
from peftc.errors import ConfigError
from tests import zoo
from tests.oracle import (
    MethodPair,
    assert_same_outputs,
    check_checkpoints,
    check_eval,
    check_fold,
    check_train,
    loss_of,
    randomize_adapters,
    seeded_lora_pair,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
]

TARGETS = {"mlp": ["lin0", "lin1"], "llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def seeded_pair(name: str, **extra: Any) -> MethodPair:
    return seeded_lora_pair(name, TARGETS[name], **extra)


@pytest.mark.parametrize("name", ["mlp", "llama", "gpt2"])
@pytest.mark.parametrize("velora", [{"num_groups": 5, "scale": 0.5}, {"num_groups": 4, "init_type": "random"}])
def test_velora_matches_peft(name: str, velora: dict[str, Any], tmp_path: Path):
    pair = seeded_pair(name, init_lora_weights=False, velora_config=velora)
    ours, theirs = pair.am.state_dict(), pair.pm.state_dict()
    assert set(ours) == set(theirs)
    for key, value in ours.items():  # the same init, the projection (random, or zeros until a batch) included
        torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    assert any(k.endswith(".lora_velora_embed.default") for k in ours)
    randomize_adapters(pair.am)
    pair.pm.load_state_dict(pair.am.state_dict())
    check_eval(pair)
    check_checkpoints(pair, tmp_path)
    check_fold(pair)
    check_train(pair)  # A's gradient is VeLoRA's approximation in both; B's and the input's are exact


def test_velora_gradient_of_a_is_not_lora_s():
    """The graph's A gradient is VeLoRA's, not the exact one (else the test above would prove nothing)."""
    case = zoo.mlp()
    grads = {}
    for velora in (None, {"num_groups": 3}):
        torch.manual_seed(0)
        am = peftc.apply(zoo.mlp().model, {"peft_type": "LORA", "r": 2, "target_modules": ["lin0"],
                                           "init_lora_weights": False, "velora_config": velora},
                         example_inputs=case.inputs)
        am.train()
        am(*case.inputs).square().sum().backward()
        grads[velora is None] = dict(am.named_parameters())["base_model.model.lin0.lora_A.default.weight"].grad
    assert not torch.allclose(grads[True], grads[False])


@pytest.mark.parametrize(("extra", "match"), [
    ({"velora_config": {"num_groups": 0}}, "num_groups'\\] must be a positive integer"),
    ({"velora_config": {}, "use_dora": True}, "velora_config and use_dora cannot be combined"),
    ({"velora_config": {}, "target_modules": ["emb"]}, "velora_config for module 'emb'.*PEFT implements"),
])
def test_refused_as_peft_refuses(extra: dict[str, Any], match: str):
    case = zoo.embedding_model()
    with pytest.raises(ConfigError, match=match):
        peftc.apply(case.model, {"peft_type": "LORA", "r": 2, "target_modules": ["proj"], **extra},
                    example_inputs=case.inputs)


def test_mixed_batch_in_training_is_refused_and_in_eval_is_lora():
    case = zoo.mlp()
    config = {"peft_type": "LORA", "r": 2, "target_modules": ["lin0"], "velora_config": {"num_groups": 3}}
    am = peftc.apply(case.model, config, adapter_name="x", example_inputs=case.inputs)
    am.add_adapter("y", config)
    randomize_adapters(am)
    (x,) = case.inputs
    names = ["x", "y", "__base__", "x"]
    with torch.no_grad():
        mixed = am(x, adapter_names=names)
        am.set_adapter("y")
        torch.testing.assert_close(mixed[1:2], am(x[1:2]))
    am.train()
    with pytest.raises(ConfigError, match="mixed batches .* velora_config"):
        am(x, adapter_names=names)


def batch(case: zoo.Case, seed: int) -> dict[str, Any] | tuple:
    """Training inputs of the case's signature with other values (a batch mean of another direction)."""
    gen = torch.Generator().manual_seed(seed)
    if case.transformers:
        ids = torch.randint(1, zoo.VOCAB, case.inputs["input_ids"].shape, generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    (x,) = case.inputs
    return (torch.randn(x.shape, generator=gen),)


def train_both(pair: MethodPair, steps: range) -> list[dict[str, torch.Tensor]]:
    """SGD steps on both, each on its own batch after a train-mode call without gradients (PEFT's VeLoRA sets no
    projection there); outputs and gradients equal. Returns peftc's state dict after each step."""
    am, pm, case = pair.am.train(), pair.pm.train(), pair.case
    ours = torch.optim.SGD([p for _, p in am.adapter_parameters()], lr=0.05)
    theirs = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    states = []
    for step in steps:
        with torch.no_grad():
            case.call(am, batch(case, 100 + step))
            case.call(pm, batch(case, 100 + step))
        torch.manual_seed(step)
        out = case.call(am, batch(case, step))
        torch.manual_seed(step)
        ref = case.call(pm, batch(case, step))
        assert_same_outputs(out, ref)
        loss_of(case, out).backward()
        loss_of(case, ref).backward()
        reference = dict(pm.named_parameters())
        for key, p in am.adapter_parameters():
            torch.testing.assert_close(p.grad, reference[key].grad, msg=lambda m, k=key, i=step: f"{i} {k}: {m}")
        for optimizer in (ours, theirs):
            optimizer.step()
            optimizer.zero_grad()
        states.append({k: v.clone() for k, v in am.state_dict().items()})
        assert_same_state(am, pm)
    am.eval()
    pm.eval()
    return states


def assert_same_state(am: peftc.AdaptedModel, pm: peft.PeftModel) -> None:
    ours, theirs = am.state_dict(), pm.state_dict()
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("name", ["mlp", "llama"])
@pytest.mark.parametrize("init_type", ["batch_average_once", "batch_average"])
def test_batch_inits_train_as_peft_s(name: str, init_type: str, tmp_path: Path):
    """The projection from training batches as PEFT sets it (the first batch's, kept; or every batch's), saved as
    PEFT saves it: over SGD steps outputs, gradients and state dicts equal PEFT's; then eval, fold, checkpoints.
    The Llama's layers are checkpointed (a written projection must not change what backward recomputes from)."""
    pair = seeded_pair(name, init_lora_weights=False, velora_config={"num_groups": 5, "init_type": init_type})
    if name == "llama":
        pair.am.gradient_checkpointing_enable()
    embeds = [k for k in pair.am.state_dict() if "lora_velora_embed" in k]
    states = train_both(pair, range(3))
    for key in embeds:
        assert states[0][key].abs().sum() > 0, key  # set from the first batch
        assert torch.equal(states[0][key], states[-1][key]) == (init_type == "batch_average_once"), key
    check_eval(pair)
    check_fold(pair)
    check_checkpoints(pair, tmp_path)


def test_a_loaded_batch_average_once_adapter_takes_its_projection_again(tmp_path: Path):
    """PEFT keeps 'initialised' outside the state dict: a loaded adapter sets its projection from its first
    training batch again, over the saved one. peftc's flag is a run-time tensor, false at load, as PEFT's."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS["mlp"], "init_lora_weights": False,
              "velora_config": {"num_groups": 5, "init_type": "batch_average_once"}}
    pair = seeded_pair("mlp", init_lora_weights=False, velora_config=config["velora_config"])
    train_both(pair, range(1))
    pair.pm.save_pretrained(tmp_path)
    case, ref = zoo.mlp(), zoo.mlp()
    loaded = MethodPair(case, ref, peftc.load(case.model, tmp_path, is_trainable=True, example_inputs=case.inputs),
                        peft.PeftModel.from_pretrained(ref.model, tmp_path, is_trainable=True))
    saved = {k: v.clone() for k, v in loaded.am.state_dict().items() if "lora_velora_embed" in k}
    states = train_both(loaded, range(5, 6))
    assert all(not torch.equal(states[0][k], v) for k, v in saved.items())


def test_a_module_run_twice():
    """'batch_average' keeps the last run's projection, as PEFT does; 'batch_average_once' would set it at the
    first run and read it at the second, which one value per call cannot follow: refused, naming the module."""
    x = torch.randn(4, 6)
    for init_type in ("batch_average", "batch_average_once"):
        fields = {"r": 2, "target_modules": ["lin"], "init_lora_weights": False,
                  "velora_config": {"num_groups": 2, "init_type": init_type}}
        torch.manual_seed(0)
        base = zoo.Twice().eval()
        am = peftc.apply(copy.deepcopy(base), {"peft_type": "LORA", **fields}, example_inputs=(x,)).train()
        pm = peft.get_peft_model(base, peft.LoraConfig(**fields)).train()
        pm.load_state_dict(am.state_dict())
        if init_type == "batch_average_once":
            with pytest.raises(ConfigError, match=r"module\(s\) \['lin'\] run more than once per call"):
                am(x)
            continue
        torch.testing.assert_close(am(x), pm(x))
        assert_same_state(am, pm)
