"""No field of PEFT 0.21.2's config classes is silently ignored.

For every method peftc registers, this walks every field of PEFT's config class and requires each to be, in
this file's tables, exactly one of:

- refused by name: in the config's `unsupported` (with its reason); a non-default value is a ConfigError
  naming the field and giving the reason;
- supported, shown by behaviour: a non-default value changes the adapted model (initial adapter tensors,
  trainable set, saved keys, outputs in eval or train mode, or the gradients of a training step) on a tiny
  zoo model;
- supported, shown by rank allocation (AdaLoRA's schedule): a non-default value changes the rank patterns
  `update_and_allocate` sets over a short training run;
- supported as metadata: a non-default value is accepted and round-trips through `adapter_config.json`
  (fields that select nothing the tiny models can show, or that PEFT reads only with a refused field);
- corrected as PEFT does (`fan_in_fan_out` on a layer whose layout contradicts it: a warning);
- supported over adapters beside it (`arrow_config`: a router over the LoRA experts on its modules): alone a
  ConfigError naming the field; beside two of the example config's adapters (random values), its outputs
  differ from each of them alone.

Values of a supported field that peftc refuses are in REFUSED_VALUES, each a ConfigError naming the field; further
values it supports are in MORE_VALUES, shown by behaviour as its row is.
A new PEFT field, or a field dropped from `unsupported` without a row here, fails the walk.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftc
from peftc.config import load_config, registered_configs
from peftc.errors import ConfigError
from peftc.method import METHODS
from tests import zoo
from tests.oracle import randomize_adapters, train_inputs

pytestmark = [pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
              pytest.mark.filterwarnings("ignore:fan_in_fan_out:UserWarning"),
              pytest.mark.filterwarnings("ignore:Note that `r` is not used in AdaLora:UserWarning")]

PEFT_VERSION = "0.21.2"
REGISTERED = sorted(registered_configs())

# fields every PeftConfig has, whatever the method: metadata peftc round-trips (task_type's heads, and
# inference_mode, are shown by behaviour below)
COMMON_METADATA = {"peft_type": None, "auto_mapping": {"base_model_class": "MLP"}, "peft_version": "0.0.1",
                   "base_model_name_or_path": "some/model", "revision": "v1", "task_type": "CAUSAL_LM"}
COMMON_BEHAVIOUR = {"inference_mode": {"inference_mode": True}}

# per method: field -> the changes (the field among them) that must make a difference against the method's example
# config, on the example model unless "model" / "base" (changes applied to both sides) say otherwise
Change = dict[str, Any]
BEHAVIOUR: dict[str, dict[str, Change]] = {
    "LORA": {
        "r": {"r": 4}, "target_modules": {"target_modules": ["lin0"]},
        "exclude_modules": {"exclude_modules": ["lin1"]}, "lora_alpha": {"lora_alpha": 16},
        "lora_dropout": {"lora_dropout": 0.5}, "use_rslora": {"use_rslora": True},
        "modules_to_save": {"target_modules": ["lin0"], "modules_to_save": ["lin1"]},
        "init_lora_weights": {"init_lora_weights": False}, "rank_pattern": {"rank_pattern": {"lin0": 4}},
        "alpha_pattern": {"alpha_pattern": {"lin0": 16}}, "use_dora": {"use_dora": True},
        "lora_bias": {"lora_bias": True},
        "target_parameters": {"target_modules": [], "target_parameters": ["lin0.weight"]},
        "trainable_token_indices": {"trainable_token_indices": {"emb": [3]}, "model": "embedding_model",
                                    "base": {"target_modules": ["proj"]}},
        "bias": {"bias": "all"},
        "kasa_config": {"kasa_config": {"beta": 0.01, "gamma": 0.1}},
        "use_bdlora": {"use_bdlora": {"target_modules_bd_a": ["lin1"], "target_modules_bd_b": ["lin0"], "nblocks": 2}},
        # (the same forward: A's gradient comes from the compressed activations)
        "velora_config": {"velora_config": {"num_groups": 3}},
        # (outside training MonteCLoRA is LoRA plus its sampler's tensors; in training A takes sampled noise)
        "monteclora_config": {"monteclora_config": {"num_samples": 3, "buffer_size": 2, "sample_scaler": 0.01}},
        "layer_replication": {"layer_replication": [[0, 2], [1, 2]], "model": "llama",
                              "base": {"target_modules": ["q_proj", "v_proj"]}},
        # (int8 instead of NF4, two iterations: another dequantised base and other factors)
        "loftq_config": {"loftq_config": {"loftq_bits": 8, "loftq_iter": 2},
                         "base": {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}},
    },
    "ADALORA": {
        "target_modules": {"target_modules": ["lin0"]}, "exclude_modules": {"exclude_modules": ["lin1"]},
        "lora_alpha": {"lora_alpha": 8}, "lora_dropout": {"lora_dropout": 0.5},
        "init_lora_weights": {"init_lora_weights": True}, "init_r": {"init_r": 4},
        "rank_pattern": {"rank_pattern": {"lin0.lora_E": [True, False, True]}},
        # (added to the loss by PEFT's model for a task type only)
        "orth_reg_weight": {"orth_reg_weight": 0.1, "model": "llama",
                            "base": {"task_type": "CAUSAL_LM", "target_modules": ["q_proj", "v_proj"]}},
        "modules_to_save": {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}, "bias": {"bias": "all"},
        "layer_replication": {"layer_replication": [[0, 2], [1, 2]], "model": "llama",
                              "base": {"target_modules": ["q_proj", "v_proj"]}},
    },
    "TRAINABLE_TOKENS": {
        "token_indices": {"token_indices": [3]}, "init_weights": {"init_weights": False},
        "target_modules": {"target_modules": ["position_embeddings"], "model": "bert",
                           "base": {"target_modules": ["word_embeddings"]}},
    },
    "IA3": {
        "target_modules": {"target_modules": ["lin1"]}, "exclude_modules": {"exclude_modules": ["lin0"]},
        "feedforward_modules": {"feedforward_modules": []},
        "modules_to_save": {"target_modules": ["lin0"], "feedforward_modules": [], "modules_to_save": ["lin1"]},
        "init_ia3_weights": {"init_ia3_weights": False},
    },
    "LOHA": {
        "rank_pattern": {"rank_pattern": {"lin0": 4}}, "alpha_pattern": {"alpha_pattern": {"lin0": 16}},
        "r": {"r": 4}, "alpha": {"alpha": 16}, "rank_dropout": {"rank_dropout": 0.5},
        "module_dropout": {"module_dropout": 0.9},
        "use_effective_conv2d": {"use_effective_conv2d": True, "model": "cnn",
                                 "base": {"target_modules": ["conv1"]}},
        "target_modules": {"target_modules": ["lin0"]}, "exclude_modules": {"exclude_modules": ["lin1"]},
        "init_weights": {"init_weights": False},
        "modules_to_save": {"target_modules": ["lin0"], "modules_to_save": ["lin1"]},
    },
    "OFT": {
        "bias": {"bias": "all"},
        "r": {"r": 3, "oft_block_size": 0}, "oft_block_size": {"oft_block_size": 6},
        "target_modules": {"target_modules": ["lin0"]},
        "exclude_modules": {"exclude_modules": ["lin1"]}, "init_weights": {"init_weights": False},
        "modules_to_save": {"target_modules": ["lin0"], "modules_to_save": ["lin1"]},
        "block_share": {"block_share": True}, "use_cayley_neumann": {"use_cayley_neumann": False},
        "num_cayley_neumann_terms": {"num_cayley_neumann_terms": 2},
        "coft": {"coft": True, "base": {"init_weights": False}},
        "eps": {"eps": 1e-3, "base": {"coft": True, "init_weights": False}},
    },
    "BOFT": {
        "bias": {"bias": "all"},
        "boft_block_size": {"boft_block_size": 2}, "boft_block_num": {"boft_block_size": 0, "boft_block_num": 2},
        "target_modules": {"target_modules": ["lin0"]}, "exclude_modules": {"exclude_modules": ["lin1"]},
        "boft_dropout": {"boft_dropout": 0.5}, "init_weights": {"init_weights": False},
        "boft_n_butterfly_factor": {"boft_n_butterfly_factor": 2, "base": {"boft_block_size": 2}},
        "modules_to_save": {"target_modules": ["lin0"], "modules_to_save": ["lin1"]},
    },
    "HRA": {
        "bias": {"bias": "all"},
        "r": {"r": 4}, "apply_GS": {"apply_GS": True}, "target_modules": {"target_modules": ["lin0"]},
        "exclude_modules": {"exclude_modules": ["lin1"]}, "init_weights": {"init_weights": False},
        "modules_to_save": {"target_modules": ["lin0"], "modules_to_save": ["lin1"]},
    },
    "VERA": {
        "bias": {"bias": "all"},
        "r": {"r": 2}, "target_modules": {"target_modules": ["lin0"]},
        "projection_prng_key": {"projection_prng_key": 7}, "save_projection": {"save_projection": False},
        "vera_dropout": {"vera_dropout": 0.5}, "d_initial": {"d_initial": 0.5},
        "init_weights": {"init_weights": False},
        "modules_to_save": {"target_modules": ["lin0"], "modules_to_save": ["lin1"]},
    },
}
BEHAVIOUR["LOKR"] = {**BEHAVIOUR["LOHA"], "decompose_both": {"decompose_both": True, "base": {"r": 1}},
                     # (LoKr factors a small layer's weight whole unless r is below half its factors)
                     "use_effective_conv2d": {"use_effective_conv2d": True, "model": "cnn",
                                              "base": {"target_modules": ["conv1"], "r": 1}},
                     "decompose_factor": {"decompose_factor": 2},
                     "rank_dropout_scale": {"rank_dropout_scale": True, "base": {"rank_dropout": 0.5}}}
# further values of a field shown by behaviour above: (field, the changes), each shown the same way
MORE_VALUES: dict[str, list[tuple[str, Change]]] = {
    "LORA": [("bias", {"bias": "lora_only"}), ("init_lora_weights", {"init_lora_weights": "orthogonal"}),
             ("init_lora_weights", {"init_lora_weights": "mica"}),
             ("init_lora_weights", {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}),
             # (A keeps its first draw until initialize_lora_eva_weights: one draw fewer than True's)
             ("init_lora_weights", {"init_lora_weights": "eva"}),
             ("velora_config", {"velora_config": {"num_groups": 3, "init_type": "batch_average_once"}})],
    "ADALORA": [("bias", {"bias": "lora_only"})],
}
# AdaLoRA's schedule fields act only through `update_and_allocate` (rank allocation while training): field -> the
# changes that must change the rank patterns over ALLOCATION_STEPS steps, against the example config with
# ALLOCATION_BASE (a warm-up and a larger init_r, so that the importance averages decide close rankings)
ALLOCATION: dict[str, dict[str, Change]] = {
    "ADALORA": {"target_r": {"target_r": 1}, "tinit": {"tinit": 1}, "tfinal": {"tfinal": 3},
                "deltaT": {"deltaT": 2}, "total_step": {"total_step": 8}, "beta1": {"beta1": 0.1},
                "beta2": {"beta2": 0.1}},
}
ALLOCATION_BASE, ALLOCATION_STEPS = {"tinit": 3, "init_r": 6}, 12

# field -> (a non-default value, why it is metadata here); each must round-trip through adapter_config.json
LAYERS = "selects layers by index in a model with numbered layers (tests/peftc/test_targets.py checks it)"
METADATA: dict[str, dict[str, tuple[Any, str]]] = {
    peft_type: {"layers_to_transform": ([0], LAYERS), "layers_pattern": (["layers"], LAYERS)}
    for peft_type in ("LORA", "ADALORA", "LOHA", "LOKR", "OFT", "BOFT", "HRA", "VERA")
}
METADATA["LORA"]["eva_config"] = (
    {"rho": 1.5, "tau": 0.9, "use_label_mask": False, "label_mask_value": 0, "whiten": True,
     "adjust_scaling_factors": False},
    "read by peftc.initialize_lora_eva_weights, which takes data: tests/passes/test_lora_eva.py shows each field "
    "changing EVA's A, ranks or alphas as in PEFT")
METADATA["LORA"].update({
    # (read with init_lora_weights='corda' / 'lora_ga' after peftc.preprocess_corda / preprocess_loraga ran the
    # user's data: tests/passes/test_lora_corda.py and test_lora_ga.py show every sub-field against PEFT)
    "corda_config": ({"cache_file": None, "covariance_file": None, "corda_method": "kpm", "verbose": False,
                      "use_float16_for_covariance": False, "prune_temporary_fields": True},
                     "acts only with init_lora_weights='corda' and preprocess_corda"),
    "lora_ga_config": ({"direction": "ArBr", "scale": "unit", "stable_gamma": 16},
                       "acts only with init_lora_weights='lora_ga' and preprocess_loraga"),
})
for peft_type in ("LORA", "ADALORA"):
    METADATA[peft_type].update({
        "megatron_core": ("my.megatron", "PEFT reads it only with megatron_config, which is refused"),
        "qalora_group_size": (32, "PEFT reads it only with use_qalora, which is refused"),
    })
# fields PEFT corrects to the layer's layout with a warning (peftc reads the layout from the layer's type)
CORRECTED = {"LORA": ["fan_in_fan_out"], "ADALORA": ["fan_in_fan_out"], "IA3": ["fan_in_fan_out"],
             "VERA": ["fan_in_fan_out"]}
# fields that act over the adapters beside the one configured: field -> the change (tests/passes/test_lora_arrow.py
# compares Arrow with PEFT's create_arrow_model)
BESIDE: dict[str, dict[str, Change]] = {"LORA": {"arrow_config": {"arrow_config": {"top_k": 2, "rng_seed": 0}}}}
# fields whose every value computes the same in PEFT: field -> (a value, why); accepted, and saved unless run-time
NO_EFFECT: dict[str, dict[str, tuple[Any, str]]] = {
    "LORA": {"runtime_config": ({"ephemeral_gpu_offload": True}, "it moves DoRA's init to the GPU: speed only")},
    "ADALORA": {"r": (4, "AdaLoRA's layers take init_r; PEFT warns that r is not used"),
                "runtime_config": ({"ephemeral_gpu_offload": True}, "PEFT reads it only for DoRA, which AdaLoRA "
                                                                      "refuses")},
    "OFT": {"module_dropout": (0.5, "PEFT 0.21's OFT forward never calls its dropout layer (passes/oft.py)")},
}
# values of fields that are refused: (field, value, what the error says); a field listed nowhere else accepts
# only its default
REFUSED_VALUES: dict[str, list[tuple[str, Any, str]]] = {
    "ADALORA": [("bias", "adalora_only", "must be .none., .all. or .lora_only."),
                ("init_lora_weights", "gaussian", "AdaLoRA initialises with True")],
}
# a refused field's non-default value, where the generic one (below) does not fit its type
REFUSED_EXAMPLES: dict[str, Any] = {"use_bdlora": {"nblocks": 2}}


def peft_fields(peft_type: str) -> list[str]:
    return [f.name for f in dataclasses.fields(peft.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type])]


def non_default(value: Any) -> Any:
    """A value unlike a refused field's default, of a plausible type."""
    if isinstance(value, bool):
        return not value
    if value is None or value == {} or value == []:
        return {"x": 1}
    if isinstance(value, str):
        return value + "_other"
    return value + 1


def test_peft_is_the_version_walked():
    assert peft.__version__ == PEFT_VERSION


@pytest.mark.parametrize("peft_type", REGISTERED)
def test_every_peft_field_is_supported_or_refused_with_a_reason(peft_type: str):
    """Each of PEFT's fields has exactly one row here, and peftc's config has the field with PEFT's default."""
    cls = registered_configs()[peft_type]
    refused = set(cls.unsupported)
    rows = [set(COMMON_METADATA), set(COMMON_BEHAVIOUR), set(BEHAVIOUR.get(peft_type, {})),
            set(ALLOCATION.get(peft_type, {})), set(METADATA.get(peft_type, {})), set(CORRECTED.get(peft_type, [])),
            set(NO_EFFECT.get(peft_type, {})), set(BESIDE.get(peft_type, {})), refused]
    fields = peft_fields(peft_type)
    rows.append({f for f, _, _ in REFUSED_VALUES.get(peft_type, [])} - set(BEHAVIOUR.get(peft_type, {})))
    listed = [f for row in rows for f in row]
    twice = sorted(f for f in listed if listed.count(f) > 1 or f not in fields)
    assert sorted(listed) == sorted(fields), f"no row: {sorted(set(fields) - set(listed))}; not PEFT's/twice: {twice}"
    ours = {f.name for f in dataclasses.fields(cls)}
    assert set(fields) <= ours
    assert all(isinstance(cls.unsupported[name], str) and len(cls.unsupported[name]) > 10 for name in refused)
    example = METHODS[peft_type].example_config
    fields_given = {k: v for k, v in example.items() if k != "peft_type"}
    defaults = peft.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](**fields_given).to_dict()
    mine = load_config(example).to_dict()
    for name in set(fields) - set(example) - set(NO_EFFECT.get(peft_type, {})) - {"peft_version"}:
        assert _plain(mine[name]) == _plain(defaults[name]), name


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value.value if hasattr(value, "value") else value, default=sorted))


@pytest.mark.parametrize("peft_type, name", [(t, n) for t in REGISTERED for n in registered_configs()[t].unsupported])
def test_a_refused_field_is_an_error_naming_it_and_the_reason(peft_type: str, name: str):
    cls = registered_configs()[peft_type]
    default = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = default.default if default.default is not dataclasses.MISSING else default.default_factory()
    value = REFUSED_EXAMPLES.get(name, non_default(default))
    with pytest.raises(ConfigError) as info:
        load_config({**METHODS[peft_type].example_config, name: value})
    assert f"{name}=" in str(info.value) and cls.unsupported[name] in str(info.value)


@pytest.mark.parametrize("peft_type, name, value, match",
                         [(t, *row) for t, rows in REFUSED_VALUES.items() for row in rows])
def test_a_refused_value_is_an_error_naming_the_field(peft_type: str, name: str, value: Any, match: str):
    with pytest.raises(ConfigError, match=match):
        load_config({**METHODS[peft_type].example_config, name: value})


def fingerprint(model_name: str, config: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """What an adapter config makes of a zoo model: its initial tensors, trainable set, saved keys, and
    its outputs (random adapter values, the same for the same shapes) in eval and train mode, with the
    gradients of the train output (its loss, where the model computes one; else the squares' sum)."""
    case = zoo.FACTORIES[model_name]()
    torch.manual_seed(0)
    am = peftc.apply(case.model, copy.deepcopy(config), example_inputs=case.inputs)
    state = {k: v.detach().clone() for k, v in am.state_dict().items()}
    trainable = sorted(n for n, p in am.named_parameters() if p.requires_grad)
    am.save_adapter(tmp_path)
    saved = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    randomize_adapters(am, seed=0)
    with torch.no_grad():
        am.eval()
        out = tensors_of(case.call(am))
    found = {"state": state, "trainable": trainable, "saved": saved, "eval": out}
    am.train()
    torch.manual_seed(1)
    out_train = tensors_of(case.call(am, train_inputs(case)))
    loss = out_train["loss"] if "loss" in out_train else sum(t.float().pow(2).sum() for t in out_train.values())
    if loss.requires_grad:
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in am.named_parameters() if p.grad is not None}
    return {**found, "train": {k: t.detach() for k, t in out_train.items()}, "grads": grads}


def tensors_of(out: Any) -> dict[str, torch.Tensor]:
    """A model's output as its tensors by name (a transformers output's loss, logits, hidden states; not its
    cache, an object compared by identity)."""
    if isinstance(out, torch.Tensor):
        return {"out": out}
    if isinstance(out, dict):
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    return {str(i): v for i, v in enumerate(out) if isinstance(v, torch.Tensor)}


def differs(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() != b.keys() or any(differs(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return a.shape != b.shape or not torch.equal(a, b)
    return a != b


@pytest.mark.parametrize("peft_type, name", [(t, n) for t in REGISTERED
                                             for n in [*BEHAVIOUR.get(t, {}), *COMMON_BEHAVIOUR]])
def test_a_supported_field_changes_what_is_computed(peft_type: str, name: str, tmp_path: Path):
    assert_changes(peft_type, name, {**BEHAVIOUR.get(peft_type, {}), **COMMON_BEHAVIOUR}[name], tmp_path)


@pytest.mark.parametrize("peft_type, name, change", [(t, *row) for t, rows in MORE_VALUES.items() for row in rows])
def test_another_value_of_a_supported_field_changes_what_is_computed(peft_type: str, name: str, change: Change,
                                                                     tmp_path: Path):
    assert_changes(peft_type, name, change, tmp_path)


def assert_changes(peft_type: str, name: str, change: Change, tmp_path: Path) -> None:
    change = dict(change)
    model, base = change.pop("model", METHODS[peft_type].example_model), change.pop("base", {})
    assert name in change
    config = {**METHODS[peft_type].example_config, **base}
    before = fingerprint(model, config, tmp_path / "before")
    after = fingerprint(model, {**config, **change}, tmp_path / "after")
    assert differs(before, after), f"{peft_type}.{name}={change[name]!r} changed nothing"


@pytest.mark.parametrize("peft_type, name", [(t, n) for t, rows in BESIDE.items() for n in rows])
def test_a_field_over_adapters_beside_changes_what_is_computed(peft_type: str, name: str):
    change, config = BESIDE[peft_type][name], METHODS[peft_type].example_config
    case = zoo.FACTORIES[METHODS[peft_type].example_model]()
    with pytest.raises(ConfigError, match=name):  # nothing beside it
        peftc.apply(case.model, {**config, **change}, example_inputs=case.inputs)
    am = peftc.apply(case.model, config, adapter_name="first", example_inputs=case.inputs)
    randomize_adapters(am, seed=0)
    am.add_adapter("second", config)
    am.set_adapter("second")
    randomize_adapters(am, seed=1)
    am.add_adapter("over", {**config, **change})
    outputs = {}
    with torch.no_grad():
        for adapter in ("first", "second", "over"):
            am.set_adapter(adapter)
            outputs[adapter] = tensors_of(case.call(am))
    assert differs(outputs["over"], outputs["first"]) and differs(outputs["over"], outputs["second"])


def rank_patterns(peft_type: str, change: Change) -> list[Any]:
    """The rank pattern after each of ALLOCATION_STEPS SGD steps on the example model, each followed by
    `update_and_allocate(step)` as PEFT's training loop calls it."""
    case = zoo.FACTORIES[METHODS[peft_type].example_model]()
    torch.manual_seed(0)
    config = {**METHODS[peft_type].example_config, **ALLOCATION_BASE, **change}
    am = peftc.apply(case.model, config, example_inputs=case.inputs).train()
    opt = torch.optim.SGD([p for _, p in am.adapter_parameters()], lr=1e-3)
    gen = torch.Generator().manual_seed(2)
    patterns = []
    for step in range(ALLOCATION_STEPS):
        torch.manual_seed(step)  # (the model's dropout)
        case.call(am, (torch.randn(8, *case.inputs[0].shape[1:], generator=gen),)).pow(2).mean().backward()
        opt.step()
        am.update_and_allocate(step)
        opt.zero_grad()
        patterns.append(copy.deepcopy(am.peft_config["default"].rank_pattern))
    return patterns


@pytest.mark.parametrize("peft_type, name", [(t, n) for t, rows in ALLOCATION.items() for n in rows])
def test_a_schedule_field_changes_the_rank_allocation(peft_type: str, name: str):
    change = ALLOCATION[peft_type][name]
    assert name in change
    before = rank_patterns(peft_type, {})
    assert before[-1] is not None and any(not all(m) for m in before[-1].values())  # the schedule masks some
    assert rank_patterns(peft_type, change) != before, f"{peft_type}.{name}={change[name]!r} allocated the same"


@pytest.mark.parametrize("peft_type, name", [(t, n) for t in REGISTERED
                                             for n in [*METADATA.get(t, {}), *COMMON_METADATA]])
def test_a_metadata_field_round_trips(peft_type: str, name: str, tmp_path: Path):
    value = {**{k: (v, "") for k, v in COMMON_METADATA.items()}, **METADATA.get(peft_type, {})}[name][0]
    value = peft_type if name == "peft_type" else value
    config = {**METHODS[peft_type].example_config, name: value}
    if name == "layers_to_transform":
        config["layers_pattern"] = ["layers"]
    if name in ("layers_to_transform", "layers_pattern"):
        config["layers_to_transform"] = [0]
    loaded = load_config(config)
    (tmp_path / "adapter_config.json").write_text(json.dumps(loaded.to_dict()))
    again = load_config(tmp_path)
    assert _plain(getattr(again, name)) == _plain(value)
    assert peft.PeftConfig.from_pretrained(tmp_path).to_dict()[name] in (value, peft_type)


@pytest.mark.parametrize("peft_type, name", [(t, n) for t, names in CORRECTED.items() for n in names])
def test_a_corrected_field_warns_as_peft_does(peft_type: str, name: str):
    case = zoo.mlp()
    with pytest.warns(UserWarning, match=f"{name} is set to True"):
        am = peftc.apply(case.model, {**METHODS[peft_type].example_config, name: True}, example_inputs=case.inputs)
    assert getattr(am.peft_config["default"], name) is False


@pytest.mark.parametrize("peft_type, name", [(t, n) for t, names in NO_EFFECT.items() for n in names])
def test_a_field_without_effect_in_peft_is_accepted(peft_type: str, name: str):
    value = NO_EFFECT[peft_type][name][0]
    config = load_config({**METHODS[peft_type].example_config, name: value})
    if name in config.not_saved:  # a run-time option, as PEFT leaves it out of adapter_config.json
        assert name not in config.to_dict()
    else:
        assert config.to_dict()[name] == value
