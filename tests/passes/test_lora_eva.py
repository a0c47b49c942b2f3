"""LoRA's EVA init (`init_lora_weights="eva"`, passes/lora_eva.py) against PEFT's `initialize_lora_eva_weights`
and `get_eva_state_dict` on the same model, data and seed: A, the redistributed ranks and alphas, the updated
config, the outputs after init, and then the usual comparison (outputs, gradients, fold, checkpoints both ways)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from peft.tuners.lora.eva import get_eva_state_dict as peft_get_eva_state_dict
from peft.tuners.lora.eva import initialize_lora_eva_weights as peft_initialize
from peft.tuners.tuners_utils import _find_minimal_target_modules
from peftc.passes.lora_eva import minimal_target_modules

import peftc
from peftc.errors import ConfigError
from tests import zoo
from tests.oracle import (
    MethodPair,
    assert_same_outputs,
    check_checkpoints,
    check_eval,
    check_fold,
    check_train,
    randomize_adapters,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
    pytest.mark.filterwarnings("ignore:lora with eva initialization used with low_cpu_mem_usage=False:UserWarning"),
    pytest.mark.filterwarnings("ignore:the following layers were initialized with init_lora_weights=True"),
    pytest.mark.filterwarnings("ignore:EVA. skipping the SVD step:UserWarning"),
]

# q/k/v read the same input: one PCA for the three, as in PEFT
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]


def batches(n: int = 4, batch: int = 4, seq: int = 12, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    """Token batches with a padded row and masked labels (so both masks select positions)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, zoo.VOCAB, (batch, seq), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, seq - 2:] = 0
        labels = ids.clone()
        labels[1, :3] = -100
        labels[2, :2] = 7
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def fields(targets: list[str], eva: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"r": 2, "lora_alpha": 4, "target_modules": targets, "init_lora_weights": "eva",
            "eva_config": {"tau": 0.9, **(eva or {})}, **extra}


def peft_config(f: dict[str, Any]) -> peft.LoraConfig:
    f = copy.deepcopy(f)
    return peft.LoraConfig(**{**f, "eva_config": peft.EvaConfig(**f["eva_config"])})


def eva_pair(name: str, f: dict[str, Any], data: list[dict[str, torch.Tensor]]) -> MethodPair:
    """peftc and PEFT adapters created from one RNG state, then EVA-initialised on the same data from another."""
    case, ref = zoo.FACTORIES[name](), zoo.FACTORIES[name]()
    torch.manual_seed(7)
    am = peftc.apply(case.model, {"peft_type": "LORA", **copy.deepcopy(f)})
    torch.manual_seed(7)
    pm = peft.get_peft_model(ref.model, peft_config(f))
    torch.manual_seed(8)
    peftc.initialize_lora_eva_weights(am, data, show_progress_bar=False)
    torch.manual_seed(8)
    peft_initialize(pm, data, show_progress_bar=False)
    return MethodPair(case, ref, am, pm)


def assert_same_state(am: peftc.AdaptedModel, pm: peft.PeftModel) -> None:
    ours, theirs = am.state_dict(), pm.state_dict()
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def assert_same_config(am: peftc.AdaptedModel, pm: peft.PeftModel) -> None:
    ours, theirs = am.peft_config["default"], pm.peft_config["default"]
    assert ours.rank_pattern == theirs.rank_pattern
    assert ours.alpha_pattern == theirs.alpha_pattern
    assert sorted(ours.target_modules) == sorted(theirs.target_modules)


@pytest.fixture(scope="module")
def llama_pair() -> MethodPair:
    # an embedding too: PEFT's EVA leaves it out and re-creates it with the default init (its draws included)
    return eva_pair("llama", fields([*LLAMA_TARGETS, "embed_tokens"]), batches())


def test_eva_init_equals_peft(llama_pair: MethodPair):
    am, pm = llama_pair.am, llama_pair.pm
    assert_same_state(am, pm)
    assert_same_config(am, pm)
    config = am.peft_config["default"]
    assert config.rank_pattern, "the data redistributed no rank: the test shows nothing"
    # alpha follows the rank (adjust_scaling_factors), so each layer keeps the scale alpha / r
    for path, rank in config.rank_pattern.items():
        assert config.alpha_pattern[path] == config.lora_alpha * rank / config.r
    with torch.no_grad():  # B is zero: the outputs are still the base model's
        ids = batches()[0]["input_ids"]
        assert_same_outputs(am(input_ids=ids), llama_pair.case.model(input_ids=ids))
        assert_same_outputs(am(input_ids=ids), pm(input_ids=ids))


def test_eva_adapter_trains_folds_and_loads_both_ways(llama_pair: MethodPair, tmp_path: Path):
    pair = copy.copy(llama_pair)
    pair.am, pair.pm = copy.deepcopy(llama_pair.am), copy.deepcopy(llama_pair.pm)
    randomize_adapters(pair.am)
    pair.pm.load_state_dict(pair.am.state_dict())
    check_eval(pair)
    check_checkpoints(pair, tmp_path)  # the saved config's rank_pattern / alpha_pattern re-create the ranks
    check_fold(pair)
    check_train(pair)
    saved = peft.LoraConfig.from_pretrained(tmp_path / "peftc")
    assert saved.init_lora_weights == "eva" and saved.rank_pattern == pair.pm.peft_config["default"].rank_pattern


def test_eva_on_conv1d_layers_equals_peft():
    pair = eva_pair("gpt2", fields(["c_attn"]), batches(seed=5))
    assert_same_state(pair.am, pair.pm)
    assert_same_config(pair.am, pair.pm)
    assert pair.am.peft_config["default"].rank_pattern  # the two layers' ranks were redistributed


def given_pair(f: dict[str, Any], sd: dict[str, torch.Tensor]) -> MethodPair:
    """peftc and PEFT on the MLP, initialised from the same given EVA state dict (no data: fast)."""
    case, ref = zoo.mlp(), zoo.mlp()
    torch.manual_seed(7)
    am = peftc.apply(case.model, {"peft_type": "LORA", **copy.deepcopy(f)}, example_inputs=case.inputs)
    torch.manual_seed(7)
    pm = peft.get_peft_model(ref.model, peft_config(f))
    torch.manual_seed(8)
    peftc.initialize_lora_eva_weights(am, eva_state_dict=copy.deepcopy(sd))
    torch.manual_seed(8)
    peft_initialize(pm, eva_state_dict={f"base_model.model.{k}": v for k, v in copy.deepcopy(sd).items()})
    return MethodPair(case, ref, am, pm)


MLP_SD = {"lin0": torch.linspace(-1, 1, 36).reshape(3, 12), "lin1": torch.linspace(0, 1, 24).reshape(1, 24)}


def test_eva_with_dora_equals_peft():
    pair = given_pair(fields(["lin0", "lin1"], use_dora=True), MLP_SD)
    assert_same_state(pair.am, pair.pm)  # the magnitude of a re-created layer is ||W|| again (B is zero)
    assert_same_config(pair.am, pair.pm)


# every EvaConfig field: a non-default value changes EVA's A or ranks, and equals PEFT's (a plain model's
# get_eva_state_dict, the step that reads them; adjust_scaling_factors acts when the ranks are applied, below)
FIELD_VALUES = {"rho": 1.0, "tau": 0.5, "use_label_mask": False, "label_mask_value": 7}


def plain_eva(f: dict[str, Any], data: list[dict[str, torch.Tensor]], **kwargs: Any) -> tuple[dict, dict]:
    model = zoo.llama().model
    ours = peftc.get_eva_state_dict(model, data, {"peft_type": "LORA", **copy.deepcopy(f)}, show_progress_bar=False,
                                    **copy.deepcopy(kwargs))
    theirs = peft_get_eva_state_dict(model, data, peft_config(f), show_progress_bar=False, **copy.deepcopy(kwargs))
    return ours, theirs


def assert_same_eva(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert list(ours) == list(theirs)
    for key, value in ours.items():
        assert value.shape == theirs[key].shape, key
        torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(a[k].shape != b[k].shape or not torch.allclose(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def default_eva() -> dict[str, torch.Tensor]:
    ours, theirs = plain_eva(fields(LLAMA_TARGETS), batches())
    assert_same_eva(ours, theirs)
    return ours


@pytest.mark.parametrize("field", sorted(FIELD_VALUES))
def test_each_eva_config_field_changes_the_init_as_in_peft(field: str, default_eva: dict[str, torch.Tensor]):
    ours, theirs = plain_eva(fields(LLAMA_TARGETS, {field: FIELD_VALUES[field]}), batches())
    assert_same_eva(ours, theirs)
    assert differs(ours, default_eva), f"eva_config {field}={FIELD_VALUES[field]!r} changed nothing"


def test_whiten_divides_each_layer_once(default_eva: dict[str, torch.Tensor]):
    """Whitening scales each component by 1/sqrt(its singular value). PEFT divides the components of a PCA
    shared by a group of layers reading one input (q, k, v) in place, once per layer of the group, and the
    group's A are views of that one tensor: each ends up divided once per layer whose rank covers the row.
    peftc divides each layer's copy once. Layers reading an input of their own equal PEFT's."""
    ours, theirs = plain_eva(fields(LLAMA_TARGETS, {"whiten": True}), batches())
    for layer in ("0", "1"):
        q, k, v, down = (f"model.layers.{layer}.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj",
                                                               "self_attn.v_proj", "mlp.down_proj"))
        torch.testing.assert_close(ours[down], theirs[down])
        group = (q, k, v)
        for name in group:
            plain = default_eva[name]
            scale = ours[name].norm(dim=1)  # 1 / sqrt(s): the unwhitened rows are unit vectors
            torch.testing.assert_close(ours[name], plain * scale[:, None])
            times = torch.tensor([sum(len(ours[m]) > i for m in group) for i in range(len(plain))])
            torch.testing.assert_close(theirs[name], plain * (scale ** times)[:, None])
        assert any(len(ours[m]) for m in group)


def test_adjust_scaling_factors_off_keeps_alpha():
    pair = given_pair(fields(["lin0", "lin1"], {"adjust_scaling_factors": False}), MLP_SD)
    assert_same_state(pair.am, pair.pm)
    assert_same_config(pair.am, pair.pm)
    config = pair.am.peft_config["default"]
    assert config.rank_pattern == {"lin0": 3, "lin1": 1} and config.alpha_pattern == {}
    on = given_pair(fields(["lin0", "lin1"]), MLP_SD).am.peft_config["default"]
    assert on.alpha_pattern == {"lin0": 6.0, "lin1": 2.0}


def test_a_given_state_dict_with_rank_zero_drops_the_adapter_as_peft():
    """initialize_lora_eva_weights(eva_state_dict=...): a layer given rank 0 loses its adapter and leaves
    target_modules; another's new rank is recorded; the saved config re-creates it in PEFT."""
    f = fields(["q_proj", "down_proj"])
    case, ref = zoo.llama(), zoo.llama()
    am = peftc.apply(case.model, {"peft_type": "LORA", **copy.deepcopy(f)})
    pm = peft.get_peft_model(ref.model, peft_config(f))
    gen = torch.Generator().manual_seed(0)
    sd = {"model.layers.0.self_attn.q_proj": torch.zeros(0, 32),
          "model.layers.1.self_attn.q_proj": torch.randn(3, 32, generator=gen),
          "model.layers.0.mlp.down_proj": torch.randn(2, 48, generator=gen),
          "model.layers.1.mlp.down_proj": torch.randn(1, 48, generator=gen)}
    torch.manual_seed(1)
    peftc.initialize_lora_eva_weights(am, eva_state_dict=copy.deepcopy(sd))
    torch.manual_seed(1)
    peft_initialize(pm, eva_state_dict={f"base_model.model.{k}": v for k, v in copy.deepcopy(sd).items()})
    assert_same_state(am, pm)
    assert_same_config(am, pm)
    assert "model.layers.0.self_attn.q_proj" not in am.targeted_modules
    assert am.peft_config["default"].rank_pattern == {"model.layers.1.self_attn.q_proj": 3,
                                                      "model.layers.1.mlp.down_proj": 1}


def test_a_model_without_token_inputs_takes_custom_functions():
    """PEFT's hooks for any model: no position selection, a forward_fn for positional inputs."""
    f = fields(["lin0", "lin1"])
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 12, generator=gen) for _ in range(4)]
    kwargs = {"forward_fn": lambda m, x: m(x), "prepare_model_inputs_fn": None, "prepare_layer_inputs_fn": None,
              "show_progress_bar": False}
    case, ref = zoo.mlp(), zoo.mlp()
    torch.manual_seed(7)
    am = peftc.apply(case.model, {"peft_type": "LORA", **copy.deepcopy(f)}, example_inputs=case.inputs)
    torch.manual_seed(7)
    pm = peft.get_peft_model(ref.model, peft_config(f))
    torch.manual_seed(8)
    peftc.initialize_lora_eva_weights(am, data, **kwargs)
    torch.manual_seed(8)
    peft_initialize(pm, data, **kwargs)
    assert_same_state(am, pm)
    assert_same_config(am, pm)


def test_minimal_target_modules_equals_peft():
    targets = [f"model.layers.{i}.self_attn.{m}" for i in range(12) for m in ("q_proj", "v_proj")]
    others = [f"model.layers.{i}.self_attn.k_proj" for i in range(12)] + ["model.layers.3.mlp.q_proj"]
    assert minimal_target_modules(targets, others) == _find_minimal_target_modules(targets, others)
    assert minimal_target_modules(targets, others[:12]) == {"q_proj", "v_proj"}


@pytest.mark.parametrize(("extra", "match"), [
    ({"eva_config": {"rho": 0.5}}, r"eva_config\['rho'\] must be >= 1.0"),
    ({"eva_config": {"tau": 1.5}}, r"eva_config\['tau'\] must be between 0.0 and 1.0"),
    ({"eva_config": {"whiten": "yes"}}, r"eva_config\['whiten'\] must be True or False"),
    ({"eva_config": {"label_mask_value": 1.5}}, r"eva_config\['label_mask_value'\] must be an integer"),
    ({"eva_config": {"lowrank": True}}, r"eva_config: unknown field\(s\) \['lowrank'\]"),
    ({"target_modules": [], "target_parameters": ["lin0.weight"]}, "eva.*cannot be combined with target_parameters"),
    ({"lora_bias": True}, "lora_bias=True needs init_lora_weights True or False"),
])
def test_bad_eva_configs_are_errors_naming_the_field(extra: dict[str, Any], match: str):
    with pytest.raises(ConfigError, match=match):
        peftc.LoraConfig(**{**fields(["lin0"]), **extra})


def test_eva_without_eva_config_takes_the_defaults_with_peft_warning():
    with pytest.warns(UserWarning, match="eva_config` is not specified"):
        config = peftc.LoraConfig(r=2, target_modules=["lin0"], init_lora_weights="eva")
    assert config.eva_config == {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100,
                                 "whiten": False, "adjust_scaling_factors": True}


def test_eva_on_a_convolution_is_refused_as_in_peft():
    case = zoo.cnn()
    with pytest.raises(ConfigError, match="init_lora_weights='eva' is not available for module 'conv0'"):
        peftc.apply(case.model, {"peft_type": "LORA", **fields(["conv0"])}, example_inputs=case.inputs)


def test_bad_calls_are_errors():
    case = zoo.mlp()
    am = peftc.apply(case.model, {"peft_type": "LORA", **fields(["lin0", "lin1"])}, example_inputs=case.inputs)
    with pytest.raises(ConfigError, match="give a dataloader or an eva_state_dict"):
        peftc.initialize_lora_eva_weights(am)
    with pytest.raises(ConfigError, match="dataloader is empty"):
        peftc.initialize_lora_eva_weights(am, [])
    with pytest.raises(ConfigError, match=r"eva_state_dict\['lin0'\] has shape \(2, 5\): module 'lin0' needs"):
        peftc.initialize_lora_eva_weights(am, eva_state_dict={"lin0": torch.zeros(2, 5)})
    with pytest.raises(ConfigError, match=r"not nn.Linear / Conv1D layers adapter 'default' adapts: \['drop'\]"):
        peftc.initialize_lora_eva_weights(am, eva_state_dict={"drop": torch.zeros(2, 5)})
    with pytest.raises(ConfigError, match="peft_config is required"):
        peftc.get_eva_state_dict(case.model, [case.inputs])
    plain = peftc.apply(zoo.mlp().model, {"peft_type": "LORA", "r": 2, "target_modules": ["lin0"]},
                        example_inputs=case.inputs)
    with pytest.raises(ConfigError, match="needs adapter 'default' created with init_lora_weights='eva'"):
        peftc.initialize_lora_eva_weights(plain, [case.inputs])


def test_other_adapters_keep_their_place_and_values():
    case = zoo.mlp()
    am = peftc.apply(case.model, {"peft_type": "LORA", "r": 2, "target_modules": ["lin0"]}, "other",
                     example_inputs=case.inputs)
    am.add_adapter("default", {"peft_type": "LORA", **fields(["lin0", "lin1"])})
    am.set_adapter("default")
    randomize_adapters(am)
    before = {k: v.clone() for k, v in am.state_dict().items() if ".other." in k}
    gen = torch.Generator().manual_seed(0)
    sd = {"lin0": torch.randn(3, 12, generator=gen), "lin1": torch.randn(1, 24, generator=gen)}
    peftc.initialize_lora_eva_weights(am, eva_state_dict=sd)
    assert am.adapter_order == ["other", "default"] and am.active_adapters == ["default"]
    after = am.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(after["base_model.model.lin0.lora_A.default.weight"], sd["lin0"])
    assert am.peft_config["default"].rank_pattern == {"lin0": 3, "lin1": 1}


def test_redistributed_ranks_with_rslora_are_an_error_naming_the_fields():
    case = zoo.mlp()
    am = peftc.apply(case.model, {"peft_type": "LORA", **fields(["lin0"], use_rslora=True)},
                     example_inputs=case.inputs)
    with pytest.raises(ConfigError, match="rank_pattern / alpha_pattern.*use_rslora"):
        peftc.initialize_lora_eva_weights(am, eva_state_dict={"lin0": torch.zeros(3, 12)})
    peftc.initialize_lora_eva_weights(am, eva_state_dict={"lin0": torch.ones(2, 12)})  # the same rank: no pattern
    assert torch.equal(am.state_dict()["base_model.model.lin0.lora_A.default.weight"], torch.ones(2, 12))


def test_per_layer_input_functions_equal_peft():
    """prepare_layer_inputs_fn as a dict by module path: that layer's own selection, the others every position."""
    def last_positions(layer_input: Any, model_input: Any, name: str) -> torch.Tensor:
        return layer_input[0][:, -4:].reshape(-1, layer_input[0].shape[-1])

    fns = {"model.layers.0.mlp.down_proj": last_positions}
    ours, theirs = plain_eva(fields(LLAMA_TARGETS), batches(), prepare_layer_inputs_fn=fns)
    assert_same_eva(ours, theirs)
    with pytest.raises(ConfigError, match=r"prepare_layer_inputs_fn names module\(s\) EVA does not initialise"):
        peftc.get_eva_state_dict(zoo.llama().model, batches(), {"peft_type": "LORA", **fields(LLAMA_TARGETS)},
                                 prepare_layer_inputs_fn={"lm_head": last_positions})
