"""LoHa against PEFT: outputs, gradients, checkpoints, initialisation, inserted nodes, dropouts, folding.

Also what test_lokr.py shares with it (the LyCORIS family's common part): a Conv1d model for the
zoo and the fold check.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from types import ModuleType

import peft
import peft.tuners.loha.layer
import pytest
import torch
import torch.nn as nn
from peftc.passes.loha import CP, LoHa, LoHaConfig, Lycoris

import peftc
from peftc.config import load_config
from peftc.errors import ConfigError, TargetError
from peftc.graph import ADAPTER, adapter_nodes
from peftc.sites import sites_by_module
from tests import oracle, zoo

aten = torch.ops.aten

pytestmark = pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning")


class Conv1dNet(nn.Module):
    """nn.Conv1d with padding, with dilation and groups, and a pointwise (k=1) kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv1d(4, 6, 3, padding=1)
        self.conv1 = nn.Conv1d(6, 6, 3, dilation=2, groups=2)
        self.conv2 = nn.Conv1d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(torch.relu(self.conv0(x))))).mean(dim=-1)


def conv1d_net() -> zoo.Case:
    torch.manual_seed(0)
    x = torch.randn(3, 4, 11, generator=torch.Generator().manual_seed(1))
    return zoo.Case("conv1d_net", Conv1dNet().eval(), (x,), ["conv0", "conv1", "conv2"], False)


@pytest.fixture(autouse=True)
def conv1d_in_zoo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(zoo.FACTORIES, "conv1d_net", conv1d_net)


def cp_with_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT 0.21.2's hand-written backward of the CP (effective conv) product gives hada_w1_a and hada_w2_a
    the other factor's gradient (see test_peft_cp_backward_is_not_the_gradient_of_its_forward); compare
    peftc with autograd's gradient of PEFT's own forward instead."""
    def make_weight_cp(t1, w1a, w1b, t2, w2a, w2b, scale):  # noqa: ANN001, ANN202  (PEFT's signature)
        return torch.einsum(CP, t1, w1b, w1a) * torch.einsum(CP, t2, w2b, w2a) * scale

    monkeypatch.setattr(peft.tuners.loha.layer, "make_weight_cp", make_weight_cp)


def loha(targets: list[str], **extra) -> tuple[dict, peft.LoHaConfig]:
    """The same config for peftc (a dict, as a user writes it) and for PEFT."""
    return {"peft_type": "LOHA", "target_modules": targets, **extra}, peft.LoHaConfig(target_modules=targets, **extra)


# every zoo layer LoHa adapts (Linear, Conv2d), with rank/alpha patterns and both inits
CASES = {
    "llama": loha(["q_proj", "v_proj", "down_proj"], r=2, alpha=3),
    "bert": loha(["query", "value", "dense"], r=4, alpha=8, rank_pattern={"query": 2}, alpha_pattern={"value": 2}),
    "mlp": loha(["lin0", "lin1"], r=3, alpha=5, rank_pattern={"lin1": 2}, init_weights=False),
    "cnn": loha(["conv0", "conv1", "head"], r=2, alpha=3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_peft(name: str, tmp_path: Path):
    oracle.check_method(name, *CASES[name], tmp_path)


@pytest.mark.parametrize("name", ["cnn", "conv1d_net"])
def test_effective_conv_matches_peft(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cp_with_autograd(monkeypatch)
    targets = zoo.FACTORIES[name]().targets
    pair = oracle.check_method(name, *loha(targets, r=2, alpha=3, use_effective_conv2d=True), tmp_path)
    with_core = {path for path, (ma,) in pair.am.targeted_modules.items() if any(k[0] == "hada_t1" for k in ma.tensors)}
    # a k=1 kernel (conv1d_net.conv2) and the Linear head take the flat form, as in PEFT
    assert with_core == {"conv0", "conv1"}


def test_conv1d_without_effective_decomposition_matches_peft(tmp_path: Path):
    oracle.check_method("conv1d_net", *loha(["conv0", "conv1", "conv2"], r=2, alpha=4), tmp_path)


def test_peft_cp_backward_is_not_the_gradient_of_its_forward():
    # why cp_with_autograd exists: once this fails, PEFT fixed its backward and the patch can go
    gen = torch.Generator().manual_seed(0)
    r, out, inp = 2, 5, 4
    ts = [torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
          for shape in ((r, r, 3, 3), (r, out), (r, inp), (r, r, 3, 3), (r, out), (r, inp))]
    grad_out = torch.randn(out, inp, 3, 3, generator=gen, dtype=torch.float64)
    scale = torch.tensor(1.5, dtype=torch.float64)
    peft_grads = torch.autograd.grad(peft.tuners.loha.layer.make_weight_cp(*ts, scale), ts, grad_out)
    t1, w1a, w1b, t2, w2a, w2b = ts
    true_grads = torch.autograd.grad(torch.einsum(CP, t1, w1b, w1a) * torch.einsum(CP, t2, w2b, w2a) * scale, ts,
                                     grad_out)
    wrong = [i for i, (p, t) in enumerate(zip(peft_grads, true_grads)) if not torch.allclose(p, t)]
    assert wrong == [1, 4]  # hada_w1_a, hada_w2_a


@pytest.fixture(scope="module")
def cnn_effective() -> oracle.MethodPair:
    return oracle.make_pair("cnn", *loha(["conv1", "head"], r=2, alpha=3, use_effective_conv2d=True))


def test_nodes_only_at_targeted_sites(cnn_effective: oracle.MethodPair):
    graph = cnn_effective.am.graphs[0].gm.graph
    per_site: dict[str, Counter] = {}
    for node in adapter_nodes(graph):
        per_site.setdefault(node.meta[ADAPTER][0], Counter())[node.target] += 1
    assert set(per_site) == {"conv1", "head"}  # conv0 is not targeted
    # ΔW in the graph: two CP rebuilds (or two matmuls), their product, the scale, the base shape
    assert per_site["conv1"] == Counter({aten.einsum.default: 2, aten.mul.Tensor: 2, aten.reshape.default: 1,
                                         aten.conv2d.default: 1, aten.add.Tensor: 1})
    assert per_site["head"] == Counter({aten.mm.default: 2, aten.mul.Tensor: 2, aten.reshape.default: 1,
                                        aten.linear.default: 1, aten.add.Tensor: 1})
    # the base ops' sites (an adapter's own mm(hada_w1_a, hada_w1_b) reads a parameter too)
    sites = {path: [s for s in found if ADAPTER not in s.node.meta] for path, found in sites_by_module(graph).items()}
    (conv1,) = sites["conv1"]
    (delta_conv,) = [n for n in adapter_nodes(graph) if n.target == aten.conv2d.default]
    assert delta_conv.args[0] is conv1.input and delta_conv.args[2] is None
    assert delta_conv.args[3:] == conv1.node.args[3:]  # stride 2, same padding, dilation, groups
    for path in ("conv1", "head"):
        (site,) = sites[path]
        assert all(ADAPTER in user.meta for user in site.node.users)
    (conv0,) = sites["conv0"]
    assert not any(ADAPTER in user.meta for user in conv0.node.users)


def test_train_graph_draws_the_module_coin_then_the_rank_mask():
    case = zoo.mlp()
    config, _ = loha(["lin0", "lin1"], r=2, rank_dropout=0.25)
    am = peftc.apply(case.model, config, example_inputs=case.inputs)
    assert not [n for n in adapter_nodes(am.graphs[0].gm.graph) if n.target == aten.rand.default]
    am.train()
    train_graph = am.graph_for(*case.inputs).gm.graph
    rands = [(n.meta[ADAPTER][0], n.args[0]) for n in adapter_nodes(train_graph) if n.target == aten.rand.default]
    assert rands == [("lin0", [1]), ("lin0", [24]), ("lin1", [1]), ("lin1", [8])]


def test_rank_dropout_matches_peft():
    # the MLP's own nn.Dropout draws after lin0's adapter: the random stream must line up with PEFT's
    pair = oracle.make_pair("mlp", *loha(["lin0", "lin1"], r=2, alpha=4, rank_dropout=0.3))
    oracle.check_train(pair)


def test_module_dropout_matches_peft():
    pair = oracle.make_pair("mlp", *loha(["lin0", "lin1"], r=2, alpha=4, module_dropout=0.5))
    am, pm, case = pair.am, pair.pm, pair.case
    am.train()
    pm.train()
    ours, theirs = dict(am.adapter_parameters()), dict(pm.named_parameters())
    dropped = kept = 0
    for seed in range(6):
        am.zero_grad(set_to_none=True)
        pm.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        out = case.call(am)
        torch.manual_seed(seed)
        ref = case.call(pm)
        oracle.assert_same_outputs(out, ref)
        out.sum().backward()
        ref.sum().backward()
        for name, p in ours.items():
            if theirs[name].grad is None:  # PEFT skipped the module: peftc added op(x, 0)
                assert torch.count_nonzero(p.grad) == 0, name
                dropped += 1
            else:
                torch.testing.assert_close(p.grad, theirs[name].grad, **oracle.TOL)
                kept += 1
    assert dropped and kept


@pytest.mark.parametrize("name", ["mlp", "cnn", "conv1d_net"])
def test_fold_gives_the_graph_s_outputs_and_peft_s_merge(name: str):
    targets = zoo.FACTORIES[name]().targets
    oracle.check_fold(oracle.make_pair(name, *loha(targets, r=2, alpha=3, use_effective_conv2d=name != "mlp")))


def check_init(method: Lycoris, layer: nn.Module, peft_config: peft.PeftConfig, peft_layers: ModuleType) -> None:
    """`create` draws what PEFT's layer (`peft_layers.Linear`, `.Conv2d`, ...) draws: the same parameters,
    shapes and values from the same seed, and the scale alpha / r."""
    torch.manual_seed(0)
    ours = method.create(load_config(peft_config), "x", layer, method.layer_kind(layer))
    torch.manual_seed(0)
    r, alpha = peft_config.r, peft_config.alpha
    theirs = getattr(peft_layers, type(layer).__name__)(layer, "default", peft_config, r=r, alpha=alpha)
    want = {(g, None): getattr(theirs, g)["default"] for g in method.groups if "default" in getattr(theirs, g)}
    assert ours.params.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(ours.params[key], value), key
    assert float(ours.buffers[method.scale_key]) == pytest.approx(alpha / r)


def check_config_fields(peft_type: str, ours: type, theirs: type) -> None:
    """PEFT's field names, and its defaults as adapter_config.json holds them."""
    assert {f.name for f in dataclasses.fields(ours)} == {f.name for f in dataclasses.fields(theirs)}
    want = theirs(target_modules=["q"]).to_dict()
    want.update(peft_type=peft_type, target_modules=["q"])
    assert load_config({"peft_type": peft_type, "target_modules": ["q"]}).to_dict() == want


@pytest.mark.parametrize("init_weights", [True, False])
@pytest.mark.parametrize("effective", [False, True])
@pytest.mark.parametrize("layer", [nn.Linear(12, 6), nn.Conv2d(4, 6, 3, groups=2), nn.Conv1d(4, 6, 3)],
                         ids=["linear", "conv2d", "conv1d"])
def test_init_draws_what_peft_draws(layer: nn.Module, effective: bool, init_weights: bool):
    config = peft.LoHaConfig(target_modules=["x"], r=3, alpha=5, use_effective_conv2d=effective,
                             init_weights=init_weights)
    check_init(LoHa(), layer, config, peft.tuners.loha.layer)


def test_config_has_peft_s_fields_and_defaults():
    check_config_fields("LOHA", LoHaConfig, peft.LoHaConfig)
    assert load_config(peft.LoHaConfig(target_modules=["q"], r=4, alpha=2, rank_dropout=0.1)).alpha == 2


@pytest.mark.parametrize(("field", "value", "match"), [
    ("init_weights", "lycoris", "init_weights"),
    ("r", 0, "r must be a positive integer"),
    ("rank_pattern", {"q": -1}, r"rank_pattern\['q'\]"),
    ("module_dropout", 1.0, "module_dropout"),
])
def test_bad_config_names_the_field(field: str, value: object, match: str):
    with pytest.raises(ConfigError, match=match):
        load_config({"peft_type": "LOHA", "target_modules": ["q"], field: value})


def test_unsupported_layer_is_a_target_error():
    case = zoo.embedding_model()
    with pytest.raises(TargetError, match="'emb'.*nn.Linear, nn.Conv1d, nn.Conv2d"):
        peftc.apply(case.model, loha(["emb"])[0], example_inputs=case.inputs)


def test_bf16_base_keeps_fp32_adapters_and_matches_peft():
    case, ref = zoo.mlp(), zoo.mlp()
    x = case.inputs[0].bfloat16()
    config, peft_config = loha(["lin0", "lin1"], r=2, alpha=3)
    am = peftc.apply(case.model.bfloat16(), config, example_inputs=(x,))
    oracle.randomize_adapters(am)
    pm = peft.get_peft_model(ref.model.bfloat16(), peft_config)
    pm.load_state_dict(am.state_dict())
    assert {p.dtype for _, p in am.adapter_parameters()} == {torch.float32}
    y = am(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, pm(x), rtol=0, atol=0)
