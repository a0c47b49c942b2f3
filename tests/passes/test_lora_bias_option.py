"""LoRA's `bias` option ("all", "lora_only"): base biases trained as PEFT trains them, saved under PEFT's keys."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch

import peftc
from tests import zoo
from tests.oracle import check_checkpoints, check_eval, check_fold, check_train, make_pair, saved_shapes

pytestmark = [
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
]

TARGETS = {"mlp": ["lin0"], "bert": ["query", "value"], "gpt2": ["c_attn"], "cnn": ["conv0", "head"],
           "bert_seq_cls": ["query"]}
# the classifier PEFT trains as a copy (modules_to_save): under "all", PEFT saves the original's bias and the
# copy's bias a second time (its live key less the adapter name); only the copy's trains
TASK = {"bert_seq_cls": "SEQ_CLS"}


def pair_of(name: str, bias: str):
    config = {"r": 2, "lora_alpha": 6, "target_modules": TARGETS[name], "init_lora_weights": False, "bias": bias,
              "task_type": TASK.get(name)}
    pair = make_pair(name, {"peft_type": "LORA", **config}, peft.LoraConfig(**config))
    with torch.no_grad():  # biases away from the base model's, the same in both
        for (name_ours, p), (name_theirs, q) in zip(sorted(pair.am.adapter_parameters()),
                                                    sorted((n, q) for n, q in pair.pm.named_parameters()
                                                           if q.requires_grad)):
            assert name_ours == name_theirs
            if name_ours.endswith(".bias"):
                p.add_(0.3)
                q.add_(0.3)
    return pair


@pytest.mark.parametrize("bias", ["all", "lora_only"])
@pytest.mark.parametrize("name", ["mlp", "bert", "gpt2", "cnn", "bert_seq_cls"])
def test_trained_biases_match_peft(name: str, bias: str, tmp_path: Path):
    case_model = zoo.FACTORIES[name]().model
    user_biases = {k: v.clone() for k, v in case_model.state_dict().items() if k.endswith("bias")}
    pair = pair_of(name, bias)
    trained = {n for n, _ in pair.am.adapter_parameters() if ".lora_" not in n and "modules_to_save" not in n}
    assert trained == {n for n, p in pair.pm.named_parameters() if p.requires_grad and ".lora_" not in n
                       and "modules_to_save" not in n}
    assert trained and all(n.endswith(".bias") for n in trained)
    check_eval(pair)
    check_checkpoints(pair, tmp_path)  # the same keys as PEFT's save, both ways
    saved = {k for k in saved_shapes(tmp_path / "peftc") if ".lora_" not in k and "classifier" not in k}
    assert saved == {k for k in trained if "classifier" not in k}
    check_fold(pair)
    check_train(pair)
    # the user's model is never written: its biases are as they were
    for k, v in pair.case.model.state_dict().items():
        if k in user_biases:
            torch.testing.assert_close(v, user_biases[k], rtol=0, atol=0)


def test_biases_train_only_while_their_adapter_is_active():
    case = zoo.mlp()
    base = {"peft_type": "LORA", "r": 2, "target_modules": ["lin0"]}
    am = peftc.apply(case.model, {**base, "bias": "lora_only"}, example_inputs=case.inputs)
    am.add_adapter("other", base)
    bias = dict(am.named_parameters())["base_model.model.lin0.base_layer.bias"]
    assert bias.requires_grad
    am.set_adapter("other")
    assert not bias.requires_grad
    assert "base_model.model.lin0.base_layer.bias" not in dict(am.adapter_parameters())
    am.set_adapter("default")
    assert bias.requires_grad
    assert bias.data_ptr() != case.model.lin0.bias.data_ptr()
