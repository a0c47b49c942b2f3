"""Adapter checkpoints in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Saved keys are PEFT's (`base_model.model.<module>.lora_A.weight`, adapter name stripped), so a
peftc checkpoint loads in `peft.PeftModel.from_pretrained` and a PEFT checkpoint loads here.
Loading is strict: every key and shape is checked before any tensor is touched. Writes go to
temporary files renamed into place, so an interrupted save leaves the previous files intact, and
the next save removes the temporary files of one that was killed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

try:
    import fcntl
except ImportError:  # Windows: no flock; stale temp folders are told by their age
    fcntl = None

from . import names
from .adapters import EXTRAS, has_extras, layer_kinds
from .config import CONFIG_NAME, AdapterConfig, load_config
from .errors import CheckpointError, ConfigError, TargetError
from .method import Method, Placed, Target, TensorKey, methods_for

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"  # PEFT's older format: loaded only on request (allow_pickle=True)
# config fields that do not make a saved adapter a different one (see `_refuse_other_adapter`); fan_in_fan_out
# is set from each layer's type when an adapter is applied, in PEFT and in peftc (earlier peftc saved False on
# transformers' Conv1D layers, where it is now True as in PEFT)
VOLATILE_FIELDS = ("peft_version", "inference_mode", "fan_in_fan_out")


def adapter_dir(directory: str | os.PathLike, adapter_name: str) -> str:
    """PEFT's layout: the default adapter in the folder itself, others in a subfolder."""
    directory = os.fspath(directory)
    # the name becomes one folder name: nothing may be read or written outside `directory`
    if adapter_name in ("", ".", "..") or os.path.isabs(adapter_name) or any(
        sep in adapter_name for sep in ("/", "\\", os.sep)
    ):
        raise CheckpointError(f"adapter name {adapter_name!r} is not a plain folder name: its files would not "
                              f"stay inside {directory}")
    if "\0" in adapter_name:
        raise CheckpointError(f"adapter name {adapter_name!r} holds a NUL character, which no folder name can: "
                              "save or load it under another name")
    return directory if adapter_name == "default" else os.path.join(directory, adapter_name)


def _module_params(model: Any, adapter_name: str) -> Iterator[tuple[Any, dict[TensorKey, nn.Parameter]]]:
    """(module adapter, its parameters by key) for each module the adapter is placed on."""
    for mas in model.targeted_modules.values():
        for ma in mas:
            if ma.adapter == adapter_name and getattr(ma, "saved", True):  # (a tied head's are the embedding's)
                yield ma, {key: t for key, (_, t) in ma.tensors.items() if isinstance(t, nn.Parameter)}


def adapter_state_dict(model: Any, adapter_name: str, saving: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's parameters, the shared tensors its method saves (VeRA's projections) and the base
    biases it trains, live (not copies) under PEFT's saved keys; `saving`: as the method saves them
    (`Method.saved_tensors`)."""
    out = {}
    for ma, params in _module_params(model, adapter_name):
        if saving:
            params = ma.method.saved_tensors(ma.config, ma.module_path, params)
        out.update({names.saved_key(ma.module_path, *key): t for key, t in params.items()})
    # the base biases its `bias` option trains, under their own keys (PEFT's `_get_learnable_bias_state_dict`)
    out.update(model.adapter_set.bias_parameters(adapter_name))
    if getattr(model.peft_config[adapter_name], "bias", "none") == "all":
        # PEFT's "all" also takes every live key ending in ".bias", so a copy's bias (modules_to_save) is saved
        # a second time under its live key less the adapter name (a copy: safetensors refuses shared storage)
        copies = f".{names.MODULES_TO_SAVE}.{adapter_name}."
        out.update({fqn.replace(copies, f".{names.MODULES_TO_SAVE}."): t.detach().clone() for ma, params in
                    _module_params(model, adapter_name) for key, t in params.items()
                    for fqn, _ in [ma.tensors[key]] if copies in fqn and fqn.endswith(".bias")})
    for ma, _ in _module_params(model, adapter_name):
        if ma.method.saves_shared(ma.config):
            out.update({names.shared_saved_key(*key): model.get_buffer(fqn)
                        for key, (fqn, _) in ma.tensors.items() if names.is_shared(fqn)})
    out.update(model.adapter_set.bias_parameters(adapter_name))  # trained base biases, under their own keys
    return out


def _subtract_mutated_init(model: Any, adapter_name: str, initial_dir: str | os.PathLike
                           ) -> tuple[dict[str, torch.Tensor], AdapterConfig]:
    """PEFT's `path_initial_model_for_weight_conversion`: the adapter as one for the original base
    weights, from its values now and those saved in `initial_dir` right after its init (PiSSA/OLoRA)."""
    path = os.path.join(os.fspath(initial_dir), WEIGHTS_NAME)
    initial = read_weights(path)
    out, method = {}, None
    for ma, params in _module_params(model, adapter_name):
        now = {key: t.detach().cpu() for key, t in params.items()}
        keys = {key: names.saved_key(ma.module_path, *key) for key in now}
        bad = [k for key, k in keys.items() if k not in initial or initial[k].shape != now[key].shape]
        if bad:
            raise CheckpointError(f"{path} is not the initial state of adapter {adapter_name!r}: "
                                  f"keys missing or of other shapes: {_listing(bad)}")
        then = {key: initial[k].to(now[key].dtype) for key, k in keys.items()}
        method = ma.method
        out.update({keys[key]: t for key, t in method.subtract_mutated_init(ma.config, now, then).items()})
    return out, method.subtracted_config(model.peft_config[adapter_name])


def _config_json(model: Any, config: AdapterConfig) -> dict[str, Any]:
    data = config.to_dict()
    source = model.get_base_model()
    data["inference_mode"] = True  # as PEFT writes it
    name_or_path = getattr(getattr(source, "config", None), "_name_or_path", None)
    if data.get("base_model_name_or_path") is None and name_or_path:
        data["base_model_name_or_path"] = name_or_path
    if data.get("auto_mapping") is None:
        data["auto_mapping"] = {
            "base_model_class": type(source).__name__,
            "parent_library": type(source).__module__,
        }
    return data


# A save writes into a temp folder of its own beside the adapter's files (safetensors' writer puts its
# own temp file there too), locked while the save runs, then renames the files into place. A save
# killed half-way (kill -9, power loss) leaves only that folder; the next save into the same folder
# removes it once its lock shows that no save is running there any more.
TEMP_PREFIX, TEMP_SUFFIX = ".peftc-save-", ".tmp"
_TEMP_DIR = re.compile(r"\.peftc-save-[a-z0-9_]{8}\.tmp")  # tempfile.mkdtemp's names with that prefix/suffix
# what a save may leave in its temp folder: the new files, the old weights kept for a rollback, and
# safetensors' own temp file (Rust's tempfile crate: ".tmp" and 6 letters or digits)
BACKUP_NAME = "previous.safetensors"
_SAFETENSORS_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")
# temp files of earlier peftc versions (one per file, beside it; never locked): removed once an hour old
_OLD_TEMP_FILE = re.compile(r"\.(?:adapter_model\.safetensors|adapter_config\.json)\.[a-z0-9_]{8}\.tmp")
STALE_AFTER_S = 3600  # where no lock can tell (no flock), a temp folder this old belongs to no running save


def _atomic_write(path: str, write: Any, temp_dir: str) -> str:
    """Write `path`'s new content through `write(tmp_path)` to a file in `temp_dir`; return its path.
    Its mode is an ordinary new file's (0666 less the umask), whatever mode `write` created it with."""
    tmp = os.path.join(temp_dir, os.path.basename(path))
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the kernel applies the umask
    mode = stat.S_IMODE(os.stat(tmp).st_mode)
    write(tmp)
    with contextlib.suppress(OSError):  # (safetensors writes 0600; some filesystems have no modes)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            os.chmod(tmp, mode)
    return tmp


@contextlib.contextmanager
def _save_temp(out_dir: str) -> Iterator[str]:
    """A new temp folder in `out_dir` for one save, locked while the save runs and removed after it."""
    for _ in range(5):
        tmp = tempfile.mkdtemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=out_dir)
        fd = _lock(tmp, wait=True)
        try:  # a concurrent save's cleanup may have taken the folder before it was locked: take another
            if fd is None or os.path.samestat(os.fstat(fd), os.stat(tmp)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    else:
        raise CheckpointError(f"{out_dir}: could not create a temp folder for the save")
    try:
        yield tmp
    finally:
        _clear_temp_dir(tmp)
        if fd is not None:
            os.close(fd)  # releases the lock


def _lock(path: str, wait: bool) -> int | None:
    """An open descriptor of the folder `path` holding an exclusive flock. None where flock is not
    available (Windows, some network filesystems); BlockingIOError if another process holds it."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # ENOLCK, EOPNOTSUPP: this filesystem has no flock
        os.close(fd)
        return None
    return fd


def _clear_temp_dir(path: str) -> None:
    """Remove a save's temp folder: the files a save puts there, then the folder if nothing else is left."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(path):
            if entry.name in (WEIGHTS_NAME, CONFIG_NAME, BACKUP_NAME) or _SAFETENSORS_TEMP.fullmatch(entry.name):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
        os.rmdir(path)


def _remove_stale_temps(out_dir: str) -> None:
    """Remove what saves killed half-way left in `out_dir` (their temp folders, and older peftc's temp
    files); never a running save's, never a file peftc's writer could not have made."""
    try:
        entries = list(os.scandir(out_dir))
    except OSError:
        return
    for entry in entries:
        with contextlib.suppress(OSError):
            if _TEMP_DIR.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                try:
                    fd = _lock(entry.path, wait=False)
                except BlockingIOError:
                    continue  # a save is running there
                try:
                    if fd is not None or _older_than(entry, STALE_AFTER_S):
                        _clear_temp_dir(entry.path)
                finally:
                    if fd is not None:
                        os.close(fd)
            elif _OLD_TEMP_FILE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                if _older_than(entry, STALE_AFTER_S):
                    os.unlink(entry.path)


def _older_than(entry: os.DirEntry, seconds: float) -> bool:
    return time.time() - entry.stat(follow_symlinks=False).st_mtime > seconds


def save_adapter(model: Any, directory: str | os.PathLike, adapter_name: str,
                 path_initial_model_for_weight_conversion: str | os.PathLike | None = None, *,
                 overwrite: bool = False) -> str:
    """Save one adapter; returns the folder written. With `path_initial_model_for_weight_conversion`,
    save PEFT's conversion of a PiSSA/OLoRA adapter (see `_subtract_mutated_init`). A folder that
    already holds another adapter (other config, base model or weight shapes) is an error unless
    `overwrite`; saving the same adapter again replaces its files."""
    out_dir = adapter_dir(directory, adapter_name)
    if adapter_name not in model.peft_config:
        raise CheckpointError(f"no adapter named {adapter_name!r}; adapters: {sorted(model.peft_config)}")
    state, config = adapter_state_dict(model, adapter_name, saving=True), model.peft_config[adapter_name]
    if path_initial_model_for_weight_conversion is not None:
        state, config = _subtract_mutated_init(model, adapter_name, path_initial_model_for_weight_conversion)
    tensors = _for_saving(state)
    config_data = _config_json(model, config)
    config_text = json.dumps(config_data, indent=2, sort_keys=True)
    if not overwrite:
        _refuse_other_adapter(out_dir, config_data, tensors)
    os.makedirs(out_dir, exist_ok=True)
    _remove_stale_temps(out_dir)

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(config_text + "\n")

    weights_path, config_path = os.path.join(out_dir, WEIGHTS_NAME), os.path.join(out_dir, CONFIG_NAME)
    with _save_temp(out_dir) as temp_dir:
        tmp_weights = _atomic_write(weights_path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
                                    temp_dir)
        tmp_config = _atomic_write(config_path, write_json, temp_dir)
        _replace_pair((tmp_weights, weights_path), (tmp_config, config_path), temp_dir)
    return out_dir


def _for_saving(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors. safetensors refuses two keys on one storage, so a tensor saved under
    two keys (a tied head's trainable tokens, which PEFT saves again) is copied for the second."""
    out, seen = {}, set()
    for key, value in state.items():
        t = value.detach().contiguous().cpu()
        out[key] = t.clone() if id(value) in seen else t
        seen.add(id(value))
    return out


def _replace_pair(first: tuple[str, str], second: tuple[str, str], temp_dir: str) -> None:
    """Rename two temp files into place; if the second rename fails, put the first file's old
    version back, so a failed save never leaves new weights beside an old config. (Each rename is
    atomic; a process killed between the two leaves new weights beside the old config, which is
    the same adapter unless the save changes the config, i.e. with overwrite=True.)"""
    (tmp1, path1), (tmp2, path2) = first, second
    backup = None
    if os.path.exists(path1):
        backup = os.path.join(temp_dir, BACKUP_NAME)
        _link_or_copy(path1, backup)
    os.replace(tmp1, path1)
    try:
        os.replace(tmp2, path2)
    except BaseException:
        if backup is None:  # there was no file before: there is none after
            os.unlink(path1)
        else:
            os.replace(backup, path1)
        raise


def _link_or_copy(src: str, dst: str) -> None:
    """`dst` becomes another name for `src`'s file (a copy where hard links are not supported)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _normalised(value: Any) -> Any:
    """A config value compared by meaning: lists of names in any order are the same list."""
    if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
        return sorted(value, key=str)
    return value


def _refuse_other_adapter(out_dir: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Raise if `out_dir` holds an adapter other than the one about to be saved there."""
    config_path, weights_path = os.path.join(out_dir, CONFIG_NAME), os.path.join(out_dir, WEIGHTS_NAME)
    reasons = []
    if os.path.exists(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                there = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            there, reasons = {}, [f"its {CONFIG_NAME} is unreadable ({e})"]
        there = there if isinstance(there, dict) else {}
        for key in sorted(set(there) | set(config)):
            if key in VOLATILE_FIELDS:
                continue
            old, new = there.get(key), config.get(key)
            if key in ("base_model_name_or_path", "auto_mapping") and (old is None or new is None):
                continue  # one side did not record it: no evidence of another base model
            if _normalised(old) != _normalised(new):
                reasons.append(f"{key}={old!r} there, {new!r} now")
    if os.path.exists(weights_path):
        try:
            with safe_open(weights_path, framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            shapes, reasons = None, [*reasons, f"its {WEIGHTS_NAME} is unreadable ({e})"]
        if shapes is not None and shapes != {k: tuple(v.shape) for k, v in tensors.items()}:
            reasons.append(f"its {WEIGHTS_NAME} has other keys or shapes")
    if reasons:
        raise CheckpointError(
            f"{out_dir} already holds a different adapter ({'; '.join(reasons[:4])}): not overwriting it; "
            "save elsewhere, or pass overwrite=True to replace it"
        )


def weights_file(directory: str | os.PathLike, allow_pickle: bool = False) -> str:
    """The adapter's weights file in `directory`: the safetensors file, or with `allow_pickle` (and
    no safetensors file) PEFT's older pickle file."""
    path, pickle_path = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, PICKLE_NAME)
    return pickle_path if allow_pickle and not os.path.exists(path) and os.path.exists(pickle_path) else path


def read_weights(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".bin"):
        return _read_pickle(path)
    if not os.path.exists(path):
        bin_path = os.path.join(os.path.dirname(path), PICKLE_NAME)
        extra = (f" (found {bin_path}: a pickle checkpoint, loaded only with allow_pickle=True, and only from a "
                 "source you trust)" if os.path.exists(bin_path) else "")
        raise CheckpointError(f"{path}: no such file{extra}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _read_pickle(path: str) -> dict[str, torch.Tensor]:
    """A pickled state dict, unpickled with `weights_only=True`: tensors and plain containers only,
    so a file that would run code is refused rather than executed."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for forbidden objects; EOFError, RuntimeError for damaged files
        # torch's message opens with advice to load unsafely; the reason follows "WeightsUnpickler error:"
        text = str(e).partition("WeightsUnpickler error:")[2] or str(e)
        reason = next((line.strip().split(". ")[0] for line in text.splitlines() if line.strip()), type(e).__name__)
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): {reason}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        raise CheckpointError(f"{path}: expected a dict of named tensors, got {type(data).__name__}")
    return data


def load_adapter_weights(model: Any, directory: str, adapter_name: str, allow_pickle: bool = False) -> None:
    """Load `adapter_model.safetensors` into the adapter, after checking every key and shape."""
    path = weights_file(directory, allow_pickle)
    saved = read_weights(path)
    expected = adapter_state_dict(model, adapter_name)
    base = dict(model.named_parameters(remove_duplicate=False))

    missing = sorted(set(expected) - set(saved))
    unexpected, mismatched, base_updates = [], [], {}
    for key, value in saved.items():
        target = expected.get(key)
        if target is None:
            # PEFT saves an adapted embedding's base weight too (for resized vocabularies)
            if f".{names.BASE_LAYER}." in key and key in base:
                target = base[key]
                base_updates[key] = value
            else:
                unexpected.append(key)
                continue
        if tuple(value.shape) != tuple(target.shape):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys (not adapters of this model and config): {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_listing(mismatched)}")
    if problems:
        raise CheckpointError(f"{path} does not fit {type(model.get_base_model()).__name__}: " + "; ".join(problems))

    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(saved[key].to(dtype=target.dtype, device=target.device))
        for fqn, value in base_updates.items():
            _replace_base_tensor(model, fqn, value)


def _replace_base_tensor(model: nn.Module, fqn: str, value: torch.Tensor) -> None:
    """Swap a base tensor for the checkpoint's (and its tied aliases), never writing into shared storage."""
    old = model.get_parameter(fqn)
    if torch.equal(old.detach().cpu(), value.to(old.dtype)):
        return
    new = nn.Parameter(value.to(dtype=old.dtype, device=old.device), requires_grad=False)
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if p is old:
            module_path, attr = names.split_module(name)
            model.get_submodule(module_path).register_parameter(attr, new)


def _listing(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" ... and {len(keys) - n} more" if len(keys) > n else "")


def read_config(directory: str | os.PathLike) -> Any:
    """The `adapter_config.json` of an adapter folder, as a config object."""
    directory = os.fspath(directory)
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        what = "no such folder" if not os.path.isdir(directory) else f"no {CONFIG_NAME} in it"
        raise CheckpointError(f"{directory}: {what}")
    return load_config(config_path)


def load_adapter(model: Any, directory: str | os.PathLike, adapter_name: str, is_trainable: bool = False) -> None:
    """Add the adapter saved in `directory` (by peftc or PEFT) to `model`, an AdaptedModel (not activated,
    as in PEFT); nothing is left of it if its weights do not load."""
    config = read_config(directory)
    config.inference_mode = not is_trainable
    try:
        model.add_adapter(adapter_name, config)
    except (ConfigError, TargetError) as e:  # the saved config does not fit this model: name the file
        raise type(e)(f"{os.path.join(os.fspath(directory), CONFIG_NAME)}: {e}") from None
    try:
        load_adapter_weights(model, os.fspath(directory), adapter_name)
    except BaseException:
        model.delete_adapter(adapter_name)
        raise


def hotswap_adapter(model: Any, directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Replace a loaded adapter's weights and scales by a saved adapter's, in place (PEFT's `hotswap_adapter`):
    same method and targets, each tensor the same size or smaller (a smaller rank is zero-padded, which adds
    nothing). No graph is captured or rewritten again."""
    adapters = model.adapter_set
    if adapter_name not in adapters.configs:
        raise ConfigError(f"no adapter named {adapter_name!r} to hot-swap; loaded: {adapters.order}")
    config = read_config(directory)
    live = adapters.configs[adapter_name]
    where = f"{os.fspath(directory)}: cannot hot-swap into {adapter_name!r}"
    if config.peft_type != live.peft_type:
        raise ConfigError(f"{where}: it is {config.peft_type}, the loaded adapter {live.peft_type}")
    mas = adapters.of(adapter_name)
    if has_extras(live) or has_extras(config):
        raise ConfigError(f"{where}: hot-swapping adapters with {', '.join(EXTRAS)} is not supported yet")
    source = adapters.tree.source
    method, *parts = methods_for(config.peft_type)
    prepared = method.prepare_config(copy.deepcopy(config), source)
    found = [Target(path, path, source.get_submodule(path), kind)
             for path, kind in layer_kinds(source, method, prepared).items()]
    # the method's own targets and its parts' (LoRA's nn.MultiheadAttention weights), as `AdapterSet.add` places them
    placed = Placed(adapters.configs, adapters.modules, [(method, method.own_targets(prepared, source, found))])
    for part in parts:
        placed.new.append((part, part.targets(prepared, source, adapter_name, placed)))
    created_as = {t.names_at: t for _, targets in placed.new for t in targets}
    if set(created_as) != {ma.module_path for ma in mas}:
        raise ConfigError(f"{where}: it targets other modules ({_listing_diff(created_as, mas)})")
    saved = read_weights(os.path.join(os.fspath(directory), WEIGHTS_NAME))
    expected = adapter_state_dict(model, adapter_name)
    if set(saved) != set(expected):
        raise ConfigError(f"{where}: its tensors differ ({_listing_diff(saved, expected)})")
    too_big = [k for k, t in saved.items() if t.dim() != expected[k].dim()
               or any(a > b for a, b in zip(t.shape, expected[k].shape))]
    if too_big:
        raise ConfigError(f"{where}: larger than the loaded adapter at {too_big[:4]}")
    smaller = [k for k, t in saved.items() if t.shape != expected[k].shape]
    if smaller and type(method).saved_tensors is not Method.saved_tensors:
        # its saved rows are a selection of the live ones (AdaLoRA's rank_pattern): padding them at the end
        # would not put them back where the config says they are
        raise ConfigError(f"{where}: smaller than the loaded adapter at {smaller[:4]}, and {method.peft_type} "
                          "checkpoints hold a selection of its rows (rank_pattern); load it with load_adapter")
    # only create()'s run-time buffers (scales) are read: a data-driven init (CorDA, LoRA-GA) has no statistics
    # here, and the base stays the loaded adapter's residual, as PEFT's hotswap_adapter leaves it
    plain = copy.deepcopy(config)
    if getattr(plain, "init_method", None) in ("corda", "lora_ga"):
        plain.init_lora_weights = True
    with torch.random.fork_rng(devices=[]):  # create() draws fresh parameters we discard: keep the RNG as is
        buffers = {ma.module_path: ma.method.create(plain, created_as[ma.module_path].module_name,
                                                    created_as[ma.module_path].module, ma.kind).buffers
                   for ma in mas}
    with torch.no_grad():
        for key, t in saved.items():
            target = expected[key]
            target.zero_()
            target[tuple(slice(0, n) for n in t.shape)].copy_(t)
        # zero-padded now only if this adapter is smaller (swapping a full-size one back clears it)
        if any(t.shape != expected[key].shape for key, t in saved.items()):
            adapters.padded.add(adapter_name)
        else:
            adapters.padded.discard(adapter_name)
        for ma in mas:
            for key, value in buffers[ma.module_path].items():
                ma.tensors[key][1].copy_(value)
    config.inference_mode = live.inference_mode
    adapters.configs[adapter_name] = config


def _listing_diff(got: Any, want: Any) -> str:
    got = set(got)
    want = {w.module_path if hasattr(w, "module_path") else w for w in want}
    extra, missing = sorted(got - want)[:3], sorted(want - got)[:3]
    return f"only in the new one: {extra}; only in the loaded one: {missing}"
