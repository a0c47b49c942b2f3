"""ONNX decoders with a KV cache: export generation's cache graph, decode it in onnxruntime, serve it
with onnxruntime-genai.

    peftc.export_onnx_decoder(am, "d.onnx", mode="switch")          # merged | switch | inputs
    session = OnnxAdapterSession("d.onnx")
    session.generate(ids, attention_mask=mask, max_new_tokens=32, adapter_names=["fr", "__base__"])
    peftc.export_genai(am, "out/", mode="inputs", tokenizer_from="model/")  # a folder og.Model loads

The exported graph is the adapted model's "kv" program (`peftc.generation`), in the modes and through
the machinery of `export_onnx`, under the names Optimum, Olive and onnxruntime-genai use: inputs
`input_ids`, `attention_mask` [batch, past + new], `position_ids`, `past_key_values.{i}.key/value`
[batch, kv heads, past, head dim]; outputs `logits` and `present.{i}.key/value` (past + new). Batch, new
length and past length (from 0: the prompt's step) are dynamic.

`OnnxAdapterSession.generate` decodes with transformers' logits warpers (temperature, top-k, top-p) and
its position rule (`cumsum(mask) - 1`), so that greedy tokens, and sampled ones under the same torch
seed, equal peftc's torch `generate`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from peftc import generation
from peftc.errors import ConfigError

from . import onnx_fusions
from .onnx import ORT_ADAPTER_SUFFIX, OnnxAdapterSession, export_program, save_onnx_adapter
from .onnx_prologue import ort_values

TASK = "text-generation"
DECODER_FILE = "decoder.onnx"
GENAI_CONFIG = "genai_config.json"
PAST = ("past_key_values.%d.key", "past_key_values.%d.value")
PRESENT = ("present.%d.key", "present.%d.value")
LOGITS = ("last", "all")  # which positions' logits the decoder computes
# a model folder's tokenizer files, copied beside the decoder for onnxruntime-genai's tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt")


def export_onnx_decoder(model: Any, path: str | os.PathLike, mode: str = "merged",
                        adapter_names: Sequence[str] | None = None, logits: str = "last",
                        ort_fusions: str | None = "auto", **export_options: Any) -> str:
    """Export the adapted causal LM `model` as an ONNX decoder with a KV cache to `path` (returned), in
    `mode` as `export_onnx` does ("merged", "switch" with `adapter_index`, "inputs" with the active
    adapter's tensors as inputs, defaulting to that adapter). `logits="last"` computes the logits of each
    row's last position only (`logits` [batch, 1, vocab]), as transformers' generate asks for them
    (`logits_to_keep=1`): a prompt's step then skips the LM head on every other position, which at a
    512-token prompt costs more than the rest of the step. `logits="all"` keeps [batch, new, vocab].

    `ort_fusions` fuses the graph into ONNX Runtime's own operators for a provider ("cpu", "cuda", "webgpu",
    "dml"; `backends.onnx_fusions`): RMS norms with their residual adds, rotary embeddings, q/k/v and gate/up
    projections packed into one MatMul each, attention reading its keys transposed in place (a decode step no
    longer copies the key cache twice). "auto" (default): "cpu" where the installed transformers has the
    fusions (>= 5.23). None or "none": standard ONNX operators only, for runtimes other than ONNX Runtime.
    Adapters are not fused: each LoRA site keeps its MatMuls, and "inputs" mode its adapter inputs."""
    if logits not in LOGITS:
        raise ConfigError(f"logits={logits!r}: choose one of {', '.join(LOGITS)}")
    layout = generation.cache_layout(model)
    call = generation.example_call(model)
    if logits == "last":
        call["logits_to_keep"] = 1
    metadata = {"task": TASK, "logits": logits, "cache": [[s.heads, s.head_dim] for s in layout],
                "cache_dtype": str(layout[0].dtype).removeprefix("torch.")}
    return export_program(model, path, mode, (), call, adapter_names, kind=generation.KV, rename=_genai_name,
                          metadata=metadata, ort_fusions=onnx_fusions.provider_for(ort_fusions), **export_options)


def _genai_name(name: str) -> str:
    """The default names of the cache graph's inputs and outputs (`past_keys_0`, `output_1_0`) as
    onnxruntime-genai's defaults."""
    group, _, layer = name.rpartition("_")
    for prefix, names in (("past_keys", PAST[0]), ("past_values", PAST[1]), ("output_1", PRESENT[0]),
                          ("output_2", PRESENT[1])):
        if group == prefix:
            return names % int(layer)
    return "logits" if name == "output_0" else name


def export_genai(model: Any, folder: str | os.PathLike, mode: str = "merged", tokenizer_from: str | None = None,
                 adapter_names: Sequence[str] | None = None, ort_fusions: str | None = "auto",
                 **export_options: Any) -> str:
    """Write a folder onnxruntime-genai loads (`og.Model(folder)`): the decoder, `genai_config.json`, the
    tokenizer files found in `tokenizer_from` (a model folder) and, in mode "inputs", every loaded adapter
    as `<name>.onnx_adapter` for `og.Adapters.load`, zero-padded to the exported (active) adapter's rank.
    `ort_fusions` as `export_onnx_decoder`'s. Returns the folder."""
    folder = os.fspath(folder)
    ort_fusions = onnx_fusions.provider_for(ort_fusions)  # a bad value fails before the folder is made
    os.makedirs(folder, exist_ok=True)
    export_onnx_decoder(model, os.path.join(folder, DECODER_FILE), mode, adapter_names, ort_fusions=ort_fusions,
                        **export_options)
    source = model.parameter_tree.source
    with open(os.path.join(folder, GENAI_CONFIG), "w", encoding="utf-8") as f:
        json.dump(genai_config(source.config, source.generation_config, generation.cache_layout(model)), f, indent=2)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(tokenizer_from, name)):
                shutil.copyfile(os.path.join(tokenizer_from, name), os.path.join(folder, name))
    if mode == "inputs":  # each adapter at the exported shapes (genai does not pad a lower rank)
        session = OnnxAdapterSession(os.path.join(folder, DECODER_FILE), ["CPUExecutionProvider"])
        for name in model.adapter_order:
            path = save_onnx_adapter(model, os.path.join(folder, name + ORT_ADAPTER_SUFFIX), name)
            session.load_adapter(path, name)  # a rank above the exported adapter's is an error naming the tensor
            session.save_adapter(name, path)
    return folder


def genai_config(config: Any, generation_config: Any, layout: Sequence[generation.LayerShape]) -> dict[str, Any]:
    """onnxruntime-genai's `genai_config.json` for the exported decoder (model type "decoder": its generic
    decoder-only runner, which reads the names below)."""
    def token(name: str, default: Any = None) -> Any:  # genai needs a number for each
        for source in (generation_config, config):
            if getattr(source, name, None) is not None:
                return getattr(source, name)
        return default

    eos = token("eos_token_id", 0)
    first_eos = eos[0] if isinstance(eos, list) else eos
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": token("bos_token_id", first_eos),
            "eos_token_id": eos,
            "pad_token_id": token("pad_token_id", first_eos),
            "vocab_size": config.vocab_size,
            "context_length": context,
            "decoder": {
                "filename": DECODER_FILE,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": layout[0].head_dim,
                "hidden_size": config.hidden_size,
                "num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": layout[0].heads,
                "num_hidden_layers": len(layout),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": PAST[0], "past_value_names": PAST[1]},
                "outputs": {"logits": "logits", "present_key_names": PRESENT[0], "present_value_names": PRESENT[1]},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": context, "min_length": 0, "top_k": 1,
                   "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.0, "past_present_share_buffer": False},
    }


# -- decoding ------------------------------------------------------------------------------------------------


def generate(session: Any, input_ids: Any, attention_mask: Any = None, max_new_tokens: int = 20,
             adapter_names: str | Sequence[str] | None = None, adapter_index: Any = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, logits_processor: Any = None) -> np.ndarray:
    """Prompt + new tokens [batch, prompt + new] (int64) from an exported decoder session: greedy, or sampled
    with torch's global generator as transformers samples. Left-padded prompts (mask 0 on the left); rows
    that produced `eos_token_id` continue with `pad_token_id`, and decoding stops when all have."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    if session.task != TASK:
        raise ConfigError("generate: this ONNX model is not a decoder with a KV cache (export it with "
                          "export_onnx_decoder or `peftc export --task text-generation`)")
    ids = torch.as_tensor(input_ids).to(torch.long)
    if ids.dim() != 2:
        raise ConfigError(f"generate: input_ids must be 2-d [batch, tokens], got shape {list(ids.shape)}")
    if max_new_tokens < 1:  # as transformers' GenerationConfig
        raise ConfigError(f"generate: max_new_tokens must be greater than 0, got {max_new_tokens}")
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).to(torch.long)
    if mask.shape != ids.shape:
        raise ConfigError(f"generate: attention_mask {list(mask.shape)} does not match input_ids {list(ids.shape)}")
    processors = LogitsProcessorList(logits_processor or [])
    if do_sample:  # transformers' warpers, in its order, under its conditions
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=top_p))
    eos = np.atleast_1d([] if eos_token_id is None else eos_token_id).astype(np.int64)
    if len(eos) and pad_token_id is None:
        raise ConfigError("generate: pass pad_token_id with eos_token_id (what finished rows continue with)")
    batch, prompt = ids.shape
    # the loop's state is numpy: its small ops cost a few microseconds there, several times that in torch (an
    # argmax over [8, 32000]: 0.35 ms against 0.013), and after each step's stream of weights the caches are cold
    sequences = np.zeros((batch, prompt + max_new_tokens), np.int64)
    sequences[:, :prompt] = ids.numpy()
    masks = np.ones_like(sequences)  # the attention mask of every step: the prompt's, then ones
    masks[:, :prompt] = mask.numpy()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0).numpy()  # transformers' rule for left padding
    empty = {name % i: np.zeros((batch, heads, 0, head_dim), session.cache_dtype)
             for i, (heads, head_dim) in enumerate(session.cache) for name in PAST}
    feed: dict[str, Any] = {"input_ids": sequences[:, :prompt], "attention_mask": masks[:, :prompt],
                            "position_ids": positions, **empty}
    cache = [(past % i, present % i) for i in range(len(session.cache)) for past, present in zip(PAST, PRESENT)]
    presents = {present for _, present in cache}
    finished = np.zeros(batch, dtype=bool)
    runs = session.bound_runs(adapter_names, adapter_index, batch)  # the adapter choice, bound for every step
    outputs = session.output_names
    length = prompt
    with _one_torch_thread():  # the torch ops of sampling are small
        # OrtValues: the presents go back in as the next step's past without a copy through numpy
        out = session.run_values(feed, on_device=presents, runs=runs)  # the prompt's step, its inputs checked
        for step in range(max_new_tokens):
            logits = out["logits"].numpy()[:, -1, :]
            if do_sample or processors:
                scores = processors(torch.from_numpy(sequences[:, :length]), torch.from_numpy(logits).float())
                if do_sample:
                    token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1).numpy()
                else:
                    token = scores.argmax(dim=-1).numpy()
            else:  # greedy: numpy's argmax takes the first of equal maxima, as torch's
                token = logits.argmax(-1)
            if len(eos):
                token = np.where(finished, pad_token_id, token)
                finished |= np.isin(token, eos)
            sequences[:, length] = token
            length += 1
            if finished.all() or step == max_new_tokens - 1:
                break
            positions = positions[:, -1:] + 1
            feed = {"input_ids": sequences[:, length - 1:length], "attention_mask": masks[:, :length],
                    "position_ids": positions, **{past: out[present] for past, present in cache}}
            out = dict(zip(outputs, runs.run(ort_values(feed, runs.device), outputs, presents)))
    return sequences[:, :length].copy()


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """torch on one thread meanwhile: ONNX Runtime's pool keeps its threads spinning for a while after each run, and
    a decode step's argmax over the vocabulary split across torch's threads waited for them (3.7 ms a step at batch
    8 on 2 cores, against 0.2 ms on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
