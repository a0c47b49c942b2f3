"""The two entry points: `apply` a config to a model, `load` a saved adapter into one."""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch.nn as nn

from .checkpoint import adapter_dir, load_adapter_weights, read_config
from .config import CONFIG_NAME, AdapterConfig, load_config
from .errors import CheckpointError, ConfigError, TargetError
from .model import AdaptedModel

# the transformers class PEFT's AutoPeftModelFor<Task> loads the base model with, by the config's task_type
AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"


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
    model: nn.Module | str | os.PathLike,
    directory: str | os.PathLike | None = None,
    adapter_name: str = "default",
    is_trainable: bool = False,
    example_inputs: Any = None,
    allow_pickle: bool = False,
    **model_kwargs: Any,
) -> AdaptedModel:
    """Apply the adapter saved in `directory` (by peftc or by PEFT) to `model`.

    As `PeftModel.from_pretrained`: adapters are frozen and the model in eval mode unless
    `is_trainable=True`. A folder with only PEFT's older `adapter_model.bin` (a pickle) loads only
    with `allow_pickle=True`, through `torch.load(weights_only=True)`.

    `load(directory)` alone is PEFT's `AutoPeftModelFor<Task>.from_pretrained(directory)`: the base
    model is loaded from the config's `base_model_name_or_path`, which must be a local folder (nothing
    is downloaded), with the class `base_model_class` picks (`model_kwargs` go to its `from_pretrained`).
    """
    if directory is None:
        if isinstance(model, nn.Module):
            raise TypeError("peftc.load(model, directory): the adapter folder is missing")
        directory = model
        model = base_model(directory, **model_kwargs)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"peftc.load(model, directory): model must be an nn.Module, got {type(model).__name__}")
    elif model_kwargs:
        raise TypeError(f"peftc.load: {sorted(model_kwargs)} apply only when the base model is loaded from the "
                        "adapter's config (peftc.load(directory))")
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


def base_model_class(config: AdapterConfig, config_path: str) -> type:
    """The class PEFT's AutoPeftModel classes load an adapter's base model with: the transformers auto
    class of the config's `task_type`; with no task type, the class `auto_mapping` records (a
    transformers class: PEFT's import allow-list, less the libraries peftc does not run), else AutoModel."""
    import transformers

    if config.task_type is not None:
        if config.task_type not in AUTO_CLASSES:
            raise ConfigError(f"{config_path}: task_type={config.task_type!r} has no AutoPeftModel class "
                              f"(one of {sorted(AUTO_CLASSES)}): pass the base model, peftc.load(model, directory)")
        return getattr(transformers, AUTO_CLASSES[config.task_type])
    mapping = config.auto_mapping or {}
    library, name = mapping.get("parent_library"), mapping.get("base_model_class")
    if library is None and name is None:
        return transformers.AutoModel
    if not (isinstance(library, str) and isinstance(name, str)
            and (library == "transformers" or library.startswith("transformers."))):
        raise ConfigError(f"{config_path}: auto_mapping={mapping!r} does not name a transformers model class: "
                          "pass the base model, peftc.load(model, directory)")
    cls = getattr(importlib.import_module(library), name, None)
    if not hasattr(cls, "from_pretrained"):
        raise ConfigError(f"{config_path}: auto_mapping names {library}.{name}, which is not a transformers "
                          "model class: pass the base model, peftc.load(model, directory)")
    return cls


def base_model(directory: str | os.PathLike, **model_kwargs: Any) -> nn.Module:
    """The base model an adapter folder's config names, loaded as PEFT's `AutoPeftModel.from_pretrained`
    does (offline: `base_model_name_or_path` must be a local model folder), in eval mode. A tokenizer
    saved beside the adapter with more tokens than the model's embeddings resizes them, as in PEFT."""
    directory = os.fspath(directory)
    config = read_config(directory)
    config_path = os.path.join(directory, CONFIG_NAME)
    path = config.base_model_name_or_path
    if path is None:
        raise ConfigError(f"{config_path}: base_model_name_or_path is not set, so the base model is unknown: "
                          "pass it, peftc.load(model, directory)")
    if not os.path.isdir(path):
        raise ConfigError(f"{config_path}: base_model_name_or_path={path!r} is not a local folder (peftc does "
                          "not download models): save the model to a folder and set the field to it, or pass "
                          "the model, peftc.load(model, directory)")
    cls = base_model_class(config, config_path)
    try:
        model = cls.from_pretrained(path, **{**model_kwargs, "local_files_only": True})
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{config_path}: base_model_name_or_path={path!r}: {cls.__name__}.from_pretrained "
                              f"failed: {first}") from None
    if os.path.exists(os.path.join(directory, TOKENIZER_CONFIG_NAME)) and hasattr(model, "get_input_embeddings"):
        from transformers import AutoTokenizer

        size = len(AutoTokenizer.from_pretrained(directory, local_files_only=True))
        if size > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(size)
    return model.eval()
