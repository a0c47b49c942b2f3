"""ONNX Runtime rows for bench_generate.py: decode tokens/s of peftc's exported KV-cache decoders.

    from bench_generate_ort import ort_candidates, ort_rows
    candidates.update(ort_candidates(am, ids, new_tokens, names, threads=4))  # into bench_generate's interleaving
    ort_rows(am, batch=8, prompt_len=16, new_tokens=64)  # or standalone: [(label, tokens/s), ...]

Candidates: "ORT merged" (the first adapter folded into the weights), "ORT switch" (every adapter stacked,
all samples on the first adapter), "ORT switch mixed" (one adapter per sample, `names`), each through
`OnnxAdapterSession.generate` (CPU provider, greedy, fixed new tokens); and "genai merged" / "genai switch
mixed", onnxruntime-genai's own loop on the same folders (`adapter_index` through `set_model_input`), and
"genai adapters", its own adapter switching (the `inputs` folder, the first adapter's `.onnx_adapter` file
through `og.Adapters` and `set_active_adapter`, one adapter per generator), when onnxruntime-genai is
installed. Each decoder is exported once per adapted model (into a temporary folder).
Tokens/s counts generated tokens (batch x new) over the whole call (prompt step included), as
bench_generate.py's torch rows do.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from peftc.backends.onnx import OnnxAdapterSession

import peftc

_FOLDERS: dict[tuple[int, str, str | None], str] = {}  # (id of the adapted model, mode, fusions) -> its folder


def exported(am: Any, mode: str, ort_fusions: str | None = "auto") -> str:
    """The genai folder of `am`'s decoder in `mode` ("merged": its first adapter folded), exported once, fused for
    ONNX Runtime as `export_onnx_decoder`'s `ort_fusions` says."""
    key = (id(am), mode, ort_fusions)
    if key not in _FOLDERS:
        folder = tempfile.mkdtemp(prefix=f"peftc-ort-{mode}-")
        names = am.adapter_order[:1] if mode == "merged" else None
        start = time.perf_counter()
        peftc.export_genai(am, folder, mode=mode, adapter_names=names, ort_fusions=ort_fusions)
        print(f"  exported the {mode} decoder (ort_fusions={ort_fusions}) in {time.perf_counter() - start:.0f} s",
              flush=True)
        _FOLDERS[key] = folder
    return _FOLDERS[key]


def ort_candidates(am: Any, ids: torch.Tensor, new_tokens: int, names: Sequence[str], threads: int = 0,
                   genai: bool = True, device: str = "cpu",
                   ort_fusions: str | None = "auto") -> dict[str, Callable[[], Any]]:
    """Label -> a call generating `new_tokens` greedily for the prompts `ids` (no padding); on "cuda" through
    onnxruntime-gpu's CUDA provider; the decoders fused as `ort_fusions` says."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    first = am.adapter_order[0]
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        ort.preload_dlls()  # the CUDA libraries of the nvidia-* wheels torch uses
        providers.insert(0, "CUDAExecutionProvider")

    def session(mode: str) -> OnnxAdapterSession:
        s = OnnxAdapterSession(os.path.join(exported(am, mode, ort_fusions), "decoder.onnx"), providers, options)
        if s.session.get_providers()[0] != providers[0]:
            raise RuntimeError(f"onnxruntime did not take {providers[0]} (available: {ort.get_available_providers()})")
        return s

    merged, switch = session("merged"), session("switch")
    batch = ids.shape[0]

    def run(s: OnnxAdapterSession, adapters: Sequence[str] | None) -> Callable[[], Any]:
        return lambda: s.generate(ids, max_new_tokens=new_tokens, adapter_names=adapters)

    out = {"ORT merged": run(merged, None), "ORT switch": run(switch, [first] * batch),
           "ORT switch mixed": run(switch, list(names))}
    if genai and importlib.util.find_spec("onnxruntime_genai") is not None:
        index = [switch.exported_adapters.index(n) for n in names]
        out["genai merged"] = _genai(exported(am, "merged", ort_fusions), ids, new_tokens, None, threads)
        out["genai switch mixed"] = _genai(exported(am, "switch", ort_fusions), ids, new_tokens, index, threads)
        out["genai adapters"] = _genai(exported(am, "inputs", ort_fusions), ids, new_tokens, None, threads, first)
    return out


def _genai(folder: str, ids: torch.Tensor, new_tokens: int, index: list[int] | None,
           threads: int = 0, adapter: str | None = None) -> Callable[[], Any]:
    """onnxruntime-genai's own loop on `folder`, its session on `threads` intra-op threads as the ORT rows'
    (0: genai's default, which was one thread on the 2-core machine: a generate took twice as long); with
    `adapter`, that adapter's file loaded into `og.Adapters` and active in every generator."""
    import onnxruntime_genai as og

    config = og.Config(folder)
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    adapters = None
    if adapter is not None:
        adapters = og.Adapters(model)
        adapters.load(os.path.join(folder, f"{adapter}.onnx_adapter"), adapter)
    length = ids.shape[1] + new_tokens
    tokens = ids.numpy().astype(np.int32)

    def call() -> Any:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=length, min_length=length, do_sample=False, batch_size=ids.shape[0])
        generator = og.Generator(model, params)
        if adapter is not None:
            generator.set_active_adapter(adapters, adapter)
        if index is not None:
            generator.set_model_input("adapter_index", np.array(index, dtype=np.int64))
        generator.append_tokens(tokens)
        while not generator.is_done():
            generator.generate_next_token()
        return generator.get_sequence(0)

    return call


def ort_rows(am: Any, batch: int, prompt_len: int, new_tokens: int, rounds: int = 3,
             threads: int = 0) -> list[tuple[str, float]]:
    """(label, tokens/s) of each candidate: one warm-up call, then the median of `rounds` interleaved calls."""
    ids = torch.randint(1, am.parameter_tree.source.config.vocab_size, (batch, prompt_len),
                        generator=torch.Generator().manual_seed(1))
    order = am.adapter_order
    names = [order[i % len(order)] for i in range(batch)]
    candidates = ort_candidates(am, ids, new_tokens, names, threads)
    times: dict[str, list[float]] = {label: [] for label in candidates}
    for call in candidates.values():
        call()
    for _ in range(rounds):
        for label, call in candidates.items():
            start = time.perf_counter()
            call()
            times[label].append(time.perf_counter() - start)
    return [(label, batch * new_tokens / float(np.median(t))) for label, t in times.items()]
