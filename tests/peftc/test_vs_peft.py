"""peftc against PEFT as the oracle, on every zoo model.

Each model is built twice from the same seed: one copy goes to `peftc.apply`, the other to
`peft.get_peft_model`; peftc's state dict is loaded strictly into the PEFT model (key parity),
and then both must compute the same outputs, gradients, buffer updates and parameter counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import peft
import pytest
import torch

import peftc
from tests import zoo
from tests.groups import grouped
from tests.oracle import TOL, assert_same_outputs, example, loss_of, second_inputs, tensors, train_inputs

pytestmark = [
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
]

R, ALPHA = 4, 12  # scale 3, so a wrong alpha/r would show
CASES = list(zoo.FACTORIES)


def lora_dict(case: zoo.Case, **extra: Any) -> dict[str, Any]:
    fields = {"r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0, "target_modules": case.targets,
              "init_lora_weights": False, **extra}
    return {"peft_type": "LORA", **fields}


def peft_config(case: zoo.Case, **extra: Any) -> peft.LoraConfig:
    fields = lora_dict(case, **extra)
    del fields["peft_type"]
    return peft.LoraConfig(**fields)


@dataclass
class Pair:
    case: zoo.Case
    am: peftc.AdaptedModel
    pm: peft.PeftModel
    load_result: Any
    snapshot: dict[str, torch.Tensor]  # the user's model before peftc saw it
    requires_grad: dict[str, bool]
    training: dict[str, bool]


def make_pair(name: str, training: bool) -> Pair:
    case, ref = zoo.FACTORIES[name](), zoo.FACTORIES[name]()
    case.model.train(training)
    ref.model.train(training)
    snapshot = {k: v.detach().clone() for k, v in case.model.state_dict().items()}
    requires_grad = {n: p.requires_grad for n, p in case.model.named_parameters()}
    modes = {n: m.training for n, m in case.model.named_modules()}
    inputs = train_inputs(case) if training else case.inputs
    am = peftc.apply(case.model, lora_dict(case), example_inputs=example(case, inputs))
    pm = peft.get_peft_model(ref.model, peft_config(case))
    load_result = pm.load_state_dict(am.state_dict(), strict=True)
    am.train(training)
    pm.train(training)
    return Pair(case, am, pm, load_result, snapshot, requires_grad, modes)


@pytest.fixture(scope="module", params=grouped("vs-peft", CASES))
def eval_pair(request: pytest.FixtureRequest) -> Pair:
    return make_pair(request.param, training=False)


@pytest.fixture(scope="module", params=grouped("vs-peft", CASES))
def train_pair(request: pytest.FixtureRequest) -> Pair:
    return make_pair(request.param, training=True)


# -- structure ---------------------------------------------------------------------------------


def test_state_dict_keys_are_peft_keys(eval_pair: Pair):
    am, pm = eval_pair.am, eval_pair.pm
    assert eval_pair.load_result.missing_keys == [] and eval_pair.load_result.unexpected_keys == []
    ours, theirs = am.state_dict(), pm.state_dict()
    assert set(ours) == set(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    # the trainable parameters are exactly PEFT's, under the same names
    assert {n for n, _ in am.adapter_parameters()} == {n for n, p in pm.named_parameters() if p.requires_grad}
    assert {n for n, p in am.named_parameters() if p.requires_grad} == {n for n, _ in am.adapter_parameters()}


def test_trainable_parameter_counts(eval_pair: Pair, capsys: pytest.CaptureFixture[str]):
    am, pm = eval_pair.am, eval_pair.pm
    assert am.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    am.print_trainable_parameters()
    ours = capsys.readouterr().out
    pm.print_trainable_parameters()
    assert ours == capsys.readouterr().out


# -- eval ----------------------------------------------------------------------------------------


def test_eval_forward_matches_peft_at_two_shapes(eval_pair: Pair):
    case, am, pm = eval_pair.case, eval_pair.am, eval_pair.pm
    with torch.no_grad():
        got = case.call(am)
        assert_same_outputs(got, case.call(pm))
        # the adapter is live: the output is not the base model's
        base = tensors(case.call(case.model))
        assert any(not torch.allclose(t, base[k]) for k, t in tensors(got).items())

        n_graphs = len(am.graphs)
        other = second_inputs(case)
        assert_same_outputs(case.call(am, other), case.call(pm, other))
    assert len(am.graphs) == n_graphs, "a new batch/sequence length re-captured the model"


def test_eval_forward_is_deterministic_and_grad_free(eval_pair: Pair):
    case, am = eval_pair.case, eval_pair.am
    with torch.no_grad():
        first, second = tensors(case.call(am)), tensors(case.call(am))
    for key in first:
        assert torch.equal(first[key], second[key])
        assert first[key].grad_fn is None


# -- train ---------------------------------------------------------------------------------------


def test_train_forward_backward_match_peft(train_pair: Pair):
    case, am, pm = train_pair.case, train_pair.am, train_pair.pm
    pm.load_state_dict(am.state_dict(), strict=True)  # tests of this pair may have moved weights/stats
    buffers_before = {k: v.clone() for k, v in am.named_buffers()}
    am.zero_grad(set_to_none=True)
    pm.zero_grad(set_to_none=True)
    inputs = train_inputs(case)
    n_graphs = len(am.graphs)

    # base-model dropout (GPT-2, BERT, MLP) draws from the global RNG in the same order in both
    torch.manual_seed(1234)
    out = case.call(am, inputs)
    torch.manual_seed(1234)
    ref = case.call(pm, inputs)
    assert_same_outputs(out, ref)
    assert len(am.graphs) == n_graphs  # the graph captured at apply() is the one that ran

    # buffers the model updates in train mode (BatchNorm statistics) move exactly as under PEFT
    theirs = pm.state_dict()
    for name, buf in am.named_buffers():
        if name in theirs:
            torch.testing.assert_close(buf, theirs[name], **TOL)
    if case.name == "cnn":
        running_mean = "base_model.model.bn.running_mean"
        assert not torch.equal(am.get_buffer(running_mean), buffers_before[running_mean])
        assert int(am.get_buffer("base_model.model.bn.num_batches_tracked")) == 1 + int(
            buffers_before["base_model.model.bn.num_batches_tracked"]
        )

    loss_of(case, out).backward()
    loss_of(case, ref).backward()
    adapters = dict(am.adapter_parameters())
    assert adapters
    for name, p in am.named_parameters():
        if name not in adapters:
            assert not p.requires_grad and p.grad is None, name
    peft_params = dict(pm.named_parameters())
    for name, p in adapters.items():
        assert p.requires_grad and p.grad is not None, name
        assert peft_params[name].grad is not None, name
        torch.testing.assert_close(p.grad, peft_params[name].grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    assert any(p.grad.abs().sum() > 0 for p in adapters.values())


def test_user_model_is_never_mutated(train_pair: Pair):
    case, am = train_pair.case, train_pair.am
    assert am.training
    adapters_before = {n: p.detach().clone() for n, p in am.adapter_parameters()}
    opt = torch.optim.AdamW(am.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        loss_of(case, case.call(am, train_inputs(case))).backward()
        opt.step()
    am.eval()
    am.train()

    assert any(not torch.equal(p, adapters_before[n]) for n, p in am.adapter_parameters())
    model = case.model
    after = model.state_dict()
    assert set(after) == set(train_pair.snapshot)
    for key, value in train_pair.snapshot.items():
        assert torch.equal(after[key], value), f"the user's {key} changed"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == train_pair.requires_grad
    assert {n: m.training for n, m in model.named_modules()} == train_pair.training
    assert all(p.grad is None for p in model.parameters())
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
    # the adapted model's frozen base parameters are still the user's weights, bit for bit
    adapters = dict(am.adapter_parameters())
    for name, p in am.named_parameters():
        if name not in adapters:
            user_key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            assert torch.equal(p, train_pair.snapshot[user_key]), name


# -- lora_dropout > 0: PEFT draws its dropout masks in the same order, so seeded runs agree ---------


@pytest.mark.parametrize("name", ["mlp", "embedding_model"])
def test_lora_dropout_matches_peft_in_train_and_is_off_in_eval(name: str):
    case, ref = zoo.FACTORIES[name](), zoo.FACTORIES[name]()
    am = peftc.apply(case.model, lora_dict(case, lora_dropout=0.5), example_inputs=case.inputs)
    pm = peft.get_peft_model(ref.model, peft_config(case, lora_dropout=0.5))
    pm.load_state_dict(am.state_dict(), strict=True)
    am.train()
    pm.train()
    torch.manual_seed(7)
    first = case.call(am)
    torch.manual_seed(7)
    torch.testing.assert_close(first, case.call(pm), **TOL)
    torch.manual_seed(8)
    assert not torch.allclose(first, case.call(am)), "lora_dropout=0.5 had no effect in train mode"
    am.eval()
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(case.call(am), case.call(pm), **TOL)
        torch.testing.assert_close(case.call(am), case.call(am), atol=0, rtol=0)


def test_embedding_lora_has_no_dropout():
    """PEFT's LoRA Embedding ignores lora_dropout; so must peftc (the embedding model has no other dropout)."""
    case = zoo.embedding_model()
    am = peftc.apply(case.model, lora_dict(case, lora_dropout=0.5, target_modules=["emb"]),
                     example_inputs=case.inputs)
    am.train()
    torch.manual_seed(0)
    first = case.call(am)
    torch.manual_seed(1)
    torch.testing.assert_close(first, case.call(am), atol=0, rtol=0)


# -- batch of one: a specialised shape, captured once more and still right --------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn", "llama"])
def test_batch_of_one_matches_peft(name: str):
    case, ref = zoo.FACTORIES[name](), zoo.FACTORIES[name]()
    am = peftc.apply(case.model, lora_dict(case), example_inputs=example(case, case.inputs))
    pm = peft.get_peft_model(ref.model, peft_config(case)).eval()
    pm.load_state_dict(am.state_dict(), strict=True)
    one = {k: v[:1] for k, v in case.inputs.items()} if case.transformers else (case.inputs[0][:1],)
    with torch.no_grad():
        assert_same_outputs(case.call(am, one), case.call(pm, one))
        n_graphs = len(am.graphs)
        assert_same_outputs(case.call(am), case.call(pm))  # the batched graph is still used for batches
    assert len(am.graphs) == n_graphs

