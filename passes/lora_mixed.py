"""LoRA's batched lowering for mixed-adapter batches (the dispatch pass asks for it).

Adapters of one site are stacked in the graph (ranks zero-padded to the largest; slot 0 is a
zero adapter for base-only samples), each sample gathers its A, B and scale, and two batched
matmuls apply them: Punica/vLLM's BGMV. Stacking happens in the graph from the adapters' own
parameters, so training reaches each adapter and a hot-swap (an in-place copy) needs no new graph.

The stacks hold Aᵀ and Bᵀ, the matmuls' right-hand layout: the transposes then act on the
adapters alone (hoisted in eager, constant-folded by ONNX Runtime), not on the gathered rows at
every call, where ONNX Runtime copies them. A (batch, seq, features) input, a transformer's, is
already the matmuls' layout, so it is not reshaped either: per site and call, two gathers, two
matmuls and an add.
"""

from __future__ import annotations

import torch
import torch.fx

from peftc.config import LoraConfig
from peftc.graph import cast, cast_like, dtype_of, shape_of
from peftc.method import MixedEmitContext, TensorKey

aten = torch.ops.aten

LoraSlot = tuple[dict[TensorKey, torch.fx.Node], LoraConfig] | None


def emit_mixed_lora(ctx: MixedEmitContext, keys: tuple[TensorKey, TensorKey, TensorKey]) -> torch.fx.Node | None:
    """y + s[i] * B[i] A[i] x per sample i; `keys` are LoRA's (A, B, scale) tensor keys.
    None where the batched form does not apply (DoRA, lora_bias, differing dropouts)."""
    b, site, y, slots, index, training = ctx.builder, ctx.site, ctx.y, ctx.slots, ctx.index, ctx.training
    key_a, key_b, key_scale = keys
    present = [tensors for tensors, _ in filter(None, slots)]
    configs = [config for _, config in filter(None, slots)]
    dropouts = {config.lora_dropout if training else 0.0 for config in configs}
    if len(dropouts) > 1 or any(getattr(c, "use_dora", False) or getattr(c, "lora_bias", False) for c in configs):
        return None
    r_max = max(t[key_a].meta["val"].shape[0] for t in present)

    def stacked(key: TensorKey, pad: list[int] | None, scaled: bool = False,
                transposed: bool = False) -> torch.fx.Node:
        """Slot 0 and absent adapters are zeros; `pad` (constant_pad_nd widths for the rank dim) or none;
        `scaled`: each adapter's tensor times its scale; `transposed`: each adapter's tensor transposed."""
        rows = []
        for slot in slots:
            t = None if slot is None else slot[0][key]
            if t is not None and pad is not None:
                missing = r_max - t.meta["val"].shape[0 if len(pad) == 4 else 1]
                t = b.call(aten.constant_pad_nd.default, t, [w * missing for w in pad])
            if t is not None and scaled:
                t = b.call(aten.mul.Tensor, t, slot[0][key_scale])
            if t is not None and transposed:
                t = b.call(aten.t.default, t)
            rows.append(t)
        zeros = b.call(aten.zeros_like.default, next(t for t in rows if t is not None))
        table = b.call(aten.stack.default, [zeros, *(zeros if t is None else t for t in rows)])
        return b.call(aten.index_select.default, table, 0, slot_of)

    slot_of = b.call(aten.add.Scalar, index, 1)  # -1 (base only) -> the zero slot 0
    a_rows = stacked(key_a, [0, 0, 0, 1], transposed=True)  # (batch, in, r_max): pad A's rows
    # (batch, r_max, out): pad B's columns. In inference each adapter's B·s is stacked: it depends on the adapters
    # alone (computed once: hoisted in eager, constant-folded by ONNX Runtime), so no per-sample scale remains
    b_rows = stacked(key_b, [0, 1], scaled=not training, transposed=True)

    x = cast_like(b, site.input, present[0][key_a])
    (p,) = dropouts
    if p > 0:
        x = b.call(aten.dropout.default, x, p, True)
    # (batch, seq, features) in and out is the matmuls' layout already: no reshape either way
    three_d = all(ctx.batch_first(n) and n.meta["val"].dim() == 3 for n in (site.input, y))
    if not three_d:
        batch = b.call(aten.sym_size.int, index, 0)
        x = b.call(aten.reshape.default, x, [batch, -1, present[0][key_a].meta["val"].shape[1]])
    h = b.call(aten.bmm.default, b.call(aten.bmm.default, x, a_rows), b_rows)
    if training:  # (batch,) scales, one per sample
        h = b.call(aten.mul.Tensor, h, b.call(aten.reshape.default, stacked(key_scale, None), [-1, 1, 1]))
    if not three_d:
        h = b.call(aten.reshape.default, h, shape_of(b, y))
    return b.call(aten.add.Tensor, y, cast(b, h, dtype_of(present[0][key_scale]), dtype_of(y)))
