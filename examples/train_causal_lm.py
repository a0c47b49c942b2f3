"""Train a LoRA adapter for causal language modelling on a tiny Llama, in a plain PyTorch loop.

    python examples/train_causal_lm.py [--steps 300] [--checkpointing] [--loraplus-ratio 8] [--quick]

The base model is a small Llama built from a transformers config (random weights, no download);
the text is examples/data/lighthouse.txt, read byte by byte (vocabulary of 256), the last tenth
held out. Only the adapter trains (LoRA on every linear layer); the script prints the training
loss as it goes and the held-out loss before and after. `--checkpointing` turns on activation
checkpointing (peftc's remat pass: each decoder layer recomputed in backward), and
`--loraplus-ratio` trains the B matrices at that multiple of the learning rate (LoRA+).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftc

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "lighthouse.txt")
LORA = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": [
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens"]}


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config)


def windows(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """`batch` random windows of `seq` bytes."""
    starts = torch.randint(0, len(data) - seq, (batch,), generator=gen)
    return torch.stack([data[s:s + seq] for s in starts])


def held_out_loss(am: peftc.AdaptedModel, data: torch.Tensor, seq: int) -> float:
    """Mean loss over the held-out bytes, in consecutive windows."""
    chunks = data[: len(data) // seq * seq].view(-1, seq)
    am.eval()
    with torch.no_grad():
        return am(input_ids=chunks, labels=chunks).loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="a short run (CI): 20 steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--checkpointing", action="store_true", help="recompute each layer's activations in backward")
    parser.add_argument("--loraplus-ratio", type=float, help="LoRA+: the learning rate of B is lr * this")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    steps = 20 if args.quick else args.steps
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    with open(DATA, "rb") as f:
        data = torch.tensor(list(f.read()), dtype=torch.long)
    cut = len(data) * 9 // 10
    train, test = data[:cut], data[cut:]

    model = tiny_llama()
    am = peftc.apply(model, LORA)
    am.print_trainable_parameters()
    if args.checkpointing:
        am.gradient_checkpointing_enable()
    print(f"held-out loss before: {held_out_loss(am, test, args.seq):.4f}")

    trainable = [p for p in am.parameters() if p.requires_grad]
    if args.loraplus_ratio:
        optimizer = peftc.create_loraplus_optimizer(am, torch.optim.AdamW, lr=args.lr,
                                                    loraplus_lr_ratio=args.loraplus_ratio)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    gen = torch.Generator().manual_seed(args.seed)
    am.train()
    for step in range(1, steps + 1):
        ids = windows(train, args.batch_size, args.seq, gen)
        loss = am(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step == 1 or step % max(1, steps // 10) == 0:
            print(f"step {step}/{steps}: train loss {loss.item():.4f}")

    print(f"held-out loss after: {held_out_loss(am, test, args.seq):.4f}")
    with tempfile.TemporaryDirectory() as out:
        am.save_adapter(out)  # PEFT's format: loads with PeftModel.from_pretrained on the same base
        print(f"adapter files: {sorted(os.listdir(out))}")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
