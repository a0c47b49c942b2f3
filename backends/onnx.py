"""ONNX Runtime backend: export an adapted model's graph to ONNX, and serve it by adapter name.

    peftc.export_onnx(am, "m.onnx", mode="merged")   # adapters folded into the weights
    peftc.export_onnx(am, "s.onnx", mode="switch")   # every adapter stacked, `adapter_index` per sample
    peftc.export_onnx(am, "i.onnx", mode="inputs")   # the active adapter's tensors are graph inputs
    peftc.save_onnx_adapter(am, "a.safetensors", "a")  # ...fed from a file at run time

    session = OnnxAdapterSession("s.onnx")
    session.run({"input_ids": ids}, adapter_names=["a", "__base__", "b"])

Each mode exports one of the adapted model's rewritten graphs as it is (the folded graph, the
mixed-adapter graph of the dispatch pass, the active-adapter graph), through a small module
whose inputs are the user's tensors (plus `adapter_index`, plus the adapter tensors in
"inputs" mode) and whose outputs are the model's output tensors, named after their fields
(`logits`, `last_hidden_state`). The other state tensors become initializers. Batch and
sequence dims stay dynamic where the captured graph has them symbolic. Switching is standard
ONNX (Gather of the stacked adapters, MatMul): no custom ops. What the runner needs (mode,
adapter order, which inputs are adapter tensors) is stored in the model's metadata.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from peftc.passes.dispatch import BASE_NAME, BASE_ONLY, slot_indices
from peftc.passes.fold_adapter_constants import FoldAdapterConstants
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.export import Dim

from peftc import names
from peftc.capture import CapturedGraph, split_inputs, synthesize_inputs
from peftc.errors import CheckpointError, ConfigError
from peftc.graph import ADDED_STATE, copy_graph_module
from peftc.state import set_tensor

from . import onnx_fusions, onnx_nan_guards
from .compile import batch_size, inline_grad_blocks
from .onnx_prologue import INDEX, BoundRuns, FixedInputPrologue, ort_values, split_fixed_inputs

MODES = ("merged", "switch", "inputs")
METADATA_KEY = "peftc"
ORT_ADAPTER_SUFFIX = ".onnx_adapter"  # ONNX Runtime's adapter format; anything else is safetensors


def export_onnx(
    model: Any,
    path: str | os.PathLike,
    mode: str = "merged",
    example_inputs: Any = None,
    adapter_names: Sequence[str] | None = None,
    **export_options: Any,
) -> str:
    """Export the adapted `model` to the ONNX file `path` (returned).

    mode "merged": the adapters `adapter_names` (default: the active ones) folded into the
    weights, no adapter nodes. "switch": every loaded adapter stacked as initializers and an
    `adapter_index` input (int64, one entry per sample, -1 for the base model alone, else the
    position in `model.adapter_order`). "inputs": the one active adapter's tensors are graph
    inputs named by their PEFT keys (`base_model.model.<module>.lora_A.weight`,
    `...lora_scaling`), fed at run time from a file `save_onnx_adapter` writes; each also has an
    initializer of its name holding the exported adapter (ONNX's overridable default).

    `example_inputs` (a dict of keyword tensors or a tuple of positional ones, batch >= 2) names
    the call to export, e.g. with an attention mask; default: `input_ids` for a transformers
    model. `export_options` go to `torch.onnx.export` (`opset_version`, `external_data`, ...).
    """
    args, kwargs = _example_call(model, example_inputs)
    return export_program(model, path, mode, args, kwargs, adapter_names, **export_options)


def export_program(model: Any, path: str | os.PathLike, mode: str, args: tuple, kwargs: dict,
                   adapter_names: Sequence[str] | None = None, kind: Any = None, rename: Any = None,
                   metadata: dict[str, Any] | None = None, ort_fusions: str | None = None,
                   **export_options: Any) -> str:
    """Export the program of kind `kind` (None: the forward; see `peftc.generation.ProgramKind`) for the call
    (`args`, `kwargs`) in `mode` to `path`: the piece `export_onnx` and the decoder export share.
    `rename(name) -> name` renames inputs and outputs from their defaults (keyword names, output fields);
    `metadata` is stored beside the runner's own; `ort_fusions` (None, or a provider of
    `onnx_fusions.PROVIDERS`) fuses the exported graph into ONNX Runtime's operators for that provider."""
    if mode not in MODES:
        raise ConfigError(f"export mode {mode!r}: choose one of {', '.join(MODES)}")
    if adapter_names is not None and mode != "merged":
        raise ConfigError(f"adapter_names chooses what mode='merged' folds; mode={mode!r} exports "
                          + ("every loaded adapter" if mode == "switch" else "the active adapter"))
    if mode == "inputs" and (len(model.active_adapters) != 1 or model.merged):
        raise ConfigError(f"mode='inputs' exports one active, unmerged adapter; active: {model.active_adapters}"
                          + (" (merged)" if model.merged else ""))
    if mode == "merged":
        model = model.fold(adapter_names)
    program, flat = model.programs.program(args, kwargs, model.training, mixed=mode == "switch", kind=kind)
    captured = program.captured
    state = set(captured.state_names())
    adapter_keys = {fqn: key for fqn, key in _adapter_input_keys(model).items() if fqn in state} if mode == "inputs" \
        else {}

    # the graph's own mode was fixed at capture
    entry = _Entry(captured, model, flat, adapter_keys, fold_adapters=mode == "switch").eval()
    rename = rename or (lambda name: name)
    user_names = [rename(n) for n in _user_input_names(args, kwargs, flat)]
    index_names = [INDEX] if mode == "switch" else []
    example = [v for v in flat if isinstance(v, torch.Tensor)]
    if mode == "switch":
        example.append(torch.zeros(batch_size(example), dtype=torch.int64))
    adapter_values = {key: _as_input(model.parameter_tree.tensor(fqn)) for fqn, key in adapter_keys.items()}
    example += list(adapter_values.values())
    dynamic = [_dynamic_dims(check) for check in captured.input_checks if check[0] == "tensor"]
    dynamic += [{0: Dim.AUTO}] * len(index_names) + [None] * len(adapter_keys)
    output_names = [rename(n) for n in _output_names(captured)]
    metadata = {
        "mode": mode,
        "adapters": model.active_adapters if mode != "switch" else model.adapter_order,
        "inputs": user_names,
        "adapter_inputs": {key: list(t.shape) for key, t in adapter_values.items()},
        "outputs": output_names,
        **({"ort_fusions": ort_fusions} if ort_fusions else {}),
        **(metadata or {}),
    }
    external_data = export_options.pop("external_data", None)  # None: only past ONNX's 2 GB limit
    export_options.setdefault("verbose", False)
    with torch.no_grad(), _untranslatable_ops_named(mode):
        program_onnx = torch.onnx.export(
            entry, tuple(example), dynamo=True, input_names=[*user_names, *index_names, *adapter_values],
            output_names=output_names, dynamic_shapes={"inputs": tuple(dynamic)}, **export_options,
        )
    onnx_nan_guards.drop_softmax_nan_guards(program_onnx.model.graph)
    if ort_fusions is not None:  # before the adapter inputs get their initializers: none is fused as a constant
        onnx_fusions.fuse(program_onnx.model, ort_fusions)
    _overridable(program_onnx.model.graph, adapter_values)
    program_onnx.model.metadata_props[METADATA_KEY] = json.dumps(metadata)
    program_onnx.save(os.fspath(path), external_data=external_data)
    return os.fspath(path)


@contextlib.contextmanager
def _untranslatable_ops_named(mode: str) -> Iterator[None]:
    """torch.onnx's failure to translate an op (its message buried in a report) as a ConfigError naming the op."""
    try:
        yield
    except Exception as error:
        found = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", str(error))
        if found is None:
            raise
        hint = (" from the adapter tensors it takes as inputs (BOFT's rotation, for one); mode='switch' and "
                "mode='merged' compute what depends on the adapters alone in torch") if mode == "inputs" else ""
        raise ConfigError(f"mode={mode!r}: ONNX has no operator for {found.group(1)}, which this graph "
                          f"computes{hint}") from error


def _overridable(graph: Any, values: dict[str, torch.Tensor]) -> None:
    """Give each adapter input an initializer of its name holding the exported adapter: ONNX's overridable
    initializer, so a client that feeds no adapter (onnxruntime-genai without an active adapter) runs."""
    import onnx_ir as ir

    for value in graph.inputs:
        if value.name in values:
            value.const_value = ir.tensor(values[value.name].detach().cpu().numpy(), name=value.name)
            graph.register_initializer(value)


def save_onnx_adapter(model: Any, path: str | os.PathLike, adapter_name: str | None = None) -> str:
    """Write one adapter's tensors (default: the active adapter) under the input names of a
    mode="inputs" export: safetensors, or ONNX Runtime's adapter format for a `.onnx_adapter` path."""
    adapter_name = adapter_name or model.active_adapters[0]
    tensors = {key: _as_input(model.parameter_tree.tensor(fqn)).cpu().contiguous()
               for fqn, key in _adapter_input_keys(model, adapter_name).items()}
    path = os.fspath(path)
    if path.endswith(ORT_ADAPTER_SUFFIX):
        _write_ort_adapter(path, {k: t.numpy() for k, t in tensors.items()})
    else:
        save_file(tensors, path)
    return path


def _write_ort_adapter(path: str, arrays: dict[str, np.ndarray]) -> None:
    import onnxruntime as ort

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(a) for k, a in arrays.items()})
    adapter.export_adapter(path)


def default_providers() -> list[str]:
    """CUDA where onnxruntime-gpu has it (the `gpu` extra), else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxAdapterSession:
    """Serve an exported model with adapter names: `run(inputs, adapter_names=[...])`.

    merged: the adapters are in the weights, so no names. switch: one name per sample among
    those exported ("__base__": the base model alone). inputs: adapters loaded with
    `load_adapter(file, name)`, one per run (every sample the same name)."""

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None,
                 session_options: Any = None):
        import onnx
        import onnxruntime as ort
        from google.protobuf.message import DecodeError

        try:
            model = onnx.load(os.fspath(path), load_external_data=False)
        except (OSError, DecodeError) as e:
            raise CheckpointError(f"{path}: cannot read the ONNX model ({e})") from None
        meta = {p.key: p.value for p in model.metadata_props}.get(METADATA_KEY)
        if meta is None:
            raise CheckpointError(f"{path}: not exported by peftc.export_onnx (no {METADATA_KEY!r} metadata)")
        meta = json.loads(meta)
        self.mode: str = meta["mode"]
        self.exported_adapters: list[str] = meta["adapters"]
        self.input_names: list[str] = meta["inputs"]
        self.output_names: list[str] = meta["outputs"]
        self.adapter_inputs: dict[str, list[int]] = meta["adapter_inputs"]
        self.task: str | None = meta.get("task")  # "text-generation": a decoder with a KV cache
        self.cache: list[list[int]] = meta.get("cache", [])  # its layers' [kv heads, head dim]
        self.cache_dtype: str = meta.get("cache_dtype", "float32")
        providers = list(providers or default_providers())
        fixed = [INDEX] if self.mode == "switch" else list(self.adapter_inputs)
        split = None if any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer) \
            else split_fixed_inputs(model, fixed)
        self._prologue: FixedInputPrologue | None = None  # what the fixed inputs alone give, run once per choice
        if split is None:
            self.session = ort.InferenceSession(os.fspath(path), session_options, providers=providers)
        else:
            self.session = ort.InferenceSession(split.step.SerializeToString(), session_options, providers=providers)
        self._device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if split is not None:
            prologue = ort.InferenceSession(split.prologue.SerializeToString(), session_options, providers=providers)
            self._prologue = FixedInputPrologue(prologue, split, self._device)
        self._adapters: dict[str, dict[str, Any]] = {}  # inputs mode: name -> input name -> OrtValue

    @property
    def adapter_names(self) -> list[str]:
        """The names `run` accepts."""
        return list(self._adapters) if self.mode == "inputs" else list(self.exported_adapters)

    def load_adapter(self, source: str | os.PathLike, adapter_name: str) -> None:
        """Load an adapter file written by `save_onnx_adapter` (mode="inputs" exports only). A tensor
        smaller than the input it feeds (a lower rank) is zero-padded, as in `hotswap_adapter`."""
        if self.mode != "inputs":
            raise ConfigError(f"this model was exported with mode={self.mode!r}: its adapters "
                              f"{self.exported_adapters} are built in; export mode='inputs' to load adapters")
        tensors = _read_adapter_file(os.fspath(source))
        missing = sorted(set(self.adapter_inputs) - set(tensors))
        extra = sorted(set(tensors) - set(self.adapter_inputs))
        if missing or extra:
            raise CheckpointError(f"{source}: not an adapter for this model: missing {missing[:3]}, "
                                  f"unexpected {extra[:3]} ({len(missing)} missing, {len(extra)} unexpected)")
        fitted = {key: _fit(tensors[key], shape, f"{source}: {key}") for key, shape in self.adapter_inputs.items()}
        self._adapters[adapter_name] = ort_values(fitted, self._device)

    def save_adapter(self, adapter_name: str, path: str | os.PathLike) -> str:
        """Write a loaded adapter as this model's inputs take it (a lower rank zero-padded to the export's)
        in ONNX Runtime's adapter format: the file onnxruntime-genai's `og.Adapters.load` needs, which
        does not pad."""
        if adapter_name not in self._adapters:
            raise ConfigError(f"no loaded adapter named {adapter_name!r}; loaded: {list(self._adapters)}")
        path = os.fspath(path)
        if not path.endswith(ORT_ADAPTER_SUFFIX):
            raise ConfigError(f"{path}: save_adapter writes ONNX Runtime's adapter format (*{ORT_ADAPTER_SUFFIX})")
        _write_ort_adapter(path, {k: np.asarray(v.numpy()) for k, v in self._adapters[adapter_name].items()})
        return path

    def run(self, inputs: dict[str, Any], adapter_names: str | Sequence[str] | None = None,
            adapter_index: Any = None) -> dict[str, np.ndarray]:
        """Outputs by name for `inputs` (numpy arrays or torch tensors, by input name). A switch-mode
        model also takes the raw `adapter_index` (-1: base model; i: `exported_adapters[i]`)."""
        return {name: value.numpy() for name, value in self.run_values(inputs, adapter_names, adapter_index).items()}

    def run_values(self, inputs: dict[str, Any], adapter_names: str | Sequence[str] | None = None,
                   adapter_index: Any = None, on_device: Collection[str] = (),
                   runs: BoundRuns | None = None) -> dict[str, Any]:
        """As `run`, with ONNX Runtime's own `OrtValue`s out (and accepted in): a decode loop feeds the
        present KV cache back as the next past without copying it into numpy and back, and names it in
        `on_device` so that on a GPU it stays there too. A loop passes the same `runs`
        (`bound_runs(adapter_names, ...)`, which carries the adapter choice) at every step instead of the
        adapter arguments, so that the choice is resolved and its inputs (the adapter rows) bound once."""
        feed = self._inputs(inputs)
        if runs is None:
            batch = next(_shape(a)[0] for a in feed.values() if len(_shape(a)) > 0)
            runs = self.bound_runs(adapter_names, adapter_index, batch)
        elif adapter_names is not None or adapter_index is not None:
            raise ConfigError("run_values: the adapter choice of a loop is given to bound_runs, not with its runs")
        return dict(zip(self.output_names, runs.run(feed, self.output_names, on_device)))

    def bound_runs(self, adapter_names: str | Sequence[str] | None = None, adapter_index: Any = None,
                   batch: int = 1) -> BoundRuns:
        """An IO binding of this session for a loop of `run_values` calls on batches of `batch` samples, all
        with one adapter choice (as `run` takes it): the adapter inputs, or what the prologue computes from
        them, are bound once."""
        fixed = self._adapter_feed(adapter_names, adapter_index, batch)
        if self._prologue is not None:
            fixed = self._prologue(fixed)
        return BoundRuns(self.session, self._device, ort_values(fixed, self._device))

    def _inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The user's inputs (numpy, torch or OrtValue) as OrtValues, checked against the model's."""
        unknown = sorted(set(inputs) - set(self.input_names))
        missing = [n for n in self.input_names if n not in inputs]
        if unknown or missing:
            raise ConfigError(f"inputs: expected {self.input_names}; missing {missing}, unknown {unknown}")
        return ort_values({name: _numpy(inputs[name]) for name in self.input_names}, self._device)

    def _adapter_feed(self, adapter_names: str | Sequence[str] | None, adapter_index: Any,
                      batch: int) -> dict[str, Any]:
        """The adapter inputs for a batch of `batch` samples: a switch model's `adapter_index`, an inputs
        model's adapter tensors, none for a merged model."""
        if adapter_index is not None:
            if adapter_names is not None or self.mode != "switch":
                raise ConfigError("adapter_index is for mode='switch' models, instead of adapter_names")
            return {INDEX: self._checked_index(_numpy(adapter_index), batch)}
        wanted = self._names_for(adapter_names, batch)
        if self.mode == "switch":
            return {INDEX: np.array(slot_indices(wanted, self.exported_adapters), dtype=np.int64)}
        if self.mode == "inputs":
            return dict(self._adapters[wanted[0]])
        return {}

    def generate(self, input_ids: Any, attention_mask: Any = None, max_new_tokens: int = 20,
                 adapter_names: str | Sequence[str] | None = None, **options: Any) -> np.ndarray:
        """Prompt + new tokens from a decoder exported with a KV cache (`export_onnx_decoder`): greedy or
        sampled (`do_sample`, `temperature`, `top_k`, `top_p`), per-sample adapters in switch mode; see
        `peftc.backends.onnx_decoder.generate`."""
        from .onnx_decoder import generate

        return generate(self, input_ids, attention_mask, max_new_tokens, adapter_names, **options)

    def _checked_index(self, index: np.ndarray, batch: int) -> np.ndarray:
        n = len(self.exported_adapters)
        if index.ndim != 1 or index.shape[0] != batch or not np.issubdtype(index.dtype, np.integer):
            raise ConfigError(f"adapter_index must be a 1-d integer array with one entry per sample ({batch}), "
                              f"got {index.dtype} of shape {list(index.shape)}")
        if index.size and (index.min() < BASE_ONLY or index.max() >= n):
            raise ConfigError(f"adapter_index entries must be in [-1, {n - 1}] (-1: base model; 0..{n - 1}: "
                              f"{self.exported_adapters}), got {index.tolist()}")
        return index.astype(np.int64)

    def _names_for(self, adapter_names: str | Sequence[str] | None, batch: int) -> list[str]:
        """Per-sample adapter names, checked against what this session can run."""
        if self.mode == "merged":
            if adapter_names is not None:
                raise ConfigError(f"this model was exported with {self.exported_adapters} merged into its weights: "
                                  "run it without adapter_names (export mode='switch' to choose per sample)")
            return []
        available = self.adapter_names
        if adapter_names is None:
            if len(available) != 1:
                raise ConfigError(f"pass adapter_names: this session has adapters {available}")
            adapter_names = available[0]
        wanted = [adapter_names] * batch if isinstance(adapter_names, str) else list(adapter_names)
        if len(wanted) != batch:
            raise ConfigError(f"adapter_names has {len(wanted)} entries for a batch of {batch}")
        allowed = set(available) | ({BASE_NAME} if self.mode == "switch" else set())
        unknown = sorted(set(wanted) - allowed)
        if unknown:
            raise ConfigError(f"adapter_names: unknown adapter(s) {unknown}; this session has {sorted(allowed)}"
                              + ("" if self.mode == "switch" else " (load_adapter adds more)"))
        if self.mode == "inputs" and len(set(wanted)) > 1:
            raise ConfigError(f"a mode='inputs' model runs one adapter per call, got {sorted(set(wanted))}; "
                              "export mode='switch' for mixed batches")
        return wanted


class _Entry(nn.Module):
    """Tensors in, tensors out: calls a lifted graph with the model's state as buffers (initializers),
    the call's constants fixed, and the adapter tensors of `adapter_keys` taken as inputs."""

    def __init__(self, captured: CapturedGraph, model: Any, flat: list[Any], adapter_keys: dict[str, str],
                 fold_adapters: bool = False):
        super().__init__()
        self.gm = copy_graph_module(captured.gm)
        inline_grad_blocks(self.gm)  # torch.export would keep the block as a subgraph the exporter cannot lower
        self.state = captured.state_names()
        if fold_adapters:  # the adapters are constants of the file: so is what the graph computes from them alone
            placeholders = self.gm.graph.find_nodes(op="placeholder")
            values = {node: model.parameter_tree.tensor(fqn).detach()
                      for node, fqn in zip(placeholders, self.state) if node.meta.get(ADDED_STATE)}
            FoldAdapterConstants(values)(self.gm)
        self.constants = [None if isinstance(v, torch.Tensor) else v for v in flat]
        self.adapter_fqns = list(adapter_keys)
        self.adapter_shapes = {fqn: model.parameter_tree.tensor(fqn).shape for fqn in adapter_keys}
        self.n_mutated = len(captured.mutated_state)
        self.holder = nn.Module()
        for fqn in self.state:
            if fqn not in adapter_keys:
                set_tensor(self.holder, fqn, model.parameter_tree.tensor(fqn).detach(), persistent=True)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n_user = sum(c is None for c in self.constants)
        user, rest = iter(inputs[:n_user]), inputs[n_user:]
        n_index = len(rest) - len(self.adapter_fqns)
        fed = {fqn: t.reshape(self.adapter_shapes[fqn]) for fqn, t in zip(self.adapter_fqns, rest[n_index:])}
        state = [fed[fqn] if fqn in fed else self.holder.get_buffer(fqn) for fqn in self.state]
        flat = [next(user) if c is None else c for c in self.constants]
        outputs = self.gm(*state, *flat, *rest[:n_index])
        return tuple(outputs[self.n_mutated:])


def _example_call(model: Any, example_inputs: Any) -> tuple[tuple, dict]:
    if example_inputs is None:
        example_inputs = synthesize_inputs(model.get_base_model())
    return split_inputs(example_inputs)


def _adapter_input_keys(model: Any, adapter_name: str | None = None) -> dict[str, str]:
    """FQN -> input name (its PEFT saved key) of each tensor of one adapter (default: the active one)."""
    adapter_name = adapter_name or model.active_adapters[0]
    if adapter_name not in model.adapter_order:
        raise ConfigError(f"no adapter named {adapter_name!r}; loaded: {model.adapter_order}")
    keys = {}
    for mas in model.targeted_modules.values():
        for ma in mas:
            if ma.adapter == adapter_name:
                for key, (fqn, _) in ma.tensors.items():
                    keys[fqn] = names.shared_saved_key(*key) if names.is_shared(fqn) else names.saved_key(
                        ma.module_path, *key)
    return keys


def _as_input(t: torch.Tensor) -> torch.Tensor:
    """An adapter tensor as a graph input and in adapter files: a scalar (a scale) as shape [1], which
    ONNX Runtime's adapter format requires."""
    t = t.detach()
    return t.reshape(1) if t.dim() == 0 else t


def _path_name(path: tuple) -> str:
    return "_".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _user_input_names(args: tuple, kwargs: dict, flat: list[Any]) -> list[str]:
    """Input names of the call's tensors: keyword names, `input_<i>` for positional ones."""
    leaves, _ = pytree.tree_flatten_with_path((tuple(args), {k: kwargs[k] for k in sorted(kwargs)}))
    return [("input_" if path[0].idx == 0 else "") + _path_name(path[1:])
            for (path, _), value in zip(leaves, flat) if isinstance(value, torch.Tensor)]


def _output_names(captured: CapturedGraph) -> list[str]:
    """Output names from the output's structure: field names of an HF output, `output` for a tensor."""
    structure = pytree.tree_unflatten(list(range(captured.out_spec.num_leaves)), captured.out_spec)
    named = [_path_name(path) for path, _ in pytree.tree_flatten_with_path(structure)[0]]
    return ["output" if not n else f"output_{n}" if n[0].isdigit() else n for n in named]


def _dynamic_dims(check: tuple) -> dict[int, Any] | None:
    dims = {d: Dim.AUTO for d, size in enumerate(check[2]) if not isinstance(size, int)}
    return dims or None


def _read_adapter_file(path: str) -> dict[str, np.ndarray]:
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: a folder; load_adapter reads the file save_onnx_adapter writes "
                              f"(.safetensors or {ORT_ADAPTER_SUFFIX}), which also holds the adapter's scales")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such adapter file")
    try:
        if path.endswith(ORT_ADAPTER_SUFFIX):
            import onnxruntime as ort

            # the arrays view memory the adapter object owns: copy them while it is alive
            adapter = ort.AdapterFormat.read_adapter(path)
            return {k: np.array(v.numpy()) for k, v in adapter.get_parameters().items()}
        return {k: t.numpy() for k, t in load_file(path).items()}
    except (SafetensorError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read the adapter file ({e})") from None


def _fit(array: np.ndarray, shape: list[int], where: str) -> np.ndarray:
    """`array` in `shape`, zero-padded at the end of each dim where it is smaller."""
    if list(array.shape) == shape:
        return np.ascontiguousarray(array)
    if array.ndim != len(shape):
        raise CheckpointError(f"{where}: shape {list(array.shape)} does not fit the exported {shape}")
    if any(a > s for a, s in zip(array.shape, shape)):
        raise CheckpointError(f"{where}: shape {list(array.shape)} does not fit the exported {shape} (larger: "
                              "an adapter of a higher rank than the export's needs a new export)")
    out = np.zeros(shape, dtype=array.dtype)
    out[tuple(slice(0, n) for n in array.shape)] = array
    return out


def _numpy(value: Any) -> Any:
    """numpy for a feed; an OrtValue stays one."""
    import onnxruntime as ort

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value if isinstance(value, ort.OrtValue) else np.asarray(value)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape() if callable(value.shape) else value.shape)
