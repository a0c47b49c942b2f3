"""Capture: one graph per call signature and mode, shape guards, and clear errors for untraceable models."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import peftc
from peftc.errors import CaptureError
from tests import zoo

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


def test_eval_and_train_graphs_follow_batchnorm_and_dropout():
    case = zoo.cnn()
    model = case.model
    am = peftc.apply(model, {**LORA, "target_modules": ["conv0"], "init_lora_weights": True},
                     example_inputs=case.inputs)
    x = case.inputs[0]
    am.eval()
    torch.testing.assert_close(am(x), model(x))  # B = 0: adapter is the identity
    am.train()
    model.train()
    y, y_ref = am(x), model(x)
    model.eval()
    torch.testing.assert_close(y, y_ref)
    # running statistics were updated in am's own buffers, exactly as in the model
    torch.testing.assert_close(am.state_dict()["base_model.model.bn.running_mean"], model.bn.running_mean)


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
