"""ONNX Runtime's own operators for an exported graph: transformers' fusions (`fuse_for_onnxruntime`: RMS and
skip norms, rotary embeddings, attention reading its keys transposed in place, packed q/k/v and gate/up
projections), and the one repair peftc's graphs need for those fusions to stay exact.

    exported: y = Reshape(Transpose(attention, [0, 2, 1, 3]), [-1, hidden]); Gemm(y, W)   GPT-2's Conv1D
    fused:    y = MultiHeadAttention(...); Gemm(y, W)                 y [batch, tokens, hidden], annotated 2-d
    repaired: Gemm(Flatten(MultiHeadAttention(...), axis=-1), W)      [batch x tokens, hidden] again

onnxscript's attention fusion takes the reshape after an attention's output transpose to be the heads' merge
into [batch, tokens, hidden] without checking its shape (its "TODO: verify Reshapes"): on GPT-2 it replaced a
flattening to [batch x tokens, hidden] with the 3-d output, which onnxruntime refused to load (Gemm: "Input 0
expected to have rank 2 but has rank 3"). The fused output keeps the name and the 2-d shape annotation of the
value it replaced, which is how the repair finds it.
"""

from __future__ import annotations

import warnings
from typing import Any

from peftc.errors import ConfigError

PROVIDERS = ("cpu", "cuda", "webgpu", "dml")  # the providers transformers' fusions target
SINCE = "5.23"  # the transformers release with `transformers.exporters.onnxruntime_fusions`
ATTENTIONS = ("MultiHeadAttention", "GroupQueryAttention", "Attention")  # ONNX Runtime's, [batch, tokens, hidden]


def provider_for(requested: str | None) -> str | None:
    """The provider an export fuses for, given the `ort_fusions` a user asked for: None or "none" (standard ONNX
    operators only), one of `PROVIDERS`, or "auto": "cpu" where the installed transformers has the fusions, else
    None with a warning. A provider named explicitly that transformers cannot fuse for is an error."""
    if requested is None or requested == "none":
        return None
    if requested != "auto" and requested not in PROVIDERS:
        raise ConfigError(f"ort_fusions={requested!r}: choose auto, none or one of {', '.join(PROVIDERS)}")
    try:
        import transformers.exporters.onnxruntime_fusions  # noqa: F401
    except ImportError:
        import transformers

        if requested != "auto":
            raise ConfigError(f"ort_fusions={requested!r} needs transformers>={SINCE} (its "
                              f"exporters.onnxruntime_fusions); installed: {transformers.__version__}. "
                              "ort_fusions=None exports standard ONNX operators") from None
        warnings.warn(f"transformers {transformers.__version__} has no ONNX Runtime fusions (>={SINCE}): the "
                      "decoder is exported with standard ONNX operators", stacklevel=3)
        return None
    return "cpu" if requested == "auto" else requested


def fuse(model: Any, provider: str) -> None:
    """Fuse the onnx_ir `model` in place into ONNX Runtime's operators for `provider` (one of `PROVIDERS`)."""
    from transformers.exporters.onnxruntime_fusions import fuse_for_onnxruntime

    fuse_for_onnxruntime(model, provider)
    flatten_fused_attentions(model.graph)


def flatten_fused_attentions(graph: Any) -> int:
    """before: readers(z), z = Attention(...) [batch, tokens, hidden] where the value it replaced was 2-d
    after:  readers(Flatten(z, axis=-1)): [batch x tokens, hidden], as the replaced value was
    Returns how many outputs it flattened."""
    import onnx_ir as ir

    flattened = 0
    for node in list(graph):
        if node.domain != "com.microsoft" or node.op_type not in ATTENTIONS:
            continue
        output = node.outputs[0]
        if output.shape is None or output.shape.rank() != 2:
            continue
        readers = list(output.uses())
        flatten = ir.node("Flatten", [output], attributes={"axis": -1})
        flatten.outputs[0].dtype, flatten.outputs[0].shape = output.dtype, output.shape
        for reader, index in readers:
            reader.replace_input_with(index, flatten.outputs[0])
        output.shape = None
        graph.insert_after(node, flatten)
        flattened += 1
    return flattened
