"""Training an adapted model: a plain PyTorch loop (checked step by step against PEFT) and
`transformers.Trainer`. Only the adapters may move; the base model stays bit-for-bit."""

from __future__ import annotations

import math
from pathlib import Path

import peft
import pytest
import torch
import transformers

import peftc
from tests import zoo

CONFIG = {
    "r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
    "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
}


def _ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(1, zoo.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _split(am: peftc.AdaptedModel) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base, adapter) parameters, cloned."""
    adapters = {n for n, _ in am.adapter_parameters()}
    params = {n: p.detach().clone() for n, p in am.named_parameters()}
    return ({n: p for n, p in params.items() if n not in adapters}, {n: p for n, p in params.items() if n in adapters})


def _assert_only_adapters_moved(am: peftc.AdaptedModel, base: dict, adapters: dict) -> None:
    base_after, adapters_after = _split(am)
    assert base_after.keys() == base.keys() and adapters_after.keys() == adapters.keys()
    for name, value in base.items():
        assert torch.equal(base_after[name], value), f"base parameter {name} changed"
    moved = [n for n, v in adapters.items() if not torch.equal(adapters_after[n], v)]
    # with PEFT's init B = 0 (and embedding A = 0) every adapter tensor gets a gradient after step 1
    assert sorted(moved) == sorted(adapters)


def test_plain_loop_trains_only_adapters_and_matches_peft():
    case, ref = zoo.llama(), zoo.llama()
    case.model.train()  # captured in train mode at apply(): the only graph this test needs
    user_before = {k: v.clone() for k, v in case.model.state_dict().items()}
    ids = _ids(4, 12, seed=3)
    am = peftc.apply(case.model, {"peft_type": "LORA", **CONFIG}, example_inputs={"input_ids": ids, "labels": ids})
    pm = peft.get_peft_model(ref.model, peft.LoraConfig(**CONFIG))
    pm.load_state_dict(am.state_dict(), strict=True)
    am.train()
    pm.train()
    base, adapters = _split(am)

    def run(model: torch.nn.Module) -> list[float]:
        torch.manual_seed(0)  # the same lora_dropout masks for both
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(5):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    losses = run(am)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.05, losses
    assert [g.training for g in am.graphs].count(True) == 1  # one capture, reused for every step
    _assert_only_adapters_moved(am, base, adapters)
    assert all(torch.equal(v, user_before[k]) for k, v in case.model.state_dict().items())

    # PEFT, trained the same way from the same weights, follows the same trajectory
    peft_losses = run(pm)
    assert losses == pytest.approx(peft_losses, abs=1e-4)
    theirs = dict(pm.named_parameters())
    for name, p in am.adapter_parameters():
        torch.testing.assert_close(p, theirs[name], atol=1e-4, rtol=1e-4)


class IdsDataset(torch.utils.data.Dataset):
    """A tiny causal-LM dataset in memory: input_ids and labels."""

    def __init__(self, n: int = 8, seq: int = 10):
        self.ids = _ids(n, seq, seed=5)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(am: peftc.AdaptedModel, out: Path) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="steps",
        save_steps=2,
        use_cpu=True,
        disable_tqdm=True,
        # no label_names: Trainer finds `labels` in the forward signature of the adapted model's class
        # (AdaptedLlamaForCausalLM's is LlamaForCausalLM's), so evaluate() reports eval_loss as with PEFT
        # default remove_unused_columns=True: Trainer keeps the dataset columns that the adapted
        # model's forward signature names (the base model's), so input_ids and labels must survive
    )
    return transformers.Trainer(model=am, args=args, train_dataset=IdsDataset(), eval_dataset=IdsDataset())


def test_transformers_trainer(tmp_path: Path):
    case = zoo.llama()
    user_before = {k: v.clone() for k, v in case.model.state_dict().items()}
    am = peftc.apply(case.model, {"peft_type": "LORA", **CONFIG})
    base, adapters = _split(am)
    trainer = _trainer(am, tmp_path / "out")
    eval_before = trainer.evaluate()["eval_loss"]
    result = trainer.train()
    eval_after = trainer.evaluate()["eval_loss"]

    assert result.global_step == 4
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses + [result.training_loss])
    assert eval_after < eval_before - 0.05, (eval_before, eval_after)
    # Trainer adds kwargs of its own (num_items_in_batch): captured once per mode, then reused every step
    assert [g.training for g in am.graphs].count(True) == 1
    _assert_only_adapters_moved(am, base, adapters)
    assert all(torch.equal(v, user_before[k]) for k, v in case.model.state_dict().items())
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    # resuming from step 2 on a fresh adapted model ends where the uninterrupted run ended: Trainer
    # restores the weights (its checkpoint is the adapted model's state dict), optimizer, scheduler, RNG
    resumed = peftc.apply(zoo.llama().model.train(), {"peft_type": "LORA", **CONFIG})  # captures the train graph
    again = _trainer(resumed, tmp_path / "resumed")
    again.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert again.state.global_step == 4
    theirs = dict(resumed.adapter_parameters())
    for name, p in am.adapter_parameters():
        torch.testing.assert_close(theirs[name], p, atol=1e-6, rtol=1e-6)

    # what Trainer trained saves as an adapter PEFT loads with the same outputs
    am.save_adapter(tmp_path / "adapter")
    pm = peft.PeftModel.from_pretrained(zoo.llama().model, tmp_path / "adapter").eval()
    am.eval()
    with torch.no_grad():
        torch.testing.assert_close(am(**case.inputs).logits, pm(**case.inputs).logits, atol=1e-5, rtol=1e-5)


def test_loraplus_param_groups_match_peft():
    """LoRA+: B (and 1-d adapter tensors) at lr * ratio, A at lr, embedding adapters at their own lr,
    the same groups as PEFT's create_loraplus_optimizer builds."""
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    case, ref = zoo.llama(), zoo.llama()
    am = peftc.apply(case.model, {"peft_type": "LORA", **CONFIG})
    pm = peft.get_peft_model(ref.model, peft.LoraConfig(**CONFIG))
    kwargs = {"lr": 1e-3, "loraplus_lr_ratio": 16.0, "loraplus_lr_embedding": 1e-5, "loraplus_weight_decay": 0.01,
              "betas": (0.8, 0.9)}
    ours = peftc.create_loraplus_optimizer(am, torch.optim.AdamW, **kwargs)
    theirs = peft_loraplus(pm, torch.optim.AdamW, **kwargs)

    def groups(opt: torch.optim.Optimizer, model: torch.nn.Module) -> list[tuple[set[str], float, float]]:
        name = {id(p): n for n, p in model.named_parameters()}
        return [({name[id(p)] for p in g["params"]}, g["lr"], g["weight_decay"]) for g in opt.param_groups]

    got = groups(ours, am)
    assert got == groups(theirs, pm)
    assert all(g["betas"] == (0.8, 0.9) for g in ours.param_groups)
    lrs = {n: lr for names, lr, _ in got for n in names}
    assert lrs.keys() == {n for n, _ in am.adapter_parameters()}  # every adapter tensor, nothing else
    for n, lr in lrs.items():
        if "embed_tokens" in n:
            assert lr == 1e-5, n
        else:
            assert lr == pytest.approx(16e-3 if "lora_B" in n else 1e-3), n
