"""AdaLoRA against PEFT's AdaLoraModel on the same weights: outputs, gradients (with the orthogonal
regularisation in the loss), fold vs merge_and_unload, rank allocation over training steps
(`update_and_allocate`: the same masks and weights), checkpoints with a rank_pattern in both directions,
and the Trainer callback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from peftc.passes.adalora import AdaLora
from safetensors.torch import load_file

import peftc
from peftc.errors import ConfigError
from peftc.graph import eager
from peftc.trainer_callbacks import AdaLoraCallback
from tests import zoo
from tests.oracle import check_checkpoints, check_eval, check_fold, check_train, make_pair, saved_shapes

pytestmark = [pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
              pytest.mark.filterwarnings("ignore:The following rank_pattern keys:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")]

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "cnn": ["conv0", "conv1", "head"]}
# a schedule whose budget falls from init_r to target_r within the steps the tests run
SCHEDULE = {"init_r": 4, "target_r": 2, "lora_alpha": 6, "total_step": 6, "tinit": 1, "tfinal": 2}


def fields(case_name: str, **extra: Any) -> dict[str, Any]:
    return {**SCHEDULE, "target_modules": TARGETS[case_name], "init_lora_weights": False, **extra}


def pair_of(case_name: str, training: bool = False, **extra: Any):
    f = fields(case_name, **extra)
    return make_pair(case_name, {"peft_type": "ADALORA", **f}, peft.AdaLoraConfig(**f), training=training)


@pytest.mark.parametrize(("name", "task_type"), [("llama", "CAUSAL_LM"), ("gpt2", None), ("cnn", None)])
def test_adalora_matches_peft(name: str, task_type: str | None, tmp_path: Path):
    """Linear (llama), transformers Conv1D (gpt2) and Conv2d (cnn); with a task type the loss carries the
    orthogonal regularisation, as PEFT's model for the task adds it, and without one (gpt2's labelled loss)
    it does not, as in PEFT."""
    pair = pair_of(name, task_type=task_type)
    check_eval(pair)
    check_checkpoints(pair, tmp_path)
    check_train(pair)
    check_fold(pair)


def test_orth_regularization_is_added_to_the_loss():
    pair = pair_of("llama", task_type="CAUSAL_LM")
    ids = pair.case.inputs["input_ids"]
    pair.am.train()
    loss = pair.am(input_ids=ids, labels=ids).loss
    with pair.am.disable_adapter():  # PEFT adds the term whatever adapters are active
        base_loss = pair.am(input_ids=ids, labels=ids).loss
        assert not torch.equal(base_loss, pair.case.model(input_ids=ids, labels=ids).loss)
    delta_free = pair.case.model(input_ids=ids, labels=ids).loss
    modules = [{k: t for k, (_, t) in ma.tensors.items()} for ma in pair.am.adapter_set.of("default")]
    term = AdaLora().loss_term(eager, pair.am.peft_config["default"], modules)
    assert term > 0.1
    torch.testing.assert_close(base_loss, delta_free + term)
    assert not torch.equal(loss, base_loss)
    # an adapter loaded for inference adds nothing (PEFT's has no trainable adapter to regularise)
    pair.am.peft_config["default"].inference_mode = True
    pair.am.programs.clear()
    torch.testing.assert_close(pair.am(input_ids=ids, labels=ids).loss,
                               pair.pm.get_base_model()(input_ids=ids, labels=ids).loss)


def peft_pattern(pm: peft.PeftModel) -> dict[str, list[bool]] | None:
    """PEFT's rank_pattern in its saved form (keys without the adapter name)."""
    pattern = pm.peft_config["default"].rank_pattern
    return None if pattern is None else {k.replace(".default", ""): v for k, v in pattern.items()}


def train_both(pair, steps: int, lr: float = 0.5, labels: torch.Tensor | None = None
               ) -> list[tuple[dict | None, dict | None]]:
    """The same SGD steps on both models (language-model labels unless `labels`), each followed by
    update_and_allocate; the patterns after each."""
    case, am, pm = pair.case, pair.am, pair.pm
    ours = torch.optim.SGD([p for _, p in am.adapter_parameters()], lr=lr)
    theirs = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=lr)
    inputs = {**case.inputs, "labels": case.inputs["input_ids"] if labels is None else labels}
    am.zero_grad(set_to_none=True)  # (from any step before)
    pm.zero_grad(set_to_none=True)
    am.train()
    pm.train()
    patterns = []
    for step in range(steps):
        for model, opt in ((am, ours), (pm, theirs)):
            torch.manual_seed(step)  # (the same dropout masks: a BERT drops out in training)
            model(**inputs).loss.backward()
            opt.step()
        am.update_and_allocate(step)
        pm.base_model.update_and_allocate(step)
        ours.zero_grad()
        theirs.zero_grad()
        patterns.append((am.peft_config["default"].rank_pattern, peft_pattern(pm)))
    return patterns


def assert_same_adapter(pair) -> None:
    theirs = dict(pair.pm.named_parameters())
    for name, p in pair.am.adapter_parameters():
        torch.testing.assert_close(p, theirs[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.fixture(scope="module")
def allocated():
    """peftc and PEFT trained through a whole AdaLoRA schedule (shared: training captures take seconds)."""
    pair = pair_of("llama", task_type="CAUSAL_LM")
    return pair, train_both(pair, steps=6)


def test_rank_allocation_matches_peft(allocated):
    """Warm-up, the cubic budget (masks every deltaT step), the final allocation, and the masked singular values
    kept at zero afterwards: the same patterns, masks and weights as PEFT at every step."""
    pair, patterns = allocated
    for step, (ours, theirs) in enumerate(patterns):
        assert ours == theirs, step
    assert patterns[0][0] is None  # warm-up (step <= tinit)
    final = patterns[-1][0]
    assert sum(sum(mask) for mask in final.values()) == SCHEDULE["target_r"] * len(final)  # the final budget
    assert any(not all(mask) for mask in final.values())
    assert_same_adapter(pair)
    for ma in pair.am.adapter_set.of("default"):  # the dropped triplets' singular values are zero
        mask = torch.tensor(final[f"{ma.module_path}.lora_E"])
        assert ma.tensors[("lora_E", None)][1][~mask].eq(0).all()


def test_checkpoints_keep_the_allocated_ranks_both_ways(allocated, tmp_path: Path):
    """After allocation, PEFT saves only the kept triplets and the rank_pattern; peftc saves the same files,
    each loads in the other at those ranks, and the outputs are the same."""
    pair, _ = allocated
    pair.am.eval()
    pair.pm.eval()
    pair.am.save_adapter(tmp_path / "peftc")
    pair.pm.save_pretrained(tmp_path / "peft")
    ours, theirs = load_file(tmp_path / "peftc" / "adapter_model.safetensors"), \
        load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=1e-4)
    config = json.loads((tmp_path / "peftc" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["rank_pattern"]
    ids = pair.case.inputs["input_ids"]
    with torch.no_grad():
        want = pair.am(input_ids=ids).logits
        torch.testing.assert_close(pair.pm(input_ids=ids).logits, want, atol=1e-5, rtol=1e-4)
        in_peft = peft.PeftModel.from_pretrained(zoo.llama().model, tmp_path / "peftc").eval()
        torch.testing.assert_close(in_peft(input_ids=ids).logits, want, atol=1e-5, rtol=1e-4)
        in_peftc = peftc.load(zoo.llama().model, tmp_path / "peft")
        torch.testing.assert_close(in_peftc(input_ids=ids).logits, want, atol=1e-5, rtol=1e-4)
    # loaded at the kept ranks, with init_r's scale, as PEFT's resized modules
    theirs_live = dict(in_peft.named_parameters())
    for name, t in in_peftc.state_dict().items():
        if ".lora_" in name or ".ranknum." in name:
            assert t.shape == theirs_live[name].shape and torch.allclose(t, theirs_live[name], atol=1e-6), name


def test_trainer_callback_allocates_after_each_optimizer_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from transformers import Trainer, TrainingArguments

    case = zoo.llama()
    am = peftc.apply(case.model, {"peft_type": "ADALORA", **fields("llama", task_type="CAUSAL_LM")})
    steps = []
    allocate = type(am).update_and_allocate
    monkeypatch.setattr(type(am), "update_and_allocate", lambda self, step: (steps.append(step), allocate(self, step)))
    ids = case.inputs["input_ids"]
    data = [{"input_ids": row, "labels": row} for row in ids.repeat(2, 1)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=6, report_to=[],
                             save_strategy="no", learning_rate=0.05, use_cpu=True)
    Trainer(model=am, args=args, train_dataset=data, callbacks=[AdaLoraCallback()]).train()
    assert steps == list(range(6))
    pattern = am.peft_config["default"].rank_pattern
    assert sum(sum(m) for m in pattern.values()) == SCHEDULE["target_r"] * len(pattern)


@pytest.mark.parametrize(("extra", "field"), [
    ({"total_step": None}, "total_step"),
    ({"tinit": 5}, "tinit"),
    ({"use_dora": True}, "use_dora"),
    ({"alpha_pattern": {"q_proj": 2}}, "alpha_pattern"),
    ({"use_rslora": True}, "use_rslora"),
    ({"lora_bias": True}, "lora_bias"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"orth_reg_weight": -1.0}, "orth_reg_weight"),
    ({"rank_pattern": {"q_proj.lora_E": [1, 0]}}, "rank_pattern"),
])
def test_refused_configs_name_the_field(extra: dict, field: str):
    with pytest.raises(ConfigError, match=field):
        peftc.load_config({"peft_type": "ADALORA", **fields("llama", **extra)})


def test_update_and_allocate_without_a_trainable_adapter_says_so():
    case = zoo.llama()
    am = peftc.apply(case.model, {"peft_type": "LORA", "target_modules": ["q_proj"]})
    with pytest.raises(ConfigError, match="one trainable AdaLoRA adapter"):
        am.update_and_allocate(0)



def test_hotswap_of_a_smaller_allocated_adapter_is_refused(allocated, tmp_path: Path):
    """Its saved triplets are a selection of the live ones: padding them at the end would misplace them."""
    pair, _ = allocated
    pair.am.save_adapter(tmp_path)
    pair.am.add_adapter("fresh", {"peft_type": "ADALORA", **fields("llama", inference_mode=True)})
    try:
        with pytest.raises(ConfigError, match="rank_pattern"):
            pair.am.hotswap_adapter(str(tmp_path), "fresh")
    finally:
        pair.am.delete_adapter("fresh")


# -- LoRA's model-level fields, which PEFT's AdaLoraModel (a LoraModel) applies as LoRA does ---------------------

def seq_cls_pair(**extra: Any):
    """AdaLoRA on a BERT classifier under task_type SEQ_CLS: PEFT's model for the task trains the head as a copy."""
    f = {**SCHEDULE, "target_modules": ["query", "value"], "init_lora_weights": False, "task_type": "SEQ_CLS", **extra}
    return make_pair("bert_seq_cls", {"peft_type": "ADALORA", **f}, peft.AdaLoraConfig(**f))


def test_modules_to_save_match_peft(tmp_path: Path):
    """The SEQ_CLS head and a module named in modules_to_save (the pooler, holding a submodule) train as copies
    beside the triplets: outputs, gradients, checkpoints both ways, fold against merge_and_unload."""
    pair = seq_cls_pair(modules_to_save=["pooler"])
    assert pair.am.peft_config["default"].modules_to_save == ["pooler", "classifier", "score"]  # as PEFT writes it
    assert {"base_model.model.classifier.modules_to_save.default.weight",
            "base_model.model.bert.pooler.modules_to_save.default.dense.weight"} <= set(pair.am.state_dict())
    check_eval(pair)
    check_checkpoints(pair, tmp_path)
    saved = load_file(tmp_path / "peftc" / "adapter_model.safetensors")
    assert {"base_model.model.classifier.weight", "base_model.model.bert.pooler.dense.weight"} <= set(saved)
    check_train(pair)
    merged = check_fold(pair)
    assert "classifier" in merged and any(path.startswith("bert.pooler") for path in merged)


def test_rank_allocation_beside_a_trained_head_matches_peft():
    """With class labels the loss carries the orthogonal term; the head's copy trains beside the triplets and the
    allocator ranks the triplets only, as PEFT's (it reads `lora_` parameters): the same patterns and weights."""
    pair = seq_cls_pair()
    head = pair.am.state_dict()["base_model.model.classifier.modules_to_save.default.weight"].clone()
    inputs = {**pair.case.inputs, "labels": torch.tensor([0, 1, 1])}
    pair.am.train()
    pair.pm.train()
    torch.manual_seed(0)
    loss = pair.am(**inputs).loss
    torch.manual_seed(0)
    torch.testing.assert_close(loss, pair.pm(**inputs).loss)
    patterns = train_both(pair, steps=5, labels=inputs["labels"])
    for step, (ours, theirs) in enumerate(patterns):
        assert ours == theirs, step
    final = patterns[-1][0]
    assert sorted(final) == sorted(f"bert.encoder.layer.{i}.attention.self.{m}.lora_E" for i in (0, 1)
                                   for m in ("query", "value"))
    assert_same_adapter(pair)  # the head's copy too
    assert not torch.allclose(pair.am.state_dict()["base_model.model.classifier.modules_to_save.default.weight"], head)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_match_peft(bias: str, tmp_path: Path):
    """PEFT's AdaLoraModel trains and saves base biases as LoraModel does ("lora_only": the adapted layers')."""
    pair = pair_of("gpt2", bias=bias)
    with torch.no_grad():  # biases away from the base model's, the same in both
        theirs = dict(pair.pm.named_parameters())
        for name, p in pair.am.adapter_parameters():
            if name.endswith(".bias"):
                p.add_(0.3)
                theirs[name].add_(0.3)
    trained = {n for n, _ in pair.am.adapter_parameters() if ".lora_" not in n}
    assert trained == {n for n, p in theirs.items() if p.requires_grad and ".lora_" not in n}
    assert trained and all(n.endswith(".bias") for n in trained)
    assert (bias == "all") == any(".ln_" in n for n in trained)  # "lora_only": c_attn's and c_fc's only
    check_eval(pair)
    check_checkpoints(pair, tmp_path)
    assert trained <= set(saved_shapes(tmp_path / "peftc"))
    check_fold(pair)
    check_train(pair)


def test_layer_replication_matches_peft(tmp_path: Path):
    """Replicated decoder layers share base weights and get triplets of their own, which the orthogonal term and
    the allocator count as PEFT's do; merging is refused, as for LoRA (PEFT's check lets it through, wrongly)."""
    pair = pair_of("llama", task_type="CAUSAL_LM", layer_replication=[[0, 2], [1, 2]])
    assert "base_model.model.model.layers.2.self_attn.q_proj.lora_E.default" in pair.am.state_dict()
    check_eval(pair)
    check_checkpoints(pair, tmp_path)
    check_train(pair)
    for step, (ours, theirs) in enumerate(train_both(pair, steps=5)):
        assert ours == theirs, step
    assert len(ours) == 3 * len(TARGETS["llama"])
    assert_same_adapter(pair)
    with pytest.raises(ConfigError, match="replicated"):
        pair.am.fold()
