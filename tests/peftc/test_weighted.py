"""`add_weighted_adapter` on the adapted model: PEFT's combinations on the same weights give the same
new adapter (same seed for the random ones), and "delta" is exactly the weighted sum of the deltas."""

from __future__ import annotations

import peft
import pytest
import torch

import peftc
from tests import zoo
from tests.oracle import randomize_adapters

TYPES = [("linear", {}), ("cat", {}), ("svd", {}), ("ties", {"density": 0.5}),
         ("dare_linear", {"density": 0.5}), ("magnitude_prune_svd", {"density": 0.5})]


def pair() -> tuple[zoo.Case, peftc.AdaptedModel, peft.PeftModel]:
    case, ref = zoo.mlp(), zoo.mlp()
    fields = {"r": 4, "lora_alpha": 8, "target_modules": ["lin0", "lin1"], "init_lora_weights": False}
    am = peftc.apply(case.model, {"peft_type": "LORA", **fields}, adapter_name="x", example_inputs=case.inputs)
    am.add_adapter("y", {"peft_type": "LORA", **fields, "lora_alpha": 4})
    for seed, name in enumerate(("x", "y")):
        am.set_adapter(name)
        randomize_adapters(am, seed=seed)
    pm = peft.get_peft_model(ref.model, peft.LoraConfig(**fields), adapter_name="x")
    pm.add_adapter("y", peft.LoraConfig(**{**fields, "lora_alpha": 4}))
    pm.load_state_dict(am.state_dict(), strict=True)
    return case, am, pm


@pytest.mark.parametrize(("combination_type", "extra"), TYPES)
def test_combination_equals_peft(combination_type: str, extra: dict):
    case, am, pm = pair()
    torch.manual_seed(3)
    am.add_weighted_adapter(["x", "y"], [0.7, -0.4], "mix", combination_type=combination_type, **extra)
    torch.manual_seed(3)
    pm.base_model.add_weighted_adapter(["x", "y"], [0.7, -0.4], "mix", combination_type=combination_type, **extra)
    theirs = pm.state_dict()
    for name, p in am.adapter_parameters("mix"):
        torch.testing.assert_close(p, theirs[name], atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    am.set_adapter("mix")
    pm.set_adapter("mix")
    with torch.no_grad():
        torch.testing.assert_close(case.call(am), case.call(pm), atol=1e-5, rtol=1e-5)


def test_delta_is_the_weighted_sum_of_the_deltas_and_linear_is_not():
    case, am, _ = pair()
    weights = {"x": 0.7, "y": -0.4}
    am.add_weighted_adapter(list(weights), list(weights.values()), "delta", combination_type="delta")
    am.add_weighted_adapter(list(weights), list(weights.values()), "lin", combination_type="linear")
    want = sum(w * (am.merged_tensors([n])["lin0"]["weight"] - case.model.lin0.weight) for n, w in weights.items())
    got = am.merged_tensors(["delta"])["lin0"]["weight"] - case.model.lin0.weight
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    linear = am.merged_tensors(["lin"])["lin0"]["weight"] - case.model.lin0.weight
    assert (linear - want).norm() > 0.1 * want.norm()  # PEFT's "linear" adds cross terms B_x A_y


def test_bad_requests_name_the_field():
    _, am, _ = pair()
    with pytest.raises(peftc.ConfigError, match="no adapter named 'z'"):
        am.add_weighted_adapter(["x", "z"], [1, 1], "m")
    with pytest.raises(peftc.ConfigError, match="weights has 1 entries"):
        am.add_weighted_adapter(["x", "y"], [1], "m")
    with pytest.raises(peftc.ConfigError, match="density"):
        am.add_weighted_adapter(["x", "y"], [1, 1], "m", combination_type="ties")
    assert "m" not in am.peft_config
