"""Memory measured in tests: the peak a generate's decode steps allocate, on a model whose KV cache
dominates everything else it holds (a long prompt through a tiny Llama)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import profile

import peftc
from tests import zoo
from tests.oracle import randomize_adapters

PAD = 0


@dataclass
class LongContext:
    base: torch.nn.Module
    adapted: peftc.AdaptedModel
    ids: torch.Tensor  # 4 prompts of 2000 tokens
    cache_bytes: int  # the KV cache after the first decode step


def long_context(kv_heads: int) -> LongContext:
    """A 2-layer Llama (4 query heads on `kv_heads`, head dim 8) with LoRA on q and v, and 4 prompts of 2000
    tokens: the cache is ~1 MB a head, the weights a few KB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=zoo.VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=4096)
    base = LlamaForCausalLM(cfg).eval()
    am = peftc.apply(base, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    randomize_adapters(am, seed=1)
    ids = torch.randint(1, zoo.VOCAB, (4, 2000), generator=torch.Generator().manual_seed(0))
    cache = 2 * 2 * 4 * kv_heads * 2002 * 8 * 4  # layers x (keys, values) x batch x kv heads x length x head dim x 4
    return LongContext(base, am, ids, cache)


def decode_peak_bytes(model: Any, ids: torch.Tensor, path: str) -> int:
    """The most CPU memory allocated at once during the decode steps of a greedy generate (after its first
    argmax: the prompt step's activations excluded), from the profiler's memory events."""
    with profile(profile_memory=True) as prof:
        model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=PAD)
    prof.export_chrome_trace(path)
    with open(path) as trace:
        events = json.load(trace)["traceEvents"]
    first = min(e["ts"] for e in events if e.get("name") == "aten::argmax")
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]" and e["ts"] > first)
