"""Capture: one graph per call signature and mode, shape guards, and clear errors for untraceable models."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn as nn

import peftc
from peftc.errors import CaptureError
from tests import oracle, zoo
from tests.oracle import randomize_adapters

LORA = {"peft_type": "LORA", "r": 2, "init_lora_weights": False}


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # control flow on a tensor value: torch.export cannot trace it
            return self.lin(x)
        return x


def test_plain_module_needs_example_inputs():
    with pytest.raises(CaptureError, match="example_inputs"):
        peftc.apply(zoo.mlp().model, {**LORA, "target_modules": ["lin0"]})


def test_untraceable_model_names_the_construct():
    with pytest.raises(CaptureError) as e:
        peftc.apply(DataDependent(), {**LORA, "target_modules": ["lin"]}, example_inputs=(torch.randn(2, 4),))
    message = str(e.value)
    assert "DataDependent" in message and "x.sum() > 0" in message and "hint:" in message


def test_same_signature_new_shapes_reuse_the_graph():
    case = zoo.llama()
    am = peftc.apply(case.model, {**LORA, "target_modules": ["q_proj"]})
    am.eval()
    for batch, seq in ((3, 9), (5, 4), (2, 17)):
        am(input_ids=torch.randint(0, zoo.VOCAB, (batch, seq)))
    assert len(am.graphs) == 1


def test_new_kwargs_and_modes_capture_new_graphs_once():
    case = zoo.llama()
    am = peftc.apply(case.model, {**LORA, "target_modules": ["q_proj"]})
    ids = case.inputs["input_ids"]
    am.eval()
    am(input_ids=ids)
    am(input_ids=ids, labels=ids)
    am.train()
    am(input_ids=ids, labels=ids)
    am(input_ids=ids[:, :5], labels=ids[:, :5])
    keys = sorted((g.training, len(g.input_checks)) for g in am.graphs)
    assert keys == [(False, 2), (False, 3), (True, 3)]


def test_batch_of_one_gets_its_own_specialised_graph():
    case = zoo.mlp()
    am = peftc.apply(case.model, {**LORA, "target_modules": ["lin0"]}, example_inputs=case.inputs)
    am.eval()
    x = torch.randn(1, 12)
    torch.testing.assert_close(am(x), am(torch.cat([x, x]))[:1])
    assert len(am.graphs) == 2
    am(torch.randn(7, 12))
    assert len(am.graphs) == 2


class ConvBnDropout(nn.Module):
    """BatchNorm (batch statistics and running-stat updates in train mode) and Dropout (active in train mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.conv1 = nn.Conv2d(8, 8, 3, stride=2)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.bn(self.conv0(x))))
        return self.head(torch.relu(self.conv1(h)).mean(dim=(2, 3)))


def test_eval_and_train_graphs_follow_batchnorm_and_dropout():
    """Eval: running statistics, no dropout. Train: batch statistics, dropout masks as PEFT draws them from the
    same seed, and running statistics updated in the adapted model's own buffers as in PEFT's model."""
    torch.manual_seed(0)
    model, ref = ConvBnDropout().eval(), ConvBnDropout().eval()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    config = {**LORA, "target_modules": ["conv0", "conv1", "head"]}
    am = peftc.apply(model, config, example_inputs=(x,))
    randomize_adapters(am)
    pm = peft.get_peft_model(ref, peft.LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"}))
    pm.load_state_dict(am.state_dict(), strict=True)
    pm.eval()
    with torch.no_grad():
        evaluated = am(x)
        torch.testing.assert_close(evaluated, pm(x), **oracle.TOL)
        assert not torch.allclose(evaluated, model(x), **oracle.TOL)  # the adapter is not an identity
        torch.testing.assert_close(am(x), evaluated, atol=0, rtol=0)  # no dropout in eval

    am.train()
    pm.train()
    outs = {}
    for seed in (5, 6):
        torch.manual_seed(seed)
        outs[seed] = am(x)
        torch.manual_seed(seed)
        torch.testing.assert_close(outs[seed], pm(x), **oracle.TOL)  # the same dropout masks and batch statistics
    assert not torch.allclose(outs[5], outs[6], **oracle.TOL)  # dropout ran: other seeds, other masks
    assert not torch.allclose(outs[5], evaluated, **oracle.TOL)
    assert {g.training for g in am.graphs} == {False, True}
    # running statistics were updated in am's own buffers, as in PEFT's model, and the user's model kept its own
    ours = am.state_dict()
    for stat in ("running_mean", "running_var", "num_batches_tracked"):
        theirs = getattr(pm.base_model.model.bn, stat)
        torch.testing.assert_close(ours[f"base_model.model.bn.{stat}"], theirs, **oracle.TOL)
        assert not torch.equal(theirs, getattr(ConvBnDropout().bn, stat))
        assert torch.equal(getattr(model.bn, stat), getattr(ConvBnDropout().bn, stat))


def test_user_model_is_left_as_it_was():
    case = zoo.llama()
    model = case.model
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
    was_training = model.training
    am = peftc.apply(model, {**LORA, "target_modules": ["q_proj", "embed_tokens"]})
    am.train()
    opt = torch.optim.SGD([p for p in am.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        am(input_ids=case.inputs["input_ids"], labels=case.inputs["input_ids"]).loss.backward()
        opt.step()
    assert model.training == was_training
    for name, p in model.named_parameters():
        assert p.requires_grad == before[name][0] and torch.equal(p, before[name][1]), name
        assert p.grad is None


def test_dtype_change_recaptures():
    case = zoo.mlp()
    am = peftc.apply(case.model, {**LORA, "target_modules": ["lin0"]}, example_inputs=case.inputs)
    am.eval()
    x = case.inputs[0]
    y = am(x)
    am.double()
    assert am.graphs == []
    torch.testing.assert_close(am(x.double()), y.double())
