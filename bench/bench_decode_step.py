"""One warm decode step of the exported ONNX decoders at a fixed past, in one run: the merged decoder, the
switch decoder (its adapter's rows gathered once and bound, as `OnnxAdapterSession.generate` runs it), and the
switch decoder's step with those rows baked in as constant 2-d initializers ("LoRA constants": a decoder of
that one adapter, unmerged, whose LoRA weights ONNX Runtime may prepack). The last is what any decoder that
keeps LoRA unmerged pays at least, so "switch / LoRA constants" is the cost of switching itself and "LoRA
constants / merged" the cost of the LoRA kernels.

    python bench/bench_decode_step.py                    # batches 1 and 8, pasts 16 and 512
    python bench/bench_decode_step.py --batches 1 --pasts 64 --rounds 12

Same model and adapters as bench_generate.py (all-linear LoRA r=16, 8 adapters, the decoders fused for
ONNX Runtime's CPU provider). Each round runs every candidate `--iters` times after `--settle` untimed
steps; ratios are medians of same-round ratios (`paired_ratios`). Needs `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from bench_generate import SPEC
from bench_generate_ort import exported
from bench_lora import build_model, interleaved_samples, noise_of, paired_ratios, same_random_adapters, timing_parser
from onnx import numpy_helper
from peftc.backends.onnx_decoder import DECODER_FILE
from peftc.backends.onnx_prologue import FixedInputSplit, split_fixed_inputs


def step_call(model: onnx.ModelProto | str, feed: dict[str, np.ndarray],
              threads: int) -> tuple[Callable[[], None], Callable[[], np.ndarray]]:
    """One decode step of `model` on `feed`, bound once (inputs and outputs stay where they are between calls),
    and a reader of its last logits (kept out of the timed call: a copy of [batch, 1, vocab])."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    binding = session.io_binding()
    for name, value in feed.items():
        if name in names:
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)))
    for output in session.get_outputs():
        binding.bind_output(output.name, "cpu")
    return (lambda: session.run_with_iobinding(binding)), (lambda: binding.get_outputs()[0].numpy())


def with_constant_rows(step: onnx.ModelProto, rows: dict[str, np.ndarray]) -> onnx.ModelProto:
    """`step` with the row inputs `rows` (one adapter's, [in, r] and [r, out]) as initializers."""
    constant = onnx.ModelProto()
    constant.CopyFrom(step)
    kept = [i for i in constant.graph.input if i.name not in rows]
    del constant.graph.input[:]
    constant.graph.input.extend(kept)
    constant.graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in rows.items())
    return constant


def candidates(merged: str, split: FixedInputSplit, prologue: Any, pasts: dict[str, tuple[int, int]], batch: int,
               past: int, threads: int) -> dict[str, Callable[[], Any]]:
    """Label -> one warm decode step at `past` cached positions for `batch` rows (all on adapter 0); `split` the
    switch decoder cut at its adapter index, `prologue` its session, `pasts` the cache inputs' [kv heads, head dim]."""
    rng = np.random.default_rng(0)
    feed = {"input_ids": np.full((batch, 1), 5, np.int64), "attention_mask": np.ones((batch, past + 1), np.int64),
            "position_ids": np.full((batch, 1), past, np.int64)}
    feed.update({name: rng.standard_normal((batch, heads, past, head_dim), np.float32)
                 for name, (heads, head_dim) in pasts.items()})
    index = np.zeros(1 if split.one_row_broadcasts else batch, np.int64)  # as the session gathers one adapter's rows
    rows = dict(zip(split.carried, prologue.run(split.carried, {"adapter_index": index})))
    steps = {"ORT merged": step_call(merged, feed, threads),
             "ORT switch": step_call(split.step, {**feed, **rows}, threads),
             "LoRA constants": step_call(with_constant_rows(split.step, {k: v[0] for k, v in rows.items()}),
                                         feed, threads)}
    calls = {label: run for label, (run, _) in steps.items()}
    for run in calls.values():
        run()
    switch_logits = steps["ORT switch"][1]()
    for label, (_, logits) in steps.items():  # merged differs by the rounding of its folded weights only
        if not np.allclose(logits(), switch_logits, atol=1e-3):
            raise RuntimeError(f"{label}'s step does not compute the switch step's logits")
    return calls


def main() -> None:
    parser = timing_parser(__doc__, batch=1, rounds=8, warmup=20)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--pasts", default="16,512")
    parser.add_argument("--hidden", type=int, default=512, help="the model's width (bench_lora.build_model)")
    parser.add_argument("--settle", type=int, default=10, help="untimed steps before each candidate's timed ones")
    parser.set_defaults(iters=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    am, _ = same_random_adapters(build_model(tie=True, hidden=args.hidden), SPEC, 8)
    merged = os.path.join(exported(am, "merged"), DECODER_FILE)
    switch = os.path.join(exported(am, "switch"), DECODER_FILE)
    pasts = {}  # each cache input's [kv heads, head dim] ([batch, kv heads, past, head dim] declared)
    for declared in onnx.load(merged, load_external_data=False).graph.input:
        if declared.name.startswith("past_key_values"):
            dims = declared.type.tensor_type.shape.dim
            pasts[declared.name] = (dims[1].dim_value, dims[3].dim_value)
    split = split_fixed_inputs(onnx.load(switch), ["adapter_index"])  # read and cut once for every row
    prologue = ort.InferenceSession(split.prologue.SerializeToString(), providers=["CPUExecutionProvider"])
    print("| batch | past | merged ms | switch / merged | LoRA constants / merged | switch / LoRA constants | noise |")
    print("|---|---|---|---|---|---|---|")
    for batch in map(int, args.batches.split(",")):
        for past in map(int, args.pasts.split(",")):
            samples = interleaved_samples(candidates(merged, split, prologue, pasts, batch, past, args.threads),
                                          args.rounds, args.iters, args.warmup, args.settle)
            to_merged = paired_ratios(samples, "ORT merged")
            to_constants = paired_ratios(samples, "LoRA constants")
            print(f"| {batch} | {past} | {np.median(samples['ORT merged']) * 1e3:.2f} | {to_merged['ORT switch']:.3f} "
                  f"| {to_merged['LoRA constants']:.3f} | {to_constants['ORT switch']:.3f} "
                  f"| {noise_of(samples):.0%} |", flush=True)


if __name__ == "__main__":
    main()
