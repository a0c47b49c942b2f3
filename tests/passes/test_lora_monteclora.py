"""MonteCLoRA (`monteclora_config`) against PEFT: training (A perturbed by the sampler's draws, seeded alike, over
buffer refills; the variational loss and its gradients; optimizer steps), and LoRA outside training (eval, fold,
checkpoints with the sampler's tensors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import torch.nn as nn

import peftc
from peftc.errors import ConfigError
from tests import zoo
from tests.oracle import (
    assert_same_outputs,
    check_checkpoints,
    check_eval,
    check_fold,
    loss_of,
    make_pair,
    saved_shapes,
    seeded_lora_pair,
    train_inputs,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
]

TARGETS = {"mlp": ["lin0", "lin1"], "chain": ["a", "b", "c"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
MONTE = {"num_samples": 3, "buffer_size": 2, "sample_scaler": 0.01}
# a visible perturbation and loss: noise at 0.5, the KL weighted 0.1, the entropy term on
TRAIN = {"num_samples": 3, "buffer_size": 2, "sample_scaler": 0.5, "kl_loss_weight": 0.1, "use_entropy": True}
TOL = {"atol": 2e-5, "rtol": 2e-5}


@pytest.mark.parametrize("name", ["mlp", "llama", "gpt2"])
def test_monteclora_outside_training_matches_peft(name: str, tmp_path: Path):
    config = {"r": 2, "lora_alpha": 4, "target_modules": TARGETS[name], "init_lora_weights": False,
              "monteclora_config": MONTE}
    pair = make_pair(name, {"peft_type": "LORA", **config}, peft.LoraConfig(**config))  # every tensor across
    check_eval(pair)
    check_checkpoints(pair, tmp_path)
    assert any(k.endswith("lora_monteclora_sampler.gaussian_var_prior") for k in saved_shapes(tmp_path / "peftc"))
    ours = json.loads((tmp_path / "peftc" / "adapter_config.json").read_text())["monteclora_config"]
    assert ours == json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["monteclora_config"]
    check_fold(pair)
    assert pair.am.monteclora_loss() == 0.0 == pair.pm.base_model._get_monteclora_loss()  # eval: none


def assert_same_state(am: peftc.AdaptedModel, pm: peft.PeftModel) -> None:
    ours, theirs = am.state_dict(), pm.state_dict()
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], **TOL, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("name", ["chain", "llama"])
def test_monteclora_training_matches_peft(name: str, tmp_path: Path):
    """Seeded alike, the same init (sampler included) and the same draws: outputs, the variational loss and every
    adapter gradient equal PEFT's over steps that use up the buffer (size 2) and refill it, with SGD steps; then
    eval, fold and checkpoints (holding the last sampled variance and weights) still agree. The Llama's layers are
    checkpointed (recomputed in backward from the same draw)."""
    pair = seeded_lora_pair(name, TARGETS[name], init_lora_weights=False, monteclora_config=TRAIN)
    am, pm, case = pair.am, pair.pm, pair.case
    if name == "llama":
        am.gradient_checkpointing_enable()
    assert_same_state(am, pm)  # the same draws at init: sampler parameters, and the layers after them
    am.train()
    pm.train()
    ours = torch.optim.SGD([p for _, p in am.adapter_parameters()], lr=0.01)
    theirs = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.01)
    inputs = train_inputs(case)
    samplers = {n for n, _ in am.adapter_parameters() if "lora_monteclora_sampler" in n}
    assert samplers
    for step in range(5):
        torch.manual_seed(step)
        out = case.call(am, inputs)
        torch.manual_seed(step)
        ref = case.call(pm, inputs)
        assert_same_outputs(out, ref, TOL)
        extra, want = am._get_monteclora_loss(), pm.base_model._get_monteclora_loss()
        torch.testing.assert_close(extra, want, **TOL)
        (loss_of(case, out) + extra).backward()
        (loss_of(case, ref) + want).backward()
        reference = dict(pm.named_parameters())
        for key, p in am.adapter_parameters():
            torch.testing.assert_close(p.grad, reference[key].grad, **TOL, msg=lambda m, k=key, i=step: f"{i} {k}: {m}")
        assert all(dict(am.adapter_parameters())[n].grad.abs().sum() > 0 for n in samplers)
        ours.step()
        theirs.step()
        ours.zero_grad()
        theirs.zero_grad()
    assert_same_state(am, pm)  # the sampler's buffers hold the last call's variance and weights, as PEFT's
    am.eval()
    pm.eval()
    for module in pm.modules():  # PEFT's buffers now hold tensors with a gradient, which deepcopy (its fold) refuses
        if isinstance(module, peft.tuners.lora.monteclora.MontecloraSampler):
            module.gaussian_var_prior, module.expert_weights = (module.gaussian_var_prior.detach(),
                                                                module.expert_weights.detach())
    check_eval(pair, TOL)
    check_fold(pair, TOL)
    check_checkpoints(pair, tmp_path, TOL)


def test_a_loaded_adapter_trains_as_peft_s(tmp_path: Path):
    """A MonteCLoRA adapter PEFT saved, loaded by each (seeded alike: each draws its sampler's samples at load),
    trains the same: outputs, the loss and gradients over a buffer refill."""
    pair = seeded_lora_pair("chain", TARGETS["chain"], init_lora_weights=False, monteclora_config=TRAIN)
    pair.pm.save_pretrained(tmp_path)
    case, ref = zoo.chain(), zoo.chain()
    torch.manual_seed(3)
    am = peftc.load(case.model, tmp_path, is_trainable=True, example_inputs=case.inputs).train()
    torch.manual_seed(3)
    pm = peft.PeftModel.from_pretrained(ref.model, tmp_path, is_trainable=True).train()
    for step in range(3):
        torch.manual_seed(step)
        out = case.call(am)
        torch.manual_seed(step)
        want = case.call(pm)
        assert_same_outputs(out, want, TOL)
        (loss_of(case, out) + am._get_monteclora_loss()).backward()
        (loss_of(case, want) + pm.base_model._get_monteclora_loss()).backward()
        reference = dict(pm.named_parameters())
        for key, p in am.adapter_parameters():
            torch.testing.assert_close(p.grad, reference[key].grad, **TOL, msg=lambda m, k=key, i=step: f"{i} {k}: {m}")


def test_monteclora_perturbs_a_in_training_only():
    """The training forward is not LoRA's (else the test above would prove nothing) and draws anew each call."""
    pair = seeded_lora_pair("chain", TARGETS["chain"], init_lora_weights=False, monteclora_config=TRAIN)
    am, case = pair.am, pair.case
    with torch.no_grad():
        lora = case.call(am.eval())
        am.train()
        first, second = case.call(am), case.call(am)
    assert not torch.allclose(first, lora) and not torch.allclose(first, second)


def test_nan_in_the_expert_weights_falls_back_to_a():
    """PEFT uses A unperturbed when the sampled weights hold a NaN (an expert prior so large that exp overflows):
    the same outputs and A, B gradients, and no NaN reaches a gradient."""
    pair = seeded_lora_pair("chain", TARGETS["chain"], init_lora_weights=False, monteclora_config=TRAIN)
    am, pm, case = pair.am, pair.pm, pair.case
    prior = "base_model.model.b.lora_monteclora_sampler.default.expert_weights_prior"
    with torch.no_grad():
        for model in (am, pm):
            dict(model.named_parameters())[prior][0] = 100.0
    am.train()
    pm.train()
    with pytest.warns(UserWarning, match="Monteclora sampling produced NaNs"):
        ref = case.call(pm)
    out = case.call(am)
    assert_same_outputs(out, ref, TOL)
    loss_of(case, out).backward()
    loss_of(case, ref).backward()
    reference = dict(pm.named_parameters())
    for key, p in am.adapter_parameters():
        assert torch.isfinite(p.grad).all(), key
        theirs = reference[key].grad
        torch.testing.assert_close(p.grad, torch.zeros_like(p.grad) if theirs is None else theirs, **TOL)


def test_what_peftc_refuses_in_training():
    x = torch.randn(4, 6)
    config = {"peft_type": "LORA", "r": 2, "target_modules": ["lin"], "monteclora_config": MONTE}
    am = peftc.apply(zoo.Twice().eval(), config, example_inputs=(x,))
    am(x)  # eval: LoRA
    with pytest.raises(ConfigError, match=r"module\(s\) \[.lin.\] run more than once per call"):
        am.train()(x)
    case = zoo.mlp()
    config = {"peft_type": "LORA", "r": 2, "target_modules": ["lin0"], "monteclora_config": MONTE}
    am = peftc.apply(case.model, config, example_inputs=case.inputs)
    am.add_adapter("other", config)
    am.train()
    with pytest.raises(ConfigError, match="mixed batches .* not supported with monteclora_config"):
        am(*case.inputs, adapter_names=["default", "other", "default", "__base__"])


class TaskLoss:
    """What a transformers Trainer's compute_loss gives: the model's loss (and outputs)."""

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any):
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


class MonteTrainer(peftc.MontecloraTrainerMixin, TaskLoss):
    pass


def test_trainer_mixin_adds_the_variational_loss_as_peft_s():
    pair = seeded_lora_pair("llama", TARGETS["llama"], init_lora_weights=False, monteclora_config=TRAIN)
    am, pm, case = pair.am.train(), pair.pm.train(), pair.case
    inputs = train_inputs(case)
    torch.manual_seed(0)
    total, outputs = MonteTrainer().compute_loss(am, inputs, return_outputs=True)
    torch.manual_seed(0)
    want = type("PeftTrainer", (peft.helpers.MontecloraTrainerMixin, TaskLoss), {})().compute_loss(pm, inputs)
    torch.testing.assert_close(total, want, **TOL)
    torch.testing.assert_close(total, outputs.loss + am.monteclora_loss())
    assert am.monteclora_loss() != 0.0


def test_monteclora_config_is_checked_as_peft_checks_it():
    from peftc.config import load_config

    with pytest.raises(ConfigError, match=r"monteclora_config\['num_samples'\] must be greater than 0"):
        load_config({"peft_type": "LORA", "target_modules": ["q"], "monteclora_config": {"num_samples": 0}})
    with pytest.raises(ConfigError, match="monteclora_config and use_dora cannot be combined"):
        load_config({"peft_type": "LORA", "target_modules": ["q"], "monteclora_config": {}, "use_dora": True})
