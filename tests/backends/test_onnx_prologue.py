"""The cut of an ONNX model at its fixed inputs (backends/onnx_prologue.py), on a hand-built switch-mode
LoRA site: y = x W + (x Aᵀ[i]) Bᵀ[i], the stacks transposed from initializers and gathered by
`adapter_index + 1` as the export writes them. Exported decoders are cut in test_onnx.py and
test_onnx_decoder.py, whose tokens and outputs are checked against torch."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from peftc.backends.onnx_prologue import BoundRuns, FixedInputPrologue, ort_values, run_ort, split_fixed_inputs

SLOTS, IN, R, OUT = 3, 4, 2, 5  # slot 0: the zero adapter of base-only samples


def site_model(row_reader: str = "MatMul") -> Any:
    """One LoRA site in switch mode. `row_reader="Mul"`: B's rows scale the output elementwise instead."""
    rng = np.random.default_rng(0)
    stack_b_shape = (SLOTS, R, OUT) if row_reader == "MatMul" else (SLOTS, 1, OUT)
    initializers = [
        numpy_helper.from_array(rng.standard_normal((IN, OUT)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((SLOTS, R, IN)).astype(np.float32), "A_stack"),
        numpy_helper.from_array(rng.standard_normal(stack_b_shape).astype(np.float32), "B_stack"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
    ]
    nodes = [
        helper.make_node("Add", ["adapter_index", "one"], ["slot"]),
        helper.make_node("Transpose", ["A_stack"], ["A_t"], perm=[0, 2, 1]),
        helper.make_node("Gather", ["A_t", "slot"], ["A_rows"], axis=0),
        helper.make_node("Gather", ["B_stack", "slot"], ["B_rows"], axis=0),
        helper.make_node("MatMul", ["x", "W"], ["y"]),
        helper.make_node("MatMul", ["x", "A_rows"], ["xa"]),
        helper.make_node(row_reader, ["xa", "B_rows"] if row_reader == "MatMul" else ["y", "B_rows"], ["h"]),
        helper.make_node("Add", ["y", "h"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "site",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", IN]),
         helper.make_tensor_value_info("adapter_index", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def session(model: Any) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


class BoundRun:
    """A CPU session seen through IO binding, recording the device each output is bound to."""

    def __init__(self, inner: ort.InferenceSession):
        self.inner, self.inputs, self.bound, self.outputs = inner, {}, {}, []

    def io_binding(self) -> BoundRun:
        self.inputs, self.bound = {}, {}
        return self

    def clear_binding_inputs(self) -> None:
        self.inputs = {}

    def clear_binding_outputs(self) -> None:
        self.bound = {}

    def bind_ortvalue_input(self, name: str, value: Any) -> None:
        self.inputs[name] = value

    def bind_output(self, name: str, device: str) -> None:
        self.bound[name] = device

    def run_with_iobinding(self, binding: BoundRun) -> None:
        self.outputs = self.inner.run_with_ort_values(list(self.bound), self.inputs)

    def get_outputs(self) -> list[Any]:
        return self.outputs


class Recording(BoundRun):
    """A prologue session that records the fixed inputs of each run."""

    def __init__(self, inner: ort.InferenceSession):
        super().__init__(inner)
        self.runs = []

    def get_inputs(self) -> Any:
        return self.inner.get_inputs()

    def run_with_iobinding(self, binding: BoundRun) -> None:
        self.runs.append({k: v.numpy() for k, v in self.inputs.items()})
        super().run_with_iobinding(binding)


def test_cut_moves_the_gathers_and_the_stacking_into_the_prologue() -> None:
    split = split_fixed_inputs(site_model(), ["adapter_index"])
    assert split is not None
    assert Counter(n.op_type for n in split.prologue.graph.node) == {"Add": 1, "Transpose": 1, "Gather": 2}
    assert Counter(n.op_type for n in split.step.graph.node) == {"MatMul": 3, "Add": 1}
    assert split.carried == ["A_rows", "B_rows"]
    assert [i.name for i in split.step.graph.input] == ["x", "A_rows", "B_rows"]
    assert [t.name for t in split.step.graph.initializer] == ["W"]  # the stacks live in the prologue alone
    assert sorted(t.name for t in split.prologue.graph.initializer) == ["A_stack", "B_stack", "one"]
    assert split.one_row_broadcasts


def test_prologue_runs_once_per_index_and_once_per_sample_for_one_adapter() -> None:
    model = site_model()
    whole, split = session(model), split_fixed_inputs(model, ["adapter_index"])
    recording = Recording(session(split.prologue))
    prologue, step = FixedInputPrologue(recording, split), session(split.step)
    x = np.random.default_rng(1).standard_normal((4, 3, IN)).astype(np.float32)

    def run(index: list[int]) -> np.ndarray:
        rows = prologue({"adapter_index": np.array(index, dtype=np.int64)})
        (got,) = step.run_with_ort_values(["out"], {"x": ort.OrtValue.ortvalue_from_numpy(x), **rows})
        (want,) = whole.run(["out"], {"x": x, "adapter_index": np.array(index, dtype=np.int64)})
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)
        return want

    run([1, -1, 0, 1])
    run([1, -1, 0, 1])  # the same choice: the kept rows
    assert [r["adapter_index"].tolist() for r in recording.runs] == [[1, -1, 0, 1]]
    out = run([1, 1, 1, 1])  # one adapter: one sample's rows, broadcast by the step's MatMuls
    assert recording.runs[-1]["adapter_index"].tolist() == [1]
    assert not np.allclose(out, run([0, 0, 0, 0]))  # a real adapter choice, not the zero slot
    assert len(recording.runs) == 3


def test_rows_read_elementwise_get_a_row_per_sample() -> None:
    split = split_fixed_inputs(site_model(row_reader="Mul"), ["adapter_index"])
    assert split is not None and not split.one_row_broadcasts


def test_no_fixed_inputs_no_cut() -> None:
    assert split_fixed_inputs(site_model(), []) is None


def test_outputs_and_metadata_survive_the_cut() -> None:
    model = site_model()
    helper.set_model_props(model, {"peftc": "{}"})
    split = split_fixed_inputs(model, ["adapter_index"])
    assert [o.name for o in split.step.graph.output] == ["out"]
    assert {p.key: p.value for p in split.step.metadata_props} == {"peftc": "{}"}


def test_run_ort_keeps_the_outputs_read_again_on_the_gpu() -> None:
    split = split_fixed_inputs(site_model(), ["adapter_index"])
    feed = {"adapter_index": ort.OrtValue.ortvalue_from_numpy(np.array([1, -1], dtype=np.int64))}
    want = [v.numpy() for v in session(split.prologue).run_with_ort_values(split.carried, feed)]
    recorder = BoundRun(session(split.prologue))
    got = run_ort(recorder, feed, split.carried, "cuda", on_device={"A_rows"})
    assert recorder.bound == {"A_rows": "cuda", "B_rows": "cpu"}  # what is not read again comes to the host
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.numpy(), w)
    run_ort(recorder, feed, split.carried, "cpu", on_device={"A_rows"})  # on the CPU, all on the host
    assert recorder.bound == {"A_rows": "cpu", "B_rows": "cpu"}


class CountedBinding:
    """A real session whose IO binding counts the inputs bound."""

    def __init__(self, inner: ort.InferenceSession):
        self.inner, self.binds = inner, []

    def io_binding(self) -> CountedBinding:
        self.binding = self.inner.io_binding()
        return self

    def bind_ortvalue_input(self, name: str, value: Any) -> None:
        self.binds.append(name)
        self.binding.bind_ortvalue_input(name, value)

    def __getattr__(self, name: str) -> Any:  # the rest of the binding's calls, unchanged
        return getattr(self.binding, name)

    def run_with_iobinding(self, binding: CountedBinding) -> None:
        self.inner.run_with_iobinding(self.binding)


def prologue_rows(split: Any, index: list[int]) -> dict[str, Any]:
    """The split's carried values (OrtValues) for `adapter_index`."""
    feed = {"adapter_index": ort.OrtValue.ortvalue_from_numpy(np.array(index, dtype=np.int64))}
    return dict(zip(split.carried, session(split.prologue).run_with_ort_values(split.carried, feed)))


def test_bound_runs_bind_a_repeated_input_once_and_keep_each_runs_outputs() -> None:
    """Runs given the same OrtValue for an input bind it once; each run's outputs are its own, not written
    over by the next run's."""
    split = split_fixed_inputs(site_model(), ["adapter_index"])
    rows = prologue_rows(split, [1, 0])
    xs = [np.random.default_rng(seed).standard_normal((2, 3, IN)).astype(np.float32) for seed in (1, 2)]
    step = CountedBinding(session(split.step))
    runs = BoundRuns(step)
    first = runs.run({"x": ort.OrtValue.ortvalue_from_numpy(xs[0]), **rows}, ["out"])[0]
    kept = first.numpy().copy()
    second = runs.run({"x": ort.OrtValue.ortvalue_from_numpy(xs[1]), **rows}, ["out"])[0]
    assert step.binds == ["x", "A_rows", "B_rows", "x"]
    np.testing.assert_array_equal(first.numpy(), kept)
    plain = session(split.step)
    for x, got in zip(xs, (first, second)):
        (want,) = plain.run(["out"], {"x": x, **{name: value.numpy() for name, value in rows.items()}})
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    runs.run({"x": ort.OrtValue.ortvalue_from_numpy(xs[0]), "A_rows": rows["A_rows"],
              "B_rows": ort.OrtValue.ortvalue_from_numpy(rows["B_rows"].numpy())}, ["out"])
    assert step.binds[4:] == ["x", "B_rows"]  # only what changed


def test_bound_runs_bind_the_fixed_inputs_once_for_every_run() -> None:
    """A decode loop's runs: the adapter rows, fixed when the binding is made, are bound once, also when the
    other inputs change names (bound again after the binding is cleared)."""
    split = split_fixed_inputs(site_model(), ["adapter_index"])
    rows = prologue_rows(split, [1, 0])
    step = CountedBinding(session(split.step))
    runs = BoundRuns(step, fixed=rows)
    assert step.binds == ["A_rows", "B_rows"]
    plain = session(split.step)
    for seed in (1, 2):
        x = np.random.default_rng(seed).standard_normal((2, 3, IN)).astype(np.float32)
        (got,) = runs.run({"x": ort.OrtValue.ortvalue_from_numpy(x)}, ["out"])
        (want,) = plain.run(["out"], {"x": x, **{name: value.numpy() for name, value in rows.items()}})
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    assert step.binds == ["A_rows", "B_rows", "x", "x"]
    with pytest.raises(Exception, match="x"):  # other inputs: the binding is cleared, the rows bound again
        runs.run({}, ["out"])
    assert step.binds[4:] == ["A_rows", "B_rows"]


def test_ort_values_take_slices_of_a_buffer() -> None:
    """A decode loop feeds column slices of its token and mask buffers (not C-ordered for a batch above one)."""
    buffer = np.arange(12, dtype=np.int64).reshape(3, 4)
    values = ort_values({"mask": buffer[:, :2], "ids": buffer[:, 3:]})
    assert np.array_equal(values["mask"].numpy(), buffer[:, :2])
    assert np.array_equal(values["ids"].numpy(), buffer[:, 3:])
    assert ort_values({"kept": values["ids"]})["kept"] is values["ids"]  # an OrtValue stays itself
