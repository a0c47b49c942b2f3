"""MonteCLoRA (`monteclora_config`): in training, LoRA's A is replaced by a learned mixture of Monte Carlo
perturbations of itself (PEFT's `MontecloraSampler` and `MontecloraLinearVariant`); outside training it is LoRA.

PEFT keeps, per adapter and module, a Python-side buffer of `buffer_size` standard draws (z_mvn (n, in, r),
z_wishart (r, r), z_dirichlet (n,)), drawn from the global generator when the adapter is created and again
whenever a training forward has used them all. Here that buffer is the adapter's run-time tensors, drawn with
the same calls in the same order (`draw`), so that, seeded alike, the samples are PEFT's; a position tensor
says which one the next training call reads, and `advance` (the method's `before_call`, training calls only)
moves it and refills the buffer as PEFT's `get` does. The reparameterisations (Wishart variance, Cholesky,
the Dirichlet logits' softmax, the average over samples) are graph ops (`perturbed_a`), and PEFT's NaN
fallback (A unperturbed) is a `where`, not a branch on data.

The sampled variance and expert weights are the variational loss's inputs: PEFT assigns them, with their
gradient, to the sampler's buffers `gaussian_var_prior` and `expert_weights`. The graph writes them to those
tensors (saved in checkpoints, as PEFT's buffers are) and the adapted model keeps the values of the last call,
with their gradient, for `variational_loss` (`AdaptedModel._get_monteclora_loss()`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch.distributions.wishart import Wishart

from peftc.graph import Call, SiteBuilder, write_state
from peftc.method import TensorKey

aten = torch.ops.aten

SAMPLER = "lora_monteclora_sampler"
STD_PRIOR, EXPERT_PRIOR = (SAMPLER, "std_prior"), (SAMPLER, "expert_weights_prior")
VAR_PRIOR, EXPERT_WEIGHTS = (SAMPLER, "gaussian_var_prior"), (SAMPLER, "expert_weights")
# the pre-drawn buffer (run-time tensors, not saved: PEFT's is not a module's) and the index of the draw in use
Z_MVN, Z_WISHART, Z_DIRICHLET = (SAMPLER, "z_mvn"), (SAMPLER, "z_wishart"), (SAMPLER, "z_dirichlet")
POSITION = (SAMPLER, "position")
VAR_EPS, DIRICHLET_EPS = 1e-3, 1e-6  # PEFT's clamps in the Wishart / multivariate and the Dirichlet steps


def draw(size: int, samples: int, in_features: int, r: int, device: torch.device, dtype: torch.dtype,
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's `BufferedMontecloraSampler._refill_buffer`: (z_mvn, z_wishart, z_dirichlet) stacked over the
    buffer, with the same generator calls in the same order (the Wishart draws in fp32, then cast)."""
    with torch.no_grad():
        mvn = torch.randn((size, samples, in_features, r), device=device, dtype=dtype)
        dirichlet = torch.randn((size, samples), device=device, dtype=dtype)
        wishart = Wishart(df=r, scale_tril=torch.eye(r, device=device))
        bartlett = torch.stack([wishart._bartlett_sampling(torch.Size()).to(dtype) for _ in range(size)])
    return mvn, bartlett, dirichlet


def sampler_tensors(monte: dict[str, Any], in_features: int, r: int, device: torch.device, dtype: torch.dtype,
                    ) -> tuple[dict[TensorKey, torch.Tensor], dict[TensorKey, torch.Tensor]]:
    """The sampler's parameters and buffers (PEFT's `MontecloraSampler.__init__`, drawn in its order), and
    its pre-drawn samples with the position (-1: none used yet)."""
    samples = monte["num_samples"]
    params = {STD_PRIOR: torch.rand(r, dtype=dtype), EXPERT_PRIOR: torch.rand(samples, dtype=dtype),
              VAR_PRIOR: torch.eye(r, dtype=dtype), EXPERT_WEIGHTS: torch.ones(samples, dtype=dtype) / samples}
    mvn, wishart, dirichlet = draw(monte["buffer_size"], samples, in_features, r, device, dtype)
    buffers = {Z_MVN: mvn, Z_WISHART: wishart, Z_DIRICHLET: dirichlet,
               POSITION: torch.full((1,), -1, dtype=torch.int64, device=device)}
    return params, buffers


def advance(monte: dict[str, Any], tensors: dict[TensorKey, torch.Tensor]) -> None:
    """Before a training call: the next draw, refilling the buffer (in place) once all are used, as PEFT's
    `BufferedMontecloraSampler.get` does."""
    position = tensors[POSITION]
    following = int(position.item()) + 1
    if following >= monte["buffer_size"]:
        mvn = tensors[Z_MVN]
        r = mvn.shape[-1]
        for key, value in zip((Z_MVN, Z_WISHART, Z_DIRICHLET),
                              draw(mvn.shape[0], mvn.shape[1], mvn.shape[2], r, mvn.device, mvn.dtype)):
            tensors[key].copy_(value)
        following = 0
    position.fill_(following)


def perturbed_a(b: SiteBuilder, tensors: dict[TensorKey, torch.fx.Node], monte: dict[str, Any],
                a: torch.fx.Node) -> torch.fx.Node:
    """A as PEFT's training forward uses it: Σ_n w_n (Aᵀ + noise_n), transposed, from the draw at the current
    position; A itself where the noise or the weights hold a NaN. Writes the sampled variance and expert
    weights to the sampler's `gaussian_var_prior` and `expert_weights`."""
    call, n = b.call, monte["num_samples"]
    dtype = tensors[STD_PRIOR].meta["val"].dtype

    def current(key: TensorKey) -> torch.fx.Node:
        picked = call(aten.squeeze.dim, call(aten.index_select.default, tensors[key], 0, tensors[POSITION]), 0)
        return call(aten._to_copy.default, picked, dtype=dtype)

    z_mvn, z_wishart, z_dirichlet = current(Z_MVN), current(Z_WISHART), current(Z_DIRICHLET)
    # Wishart: a diagonal variance from std·z·stdᵀ, std = diag(exp(std_prior))
    std = call(aten.diag_embed.default, call(aten.exp.default, tensors[STD_PRIOR]))
    spread = call(aten.mm.default, call(aten.mm.default, std, z_wishart), call(aten.t.default, std))
    variance = call(aten.diag_embed.default,
                    call(aten.clamp.default, call(aten.diagonal.default, spread), VAR_EPS))
    # multivariate: the noise z_mvn·L, L = cholesky(variance) (in fp32, as PEFT), NaNs to eps, scaled
    chol = cholesky(call, variance, dtype)
    noise = call(aten.einsum.default, "eio,op->eip", [z_mvn, chol])
    noise = call(aten.mul.Tensor, call(aten.nan_to_num.default, noise, VAR_EPS), monte["sample_scaler"])
    weights = expert_weights(call, tensors[EXPERT_PRIOR], z_dirichlet, n, dtype)
    write_state(variance, tensors[VAR_PRIOR])
    write_state(weights, tensors[EXPERT_WEIGHTS])
    # PEFT's fallback to A when a NaN shows up. Its weights then take no part in the forward: here they are
    # recomputed from a zero prior, so that no NaN reaches a gradient (a softmax's backward through a NaN is NaN,
    # whatever gradient arrives), and masked
    bad = call(aten.logical_or.default, call(aten.any.default, call(aten.isnan.default, noise)),
               call(aten.any.default, call(aten.isnan.default, weights)))
    safe = expert_weights(call, call(aten.where.ScalarSelf, bad, 0.0, tensors[EXPERT_PRIOR]), z_dirichlet, n, dtype)
    kept = call(aten.where.ScalarSelf, bad, 0.0, safe)
    perturbed = call(aten.add.Tensor, call(aten.t.default, a), noise)
    averaged = call(aten.einsum.default, "n,nij->ij", [kept, perturbed])
    return call(aten.where.self, bad, a, call(aten.t.default, averaged))


def expert_weights(call: Call, prior: torch.fx.Node, z_dirichlet: torch.fx.Node, n: int,
                   dtype: torch.dtype) -> torch.fx.Node:
    """PEFT's Dirichlet reparameterisation by a normal in log space: softmax(L·z + mu), L the Cholesky factor
    of a diagonal covariance, from the prior's exp."""
    alpha = call(aten.clamp.default, call(aten.exp.default, prior), DIRICHLET_EPS)
    log_alpha = call(aten.log.default, alpha)
    mu = call(aten.sub.Tensor, log_alpha, call(aten.mean.default, log_alpha))
    inverse = call(aten.reciprocal.default, alpha)
    diagonal = call(aten.add.Tensor, call(aten.mul.Tensor, inverse, 1 - 2 / n),
                    call(aten.mul.Tensor, call(aten.sum.default, inverse), 1 / n**2))
    # (PEFT adds eps·I to diag(d): the diagonal d + eps, the rest zero; its Cholesky cannot fail then)
    sigma = call(aten.diag_embed.default,
                 call(aten.add.Tensor, call(aten.clamp.default, diagonal, DIRICHLET_EPS), DIRICHLET_EPS))
    logits = call(aten.add.Tensor, call(aten.mv.default, cholesky(call, sigma, dtype), z_dirichlet), mu)
    return call(aten._softmax.default, logits, -1, False)


def cholesky(call: Call, matrix: torch.fx.Node, dtype: torch.dtype) -> torch.fx.Node:
    """PEFT's Cholesky factor: computed in fp32, cast back."""
    factor = call(aten.linalg_cholesky.default, call(aten._to_copy.default, matrix, dtype=torch.float32))
    return call(aten._to_copy.default, factor, dtype=dtype)


def variational_loss(monte: dict[str, Any], tensors: dict[TensorKey, torch.Tensor], variance: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
    """PEFT's `MontecloraSampler.get_variational_loss` in training, summed: kl_loss_weight·(KL of the expert
    weights' Dirichlet + the Wishart's + the multivariate's) + the weights' entropy term (`use_entropy`)."""
    n, r = monte["num_samples"], variance.shape[0]
    alpha2 = torch.exp(tensors[EXPERT_PRIOR])
    alpha1 = torch.tensor([monte["dirichlet_prior"]] * n, device=alpha2.device)

    def gamma(x: torch.Tensor) -> torch.Tensor:
        return torch.lgamma(x).exp()

    kl_dirichlet = (torch.log(gamma(alpha2.sum()) / gamma(alpha1.sum()))
                    + torch.log(gamma(alpha2) / gamma(alpha1)).sum()
                    + ((alpha2 - alpha1) * (torch.digamma(alpha2) - torch.digamma(alpha2.sum()))).sum())
    std = torch.diag(torch.exp(tensors[STD_PRIOR]))
    var = torch.diag((std @ std.T).diag())
    kl_wishart = 0.5 * (-torch.log(var).trace() * r + var.trace() * r - r**2)
    clamped = torch.clamp(variance, min=1e-6)
    kl_normal = n * 0.5 * (clamped.trace() - torch.log(clamped).trace() - r)
    entropy = (weights**2).sum() if monte["use_entropy"] else 0
    return monte["kl_loss_weight"] * (kl_dirichlet + kl_wishart + kl_normal) + entropy


def monteclora_loss(am: Any, adapter_names: str | Sequence[str] | None = None) -> torch.Tensor | float:
    """PEFT's `LoraModel._get_monteclora_loss` on an adapted model: the variational loss of every MonteCLoRA
    sampler of `adapter_names` (default: the active adapters), averaged over them; 0.0 outside training (PEFT's
    samplers give 0 then) or without one. The sampled variance and expert weights are the last training call's,
    with their gradient (the saved values, without one, before any such call)."""
    names = am.active_adapters if adapter_names is None else \
        [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    total: torch.Tensor | float = 0.0
    count = 0
    for mas in am.adapter_set.modules.values():
        by_name = {ma.adapter: ma for ma in mas if VAR_PRIOR in ma.tensors}
        for name in names:  # as PEFT: module by module, each requested adapter there
            if name not in by_name:
                continue
            count += 1
            if am.training:
                ma = by_name[name]
                tensors = {key: t for key, (_, t) in ma.tensors.items()}
                live = [am.programs.written.get(ma.tensors[key][0], tensors[key])
                        for key in (VAR_PRIOR, EXPERT_WEIGHTS)]
                total = total + variational_loss(ma.config.monteclora_config, tensors, *live)
    return total / count if count else 0.0


class MontecloraTrainerMixin:
    """PEFT's `peft.helpers.MontecloraTrainerMixin` for peftc: a transformers Trainer mixin adding the adapted
    model's MonteCLoRA loss to the task loss (`class T(MontecloraTrainerMixin, Trainer): ...`); with several
    adapted models inside the trained one, their average, as PEFT averages its LoRA models'."""

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     **kwargs: Any) -> Any:
        if return_outputs:
            task_loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)  # type: ignore[misc]
        else:
            task_loss, outputs = super().compute_loss(model, inputs, **kwargs), None  # type: ignore[misc]
        losses = [m.monteclora_loss() for m in model.modules() if callable(getattr(type(m), "monteclora_loss", None))]
        total = task_loss + (sum(losses) / len(losses) if len(losses) > 1 else sum(losses))
        return (total, outputs) if return_outputs else total
