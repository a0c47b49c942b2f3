"""Inference programs run grouped-query attention unexpanded (passes/grouped_query_attention.py): on small
exported graphs (transformers' `repeat_kv` before SDPA), the expansions it must leave alone, and in a
generation graph of a GQA Llama (whose tokens and logits test_generation.py compares with PEFT's)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from peftc.passes.grouped_query_attention import SDPA, AttendGroupedQueries
from transformers import LlamaConfig, LlamaForCausalLM

import peftc

aten = torch.ops.aten


def repeat_kv(x: torch.Tensor, n_rep: int, batch: int | None = None) -> torch.Tensor:
    """transformers' repeat_kv; `batch` expands the batch dim too (a broadcast the pass must not drop)."""
    b, heads, s, d = x.shape
    return x[:, :, None, :, :].expand(batch or b, heads, n_rep, s, d).reshape(batch or b, heads * n_rep, s, d)


class Attention(nn.Module):
    def __init__(self, broadcast_batch: bool = False) -> None:
        super().__init__()
        self.broadcast_batch = broadcast_batch

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch = q.shape[0] if self.broadcast_batch else None
        return F.scaled_dot_product_attention(q, repeat_kv(k, 2, batch), repeat_kv(v, 2, batch), attn_mask=mask,
                                              scale=0.5)


def inputs(kv_batch: int = 3) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    mask = torch.ones(3, 1, 5, 7, dtype=torch.bool)
    mask[0, ..., :2] = False  # padding: the pass does not depend on the mask
    return torch.randn(3, 4, 5, 8), torch.randn(kv_batch, 2, 7, 8), torch.randn(kv_batch, 2, 7, 8), mask


def lowered(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.fx.GraphModule, bool]:
    gm = torch.export.export(module, args).module()
    gm = torch.fx.GraphModule(gm, gm.graph)
    return gm, AttendGroupedQueries()(gm).modified


def test_sdpa_reads_the_grouped_keys_and_values_unexpanded():
    module, args = Attention(), inputs()
    gm, modified = lowered(module, args)
    assert modified
    (sdpa,) = gm.graph.find_nodes(op="call_function", target=SDPA)
    assert sdpa.kwargs["enable_gqa"] is True
    assert [n for n in gm.graph.nodes if n.target == aten.expand.default] == []  # the copies are gone
    assert torch.equal(gm(*args), module(*args))  # bit-equal, padding mask included


def test_an_expansion_that_broadcasts_the_batch_is_left_alone():
    module, args = Attention(broadcast_batch=True), inputs(kv_batch=1)
    gm, modified = lowered(module, args)
    assert not modified
    assert torch.equal(gm(*args), module(*args))


def test_a_gqa_llama_generates_through_unexpanded_attention():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    am = peftc.apply(LlamaForCausalLM(cfg).eval(), {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]})
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    am.generate(input_ids=ids, max_new_tokens=3, pad_token_id=0)
    programs = am.programs.live()  # the forward's (captured by apply) and generation's KV-cache graph
    attentions = [n for p in programs for n in p.run.graph.find_nodes(op="call_function", target=SDPA)]
    assert len(programs) == 2 and len(attentions) == 4 and all(n.kwargs["enable_gqa"] for n in attentions)
    captured = [n for p in programs for n in p.captured.gm.graph.find_nodes(op="call_function", target=SDPA)]
    assert not any(n.kwargs.get("enable_gqa") for n in captured)  # what torch.compile and ONNX see
