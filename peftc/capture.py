"""Capture: trace a model into a lifted aten-level fx graph with torch.export.

The graph is kept in lifted form: every parameter and buffer is a placeholder tagged with
its fully qualified name (`STATE`), every user input a placeholder tagged with its position
in the flattened call (`USER`). A graph is then a pure function of (state, inputs): the
adapted model owns the tensors and binds them at call time, so devices, dtypes,
`load_state_dict` and DDP act on one set of parameters shared by all captured graphs.

A graph is specialised on its call signature (which kwargs, non-tensor values, dtypes) and
on the module mode (train/eval): `signature_key` names that, `accepts` checks the shapes,
the way torch.compile guards a compiled frame.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.export import Dim
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP
from torch.utils._sympy.numbers import int_oo
from torch.utils._sympy.printers import PythonPrinter

from .errors import CaptureError, ConfigError

STATE = "peftc_state"  # placeholder meta: FQN of the parameter/buffer it stands for
USER = "peftc_user"  # placeholder meta: index into the flattened user inputs

SYNTH_BATCH, SYNTH_SEQ = 2, 13  # batch >= 2 (1 specialises); seq distinct from batch (duck sizing)


@dataclass
class CapturedGraph:
    """A lifted graph plus what is needed to call it like the original module."""

    gm: torch.fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    mutated_state: list[str]  # FQNs the first len() graph outputs are written back to
    training: bool
    input_checks: list[tuple[Any, ...]] = field(default_factory=list)
    ranges: dict[sympy.Symbol, tuple[int, float]] = field(default_factory=dict)
    extra_inputs: tuple[str, ...] = ()  # inputs a rewrite added after the user's (e.g. "adapter_index")
    guards: Callable[[list[Any]], bool] | None = None  # the trace's guards: relations between sizes

    def state_names(self) -> list[str]:
        return [n.meta[STATE] for n in self.gm.graph.find_nodes(op="placeholder") if STATE in n.meta]

    def accepts(self, flat_inputs: list[Any]) -> bool:
        """Do these inputs satisfy the shapes and guards the graph was specialised on?"""
        if len(flat_inputs) != len(self.input_checks):
            return False
        bound: dict[sympy.Symbol, int] = {}
        deferred: list[tuple[sympy.Expr, int]] = []
        for value, check in zip(flat_inputs, self.input_checks):
            if check[0] == "value":
                if isinstance(value, torch.Tensor) or value != check[1]:
                    return False
                continue
            if not isinstance(value, torch.Tensor) or value.dtype != check[1] or value.dim() != len(check[2]):
                return False
            for size, dim in zip(value.shape, check[2]):
                if isinstance(dim, int):
                    if size != dim:
                        return False
                elif isinstance(dim, sympy.Symbol):
                    if not self._binds(dim, size, bound):
                        return False
                else:
                    deferred.append((dim, size))
        if not all(_evaluated(expr, bound) == size for expr, size in deferred):
            return False
        return self.guards is None or self.guards(flat_inputs)

    def _binds(self, symbol: sympy.Symbol, value: int, bound: dict[sympy.Symbol, int]) -> bool:
        """`value` for `symbol`: consistent with its other uses and within the range the trace allowed."""
        if bound.setdefault(symbol, value) != value:
            return False
        lo, hi = self.ranges.get(symbol, (0, float("inf")))
        return lo <= value <= hi


@functools.cache
def _as_function(expr: sympy.Expr) -> tuple[tuple[sympy.Symbol, ...], Callable[..., Any]]:
    symbols = tuple(sorted(expr.free_symbols, key=str))
    source = f"lambda {', '.join(map(str, symbols))}: {PythonPrinter().doprint(expr)}"  # as torch prints guards
    return symbols, eval(source, {"math": math, **SYMPY_INTERP})


def _evaluated(expr: sympy.Expr, bound: dict[sympy.Symbol, int]) -> int | None:
    """`expr` at the bound sizes (None where a symbol is unbound), through a function compiled once per
    expression: `subs` at every call cost more than a decode step's other bookkeeping."""
    symbols, function = _as_function(expr)
    if any(s not in bound for s in symbols):
        return None
    return int(function(*(bound[s] for s in symbols)))


def signature_key(flat_inputs: list[Any], spec: pytree.TreeSpec, training: bool) -> tuple:
    """What a graph is specialised on besides shapes: structure, constants, dtypes, devices, mode."""
    leaves = tuple(
        ("T", v.dtype, v.dim(), v.device.type) if isinstance(v, torch.Tensor) else ("V", _hashable(v))
        for v in flat_inputs
    )
    return (training, str(spec), leaves)


def _hashable(v: Any) -> Any:
    try:
        hash(v)
        return v
    except TypeError:
        return repr(v)


def leading_size(values: Iterable[Any]) -> Any:
    """The batch a per-sample adapter index runs over: dim 0 of the first tensor with a dim among a call's
    flat inputs (an int at run time; a symbol, or an int export specialised, among a graph's example values);
    None where there is none."""
    return next((v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.dim() > 0), None)


def flatten_call(args: tuple, kwargs: dict) -> tuple[list[Any], pytree.TreeSpec]:
    """Flatten a call the way the graph was captured: kwargs in sorted key order."""
    return pytree.tree_flatten((tuple(args), {k: kwargs[k] for k in sorted(kwargs)}))


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """(args, kwargs) of a call from `example_inputs`: a dict of keyword inputs, a tensor, or positional ones."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise ConfigError(
        f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
        f"got {type(example_inputs).__name__}"
    )


def is_transformers_model(model: torch.nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def tensor_call_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Scalar arguments of transformers models that have a tensor form with the same meaning, in that form, so
    that each new value is an input to the same graph rather than a new capture: `logits_to_keep=k` (the last
    k positions; 0 keeps all) is the 1-D tensor of those positions."""
    keep, ids = kwargs.get("logits_to_keep"), kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if type(keep) is not int or keep <= 0 or not isinstance(ids, torch.Tensor) or ids.dim() < 2:
        return kwargs
    seq = ids.shape[1]
    return {**kwargs, "logits_to_keep": torch.arange(max(seq - keep, 0), seq, device=ids.device)}


def default_call_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """Kwargs peftc adds to every call: transformers models run without a KV cache in a graph."""
    if is_transformers_model(model) and "use_cache" in inspect.signature(model.forward).parameters:
        return {"use_cache": False}
    return {}


def synthesize_inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Example inputs for a transformers model, from its config; others must pass their own."""
    if not is_transformers_model(model):
        raise CaptureError(
            f"{type(model).__name__} is not a transformers model, so peftc cannot synthesise example "
            "inputs: pass example_inputs=(tensor, ...) or a dict of keyword tensors (batch >= 2)"
        )
    main = getattr(model, "main_input_name", "input_ids")
    vocab = getattr(model.config, "vocab_size", None)
    if main != "input_ids" or not vocab:
        raise CaptureError(
            f"{type(model).__name__} takes {main!r}; peftc only synthesises input_ids for text models: "
            "pass example_inputs={...} with tensors of the right shapes (batch >= 2)"
        )
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (SYNTH_BATCH, SYNTH_SEQ), generator=gen).to(device)
    return {"input_ids": ids}


def _dynamic_dims(value: Any, transformers_model: bool) -> Any:
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    # batch is dynamic everywhere; for transformers models the sequence dim too
    dims = range(min(value.dim(), 2)) if transformers_model else range(1)
    return {d: Dim.AUTO for d in dims}


@contextlib.contextmanager
def module_mode(model: torch.nn.Module, training: bool) -> Iterator[None]:
    """Put every submodule in `training` mode for the trace and restore each flag after."""
    before = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield
    finally:
        for m, flag in before.items():
            m.training = flag


def capture(model: torch.nn.Module, args: tuple, kwargs: dict, training: bool) -> CapturedGraph:
    """Export `model(*args, **kwargs)` in the given mode into a lifted, tagged graph."""
    # a view (ids[:2, :16]) would make the trace guard on its base tensor's sizes, which later calls lack
    args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.clone() if t._base is not None else t, (args, kwargs))
    kwargs = {k: kwargs[k] for k in sorted(kwargs)}
    hf = is_transformers_model(model)
    try:
        with module_mode(model, training), _named_extra_kwargs(model, kwargs), \
                progress(f"peftc: capturing {type(model).__name__} ({'train' if training else 'eval'})"):
            dynamic = _dynamic_shapes(model, args, kwargs, hf)
            ep = torch.export.export(model, tuple(args), kwargs, strict=False, dynamic_shapes=dynamic)
            signature = inspect.signature(model.forward)  # with the extra kwargs named, as the guards name them
    except Exception as e:  # torch.export raises many types; all mean "could not trace"
        raise CaptureError(_explain_export_failure(model, e, hf)) from e
    captured = lift(ep, training)
    captured.guards = _guard_function(getattr(ep, "_guards_code", []), signature, captured.in_spec)
    return captured


def _guard_function(code: list[str], signature: inspect.Signature, in_spec: pytree.TreeSpec,
                    ) -> Callable[[list[Any]], bool] | None:
    """The trace's guards as one predicate over the flattened call.

    Ranges of single sizes are checked in `accepts`; the trace also records relations (`batch != seq`, a
    branch taken on `seq > 5`) as Python expressions over the call's arguments (`L['x'].size()[1]`),
    the code `ExportedProgram.module()` asserts before each call. A graph is only reused where they hold."""
    if not code:
        return None
    namespace = {**SYMPY_INTERP, "math": math, "inf": float("inf")}
    predicate = eval("lambda L: " + " and ".join(f"({c})" for c in code), namespace)  # noqa: S307 - torch's guards

    def guards(flat_inputs: list[Any]) -> bool:
        args, kwargs = pytree.tree_unflatten(flat_inputs, in_spec)
        arguments = dict(signature.bind(*args, **kwargs).arguments)
        try:
            return bool(predicate({**arguments, "flat_args": flat_inputs}))
        except (AttributeError, TypeError, IndexError, KeyError):  # a guard on something this call lacks
            return False

    return guards


@contextlib.contextmanager
def progress(desc: str, after_s: float = 1.0) -> Iterator[None]:
    """A tqdm line with the elapsed time while the block runs, shown once it has run `after_s` seconds
    (one blocking call has no steps to count). Only on a terminal (tqdm's `disable=None`);
    PEFTC_PROGRESS=0 turns it off."""
    if os.environ.get("PEFTC_PROGRESS", "1") == "0":
        yield
        return
    from tqdm import tqdm  # the terminal bar: it is refreshed from a helper thread

    done, start = threading.Event(), time.time()

    def show() -> None:
        if done.wait(after_s):
            return
        with tqdm(desc=desc, bar_format="{desc}: {elapsed}", disable=None, leave=False) as bar:
            bar.start_t = start  # count from the start of the block, not from when the bar appeared
            while not done.wait(0.5):
                bar.refresh()

    thread = threading.Thread(target=show, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict, hf: bool) -> dict | tuple:
    """Dynamic dims per argument, keyed by forward's parameter names as torch.export binds the call
    (a tuple would be matched in signature order, not in the order the kwargs are passed)."""

    def spec(a: Any) -> Any:
        return pytree.tree_map(lambda v: _dynamic_dims(v, hf), a, is_leaf=lambda x: isinstance(x, torch.Tensor))

    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except TypeError:  # a call that does not fit forward: let torch.export report it
        return tuple(spec(a) for a in list(args) + list(kwargs.values()))
    return {name: spec(value) for name, value in bound.items()}


@contextlib.contextmanager
def _named_extra_kwargs(model: torch.nn.Module, kwargs: dict) -> Iterator[None]:
    """Name the call's extra kwargs as keyword-only parameters of forward for the trace.

    torch.export (seen in 2.13) mis-pairs dynamic_shapes with inputs that land in a `**kwargs`
    parameter (transformers' output_attentions, Trainer's num_items_in_batch) and fails; a forward
    whose signature names them runs the same code without that path.
    """
    sig = inspect.signature(model.forward)
    params = list(sig.parameters.values())
    extra = [k for k in kwargs if k not in sig.parameters]
    if not extra or not any(p.kind is p.VAR_KEYWORD for p in params):
        yield
        return
    forward = model.forward

    def named(*a: Any, **kw: Any) -> Any:
        return forward(*a, **kw)

    named.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[p for p in params if p.kind is not p.VAR_KEYWORD]
        + [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in extra]
    )
    with traced_as_forward(model, named):
        yield


@contextlib.contextmanager
def traced_as_forward(model: torch.nn.Module, fn: Callable[..., Any]) -> Iterator[None]:
    """`model.forward` is `fn` inside the block (an instance attribute, so a trace of `model` runs `fn` with the
    model's own parameter names and module paths), and as it was after."""
    shadowed = model.__dict__.get("forward")  # an instance-level forward (accelerate hooks) is kept
    model.forward = fn
    try:
        yield
    finally:
        if shadowed is None:
            del model.forward
        else:
            model.forward = shadowed


def _explain_export_failure(model: torch.nn.Module, e: Exception, hf: bool) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()][:12]
    where = _user_frame(e)
    hint = (
        "for transformers models pass use_cache=False (peftc does by default) and check the "
        "example inputs' shapes (batch >= 2)"
        if hf
        else "pass example_inputs that exercise the forward you want adapted (batch >= 2), and "
        "avoid data-dependent Python control flow on tensor values in forward()"
    )
    return (
        f"torch.export could not trace {type(model).__name__}"
        + (f" at {where}" if where else "")
        + f": {type(e).__name__}: "
        + "\n  ".join(lines)
        + f"\nhint: {hint}"
    )


def _user_frame(e: BaseException) -> str | None:
    """The innermost frame of the traceback outside torch, naming the construct that failed."""
    frames = traceback.extract_tb(e.__traceback__)
    for frame in reversed(frames):
        if "/torch/" not in frame.filename and "peftc" not in frame.filename:
            return f"{frame.filename}:{frame.lineno} ({frame.line})"
    return None


def lift(ep: torch.export.ExportedProgram, training: bool) -> CapturedGraph:
    gm = ep.graph_module
    sig = ep.graph_signature
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    user_index = 0
    for spec, node in zip(sig.input_specs, placeholders):
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            node.meta[STATE] = spec.target
        elif spec.kind == InputKind.USER_INPUT:
            node.meta[USER] = user_index
            user_index += 1
        elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            # constants belong to the graph, not the model: hold them on the GraphModule
            attr = f"_peftc_const_{node.name}"
            setattr(gm, attr, ep.constants[spec.target])
            with gm.graph.inserting_before(node):
                get = gm.graph.get_attr(attr)
            get.meta = dict(node.meta)
            node.replace_all_uses_with(get)
            gm.graph.erase_node(node)
        else:
            raise CaptureError(f"unsupported exported input kind {spec.kind} for {spec.arg}")

    mutated = []
    for spec in sig.output_specs:
        if spec.kind == OutputKind.BUFFER_MUTATION:
            mutated.append(spec.target)
        elif spec.kind not in (OutputKind.USER_OUTPUT, OutputKind.LOSS_OUTPUT):
            raise CaptureError(f"unsupported exported output kind {spec.kind}")
    gm.recompile()

    ranges = {}
    for sym, vr in ep.range_constraints.items():
        lo = 0 if vr.lower in (-int_oo, -sympy.oo) else int(vr.lower)
        hi = float("inf") if vr.upper in (int_oo, sympy.oo) else int(vr.upper)
        ranges[sym] = (lo, hi)
    checks = []
    for node in placeholders:
        if USER not in node.meta:
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            dims = [d.node.expr if isinstance(d, torch.SymInt) else int(d) for d in val.shape]
            dims = [int(d) if isinstance(d, sympy.Integer) else d for d in dims]
            checks.append(("tensor", val.dtype, dims))
        else:
            checks.append(("value", val))
    return CapturedGraph(
        gm=gm,
        in_spec=ep.call_spec.in_spec,
        out_spec=ep.call_spec.out_spec,
        mutated_state=mutated,
        training=training,
        input_checks=checks,
        ranges=ranges,
    )
