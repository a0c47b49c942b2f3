"""ONNX decoders with a KV cache: each mode's decoder, decoded by `OnnxAdapterSession.generate` and by
onnxruntime-genai, against peftc's torch `generate` on the same weights (itself checked against PEFT in
tests/peftc/test_generation.py).

One folder per (model, mode), exported once and shared: the switch folders through `peftc export --task
text-generation` from a saved model and PEFT-format adapter folders, the others through `export_genai`.
An export costs ~10-15 s, so the file's time is mostly its six exports."""

from __future__ import annotations

import collections
import json
import os
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import onnxruntime_genai as og
import pytest
import torch
from peftc.backends.onnx import OnnxAdapterSession, save_onnx_adapter

import peftc
from peftc.cli import main
from tests import zoo
from tests.groups import grouped
from tests.oracle import randomize_adapters

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
MODES = ("merged", "switch", "inputs")
NEW = 8
PAD = 0
OPTIONS = {"optimize": False}
TOKENIZER_CONFIG = {"model_max_length": 64}  # a stand-in tokenizer file the export must copy


def lora(targets: list[str], alpha: int) -> dict[str, Any]:
    return {"peft_type": "LORA", "r": 4, "lora_alpha": alpha, "target_modules": targets}


class Decoders:
    """One zoo causal LM with random adapters "default" and "other" (on Llama of rank 2, below the inputs
    export's 4: its file is padded), saved (model and adapters) for the CLI, and its decoder folder per mode,
    exported on first use."""

    def __init__(self, name: str, root: str):
        case = getattr(zoo, name)()
        case.model.save_pretrained(os.path.join(root, "model"))
        with open(os.path.join(root, "model", "tokenizer_config.json"), "w") as f:
            json.dump(TOKENIZER_CONFIG, f)
        targets = [t for t in case.targets if t not in ("embed_tokens", "wte")]
        self.am = peftc.apply(case.model, lora(targets, 8), example_inputs=case.inputs)
        self.am.add_adapter("other", {**lora(targets, 16), "r": 2 if name == "llama" else 4})  # Llama: two ranks
        self.am.set_adapter(["default", "other"])
        randomize_adapters(self.am, seed=2)
        self.am.set_adapter("default")
        self.am.save_pretrained(os.path.join(root, "adapters"))  # "other" in a subfolder, as PEFT does
        self.root = root
        self._folders: dict[str, str] = {}

    def folder(self, mode: str) -> str:
        if mode not in self._folders:
            out = os.path.join(self.root, mode)
            if mode == "switch":
                adapters = os.path.join(self.root, "adapters")
                code = main(["export", os.path.join(self.root, "model"), "--adapter", f"default={adapters}",
                             "--adapter", f"other={adapters}/other", "--task", "text-generation", "--mode", "switch",
                             "-o", out])
                assert code == 0
            else:
                peftc.export_genai(self.am, out, mode=mode, **OPTIONS)
            self._folders[mode] = out
        return self._folders[mode]

    def session(self, mode: str) -> OnnxAdapterSession:
        return OnnxAdapterSession(os.path.join(self.folder(mode), "decoder.onnx"), providers=["CPUExecutionProvider"])

    def torch_generate(self, inputs: dict[str, torch.Tensor], adapter: str | None = None, **options: Any) -> np.ndarray:
        """peftc's torch generation: `adapter` active (None: per-sample `adapter_names` in options)."""
        options = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": PAD, "eos_token_id": None, **options}
        if adapter is not None:
            self.am.set_adapter(adapter)
        try:
            return self.am.generate(**inputs, **options).numpy()
        finally:
            self.am.set_adapter("default")


@pytest.fixture(scope="module")
def decoders(tmp_path_factory: pytest.TempPathFactory):
    built: dict[str, Decoders] = {}

    def get(name: str) -> Decoders:
        if name not in built:
            built[name] = Decoders(name, str(tmp_path_factory.mktemp(name)))
        return built[name]

    return get


def prompts(batch: int = 3, seq: int = 6, pad: int = 2) -> dict[str, torch.Tensor]:
    """Row 0 left-padded by `pad`; batch and length unlike the export's example (2, 3, past 5)."""
    ids = torch.randint(1, zoo.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    ids[0, :pad] = PAD
    return {"input_ids": ids, "attention_mask": mask}


def ort_generate(session: OnnxAdapterSession, inputs: dict[str, torch.Tensor], **options: Any) -> np.ndarray:
    options = {"pad_token_id": PAD, **options}
    return session.generate(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=NEW, **options)


def assert_tokens(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and np.array_equal(got, want), f"\n{got}\n{want}"


@pytest.mark.parametrize("name", grouped("onnx-decoder", ["llama", "gpt2"]))  # shares `decoders`
@pytest.mark.parametrize("mode", MODES)
def test_ort_greedy_equals_torch(decoders, name: str, mode: str) -> None:
    dec = decoders(name)
    session = dec.session(mode)
    layers = len(session.cache)
    assert session.input_names == ["attention_mask", "input_ids", *[f"past_key_values.{i}.key" for i in range(layers)],
                                   *[f"past_key_values.{i}.value" for i in range(layers)], "position_ids"]
    assert session.output_names == ["logits", *[f"present.{i}.key" for i in range(layers)],
                                    *[f"present.{i}.value" for i in range(layers)]]
    if mode == "inputs":
        session.load_adapter(os.path.join(dec.folder(mode), "other.onnx_adapter"), "other")
    # a left-padded batch of 3, then a batch of one without padding: the same graph; then with an end token
    # that some rows produce (Llama's 2 after the merged adapter), those rows continue with the pad
    for inputs, names, stop in ((prompts(), ["other", "__base__", "default"], {}),
                                (prompts(batch=1, seq=4, pad=0), ["other"], {}),
                                (prompts(batch=2, pad=0), ["default", "default"], {"eos_token_id": 2})):
        if mode == "merged":
            got, want = ort_generate(session, inputs, **stop), dec.torch_generate(inputs, "default", **stop)
        elif mode == "switch":
            got = ort_generate(session, inputs, adapter_names=names, **stop)
            want = dec.torch_generate(inputs, adapter_names=names, **stop)
        else:
            got = ort_generate(session, inputs, adapter_names="other", **stop)
            want = dec.torch_generate(inputs, "other", **stop)
        assert_tokens(got, want)


@pytest.mark.xdist_group("onnx-decoder-llama")
def test_ort_greedy_with_a_logits_processor_equals_torch(decoders) -> None:
    """A processor reads the tokens so far (here the left-padded batch's, a view of the loop's buffer) and the
    step's scores, as in transformers' generate; it changes this model's greedy tokens."""
    from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor

    dec = decoders("llama")
    session, inputs = dec.session("switch"), prompts()
    names = ["other", "default", "__base__"]
    processors = LogitsProcessorList([NoRepeatNGramLogitsProcessor(2)])
    got = ort_generate(session, inputs, adapter_names=names, logits_processor=processors)
    assert_tokens(got, dec.torch_generate(inputs, adapter_names=names, logits_processor=processors))
    assert not np.array_equal(got, ort_generate(session, inputs, adapter_names=names))


@pytest.mark.xdist_group("onnx-decoder-llama")
def test_ort_sampling_equals_torch_under_one_seed(decoders) -> None:
    """Sampling uses transformers' warpers and torch's global generator as transformers does: same seed, same
    tokens (the logits agree to ~1e-6, far below any sampling threshold here)."""
    dec = decoders("llama")
    session, inputs = dec.session("switch"), prompts()
    names = ["other", "default", "__base__"]
    options = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9}
    torch.manual_seed(11)
    got = ort_generate(session, inputs, adapter_names=names, **options)
    torch.manual_seed(11)
    want = dec.torch_generate(inputs, adapter_names=names, **options)
    assert_tokens(got, want)
    torch.manual_seed(12)
    assert not np.array_equal(ort_generate(session, inputs, adapter_names=names, **options), got)


def genai_generate(folder: str, ids: torch.Tensor, adapter: tuple[Any, str] | None = None,
                   adapter_index: list[int] | None = None) -> np.ndarray:
    """onnxruntime-genai's greedy search from the folder, token ids fed directly (no padding)."""
    model = og.Model(folder) if isinstance(folder, str) else folder
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + NEW, do_sample=False, batch_size=ids.shape[0])
    generator = og.Generator(model, params)
    if adapter is not None:
        generator.set_active_adapter(*adapter)
    if adapter_index is not None:  # the switch graph's extra input, for every step
        generator.set_model_input("adapter_index", np.array(adapter_index, dtype=np.int64))
    generator.append_tokens(ids.numpy().astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return np.stack([generator.get_sequence(i) for i in range(ids.shape[0])]).astype(np.int64)


@pytest.mark.parametrize("name", grouped("onnx-decoder", ["llama", "gpt2"]))  # shares `decoders`
@pytest.mark.parametrize("mode", MODES)
def test_genai_greedy_equals_torch(decoders, name: str, mode: str) -> None:
    dec = decoders(name)
    folder = dec.folder(mode)
    config = json.load(open(os.path.join(folder, "genai_config.json")))
    assert config["model"]["decoder"]["num_hidden_layers"] == 2
    inputs = prompts(batch=2, pad=0)  # genai takes trailing pads only: no left padding
    ids = inputs["input_ids"]
    stop = {"eos_token_id": config["model"]["eos_token_id"], "pad_token_id": config["model"]["pad_token_id"]}
    if mode == "merged":
        assert_tokens(genai_generate(folder, ids), dec.torch_generate(inputs, "default", **stop))
    elif mode == "switch":
        want = dec.torch_generate(inputs, adapter_names=["other", "__base__"], **stop)
        assert_tokens(genai_generate(folder, ids, adapter_index=[1, -1]), want)
    else:  # og.Adapters switches peftc's adapter files per generator
        model = og.Model(folder)
        adapters = og.Adapters(model)
        for adapter in ("default", "other"):
            adapters.load(os.path.join(folder, f"{adapter}.onnx_adapter"), adapter)
        for adapter in ("other", "default"):
            want = dec.torch_generate(inputs, adapter, **stop)
            assert_tokens(genai_generate(model, ids, adapter=(adapters, adapter)), want)
        # no active adapter: the inputs' initializers, the exported ("default") adapter
        assert_tokens(genai_generate(model, ids), want)


@pytest.mark.xdist_group("onnx-decoder-gpt2")
def test_cli_writes_the_genai_folder(decoders, capsys) -> None:
    dec = decoders("gpt2")
    folder = dec.folder("switch")
    assert sorted(os.listdir(folder)) == ["decoder.onnx", "genai_config.json", "tokenizer_config.json"]  # no adapters
    assert json.load(open(os.path.join(folder, "tokenizer_config.json"))) == TOKENIZER_CONFIG
    assert OnnxAdapterSession(os.path.join(folder, "decoder.onnx")).adapter_names == ["default", "other"]
    capsys.readouterr()
    again = ["export", os.path.join(dec.root, "model"), "--adapter", os.path.join(dec.root, "adapters"),
             "--task", "text-generation", "-o", folder]
    assert main(again) == 2  # an earlier export is not replaced without --overwrite
    assert f"{folder}/decoder.onnx and {folder}/genai_config.json already exist" in capsys.readouterr().err
    elsewhere = os.path.join(dec.root, "never")
    assert main([*again[:-1], elsewhere, "--ort-fusions", "tpu"]) == 2
    assert "ort_fusions='tpu': choose auto, none or one of cpu, cuda" in capsys.readouterr().err
    assert not os.path.exists(elsewhere)


def _ops(path: str) -> tuple[collections.Counter, dict[str, Any]]:
    """(op type -> count, with ONNX Runtime's as "com.microsoft.<op>"; peftc's metadata) of an exported decoder."""
    model = onnx.load(path, load_external_data=False)
    ops = collections.Counter(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in model.graph.node)
    return ops, json.loads({p.key: p.value for p in model.metadata_props}["peftc"])


@pytest.mark.xdist_group("onnx-decoder-llama")
def test_decoders_fused_for_onnxruntime_by_default(decoders, tmp_path) -> None:
    """By default a decoder is fused into ONNX Runtime's operators (transformers' fusions): each RMS norm with its
    residual add, q/k/v and gate/up packed into one MatMul each, the rotary embeddings where torch.onnx's optimizer
    ran (its default); ort_fusions=None keeps standard ONNX operators. Every one generates as torch does."""
    llama = decoders("llama")
    layers = llama.am.parameter_tree.source.config.num_hidden_layers
    inputs = prompts()
    want = llama.torch_generate(inputs, "default")
    plain = peftc.export_onnx_decoder(llama.am, tmp_path / "plain.onnx", adapter_names=["default"], ort_fusions=None,
                                      **OPTIONS)
    optimized = peftc.export_onnx_decoder(llama.am, tmp_path / "optimized.onnx", adapter_names=["default"])
    fused, fused_meta = _ops(os.path.join(llama.folder("merged"), "decoder.onnx"))
    unfused, plain_meta = _ops(plain)
    assert fused_meta["ort_fusions"] == "cpu" and "ort_fusions" not in plain_meta
    assert fused["com.microsoft.SkipSimplifiedLayerNormalization"] == 2 * layers
    assert not [op for op in unfused if op.startswith("com.microsoft")]
    # 7 projections per layer, q/k/v and gate/up packed: 4 MatMuls (the attention's own and the LM head besides)
    assert unfused["MatMul"] - fused["MatMul"] == 3 * layers and fused["Split"] - unfused["Split"] == 2 * layers
    assert _ops(optimized)[0]["com.microsoft.RotaryEmbedding"] == 2 * layers  # query and key
    assert fused["IsNaN"] == unfused["IsNaN"] == 0  # torch.onnx's guards after the masked softmaxes, dropped
    for path in (plain, optimized):
        session = OnnxAdapterSession(path, providers=["CPUExecutionProvider"])
        assert_tokens(ort_generate(session, inputs), want)
    with pytest.raises(peftc.ConfigError, match="ort_fusions='tpu'"):
        peftc.export_genai(llama.am, tmp_path / "never", ort_fusions="tpu")
    assert not (tmp_path / "never").exists()


@pytest.mark.xdist_group("onnx-decoder-llama")
def test_decoder_fused_for_cuda_generates_as_torch(decoders, tmp_path) -> None:
    """ort_fusions="cuda" fuses the attention too (ONNX Runtime's MultiHeadAttention, which its CPU provider also
    runs): a switch decoder fused so generates torch's tokens for a left-padded batch on three adapter choices."""
    llama = decoders("llama")
    layers = llama.am.parameter_tree.source.config.num_hidden_layers
    path = peftc.export_onnx_decoder(llama.am, tmp_path / "cuda.onnx", mode="switch", ort_fusions="cuda", **OPTIONS)
    ops, meta = _ops(path)
    assert meta["ort_fusions"] == "cuda" and ops["com.microsoft.MultiHeadAttention"] == layers
    assert "Softmax" not in ops
    inputs, names = prompts(), ["other", "__base__", "default"]
    session = OnnxAdapterSession(path, providers=["CPUExecutionProvider"])
    assert_tokens(ort_generate(session, inputs, adapter_names=names),
                  llama.torch_generate(inputs, adapter_names=names))


@pytest.mark.xdist_group("onnx-decoder-llama")
def test_adapter_saved_after_export_runs_without_reexport(decoders, tmp_path) -> None:
    """A new adapter trained after the export, saved as a file, runs in the inputs-mode decoder: in peftc's
    session and in onnxruntime-genai."""
    dec = decoders("llama")
    folder = dec.folder("inputs")
    targets = [t for t in zoo.llama().targets if t != "embed_tokens"]
    dec.am.add_adapter("late", lora(targets, 6))
    inputs, plain = prompts(), prompts(batch=2, pad=0)
    try:
        dec.am.set_adapter("late")
        randomize_adapters(dec.am, seed=7)
        path = save_onnx_adapter(dec.am, tmp_path / "late.onnx_adapter")
        want, want_plain = dec.torch_generate(inputs, "late"), dec.torch_generate(plain, "late")
    finally:
        dec.am.set_adapter("default")
        dec.am.delete_adapter("late")
    assert not np.array_equal(want, dec.torch_generate(inputs, "default"))
    session = dec.session("inputs")
    session.load_adapter(path, "late")
    assert_tokens(ort_generate(session, inputs, adapter_names="late"), want)
    model = og.Model(folder)
    adapters = og.Adapters(model)
    adapters.load(str(path), "late")
    assert_tokens(genai_generate(model, plain["input_ids"], adapter=(adapters, "late")), want_plain)


@pytest.mark.xdist_group("onnx-decoder-llama")
def test_lower_rank_file_padded_for_genai(decoders, tmp_path) -> None:
    """genai takes adapter files at the exported shapes only (a rank-2 file in a rank-4 export fails with
    "Got invalid dimensions for input ... Got: 2 Expected: 4"): the session pads on load and writes the
    padded file, which genai then runs as the session does."""
    dec = decoders("llama")
    folder = dec.folder("inputs")
    stored = ort.AdapterFormat.read_adapter(os.path.join(folder, "other.onnx_adapter"))
    rank2 = {k: np.ascontiguousarray(v.numpy()[:2] if k.endswith("lora_A.weight") else
                                     v.numpy()[:, :2] if k.endswith("lora_B.weight") else v.numpy())
             for k, v in stored.get_parameters().items()}
    session = dec.session("inputs")
    session.load_adapter(write_ort_adapter(tmp_path / "r2.onnx_adapter", rank2), "r2")
    padded = session.save_adapter("r2", tmp_path / "r2_padded.onnx_adapter")
    model = og.Model(folder)
    adapters = og.Adapters(model)
    adapters.load(padded, "r2")
    ids = prompts(batch=2, pad=0)["input_ids"]
    config = json.load(open(os.path.join(folder, "genai_config.json")))["model"]
    want = session.generate(ids, max_new_tokens=NEW, adapter_names="r2", eos_token_id=config["eos_token_id"],
                            pad_token_id=config["pad_token_id"])
    assert_tokens(genai_generate(model, ids, adapter=(adapters, "r2")), want)
    assert not np.array_equal(want, genai_generate(model, ids))  # not the exported adapter


def write_ort_adapter(path: Any, tensors: dict[str, np.ndarray]) -> str:
    writer = ort.AdapterFormat()
    writer.set_adapter_version(1)
    writer.set_model_version(1)
    writer.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    writer.export_adapter(str(path))
    return str(path)


@pytest.mark.xdist_group("onnx-decoder-llama")
def test_bad_input(decoders, tmp_path, monkeypatch) -> None:
    dec = decoders("llama")
    folder = dec.folder("inputs")
    session = dec.session("inputs")
    stored = ort.AdapterFormat.read_adapter(os.path.join(folder, "other.onnx_adapter"))
    good = {k: np.array(v.numpy()) for k, v in stored.get_parameters().items()}
    key = next(k for k in sorted(good) if k.endswith("lora_A.weight"))
    r, width = good[key].shape
    wide = write_ort_adapter(tmp_path / "r8.onnx_adapter", {**good, key: np.zeros((r + 4, width), np.float32)})
    with pytest.raises(peftc.CheckpointError, match=rf"r8.onnx_adapter: {key}: shape \[{r + 4}, {width}\] does not fit "
                       rf"the exported \[{r}, {width}\]"):
        session.load_adapter(wide, "r8")
    renamed = write_ort_adapter(tmp_path / "renamed.onnx_adapter",
                                {k.replace("lora_A", "lora_X") if k == key else k: v for k, v in good.items()})
    with pytest.raises(peftc.CheckpointError, match=rf"renamed.onnx_adapter: not an adapter for this model: "
                       rf"missing \['{key}'\], unexpected \['{key.replace('lora_A', 'lora_X')}'\]"):
        session.load_adapter(renamed, "renamed")
    assert session.adapter_names == []
    with pytest.raises(peftc.ConfigError, match="pass pad_token_id with eos_token_id"):
        dec.session("switch").generate(prompts()["input_ids"], adapter_names=["default"] * 3, eos_token_id=5)
    with pytest.raises(peftc.ConfigError, match="max_new_tokens must be greater than 0, got 0"):
        dec.session("switch").generate(prompts()["input_ids"], max_new_tokens=0)
    # a method that cannot be merged: merged mode names the adapter and method before exporting anything
    method = next(ma for mas in dec.am.targeted_modules.values() for ma in mas).method
    monkeypatch.setattr(method, "mergeable", False)
    with pytest.raises(peftc.ConfigError, match=r"adapter 'default' \(LORA\) cannot be merged"):
        peftc.export_onnx_decoder(dec.am, tmp_path / "never.onnx", mode="merged")
    assert not (tmp_path / "never.onnx").exists()


def test_decoder_logits_last_by_default_all_on_request(decoders, tmp_path) -> None:
    """The default export computes each row's last logits only (the LM head skips the prompt's other
    positions); logits="all" keeps every position, whose last row is the same."""
    llama = decoders("llama")
    inputs = prompts()
    batch, seq = inputs["input_ids"].shape
    everything = OnnxAdapterSession(peftc.export_onnx_decoder(llama.am, tmp_path / "all.onnx", logits="all",
                                                              **OPTIONS), providers=["CPUExecutionProvider"])
    last = llama.session("merged")
    feeds = {**inputs, "position_ids": (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)}
    for name, (heads, dim) in enumerate(last.cache):
        for past in ("past_key_values.%d.key", "past_key_values.%d.value"):
            feeds[past % name] = np.zeros((batch, heads, 0, dim), np.float32)
    got, want = last.run(feeds)["logits"], everything.run(feeds)["logits"]
    assert got.shape == (batch, 1, zoo.VOCAB) and want.shape == (batch, seq, zoo.VOCAB)
    np.testing.assert_allclose(got[:, 0], want[:, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(peftc.errors.ConfigError, match="logits='some'"):
        peftc.export_onnx_decoder(llama.am, tmp_path / "x.onnx", logits="some")
