"""LoRA's `modules_to_save` against PEFT's ModulesToSaveWrapper: whole modules trained as a copy per adapter
(also what task_type SEQ_CLS does with the classifier head)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftc
from peftc.capture import STATE
from peftc.errors import ConfigError
from peftc.graph import adapter_nodes
from peftc.method import METHODS
from tests import zoo
from tests.oracle import MethodPair, check_checkpoints, check_eval, check_fold, check_train, make_pair

pytestmark = pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning")


def pair_of(**extra: Any) -> MethodPair:
    fields = {"r": 2, "lora_alpha": 6, "target_modules": ["query", "value"], **extra}
    return make_pair("bert_seq_cls", {"peft_type": "LORA", **fields}, peft.LoraConfig(**fields))


@pytest.mark.parametrize("extra", [{"modules_to_save": ["classifier"]},
                                   {"modules_to_save": ["pooler"]}],  # a module with a submodule (pooler.dense)
                         ids=["classifier", "nested"])
def test_modules_to_save_match_peft(extra: dict[str, Any], tmp_path: Path):
    pair = pair_of(**extra)
    check_eval(pair)
    check_checkpoints(pair, tmp_path)
    check_train(pair)
    check_fold(pair)


def test_keys_graph_and_config(tmp_path: Path):
    pair = pair_of(task_type="SEQ_CLS")
    check_eval(pair)
    assert pair.am.peft_config["default"].modules_to_save == ["classifier", "score"]  # as PEFT writes it
    keys = set(pair.am.state_dict())
    for leaf in ("weight", "bias"):
        assert f"base_model.model.classifier.original_module.{leaf}" in keys
        assert f"base_model.model.classifier.modules_to_save.default.{leaf}" in keys
    pair.am.save_adapter(tmp_path)
    saved = sorted(k for k in load_file(tmp_path / "adapter_model.safetensors") if "lora_" not in k)
    assert saved == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]
    graph = pair.am.graph_for(**zoo.bert_seq_cls().inputs).gm.graph
    head = next(n for n in graph.nodes if n.target == torch.ops.aten.linear.default
                and n.args[1].meta.get(STATE, "").startswith("base_model.model.classifier"))
    assert [a.meta[STATE] for a in head.args[1:]] == ["base_model.model.classifier.modules_to_save.default.weight",
                                                      "base_model.model.classifier.modules_to_save.default.bias"]
    states = {n.meta.get(STATE) for n in graph.find_nodes(op="placeholder")}
    assert "base_model.model.classifier.original_module.weight" not in states  # nothing reads the original
    assert not [n for n in adapter_nodes(graph) if "classifier" in n.meta["nn_module_stack"].__repr__()]
    with pair.am.disable_adapter():  # the original head again
        with torch.no_grad():
            out = pair.am(**zoo.bert_seq_cls().inputs).logits
    torch.testing.assert_close(out, zoo.bert_seq_cls().model(**zoo.bert_seq_cls().inputs).logits)


def test_refused(tmp_path: Path):
    case = zoo.bert_seq_cls()
    base = {"peft_type": "LORA", "target_modules": ["query"]}
    with pytest.raises(ConfigError, match="buffers"):  # embeddings hold position_ids
        peftc.apply(case.model, {**base, "modules_to_save": ["embeddings"]}, example_inputs=case.inputs)
    with pytest.raises(ConfigError, match="matched no module"):
        peftc.apply(case.model, {**base, "modules_to_save": ["clasifier"]}, example_inputs=case.inputs)
    with pytest.raises(ConfigError, match="choose one"):
        peftc.apply(case.model, {**base, "modules_to_save": ["word_embeddings"],
                                 "trainable_token_indices": {"word_embeddings": [1]}}, example_inputs=case.inputs)
    am = peftc.apply(case.model, {**base, "modules_to_save": ["classifier"]}, example_inputs=case.inputs)
    am.add_adapter("other", {**base, "modules_to_save": ["classifier"]})
    with pytest.raises(ConfigError, match="mixed batches"):
        am(**case.inputs, adapter_names=["default", "other", "default"])
    am.set_adapter(["default", "other"])
    with pytest.raises(ConfigError, match="one at a time"):
        am(**case.inputs)
    with pytest.raises(ConfigError, match="plain LoRA"):
        am.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="linear")
    am.save_adapter(tmp_path, "other")
    with pytest.raises(ConfigError, match="hot-swapping"):
        am.hotswap_adapter(tmp_path / "other", "default")


# every method whose config has modules_to_save: its example adapter at lin0, lin1 trained as a copy
OTHER_METHODS = ["IA3", "LOHA", "LOKR", "OFT", "BOFT", "HRA", "VERA"]


@pytest.mark.parametrize("peft_type", OTHER_METHODS)
def test_modules_to_save_of_every_method_match_peft(peft_type: str, tmp_path: Path):
    """PEFT's ModulesToSaveWrapper belongs to no method: a copy of lin1 beside each method's adapter at lin0
    matches PEFT (outputs, gradients, checkpoints both ways with `lin1.weight` / `lin1.bias` keys, fold)."""
    config = {**METHODS[peft_type].example_config, "target_modules": ["lin0"], "modules_to_save": ["lin1"]}
    if peft_type == "IA3":
        config["feedforward_modules"] = []
    fields = {k: v for k, v in config.items() if k != "peft_type"}
    pair = make_pair("mlp", config, peft.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](**fields))
    assert {"base_model.model.lin1.modules_to_save.default.weight",
            "base_model.model.lin1.original_module.weight"} <= set(pair.am.state_dict())
    check_eval(pair)
    check_checkpoints(pair, tmp_path)
    saved = load_file(tmp_path / "peftc" / "adapter_model.safetensors")
    assert {"base_model.model.lin1.weight", "base_model.model.lin1.bias"} <= set(saved)
    check_train(pair)
    merged = check_fold(pair)
    assert set(merged) >= {"lin1"}


def test_task_type_heads_for_another_method(tmp_path: Path):
    """task_type SEQ_CLS adds the classifier to any method's modules_to_save, as PEFT's model for the task."""
    fields = {"target_modules": ["query", "value"], "feedforward_modules": [], "task_type": "SEQ_CLS"}
    pair = make_pair("bert_seq_cls", {"peft_type": "IA3", **fields}, peft.IA3Config(**fields))
    assert pair.am.peft_config["default"].modules_to_save == ["classifier", "score"]
    check_eval(pair)
    check_checkpoints(pair, tmp_path)
    check_train(pair)
