"""Backends on bench_lora's ~42M-parameter Llama shape, in one run: ONNX Runtime and torch.compile.

    python bench/bench_backends.py
    python bench/bench_backends.py --rounds 5 --seq 64

Ratios (medians of interleaved rounds, forward in eval mode, no_grad):
  - ORT merged / torch eager base: the adapters folded into the weights, served by onnxruntime
    (CPUExecutionProvider), against the plain transformers model in PyTorch;
  - ORT switch / ORT merged: 4 adapters stacked in one file, a mixed batch (one adapter per
    sample, chosen by the `adapter_index` input), against the merged file;
  - compiled adapted / compiled base: `peftc.backends.compile.compile_model` (inductor; it runs
    the mixed-adapter graph, so switching never recompiles) against `torch.compile(base)`.
Export and compile times are printed too (one each). Needs `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import os
import tempfile

import onnxruntime as ort
import torch
from bench_lora import build_model, interleaved, timed, timing_parser
from peftc.backends.compile import compile_model
from peftc.backends.onnx import OnnxAdapterSession

import peftc

N_ADAPTERS = 4


def adapted(base: torch.nn.Module, r: int) -> peftc.AdaptedModel:
    """LoRA r on q_proj/v_proj, N_ADAPTERS adapters with random (non-zero) B."""
    spec = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"]}
    am = peftc.apply(base, spec, adapter_name="a0")
    for i in range(1, N_ADAPTERS):
        am.add_adapter(f"a{i}", spec)
    am.set_adapter(am.adapter_order)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in am.adapter_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    am.set_adapter("a0")
    return am


def main() -> None:
    parser = timing_parser(__doc__, batch=N_ADAPTERS, rounds=10)
    parser.add_argument("--r", type=int, default=16)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    base = build_model(tie=True)
    n = sum(p.numel() for p in base.parameters())
    print(f"model: LlamaForCausalLM hidden 512, 8 layers, intermediate 1376, vocab 32000: {n / 1e6:.1f}M params; "
          f"LoRA r={args.r} on q_proj,v_proj, {N_ADAPTERS} adapters", flush=True)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} threads; batch {args.batch} x "
          f"seq {args.seq}; {args.rounds} rounds x {args.iters} calls after {args.warmup} warmup, medians", flush=True)
    am = adapted(base, args.r)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    per_sample = [f"a{i % N_ADAPTERS}" for i in range(args.batch)]
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1

    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        seconds = {}
        sessions = {}
        for mode in ("merged", "switch"):
            path = os.path.join(d, f"{mode}.onnx")
            seconds[f"export {mode}"] = timed(lambda path=path, mode=mode: peftc.export_onnx(am, path, mode=mode))
            sessions[mode] = OnnxAdapterSession(path, providers=["CPUExecutionProvider"], session_options=options)
            print(f"exported {mode} in {seconds[f'export {mode}']:.1f} s", flush=True)
        feed = {"input_ids": ids.numpy()}
        compiled_base = torch.compile(base)
        compiled_am = compile_model(am)
        for name, fn in (("compile base", lambda: compiled_base(input_ids=ids, use_cache=False)),
                         ("compile adapted", lambda: compiled_am(input_ids=ids))):
            seconds[name] = timed(fn)  # the first call compiles
            print(f"{name}: first call {seconds[name]:.1f} s", flush=True)

        eager = am(input_ids=ids).logits
        mixed = am(input_ids=ids, adapter_names=per_sample).logits
        diffs = {
            "ORT merged": (torch.from_numpy(sessions["merged"].run(feed)["logits"]) - eager).abs().max().item(),
            "ORT switch": (torch.from_numpy(sessions["switch"].run(feed, adapter_names=per_sample)["logits"])
                           - mixed).abs().max().item(),
            "compiled": (compiled_am(input_ids=ids).logits - eager).abs().max().item(),
        }
        print("max |logits - peftc eager|: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()), flush=True)

        t, noise = interleaved({
            "eager base": lambda: base(input_ids=ids, use_cache=False),
            "ORT merged": lambda: sessions["merged"].run(feed),
            "ORT switch": lambda: sessions["switch"].run(feed, adapter_names=per_sample),
            "compiled base": lambda: compiled_base(input_ids=ids, use_cache=False),
            "compiled adapted": lambda: compiled_am(input_ids=ids),
        }, args.rounds, args.iters, args.warmup)

    print()
    print("  ".join(f"{k} {1e3 * v:.1f} ms" for k, v in t.items()) + f"  (largest IQR/median {100 * noise:.0f}%)")
    rows = [
        ("ORT merged / torch eager base", t["ORT merged"] / t["eager base"]),
        (f"ORT switch ({N_ADAPTERS} adapters, mixed batch) / ORT merged", t["ORT switch"] / t["ORT merged"]),
        ("compiled adapted / compiled base", t["compiled adapted"] / t["compiled base"]),
    ]
    width = max(len(label) for label, _ in rows)
    print(f"{'ratio':<{width}}  value")
    print(f"{'-' * width}  -----")
    for label, value in rows:
        print(f"{label:<{width}}  {value:.3f}")


if __name__ == "__main__":
    main()
