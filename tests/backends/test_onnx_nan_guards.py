"""backends/onnx_nan_guards.py: torch.onnx's NaN guard after a masked softmax, dropped where the mask is finite,
on a small hand-built attention run by onnxruntime. The exported decoders and forward graphs, guards dropped,
match torch in test_onnx.py and test_onnx_decoder.py."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from peftc.backends.onnx_nan_guards import drop_softmax_nan_guards

HEADS, TOKENS = 2, 3
MIN = float(np.finfo(np.float32).min)  # what torch.onnx's translation masks with
MASK = np.array([[[[False, False, False], [True, False, False], [True, True, False]]]])  # row 0: fully masked


def guarded_attention(masked: float, mask_added: bool = True, scores: str = "MatMul") -> ir.Model:
    """softmax(q kᵀ + where(mask, 0, masked)) @ v behind torch.onnx's guard, as it translates SDPA with a
    boolean mask. `mask_added=False`: the softmax reads the scores alone; `scores="Add"`: scores that are not
    a MatMul's (q + kᵀ), which could hold -inf of their own."""
    initializers = [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                    numpy_helper.from_array(np.array(masked, np.float32), "masked")]
    nodes = [
        helper.make_node(scores, ["q", "k"], ["scores"]),
        helper.make_node("Where", ["mask", "zero", "masked"], ["additive"]),
        helper.make_node("Add", ["scores", "additive"], ["masked_scores"]),
        helper.make_node("Softmax", ["masked_scores" if mask_added else "scores"], ["weights"], axis=-1),
        helper.make_node("IsNaN", ["weights"], ["nan"]),
        helper.make_node("Where", ["nan", "zero", "weights"], ["guarded"]),
        helper.make_node("MatMul", ["guarded", "v"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, HEADS, TOKENS, TOKENS]),
         helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, HEADS, TOKENS, TOKENS]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, [1, 1, TOKENS, TOKENS]),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, HEADS, TOKENS, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], initializers)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def run(model: ir.Model) -> np.ndarray:
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((1, HEADS, TOKENS, TOKENS), np.float32),
             "k": rng.standard_normal((1, HEADS, TOKENS, TOKENS), np.float32), "mask": MASK,
             "v": rng.standard_normal((1, HEADS, TOKENS, 4), np.float32)}
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["out"], feeds)[0]


def test_a_finite_mask_needs_no_guard() -> None:
    model = guarded_attention(MIN)
    want = run(model)
    assert drop_softmax_nan_guards(model.graph) == 1
    assert Counter(n.op_type for n in model.graph) == {"Where": 1, "Add": 1, "Softmax": 1, "MatMul": 2}
    np.testing.assert_array_equal(run(model), want)  # the fully masked row too: a finite uniform softmax


@pytest.mark.parametrize("masked, mask_added, scores", [(-np.inf, True, "MatMul"), (MIN, False, "MatMul"),
                                                        (MIN, True, "Add")])
def test_a_guard_that_can_matter_stays(masked: float, mask_added: bool, scores: str) -> None:
    model = guarded_attention(masked, mask_added, scores)
    assert drop_softmax_nan_guards(model.graph) == 0
    assert Counter(n.op_type for n in model.graph)["IsNaN"] == 1
    if masked == -np.inf:  # -inf over the whole first row: its softmax is 0/0, which the guard makes 0
        out = run(model)
        assert np.isfinite(out).all() and not out[:, :, 0].any() and out[:, :, 1:].all()
