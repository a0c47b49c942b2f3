"""Adapter configs with PEFT's field names and defaults (as in `adapter_config.json`).

A config is a dataclass per method, registered with its method (`peftc.method.register_method`) under
its PEFT `peft_type`. Fields PEFT has but peftc does not implement are accepted at their default and
rejected otherwise, so a PEFT checkpoint's config loads, and a setting peftc would ignore is never
silently dropped.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError, closest

CONFIG_NAME = "adapter_config.json"
PEFT_VERSION = "0.21.2"  # the PEFT release whose config format peftc writes

_REGISTRY: dict[str, type[AdapterConfig]] = {}
# task types whose PEFT model adds its head(s) to modules_to_save (PeftModelForSequenceClassification, ...)
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}


def register_config(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Called by `peftc.method.register_method` only: registering a method registers its config."""
    _REGISTRY[cls.peft_type_name] = cls
    return cls


def registered_configs() -> dict[str, type[AdapterConfig]]:
    import peftc.passes  # noqa: F401  (each method's module registers itself, and so its config, on import)

    return dict(_REGISTRY)


@dataclass
class AdapterConfig:
    """Fields shared by every PEFT method config."""

    peft_type_name: ClassVar[str] = ""
    # fields PEFT defines that peftc does not implement, each with the reason: only their default is accepted
    unsupported: ClassVar[dict[str, str]] = {}
    # run-time only fields PEFT leaves out of adapter_config.json
    not_saved: ClassVar[tuple[str, ...]] = ("runtime_config",)

    task_type: str | None = None
    peft_type: str | None = None
    auto_mapping: dict | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        check_types(self)
        check_patterns(self)
        if self.peft_type is None:
            self.peft_type = self.peft_type_name
        if self.peft_version is None:
            self.peft_version = PEFT_VERSION
        if self.peft_type != self.peft_type_name:
            raise ConfigError(f"peft_type {self.peft_type!r} given to {type(self).__name__}")
        heads = TASK_HEADS.get(self.task_type or "", ())
        if heads and hasattr(self, "modules_to_save"):
            # PEFT's model for the task trains its head(s) as copies, and writes them into the config
            named = list(self.modules_to_save or [])
            self.modules_to_save = named + [h for h in heads if h not in named]
        elif heads:
            raise ConfigError(
                f"task_type={self.task_type!r}: PEFT adds the classification head to modules_to_save "
                f"for this task type, and {type(self).__name__} has no modules_to_save; leave task_type unset "
                "(the adapters are identical) or use CAUSAL_LM/FEATURE_EXTRACTION"
            )
        bias = getattr(self, "bias", "none")  # PEFT's BaseTuner: the same values for every method that has it
        if bias not in ("none", "all") and not (isinstance(bias, str) and bias.endswith("_only")):
            raise ConfigError(f"bias={bias!r} must be 'none', 'all' or '<method>_only' (e.g. 'lora_only')")
        defaults = {f.name: _default(f) for f in dataclasses.fields(self)}
        for name, reason in self.unsupported.items():
            value = getattr(self, name)
            if value != defaults[name] and not (value in (None, {}, []) and defaults[name] in (None, {}, [])):
                raise ConfigError(
                    f"config field {name}={value!r} is not supported by peftc: {reason} "
                    f"(only the default {defaults[name]!r} is accepted)"
                )

    def to_dict(self) -> dict[str, Any]:
        """The `adapter_config.json` content, as PEFT writes it."""
        out = dataclasses.asdict(self)
        for name in self.not_saved:
            out.pop(name, None)
        for key, value in out.items():
            if isinstance(value, (set, tuple)):
                out[key] = sorted(value) if isinstance(value, set) else list(value)
        return out


@functools.cache
def _field_types(cls: type[AdapterConfig]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_types(config: AdapterConfig) -> None:
    """Every field holds a value of its declared type (`lora_alpha: float` a number, not None or "16";
    `use_dora: bool` true or false, not "yes"), checked into lists and dicts; an error names the field,
    and the entry of a list or dict that is wrong."""
    for name, tp in _field_types(type(config)).items():
        value = getattr(config, name)
        if not _conforms(value, tp):
            where, value, tp = _first_wrong(name, value, tp)
            raise ConfigError(f"{where} must be {_describe(tp)}, got {value!r}")


def _conforms(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if tp is list or origin is list:  # sets and tuples too, as PEFT's configs hold target names
        return isinstance(value, (list, tuple, set, frozenset)) and all(_conforms(v, args[0]) for v in value
                                                                        if args)
    if tp is dict or origin is dict:
        return isinstance(value, dict) and (not args or all(_conforms(k, args[0]) and _conforms(v, args[1])
                                                            for k, v in value.items()))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # an int is a number too (lora_alpha: 16)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return not isinstance(tp, type) or isinstance(value, tp)


def _first_wrong(name: str, value: Any, tp: Any) -> tuple[str, Any, Any]:
    """(where, value, expected type) of the wrong entry, where `value` is a list or dict of the declared
    kind whose entries are wrong: `target_modules[0]`, `alpha_pattern['q']`; else the field itself."""
    kinds = [a for a in (typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,))
             if typing.get_args(a)]
    for kind in kinds:
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if origin is list and isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if not _conforms(v, args[0]):
                    return _first_wrong(f"{name}[{i}]", v, args[0])
        if origin is dict and isinstance(value, dict):
            for k, v in value.items():
                if not _conforms(k, args[0]):
                    return f"{name} key {k!r}", k, args[0]
                if not _conforms(v, args[1]):
                    return _first_wrong(f"{name}[{k!r}]", v, args[1])
    return name, value, tp


_NAMES = {bool: ("True or False", "bools"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings"), type(None): ("None", "None"), list: ("a list", "lists"),
          dict: ("a dict", "dicts")}


def _describe(tp: Any, plural: bool = False) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # "True, False or a string"
        parts = [p for a in args for p in (["True", "False"] if a is bool and not plural else [_describe(a, plural)])]
        return ", ".join(parts[:-1]) + " or " + parts[-1]
    if origin is list:
        return f"{'lists' if plural else 'a list'} of {_describe(args[0], True)}"
    if origin is dict:
        return f"{'dicts' if plural else 'a dict'} from {_describe(args[0], True)} to {_describe(args[1], True)}"
    if tp in _NAMES:
        return _NAMES[tp][plural]
    return getattr(tp, "__name__", str(tp))


# fields matched as regular expressions where they are strings (see peftc/targets.py)
REGEX_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules")


def check_patterns(config: AdapterConfig) -> None:
    """The fields PEFT matches as regular expressions compile: a `target_modules` string (fullmatched),
    `layers_pattern`, and the keys of `rank_pattern` / `alpha_pattern`."""
    layers = getattr(config, "layers_pattern", None)
    checks = [(f"{name}={getattr(config, name, None)!r}", getattr(config, name, None)) for name in REGEX_FIELDS]
    checks += [(f"layers_pattern={layers!r}", p) for p in ([layers] if isinstance(layers, str) else layers or [])]
    checks += [(f"{name} key {key!r}", key)
               for name in ("rank_pattern", "alpha_pattern") for key in getattr(config, name, None) or {}]
    for where, pattern in checks:
        if isinstance(pattern, str):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"{where} is not a valid regular expression ({e})") from None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def target_names(value: list[str] | str | set | tuple | None) -> list[str] | str | None:
    """A module-name list as PEFT's configs hold it (a set), in a stable JSON-friendly order."""
    return sorted(value) if isinstance(value, (set, tuple)) else value


def check_targets(config: AdapterConfig) -> None:
    """PEFT's target fields, as every method has them: `target_modules` required (PEFT's per-architecture
    defaults are not used), sets in a stable order, `layers_*` only with a list of targets."""
    config.target_modules = target_names(config.target_modules)
    if hasattr(config, "exclude_modules"):  # VeRA has none
        config.exclude_modules = target_names(config.exclude_modules)
    if config.target_modules is None:
        raise ConfigError("target_modules is required (PEFT's per-architecture defaults are not used)")
    layers = getattr(config, "layers_to_transform", None)  # fields every method but IA3 has
    if getattr(config, "layers_pattern", None) and layers is None:
        raise ConfigError("layers_pattern needs layers_to_transform")
    if isinstance(config.target_modules, str) and layers is not None:
        raise ConfigError("layers_to_transform needs target_modules as a list, not a regex string")


def check_ranks(config: AdapterConfig) -> None:
    """`r` and every `rank_pattern` entry (where the method has one) are positive integers."""
    pattern = getattr(config, "rank_pattern", None) or {}
    for name, rank in {"r": config.r, **{f"rank_pattern[{k!r}]": v for k, v in pattern.items()}}.items():
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {rank!r}")


def check_probability(config: AdapterConfig, name: str) -> None:
    if not 0.0 <= getattr(config, name) < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {getattr(config, name)!r}")


def config_from_dict(data: dict[str, Any], source: str = "config") -> AdapterConfig:
    """Build the config named by `data["peft_type"]`; unknown fields are an error naming `source`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    # enums (PEFT's PeftType/TaskType) by their value
    data = {k: v.value if isinstance(v, enum.Enum) else v for k, v in data.items()}
    registry = registered_configs()
    peft_type = data.get("peft_type")
    if peft_type is None:
        raise ConfigError(f"{source}: missing field 'peft_type' (one of {sorted(registry)})")
    peft_type = str(peft_type).upper()
    if peft_type not in registry:
        raise ConfigError(f"{source}: peft_type {peft_type!r} is not supported; supported: {sorted(registry)}")
    cls = registry[peft_type]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        hints = {k: closest(k, names, 1) for k in unknown}
        raise ConfigError(
            f"{source}: unknown field(s) for {peft_type}: "
            + ", ".join(f"{k!r} (did you mean {h[0]!r}?)" if h else repr(k) for k, h in hints.items())
        )
    try:
        return cls(**{**data, "peft_type": peft_type})
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(config: AdapterConfig | dict | str | os.PathLike) -> AdapterConfig:
    """Accept a config object, a dict, or a path to an `adapter_config.json` (or its folder)."""
    if isinstance(config, AdapterConfig):
        return config
    if isinstance(config, dict):
        return config_from_dict(dict(config))
    if _looks_like_peft_config(config):
        return config_from_dict(config.to_dict(), source=type(config).__name__)
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text, as JSON must be ({e})") from None
    except OSError as e:  # a folder, a path through a file, no permission
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    return config_from_dict(data, source=path)


def _looks_like_peft_config(obj: Any) -> bool:
    # a peft.PeftConfig, recognised without importing peft (never a dependency)
    return hasattr(obj, "to_dict") and hasattr(obj, "peft_type") and not isinstance(obj, (str, os.PathLike))


@dataclass
class LoraConfig(AdapterConfig):
    """PEFT's `LoraConfig`, same fields and defaults."""

    peft_type_name: ClassVar[str] = "LORA"
    unsupported: ClassVar[dict[str, str]] = {
        "megatron_config": "Megatron-LM's parallel linear layers are not a layer type peftc adapts",
        "alora_invocation_tokens": "activated LoRA (aLoRA) is not implemented yet",
        "use_qalora": "QALoRA needs quantized (GPTQ) base layers, which peftc does not adapt",
        "ensure_weight_tying": "PEFT ties by sharing tensors across tied modules (a targeted lm_head's lora_A / "
                               "lora_B are views of the embedding's lora_embedding_B / lora_embedding_A transposed, "
                               "a modules_to_save embedding's copy is the head's too); peftc does not alias adapter "
                               "tensors across modules for LoRA's targets or copies yet",
    }
    # init_lora_weights values peftc implements (PEFT compares gaussian/olora case-insensitively)
    init_choices: ClassVar[str] = ("True, False, 'gaussian', 'pissa', 'pissa_niter_<n>', 'olora', 'orthogonal', "
                                   "'mica', 'loftq', 'eva', 'corda' or 'lora_ga'")

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: Any = None
    loftq_config: Any = field(default_factory=dict)  # PEFT's LoftQConfig or its dict
    eva_config: Any = None
    corda_config: Any = None
    lora_ga_config: Any = None
    use_dora: bool = False
    velora_config: Any = None
    alora_invocation_tokens: Any = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Any = None
    layer_replication: Any = None
    runtime_config: Any = None
    lora_bias: bool = False
    target_parameters: Any = None
    use_bdlora: Any = None
    arrow_config: Any = None
    kasa_config: Any = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_modules is None and self.target_parameters:
            self.target_modules = []  # PEFT: parameters alone may be targeted
        check_targets(self)
        check_ranks(self)
        check_probability(self, "lora_dropout")
        check_target_parameters(self)
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias={self.bias!r} must be 'none', 'all' or 'lora_only'")
        init = self.init_lora_weights
        if not (init is True or init is False or self.init_method is not None):
            raise ConfigError(f"init_lora_weights={init!r} is not an init PEFT or peftc knows ({self.init_choices})")
        check_loftq(self)
        self.kasa_config = sub_config(self, "kasa_config", KASA_FIELDS)
        self.use_bdlora = sub_config(self, "use_bdlora", BDLORA_FIELDS)
        self.velora_config = sub_config(self, "velora_config", VELORA_FIELDS)
        self.monteclora_config = sub_config(self, "monteclora_config", MONTECLORA_FIELDS)
        check_eva_config(self)
        check_data_inits(self)
        self.arrow_config = sub_config(self, "arrow_config", ARROW_FIELDS)
        check_factor_variants(self)
        check_arrow(self)
        check_layer_replication(self)
        if self.lora_bias and init not in (True, False):
            # as PEFT: a bias on lora_B has no place in an init that decomposes the base weight
            raise ConfigError(f"lora_bias=True needs init_lora_weights True or False, got {init!r}")
        if self.lora_bias and self.use_dora:
            raise ConfigError("lora_bias=True cannot be combined with use_dora=True (PEFT rejects it too)")
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern):
            # PEFT rejects this too: the rslora scale of a pattern rank is ambiguous
            raise ConfigError("use_rslora cannot be combined with rank_pattern or alpha_pattern")

    @property
    def init_method(self) -> str | None:
        """'gaussian', 'pissa' (also 'pissa_niter_<n>'), 'olora', 'orthogonal', 'mica', 'loftq', 'eva', 'corda',
        'lora_ga', or None for True/False and unknown values (PEFT compares gaussian, olora and mica
        case-insensitively)."""
        init = self.init_lora_weights
        if not isinstance(init, str):
            return None
        if init.lower() in ("gaussian", "olora", "mica"):
            return init.lower()
        if init in ("orthogonal", "loftq", "eva", "corda", "lora_ga"):
            return init
        return "pissa" if init == "pissa" or self.pissa_niter is not None else None

    @property
    def pissa_niter(self) -> int | None:
        """n of init_lora_weights='pissa_niter_<n>' (PEFT's fast randomized SVD), else None."""
        match = re.fullmatch(r"pissa_niter_(\d+)", str(self.init_lora_weights))
        return int(match.group(1)) if match else None


# PEFT's sub-configs of the LoRA variants peftc implements: field -> default (saved as PEFT's asdict writes them)
KASA_FIELDS = {"beta": 1e-4, "gamma": 1e-3}
BDLORA_FIELDS = {"target_modules_bd_a": None, "target_modules_bd_b": None, "nblocks": 1, "match_strict": True}
VELORA_FIELDS = {"num_groups": 64, "scale": 1.0, "init_type": "batch_average"}
LOFTQ_FIELDS = {"loftq_bits": 4, "loftq_iter": 1}
# EVA's (PEFT's EvaConfig); read by peftc.initialize_lora_eva_weights (passes/lora_eva.py)
EVA_FIELDS = {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100, "whiten": False,
              "adjust_scaling_factors": True}
# the data-driven inits' sub-configs (read by peftc.preprocess_corda / preprocess_loraga and at init)
CORDA_FIELDS = {"cache_file": None, "covariance_file": None, "corda_method": "ipm", "verbose": False,
                "use_float16_for_covariance": False, "prune_temporary_fields": True}
LORA_GA_FIELDS = {"direction": "ArB2r", "scale": "stable", "stable_gamma": 16}
MONTECLORA_FIELDS = {"num_samples": 8, "use_entropy": False, "dirichlet_prior": 0.1, "sample_scaler": 1e-4,
                     "kl_loss_weight": 1e-5, "buffer_size": 150}
# PEFT's ArrowConfig; task_adapter_names and gks_adapter_names are set by create_arrow_model (init=False in PEFT)
ARROW_FIELDS = {"top_k": 3, "router_temperature": 1.0, "use_gks": False, "task_adapter_names": None,
                "gks_adapter_names": None, "rng_seed": None}


def sub_config(config: AdapterConfig, name: str, fields: dict[str, Any]) -> dict[str, Any] | None:
    """A variant's sub-config as a dict with every field (PEFT's dataclass, or `{}`, selects the variant with
    its defaults); None leaves the variant off. Unknown fields are an error naming them."""
    value = getattr(config, name)
    if value is None:
        return None
    if _looks_like_peft_config(value) or dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a dict of {sorted(fields)} or None, got {value!r}")
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ConfigError(f"{name}: unknown field(s) {unknown}; known: {sorted(fields)}")
    return {**fields, **value}


def check_loftq(config: LoraConfig) -> None:
    """`loftq_config` (PEFT's LoftQConfig, saved as a dict with both fields): required by init_lora_weights='loftq',
    dropped with a warning otherwise, as PEFT does."""
    if config.init_lora_weights != "loftq":
        if config.loftq_config:
            warnings.warn("loftq_config is ignored when init_lora_weights is not 'loftq' (PEFT drops it too)",
                          stacklevel=4)
            config.loftq_config = {}
        return
    if not config.loftq_config:
        raise ConfigError("init_lora_weights='loftq' needs loftq_config, e.g. {'loftq_bits': 4, 'loftq_iter': 1} "
                          "(PEFT requires it too)")
    loftq = sub_config(config, "loftq_config", LOFTQ_FIELDS)
    if loftq["loftq_bits"] not in (4, 8) or isinstance(loftq["loftq_bits"], bool):
        raise ConfigError(f"loftq_config['loftq_bits'] must be 4 (NF4) or 8 (int8), as PEFT's loftq_init "
                          f"quantises, got {loftq['loftq_bits']!r}")
    if not isinstance(loftq["loftq_iter"], int) or isinstance(loftq["loftq_iter"], bool) or loftq["loftq_iter"] <= 0:
        raise ConfigError(f"loftq_config['loftq_iter'] must be a positive integer, got {loftq['loftq_iter']!r}")
    config.loftq_config = loftq


def check_eva_config(config: LoraConfig) -> None:
    """`eva_config`: PEFT's EvaConfig checks; with init_lora_weights='eva' and none given, the defaults (PEFT
    warns and does the same). Given with another init it is kept and saved, and unused, as in PEFT."""
    if config.init_lora_weights == "eva" and config.eva_config is None:
        warnings.warn("`init_lora_weights` is 'eva' but `eva_config` is not specified. Using default EVA config.",
                      UserWarning, stacklevel=4)
        config.eva_config = {}
    config.eva_config = sub_config(config, "eva_config", EVA_FIELDS)
    eva = config.eva_config
    if eva is None:
        return
    for key in ("rho", "tau"):
        if not isinstance(eva[key], (int, float)) or isinstance(eva[key], bool):
            raise ConfigError(f"eva_config[{key!r}] must be a number, got {eva[key]!r}")
    if eva["rho"] < 1.0:
        raise ConfigError(f"eva_config['rho'] must be >= 1.0, got {eva['rho']!r}")
    if not 0.0 <= eva["tau"] <= 1.0:
        raise ConfigError(f"eva_config['tau'] must be between 0.0 and 1.0, got {eva['tau']!r}")
    for key in ("use_label_mask", "whiten", "adjust_scaling_factors"):
        if not isinstance(eva[key], bool):
            raise ConfigError(f"eva_config[{key!r}] must be True or False, got {eva[key]!r}")
    if not isinstance(eva["label_mask_value"], int) or isinstance(eva["label_mask_value"], bool):
        raise ConfigError(f"eva_config['label_mask_value'] must be an integer, got {eva['label_mask_value']!r}")
    if config.init_lora_weights == "eva" and config.target_parameters:
        raise ConfigError("init_lora_weights='eva' cannot be combined with target_parameters: EVA reads the inputs "
                          "of the targeted layers, and a targeted parameter has none of its own")


def check_data_inits(config: LoraConfig) -> None:
    """CorDA's and LoRA-GA's sub-configs (PEFT's CordaConfig / LoraGAConfig as dicts), with PEFT's defaults and
    warnings: init_lora_weights='corda' without a corda_config takes the default one."""
    if config.init_lora_weights == "corda" and config.corda_config is None:
        warnings.warn("`init_lora_weights` is 'corda' but `corda_config` is not specified. Using default CorDA "
                      "config.", UserWarning, stacklevel=3)
        config.corda_config = {}
    elif config.init_lora_weights != "corda" and config.corda_config is not None:
        warnings.warn("`corda_config` specified but will be ignored when `init_lora_weights` is not 'corda'.",
                      UserWarning, stacklevel=3)
    config.corda_config = sub_config(config, "corda_config", CORDA_FIELDS)
    config.lora_ga_config = sub_config(config, "lora_ga_config", LORA_GA_FIELDS)
    corda, ga = config.corda_config, config.lora_ga_config
    if config.init_method in ("corda", "lora_ga") and config.layer_replication:
        raise ConfigError(f"init_lora_weights={config.init_lora_weights!r} cannot be combined with layer_replication: "
                          "the replicas share one base weight, which each would make its own residual")
    if corda is not None and corda["corda_method"] not in ("ipm", "kpm", None):
        raise ConfigError(f"corda_config['corda_method'] must be 'ipm' or 'kpm', got {corda['corda_method']!r}")
    if ga is not None:
        if ga["direction"] not in ("ArBr", "A2rBr", "ArB2r", "random"):
            raise ConfigError(f"lora_ga_config['direction'] must be 'ArBr', 'A2rBr', 'ArB2r' or 'random', "
                              f"got {ga['direction']!r}")
        if ga["scale"] not in ("stable", "weight_svd", "gd_scale", "unit"):
            raise ConfigError(f"lora_ga_config['scale'] must be 'stable', 'weight_svd', 'gd_scale' or 'unit', "
                              f"got {ga['scale']!r}")
        gamma = ga["stable_gamma"]
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or gamma <= 0:
            raise ConfigError(f"lora_ga_config['stable_gamma'] must be a positive number, got {gamma!r}")


def check_factor_variants(config: LoraConfig) -> None:
    """KaSA, BD-LoRA and VeLoRA: their sub-configs' values, and the combinations PEFT has no variant for."""
    kasa, bd, velora, monte = config.kasa_config, config.use_bdlora, config.velora_config, config.monteclora_config
    if kasa is not None:
        for key in ("beta", "gamma"):
            if not isinstance(kasa[key], (int, float)) or isinstance(kasa[key], bool) or kasa[key] < 0:
                raise ConfigError(f"kasa_config[{key!r}] must be a non-negative number, got {kasa[key]!r}")
    if bd is not None:
        if not isinstance(bd["nblocks"], int) or isinstance(bd["nblocks"], bool) or bd["nblocks"] <= 0:
            raise ConfigError(f"use_bdlora['nblocks'] must be a positive integer, got {bd['nblocks']!r}")
        for key in ("target_modules_bd_a", "target_modules_bd_b"):
            if bd[key] is not None and not (isinstance(bd[key], list) and all(isinstance(p, str) for p in bd[key])):
                raise ConfigError(f"use_bdlora[{key!r}] must be a list of module-name substrings, got {bd[key]!r}")
    if velora is not None:
        if not isinstance(velora["num_groups"], int) or isinstance(velora["num_groups"], bool) \
                or velora["num_groups"] <= 0:
            raise ConfigError(f"velora_config['num_groups'] must be a positive integer, got {velora['num_groups']!r}")
        if not isinstance(velora["scale"], (int, float)) or isinstance(velora["scale"], bool) or velora["scale"] <= 0:
            raise ConfigError(f"velora_config['scale'] must be a positive number, got {velora['scale']!r}")
        if velora["init_type"] not in ("batch_average", "batch_average_once", "random"):
            raise ConfigError(f"velora_config['init_type'] must be 'batch_average', 'batch_average_once' or "
                              f"'random', got {velora['init_type']!r}")
    if monte is not None:
        for key in ("num_samples", "dirichlet_prior", "buffer_size"):  # as PEFT's MontecloraConfig checks them
            if not isinstance(monte[key], (int, float)) or isinstance(monte[key], bool) or monte[key] <= 0:
                raise ConfigError(f"monteclora_config[{key!r}] must be greater than 0, got {monte[key]!r}")
    on = [name for name, value in (("kasa_config", kasa), ("use_bdlora", bd), ("velora_config", velora),
                                   ("monteclora_config", monte),
                                   ("use_dora", config.use_dora),
                                   ("init_lora_weights='mica'", config.init_method == "mica")) if value]
    if len(on) > 1:
        raise ConfigError(f"{' and '.join(on)} cannot be combined: PEFT has no LoRA variant for that combination")
    if (kasa is not None or bd is not None) and config.init_lora_weights not in (True, False, "gaussian"):
        raise ConfigError(f"{on[0]} needs init_lora_weights True, False or 'gaussian' (peftc has not checked its "
                          f"init against PEFT's after {config.init_lora_weights!r}), got {config.init_lora_weights!r}")
    if any(v is not None for v in (kasa, bd, velora, monte)) and config.target_parameters:
        raise ConfigError(f"{on[0]} cannot be combined with target_parameters (PEFT's ParamWrapper has no variants)")


def check_arrow(config: LoraConfig) -> None:
    """`arrow_config`: PEFT's ArrowConfig checks, and the LoRA options an Arrow router has no use for (its own A
    and B never run: PEFT's ArrowLinearVariant replaces the adapter's forward, so no other variant applies)."""
    arrow = config.arrow_config
    if arrow is None:
        return
    top_k, temperature, seed = arrow["top_k"], arrow["router_temperature"], arrow["rng_seed"]
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0:
        raise ConfigError(f"arrow_config['top_k'] must be a positive integer, got {top_k!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature <= 0:
        raise ConfigError(f"arrow_config['router_temperature'] must be greater than 0, got {temperature!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ConfigError(f"arrow_config['rng_seed'] must be an integer or None, got {seed!r}")
    for key in ("task_adapter_names", "gks_adapter_names"):
        names = arrow[key]
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ConfigError(f"arrow_config[{key!r}] must be a list of adapter names or None, got {names!r}")
    if arrow["use_gks"] and not arrow["gks_adapter_names"]:
        raise ConfigError("arrow_config['use_gks']=True needs the general adapters' names in "
                          "arrow_config['gks_adapter_names'] (peftc.create_arrow_model sets them)")
    others = {"use_dora": config.use_dora, "kasa_config": config.kasa_config, "use_bdlora": config.use_bdlora,
              "velora_config": config.velora_config, "monteclora_config": config.monteclora_config,
              "init_lora_weights": config.init_method in ("pissa", "olora", "mica"),
              "target_parameters": config.target_parameters,
              "trainable_token_indices": config.trainable_token_indices}
    for name, on in others.items():
        if on:
            raise ConfigError(f"{name}={getattr(config, name)!r} cannot be combined with arrow_config: an Arrow "
                              "router's forward is the routing over its experts (PEFT has no variant for both)")


def check_layer_replication(config: LoraConfig) -> None:
    """`layer_replication`: [start, end) pairs of layer indices (saved as lists, as PEFT's JSON holds them)."""
    layer_map = config.layer_replication
    if layer_map is None:
        return
    if not isinstance(layer_map, (list, tuple)) or not all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(i, int) and not isinstance(i, bool)
                                                                       for i in pair) and 0 <= pair[0] < pair[1]
            for pair in layer_map):
        raise ConfigError(f"layer_replication must be a list of [start, end) pairs with 0 <= start < end, "
                          f"got {layer_map!r}")
    config.layer_replication = [list(pair) for pair in layer_map]


def check_target_parameters(config: LoraConfig) -> None:
    """`target_parameters`: a list of parameter names, without the options PEFT's ParamWrapper refuses
    (an update on the weight itself has no input to drop out, and no bias or magnitude of its own)."""
    targets = config.target_parameters
    if targets is None:
        return
    if not isinstance(targets, (list, tuple, set)) or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"target_parameters must be a list of parameter names, got {targets!r}")
    config.target_parameters = sorted(targets)
    refused = {"lora_dropout": config.lora_dropout > 0, "use_dora": config.use_dora, "lora_bias": config.lora_bias,
               "fan_in_fan_out": config.fan_in_fan_out,
               "init_lora_weights": config.init_method in ("pissa", "olora", "loftq")}
    for name, bad in refused.items():
        if bad:
            raise ConfigError(f"{name}={getattr(config, name)!r} cannot be combined with target_parameters "
                              "(PEFT's ParamWrapper refuses it too)")
    if config.init_method in ("corda", "lora_ga"):
        raise ConfigError(f"init_lora_weights={config.init_lora_weights!r} cannot be combined with "
                          "target_parameters: its statistics are gathered at nn.Linear and Conv1D modules only "
                          "(PEFT's preprocess_corda / preprocess_loraga), never at a bare parameter")


