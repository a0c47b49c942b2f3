"""OFT against PEFT: outputs, gradients, checkpoints, the inserted nodes, and folding."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
import torch.nn as nn
from peftc.passes.oft import OFT, nearest_divisor

import peftc
from peftc.capture import STATE
from peftc.errors import ConfigError, TargetError
from peftc.graph import ADAPTER, adapter_nodes
from peftc.sites import WEIGHT_OPS
from tests import oracle, zoo

aten = torch.ops.aten

pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid `oft_block_size`:UserWarning"),
    pytest.mark.filterwarnings("ignore:Invalid `r`:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*does not divide the layer:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
]

# (zoo model, target_modules or None for the case's own, config, checks): Linear, Embedding (bert's
# word_embeddings) and Conv2d; Cayley-Neumann and exact Cayley; r and oft_block_size, both also where PEFT
# adjusts them. A transformers model runs only one of the checks that capture once more (seconds each):
# the checkpoint round trip and the train step are the same code on every model, covered on all the others
BOTH = ("checkpoints", "train")
CASES = {
    "llama-neumann-block32": ("llama", ["q_proj", "v_proj", "down_proj"], {"oft_block_size": 32},  # down_proj: 24
                              ("train",)),
    "bert-exact-r4-shared": ("bert", None, {"r": 4, "oft_block_size": 0, "use_cayley_neumann": False,
                                            "block_share": True}, ("checkpoints",)),
    # PEFT 0.21 never applies module_dropout: train outputs must match PEFT's with it set
    "mlp-neumann3-block5": ("mlp", None, {"oft_block_size": 5, "num_cayley_neumann_terms": 3, "module_dropout": 0.5},
                            BOTH),
    "mlp-exact-r2": ("mlp", None, {"r": 2, "oft_block_size": 0, "use_cayley_neumann": False}, BOTH),
    "cnn-neumann-block4": ("cnn", None, {"oft_block_size": 4}, BOTH),
    "cnn-exact-r3-shared": ("cnn", None, {"r": 3, "oft_block_size": 0, "use_cayley_neumann": False,
                                          "block_share": True}, BOTH),
}


def oft_dict(targets: list[str], **extra) -> dict:
    return {"peft_type": "OFT", "target_modules": targets, **extra}


def folded_copy(am: peftc.AdaptedModel, model: nn.Module) -> nn.Module:
    """A copy of the user's `model` whose adapted modules hold `OFT.fold`'s merged weights."""
    folded = copy.deepcopy(model)
    for path, (ma,) in am.targeted_modules.items():
        module = folded.get_submodule(path)
        tensors = {key: t.detach() for key, (_, t) in ma.tensors.items()}
        merged = ma.method.fold(ma.kind, ma.config, module, tensors, {"weight": module.weight.detach()})
        module.weight = nn.Parameter(merged["weight"], requires_grad=False)
    return folded


def assert_folds_like_peft(am: peftc.AdaptedModel, folded: nn.Module, pm: peft.PeftModel) -> None:
    """The folded weights are PEFT's merge_and_unload weights (this unloads `pm`)."""
    merged = pm.merge_and_unload()
    for path in am.targeted_modules:
        torch.testing.assert_close(folded.get_submodule(path).weight, merged.get_submodule(path).weight,
                                   atol=1e-6, rtol=1e-5, msg=lambda m, p=path: f"{p}: {m}")


def check_against_peft(name: str, config: dict, peft_config: peft.PeftConfig, checks: tuple[str, ...],
                       tmp_path: Path, foldable: bool = True) -> None:
    """oracle.check_method's checks (those in `checks` beyond eval), and folding: every adapted module's
    `fold` gives the adapted model's outputs and PEFT's merge_and_unload weights."""
    pair = oracle.make_pair(name, config, peft_config)
    oracle.check_eval(pair)
    if foldable:
        folded = folded_copy(pair.am, pair.case.model)
        with torch.no_grad():
            oracle.assert_same_outputs(pair.case.call(folded), pair.case.call(pair.am))
    # checkpoints before the train step: training moves the CNN's BatchNorm statistics, which adapter
    # checkpoints do not carry into the fresh models they load into
    if "checkpoints" in checks:
        oracle.check_checkpoints(pair, tmp_path)
    if "train" in checks:
        oracle.check_train(pair)
    if foldable:
        assert_folds_like_peft(pair.am, folded, pair.pm)


def check_two_adapters(case_name: str, config: dict, peft_config: peft.PeftConfig) -> None:
    """Two adapters of one method: both active compose as PEFT composes them, and a mixed batch (each sample
    its adapter, or none) gives each sample what PEFT gives it with that adapter alone (PEFT has no mixed
    batches for these methods)."""
    case, ref = zoo.FACTORIES[case_name](), zoo.FACTORIES[case_name]()
    (x,) = case.inputs
    am = peftc.apply(case.model, config, example_inputs=case.inputs).eval()
    am.add_adapter("other", config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for adapter in ("default", "other"):
            for _, p in am.adapter_parameters(adapter):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    pm = peft.get_peft_model(ref.model, copy.deepcopy(peft_config))
    pm.add_adapter("other", copy.deepcopy(peft_config))
    pm.load_state_dict(am.state_dict(), strict=True)
    pm.eval()
    names = ["other", "__base__", "default", "other"][: len(x)]
    with torch.no_grad():
        mixed = am(x, adapter_names=names)
        for i, name in enumerate(names):
            if name == "__base__":
                with pm.disable_adapter():
                    want = pm(x[i:i + 1])
            else:
                pm.set_adapter(name)
                want = pm(x[i:i + 1])
            torch.testing.assert_close(mixed[i:i + 1], want, **oracle.TOL)
        am.set_adapter(["default", "other"])
        pm.base_model.set_adapter(["default", "other"])
        torch.testing.assert_close(am(x), pm(x), **oracle.TOL)
        stacked = am.graph_for(x)  # both adapters active
    # each adapter re-runs the base op on its rotated input or weight; only the last one's run is kept
    assert all(n.users for n in stacked.gm.graph.nodes if n.op == "call_function" and n.target in WEIGHT_OPS)


def check_bf16(case_name: str, config: dict, peft_config: peft.PeftConfig, tol: dict[str, float] | None = None) -> None:
    """Over a bf16 base the adapter stays fp32 and the output bf16, as PEFT's (to the bit by default)."""
    case, ref = zoo.FACTORIES[case_name](), zoo.FACTORIES[case_name]()
    (x,) = case.inputs
    x = x.bfloat16() if x.is_floating_point() else x
    am = peftc.apply(case.model.bfloat16(), config, example_inputs=(x,)).eval()
    oracle.randomize_adapters(am)
    pm = peft.get_peft_model(ref.model.bfloat16(), copy.deepcopy(peft_config)).eval()
    pm.load_state_dict(am.state_dict(), strict=True)
    assert {p.dtype for _, p in am.adapter_parameters()} == {torch.float32}
    with torch.no_grad():
        got = am(x)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, pm(x), **(tol or {"atol": 0, "rtol": 0}))


@pytest.mark.parametrize("case_id", list(CASES))
def test_matches_peft(case_id: str, tmp_path: Path):
    name, targets, extra, checks = CASES[case_id]
    targets = targets or zoo.FACTORIES[name]().targets
    # 3x3 convolutions do not fold (test_kxk_conv_does_not_fold)
    check_against_peft(name, oft_dict(targets, **extra), peft.OFTConfig(target_modules=targets, **extra), checks,
                       tmp_path, foldable=name != "cnn")


@pytest.mark.parametrize("name, targets", [("mlp", ["lin0", "lin1"]), ("cnn", ["conv0", "head"]),
                                           ("embedding_model", ["emb"])])
def test_two_adapters_stack_and_mix_like_peft(name: str, targets: list[str]):
    check_two_adapters(name, oft_dict(targets, oft_block_size=4), peft.OFTConfig(target_modules=targets,
                                                                                  oft_block_size=4))


@pytest.mark.parametrize("name, targets", [("mlp", ["lin0", "lin1"]), ("cnn", ["conv0", "head"]),
                                           ("embedding_model", ["emb"])])
def test_bf16_base_matches_peft(name: str, targets: list[str]):
    check_bf16(name, oft_dict(targets, oft_block_size=4), peft.OFTConfig(target_modules=targets, oft_block_size=4))


def test_embedding_model_matches_and_folds_like_peft():
    case = zoo.embedding_model()
    pair = oracle.make_pair("embedding_model", oft_dict(["emb", "proj"], oft_block_size=4),
                            peft.OFTConfig(target_modules=["emb", "proj"], oft_block_size=4))
    assert {ma.kind for (ma,) in pair.am.targeted_modules.values()} == {"embedding", "linear"}
    oracle.check_eval(pair)
    folded = folded_copy(pair.am, pair.case.model)
    with torch.no_grad():
        oracle.assert_same_outputs(case.call(folded), case.call(pair.am))
    oracle.check_train(pair)  # the Embedding's gradients (bert's case skips its train step)
    assert_folds_like_peft(pair.am, folded, pair.pm)


def test_1x1_conv_folds_like_peft():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 1), nn.ReLU(), nn.Conv2d(6, 3, 1, stride=2)).eval()
    x = torch.randn(2, 4, 5, 5)
    config = {"target_modules": ["0", "2"], "r": 2, "oft_block_size": 0, "init_weights": False}
    am = peftc.apply(model, {"peft_type": "OFT", **config}, example_inputs=(x,)).eval()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.OFTConfig(**config)).eval()
    pm.load_state_dict(am.state_dict(), strict=True)
    folded = folded_copy(am, model)
    with torch.no_grad():
        oracle.assert_same_outputs(am(x), pm(x))
        oracle.assert_same_outputs(folded(x), am(x))
    assert_folds_like_peft(am, folded, pm)


def test_kxk_conv_does_not_fold():
    case = zoo.cnn()
    am = peftc.apply(case.model, oft_dict(["conv0"]), example_inputs=case.inputs)
    ((ma,),) = am.targeted_modules.values()
    tensors = {key: t.detach() for key, (_, t) in ma.tensors.items()}
    with pytest.raises(ConfigError, match=r"kernel \(3, 3\).*keep the adapter unmerged"):
        OFT().fold("conv2d", ma.config, case.model.conv0, tensors, {"weight": case.model.conv0.weight})


def _graph(case: zoo.Case, targets: list[str], **extra) -> torch.fx.Graph:
    am = peftc.apply(case.model, oft_dict(targets, init_weights=False, **extra), example_inputs=case.inputs)
    return am.graphs[0].gm.graph


def _reads(node: torch.fx.Node, target) -> torch.fx.Node:
    """The first node of `target` among `node`'s inputs, searched backwards."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n.target == target and n is not node:
            return n
        seen.add(n)
        todo.extend(i for i in n.all_input_nodes if i not in seen)
    raise AssertionError(f"{node} does not read {target}")


def test_linear_site_reruns_the_linear_on_the_rotated_input():
    graph = _graph(zoo.mlp(), ["lin0", "lin1"], oft_block_size=4)
    live = [n for n in graph.nodes if n.target == aten.linear.default and n.users]
    assert len(live) == 2 and all(n.meta[ADAPTER][2] == "OFT" for n in live)  # the re-emitted linears
    for new in live:
        path = new.meta[ADAPTER][0]
        assert new.args[1].meta[STATE] == f"base_model.model.{path}.base_layer.weight"  # base weight, unchanged
        einsum = _reads(new, aten.einsum.default)
        blocks = {"lin0": 3, "lin1": 6}[path]  # 12 and 24 inputs in blocks of 4
        assert einsum.args[0] == "...rk,rkc->...rc" and einsum.args[1][0].args[1:] == (-1, [blocks, 4])
        scatter = _reads(einsum, aten.masked_scatter.default)
        assert scatter.args[2].meta[STATE] == f"base_model.model.{path}.oft_R.default.weight"
    ops = [n.target for n in adapter_nodes(graph)]
    assert ops.count(aten.bmm.default) == 6 and aten.linalg_solve.default not in ops  # Q^2, Q^3, Q^4 per site
    exact = _graph(zoo.mlp(), ["lin0"], oft_block_size=4, use_cayley_neumann=False)
    ops = [n.target for n in adapter_nodes(exact)]
    assert ops.count(aten.linalg_solve.default) == 1 and aten.bmm.default not in ops


def test_conv_site_folds_rotated_patches_back_before_the_conv():
    graph = _graph(zoo.cnn(), ["conv1"], oft_block_size=4)
    weight = next(n for n in graph.find_nodes(op="placeholder")
                  if n.meta.get(STATE) == "base_model.model.conv1.base_layer.weight")
    (new,) = [n for n in graph.nodes if n.target == aten.conv2d.default and n.args[1] is weight and n.users]
    assert new.meta[ADAPTER] == ("conv1", "default", "OFT")  # the re-emitted conv is the only live one
    assert new.args[3:] == ([2, 2],)  # conv1's own stride (no padding)
    col2im = new.args[0]
    assert col2im.target == aten.col2im.default
    assert col2im.args[1:] == ([10, 10], [3, 3], [1, 1], [0, 0], [1, 1])  # back to the input's size, stride 1
    unfolds = [n for n in adapter_nodes(graph) if n.target == aten.unfold.default]
    assert [n.args[1:] for n in unfolds] == [(2, 3, 1), (3, 3, 1)]
    assert unfolds[0].args[0].target == aten.relu.default and ADAPTER not in unfolds[0].args[0].meta  # conv1's input


def test_embedding_rotates_the_lookup_output():
    graph = _graph(zoo.embedding_model(), ["emb"], oft_block_size=4)
    (lookup,) = [n for n in graph.nodes if n.target == aten.embedding.default]
    einsum = next(n for n in adapter_nodes(graph) if n.target == aten.einsum.default)
    assert einsum.args[1][0].args[0] is lookup
    assert _reads(einsum, aten.masked_scatter.default).args[2].meta[STATE] == \
        "base_model.model.emb.oft_embedding_R.default.weight"


def test_block_sizes_adjust_like_peft():
    assert [nearest_divisor(12, k) for k in (5, 7, 12, 40, 1)] == [4, 6, 12, 12, 1]  # ties to the smaller
    case = zoo.mlp()
    with pytest.warns(UserWarning, match="oft_block_size=5 does not divide the layer's 12 input features"):
        am = peftc.apply(case.model, oft_dict(["lin0"], oft_block_size=5), example_inputs=case.inputs)
    ((ma,),) = am.targeted_modules.values()
    assert tuple(ma.tensors[("oft_R", "weight")][1].shape) == (3, 6)  # 3 blocks of 4: 6 packed entries each


@pytest.mark.parametrize("extra, message", [
    ({"r": 4}, "exactly one of r"),
    ({"oft_block_size": 0}, "exactly one of r"),
    ({"bias": "some"}, "bias='some' must be 'none', 'all' or '<method>_only'"),
    ({"module_dropout": 1.0}, "module_dropout"),
])
def test_bad_configs(extra: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        peftc.apply(zoo.mlp().model, oft_dict(["lin0"], **extra), example_inputs=zoo.mlp().inputs)


def test_conv1d_is_not_an_oft_layer():
    with pytest.raises(TargetError, match="OFT cannot adapt it"):
        peftc.apply(zoo.gpt2().model, oft_dict(["c_attn"]))


@pytest.mark.parametrize("block_share", [False, True])
def test_constrained_oft_matches_peft(block_share: bool, tmp_path: Path):
    """coft=True: PEFT's forward projects oft_R in place (each block's Q onto the eps ball) before using it;
    peftc does the same before every call, so outputs, gradients, checkpoints, fold and the parameters after
    optimizer steps are PEFT's. Random init (std 0.1) puts the blocks outside the ball."""
    fields = {"oft_block_size": 4, "target_modules": ["lin0", "lin1"], "coft": True, "eps": 1e-2,
              "init_weights": False, "block_share": block_share}
    pair = oracle.check_method("mlp", {"peft_type": "OFT", **fields}, peft.OFTConfig(**fields), tmp_path)
    oracle.check_fold(pair)
    ours, theirs = dict(pair.am.adapter_parameters()), dict(pair.pm.named_parameters())
    opt_ours = torch.optim.SGD(ours.values(), lr=0.5)
    opt_theirs = torch.optim.SGD([theirs[n] for n in ours], lr=0.5)
    x = pair.case.inputs[0]
    for _ in range(2):
        for model, opt in ((pair.am, opt_ours), (pair.pm, opt_theirs)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    for name, p in ours.items():
        torch.testing.assert_close(p, theirs[name], atol=1e-6, rtol=1e-5)
    packed = ours["base_model.model.lin0.oft_R.default.weight"].detach()
    with torch.no_grad():
        pair.am(x)  # projected again: every block's Q now has norm <= eps / sqrt(rows)
    q_norms = 2 ** 0.5 * ours["base_model.model.lin0.oft_R.default.weight"].norm(dim=1)
    assert (q_norms <= 1e-2 / packed.shape[0] ** 0.5 + 1e-7).all()
