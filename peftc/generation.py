"""Generation through the graph: one captured program serves prefill and decode with a KV cache.

    am.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64)            # the active adapters
    am.generate(**batch, adapter_names=["fr", "__base__", "de"], num_beams=2)     # per sample
    am.fold().generate(**batch, do_sample=True, top_p=0.9)                       # a folded model

The graph kind "kv" is captured from a small wrapper around the model (`kv_forward`): it takes the
token ids, the 2-d attention mask, the position ids and each cache layer's past keys and values as
flat tensors, builds transformers' own `DynamicCache` from them, calls the model with
`use_cache=True`, and returns the logits and every layer's present keys and values (past + new).
Batch (from 1), new-token length and past length (from 0) are dynamic, so one capture serves the
prompt (past 0), every decode step (one new token) and every batch size. It is a captured program
like the others: the adapter, fold and dispatch passes rewrite it unchanged, and the adapted model
keeps it in its cache of programs, keyed by signature and mode, under the kind "kv".

Decoding is transformers' own: `generate` runs the base model class's `GenerationMixin.generate` on
a shallow copy of the model whose `forward` reads the past out of the `DynamicCache` generate
passes, runs the graph and writes the presents back into that cache. Greedy, sampling, beam search,
stopping criteria, streamers, left padding are all transformers' code; nothing here decodes.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.export import Dim

from .cache_room import room_for
from .capture import CapturedGraph, lift, module_mode, progress, traced_as_forward
from .errors import CaptureError, ConfigError
from .unchanged import state_unchanged

KIND = "kv"  # the program kind of the cache graph, beside plain forward graphs
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 5  # >= 2 and distinct: no size specialises or unifies

# what generate's forward is called with that the graph honours (other options are errors naming them)
HANDLED = {"input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "use_cache",
           "logits_to_keep", "return_dict"}


@dataclasses.dataclass(frozen=True)
class ProgramKind:
    """A kind of captured program other than the plain forward: its name (part of the cache key) and
    how it is captured from the model, `capture(model, args, kwargs, training) -> CapturedGraph`."""

    name: str
    capture: Callable[[nn.Module, tuple, dict, bool], CapturedGraph]


def kv_forward(model: nn.Module) -> Callable[..., tuple[torch.Tensor, tuple, tuple]]:
    """The causal LM as a function of flat tensors: (ids, mask, positions, past keys, past values) ->
    (logits, present keys, present values), through transformers' DynamicCache."""
    from transformers import DynamicCache

    forward, cache_name = model.forward, cache_argument(model)

    def kv(input_ids: torch.Tensor, attention_mask: torch.Tensor, past_keys: tuple[torch.Tensor, ...],
           past_values: tuple[torch.Tensor, ...], position_ids: torch.Tensor,
           logits_to_keep: int | None = None) -> tuple[torch.Tensor, tuple, tuple]:
        torch._check(attention_mask.shape[1] == past_keys[0].shape[2] + input_ids.shape[1])
        cache = DynamicCache()  # its layers hold the past as given: no copy before the one concatenation
        cache.layers = [_filled_layer(k, v) for k, v in zip(past_keys, past_values)]
        extra = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
        out = forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      **{cache_name: cache}, use_cache=True, **extra)
        layers = getattr(out, cache_name).layers
        return out.logits, tuple(layer.keys for layer in layers), tuple(layer.values for layer in layers)

    return kv


def _filled_layer(keys: torch.Tensor, values: torch.Tensor) -> Any:
    from transformers.cache_utils import DynamicLayer

    layer = DynamicLayer()
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    return layer


def cache_argument(model: nn.Module) -> str:
    """The name forward gives the cache: `cache` in transformers >= 5.25, `past_key_values` before."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def capture_kv(model: nn.Module, args: tuple, kwargs: dict, training: bool) -> CapturedGraph:
    """Capture `kv_forward(model)`: the call's structure, dtypes and per-layer cache shapes, with
    example sizes that specialise nothing (batch from 1, new length from 1, past length from 0).
    The function is traced as the model's own forward (an instance attribute for the trace), so
    state names and module paths in the graph are the model's, as in every other capture."""
    del args
    n_layers = len(kwargs["past_keys"])
    examples = _examples(kwargs)
    batch, seq, past, total = Dim("batch", min=1), Dim("seq", min=1), Dim("past", min=0), Dim("total", min=1)
    per_layer = tuple({0: batch, 2: past} for _ in range(n_layers))
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
               "position_ids": {0: batch, 1: seq}, "past_keys": per_layer, "past_values": per_layer}
    if "logits_to_keep" in examples:
        dynamic["logits_to_keep"] = None
    return export_as_forward(model, kv_forward(model), examples, dynamic, training, "with a KV cache")


def export_as_forward(model: nn.Module, fn: Callable, examples: dict[str, Any], dynamic: dict[str, Any],
                      training: bool, what: str) -> CapturedGraph:
    """Export `fn` (keyword inputs `examples`, `dynamic` their Dims) as the model's forward, lifted and tagged
    like every capture: state names and module paths are the model's."""
    mode = "train" if training else "eval"
    try:
        with module_mode(model, training), traced_as_forward(model, fn), \
                progress(f"peftc: capturing {type(model).__name__} {what} ({mode})"):
            ep = torch.export.export(model, (), dict(sorted(examples.items())), strict=False, dynamic_shapes=dynamic)
    except Exception as e:  # torch.export raises many types; all mean "could not trace"
        raise CaptureError(f"torch.export could not trace {type(model).__name__} {what} (for generate): "
                           f"{type(e).__name__}: {str(e).strip()[:2000]}") from e
    return lift(ep, training)


KV = ProgramKind(KIND, capture_kv)


def example_call(am: Any) -> dict[str, Any]:
    """The cache graph's inputs at the example sizes for the model's cache layout: a call that captures the
    graph (an export traces it at these sizes)."""
    device = next(iter(am.parameters())).device
    past = tuple(torch.zeros(1, s.heads, 0, s.head_dim, dtype=s.dtype, device=device) for s in cache_layout(am))
    one = torch.ones(1, 1, dtype=torch.long, device=device)
    return _examples({"input_ids": one, "attention_mask": one, "position_ids": one, "past_keys": past,
                      "past_values": past})


def _examples(kwargs: dict) -> dict[str, Any]:
    """Inputs of the call's structure at the example sizes (sorted by name, as captures are)."""
    ids = kwargs["input_ids"]
    b, s, p = EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST

    def past(t: torch.Tensor) -> torch.Tensor:
        return torch.zeros(b, t.shape[1], p, *t.shape[3:], dtype=t.dtype, device=t.device)

    out = {
        "attention_mask": torch.ones(b, p + s, dtype=kwargs["attention_mask"].dtype, device=ids.device),
        "input_ids": torch.ones(b, s, dtype=ids.dtype, device=ids.device),
        "past_keys": tuple(past(t) for t in kwargs["past_keys"]),
        "past_values": tuple(past(t) for t in kwargs["past_values"]),
        "position_ids": torch.arange(p, p + s, device=ids.device).expand(b, s).to(kwargs["position_ids"].dtype),
    }
    if "logits_to_keep" in kwargs:
        out["logits_to_keep"] = kwargs["logits_to_keep"]
    return dict(sorted(out.items()))


# -- the cache layout ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerShape:
    heads: int
    head_dim: int
    dtype: torch.dtype


def one_token_call(am: Any, *also: str) -> Any:
    """The source model's output for one token (given as `input_ids` and as each input named in `also`),
    eagerly: what a cache layout is read from."""
    source = am.parameter_tree.source
    am.parameter_tree.sync_source()
    one = torch.ones(1, 1, dtype=torch.long, device=next(iter(am.parameters())).device)
    with torch.no_grad(), module_mode(source, False):
        return source(input_ids=one, use_cache=True, **dict.fromkeys(also, one))


def cache_layout(am: Any) -> list[LayerShape]:
    """Each cache layer's (kv heads, head dim, dtype), read off a one-token eager call of the model (kept until
    the model moves to another dtype or device). The graph's past inputs have these static dims; a prompt
    starts from empty pasts of this layout."""
    return am.programs.remembered("kv cache layout", lambda: _cache_layout(am))


def _cache_layout(am: Any) -> list[LayerShape]:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    source = am.parameter_tree.source
    out = one_token_call(am)
    cache = getattr(out, cache_argument(source), None)
    if type(cache) is not DynamicCache:
        raise ConfigError(f"generate: {type(source).__name__} returns a {type(cache).__name__} cache; peftc's "
                          "generate graph holds transformers' DynamicCache only")
    odd = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer})
    if odd:
        raise ConfigError(f"generate: {type(source).__name__}'s cache has {', '.join(odd)} layers (sliding window "
                          "or other); peftc's generate graph supports full-attention layers (DynamicLayer) only")
    return [LayerShape(layer.keys.shape[1], layer.keys.shape[-1], layer.keys.dtype) for layer in cache.layers]


# -- the forward generate drives ---------------------------------------------------------------------------

Runner = Callable[..., Any]  # run(call kwargs, adapter index or None, kind) -> the program's outputs


def run_eager(am: Any) -> Runner:
    """Run a generation graph as the adapted model runs its programs (eager), with the model's variant
    (active / disabled / merged adapters), or the mixed-adapter graph where an index is given. The call's
    dict is taken over (emptied), so that the program can free each past once it has read it."""

    def run(kwargs: dict[str, Any], index: torch.Tensor | None, kind: ProgramKind) -> Any:
        mixed = index is not None
        program, flat = am.programs.program((), kwargs, am.training, mixed=mixed, kind=kind)
        kwargs.clear()
        if not mixed:
            return program(flat)
        return program(flat, {"adapter_index": am.programs.checked_index(index, flat)})

    return run


def graph_forward(am: Any, source: nn.Module, run: Runner, index: torch.Tensor | None) -> Callable:
    """The `forward` generate calls: past from the DynamicCache, the graph, presents back into it.
    `index` (one entry per prompt) is repeated to the running batch (beams, returned sequences)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer
    from transformers.modeling_outputs import CausalLMOutputWithPast

    cache_name = cache_argument(source)
    layout = cache_layout(am)

    def forward(input_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        for name, value in kwargs.items():
            if name not in HANDLED and value is not None and value is not False:
                raise ConfigError(f"generate: {name}={_short(value)} is not supported by peftc's generate graph "
                                  "(it takes token ids, an attention mask, position ids and the KV cache)")
        if input_ids is None:
            raise ConfigError("generate: peftc's generate graph needs input_ids (inputs_embeds are not supported)")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        use_cache = kwargs.get("use_cache")
        if cache is not None and type(cache) is not DynamicCache:
            raise ConfigError(f"generate: a {type(cache).__name__} cache (cache_implementation) is not supported; "
                              "peftc's generate graph holds transformers' DynamicCache")
        if cache is not None and any(type(layer) is not DynamicLayer for layer in cache.layers):
            raise ConfigError("generate: the cache has layers other than DynamicLayer (sliding window); not supported")
        past_len = cache.get_seq_length() if cache is not None else 0
        batch, seq = input_ids.shape
        device = input_ids.device
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(batch, past_len + seq, dtype=torch.long, device=device)
        if mask.dim() != 2:
            raise ConfigError("generate: the attention_mask must be 2-d (batch, past + new tokens)")
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(past_len, past_len + seq, device=device).expand(batch, seq)
        keep = kwargs.get("logits_to_keep")
        if isinstance(keep, torch.Tensor):
            raise ConfigError("generate: logits_to_keep as a tensor of positions is not supported (an int is)")
        call = {"attention_mask": mask.to(torch.long), "input_ids": input_ids.to(torch.long),
                "position_ids": positions.to(torch.long),
                **past_inputs(cache.layers if past_len else None, layout, batch, device, use_cache is not False)}
        if keep is not None:
            call["logits_to_keep"] = int(keep)
        logits, presents_k, presents_v = run(call, _expanded(index, batch), KV)
        if cache is not None and use_cache is not False:
            _write_back(cache, presents_k, presents_v, past_len)
        out = CausalLMOutputWithPast(logits=logits, **{cache_name: cache if use_cache is not False else None})
        return out if kwargs.get("return_dict", True) is not False else out.to_tuple()

    forward.__signature__ = inspect.signature(source.forward)  # type: ignore[attr-defined]
    return forward


def past_inputs(layers: Sequence[Any] | None, layout: Sequence[LayerShape], batch: int, device: torch.device,
                hand_over: bool) -> dict[str, tuple[torch.Tensor, ...]]:
    """A graph call's `past_keys` / `past_values`: the cache `layers`' tensors, or empty pasts of `layout` for a
    prompt. Handed over, they are taken out of the layers (the presents are written back after the call), so
    that the graph frees each past once it has concatenated it, as transformers' own layers do: a step then
    holds the cache once, not the pasts and the presents both."""
    if layers is None:
        def empty() -> tuple[torch.Tensor, ...]:  # distinct tensors: a compiled graph's inputs may not repeat
            return tuple(torch.zeros(batch, s.heads, 0, s.head_dim, dtype=s.dtype, device=device) for s in layout)
        return {"past_keys": empty(), "past_values": empty()}
    keys, values = tuple(layer.keys for layer in layers), tuple(layer.values for layer in layers)
    if hand_over:
        for layer in layers:
            layer.keys = layer.values = None
    return {"past_keys": keys, "past_values": values}


def _write_back(cache: Any, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], past_len: int) -> None:
    if not past_len:  # an empty cache: let it create and initialise its layers (with nothing, not a copy)
        for i, (k, v) in enumerate(zip(keys, values)):
            cache.update(k[..., :0, :], v[..., :0, :], i)
    for layer, k, v in zip(cache.layers, keys, values):  # the presents themselves: the next step writes after them
        layer.keys, layer.values = k, v


def _expanded(index: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """The per-prompt adapter index for a running batch of `batch` rows: generate expands each prompt
    into consecutive rows (beams, returned sequences), as `repeat_interleave` does."""
    if index is None:
        return None
    if index.shape[0] == batch:
        return index
    if index.shape[0] == 0 or batch % index.shape[0]:
        raise ConfigError(f"adapter_index has {index.shape[0]} entries for a batch of {batch}")
    return index.repeat_interleave(batch // index.shape[0])


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)}>"
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


# -- generate ----------------------------------------------------------------------------------------------

# generation options peftc refuses, and why: each would capture a graph per candidate length
REFUSED = {
    "assistant_model": "assisted decoding asks for logits of several candidate tokens at a time",
    "prompt_lookup_num_tokens": "prompt lookup decoding asks for logits of several candidate tokens at a time",
    "inputs_embeds": "the generate graph takes token ids",
}


def generate(am: Any, args: tuple, kwargs: dict, adapter_names: Sequence[str] | None,
             adapter_index: torch.Tensor | None, run: Runner | None = None) -> Any:
    """transformers' `generate` on the adapted model: the base model class's GenerationMixin loop
    over a forward that runs the cache graph (`run`: the eager programs by default)."""
    from transformers import GenerationMixin

    source = am.parameter_tree.source
    if not isinstance(source, GenerationMixin) or getattr(source, "generation_config", None) is None:
        raise ConfigError(f"generate: {type(source).__name__} is not a transformers generative model (it has no "
                          "GenerationMixin or generation_config); peftc generates with transformers' own loop")
    for name, why in REFUSED.items():
        if kwargs.get(name) is not None:
            raise ConfigError(f"generate: {name} is not supported by peftc's generate graph ({why})")
    config = kwargs.get("generation_config") or source.generation_config
    implementation = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
    if implementation not in (None, "dynamic"):
        raise ConfigError(f"generate: cache_implementation={implementation!r} is not supported; peftc's generate "
                          "graph holds transformers' DynamicCache (cache_implementation None or 'dynamic')")
    for name in ("output_attentions", "output_hidden_states"):
        if kwargs.get(name, getattr(config, name, False)):
            raise ConfigError(f"generate: {name}=True is not supported (the generate graph returns logits and the "
                              "KV cache only)")
    if adapter_names is not None and adapter_index is not None:
        raise ConfigError("pass adapter_names or adapter_index, not both")
    if adapter_names is not None:
        if isinstance(adapter_names, str):
            raise ConfigError("adapter_names must be a list with one adapter name per sample")
        adapter_index = am.adapter_index(adapter_names)
    if adapter_index is not None:
        prompts = _prompt_ids(args, kwargs)
        if prompts is not None and adapter_index.dim() == 1 and adapter_index.shape[0] != prompts.shape[0]:
            raise ConfigError(f"adapter_index has {adapter_index.shape[0]} entries for a batch of {prompts.shape[0]}")
    run = run_eager(am) if run is None else run
    am.parameter_tree.sync_source()
    proxy = copy.copy(source)  # the model's class, config and generation config; forward runs the graph
    if getattr(source.config, "is_encoder_decoder", False):
        from .seq2seq import encoder_forward, seq2seq_forward

        encoder = encoder_forward(am, source, run, adapter_index)
        proxy.get_encoder = lambda *a, **k: encoder
        proxy.forward = seq2seq_forward(am, source, run, adapter_index)
    else:
        proxy.forward = graph_forward(am, source, run, adapter_index)
    # nothing changes the model's tensors between tokens: they are bound and checked once; and the cache's
    # buffers are made with room for the tokens to come, which the decode steps write in place
    with state_unchanged(), room_for(_tokens_to_come(config, args, kwargs, source.config)):
        return proxy.generate(*args, **kwargs)


def _prompt_ids(args: tuple, kwargs: dict) -> torch.Tensor | None:
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    return ids if isinstance(ids, torch.Tensor) and ids.dim() >= 1 else None


def _tokens_to_come(config: Any, args: tuple, kwargs: dict, model_config: Any) -> int:
    """How many positions a generation adds to its cache after the prompt, as transformers' generate counts
    them: `max_new_tokens`, else `max_length` less the prompt (an encoder-decoder's decoder starts empty)."""
    new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if new is not None:
        return int(new)
    prompt = _prompt_ids(args, kwargs)
    before = 0 if getattr(model_config, "is_encoder_decoder", False) or prompt is None else prompt.shape[-1]
    return int(kwargs.get("max_length", getattr(config, "max_length", None) or 0)) - before
