"""`peftc.load(adapter_dir)` with no model: the base model comes from the adapter config, as PEFT's
`AutoPeftModelFor<Task>.from_pretrained(adapter_dir)` loads it, with the same outputs; bad configs and
adapters that do not fit name the file and field."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from transformers import BertModel, LlamaForCausalLM, PreTrainedTokenizerFast

import peftc
from tests import zoo

LORA = {"r": 4, "lora_alpha": 8, "init_lora_weights": False}


def saved_base(case: zoo.Case, tmp_path: Path) -> str:
    path = str(tmp_path / "base")
    case.model.save_pretrained(path)
    return path


def peft_adapter(base_path: str, cls: type, out: Path, targets: list[str], **config: Any) -> Path:
    """A PEFT adapter over the model saved at `base_path`, saved to `out` (its config then names the base)."""
    torch.manual_seed(3)
    pm = peft.get_peft_model(cls.from_pretrained(base_path), peft.LoraConfig(target_modules=targets, **LORA, **config))
    pm.save_pretrained(out)
    return out


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])
def test_causal_lm_folder_loads_as_auto_peft_model(task_type: str | None, tmp_path: Path):
    """With a task type the class is its auto class; without one, the class auto_mapping records (PEFT's
    AutoPeftModel)."""
    case = zoo.llama()
    base = saved_base(case, tmp_path)
    directory = peft_adapter(base, LlamaForCausalLM, tmp_path / "adapter", ["q_proj", "v_proj"],
                             task_type=task_type)
    auto = peft.AutoPeftModelForCausalLM if task_type else peft.AutoPeftModel
    want = logits(auto.from_pretrained(directory), case.inputs["input_ids"])
    am = peftc.load(directory)
    assert type(am.get_base_model()) is LlamaForCausalLM
    assert not am.training and not any(p.requires_grad for p in am.parameters())
    torch.testing.assert_close(logits(am, case.inputs["input_ids"]), want, atol=1e-5, rtol=0)


def test_peftc_saved_folder_loads_alone_and_trainable(tmp_path: Path):
    """A peftc adapter over a model loaded from a folder records that folder, and loads from its own."""
    case = zoo.bert()
    base = saved_base(case, tmp_path)
    am = peftc.apply(BertModel.from_pretrained(base), {"peft_type": "LORA", "target_modules": ["query"], **LORA,
                                                        "task_type": "FEATURE_EXTRACTION"})
    am.save_adapter(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    am2 = peftc.load(tmp_path / "adapter", is_trainable=True)
    assert type(am2.get_base_model()) is BertModel
    assert any(p.requires_grad for p in am2.parameters())
    am.eval(), am2.eval()
    torch.testing.assert_close(logits(am2, case.inputs["input_ids"]), logits(am, case.inputs["input_ids"]),
                               atol=1e-6, rtol=0)


def test_model_kwargs_reach_from_pretrained(tmp_path: Path):
    base = saved_base(zoo.llama(), tmp_path)
    directory = peft_adapter(base, LlamaForCausalLM, tmp_path / "adapter", ["q_proj"], task_type="CAUSAL_LM")
    am = peftc.load(directory, dtype=torch.float64)
    assert am.get_base_model().model.embed_tokens.weight.dtype == torch.float64
    with pytest.raises(TypeError, match="dtype"):
        peftc.load(zoo.llama().model, directory, dtype=torch.float64)


def test_tokenizer_beside_the_adapter_resizes_the_embeddings(tmp_path: Path):
    """As in PEFT: a saved tokenizer with more tokens than the model's vocabulary resizes its embeddings."""
    from tokenizers import Tokenizer, models

    case = zoo.llama()
    base = saved_base(case, tmp_path)
    directory = peft_adapter(base, LlamaForCausalLM, tmp_path / "adapter", ["q_proj"], task_type="CAUSAL_LM")
    vocab = {f"t{i}": i for i in range(zoo.VOCAB + 7)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    tok.save_pretrained(directory)
    torch.manual_seed(0)
    want = logits(peft.AutoPeftModelForCausalLM.from_pretrained(directory), case.inputs["input_ids"])
    am = peftc.load(directory)
    got = logits(am, case.inputs["input_ids"])
    assert got.shape[-1] == want.shape[-1] == zoo.VOCAB + 7
    # the new rows are drawn at random: the base vocabulary's logits are the comparable part
    torch.testing.assert_close(got[..., :zoo.VOCAB], want[..., :zoo.VOCAB], atol=1e-5, rtol=0)


def test_task_types_pick_peft_s_auto_classes():
    """Each task type loads the base with the class PEFT's AutoPeftModelFor<Task> uses."""
    import peft.auto

    from peftc.api import base_model_class

    theirs = {cls._target_peft_class.__name__: cls._target_class for cls in vars(peft.auto).values()
              if isinstance(cls, type) and issubclass(cls, peft.auto._BaseAutoPeftModel) and cls._target_class}
    for task_type, peft_class in peft.auto.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.items():
        config = peftc.load_config({"peft_type": "LORA", "target_modules": ["q"], "task_type": task_type})
        assert base_model_class(config, "adapter_config.json") is theirs[peft_class.__name__], task_type


def write_config(directory: Path, **changes: Any) -> None:
    path = directory / "adapter_config.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **changes}))


@pytest.mark.parametrize(("changes", "message"), [
    ({"base_model_name_or_path": None}, "base_model_name_or_path is not set"),
    ({"base_model_name_or_path": "meta-llama/Llama-3.2-1B"}, "base_model_name_or_path='meta-llama/Llama-3.2-1B' "
                                                             "is not a local folder"),
    ({"task_type": None, "auto_mapping": {"base_model_class": "Evil", "parent_library": "os"}}, "auto_mapping="),
])
def test_config_without_a_local_base_names_the_field_and_file(changes: dict, message: str, tmp_path: Path):
    base = saved_base(zoo.llama(), tmp_path)
    directory = peft_adapter(base, LlamaForCausalLM, tmp_path / "adapter", ["q_proj"], task_type="CAUSAL_LM")
    write_config(directory, **changes)
    with pytest.raises(peftc.ConfigError) as e:
        peftc.load(directory)
    assert str(e.value).startswith(os.path.join(directory, "adapter_config.json")) and message in str(e.value)


def test_base_that_does_not_load_names_the_file(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    base = saved_base(zoo.llama(), tmp_path)
    directory = peft_adapter(base, LlamaForCausalLM, tmp_path / "adapter", ["q_proj"], task_type="CAUSAL_LM")
    write_config(directory, base_model_name_or_path=str(tmp_path / "empty"))
    with pytest.raises(peftc.CheckpointError, match=r"adapter_config.json: base_model_name_or_path=.*empty"):
        peftc.load(directory)


def test_load_adapter_errors_name_the_checkpoint_file(tmp_path: Path):
    """`am.load_adapter` names the file whose config or weights do not fit, as `peftc.load` does."""
    case = zoo.mlp()
    am = peftc.apply(case.model, {"peft_type": "LORA", "target_modules": ["lin0"], **LORA},
                     example_inputs=case.inputs)
    other = peftc.apply(zoo.mlp().model, {"peft_type": "LORA", "target_modules": ["lin1"], **LORA},
                        example_inputs=case.inputs)
    other.save_adapter(tmp_path / "ok")
    write_config(tmp_path / "ok", target_modules=["nowhere"])
    with pytest.raises(peftc.TargetError, match=r"^" + str(tmp_path / "ok" / "adapter_config.json")):
        am.load_adapter(str(tmp_path / "ok"), "other")
    write_config(tmp_path / "ok", target_modules=["lin0"])  # the weights are lin1's: their file is named
    with pytest.raises(peftc.CheckpointError, match=r"^" + str(tmp_path / "ok" / "adapter_model.safetensors")):
        am.load_adapter(str(tmp_path / "ok"), "other")
    assert am.adapter_order == ["default"]
