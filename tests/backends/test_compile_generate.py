"""`compile_model(am).generate`: every prefill and decode step runs the compiled KV-cache graph, and
after warm-up nothing recompiles: not the decode steps (the cache grows), other prompt lengths,
adapter switches, per-sample adapters, disabled adapters or beam search. Counted with dynamo's
CompileCounter, as tests/backends/test_compile.py counts forward compiles."""

from __future__ import annotations

import pytest
import torch
from peftc.backends.compile import compile_model
from torch._dynamo.testing import CompileCounter

import peftc
from tests import zoo
from tests.memory import decode_peak_bytes, long_context
from tests.oracle import randomize_adapters

TARGETS = ["q_proj", "v_proj", "down_proj"]
pytestmark = [
    pytest.mark.xdist_group("compile_generate"),
    pytest.mark.filterwarnings("ignore:Attempted to insert a get_attr Node:UserWarning"),
]


def ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, zoo.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def generate(model, input_ids: torch.Tensor, **options) -> torch.Tensor:
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, **options}
    return model.generate(input_ids=input_ids, **options)


def test_compiled_generate_never_recompiles_after_warmup() -> None:
    torch._dynamo.reset()
    am = peftc.apply(zoo.llama().model, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": TARGETS})
    am.add_adapter("other", {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "target_modules": TARGETS})
    am.set_adapter(["default", "other"])
    randomize_adapters(am, seed=1)
    am.set_adapter("default")
    counter = CompileCounter()
    compiled = compile_model(am, backend=counter)
    try:
        # warm-up: prefill (past 0) and decode (one new token) compile once each, per batch class
        # (dynamo specialises a batch of 1, as it does sizes 0 and 1)
        with torch.no_grad():
            out = compiled.generate(input_ids=ids(2, 5), max_new_tokens=4, do_sample=False, pad_token_id=0,
                                    output_logits=True, return_dict_in_generate=True)
            want = generate(am, ids(2, 5), max_new_tokens=4, output_logits=True, return_dict_in_generate=True)
        assert torch.equal(out.sequences, want.sequences)
        for a, b in zip(out.logits, want.logits):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert torch.equal(generate(compiled, ids(1, 4)), generate(am, ids(1, 4)))
        warm = counter.frame_count
        assert warm <= 4

        assert torch.equal(generate(compiled, ids(3, 9, 1), max_new_tokens=24), generate(am, ids(3, 9, 1),
                                                                                          max_new_tokens=24))
        assert torch.equal(generate(compiled, ids(1, 11, 2)), generate(am, ids(1, 11, 2)))
        am.set_adapter("other")
        try:
            assert torch.equal(generate(compiled, ids(2, 4)), generate(am, ids(2, 4)))
        finally:
            am.set_adapter("default")
        names = ["other", "__base__", "default"]
        assert torch.equal(generate(compiled, ids(3, 4), adapter_names=names),
                           generate(am, ids(3, 4), adapter_names=names))
        with am.disable_adapter():
            assert torch.equal(generate(compiled, ids(2, 4)), generate(am, ids(2, 4)))
        assert torch.equal(generate(compiled, ids(2, 6), num_beams=2, adapter_names=["other", "default"]),
                           generate(am, ids(2, 6), num_beams=2, adapter_names=["other", "default"]))
        assert counter.frame_count == warm, f"recompiled: {counter.frame_count - warm} compiles after warm-up"
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_a_compiled_decode_step_holds_the_cache_once(tmp_path, kv_heads: int) -> None:
    """The compiled program takes its inputs over as the eager one does (dynamo hands the list to the compiled
    graph) and writes each step into the room after the past: a step holds the cache about once, as HF's
    does, where the compiled frame used to keep the pasts alive beside the presents (2x the cache); and
    grouped-query attention (2 key/value heads for 4) reads the cache unexpanded."""
    torch._dynamo.reset()
    case = long_context(kv_heads)
    compiled = compile_model(case.adapted)
    try:
        with torch.no_grad():
            prompts = case.ids[:, :8]  # compile outside the profile, and compare with the eager program
            assert torch.equal(generate(compiled, prompts, max_new_tokens=3), generate(case.adapted, prompts,
                                                                                     max_new_tokens=3))
            ours = decode_peak_bytes(compiled, case.ids, str(tmp_path / "compiled.json"))
            theirs = decode_peak_bytes(case.base, case.ids, str(tmp_path / "hf.json"))
        assert ours < 1.6 * case.cache_bytes, (ours, case.cache_bytes)
        assert ours <= 1.1 * theirs, (ours, theirs)
    finally:
        torch._dynamo.reset()


def test_a_compiled_generate_grows_one_buffer_per_layer() -> None:
    """A compiled decode step writes its keys and values into the room after the past, in place
    (passes/write_cache_in_place.py: WriteCacheIntoSlots): the returned cache's layers are views of the
    buffers the prompt step made."""
    torch._dynamo.reset()
    am = peftc.apply(zoo.llama().model, {"peft_type": "LORA", "r": 4, "target_modules": TARGETS})
    try:
        with torch.no_grad():
            out = compile_model(am).generate(input_ids=ids(2, 5), max_new_tokens=4, do_sample=False, pad_token_id=0,
                                             return_dict_in_generate=True)
            assert torch.equal(out.sequences, am.generate(input_ids=ids(2, 5), max_new_tokens=4, do_sample=False,
                                                          pad_token_id=0))
    finally:
        torch._dynamo.reset()
    for layer in out.past_key_values.layers:  # the 3 decode steps wrote into the prompt step's buffers
        assert layer.keys.shape[2] == 8 and layer.keys._base.shape[2] == 9


@pytest.mark.parametrize("name", list(zoo.SEQ2SEQ_LMS))
def test_a_compiled_encoder_decoder_generates_as_the_eager_one(name: str) -> None:
    """BART and T5: the encoder graph and the decoder graphs (first step, later steps: their self-attention
    cache written into slots) compiled; greedy and beam search give the eager program's tokens."""
    build, targets, pad = zoo.SEQ2SEQ_LMS[name]
    torch._dynamo.reset()
    prompts = torch.randint(3, zoo.VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    am = peftc.apply(build(), {"peft_type": "LORA", "r": 4, "target_modules": targets},
                     example_inputs={"input_ids": prompts, "decoder_input_ids": prompts})
    randomize_adapters(am, seed=1)
    compiled = compile_model(am)
    try:
        with torch.no_grad():
            for beams in (1, 2):
                options = {"max_new_tokens": 5, "min_new_tokens": 5, "num_beams": beams, "pad_token_id": pad}
                assert torch.equal(generate(compiled, prompts, **options), generate(am, prompts, **options))
    finally:
        torch._dynamo.reset()
