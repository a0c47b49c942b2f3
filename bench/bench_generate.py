"""generate() tokens/s on the ~42M Llama shape of bench_lora.py, in one run: the base model's HF generate,
PEFT's unmerged generate, peftc eager (the KV-cache graph), peftc compiled, peftc folded; and a batch
whose samples use different adapters vs one adapter, for peftc and for PEFT's `adapter_names=`; and the
exported ONNX decoders (bench_generate_ort.py): merged and switch through onnxruntime, and onnxruntime-genai.

    python bench/bench_generate.py                          # prompts 16 and 512, batch 1 and 8, 64 new tokens
    python bench/bench_generate.py --prompts 16 --batches 8 --rounds 2 --no-compile --no-ort
    python bench/bench_generate.py --compile-options '{"options": {"cpp_wrapper": true}}'
    python bench/bench_generate.py --only "ORT merged,ORT switch" --rounds 15 --no-compile   # one goal's ratio
    python bench/bench_generate.py --only "ORT merged,ORT switch" --settle 1 --no-compile   # caches warm
    python bench/bench_generate.py --device cuda --ort-fusions cuda   # torch on the GPU, ORT's CUDA provider
    python bench/bench_generate.py --only "ORT merged,ORT switch" --ort-fusions none   # standard ONNX decoders
    python bench/bench_generate.py --hidden 1024 --only "base HF,ORT merged,ORT switch" --no-compile   # 134M model

All-linear LoRA r=16 (random non-zero B), greedy, `min_new_tokens = max_new_tokens` so every call
generates the same number of tokens. Candidates run interleaved in rounds with a rotating order after a
warm-up call (which also captures and compiles), medians; tokens/s counts generated tokens (batch x new).
Ratios are times relative to the base model's generate (lower is better), each the median of the ratios of
calls in the same round (`paired_ratios`). Needs `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from bench_lora import build_model, interleaved_samples, noise_of, paired_ratios, same_random_adapters, timing_parser

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPEC = {"r": 16, "lora_alpha": 32, "target_modules": TARGETS, "init_lora_weights": False}


def main() -> None:
    parser = timing_parser(__doc__, batch=8, rounds=3, warmup=1)
    parser.add_argument("--prompts", default="16,512")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8, help="adapters of the mixed batch")
    parser.add_argument("--hidden", type=int, default=512, help="the model's width (bench_lora.build_model)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--compile-options", default="{}", metavar="JSON",
                        help='compile_model keyword arguments, e.g. \'{"options": {"cpp_wrapper": true}}\'')
    parser.add_argument("--no-ort", action="store_true", help="leave out the ONNX Runtime decoders")
    parser.add_argument("--ort-fusions", default="auto", metavar="PROVIDER",
                        help="the ONNX decoders fused into this provider's ONNX Runtime operators "
                        "(export_onnx_decoder's ort_fusions: auto, cpu, cuda; none: standard ONNX operators)")
    parser.add_argument("--device", default="cpu",
                        help="cuda: the torch rows on the GPU, the ORT rows through onnxruntime-gpu's CUDA provider")
    parser.add_argument("--settle", type=int, default=0,
                        help="untimed calls of a candidate right before each timed one: its caches warm, as in "
                             "steady serving (0: each timed call follows another candidate's)")
    parser.add_argument("--only", default=None, metavar="LABELS",
                        help='time these candidates alone (comma-separated labels, e.g. "base HF,peftc eager"): '
                             "more rounds in the same time for the ratios of one goal")
    args = parser.parse_args()
    only = None if args.only is None else set(args.only.split(","))
    torch.set_num_threads(args.threads)
    base = build_model(tie=True, hidden=args.hidden)
    n = args.new_tokens
    print(f"model: {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params; {n} new tokens; "
          f"{args.threads} threads; {args.rounds} rounds, medians; LoRA r=16 all-linear", flush=True)
    am, pm = same_random_adapters(base, SPEC, args.adapters)
    with_ort = not args.no_ort and (only is None or any(c.startswith(("ORT", "genai")) for c in only))
    if with_ort:  # exported from the CPU model, once, before the torch rows move
        from bench_generate_ort import exported

        for mode in ("merged", "switch"):
            exported(am, mode, args.ort_fusions)
    for model in (am, pm, base):
        model.to(args.device)
    done = torch.cuda.synchronize if args.device.startswith("cuda") else lambda: None  # a call's GPU work in its time
    folded = am.fold(["a0"])
    compiled = None
    if not args.no_compile:
        from peftc.backends.compile import compile_model

        compiled = compile_model(am, **json.loads(args.compile_options))
    options = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": 0}
    rows = []
    for prompt in (int(x) for x in args.prompts.split(",")):
        for batch in (int(x) for x in args.batches.split(",")):
            ids = torch.randint(1, base.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(1))
            names = [f"a{i % args.adapters}" for i in range(batch)]
            on_device = ids.to(args.device)

            def gen(model: object, ids: torch.Tensor = on_device, **extra: object) -> Callable[[], object]:
                def generate() -> object:
                    out = model.generate(input_ids=ids, **options, **extra)
                    done()
                    return out

                return generate

            candidates = {
                "base HF": gen(base), "PEFT": gen(pm), "peftc eager": gen(am), "peftc folded": gen(folded),
                "PEFT mixed": gen(pm, adapter_names=names), "peftc mixed": gen(am, adapter_names=names),
            }
            if compiled is not None:
                candidates["peftc compiled"] = gen(compiled)
            if with_ort:
                from bench_generate_ort import ort_candidates

                candidates.update(ort_candidates(am, ids, n, names, threads=args.threads, device=args.device,
                                                 ort_fusions=args.ort_fusions))
            start = time.time()
            single, mixed = candidates["peftc eager"](), candidates["peftc mixed"]()
            same = torch.equal(single, candidates["PEFT"]())
            same_mixed = torch.equal(mixed, candidates["PEFT mixed"]())
            checks = f"greedy ids equal PEFT's: {same}, mixed: {same_mixed}"
            if with_ort:  # the decoders' tokens vs the torch graph's (unmerged, so the same arithmetic)
                ort_single, ort_mixed = (torch.equal(torch.as_tensor(candidates[label]()), ours.cpu())
                                         for label, ours in (("ORT switch", single), ("ORT switch mixed", mixed)))
                checks += f"; ORT switch's equal peftc's: {ort_single}, mixed: {ort_mixed}"
                if "genai adapters" in candidates:  # its first sequence, on the first adapter as peftc's single
                    same_genai = np.array_equal(candidates["genai adapters"](), single[0].cpu().numpy())
                    checks += f"; genai adapters' equal peftc's: {same_genai}"
            if only is not None:
                candidates = {label: call for label, call in candidates.items() if label in only}
            samples = interleaved_samples(candidates, args.rounds, args.iters, args.warmup, args.settle)
            t = {name: statistics.median(s) for name, s in samples.items()}
            noise = noise_of(samples)

            tokens = batch * n
            print(f"prompt {prompt} batch {batch}: {time.time() - start:.0f} s; {checks}; "
                  f"IQR/median {100 * noise:.0f}%", flush=True)
            for name, seconds in t.items():
                to_base = ratio(samples, name, "base HF")
                print(f"  {name:18s} {seconds:8.3f} s  {tokens / seconds:8.1f} tok/s  /base {to_base:.3f}", flush=True)
            row = [prompt, batch] + [tokens / t[c] if c in t else float("nan")
                                     for c in ("base HF", "PEFT", "peftc eager", "peftc compiled", "peftc folded")]
            row += [ratio(samples, "peftc eager", "base HF"), ratio(samples, "PEFT", "base HF"),
                    ratio(samples, "peftc mixed", "peftc eager"), ratio(samples, "PEFT mixed", "PEFT")]
            ort = ("ORT merged", "ORT switch", "genai merged")
            row += [tokens / t[c] if c in t else float("nan") for c in ort]
            row += [ratio(samples, "ORT switch", "ORT merged"), 100 * noise]
            rows.append(row)
    print()
    head = ["prompt", "batch", "base tok/s", "PEFT tok/s", "peftc tok/s", "compiled tok/s", "folded tok/s",
            "peftc/base", "PEFT/base", f"peftc {args.adapters}-mixed/single", f"PEFT {args.adapters}-mixed/single",
            "ORT merged tok/s", "ORT switch tok/s", "genai merged tok/s", "ORT switch/merged", "IQR%"]
    print("  ".join(head))
    for row in rows:
        print("  ".join(f"{v:>{len(h)}.3f}" if isinstance(v, float) and h.endswith(("/base", "single", "merged"))
                        else f"{v:>{len(h)}.1f}" if isinstance(v, float) else f"{v:>{len(h)}d}"
                        for v, h in zip(row, head)))


def ratio(samples: dict[str, list[float]], name: str, reference: str) -> float:
    """`name`'s time over `reference`'s, call by call within a round, then the median (nan if either is absent)."""
    return paired_ratios(samples, reference)[name] if name in samples and reference in samples else float("nan")


if __name__ == "__main__":
    main()
