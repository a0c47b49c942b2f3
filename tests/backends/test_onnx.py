"""ONNX export, run in onnxruntime (CPUExecutionProvider) against eager peftc on the same weights:
merged (no adapter nodes), switch (standard ops only, a mixed batch per sample) and inputs (an
adapter loaded from a file without re-export), each at a batch and sequence length other than
the export's example. Each file is exported once and shared by the tests of its model.

An export costs ~10-20 s, so each mode runs on the Llama-like model and on one other architecture, not on
all: merged on BERT (and MiniLM in tests/test_examples.py), switch on MiniLM (a real pretrained BERT; and
GPT-2 against PEFT in tests/backends/test_export_cli.py), inputs on GPT-2 (Conv1D's transposed weights)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from peftc.backends.onnx import OnnxAdapterSession, export_onnx, save_onnx_adapter
from safetensors.torch import load_file, save_file

import peftc
from peftc.graph import adapter_nodes
from tests import zoo
from tests.groups import grouped
from tests.oracle import randomize_adapters, tensors

TOL = {"atol": 1e-4, "rtol": 1e-4}
ORT_FORMAT = hasattr(ort, "AdapterFormat")  # ONNX Runtime's own adapter file format (ORT >= 1.20)
STANDARD_DOMAINS = {"", "ai.onnx"}
EXPORT_OPTIONS = {"optimize": False}


def lora(targets: list[str], alpha: int) -> dict[str, Any]:
    return {"peft_type": "LORA", "r": 4, "lora_alpha": alpha, "target_modules": targets}


class Exported:
    """One zoo model with two random adapters, exported in the modes its tests ask for, plus adapter files of
    "other"."""

    def __init__(self, name: str, folder: str):
        case = getattr(zoo, name)()
        self.case = case
        self.am = peftc.apply(case.model, lora(case.targets, 8), example_inputs=case.inputs)
        self.am.add_adapter("other", lora(case.targets, 16))
        self.am.set_adapter(["default", "other"])
        randomize_adapters(self.am, seed=2)
        self.am.set_adapter("default")
        self.adapter_files = {"safetensors": save_onnx_adapter(self.am, os.path.join(folder, "o.safetensors"), "other")}
        if ORT_FORMAT:
            self.adapter_files["ort"] = save_onnx_adapter(self.am, os.path.join(folder, "o.onnx_adapter"), "other")
        self.folder = folder
        self._files: dict[str, str] = {}

    def file(self, mode: str) -> str:
        """The model exported in `mode`, once (each test asks only for the modes it checks, so that
        pytest-xdist workers export only what their tests need)."""
        if mode not in self._files:
            self._files[mode] = export_onnx(self.am, os.path.join(self.folder, f"{mode}.onnx"), mode=mode,
                                            example_inputs=self.case.inputs, **EXPORT_OPTIONS)
        return self._files[mode]

    def inputs(self) -> dict[str, torch.Tensor]:
        """Batch 4, sequence 7: neither is the export example's size."""
        ids = torch.randint(1, zoo.VOCAB, (4, 7), generator=torch.Generator().manual_seed(5))
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0  # a padded row
        return {k: {"input_ids": ids, "attention_mask": mask}[k] for k in self.case.inputs}

    def eager(self, inputs: dict[str, torch.Tensor], adapter: str | None = None, **kwargs: Any) -> dict:
        """Eager outputs with `adapter` active (None: the base model alone)."""
        with torch.no_grad():
            if adapter is None:
                with self.am.disable_adapter():
                    return tensors(self.am(**inputs, **kwargs))
            self.am.set_adapter(adapter)
            try:
                return tensors(self.am(**inputs, **kwargs))
            finally:
                self.am.set_adapter("default")


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory):
    built: dict[str, Exported] = {}

    def get(name: str) -> Exported:
        if name not in built:
            built[name] = Exported(name, str(tmp_path_factory.mktemp(name)))
        return built[name]

    return get


def assert_matches(got: dict[str, np.ndarray], want: dict[str, torch.Tensor], rows: Any = slice(None)) -> None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    for key, value in want.items():
        torch.testing.assert_close(torch.from_numpy(got[key])[rows], value[rows], **TOL,
                                   msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("name", grouped("onnx", ["llama", "bert"]))  # shares `exports`
def test_merged(exports, name: str) -> None:
    ex = exports(name)
    model = onnx.load(ex.file("merged"))
    assert {n.domain for n in model.graph.node} <= STANDARD_DOMAINS and not model.functions
    names = [t.name for t in model.graph.initializer] + [i.name for i in model.graph.input]
    assert not [n for n in names if "lora" in n], "adapter tensors left in the merged graph"
    assert sorted(i.name for i in model.graph.input) == sorted(ex.case.inputs)
    assert not adapter_nodes(ex.am.fold().graph_for(**ex.case.inputs).gm.graph)  # the graph it exported
    session = OnnxAdapterSession(ex.file("merged"), providers=["CPUExecutionProvider"])
    inputs = ex.inputs()
    assert_matches(session.run(inputs), ex.eager(inputs, "default"))


@pytest.mark.parametrize("name", grouped("onnx", ["llama", "minilm"]))  # shares `exports`
def test_switch_mixed_batch(exports, name: str) -> None:
    ex = exports(name)
    model = onnx.load(ex.file("switch"))
    assert {n.domain for n in model.graph.node} <= STANDARD_DOMAINS
    assert not model.functions, [f.name for f in model.functions]
    assert "Gather" in {n.op_type for n in model.graph.node}
    session = OnnxAdapterSession(ex.file("switch"), providers=["CPUExecutionProvider"])
    assert session.adapter_names == ["default", "other"]
    inputs = ex.inputs()
    per_sample = ["other", "__base__", "default", "other"]
    got = session.run(inputs, adapter_names=per_sample)
    assert_matches(got, ex.eager(inputs, adapter_names=per_sample))
    for adapter in ("default", "other", None):  # each row equals its adapter (or the base) run alone
        rows = [i for i, n in enumerate(per_sample) if n == (adapter or "__base__")]
        assert_matches(got, ex.eager(inputs, adapter), rows=rows)
    assert_matches(session.run(inputs, adapter_index=np.array([-1, 1, 1, 0])),
                   ex.eager(inputs, adapter_names=["__base__", "other", "other", "default"]))
    # the gathers by adapter_index run once per choice, in a prologue session (backends/onnx_prologue.py)
    assert "adapter_index" not in {i.name for i in session.session.get_inputs()}
    assert_matches(session.run(inputs, adapter_names="other"), ex.eager(inputs, "other"))  # one adapter for all


@pytest.mark.xdist_group("onnx-llama")
def test_model_with_external_data_runs_uncut(exports, tmp_path) -> None:
    ex = exports("llama")
    onnx.save(onnx.load(ex.file("switch")), tmp_path / "external.onnx", save_as_external_data=True, size_threshold=0)
    session = OnnxAdapterSession(tmp_path / "external.onnx", providers=["CPUExecutionProvider"])
    assert "adapter_index" in {i.name for i in session.session.get_inputs()}
    inputs, per_sample = ex.inputs(), ["other", "__base__", "default", "other"]
    assert_matches(session.run(inputs, adapter_names=per_sample), ex.eager(inputs, adapter_names=per_sample))


@pytest.mark.parametrize("name", grouped("onnx", ["llama", "gpt2"]))  # shares `exports`
def test_inputs_mode_loads_adapter_files(exports, name: str) -> None:
    ex = exports(name)
    model = onnx.load(ex.file("inputs"))
    assert {n.domain for n in model.graph.node} <= STANDARD_DOMAINS and not model.functions
    session = OnnxAdapterSession(ex.file("inputs"), providers=["CPUExecutionProvider"])
    assert session.adapter_names == []
    inputs = ex.inputs()
    want = ex.eager(inputs, "other")
    for fmt, path in ex.adapter_files.items():
        session.load_adapter(path, f"other_{fmt}")
        assert_matches(session.run(inputs, adapter_names=f"other_{fmt}"), want)
    assert set(session.adapter_names) == {f"other_{fmt}" for fmt in ex.adapter_files}


@pytest.mark.xdist_group("onnx-llama")
def test_lower_rank_adapter_file_is_padded(exports, tmp_path) -> None:
    ex = exports("llama")
    ex.am.add_adapter("small", {"peft_type": "LORA", "r": 2, "lora_alpha": 6, "target_modules": ex.case.targets})
    try:
        ex.am.set_adapter("small")
        randomize_adapters(ex.am, seed=3)
        path = save_onnx_adapter(ex.am, tmp_path / "r2.safetensors")
        inputs = ex.inputs()
        want = ex.eager(inputs, "small")
    finally:
        ex.am.set_adapter("default")
        ex.am.delete_adapter("small")
    session = OnnxAdapterSession(ex.file("inputs"), providers=["CPUExecutionProvider"])
    session.load_adapter(path, "r2")
    assert_matches(session.run(inputs, adapter_names="r2"), want)


@pytest.mark.xdist_group("onnx-llama")
def test_bad_input(exports, tmp_path) -> None:
    ex = exports("llama")
    inputs = ex.inputs()
    switch = OnnxAdapterSession(ex.file("switch"), providers=["CPUExecutionProvider"])
    with pytest.raises(peftc.ConfigError, match=r"unknown adapter\(s\) \['nope'\]"):
        switch.run(inputs, adapter_names=["default", "nope", "other", "other"])
    with pytest.raises(peftc.ConfigError, match="3 entries for a batch of 4"):
        switch.run(inputs, adapter_names=["default", "other", "other"])
    with pytest.raises(peftc.ConfigError, match=r"in \[-1, 1\].*got \[0, 2, 1, -1\]"):
        switch.run(inputs, adapter_index=np.array([0, 2, 1, -1]))
    with pytest.raises(peftc.ConfigError, match="mode='switch'"):
        switch.load_adapter(ex.adapter_files["safetensors"], "x")
    with pytest.raises(peftc.ConfigError, match="missing"):
        switch.run({})
    runs = switch.bound_runs(["default", "other", "other", "default"], batch=4)  # a loop's choice, bound once
    with pytest.raises(peftc.ConfigError, match="given to bound_runs"):
        switch.run_values(inputs, adapter_names="other", runs=runs)
    got, want = switch.run_values(inputs, runs=runs), switch.run(inputs, adapter_names=["default", "other", "other",
                                                                                        "default"])
    for key, value in want.items():
        np.testing.assert_array_equal(got[key].numpy(), value)

    merged = OnnxAdapterSession(ex.file("merged"), providers=["CPUExecutionProvider"])
    with pytest.raises(peftc.ConfigError, match="merged into its weights"):
        merged.run(inputs, adapter_names="default")

    session = OnnxAdapterSession(ex.file("inputs"), providers=["CPUExecutionProvider"])
    with pytest.raises(peftc.ConfigError, match="pass adapter_names"):
        session.run(inputs)
    tensors_ = load_file(ex.adapter_files["safetensors"])
    key = next(k for k in tensors_ if k.endswith("lora_A.weight"))
    r, width = tensors_[key].shape
    save_file(dict(tensors_, **{key: torch.zeros(r + 3, width)}), tmp_path / "wrong.safetensors")
    with pytest.raises(peftc.CheckpointError,
                       match=rf"wrong.safetensors: {key}: shape \[{r + 3}, {width}\] does not fit the exported"):
        session.load_adapter(tmp_path / "wrong.safetensors", "wrong")
    save_file({k: v for k, v in tensors_.items() if k != key}, tmp_path / "short.safetensors")
    with pytest.raises(peftc.CheckpointError, match="missing"):
        session.load_adapter(tmp_path / "short.safetensors", "short")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(peftc.CheckpointError, match="cannot read"):
        session.load_adapter(tmp_path / "junk.safetensors", "junk")
    with pytest.raises(peftc.CheckpointError, match="no such adapter file"):
        session.load_adapter(tmp_path / "absent.safetensors", "absent")
    assert session.adapter_names == []  # nothing half-loaded

    with pytest.raises(peftc.ConfigError, match="choose one of merged, switch, inputs"):
        export_onnx(ex.am, tmp_path / "x.onnx", mode="fused")
    with pytest.raises(peftc.CheckpointError, match="not exported by peftc"):
        plain = onnx.load(ex.file("merged"))
        del plain.metadata_props[:]
        onnx.save(plain, tmp_path / "plain.onnx")
        OnnxAdapterSession(tmp_path / "plain.onnx")


@pytest.mark.xdist_group("onnx-boft")
def test_switch_holds_what_the_adapters_compute_alone(tmp_path) -> None:
    """BOFT builds its rotations by solving a linear system (its Cayley transform), which no standard ONNX operator
    does: a switch export holds the rotations, computed in torch, and serves a mixed batch; an inputs export, which
    would compute them from its inputs, names the op and writes nothing."""
    case = zoo.llama()
    spec = {"peft_type": "BOFT", "boft_block_size": 4, "target_modules": ["q_proj", "v_proj"]}
    am = peftc.apply(case.model, spec, example_inputs=case.inputs)
    am.add_adapter("other", spec)
    am.set_adapter(["default", "other"])
    randomize_adapters(am, seed=2)  # rotations other than the identity
    am.set_adapter("default")
    path = export_onnx(am, tmp_path / "s.onnx", mode="switch", example_inputs=case.inputs, **EXPORT_OPTIONS)
    session = OnnxAdapterSession(path, providers=["CPUExecutionProvider"])
    ids = torch.randint(1, zoo.VOCAB, (3, 7), generator=torch.Generator().manual_seed(5))
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        want = am(input_ids=ids, adapter_names=names).logits
        assert not torch.allclose(want[0], am(input_ids=ids[:1], adapter_names=["default"]).logits[0], **TOL)
    torch.testing.assert_close(torch.from_numpy(session.run({"input_ids": ids}, adapter_names=names)["logits"]),
                               want, **TOL)
    with pytest.raises(peftc.ConfigError, match=r"mode='inputs': ONNX has no operator for aten\._linalg_solve_ex, "
                       r"which this graph computes from the adapter tensors it takes as inputs"):
        export_onnx(am, tmp_path / "i.onnx", mode="inputs", example_inputs=case.inputs, **EXPORT_OPTIONS)
    assert not (tmp_path / "i.onnx").exists()
