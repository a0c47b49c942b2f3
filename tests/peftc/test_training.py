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


def test_transformers_trainer(tmp_path: Path):
    case = zoo.llama()
    user_before = {k: v.clone() for k, v in case.model.state_dict().items()}
    am = peftc.apply(case.model, {"peft_type": "LORA", **CONFIG})
    base, adapters = _split(am)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        # default remove_unused_columns=True: Trainer keeps the dataset columns that the adapted
        # model's forward signature names (the base model's), so input_ids and labels must survive
    )
    trainer = transformers.Trainer(model=am, args=args, train_dataset=IdsDataset())
    result = trainer.train()

    assert result.global_step == 3
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses + [result.training_loss])
    assert am.training
    # Trainer adds kwargs of its own (num_items_in_batch): captured once, then reused every step
    assert [g.training for g in am.graphs].count(True) == 1
    _assert_only_adapters_moved(am, base, adapters)
    assert all(torch.equal(v, user_before[k]) for k, v in case.model.state_dict().items())

    # what Trainer trained saves as an adapter PEFT loads with the same outputs
    am.save_adapter(tmp_path / "adapter")
    loaded = zoo.llama()
    pm = peft.PeftModel.from_pretrained(loaded.model, tmp_path / "adapter").eval()
    am.eval()
    with torch.no_grad():
        torch.testing.assert_close(am(**case.inputs).logits, pm(**case.inputs).logits, atol=1e-5, rtol=1e-5)
