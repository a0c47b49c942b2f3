"""LoRA inits that read the base weight or draw factors of their own: PiSSA (SVD), OLoRA (QR), MiCA
(the minor singular vectors) and orthogonal.

PiSSA and OLoRA decompose the base weight:
A and B take W's principal part and the base weight becomes the residual W - s·BA, so the adapted
model starts exactly where the base model is. PEFT overwrites the base layer's weight in place;
peftc returns the residual as a new tensor (`AdapterTensors.base`) and the user's model keeps its
own. Formulas, slicing and dtypes follow PEFT's `pissa_init` / `olora_init`: computed in fp32 on
the (out, in) weight, the residual cast back to the base dtype.
"""

from __future__ import annotations

import torch

from peftc.config import LoraConfig
from peftc.errors import ConfigError
from peftc.method import adapter_dtype


def decompose(
    config: LoraConfig, module_name: str, kind: str, weight: torch.Tensor, r: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, residual) for a Linear or Conv1D weight; the residual in the weight's layout and dtype."""
    if kind not in ("linear", "conv1d") or (kind == "conv1d" and config.init_method == "olora"):
        # PEFT implements these inits for Linear only (its OLoRA ignores Conv1D's transposed layout)
        raise ConfigError(
            f"init_lora_weights={config.init_lora_weights!r} is not available for module {module_name!r} "
            f"({kind}): PEFT implements it for nn.Linear" + (" and transformers Conv1D" if kind != "conv1d" else "")
        )
    w = weight.detach().to(adapter_dtype(weight))
    if kind == "conv1d":
        w = w.T
    if config.init_method == "olora":
        q, upper = torch.linalg.qr(w)
        a, b = upper[:r], q[:, :r]
    else:
        if config.pissa_niter is None:
            v, s, uh = torch.linalg.svd(w, full_matrices=False)
            v, s, uh = v[:, :r], s[:r], uh[:r]
        else:
            v, s, u = torch.svd_lowrank(w, r, niter=config.pissa_niter)
            uh = u.t()
        root = torch.diag(torch.sqrt(s / scale))
        a, b = root @ uh, v @ root
    residual = (w - scale * b @ a).to(weight.dtype)
    return a.contiguous(), b.contiguous(), residual.T if kind == "conv1d" else residual


def orthogonal(fan_in: int, fan_out: int, r: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `orthogonal_init` (A, B): random Gaussians projected on the odd and even rows of a random
    orthogonal r×r matrix, so B·A = 0 at the start; drawn in PEFT's order, cast to the base dtype as PEFT does."""
    q, _ = torch.linalg.qr(torch.randn(r, r))
    a = torch.randn(fan_in, r // 2).mm(q[0::2, :]).T / 10.0
    b = torch.randn(r // 2, fan_out).T.mm(q[1::2, :]) / 10.0
    return a.contiguous().to(dtype), b.contiguous().to(dtype)


def mica(kind: str, weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `mica_init` (A, B): B the r left singular vectors of the (out, in) weight with the smallest
    singular values, A zero (so B·A = 0); B stays frozen in training (`Lora.frozen`)."""
    w = weight.detach().to(torch.float32)
    if kind in ("conv1d", "embedding"):  # stored (in, out): an embedding's update is (dim, num_embeddings)
        w = w.T
    u, _, _ = torch.linalg.svd(w, full_matrices=False)
    b, a = u[:, -r:].contiguous(), torch.zeros(r, w.shape[1], device=w.device)
    return a.to(weight.dtype), b.to(weight.dtype)
