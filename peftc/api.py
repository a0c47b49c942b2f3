"""The two entry points: `apply` a config to a model, `load` a saved adapter into one."""

from __future__ import annotations

import os
from typing import Any

import torch.nn as nn

from .checkpoint import adapter_dir, load_adapter_weights, read_config
from .config import CONFIG_NAME, AdapterConfig, load_config
from .errors import ConfigError, TargetError
from .model import AdaptedModel


def apply(
    model: nn.Module,
    config: AdapterConfig | dict | str,
    adapter_name: str = "default",
    example_inputs: Any = None,
) -> AdaptedModel:
    """Capture `model`, place the adapter `config` describes, and return the adapted model.

    `config` is a peftc config, a dict with PEFT's field names, or a path to an
    `adapter_config.json`. `example_inputs` (a tensor, tuple, or dict of kwargs) is needed for
    models that are not transformers models; use a batch of 2 or more.
    """
    return AdaptedModel(model, load_config(config), adapter_name, example_inputs)


def load(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    example_inputs: Any = None,
    allow_pickle: bool = False,
) -> AdaptedModel:
    """Apply the adapter saved in `directory` (by peftc or by PEFT) to `model`.

    As `PeftModel.from_pretrained`: adapters are frozen and the model in eval mode unless
    `is_trainable=True`. A folder with only PEFT's older `adapter_model.bin` (a pickle) loads only
    with `allow_pickle=True`, through `torch.load(weights_only=True)`.
    """
    directory = os.fspath(directory)
    adapter_dir(directory, adapter_name)  # the name check save applies, before anything is read
    config = read_config(directory)
    config.inference_mode = not is_trainable
    try:
        am = AdaptedModel(model, config, adapter_name, example_inputs, training=model.training and is_trainable)
    except (ConfigError, TargetError) as e:  # the saved config does not fit this model: name the file
        raise type(e)(f"{os.path.join(directory, CONFIG_NAME)}: {e}") from None
    load_adapter_weights(am, directory, adapter_name, allow_pickle)
    return am
