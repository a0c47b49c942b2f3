"""Inference programs write each step's keys and values in place after the past
(passes/write_cache_in_place.py): on small exported graphs (a cache layer's concatenation, and those the pass
must leave alone), and in a Llama's generation graph (whose tokens and logits test_generation.py compares
with PEFT's)."""

from __future__ import annotations

import torch
import torch.nn as nn
from peftc.passes.write_cache_in_place import (
    CAT,
    CacheSlots,
    WriteCacheInPlace,
    WriteCacheIntoSlots,
    past_length_input,
)
from torch.export import Dim

import peftc
from peftc.cache_room import appended, room_after, room_for
from tests import zoo


class CacheLayer(nn.Module):
    """A layer's cache update as transformers' DynamicLayer makes it: the present is returned."""

    def forward(self, past: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        present = torch.cat([past, x * 2], dim=-2)
        return present.sum(-1), present


class NotACache(nn.Module):
    """Concatenations the pass must keep: an input read twice, along another dim, a result not returned."""

    def forward(self, past: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        twice = torch.cat([past, past[:, :, :1]], dim=-2)
        wide = torch.cat([x, x], dim=-1)
        return twice, torch.cat([x, wide[..., :4]], dim=-2).sum()


class CacheStep(nn.Module):
    """A step that also reads the past's length and the new tokens' count (as the mask's length is read)."""

    def forward(self, ids: torch.Tensor, past: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        present = torch.cat([past, x * 2], dim=-2)
        return present.sum(-1) * (past.shape[2] + ids.shape[1]), present


def exported(module: nn.Module, *args: torch.Tensor, dynamic: dict | None = None) -> torch.fx.GraphModule:
    gm = torch.export.export(module, args, dynamic_shapes=dynamic).module()
    for guard in gm.graph.find_nodes(op="call_module", target="_guards_fn"):  # as a capture drops it
        gm.graph.erase_node(guard)
    gm.graph.set_codegen(torch.fx.graph.CodeGen())  # positional inputs, as a capture's graph takes them
    return torch.fx.GraphModule(gm, gm.graph)


def lowered(module: nn.Module, *args: torch.Tensor) -> tuple[torch.fx.GraphModule, bool]:
    gm = exported(module, *args)
    return gm, WriteCacheInPlace()(gm).modified


def test_the_cache_concatenation_becomes_an_append_in_place() -> None:
    past, x = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 1, 4)
    gm, modified = lowered(CacheLayer(), past, x)
    assert modified
    assert gm.graph.find_nodes(op="call_function", target=CAT) == []
    assert len(gm.graph.find_nodes(op="call_function", target=appended)) == 1
    with room_for(3):
        summed, present = gm(past, x)
        want = CacheLayer()(past, x)
        assert torch.equal(summed, want[0]) and torch.equal(present, want[1])  # bit-equal
        _, grown = gm(present, x)  # the next step writes into the room after `present`
    assert grown._base is present._base and torch.equal(grown[..., :6, :], want[1])


def test_other_concatenations_are_left_alone() -> None:
    gm, modified = lowered(NotACache(), torch.randn(2, 3, 5, 4), torch.randn(2, 3, 1, 4))
    assert not modified
    assert len(gm.graph.find_nodes(op="call_function", target=CAT)) == 3


def test_a_llama_generation_graph_appends_every_layer_in_place() -> None:
    am = peftc.apply(zoo.llama().model, {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "v_proj"]})
    ids = torch.randint(1, zoo.VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    out = am.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                      return_dict_in_generate=True)
    programs = am.programs.live()  # the forward's and the KV-cache graph's
    layers = len(out.past_key_values.layers)
    appends = [n for p in programs for n in p.run.graph.find_nodes(op="call_function", target=appended)]
    assert len(appends) == 2 * layers
    captured = [n for p in programs for n in p.captured.gm.graph.find_nodes(op="call_function", target=CAT)]
    assert sum(n.args[1] == -2 for n in captured) == 2 * layers  # what torch.compile and ONNX see
    for layer in out.past_key_values.layers:  # the 3 decode steps wrote into the prompt step's buffers
        assert layer.keys.shape[2] == 8 and layer.keys._base.shape[2] == 9


def test_compiled_programs_write_into_slot_buffers() -> None:
    """The torch.compile lowering: the past input becomes a slot buffer with room, its length a last input,
    and the step writes its keys into the room; the outputs equal the concatenating step's."""
    ids, past, x = torch.ones(2, 3, dtype=torch.long), torch.randn(2, 3, 5, 4), torch.randn(2, 3, 3, 4)
    seq = Dim("seq")
    gm = exported(CacheStep(), ids, past, x, dynamic={"ids": {1: seq}, "past": {2: Dim("past")}, "x": {2: seq}})
    assert WriteCacheIntoSlots()(gm).modified
    assert [n.args[1] for n in gm.graph.find_nodes(op="call_function", target=CAT)] == []
    # the past is a slot, the past's length a last input, the new tokens' count the ids' length, and the
    # second output a present
    assert CacheSlots.of(gm) == CacheSlots(slots=[1], past_length=3, new_length=(0, 1), presents=[1])
    with room_for(2):
        slot = room_after(past, 3)
    assert slot.shape[2] == 10 and torch.equal(slot[:, :, :5], past)
    got = gm(ids, slot, x, past_length_input(5, past))
    want = CacheStep()(ids, past, x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[1].data_ptr() == slot.data_ptr() and torch.equal(slot[:, :, :8], want[1])  # written in place

