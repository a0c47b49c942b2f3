"""Folded and mixed-adapter forwards on the ~42M Llama shape of bench_lora.py, in one run.

    python bench/bench_adapters.py                    # fold, then mixed batches of 4 and 16 adapters
    python bench/bench_adapters.py --rounds 3 --seq 64

- fold: `am.fold()` forward / base forward (the physical limit is 1.00), beside the unfolded forward.
- mixed: a batch (default 16) whose samples use K different LoRA adapters (r=16 on q_proj, v_proj),
  against the same batch through one adapter, for peftc (`adapter_names=`, one graph with a per-sample
  index) and for PEFT (`adapter_names=`, its loop over adapters). Ratios mixed/single per library.
Eval mode, no_grad, medians of interleaved rounds (see bench_lora.py). Needs `pip install -e '.[bench]'`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from bench_lora import build_model, interleaved, same_random_adapters, timing_parser

SPEC = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}


def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return fn()
    return run


def main() -> None:
    parser = timing_parser(__doc__, batch=16, rounds=7, warmup=1)
    parser.add_argument("--adapters", default="4,16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = build_model(tie=True)
    print(f"model: {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params; batch {args.batch} x seq "
          f"{args.seq}; {args.threads} threads; {args.rounds} rounds, medians", flush=True)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    rows = []

    am, _ = same_random_adapters(base, SPEC, 1)
    folded = am.fold()
    with torch.no_grad():
        diff = (folded(input_ids=ids).logits - am(input_ids=ids).logits).abs().max().item()
    t, noise = interleaved({
        "base": no_grad(lambda: base(input_ids=ids)),
        "folded": no_grad(lambda: folded(input_ids=ids)),
        "unfolded": no_grad(lambda: am(input_ids=ids)),
    }, args.rounds, args.iters, args.warmup)
    rows.append(["fold", f"folded/base {t['folded'] / t['base']:.3f}", f"unfolded/base {t['unfolded'] / t['base']:.3f}",
                 f"base {1e3 * t['base']:.0f} ms", f"max|folded-unfolded| {diff:.1e}", f"IQR {100 * noise:.0f}%"])
    print(rows[-1], flush=True)

    for k in (int(x) for x in args.adapters.split(",")):
        am, pm = same_random_adapters(base, SPEC, k)
        names = [f"a{i % k}" for i in range(args.batch)]
        with torch.no_grad():
            diff = (am(input_ids=ids, adapter_names=names).logits
                    - pm(input_ids=ids, adapter_names=names).logits).abs().max().item()
        t, noise = interleaved({
            "peftc single": no_grad(lambda am=am: am(input_ids=ids)),
            "peftc mixed": no_grad(lambda am=am, names=names: am(input_ids=ids, adapter_names=names)),
            "peft single": no_grad(lambda pm=pm: pm(input_ids=ids)),
            "peft mixed": no_grad(lambda pm=pm, names=names: pm(input_ids=ids, adapter_names=names)),
        }, args.rounds, args.iters, args.warmup)
        rows.append([f"mixed {k}", f"peftc mixed/single {t['peftc mixed'] / t['peftc single']:.3f}",
                     f"peft mixed/single {t['peft mixed'] / t['peft single']:.3f}",
                     f"peftc/peft mixed {t['peftc mixed'] / t['peft mixed']:.3f}",
                     f"max|peftc-peft| {diff:.1e}", f"IQR {100 * noise:.0f}%"])
        print(rows[-1], flush=True)
    print()
    for row in rows:
        print("  ".join(row))


if __name__ == "__main__":
    main()
