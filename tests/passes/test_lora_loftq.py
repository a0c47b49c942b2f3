"""LoftQ (`init_lora_weights="loftq"`): peftc's pure-torch NF4 / int8 quantisers against bitsandbytes' CPU ones,
bit for bit, and the whole init against PEFT's `loftq_init` on the same weights.

PEFT 0.21.2's `loftq_init` computes on a hard-coded "cuda" (or "xpu") device. `peft_loftq_on_cpu` runs PEFT's own
source of that function with that one line, `compute_device = "xpu" if is_xpu_available() else "cuda"`, replaced
by `compute_device = "cpu"`, so that it runs here; everything else in it (bitsandbytes' Params4bit / Int8Params,
the SVD, the iterations) is PEFT's and bitsandbytes' unchanged, except that NF4 dequantises through bitsandbytes'
portable code (`reference_dequantize_4bit`: its native CPU kernel is wrong on some machines). bitsandbytes is a
test extra only: these tests skip without it.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peftc.passes.lora_loftq import NF4_CODE, int8_dequantize, int8_quantize, loftq, nf4_dequantize, nf4_quantize

import peftc
from peftc.config import load_config
from peftc.errors import CheckpointError, ConfigError
from tests import zoo
from tests.oracle import (
    MethodPair,
    assert_same_outputs,
    check_eval,
    check_fold,
    check_train,
    example,
    randomize_adapters,
    saved_shapes,
    seeded_lora_pair,
)

bnb = pytest.importorskip("bitsandbytes")

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
]

TARGETS = {"mlp": ["lin0", "lin1"], "llama": ["q_proj", "v_proj", "down_proj"]}
CPU_LINE = ('compute_device = "xpu" if is_xpu_available() else "cuda"', 'compute_device = "cpu"')


@pytest.fixture
def peft_loftq_on_cpu(monkeypatch: pytest.MonkeyPatch) -> Any:
    """PEFT's `loftq_init`, its compute device line alone replaced by "cpu" (see the module docstring), installed
    where PEFT's LoRA layers call it."""
    import peft.tuners.lora.layer as layer
    import peft.utils.loftq_utils as loftq_utils

    source = inspect.getsource(loftq_utils.loftq_init)
    assert source.count(CPU_LINE[0]) == 1, "PEFT's loftq_init changed: re-check what this fixture patches"
    namespace = dict(vars(loftq_utils))
    exec(source.replace(*CPU_LINE), namespace)  # noqa: S102  (PEFT's own source, one line changed)
    monkeypatch.setattr(layer, "loftq_init", namespace["loftq_init"])
    monkeypatch.setattr(bnb.functional, "dequantize_4bit", reference_dequantize_4bit)
    return namespace["loftq_init"]


def reference_dequantize_4bit(data: torch.Tensor, state: Any) -> torch.Tensor:
    """bitsandbytes' portable 4-bit dequantisation (its default backend, which its CPU backend itself falls back
    to for odd shapes). Its native CPU kernel is wrong on some machines: on an AVX512-BF16 Xeon a 32x32 randn
    weight came back up to 1.65 away from itself, where the portable code (and NF4's spacing) gives 0.36; so
    that kernel is no oracle. Found when the suite first ran on such a machine."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    code = _get_4bit_code(state.quant_type, data.device)
    return _dequantize_4bit_compute(data.reshape(-1).view(torch.uint8), state.absmax, code, state.blocksize,
                                    state.shape, state.dtype)


def weights(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random weights with an all-zero stretch (a zero NF4 block where the row is long enough) and, in the last
    row, values that fall exactly on the midpoints between NF4 codes (ties) of a block whose absmax is 1."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.05
    w.view(-1)[:64] = 0
    code = torch.tensor(NF4_CODE)
    ties = torch.cat([torch.tensor([1.0]), (code[:-1] + code[1:]) / 2])
    w[-1, : min(len(ties), shape[1])] = ties[: shape[1]]
    return w


def unpack_nf4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """bitsandbytes' packed 4-bit codes (two per byte, the first in the high nibble) as one code per value."""
    packed = packed.reshape(-1)
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n]


# (out, in): a whole number of 64-value blocks, a last short block, an odd last dimension, a single short block,
# and a square one (where bitsandbytes' native CPU kernel went wrong, see `reference_dequantize_4bit`)
SHAPES = [(16, 40), (24, 36), (7, 9), (5, 3), (33, 17), (32, 32)]


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_equals_bitsandbytes_bit_for_bit(shape: tuple[int, int]):
    w = weights(shape)
    q = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
    assert q.quant_state.blocksize == 64
    codes, absmax = nf4_quantize(w)
    assert torch.equal(codes.reshape(-1), unpack_nf4(q.data, w.numel()))
    assert torch.equal(absmax, q.quant_state.absmax)
    dequantized = nf4_dequantize(codes, absmax)
    assert torch.equal(dequantized, reference_dequantize_4bit(q.data, q.quant_state))
    assert dequantized.abs().sum() > 0 and not torch.equal(dequantized, w)


def test_nf4_ties_take_the_lower_code_and_codes_are_fixed_points():
    code = torch.tensor(NF4_CODE)
    midpoints = (code[:-1] + code[1:]) / 2
    w = torch.cat([torch.tensor([1.0]), midpoints, code]).reshape(1, -1)
    codes, _ = nf4_quantize(w, blocksize=w.numel())
    assert codes[0, 1:16].tolist() == list(range(15))
    assert codes[0, 16:].tolist() == list(range(16))
    assert torch.equal(nf4_dequantize(codes, torch.ones(1), blocksize=w.numel())[0, 16:], code)


@settings(max_examples=40)
@given(rows=st.integers(1, 12), cols=st.integers(1, 80), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1e-3, 0.05, 1.0, 30.0]))
def test_quantisers_equal_bitsandbytes_on_drawn_weights(rows: int, cols: int, seed: int, scale: float):
    # codes and scales for any shape; bitsandbytes' NF4 dequantisation compiles a kernel per shape when the last
    # dimension is odd, so the dequantised weights are compared on the fixed SHAPES above only
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    q = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
    codes, absmax = nf4_quantize(w)
    assert torch.equal(codes.reshape(-1), unpack_nf4(q.data, w.numel()))
    assert torch.equal(absmax, q.quant_state.absmax)
    q8 = bnb.nn.Int8Params(w.clone(), requires_grad=False).to("cpu")
    rows8, absmax8 = int8_quantize(w)
    assert torch.equal(rows8, q8.data) and torch.equal(absmax8, q8.SCB)


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_equals_bitsandbytes_bit_for_bit(shape: tuple[int, int]):
    w = weights(shape) * 3
    w[1] = 0  # an all-zero row: bitsandbytes' scale is 127/0 there, its int8 values undefined; it dequantises to 0
    q = bnb.nn.Int8Params(w.clone(), requires_grad=False).to("cpu")
    rows, absmax = int8_quantize(w)
    assert torch.equal(absmax, q.SCB)
    live = absmax > 0
    assert torch.equal(rows[live], q.data[live])
    dequantized = int8_dequantize(rows, absmax)
    assert torch.equal(dequantized, bnb.functional.int8_vectorwise_dequant(q.data, q.SCB))
    assert torch.equal(dequantized[1], torch.zeros(shape[1]))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loftq_equals_peft_s_loftq_init(peft_loftq_on_cpu: Any, bits: int, iters: int, dtype: torch.dtype):
    w = weights((48, 40), seed=bits + iters).to(dtype)
    want_base, want_a, want_b = peft_loftq_on_cpu(w, num_bits=bits, reduced_rank=4, num_iter=iters)
    a, b, base = loftq(w, bits, 4, iters)
    assert base.dtype == w.dtype
    assert torch.equal(base, want_base) and torch.equal(a, want_a) and torch.equal(b, want_b)
    # what the factors are for (at scale 1): they take up part of the quantisation error
    w32 = w.float()
    assert torch.linalg.norm(w32 - base.float() - b @ a) < torch.linalg.norm(w32 - base.float())
    if iters > 1:  # the iterations refit: a different base than one step's
        assert not torch.equal(base, loftq(w, bits, 4, 1)[2])


def seeded_pair(name: str, **extra: Any) -> MethodPair:
    return seeded_lora_pair(name, TARGETS[name], init_lora_weights="loftq", **extra)


def base_weight_keys(pair: MethodPair) -> list[str]:
    return [f"base_model.model.{path}.base_layer.weight" for path in pair.am.targeted_modules]


def assert_same_init(pair: MethodPair) -> None:
    """A, B and the dequantised base weights equal PEFT's to the bit; the user's model keeps its own weights."""
    ours, theirs = pair.am.state_dict(), pair.pm.state_dict()
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
    original = zoo.FACTORIES[pair.case.name]().model.state_dict()
    for key in base_weight_keys(pair):
        assert not torch.equal(ours[key], original[key.replace("base_model.model.", "").replace(".base_layer", "")])
    assert all(torch.equal(v, original[k]) for k, v in pair.case.model.state_dict().items())


# loading the copies saved with init_lora_weights=True beside a loftq_config (as PEFT's LoftQ example saves them)
@pytest.mark.filterwarnings("ignore:`loftq_config` specified but will be ignored:UserWarning")
@pytest.mark.filterwarnings("ignore:loftq_config is ignored:UserWarning")
@pytest.mark.parametrize(("loftq_config", "extra"), [
    ({"loftq_bits": 4, "loftq_iter": 1}, {}),
    ({"loftq_bits": 8, "loftq_iter": 2}, {"lora_alpha": 4, "use_rslora": True}),
])
def test_init_matches_peft_and_checkpoints_load_both_ways(peft_loftq_on_cpu: Any, loftq_config: dict[str, int],
                                                          extra: dict[str, Any], tmp_path: Path):
    pair = seeded_pair("mlp", loftq_config=loftq_config, **extra)
    assert_same_init(pair)
    initial = tmp_path / "initial"
    pair.am.save_adapter(initial)
    randomize_adapters(pair.am)
    pair.pm.load_state_dict(pair.am.state_dict())
    check_eval(pair)
    check_fold(pair)  # Q(W) + s·BA, equal to PEFT's merge_and_unload
    check_loftq_checkpoints(pair, tmp_path)
    check_train(pair)
    with pytest.raises(CheckpointError, match="LoftQ adapter has no exact conversion"):
        pair.am.save_adapter(tmp_path / "converted", path_initial_model_for_weight_conversion=str(initial))


def test_init_on_a_transformer_matches_peft(peft_loftq_on_cpu: Any):
    pair = seeded_pair("llama", loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    assert_same_init(pair)
    randomize_adapters(pair.am)
    pair.pm.load_state_dict(pair.am.state_dict())
    check_eval(pair)


def check_loftq_checkpoints(pair: MethodPair, tmp_path: Path) -> None:
    """A LoftQ adapter saved by either library loads in the other, with the saver's outputs:
    - on a fresh copy of the original model: its config says 'loftq', so both quantise the base again on load;
    - on the dequantised base (the adapted model's base saved as a model): quantising a dequantised weight gives
      it back, so 'loftq' loads there too; and saved with init_lora_weights=True, as PEFT's LoftQ example saves
      it, it loads as a plain LoRA, without quantising."""
    case, am, pm = pair.case, pair.am, pair.pm
    ours, theirs = tmp_path / "peftc", tmp_path / "peft"
    am.save_adapter(ours)
    pm.save_pretrained(theirs)
    assert saved_shapes(ours) == saved_shapes(theirs)
    assert load_config(ours).loftq_config == load_config(theirs).loftq_config == pm.peft_config["default"].loftq_config
    dequantized = am.get_base_model().state_dict()

    def fresh(base: dict[str, torch.Tensor] | None) -> zoo.Case:
        model = zoo.FACTORIES[case.name]()
        if base is not None:
            model.model.load_state_dict(base)
        return model

    tol = {"atol": 1e-5, "rtol": 1e-5}
    with torch.no_grad():
        want_ours, want_theirs = case.call(am), case.call(pm)
        for base in (None, dequantized):
            model = fresh(base)
            assert_same_outputs(case.call(peft.PeftModel.from_pretrained(model.model, ours).eval()), want_ours, tol)
            model = fresh(base)
            loaded = peftc.load(model.model, theirs, example_inputs=example(model))
            assert_same_outputs(case.call(loaded), want_theirs, tol)
        # as PEFT's LoftQ example saves: the adapter with init_lora_weights=True, beside the dequantised base
        am.peft_config["default"].init_lora_weights = True
        pm.peft_config["default"].init_lora_weights = True
        try:
            am.save_adapter(tmp_path / "peftc_plain")
            pm.save_pretrained(tmp_path / "peft_plain")
        finally:
            am.peft_config["default"].init_lora_weights = "loftq"
            pm.peft_config["default"].init_lora_weights = "loftq"
        model = fresh(dequantized)
        assert_same_outputs(case.call(peft.PeftModel.from_pretrained(model.model, tmp_path / "peftc_plain").eval()),
                            want_ours, tol)
        model = fresh(dequantized)
        loaded = peftc.load(model.model, tmp_path / "peft_plain", example_inputs=example(model))
        assert_same_outputs(case.call(loaded), want_theirs, tol)


def test_with_dora_matches_peft(peft_loftq_on_cpu: Any):
    # PEFT sets DoRA's magnitude after LoftQ, from the dequantised base: m = ‖Q(W) + s·BA‖
    pair = seeded_pair("mlp", loftq_config={"loftq_bits": 4, "loftq_iter": 1}, use_dora=True)
    ours, theirs = pair.am.state_dict(), pair.pm.state_dict()
    assert any("lora_magnitude_vector" in key for key in ours) and set(ours) == set(theirs)
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-6, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")
    randomize_adapters(pair.am)
    pair.pm.load_state_dict(pair.am.state_dict())
    check_eval(pair)


def test_peft_s_loftq_config_class_is_accepted_and_saved_as_peft_saves_it():
    config = load_config({"peft_type": "LORA", "target_modules": ["q"], "init_lora_weights": "loftq",
                          "loftq_config": peft.LoftQConfig(loftq_bits=8)})
    assert config.loftq_config == {"loftq_bits": 8, "loftq_iter": 1}
    want = peft.LoraConfig(target_modules=["q"], init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_bits=8))
    assert config.to_dict()["loftq_config"] == want.to_dict()["loftq_config"]


def test_loftq_config_without_the_loftq_init_is_dropped_with_a_warning_as_peft_does():
    with pytest.warns(UserWarning, match="loftq_config is ignored"):
        config = load_config({"peft_type": "LORA", "target_modules": ["q"], "loftq_config": {"loftq_bits": 4}})
    assert config.loftq_config == {}


@pytest.mark.parametrize(("extra", "match"), [
    ({"init_lora_weights": "loftq"}, "init_lora_weights='loftq' needs loftq_config"),
    ({"loftq_config": {"loftq_bits": 2}}, r"loftq_config\['loftq_bits'\] must be 4 \(NF4\) or 8"),
    ({"loftq_config": {"loftq_iter": 0}}, r"loftq_config\['loftq_iter'\] must be a positive integer"),
    ({"loftq_config": {"loftq_rank": 2}}, r"loftq_config: unknown field\(s\) \['loftq_rank'\]"),
    ({"loftq_config": {}, "lora_bias": True}, "lora_bias=True needs init_lora_weights True or False"),
    ({"loftq_config": {}, "target_parameters": ["w"]}, "init_lora_weights='loftq' cannot be combined with "
                                                       "target_parameters"),
])
def test_bad_loftq_configs_are_errors_naming_the_field(extra: dict[str, Any], match: str):
    config = {"peft_type": "LORA", "target_modules": ["q"], "init_lora_weights": "loftq", **extra}
    if config.get("loftq_config") == {}:
        config["loftq_config"] = {"loftq_bits": 4}
    with pytest.raises(ConfigError, match=match):
        load_config(config)


@pytest.mark.parametrize(("name", "targets", "match"), [
    ("cnn", ["conv0"], r"'conv0' \(nn.Conv2d\)"),
    ("embedding_model", ["emb"], r"'emb' \(nn.Embedding\)"),
    ("gpt2", ["c_attn"], r"'transformer.h.0.attn.c_attn' \(transformers Conv1D\).*factors come out transposed"),
    ("mlp", ["lin0"], r"r=32 for module 'lin0'.*only"),
])
def test_layers_peft_s_loftq_cannot_init_are_errors_naming_the_layer(name: str, targets: list[str], match: str):
    case = zoo.FACTORIES[name]()
    config = {"peft_type": "LORA", "r": 32 if name == "mlp" else 2, "target_modules": targets,
              "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}
    with pytest.raises(ConfigError, match=match):
        peftc.apply(case.model, config, example_inputs=example(case))


def test_int8_on_a_weight_beyond_fp16_s_range_is_an_error_naming_the_layer():
    case = zoo.mlp()
    with torch.no_grad():
        case.model.lin1.weight[0, 0] = 1e5
    config = {"peft_type": "LORA", "r": 2, "target_modules": ["lin0", "lin1"], "init_lora_weights": "loftq",
              "loftq_config": {"loftq_bits": 8, "loftq_iter": 1}}
    with pytest.raises(ConfigError, match=r"loftq_bits'\]=8 for module 'lin1'.*beyond fp16's range"):
        peftc.apply(case.model, config, example_inputs=case.inputs)
    peftc.apply(case.model, {**config, "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}, example_inputs=case.inputs)


def test_a_tied_weight_is_an_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True)
    config = {"peft_type": "LORA", "r": 2, "target_modules": ["lm_head"], "init_lora_weights": "loftq",
              "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}
    with pytest.raises(ConfigError, match="'lm_head': its weight is tied.*LoftQ"):
        peftc.apply(LlamaForCausalLM(cfg).eval(), config)


@pytest.mark.parametrize(("name", "targets"), [("cnn", ["conv0"]), ("embedding_model", ["emb"]), ("gpt2", ["c_attn"])])
def test_peft_itself_fails_on_the_layers_peftc_refuses(peft_loftq_on_cpu: Any, name: str, targets: list[str]):
    # the evidence for the refusals above: PEFT's Embedding and Conv layers call loftq_init(adapter_name) without
    # the config its signature requires; on a Conv1D, stored (in, out), A comes out (r, out) and B (in, r)
    case = zoo.FACTORIES[name]()
    config = peft.LoraConfig(r=2, target_modules=targets, init_lora_weights="loftq",
                             loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    if name != "gpt2":
        with pytest.raises(TypeError, match="loftq_init.*config"):
            peft.get_peft_model(copy.deepcopy(case.model), config)
        return
    pm = peft.get_peft_model(case.model, config)
    c_attn = pm.base_model.model.transformer.h[0].attn.c_attn
    n_in, n_out = c_attn.base_layer.weight.shape
    assert c_attn.lora_A["default"].weight.shape == (2, n_out) and c_attn.lora_B["default"].weight.shape == (n_in, 2)
    with pytest.raises(RuntimeError, match="cannot be multiplied"), torch.no_grad():
        case.call(pm)
