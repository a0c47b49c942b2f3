"""Arrow routing (`arrow_config`, passes/lora_arrow.py) and `peftc.create_arrow_model` against PEFT's
`create_arrow_model`, on the same LoRA experts (random, non-identity weights saved by PEFT): outputs with and
without GenKnowSub, input gradients in train mode, checkpoints both ways, and PEFT's refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from peftc.passes.lora_arrow import prototypes, start_vector

import peftc
from peftc.errors import ConfigError
from peftc.graph import eager
from tests import zoo
from tests.oracle import TOL, assert_same_outputs, example, second_inputs

pytestmark = [pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
              pytest.mark.filterwarnings("ignore:fan_in_fan_out:UserWarning")]

ARROW = {"top_k": 2, "router_temperature": 0.7, "rng_seed": 3}
TARGETS = {"mlp": ["lin0", "lin1"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def save_experts(tmp_path: Path, case_name: str, count: int, prefix: str, r: int = 2,
                 targets: list[str] | None = None) -> list[str]:
    """`count` PEFT LoRA adapters with random A and B (init_lora_weights=False) and each its own lora_alpha,
    saved in folders under `tmp_path`."""
    folders = []
    for i in range(count):
        case = zoo.FACTORIES[case_name]()
        torch.manual_seed(100 * len(prefix) + i)
        config = peft.LoraConfig(r=r, lora_alpha=4 + i, target_modules=targets or TARGETS[case_name],
                                 init_lora_weights=False)
        folder = tmp_path / f"{prefix}{i}"
        peft.get_peft_model(case.model, config).save_pretrained(folder)
        folders.append(str(folder))
    return folders


def arrow_pair(case_name: str, tasks: list[str], arrow: dict[str, Any], general: list[str] | None = None,
               ) -> tuple[zoo.Case, peftc.AdaptedModel, peft.PeftModel]:
    """peftc's and PEFT's create_arrow_model on two copies of a zoo model, from the same expert folders."""
    case, ref = zoo.FACTORIES[case_name](), zoo.FACTORIES[case_name]()
    am = peftc.create_arrow_model(case.model, tasks, dict(arrow), general_adapter_paths=general,
                                  example_inputs=example(case))
    pm = peft.create_arrow_model(ref.model, tasks, peft.ArrowConfig(**arrow), general_adapter_paths=general)
    return case, am, pm


def call(case: zoo.Case, model: Any, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def test_prototypes_are_pefts_power_iteration():
    """The batched power iteration equals PEFT's per-expert one from the same seed, and finds the top right
    singular vector of B·A (up to sign) where the spectrum has a gap."""
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 12, generator=gen), torch.randn(3, 24, 4, generator=gen)
    config = peft.ArrowConfig(rng_seed=3)
    config.task_adapter_names = []  # (create_arrow_model sets them; the layer copies them)
    layer = ArrowLoraLinearLayer(12, config)
    want = torch.stack([layer.top_right_singular_vec_from_BA(a[e], b[e]) for e in range(3)])
    got = prototypes(eager, a, b, start_vector({"rng_seed": 3}, 12, a.device), 3, torch.float32)
    torch.testing.assert_close(got, want, **TOL)
    u, _ = torch.linalg.qr(torch.randn(24, 2, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(12, 2, generator=gen))
    gapped_b, gapped_a = u * torch.tensor([5.0, 1.0]), v.T  # B·A with singular values 5 and 1
    top = prototypes(eager, gapped_a[None], gapped_b[None], start_vector({"rng_seed": 0}, 12, a.device), 1, None)
    assert abs(torch.dot(top[0], v[:, 0])) > 1 - 1e-6


@pytest.mark.parametrize("case_name, use_gks", [("mlp", False), ("mlp", True), ("llama", False), ("gpt2", True)])
def test_outputs_equal_peft_create_arrow_model(case_name: str, use_gks: bool, tmp_path: Path):
    tasks = save_experts(tmp_path, case_name, 4, "task")
    general = save_experts(tmp_path, case_name, 2, "general") if use_gks else None
    case, am, pm = arrow_pair(case_name, tasks, {**ARROW, "use_gks": use_gks}, general)
    assert am.active_adapters == ["arrow_router"] and list(am.peft_config) == list(pm.peft_config)
    for inputs in (case.inputs, second_inputs(case)):
        with torch.no_grad():
            got, want = call(case, am, inputs), call(case, pm, inputs)
            base = call(case, case.model, inputs)
        assert_same_outputs(got, want)
        # the router changes the output (and, with GKS, differently): not an identity
        got, base = (got, base) if isinstance(got, torch.Tensor) else (got.logits, base.logits)
        assert (got - base).abs().max() > 1e-2


def test_a_bf16_base_routes_in_fp32_as_peft(tmp_path: Path):
    """Over a bf16 base the experts are fp32 (PEFT's autocast_adapter_dtype), the routing runs in fp32, and the
    output is bf16 (within bf16 rounding of PEFT's, which adds the fp32 delta before casting)."""
    tasks = save_experts(tmp_path, "mlp", 3, "task")
    case, ref = zoo.mlp(), zoo.mlp()
    case.model.to(torch.bfloat16)
    ref.model.to(torch.bfloat16)
    x = case.inputs[0].bfloat16()
    am = peftc.create_arrow_model(case.model, tasks, ARROW, example_inputs=(x,))
    pm = peft.create_arrow_model(ref.model, tasks, peft.ArrowConfig(**ARROW))
    assert {p.dtype for n, p in am.named_parameters() if "lora_" in n} == {torch.float32}
    with torch.no_grad():
        got, want, base = am(x), pm(x), case.model(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)
    assert (got.float() - base.float()).abs().max() > 0.1


def test_gks_changes_the_routing_and_keeps_the_loaded_experts(tmp_path: Path):
    tasks, general = save_experts(tmp_path, "mlp", 3, "task"), save_experts(tmp_path, "mlp", 2, "general")
    case, plain, _ = arrow_pair("mlp", tasks, ARROW)
    _, gks, _ = arrow_pair("mlp", tasks, {**ARROW, "use_gks": True}, general)
    before = {k: v.clone() for k, v in gks.state_dict().items() if ".task_" in k}
    with torch.no_grad():
        assert not torch.allclose(plain(*case.inputs), gks(*case.inputs), **TOL)
    # PEFT subtracts the general adapters from its experts' parameters in place; peftc does it in the graph
    assert all(torch.equal(v, gks.state_dict()[k]) for k, v in before.items())


def test_input_gradients_equal_peft_in_train_mode(tmp_path: Path):
    tasks = save_experts(tmp_path, "mlp", 3, "task")
    case, am, pm = arrow_pair("mlp", tasks, ARROW)
    am.train()
    pm.train()
    outs, grads = [], []
    for model in (am, pm):
        x = case.inputs[0].clone().requires_grad_()
        torch.manual_seed(1234)  # (the model's dropout)
        out = model(x)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append(x.grad)
    torch.testing.assert_close(outs[0], outs[1], **TOL)
    torch.testing.assert_close(grads[0], grads[1], **TOL)
    # the experts are frozen, and the router's own A and B never run (PEFT: the same)
    assert all(p.grad is None for _, p in am.named_parameters())
    assert sorted(n for n, p in am.named_parameters() if p.requires_grad) == \
        sorted(n for n, p in pm.named_parameters() if p.requires_grad)


def test_experts_saved_by_peftc_load_in_peft_and_back(tmp_path: Path):
    tasks, general = save_experts(tmp_path, "mlp", 3, "task"), save_experts(tmp_path, "mlp", 2, "general")
    arrow = {**ARROW, "use_gks": True}
    case, am, _ = arrow_pair("mlp", tasks, arrow, general)
    with torch.no_grad():
        want = am(*case.inputs)  # (a forward first: the experts saved are still those loaded)
    am.save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"
    tasks2, general2 = [str(saved / f"task_{i}") for i in range(3)], [str(saved / f"gks_{i}") for i in range(2)]
    case2, am2, pm2 = arrow_pair("mlp", tasks2, arrow, general2)
    with torch.no_grad():
        assert_same_outputs(pm2(*case2.inputs), want)
        assert_same_outputs(am2(*case2.inputs), want)
    # the router's own config is PEFT's
    router = peft.LoraConfig.from_pretrained(saved / "arrow_router")
    assert router.arrow_config.top_k == 2 and router.arrow_config.use_gks
    assert peftc.load_config(saved / "arrow_router").arrow_config["gks_adapter_names"] == ["gks_0", "gks_1"]


def test_router_dropout_drops_the_routed_delta_as_peft(tmp_path: Path):
    """A router's own lora_dropout applies to the routed delta in training (PEFT's create_arrow_model leaves it
    0; here it is set on both sides: peftc's router added by hand, PEFT's dropout module replaced)."""
    tasks = save_experts(tmp_path, "mlp", 3, "task")
    case, ref = zoo.mlp(), zoo.mlp()
    am = peftc.load(case.model, tasks[0], adapter_name="task_0", example_inputs=case.inputs)
    for i, folder in enumerate(tasks[1:], 1):
        am.load_adapter(folder, adapter_name=f"task_{i}")
    am.add_adapter("arrow_router", {"peft_type": "LORA", "r": 2, "target_modules": ["lin0", "lin1"],
                                    "lora_dropout": 0.3, "arrow_config": ARROW})
    am.set_adapter("arrow_router")
    pm = peft.create_arrow_model(ref.model, tasks, peft.ArrowConfig(**ARROW))
    for name in ("lin0", "lin1"):
        pm.base_model.model.get_submodule(name).lora_dropout["arrow_router"] = torch.nn.Dropout(0.3)
    am.train()
    pm.train()
    outs = []
    for model in (am, pm):
        torch.manual_seed(5)
        outs.append(model(*case.inputs))
    torch.testing.assert_close(outs[0], outs[1], **TOL)
    am.eval()
    with torch.no_grad():
        assert not torch.allclose(am(*case.inputs), outs[0], **TOL)


def test_peft_saved_arrow_model_loads_folder_by_folder(tmp_path: Path):
    """PEFT's save_pretrained of an Arrow model (experts, general adapters, the router with its arrow_config)
    loads into peftc adapter by adapter, and routes as PEFT did. (PEFT itself cannot load the router folder:
    its saved arrow_config drops task_adapter_names, and ArrowLoraLinearLayer copies them.) PEFT saves before
    its first forward here: after it, its experts hold the general adapters subtracted in place."""
    tasks, general = save_experts(tmp_path, "mlp", 3, "task"), save_experts(tmp_path, "mlp", 2, "general")
    ref = zoo.mlp()
    pm = peft.create_arrow_model(ref.model, tasks, peft.ArrowConfig(**ARROW, use_gks=True),
                                 general_adapter_paths=general)
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        want = pm(*ref.inputs)
    case = zoo.mlp()
    am = peftc.load(case.model, tmp_path / "peft" / "task_0", adapter_name="task_0", example_inputs=case.inputs)
    for name in ["task_1", "task_2", "gks_0", "gks_1", "arrow_router"]:
        am.load_adapter(tmp_path / "peft" / name, adapter_name=name)
    am.set_adapter("arrow_router")
    with torch.no_grad():
        assert_same_outputs(am(*case.inputs), want)


@pytest.mark.parametrize("use_gks", [False, True])
def test_an_adapter_loaded_after_the_router_joins_its_experts(use_gks: bool, tmp_path: Path):
    """PEFT's on_adapter_change: a LoRA adapter added beside the router is routed over (and, with GKS, has the
    general adapters subtracted), from the next call."""
    tasks = save_experts(tmp_path, "mlp", 3, "task")
    general = save_experts(tmp_path, "mlp", 2, "general") if use_gks else None
    case, am, pm = arrow_pair("mlp", tasks[:2], {**ARROW, "use_gks": use_gks}, general)
    with torch.no_grad():
        before = am(*case.inputs)
        assert_same_outputs(before, pm(*case.inputs))
        am.load_adapter(tasks[2], adapter_name="late")
        pm.load_adapter(tasks[2], adapter_name="late")
        assert_same_outputs(am(*case.inputs), pm(*case.inputs))
        assert not torch.allclose(am(*case.inputs), before, **TOL)


def test_an_expert_alone_is_plain_lora(tmp_path: Path):
    tasks = save_experts(tmp_path, "mlp", 2, "task")
    case, am, pm = arrow_pair("mlp", tasks, ARROW)
    am.set_adapter("task_1")
    pm.set_adapter("task_1")
    with torch.no_grad():
        assert_same_outputs(am(*case.inputs), pm(*case.inputs))


def test_a_changed_expert_changes_the_routing(tmp_path: Path):
    """The prototypes are computed in the graph from the experts (kept while they are unchanged): an in-place
    change of an expert is read at the next call, as a router created over the changed expert computes."""
    tasks = save_experts(tmp_path, "mlp", 3, "task")
    case, am, _ = arrow_pair("mlp", tasks, ARROW)
    with torch.no_grad():
        am(*case.inputs)
        for name, p in am.named_parameters():
            if "task_0" in name:
                p.mul_(3.0)
        got = am(*case.inputs)
    am.save_pretrained(tmp_path / "changed")
    changed = [str(tmp_path / "changed" / f"task_{i}") for i in range(3)]
    case2, _, pm = arrow_pair("mlp", changed, ARROW)
    with torch.no_grad():
        assert_same_outputs(got, pm(*case2.inputs))


def test_inference_computes_the_prototypes_once(tmp_path: Path):
    """The power iteration depends on the experts alone: an inference program's eager lowering keeps it out of
    every call (passes/hoist_invariants.py); per call there remain the routing's matmuls and top-k."""
    tasks = save_experts(tmp_path, "mlp", 3, "task")
    case, am, _ = arrow_pair("mlp", tasks, ARROW)
    with torch.no_grad():
        am(*case.inputs)
    ((_, run),) = am.eager_graphs
    per_call = [str(n.target) for n in run.graph.nodes if n.op == "call_function"]
    hoisted = [str(n.target) for n in run.peftc_hoisted.body.graph.nodes if n.op == "call_function"]
    assert sum("bmm" in t for t in per_call) == 0 and sum("topk" in t for t in per_call) == 2
    assert sum("bmm" in t for t in hoisted) == 2 * (1 + 3 * 15)  # per module: BᵀB, then 15 steps of 3


def test_merging_a_router_is_refused_as_in_peft(tmp_path: Path):
    tasks = save_experts(tmp_path, "mlp", 2, "task")
    _, am, pm = arrow_pair("mlp", tasks, ARROW)
    with pytest.raises(RuntimeError, match="Cannot merge an active Arrow router"):
        pm.merge_and_unload()
    for merge in (am.merge_and_unload, am.merge_adapter, am.fold):
        with pytest.raises(ConfigError, match="cannot merge an Arrow router"):
            merge()


def test_mixed_batches_with_the_router_equal_peft(tmp_path: Path):
    """Per-sample adapters with the router among them (PEFT runs its Arrow variant on the router's sub-batch;
    peftc's dispatch pass runs the router on the batch and keeps its samples' rows)."""
    tasks = save_experts(tmp_path, "mlp", 3, "task")
    case, am, pm = arrow_pair("mlp", tasks, ARROW)
    names = ["arrow_router", "task_0", "__base__", "arrow_router"]
    with torch.no_grad():
        got, want = am(*case.inputs, adapter_names=names), pm(*case.inputs, adapter_names=names)
        routed = am(*case.inputs)
    assert_same_outputs(got, want)
    torch.testing.assert_close(got[[0, 3]], routed[[0, 3]], **TOL)


def test_bad_experts_and_configs_are_errors_naming_them(tmp_path: Path):
    tasks = save_experts(tmp_path, "mlp", 2, "task")
    other_rank = save_experts(tmp_path, "mlp", 1, "wide", r=3)
    other_modules = save_experts(tmp_path, "mlp", 1, "half", targets=["lin0"])
    case = zoo.mlp()
    with pytest.raises(ConfigError, match=f"{other_rank[0]}: rank 3 differs"):
        peftc.create_arrow_model(case.model, [*tasks, *other_rank], ARROW, example_inputs=case.inputs)
    with pytest.raises(ConfigError, match=f"{other_modules[0]}: the adapter's modules differ"):
        peftc.create_arrow_model(case.model, [*tasks, *other_modules], ARROW, example_inputs=case.inputs)
    with pytest.raises(ConfigError, match="general_adapter_paths"):
        peftc.create_arrow_model(case.model, tasks, {**ARROW, "use_gks": True}, example_inputs=case.inputs)
    with pytest.raises(ConfigError, match="at least one"):
        peftc.create_arrow_model(case.model, [], ARROW, example_inputs=case.inputs)
    am = peftc.create_arrow_model(case.model, tasks, {**ARROW, "top_k": 3}, example_inputs=case.inputs)
    with pytest.raises(ConfigError, match=r"top_k'\]=3 but module 'lin0' has 2 expert"):
        am(*case.inputs)
    # a router with no expert beside it (PEFT fails on it too: its task_adapter_names are unset)
    with pytest.raises(ConfigError, match="has no LoRA expert on module 'lin0'"):
        peftc.apply(case.model, {"peft_type": "LORA", "target_modules": ["lin0"], "arrow_config": {}},
                    example_inputs=case.inputs)
    for bad, match in [({"top_k": 0}, "top_k"), ({"router_temperature": 0}, "router_temperature"),
                       ({"use_gks": True}, "gks_adapter_names"), ({"rng_seed": 1.5}, "rng_seed")]:
        with pytest.raises(ConfigError, match=match):
            peftc.load_config({"peft_type": "LORA", "target_modules": ["lin0"], "arrow_config": bad})
    with pytest.raises(ConfigError, match="use_dora=True cannot be combined with arrow_config"):
        peftc.load_config({"peft_type": "LORA", "target_modules": ["lin0"], "use_dora": True, "arrow_config": {}})
    emb = zoo.embedding_model()
    with pytest.raises(ConfigError, match="arrow_config for module 'emb'"):
        peftc.apply(emb.model, {"peft_type": "LORA", "target_modules": ["emb"], "arrow_config": {}},
                    example_inputs=emb.inputs)
