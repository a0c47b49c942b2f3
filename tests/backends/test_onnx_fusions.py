"""backends/onnx_fusions.py: which provider an export fuses for, and the repair of fused attentions whose
output replaced a 2-d flattening, on a small hand-built graph run by onnxruntime. The fused decoders themselves
generate as torch does in tests/backends/test_onnx_decoder.py (Llama and GPT-2, every mode)."""

from __future__ import annotations

import sys

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from peftc.backends import onnx_fusions

import peftc

BATCH, TOKENS, HEADS, HIDDEN, OUT = 2, 3, 2, 8, 5


def test_provider_for() -> None:
    assert onnx_fusions.provider_for(None) is None and onnx_fusions.provider_for("none") is None
    assert onnx_fusions.provider_for("auto") == "cpu"
    assert onnx_fusions.provider_for("cuda") == "cuda"
    with pytest.raises(peftc.ConfigError, match=r"ort_fusions='tpu': choose auto, none or one of cpu, cuda"):
        onnx_fusions.provider_for("tpu")


def test_provider_for_a_transformers_without_fusions(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers.exporters.onnxruntime_fusions", None)  # import fails
    with pytest.warns(UserWarning, match="no ONNX Runtime fusions"):
        assert onnx_fusions.provider_for("auto") is None
    with pytest.raises(peftc.ConfigError, match=r"ort_fusions='cpu' needs transformers>=5\.23"):
        onnx_fusions.provider_for("cpu")


def _value(name: str, shape: list, dtype: ir.DataType = ir.DataType.FLOAT) -> ir.Value:
    value = ir.Value(name=name)
    value.dtype, value.shape = dtype, ir.Shape(shape)
    return value


def _fused_attention_graph() -> tuple[ir.Model, ir.Node, ir.Node]:
    """What the fusions left on GPT-2: a MultiHeadAttention, its output named and annotated as the 2-d
    [batch x tokens, hidden] flattening it replaced, read by a Gemm; and one whose 3-d output a MatMul reads."""
    q, k, v = (_value(n, [BATCH, TOKENS, HIDDEN]) for n in "qkv")
    weight = ir.Value(name="w", const_value=ir.tensor(np.arange(HIDDEN * OUT, dtype=np.float32).reshape(HIDDEN, OUT)))
    weight.dtype, weight.shape = ir.DataType.FLOAT, ir.Shape([HIDDEN, OUT])
    flat_attention = ir.node("MultiHeadAttention", [q, k, v], attributes={"num_heads": HEADS},
                             domain="com.microsoft", num_outputs=1)
    flat_attention.outputs[0].name, flat_attention.outputs[0].shape = "view_22", ir.Shape(["N", HIDDEN])
    gemm = ir.node("Gemm", [flat_attention.outputs[0], weight])
    gemm.outputs[0].name = "flat"
    attention = ir.node("MultiHeadAttention", [q, k, v], attributes={"num_heads": HEADS},
                        domain="com.microsoft", num_outputs=1)
    attention.outputs[0].shape = ir.Shape([BATCH, TOKENS, HIDDEN])
    matmul = ir.node("MatMul", [attention.outputs[0], weight])
    matmul.outputs[0].name = "heads"
    for node in (flat_attention, attention):
        node.outputs[0].dtype = ir.DataType.FLOAT
    graph = ir.Graph([q, k, v], [gemm.outputs[0], matmul.outputs[0]], nodes=[flat_attention, gemm, attention, matmul],
                     initializers=[weight], opset_imports={"": 20, "com.microsoft": 1})
    return ir.Model(graph, ir_version=10), gemm, matmul


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds)


def test_flatten_fused_attentions() -> None:
    model, gemm, matmul = _fused_attention_graph()
    feeds = {n: np.random.default_rng(i).standard_normal((BATCH, TOKENS, HIDDEN), np.float32)
             for i, n in enumerate("qkv")}
    with pytest.raises(Exception, match="Gemm"):  # a 3-d input (the fused GPT-2 decoder did not even load)
        _run(model, feeds)

    assert onnx_fusions.flatten_fused_attentions(model.graph) == 1
    flatten = gemm.inputs[0].producer()
    assert (flatten.op_type, flatten.attributes.get_int("axis")) == ("Flatten", -1)
    assert flatten.inputs[0].producer().op_type == "MultiHeadAttention" and flatten.inputs[0].shape is None
    assert matmul.inputs[0].producer().op_type == "MultiHeadAttention"  # a 3-d output is left as it is
    flat, heads = _run(model, feeds)
    assert flat.shape == (BATCH * TOKENS, OUT) and heads.shape == (BATCH, TOKENS, OUT)
    np.testing.assert_allclose(flat, heads.reshape(BATCH * TOKENS, OUT), rtol=1e-6)
    assert onnx_fusions.flatten_fused_attentions(model.graph) == 0  # repaired once
