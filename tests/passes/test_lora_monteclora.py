"""MonteCLoRA (`monteclora_config`) against PEFT: LoRA outside training (eval, fold, checkpoints with the
sampler's tensors); training refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest

from peftc.errors import ConfigError
from tests.oracle import check_checkpoints, check_eval, check_fold, make_pair, saved_shapes, train_inputs

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
]

TARGETS = {"mlp": ["lin0", "lin1"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
MONTE = {"num_samples": 3, "buffer_size": 2, "sample_scaler": 0.01}


@pytest.mark.parametrize("name", ["mlp", "llama", "gpt2"])
def test_monteclora_outside_training_matches_peft(name: str, tmp_path: Path):
    config = {"r": 2, "lora_alpha": 4, "target_modules": TARGETS[name], "init_lora_weights": False,
              "monteclora_config": MONTE}
    pair = make_pair(name, {"peft_type": "LORA", **config}, peft.LoraConfig(**config))  # every tensor across
    check_eval(pair)
    check_checkpoints(pair, tmp_path)
    assert any(k.endswith("lora_monteclora_sampler.gaussian_var_prior") for k in saved_shapes(tmp_path / "peftc"))
    ours = json.loads((tmp_path / "peftc" / "adapter_config.json").read_text())["monteclora_config"]
    assert ours == json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["monteclora_config"]
    check_fold(pair)
    pair.am.train()
    with pytest.raises(ConfigError, match="training with monteclora_config is not supported"):
        pair.case.call(pair.am, train_inputs(pair.case))


def test_monteclora_config_is_checked_as_peft_checks_it():
    from peftc.config import load_config

    with pytest.raises(ConfigError, match=r"monteclora_config\['num_samples'\] must be greater than 0"):
        load_config({"peft_type": "LORA", "target_modules": ["q"], "monteclora_config": {"num_samples": 0}})
    with pytest.raises(ConfigError, match="monteclora_config and use_dora cannot be combined"):
        load_config({"peft_type": "LORA", "target_modules": ["q"], "monteclora_config": {}, "use_dora": True})
