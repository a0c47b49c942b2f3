"""generate() through the KV-cache graph, against PEFT's generate on the same weights.

Every comparison runs transformers' own loop on both sides: PEFT's `generate` over its module-swapped
model, peftc's over the captured cache graph. Greedy token ids must be identical and each step's raw
logits (`output_logits=True`) within 1e-5; prompts are a left-padded batch of two.
"""

from __future__ import annotations

from typing import Any

import peft
import pytest
import torch
from peftc.passes import hoist_invariants
from transformers import GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import peftc
from peftc import generation
from peftc.graph import adapter_nodes
from tests import zoo
from tests.memory import decode_peak_bytes, long_context
from tests.oracle import make_pair, randomize_adapters

TOL = {"atol": 1e-5, "rtol": 1e-5}
PAD = 0

pytestmark = [
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    pytest.mark.filterwarnings("ignore:Attempted to insert a get_attr Node:UserWarning"),
    pytest.mark.filterwarnings("ignore:Specified to not (save|load) vera_A:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
]
SHARED = pytest.mark.xdist_group("generation-llama2")  # tests of the module-scoped `llama2` fixture: one worker


def qwen3_moe() -> zoo.Case:
    """A tiny Qwen3-MoE (4 experts, 2 per token): the MoE decoder of the issue, kept out of the zoo's
    FACTORIES so the other suites do not run it."""
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=zoo.VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                         num_experts_per_tok=2, max_position_embeddings=64)
    return zoo.Case("qwen3_moe", Qwen3MoeForCausalLM(cfg).eval(), {"input_ids": zoo._ids()},
                    ["q_proj", "v_proj", "o_proj"], True)


@pytest.fixture(autouse=True)
def _qwen3_moe_in_zoo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(zoo.FACTORIES, "qwen3_moe", qwen3_moe)


def prompts(batch: int = 2, seq: int = 5, seed: int = 3) -> dict[str, torch.Tensor]:
    """A left-padded batch: row 0 has two pads."""
    ids = torch.randint(1, zoo.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids[0, :2] = PAD
    return {"input_ids": ids, "attention_mask": mask}


def run(model: Any, inputs: dict, **options: Any) -> Any:
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": PAD, "output_logits": True,
               "return_dict_in_generate": True, **options}
    return model.generate(**inputs, **options)


def assert_same_generation(got: Any, want: Any) -> None:
    assert torch.equal(got.sequences, want.sequences), f"\n{got.sequences}\n{want.sequences}"
    assert len(got.logits) == len(want.logits)
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, s=step: f"step {s}: {m}")


def kv_captures(am: peftc.AdaptedModel) -> int:
    return sum(1 for key, _ in am.programs.captures.entries() if key[-1] == generation.KIND)


def lora(targets: list[str], **extra: Any) -> tuple[dict, peft.PeftConfig]:
    fields = {"r": 4, "lora_alpha": 8, "target_modules": targets, **extra}
    return {"peft_type": "LORA", **fields}, peft.LoraConfig(**fields)


def dora(targets: list[str]) -> tuple[dict, peft.PeftConfig]:
    return lora(targets, use_dora=True, init_lora_weights=False)


def ia3(targets: list[str], ff: list[str]) -> tuple[dict, peft.PeftConfig]:
    return ({"peft_type": "IA3", "target_modules": targets, "feedforward_modules": ff},
            peft.IA3Config(target_modules=targets, feedforward_modules=ff))


def vera(targets: list[str]) -> tuple[dict, peft.PeftConfig]:
    return {"peft_type": "VERA", "r": 4, "target_modules": targets}, peft.VeraConfig(r=4, target_modules=targets)


LLAMA = ["q_proj", "v_proj", "down_proj"]
GPT2 = ["c_attn", "c_fc"]
METHODS = {
    "llama": {"lora": lora(LLAMA + ["embed_tokens"]), "dora": dora(LLAMA), "ia3": ia3(LLAMA, ["down_proj"]),
              "vera": vera(LLAMA)},
    "gpt2": {"lora": lora(GPT2 + ["wte"]), "dora": dora(GPT2), "ia3": ia3(GPT2, ["c_fc"]), "vera": vera(GPT2)},
    "qwen3_moe": {"lora": lora(["q_proj", "v_proj", "o_proj"]), "ia3": ia3(["q_proj", "o_proj"], ["o_proj"])},
}
CASES = [(model, method) for model, methods in METHODS.items() for method in methods]


@pytest.mark.parametrize(("model", "method"), CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_greedy_matches_peft(model: str, method: str) -> None:
    pair = make_pair(model, *METHODS[model][method])
    am, pm = pair.am, pair.pm
    inputs = prompts()
    got = run(am, inputs)
    assert_same_generation(got, run(pm, inputs))
    base = run(zoo.FACTORIES[model]().model, inputs)  # the model without adapters
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(got.logits, base.logits)), "adapter had no effect"
    assert kv_captures(am) == 1
    # a batch of one, another prompt length: the same graph
    assert_same_generation(run(am, prompts(batch=1, seq=7)), run(pm, prompts(batch=1, seq=7)))
    assert kv_captures(am) == 1


# -- one adapted Llama with two LoRA adapters, shared by the tests below -------------------------------------


@pytest.fixture(scope="module")
def llama2():
    """peftc and PEFT on the same Llama with adapters "default" and "other" (same weights)."""
    config, peft_config = lora(LLAMA)
    case, ref = zoo.llama(), zoo.llama()
    am = peftc.apply(case.model, config)
    am.add_adapter("other", {**config, "lora_alpha": 16})
    am.set_adapter(["default", "other"])
    randomize_adapters(am, seed=5)
    am.set_adapter("default")
    pm = peft.get_peft_model(ref.model, peft_config)
    pm.add_adapter("other", peft.LoraConfig(**{**peft_config.to_dict(), "lora_alpha": 16}))
    result = pm.load_state_dict(am.state_dict(), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    pm.eval()
    return case, am, pm


@SHARED
def test_mixed_adapters_equal_single_and_peft(llama2) -> None:
    case, am, pm = llama2
    inputs = prompts(batch=3, seq=6)
    names = ["other", "__base__", "default"]
    mixed = run(am, inputs, adapter_names=names)
    assert_same_generation(mixed, run(pm, inputs, adapter_names=names))
    # each row equals that row of the batch run with its adapter for every sample
    for row, name in enumerate(names):
        if name == "__base__":
            with am.disable_adapter():
                alone = run(am, inputs)
        else:
            am.set_adapter(name)
            alone = run(am, inputs)
            am.set_adapter("default")
        assert torch.equal(mixed.sequences[row], alone.sequences[row]), name
        for a, b in zip(mixed.logits, alone.logits):
            torch.testing.assert_close(a[row], b[row], **TOL)
    # the raw index spelling is the same generation
    index = torch.tensor([am.adapter_order.index("other"), -1, am.adapter_order.index("default")])
    assert torch.equal(run(am, inputs, adapter_index=index).sequences, mixed.sequences)


@SHARED
def test_adapters_are_checked_once_per_generate(llama2, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing changes the model's tensors between tokens (peftc.unchanged): the kept adapter values are checked
    at the first step only, so a step does not grow with the adapters loaded."""
    _, am, _ = llama2
    inputs, names = prompts(), ["other", "default"]
    warm = run(am, inputs, adapter_names=names)  # captured and rewritten
    checks = []
    key = hoist_invariants._key
    monkeypatch.setattr(hoist_invariants, "_key", lambda *a: checks.append(a) or key(*a))
    assert torch.equal(run(am, inputs, adapter_names=names).sequences, warm.sequences)
    assert len(checks) == 1


@SHARED
def test_beam_search_mixed_matches_peft(llama2) -> None:
    _, am, pm = llama2
    inputs = prompts(batch=2, seq=5)
    names = ["other", "default"]
    options = {"num_beams": 3, "num_return_sequences": 2, "output_logits": False, "max_new_tokens": 6}
    got = run(am, inputs, adapter_names=names, **options)
    want = run(pm, inputs, adapter_names=names, **options)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, **TOL)
    assert torch.equal(run(am, inputs, **options).sequences, run(pm, inputs, **options).sequences)


@SHARED
def test_sampling_with_seed_matches_peft(llama2) -> None:
    _, am, pm = llama2
    inputs = prompts(batch=2, seq=5)
    options = {"do_sample": True, "top_p": 0.9, "top_k": 30, "temperature": 0.8, "max_new_tokens": 12}
    torch.manual_seed(7)
    got = run(am, inputs, **options)
    torch.manual_seed(7)
    want = run(pm, inputs, **options)
    assert_same_generation(got, want)


@SHARED
def test_disable_and_several_active(llama2) -> None:
    case, am, pm = llama2
    inputs = prompts()
    with am.disable_adapter():
        got = run(am, inputs)
    assert_same_generation(got, run(zoo.llama().model, inputs))
    am.set_adapter(["default", "other"])
    pm.base_model.set_adapter(["default", "other"])
    try:
        assert_same_generation(run(am, inputs), run(pm, inputs))
    finally:
        am.set_adapter("default")
        pm.base_model.set_adapter("default")


@SHARED
def test_folded_model_generates(llama2) -> None:
    _, am, pm = llama2
    folded = am.fold()
    inputs = prompts()
    got = run(folded, inputs)
    assert torch.equal(got.sequences, run(am, inputs).sequences)
    for a, b in zip(got.logits, run(pm, inputs).logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # merged weights round differently
    assert all(adapter_nodes(g.gm.graph) == [] for g in folded.graphs)


class Collect(BaseStreamer):
    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.clone())

    def end(self) -> None:
        self.ended = True


class StopAfter(StoppingCriteria):
    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


@SHARED
def test_stopping_eos_and_streamer(llama2) -> None:
    _, am, pm = llama2
    inputs = prompts(batch=1, seq=5)
    full = run(am, inputs, max_new_tokens=10)
    eos = int(full.sequences[0, 8])  # the 4th new token: generation stops there
    got = run(am, inputs, max_new_tokens=10, eos_token_id=eos)
    assert_same_generation(got, run(pm, inputs, max_new_tokens=10, eos_token_id=eos))
    assert got.sequences.shape[1] <= 9
    stop = StoppingCriteriaList([StopAfter(8)])
    got = run(am, inputs, max_new_tokens=10, stopping_criteria=stop)
    assert got.sequences.shape[1] == 8
    streamer = Collect()
    got = am.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=PAD, streamer=streamer)
    assert streamer.ended and torch.equal(torch.cat([c.reshape(1, -1) for c in streamer.chunks], 1), got)
    config = GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    assert am.generate(**inputs, generation_config=config).shape[1] == 9
    # without a cache: the same graph, every step from an empty past
    assert_same_generation(run(am, prompts(), use_cache=False, max_new_tokens=4),
                           run(pm, prompts(), use_cache=False, max_new_tokens=4))


@SHARED
def test_captures_bounded(llama2) -> None:
    """One cache graph per signature and variant: not per step, prompt length or batch size."""
    _, am, _ = llama2
    calls = []
    real = generation.KV.capture
    object.__setattr__(generation.KV, "capture", lambda *a: calls.append(1) or real(*a))
    try:
        before = kv_captures(am)
        out = am.generate(**prompts(batch=2, seq=5), max_new_tokens=64, min_new_tokens=64, pad_token_id=PAD)
        assert out.shape[1] == 5 + 64
        for seq in (3, 4, 17, 64, 150, 300):
            for batch in (1, 3):
                am.generate(input_ids=torch.randint(1, zoo.VOCAB, (batch, seq)), max_new_tokens=2, pad_token_id=PAD)
        am.generate(**prompts(batch=2, seq=9), max_new_tokens=2, pad_token_id=PAD, num_beams=2)
        am.generate(**prompts(batch=2, seq=9), max_new_tokens=2, pad_token_id=PAD, adapter_names=["other", "default"])
        assert kv_captures(am) - before == len(calls) <= 1
    finally:
        object.__setattr__(generation.KV, "capture", real)


@SHARED
def test_kv_graph_is_rewritten_by_every_pass(llama2) -> None:
    """The cache graph is a captured program like the others: adapted, folded and dispatched."""
    _, am, _ = llama2
    inputs = prompts()
    run(am, inputs)
    run(am, inputs, adapter_names=["other", "default"])
    kv_bases = [c for key, c in am.programs.captures.entries() if key[-1] == generation.KIND]
    kv = {variant: p.captured for base in kv_bases for variant, p in am.programs.by_variant(base).items()}
    active, mixed = kv[("active", ("default",), ())], kv[("mixed", ("default", "other"))]
    assert active.extra_inputs == () and mixed.extra_inputs == ("adapter_index",)
    assert adapter_nodes(active.gm.graph) and adapter_nodes(mixed.gm.graph)
    with am.disable_adapter():
        run(am, inputs)
    disabled = [p for base in kv_bases for variant, p in am.programs.by_variant(base).items()
                if variant == ("disabled",)]
    assert disabled and all(adapter_nodes(p.captured.gm.graph) == [] for p in disabled)


@SHARED
def test_bad_options(llama2) -> None:
    _, am, _ = llama2
    inputs = prompts()
    for options, match in [
        ({"cache_implementation": "static"}, "cache_implementation"),
        ({"output_attentions": True}, "output_attentions"),
        ({"output_hidden_states": True}, "output_hidden_states"),
        ({"prompt_lookup_num_tokens": 3}, "prompt_lookup_num_tokens"),
        ({"adapter_names": ["default"]}, "1 entries for a batch of 2"),
        ({"adapter_names": ["default", "nope"]}, "unknown adapter"),
        ({"adapter_names": ["default", "other"], "adapter_index": torch.tensor([0, 1])}, "not both"),
    ]:
        with pytest.raises(peftc.ConfigError, match=match):
            am.generate(**inputs, max_new_tokens=2, pad_token_id=PAD, **options)
    embeds = torch.randn(2, 5, 32)
    with pytest.raises(peftc.ConfigError, match="inputs_embeds"):
        am.generate(inputs_embeds=embeds, max_new_tokens=2, pad_token_id=PAD)


def test_not_a_generative_model() -> None:
    case = zoo.bert()
    am = peftc.apply(case.model, {"peft_type": "LORA", "r": 2, "target_modules": ["query"]},
                     example_inputs=case.inputs)
    with pytest.raises(peftc.ConfigError, match="not a transformers generative model"):
        am.generate(**case.inputs, max_new_tokens=2)


# -- encoder-decoder ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(zoo.SEQ2SEQ_LMS))
def test_encoder_decoder_matches_peft(name: str) -> None:
    """BART and T5: the encoder graph, then the decoder graph with self- and cross-attention caches (one
    signature without the cross cache for the first step, one with it after), greedy and mixed beam search."""
    build, targets, pad = zoo.SEQ2SEQ_LMS[name]
    config, peft_config = lora(targets)
    ids = torch.randint(3, zoo.VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0  # an encoder-side padded row (right padding, as seq2seq tokenizers pad)
    ids[0, 4:] = pad
    am = peftc.apply(build(), config, example_inputs={"input_ids": ids, "decoder_input_ids": ids})
    am.add_adapter("other", {**config, "lora_alpha": 16})
    am.set_adapter(["default", "other"])
    randomize_adapters(am, seed=2)
    am.set_adapter("default")
    pm = peft.get_peft_model(build(), peft_config)
    pm.add_adapter("other", peft.LoraConfig(**{**peft_config.to_dict(), "lora_alpha": 16}))
    assert pm.load_state_dict(am.state_dict(), strict=True).missing_keys == []
    pm.eval()
    inputs = {"input_ids": ids, "attention_mask": mask}
    options = {"min_new_tokens": 8, "pad_token_id": pad}
    assert_same_generation(run(am, inputs, **options), run(pm, inputs, **options))
    names = ["other", "default"]
    options = {"num_beams": 2, "min_new_tokens": 5, "max_new_tokens": 5, "output_logits": False, "pad_token_id": pad}
    got = run(am, inputs, adapter_names=names, **options)
    assert torch.equal(got.sequences, run(pm, inputs, adapter_names=names, **options).sequences)
    kinds = [key[-1] for key, _ in am.programs.captures.entries()]
    assert kinds.count("encoder") == 1 and kinds.count("seq2seq") == 2


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_a_decode_step_holds_the_cache_once(tmp_path: Any, kv_heads: int) -> None:
    """The pasts are handed to the graph (boxed inputs) and each is freed once concatenated, as transformers'
    own cache layers do: a step holds the cache about once, not the pasts and the presents both (2x); and
    grouped-query attention (2 key/value heads for 4) reads them unexpanded, as HF's unmasked SDPA does."""
    case = long_context(kv_heads)
    case.adapted.generate(input_ids=case.ids[:, :8], max_new_tokens=2, pad_token_id=PAD)  # capture outside the profile
    ours = decode_peak_bytes(case.adapted, case.ids, str(tmp_path / "peftc.json"))
    theirs = decode_peak_bytes(case.base, case.ids, str(tmp_path / "hf.json"))
    assert ours < 1.6 * case.cache_bytes, (ours, case.cache_bytes)  # pasts and presents alive together: >= 2x
    assert ours <= 1.05 * theirs, (ours, theirs)
