"""PEFT's parameter names, in one place.

Live (in the adapted model's state dict) an adapter tensor is
`base_model.model.<module>.<group>.<adapter>[.<leaf>]`, e.g. `...q_proj.lora_A.default.weight`
or `...embed_tokens.lora_embedding_A.default`; saved (adapter_model.safetensors) it is the
same key without the adapter segment. The base weight of an adapted module lives at
`<module>.base_layer.<name>`, as under PEFT's module swap.
"""

from __future__ import annotations

PREFIX = "base_model.model."
BASE_LAYER = "base_layer"
TOKEN_ADAPTER = "token_adapter"  # PEFT's wrapper of a layer with trainable token rows
MODULES_TO_SAVE, ORIGINAL_MODULE = "modules_to_save", "original_module"  # PEFT's ModulesToSaveWrapper


def live_key(module_path: str, group: str, adapter: str, leaf: str | None) -> str:
    return f"{PREFIX}{module_path}.{group}.{adapter}" + (f".{leaf}" if leaf else "")


# groups PEFT saves without their live leaf: DoRA's magnitude is `...lora_magnitude_vector.default.weight`
# live but `...lora_magnitude_vector` saved (the checkpoint format of its older ParameterDict form)
SAVED_WITHOUT_LEAF = frozenset({"lora_magnitude_vector"})


def saved_key(module_path: str, group: str, leaf: str | None) -> str:
    if group == MODULES_TO_SAVE:  # a module's trained copy is saved under the module's own names
        return f"{PREFIX}{module_path}.{leaf}"
    if group in SAVED_WITHOUT_LEAF:
        leaf = None
    return f"{PREFIX}{module_path}.{group}" + (f".{leaf}" if leaf else "")


# tensors one adapter shares across its modules (VeRA's projections) live at the tuner level:
# `base_model.<group>.<adapter>` live, `base_model.<group>` saved
TUNER = "base_model."


def shared_live_key(group: str, adapter: str, leaf: str | None) -> str:
    return f"{TUNER}{group}.{adapter}" + (f".{leaf}" if leaf else "")


def shared_saved_key(group: str, leaf: str | None) -> str:
    return f"{TUNER}{group}" + (f".{leaf}" if leaf else "")


def is_shared(fqn: str) -> bool:
    return fqn.startswith(TUNER) and not fqn.startswith(PREFIX)


def base_key(param_fqn: str, adapted_modules: set[str]) -> str:
    """Where a base model tensor lives in the adapted model: under base_layer if its module is adapted,
    once more per nested wrapper (PEFT nests one ParamWrapper per `target_parameters` entry of a module,
    and `<module>.base_layer` is then adapted too), and below every adapted ancestor too (PEFT's wrapper of
    an nn.MultiheadAttention holds its `out_proj`, itself wrapped: `mha.base_layer.out_proj.base_layer`).
    `adapted_modules` holds adapters' wrapper paths: a module with trainable tokens appears as
    `<module>.token_adapter`, one trained as copies (modules_to_save) as `<module>.original_module`: its
    tensors live under that wrapper."""
    module, _, name = param_fqn.rpartition(".")
    parts = module.split(".") if module else []
    for i in range(len(parts), 0, -1):  # inside a module trained as copies (`<module>.original_module`)
        outer = ".".join(parts[:i])
        if f"{outer}.{ORIGINAL_MODULE}" in adapted_modules:
            return ".".join([PREFIX + outer, ORIGINAL_MODULE, *parts[i:], name])
    if module and f"{module}.{TOKEN_ADAPTER}" in adapted_modules:
        parts[-1] = f"{parts[-1]}.{TOKEN_ADAPTER}"
    path = ""
    for part in parts:  # the wrapped path so far, one base_layer per wrapper at each level
        path = f"{path}.{part}" if path else part
        while path in adapted_modules:
            path = f"{path}.{BASE_LAYER}"
    return f"{PREFIX}{path}.{name}" if path else PREFIX + name


def split_module(key: str) -> tuple[str, str]:
    """('a.b.c', 'weight') from 'a.b.c.weight'."""
    module, _, name = key.rpartition(".")
    return module, name
