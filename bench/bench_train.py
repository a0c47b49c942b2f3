"""Training with LoRA on a ~42M-parameter Llama-shaped model: peftc vs PEFT, with and without
activation checkpointing, in one run.

    python bench/bench_train.py                  # r=16 on q_proj,v_proj; batch 4 x 128
    python bench/bench_train.py --configs qv,all-linear --rounds 5

Measures (CPU, torch.set_num_threads), for each of peft, peftc, peft+ckpt, peftc+ckpt:
  - train step: forward + cross-entropy + backward + AdamW step on the adapter parameters,
    median of interleaved rounds (as bench_lora.py);
  - peak memory: the most CPU tensor memory allocated during one train step (after warmup, so
    the optimizer state already exists), from the allocator's running total under
    torch.profiler: the activations and gradients the step holds at once, without allocator
    caching noise.
"+ckpt" is PEFT's `model.gradient_checkpointing_enable()` (transformers' checkpointing of each
decoder layer, use_reentrant=False) and peftc's `am.gradient_checkpointing_enable()` (the remat
pass: each layer's region of the graph outlined and run under torch.utils.checkpoint).
peftc runs the adapter it loaded from PEFT's checkpoint (lora_B non-zero). Needs
`pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from collections.abc import Callable

import torch
from bench_lora import CONFIGS, build_model, interleaved, timing_parser, train_step

import peftc
from peftc.profiling import peak_memory

GEMMS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def bench_config(name: str, base: torch.nn.Module, args: argparse.Namespace) -> list[list[str]]:
    from peft import LoraConfig, get_peft_model

    spec = CONFIGS[name]
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**spec))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
    models = {"peft": peft_model, "peft+ckpt": copy.deepcopy(peft_model)}
    with warnings.catch_warnings():  # transformers 5 calls the name deprecated; PEFT users still call it
        warnings.simplefilter("ignore", FutureWarning)
        models["peft+ckpt"].gradient_checkpointing_enable()
    with tempfile.TemporaryDirectory() as d:
        peft_model.save_pretrained(d)
        models["peftc"] = peftc.load(base, d, is_trainable=True)
        models["peftc+ckpt"] = peftc.load(base, d, is_trainable=True)
    models["peftc+ckpt"].gradient_checkpointing_enable()

    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    opts = {}
    for label, m in models.items():
        m.train()
        opts[label] = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

    # the same gradients with and without checkpointing, and peftc's loss equal to PEFT's (lora_dropout 0)
    grads, losses = {}, {}
    for label in ("peft", "peftc", "peftc+ckpt"):
        logits = models[label](input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        losses[label] = loss.item()
        grads[label] = [p.grad.clone() for p in models[label].parameters() if p.requires_grad]
        opts[label].zero_grad(set_to_none=True)
    ckpt_diff = max((a - b).abs().max().item() for a, b in zip(grads["peftc"], grads["peftc+ckpt"]))

    steps = {label: (lambda m=m, o=opts[label]: train_step(m, ids, o)) for label, m in models.items()}
    times, noise = interleaved(steps, args.rounds, args.iters, args.warmup)
    peaks = {label: peak_memory(step) for label, step in steps.items()}
    gemm = gemm_share(steps["peft"])

    print(f"[{name}] loss peftc {losses['peftc']:.6f} / peft {losses['peft']:.6f}; "
          f"max |grad peftc - peftc+ckpt| = {ckpt_diff:.2e}; timing IQR/median {100 * noise:.0f}%", flush=True)
    print(f"[{name}] matrix products take {100 * gemm:.0f}% of PEFT's step (profiled, no checkpointing): the "
          "same products peftc must run (frozen weights forward and input-gradient, adapters), so with the same "
          f"kernels no exact fp32 rewrite gets below ~{gemm:.2f}x PEFT's step here", flush=True)
    rows = []
    for ckpt in ("", "+ckpt"):
        t_peft, t_peftc = times["peft" + ckpt], times["peftc" + ckpt]
        m_peft, m_peftc = peaks["peft" + ckpt], peaks["peftc" + ckpt]
        mode = "checkpointing" if ckpt else "no checkpointing"
        rows.append([name, mode, "train step (ms)", f"{1e3 * t_peft:.1f}", f"{1e3 * t_peftc:.1f}",
                     f"{t_peftc / t_peft:.3f}"])
        rows.append([name, mode, "peak memory (MiB)", f"{m_peft / 2**20:.1f}", f"{m_peftc / 2**20:.1f}",
                     f"{m_peftc / m_peft:.3f}"])
    return rows


def gemm_share(step: Callable[[], object]) -> float:
    """Fraction of one step's CPU time spent in matrix products (self time of aten mm/addmm/bmm/baddbmm)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in GEMMS) / total


def main() -> None:
    parser = timing_parser(__doc__, batch=4, rounds=6)
    parser.add_argument("--configs", default="qv", help="comma list of " + ", ".join(CONFIGS))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    base = build_model(tie=True)
    n = sum(p.numel() for p in base.parameters())
    print(f"model: LlamaForCausalLM hidden 512, 8 layers, intermediate 1376, vocab 32000, tied: {n / 1e6:.1f}M params; "
          f"torch {torch.__version__}, {args.threads} threads; batch {args.batch} x seq {args.seq}; "
          f"{args.rounds} rounds x {args.iters} calls after {args.warmup} warmup, medians", flush=True)
    rows = []
    for name in args.configs.split(","):
        rows += bench_config(name.strip(), base, args)
    header = ["config", "checkpointing", "measure", "peft", "peftc", "peftc/peft"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


if __name__ == "__main__":
    main()
