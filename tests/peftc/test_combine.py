"""Adapter combination (add_weighted_adapter's math): equal to PEFT's on the same random adapters."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer, LoraModel
from peft.utils import merge_utils
from transformers.pytorch_utils import Conv1D

from peftc import combine
from peftc.combine import combine_lora, combined_rank_alpha, delta_weight
from peftc.errors import ConfigError

TARGETS = ["emb", "lin", "c1d", "conv", "conv1"]
# the adapters of the model test: scales 2, 1.5 and 1.25; "c" has rank 4 (2 at "lin")
ADAPTERS = {
    "a": dict(r=2, lora_alpha=4),
    "b": dict(r=2, lora_alpha=3),
    "c": dict(r=4, lora_alpha=5, rank_pattern={"lin": 2}),
}


class AllKinds(nn.Module):
    """One layer of each kind PEFT's LoRA combines: embedding, linear, Conv1D, conv 3x3 and 1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.lin = nn.Linear(6, 10)
        self.c1d = Conv1D(8, 10)  # (in 10, out 8), stored transposed
        self.conv = nn.Conv2d(3, 6, 3)
        self.conv1 = nn.Conv2d(6, 5, 1)


def _peft_model():
    torch.manual_seed(0)
    configs = {n: LoraConfig(target_modules=TARGETS, init_lora_weights=False, **kw) for n, kw in ADAPTERS.items()}
    with pytest.warns(UserWarning):  # Conv1D switches fan_in_fan_out on
        model = get_peft_model(AllKinds(), configs["a"], adapter_name="a")
        for name in ("b", "c"):
            model.add_adapter(name, configs[name])
    return model


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name in layer.lora_embedding_A:
        return layer.lora_embedding_A[name].data, layer.lora_embedding_B[name].data
    return layer.lora_A[name].weight.data, layer.lora_B[name].weight.data


def _kind(layer: LoraLayer) -> str:
    base = layer.get_base_layer()
    return {nn.Embedding: "embedding", nn.Linear: "linear", Conv1D: "conv1d", nn.Conv2d: "conv2d"}[type(base)]


def _rng_before_each_module(monkeypatch) -> dict[int, torch.Tensor]:
    """PEFT's per-module combination calls, recorded with the RNG state each started from (the new
    adapter's own initialisation draws from the RNG first, so DARE's masks start from there)."""
    states = {}
    for attr in ("_generalized_task_arithmetic_weighted_adapter", "_svd_generalized_task_arithmetic_weighted_adapter"):
        original = getattr(LoraModel, attr)

        def recording(self, *args, _original=original, **kwargs):
            target = next(a for a in args if isinstance(a, LoraLayer))
            states[id(target)] = torch.get_rng_state()
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(LoraModel, attr, recording)
    return states


CASES = [
    ("linear", {}),
    ("ties", dict(density=0.5)),
    ("ties", dict(density=0.6, majority_sign_method="frequency")),
    ("dare_linear", dict(density=0.5)),
    ("dare_ties", dict(density=0.7)),
    ("magnitude_prune", dict(density=0.5)),
    ("cat", {}),
    ("svd", {}),
    ("svd", dict(svd_rank=3, svd_clamp=0.9, svd_full_matrices=False)),
    ("ties_svd", dict(density=0.5)),
    ("dare_linear_svd", dict(density=0.5)),
    ("dare_ties_svd", dict(density=0.5, majority_sign_method="frequency")),
    ("magnitude_prune_svd", dict(density=0.5)),
]
SAME_RANK_ONLY = set(combine._RECIPES)


@pytest.mark.parametrize("adapters", [["a", "b"], ["a", "b", "c"], ["c"]], ids=["same-rank", "mixed-ranks", "one"])
@pytest.mark.parametrize("ctype,kwargs", CASES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(CASES)])
def test_matches_peft_add_weighted_adapter(monkeypatch, adapters, ctype, kwargs):
    model = _peft_model()
    weights = [0.8, -0.5, 1.3][: len(adapters)]
    config_ranks = [ADAPTERS[n]["r"] for n in adapters]
    if ctype in SAME_RANK_ONLY and len(set(config_ranks)) > 1:
        with pytest.raises(ValueError, match="same r"):
            model.add_weighted_adapter(adapters, weights, "new", combination_type=ctype, **kwargs)
        with pytest.raises(ConfigError, match="same r"):
            combined_rank_alpha(ctype, config_ranks, kwargs.get("svd_rank"))
        return

    states = _rng_before_each_module(monkeypatch)
    torch.manual_seed(1)
    model.add_weighted_adapter(adapters, weights, "new", combination_type=ctype, **kwargs)
    r, alpha = combined_rank_alpha(ctype, config_ranks, kwargs.pop("svd_rank", None))
    assert (r, alpha) == (model.peft_config["new"].r, model.peft_config["new"].lora_alpha)

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == len(TARGETS)
    for layer in layers:
        As, Bs = zip(*(_factors(layer, n) for n in adapters))
        if id(layer) in states:
            torch.set_rng_state(states[id(layer)])
        A, B = combine_lora(As, Bs, [layer.scaling[n] for n in adapters], weights, ctype, svd_rank=r, pad_to=r,
                            kind=_kind(layer), **kwargs)
        peft_A, peft_B = _factors(layer, "new")
        if peft_A.shape[0] < r:
            # PEFT's factor-wise merges keep this module's own rank ("c" has r=2 at "lin") though the new
            # config says r; peftc zero-pads to r, which leaves the update unchanged
            assert (ctype in SAME_RANK_ONLY or len(adapters) == 1) and not A[peft_A.shape[0]:].any()
            A, B = A[: peft_A.shape[0]], B[:, : peft_A.shape[0]]
        torch.testing.assert_close(A, peft_A, rtol=0, atol=0)
        torch.testing.assert_close(B, peft_B, rtol=0, atol=0)


# --- merge functions against peft.utils.merge_utils ------------------------------------------


def _task_tensors(n: int = 3, shape: tuple[int, ...] = (7, 5)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("name,kwargs", [
    ("task_arithmetic", {}),
    ("magnitude_prune", dict(density=0.4)),
    ("ties", dict(density=0.4)),
    ("ties", dict(density=0.4, majority_sign_method="frequency")),
    ("dare_linear", dict(density=0.4)),
    ("dare_ties", dict(density=0.4, majority_sign_method="frequency")),
])
def test_merge_functions_match_peft(name, kwargs):
    tensors, weights = _task_tensors(), torch.tensor([0.7, -1.2, 0.4])
    torch.manual_seed(5)
    theirs = getattr(merge_utils, name)(tensors, weights, **kwargs)
    torch.manual_seed(5)
    ours = getattr(combine, name)(tensors, [0.7, -1.2, 0.4], **kwargs)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    if name.startswith("dare"):  # a seeded generator draws the masks the seeded global RNG draws
        ours = getattr(combine, name)(tensors, weights, generator=torch.Generator().manual_seed(5), **kwargs)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        assert not torch.equal(ours, getattr(combine, name)(tensors, weights, **kwargs))  # masks are random


def test_pruning_keeps_the_requested_fraction():
    t = _task_tensors(1, (10, 10))[0]
    kept = combine.prune(t, 0.3, "magnitude")
    assert (kept != 0).sum() == 30
    assert kept.abs().min() == 0 and kept[kept != 0].abs().min() >= t.abs().flatten().topk(30).values[-1]
    assert torch.equal(combine.prune(t, 1.0, "random"), t)
    dropped = combine.prune(t, 0.5, "random", rescale=True, generator=torch.Generator().manual_seed(0))
    survivors = dropped != 0
    assert 20 < survivors.sum() < 80
    torch.testing.assert_close(dropped[survivors], t[survivors] * 2)


def test_ties_sign_election():
    tensors = [torch.tensor([3.0, -1.0, 2.0]), torch.tensor([-1.0, -1.0, -5.0]), torch.tensor([-1.0, 2.0, 1.0])]
    # "total": signs of the sums (+1, 0 -> +, -2); "frequency": signs of the vote (-1, -1 -> -, +1)
    torch.testing.assert_close(combine.ties(tensors, [1, 1, 1], 1.0, "total"), torch.tensor([3.0, 2.0, -5.0]))
    torch.testing.assert_close(combine.ties(tensors, [1, 1, 1], 1.0, "frequency"), torch.tensor([-1.0, -1.0, 1.5]))


# --- the exact delta-space combination -------------------------------------------------------

SHAPES = {  # kind -> (A shape, B shape) for rank r
    "linear": lambda r: ((r, 9), (7, r)),
    "conv1d": lambda r: ((r, 9), (7, r)),
    "embedding": lambda r: ((r, 30), (6, r)),
    "conv2d": lambda r: ((r, 3, 3, 3), (5, r, 1, 1)),
    "conv2d-1x1": lambda r: ((r, 4, 1, 1), (5, r, 1, 1)),
}


def _random_lora(kind: str, ranks=(2, 3, 2)) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    shapes = [SHAPES[kind](r) for r in ranks]
    return [torch.randn(a, generator=g, dtype=torch.float64) for a, _ in shapes], [
        torch.randn(b, generator=g, dtype=torch.float64) for _, b in shapes
    ]


@pytest.mark.parametrize("kind", list(SHAPES))
def test_delta_is_the_weighted_sum_of_deltas(kind):
    As, Bs = _random_lora(kind)
    scalings, weights = [2.0, 0.5, 1.25], [0.8, -0.5, 1.3]
    layer_kind = kind.split("-")[0]
    exact = sum(w * delta_weight(a, b, s, layer_kind) for a, b, s, w in zip(As, Bs, scalings, weights))
    A, B = combine_lora(As, Bs, scalings, weights, "delta", kind=layer_kind)
    assert A.shape[0] == sum(a.shape[0] for a in As) == combined_rank_alpha("delta", [2, 3, 2])[0]
    torch.testing.assert_close(delta_weight(A, B, 1.0, layer_kind), exact)
    assert torch.equal(A, torch.cat(As))  # the weights go on B; A is the source A's
    # PEFT's "cat" is the same product with the weights on A
    torch.testing.assert_close(delta_weight(*combine_lora(As, Bs, scalings, weights, "cat", kind=layer_kind), 1.0,
                                            layer_kind), exact)


@pytest.mark.parametrize("kind", list(SHAPES))
def test_linear_is_not_the_weighted_sum_when_there_are_cross_terms(kind):
    As, Bs = _random_lora(kind, ranks=(2, 2, 2))
    scalings, weights = [2.0, 0.5, 1.25], [0.8, -0.5, 1.3]
    layer_kind = kind.split("-")[0]
    exact = delta_weight(*combine_lora(As, Bs, scalings, weights, "delta", kind=layer_kind), 1.0, layer_kind)
    linear = delta_weight(*combine_lora(As, Bs, scalings, weights, "linear", kind=layer_kind), 1.0, layer_kind)
    assert (linear - exact).norm() > 0.2 * exact.norm()
    # (weights reach the merge as float32, as in PEFT, hence float32 tolerances on float64 factors)
    # the difference is exactly the cross terms sign(c_j)·sqrt(|c_i c_j|)·B_i A_j, i != j
    c = [w * s for w, s in zip(weights, scalings)]
    cross = sum(
        (1 if c[j] >= 0 else -1) * (abs(c[i] * c[j])) ** 0.5 * delta_weight(As[j], Bs[i], 1.0, layer_kind)
        for i in range(3) for j in range(3) if i != j
    )
    torch.testing.assert_close(linear - exact, cross, rtol=1e-6, atol=1e-6)
    # a single adapter has no cross terms
    one = combine_lora(As[:1], Bs[:1], scalings[:1], weights[:1], "linear", kind=layer_kind)
    torch.testing.assert_close(delta_weight(*one, 1.0, layer_kind), c[0] * delta_weight(As[0], Bs[0], 1.0, layer_kind),
                               rtol=1e-6, atol=1e-6)


def test_linear_equals_delta_when_cross_terms_vanish():
    """Adapters using disjoint rank slots (0 for the first, 1 for the second): every B_i A_j (i != j) is 0."""
    As, Bs = _random_lora("linear", ranks=(2, 2))
    As[0][1], Bs[0][:, 1] = 0, 0
    As[1][0], Bs[1][:, 0] = 0, 0
    assert not (Bs[0] @ As[1]).any() and not (Bs[1] @ As[0]).any()
    weights, scalings = [0.8, -0.5], [2.0, 0.5]
    linear = delta_weight(*combine_lora(As, Bs, scalings, weights, "linear"), 1.0)
    exact = delta_weight(*combine_lora(As, Bs, scalings, weights, "delta"), 1.0)
    torch.testing.assert_close(linear, exact, rtol=1e-6, atol=1e-6)


# --- rank / alpha and validation ----------------------------------------------------------------


def test_combined_rank_alpha():
    assert combined_rank_alpha("linear", [4, 4]) == (4, 4)
    assert combined_rank_alpha("cat", [2, 4]) == (6, 6)
    assert combined_rank_alpha("delta", [2, 4]) == (6, 6)
    assert combined_rank_alpha("svd", [2, 4]) == (4, 4)
    assert combined_rank_alpha("ties_svd", [2, 4], svd_rank=3) == (3, 3)
    assert combined_rank_alpha("ties", [2]) == (2, 2)
    assert combined_rank_alpha("cat", [2]) == (2, 2)  # one adapter: PEFT combines it linearly


def test_pad_to_zero_pads_the_rank():
    As, Bs = _random_lora("linear", ranks=(2, 3))
    A, B = combine_lora(As, Bs, [1.0, 1.0], [1.0, 1.0], "delta", pad_to=8)
    assert A.shape == (8, 9) and B.shape == (7, 8) and not A[5:].any() and not B[:, 5:].any()
    with pytest.raises(ConfigError, match="pad_to=4"):
        combine_lora(As, Bs, [1.0, 1.0], [1.0, 1.0], "delta", pad_to=4)


@pytest.mark.parametrize("call,match", [
    (lambda a, b: combine_lora(a, b, [1.0, 1.0], [1.0, 1.0], "lineer"), "did you mean 'linear'"),
    (lambda a, b: combine_lora(a, b, [1.0, 1.0], [1.0], "svd"), "weights has 1 entries"),
    (lambda a, b: combine_lora(a, b[:1], [1.0, 1.0], [1.0, 1.0], "svd"), "Bs has 1 entries"),
    (lambda a, b: combine_lora([], [], [], [], "svd"), "adapters is empty"),
    (lambda a, b: combine_lora(a, b, [1.0, 1.0], [1.0, 1.0], "linear"), r"same r, got ranks \[2, 3\]"),
    (lambda a, b: combine_lora(a, b, [1.0, 1.0], [1.0, 1.0], "ties_svd"), "density .*'ties_svd'.* None"),
    (lambda a, b: combine_lora(a, b, [1.0, 1.0], [1.0, 1.0], "dare_linear_svd", density=1.5), "density"),
    (lambda a, b: combine_lora(a, b, [1.0, 1.0], [1.0, 1.0], "ties_svd", density=0.5, majority_sign_method="sum"),
     "majority_sign_method='sum'"),
    (lambda a, b: combine_lora(a, b, [1.0, 1.0], [1.0, 1.0], "svd", svd_rank=8), "svd_rank=8"),
    (lambda a, b: combine_lora(a, b, [1.0, 1.0], [1.0, 1.0], "svd", svd_clamp=2.0), "svd_clamp=2.0"),
    (lambda a, b: combine_lora(a, b, [1.0, 1.0], [1.0, 1.0], "svd", kind="conv3d"), "on 'conv3d' layers"),
    (lambda a, b: combine_lora(a, [b[0], b[1][:4]], [1.0, 1.0], [1.0, 1.0], "svd"), "adapter 1 factors a different"),
    (lambda a, b: combined_rank_alpha("magnitude_prune", [2, 3]), "same r"),
    (lambda a, b: combine.prune(a[0], 0.5, "largest"), "prune method 'largest'"),
])
def test_errors_name_the_field(call, match):
    As, Bs = _random_lora("linear", ranks=(2, 3))
    with pytest.raises(ConfigError, match=match):
        call(As, Bs)


def test_grouped_conv_refuses_concatenation_and_svd():
    g = torch.Generator().manual_seed(0)
    As = [torch.randn(4, 4, 3, 3, generator=g) for _ in range(2)]  # conv 4 -> 6, groups=2, r=4
    Bs = [torch.randn(6, 2, 1, 1, generator=g) for _ in range(2)]
    for ctype in ("cat", "delta", "svd"):
        with pytest.raises(ConfigError, match="grouped conv"):
            combine_lora(As, Bs, [1.0, 1.0], [1.0, 1.0], ctype, kind="conv2d")
    A, B = combine_lora(As, Bs, [1.0, 1.0], [1.0, 1.0], "linear", kind="conv2d")  # factor-wise merges keep shapes
    assert A.shape == As[0].shape and B.shape == Bs[0].shape
