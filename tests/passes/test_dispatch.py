"""The dispatch pass: every sample of a batch runs through the adapter it names, in eval and in
training, equal per sample to running that adapter alone, and equal to PEFT's `adapter_names`.
LoRA on the zoo's architectures; then every method (LoRA, DoRA, IA3, LoHa, LoKr, OFT, VeRA, BOFT,
HRA) on a small chained model: outputs and each adapter's gradients against the adapter alone, in
peftc and in PEFT, and against PEFT's own mixed batch where PEFT has one (LoRA)."""

from __future__ import annotations

from typing import Any

import peft
import pytest
import torch

import peftc
from peftc.graph import adapter_nodes
from tests import zoo
from tests.oracle import example, randomize_adapters, tensors

pytestmark = [
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
    pytest.mark.filterwarnings("ignore:Failed to load the CUDA extension:UserWarning"),  # PEFT's BOFT on CPU
    pytest.mark.filterwarnings("ignore:Setting boft_n_butterfly_factor to 1:UserWarning"),
]

TOL = {"atol": 1e-5, "rtol": 1e-5}


def lora(case: zoo.Case, r: int = 4, **extra: Any) -> dict[str, Any]:
    return {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": case.targets,
            "init_lora_weights": False, **extra}


def three_adapters(case: zoo.Case) -> peftc.AdaptedModel:
    """Adapters "a" (r=4), "b" (r=2, fewer targets) and "c" (r=3), all with random weights."""
    am = peftc.apply(case.model, lora(case), adapter_name="a", example_inputs=example(case))
    am.add_adapter("b", lora(case, r=2, target_modules=case.targets[:1]))
    am.add_adapter("c", lora(case, r=3))
    for seed, name in enumerate(am.adapter_order):
        am.set_adapter(name)
        randomize_adapters(am, seed=seed)
    am.set_adapter("a")
    return am


def rows(case: zoo.Case, out: Any, i: int) -> dict[str, torch.Tensor]:
    """Sample i of every batched output (the loss, a scalar, is not per sample)."""
    return {k: v[i] for k, v in tensors(out).items() if v.dim() > 0}


def single(am: peftc.AdaptedModel, case: zoo.Case, name: str) -> Any:
    if name == "__base__":
        with am.disable_adapter():
            return case.call(am)
    am.set_adapter(name)
    return case.call(am)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "mlp", "cnn", "embedding_model"])
def test_mixed_batch_equals_each_adapter_alone(name: str):
    case = zoo.FACTORIES[name]()
    am = three_adapters(case)
    batch = next(iter(tensors(case.call(case.model)).values())).shape[0]
    names = (["a", "__base__", "c", "b"] * 4)[:batch]
    with torch.no_grad():
        mixed = am(**case.inputs, adapter_names=names) if case.transformers else am(*case.inputs, adapter_names=names)
        alone = {n: single(am, case, n) for n in set(names)}
    for i, n in enumerate(names):
        got, want = rows(case, mixed, i), rows(case, alone[n], i)
        for key in want:
            torch.testing.assert_close(got[key], want[key], **TOL, msg=lambda m, k=key, n=n: f"{n} {k}: {m}")


def test_mixed_graph_lowers_lora_linear_to_batched_matmuls():
    case = zoo.llama()
    am = three_adapters(case)
    index = torch.tensor([0, 1, 2])
    am(**case.inputs, adapter_index=index)
    (graph,) = [g for g in am.graphs if g.extra_inputs == ("adapter_index",)]
    nodes = adapter_nodes(graph.gm.graph)
    targets = [n.target for n in nodes]
    linear_sites = 3 * 2  # q_proj, v_proj, down_proj in two layers
    assert targets.count(torch.ops.aten.bmm.default) == 2 * linear_sites
    # embed_tokens (an Embedding) takes the generic per-sample form: one `where` per adapter there
    assert targets.count(torch.ops.aten.where.self) == 2  # adapters a and c target embed_tokens; b does not
    assert torch.ops.aten.linear.default not in targets  # no per-adapter loop at linear sites
    # the stacks hold Aᵀ and (B·s)ᵀ: each bmm reads the gathered rows as they are (no per-call transpose), and a
    # (batch, seq, hidden) activation is the bmm's layout already (no reshape in, none out)
    bmms = [n for n in nodes if n.target == torch.ops.aten.bmm.default]
    assert all(n.args[1].target == torch.ops.aten.index_select.default for n in bmms)
    assert not [n for n in bmms if n.args[0].target == torch.ops.aten.reshape.default]
    assert not [u for n in bmms for u in n.users if u.target == torch.ops.aten.reshape.default]


def test_mixed_graph_reshapes_activations_that_are_not_batch_seq_features():
    """A 2-d (batch, features) input goes through the bmm as (batch, 1, features) and back."""
    case = zoo.mlp()
    am = three_adapters(case)
    am(*case.inputs, adapter_index=torch.zeros(case.inputs[0].shape[0], dtype=torch.long))
    (graph,) = [g for g in am.graphs if g.extra_inputs == ("adapter_index",)]
    bmm, reshape = torch.ops.aten.bmm.default, torch.ops.aten.reshape.default
    bmms = [n for n in adapter_nodes(graph.gm.graph) if n.target == bmm]
    first = [n for n in bmms if n.args[0].target != bmm]
    second = [n for n in bmms if n.args[0].target == bmm]
    assert len(first) == len(second) == 2  # lin0, lin1
    assert all(n.args[0].target == reshape for n in first)
    assert all(any(u.target == reshape for u in n.users) for n in second)


def test_mixed_batch_matches_peft_adapter_names():
    case, ref = zoo.llama(), zoo.llama()
    targets = ["q_proj", "v_proj", "down_proj"]  # PEFT's mixed batches do not cover embeddings
    am = peftc.apply(case.model, lora(case, target_modules=targets), adapter_name="a")
    am.add_adapter("c", lora(case, r=8, target_modules=targets))
    for seed, name in enumerate(am.adapter_order):
        am.set_adapter(name)
        randomize_adapters(am, seed=seed)
    pm = peft.get_peft_model(ref.model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                         init_lora_weights=False), adapter_name="a")
    pm.add_adapter("c", peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    pm.load_state_dict(am.state_dict(), strict=True)
    pm.eval()
    names = ["c", "__base__", "a"]
    with torch.no_grad():
        torch.testing.assert_close(am(**case.inputs, adapter_names=names).logits,
                                   pm(**case.inputs, adapter_names=names).logits, **TOL)


def test_mixed_training_gives_each_adapter_only_its_own_samples_gradients():
    case = zoo.llama()
    am = three_adapters(case)
    am.train()
    am.set_adapter(["a", "b", "c"])  # all trainable
    names = ["a", "c", "a"]
    out = am(**case.inputs, adapter_names=names)
    out.logits.sum().backward()
    mixed = {n: p.grad.clone() for n, p in am.adapter_parameters()}
    assert all(mixed[n].abs().sum() == 0 for n in mixed if ".b." in n)  # no sample picked b

    for adapter, picked in (("a", [0, 2]), ("c", [1])):
        am.zero_grad(set_to_none=True)
        am.set_adapter(adapter)
        sub = {k: v[picked] for k, v in case.inputs.items()}
        am(**sub).logits.sum().backward()
        for n, p in am.adapter_parameters(adapter):
            torch.testing.assert_close(mixed[n], p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_switching_index_reuses_one_graph():
    case = zoo.mlp()
    am = three_adapters(case)
    n = len(am.graphs)
    for names in (["a"] * 4, ["c", "b", "a", "__base__"], ["__base__"] * 4):
        am(*case.inputs, adapter_names=names)
    assert len(am.graphs) == n + 1


def test_bad_adapter_names_and_indices_are_clear_errors():
    case = zoo.mlp()
    am = three_adapters(case)
    with pytest.raises(peftc.ConfigError, match="unknown adapter.*'z'"):
        am(*case.inputs, adapter_names=["a", "z", "a", "a"])
    with pytest.raises(peftc.ConfigError, match=r"\[-1, 2\]"):
        am(*case.inputs, adapter_index=torch.tensor([0, 3, 0, 0]))
    with pytest.raises(peftc.ConfigError, match="3 entries for a batch of 4"):
        am(*case.inputs, adapter_names=["a", "b", "c"])
    with pytest.raises(peftc.ConfigError, match="not both"):
        am(*case.inputs, adapter_names=["a"] * 4, adapter_index=torch.zeros(4, dtype=torch.long))


def test_hotswap_copies_in_place_without_new_graphs(tmp_path):
    case = zoo.mlp()
    am = three_adapters(case)
    # the donor: same targets as "a", smaller rank 2, another alpha, other weights
    donor_case = zoo.mlp()
    donor = peftc.apply(donor_case.model, lora(donor_case, r=2, lora_alpha=7), example_inputs=example(donor_case))
    randomize_adapters(donor, seed=9)
    donor.save_adapter(tmp_path)
    with torch.no_grad():
        want = case.call(donor)
        am.set_adapter("a")
        case.call(am)
        am(*case.inputs, adapter_names=["a", "b", "c", "a"])
        graphs, captures = len(am.graphs), len(am.programs.captures)
        am.hotswap_adapter(tmp_path, "a")
        torch.testing.assert_close(case.call(am), want, **TOL)
        torch.testing.assert_close(am(*case.inputs, adapter_names=["a"] * 4), want, **TOL)
    assert (len(am.graphs), len(am.programs.captures)) == (graphs, captures)
    with pytest.raises(peftc.ConfigError, match="hot-swapped in at a smaller rank"):
        am.save_adapter(tmp_path / "again", "a")
    with pytest.raises(peftc.ConfigError, match="other modules"):
        am.hotswap_adapter(tmp_path, "b")  # b adapts lin0 only
    donor.add_adapter("big", lora(donor_case, r=8))
    donor.save_adapter(tmp_path / "big_root", "big")
    with pytest.raises(peftc.ConfigError, match="larger than the loaded adapter"):
        am.hotswap_adapter(tmp_path / "big_root" / "big", "a")


# -- every method ------------------------------------------------------------------------------------------

# method -> (config of adapter "x", changes for adapter "y", PEFT's config class). On tests/zoo.py's chain model
# (a -> b directly, b -> relu -> c): "x" targets all three, so one adapted layer feeds another, "y" fewer layers
# (or, where the method shares state across adapters, the same ones) with other settings.
METHOD_CASES: dict[str, tuple[dict[str, Any], dict[str, Any], type[peft.PeftConfig]]] = {
    "LORA": ({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "init_lora_weights": False},
             {"r": 2, "lora_alpha": 6, "target_modules": ["b", "c"]}, peft.LoraConfig),
    "DORA": ({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True},
             {"r": 2, "target_modules": ["b", "c"]}, peft.LoraConfig),
    # PEFT keeps a layer's feed-forward flag from its first IA3 adapter: "y" declares the same one ("b")
    "IA3": ({"peft_type": "IA3", "feedforward_modules": ["b"]},
            {"target_modules": ["b", "c"], "feedforward_modules": ["b"]}, peft.IA3Config),
    "LOHA": ({"peft_type": "LOHA", "r": 2, "alpha": 4, "init_weights": False},
             {"r": 3, "alpha": 2, "target_modules": ["b", "c"]}, peft.LoHaConfig),
    "LOKR": ({"peft_type": "LOKR", "r": 2, "alpha": 4, "init_weights": False},
             {"r": 1, "alpha": 3, "decompose_both": True, "target_modules": ["a", "b"]}, peft.LoKrConfig),
    "OFT": ({"peft_type": "OFT", "oft_block_size": 4},
            {"oft_block_size": 2, "target_modules": ["a", "b"]}, peft.OFTConfig),
    "VERA": ({"peft_type": "VERA", "r": 4}, {"target_modules": ["b", "c"]}, peft.VeraConfig),
    "BOFT": ({"peft_type": "BOFT", "boft_block_size": 4}, {"boft_block_size": 2, "target_modules": ["a", "b"]},
             peft.BOFTConfig),
    "HRA": ({"peft_type": "HRA", "r": 2}, {"r": 4, "target_modules": ["b", "c"]}, peft.HRAConfig),
}
MIXED = ["y", "__base__", "x", "y"]  # per sample of the chain model's batch of 4


def _two_adapters(method: str) -> tuple[zoo.Case, peftc.AdaptedModel, peft.PeftModel]:
    """peftc and PEFT on two copies of the chain model, each with adapters "x" and "y" of `method`, with the same
    random weights (every adapter parameter moved away from its initial value, so none is an identity)."""
    x_config, y_changes, peft_class = METHOD_CASES[method]
    case, ref = zoo.chain(), zoo.chain()
    configs = {"x": {"target_modules": ["a", "b", "c"], **x_config}}
    configs["y"] = {**configs["x"], **y_changes}
    am = peftc.apply(case.model, configs["x"], adapter_name="x", example_inputs=case.inputs)
    am.add_adapter("y", configs["y"])
    for seed, name in enumerate(("x", "y")):
        am.set_adapter(name)
        randomize_adapters(am, seed=seed)
    pm = None
    for name, config in configs.items():
        fields = peft_class(**{k: v for k, v in config.items() if k != "peft_type"})
        if pm is None:
            pm = peft.get_peft_model(ref.model, fields, adapter_name=name)
        else:
            pm.add_adapter(name, fields)
    result = pm.load_state_dict(am.state_dict(), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    return case, am, pm.eval()


def _peft_alone(pm: peft.PeftModel, name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "__base__":
        with pm.disable_adapter():
            return pm(x)
    pm.set_adapter(name)
    return pm(x)


@pytest.mark.parametrize("method", list(METHOD_CASES))
def test_every_method_mixed_batch_equals_each_adapter_alone_and_peft(method: str):
    case, am, pm = _two_adapters(method)
    (x,) = case.inputs
    am.eval()
    with torch.no_grad():
        mixed = am(x, adapter_names=MIXED)
        index = torch.tensor([am.adapter_order.index(n) if n != "__base__" else -1 for n in MIXED])
        torch.testing.assert_close(am(x, adapter_index=index), mixed, atol=0, rtol=0)
        for name in ("x", "y", "__base__"):
            rows = [i for i, n in enumerate(MIXED) if n == name]
            want = _peft_alone(pm, name, x)
            torch.testing.assert_close(single(am, case, name)[rows], mixed[rows], **TOL,
                                       msg=lambda m, n=name: f"{n} alone (peftc): {m}")
            torch.testing.assert_close(mixed[rows], want[rows], **TOL, msg=lambda m, n=name: f"{n} alone (PEFT): {m}")
        # the adapters differ from each other and from the base on these rows, so a row given the wrong one fails
        assert not torch.allclose(mixed, am(x, adapter_names=["x", "__base__", "y", "x"]), **TOL)
        assert not torch.allclose(_peft_alone(pm, "x", x), _peft_alone(pm, "y", x), **TOL)
        if method == "LORA":  # PEFT's own mixed batches (LoRA only; it refuses DoRA, see below)
            torch.testing.assert_close(mixed, pm(x, adapter_names=MIXED), **TOL)
        elif method == "DORA":
            with pytest.raises(ValueError, match="DoRA"):
                pm(x, adapter_names=MIXED)


@pytest.mark.parametrize("method", list(METHOD_CASES))
def test_every_method_mixed_batch_gives_each_adapter_its_own_samples_gradients(method: str):
    case, am, pm = _two_adapters(method)
    (x,) = case.inputs
    weights = torch.randn(*am(x).shape, generator=torch.Generator().manual_seed(3))  # a loss with no symmetry
    am.train()
    am.set_adapter(["x", "y"])  # both trainable
    (am(x, adapter_names=MIXED) * weights).sum().backward()
    mixed = {n: p.grad.clone() for n, p in am.adapter_parameters()}
    pm.train()
    for name in ("x", "y"):
        rows = [i for i, n in enumerate(MIXED) if n == name]
        am.zero_grad(set_to_none=True)
        am.set_adapter(name)
        (am(x[rows]) * weights[rows]).sum().backward()
        pm.zero_grad(set_to_none=True)
        pm.set_adapter(name)
        (pm(x[rows]) * weights[rows]).sum().backward()
        theirs = dict(pm.named_parameters())
        params = dict(am.adapter_parameters(name))
        assert params and any(mixed[n].abs().sum() > 0 for n in params)
        for n, p in params.items():
            torch.testing.assert_close(mixed[n], p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n} (peftc): {m}")
            torch.testing.assert_close(mixed[n], theirs[n].grad, atol=1e-5, rtol=1e-4,
                                       msg=lambda m, n=n: f"{n} (PEFT): {m}")
