"""LoftQ, LoRA's quantisation-aware init (`init_lora_weights="loftq"`, `loftq_config`), in pure torch.

PEFT's `loftq_init` quantises the (out, in) weight with bitsandbytes, NF4 (4 bits: 16 codes, one absmax per
block of 64 values of the flattened weight) or LLM.int8's vectorwise int8 (8 bits: one absmax per row, the
weight rounded through fp16 first), dequantises it, and takes the rank-r SVD of the quantisation error as
B = U·√S, A = √S·Vh; with `loftq_iter` > 1 it quantises W - B·A again and repeats. The base weight becomes the
dequantised one. Nothing divides by the LoRA scale, so the adapted model starts at Q(W) + s·B·A, W itself only
when s = 1, as in PEFT.

PEFT needs bitsandbytes and a CUDA/XPU device for this; here the quantisers are torch ops with bitsandbytes'
arithmetic (its torch reference kernels, which its CPU build runs): the same code table, the same reciprocal
absmax scaling, and the nearest code chosen against the midpoints between codes, a value on a midpoint taking
the lower code. bitsandbytes' CPU quantisers give the same bits (tests/passes/test_lora_loftq.py); its CUDA
kernels may round a value within an ulp of a midpoint to the other code. Like PiSSA (passes/lora_init.py), the
dequantised weight is a new base tensor (`AdapterTensors.base`): the user's model keeps its own.
"""

from __future__ import annotations

import torch

# bitsandbytes' NF4 code table (bitsandbytes.functional.get_4bit_type("nf4")), ascending
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
NF4_BLOCKSIZE = 64  # bitsandbytes' Params4bit default, which PEFT's loftq_init uses
INT8_RECIPROCAL = 7.874015718698502e-3  # bitsandbytes' 1/127, as its int8 dequantisation multiplies


def nf4_quantize(weight: torch.Tensor, blocksize: int = NF4_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax): the NF4 code index (0..15, uint8, the weight's shape) of each value, and the absmax of
    each block of `blocksize` values of the flattened weight (a last shorter block has its own)."""
    code = torch.tensor(NF4_CODE, device=weight.device)
    bounds = (code[:-1] + code[1:]) / 2
    flat = weight.reshape(-1).float()
    full = flat.numel() - flat.numel() % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().max(dim=-1).values
    # bitsandbytes multiplies by the reciprocal in full blocks and divides in the last short one
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < flat.numel():
        tail = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail, -1, 1)])
    codes = torch.bucketize(scaled, bounds).to(torch.uint8)  # a value on a midpoint takes the lower code
    return codes.reshape(weight.shape), absmax


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = NF4_BLOCKSIZE) -> torch.Tensor:
    """The fp32 weight `nf4_quantize`'s codes and absmax stand for: code value times its block's absmax."""
    values = torch.tensor(NF4_CODE, device=codes.device)[codes.reshape(-1).long()]
    scales = absmax.repeat_interleave(blocksize)[: values.numel()]
    return (values * scales).reshape(codes.shape)


def int8_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, row absmax) of a 2-D weight, as bitsandbytes' Int8Params: the weight cast to fp16, each row
    scaled by 127 / its absmax (fp32) and rounded half to even."""
    half = weight.to(torch.float16)
    absmax = half.abs().max(dim=1).values.float()
    return torch.round(half * (127.0 / absmax.unsqueeze(-1))).to(torch.int8), absmax


def int8_dequantize(rows: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """The fp32 weight `int8_quantize`'s rows and absmax stand for (an all-zero row dequantises to zeros)."""
    return rows * absmax.view(-1, 1) * INT8_RECIPROCAL


def quantize_dequantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Q(W): the weight through NF4 (bits=4) or int8 (bits=8) and back, in fp32."""
    if bits == 4:
        return nf4_dequantize(*nf4_quantize(weight))
    return int8_dequantize(*int8_quantize(weight))


def loftq(weight: torch.Tensor, bits: int, r: int, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's `loftq_init` on an (out, in) weight: (A, B, dequantised weight), A and B in fp32, the dequantised
    weight in the weight's dtype. Each iteration quantises what the factors leave of W and refits the factors to
    the new quantisation error."""
    w = weight.detach().float()
    target = w
    for i in range(iters):
        dequantized = quantize_dequantize(target, bits)
        u, s, vh = torch.linalg.svd(w - dequantized, full_matrices=False)
        root = torch.sqrt(s[:r])
        b, a = u[:, :r] * root, root.unsqueeze(1) * vh[:r]
        if i + 1 < iters:
            target = w - b @ a
    return a.contiguous(), b.contiguous(), dequantized.to(weight.dtype)
