"""Generation for encoder-decoder models (BART, T5): three captured program kinds.

- "encoder": the model's encoder, (input_ids, attention_mask) -> last hidden state, run once per
  `generate` where transformers runs `get_encoder()`.
- "seq2seq": the decoder with a KV cache, through transformers' `EncoderDecoderCache`: encoder states,
  encoder mask, decoder ids and each layer's self-attention past -> logits and self-attention presents.
  Its first call per generation (no cross-attention cache yet) computes and returns the cross-attention
  keys and values too; later calls take them as inputs. The two are two signatures of the one kind.

Batch (from 1), source length, new-token length and past length (from 0) are dynamic, as in the
decoder-only graph (`peftc.generation`). The adapter passes rewrite all three like any capture.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.export import Dim

from .capture import CapturedGraph
from .errors import ConfigError
from .generation import (
    EXAMPLE_BATCH,
    EXAMPLE_PAST,
    EXAMPLE_SEQ,
    LayerShape,
    ProgramKind,
    Runner,
    _expanded,
    _filled_layer,
    _short,
    _write_back,
    cache_argument,
    export_as_forward,
    one_token_call,
    past_inputs,
)

EXAMPLE_SOURCE = 7  # encoder length of the examples: >= 2, distinct from the others
HANDLED = {"input_ids", "attention_mask", "decoder_input_ids", "encoder_outputs", "cache", "past_key_values",
           "use_cache", "return_dict", "decoder_attention_mask"}


def _encoder_fn(model: nn.Module) -> Callable:
    encoder = model.get_encoder()

    def encode(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state

    return encode


def capture_encoder(model: nn.Module, args: tuple, kwargs: dict, training: bool) -> CapturedGraph:
    del args
    ids = kwargs["input_ids"]
    b, s = EXAMPLE_BATCH, EXAMPLE_SOURCE
    examples = {"input_ids": torch.ones(b, s, dtype=ids.dtype, device=ids.device),
                "attention_mask": torch.ones(b, s, dtype=kwargs["attention_mask"].dtype, device=ids.device)}
    batch, source = Dim("batch", min=1), Dim("source", min=1)
    dynamic = {"input_ids": {0: batch, 1: source}, "attention_mask": {0: batch, 1: source}}
    return export_as_forward(model, _encoder_fn(model), examples, dynamic, training, "(its encoder)")


def _decoder_fn(model: nn.Module) -> Callable:
    from transformers import DynamicCache, EncoderDecoderCache

    forward, cache_name = model.forward, cache_argument(model)

    def decode(encoder_hidden_states: torch.Tensor, attention_mask: torch.Tensor, decoder_input_ids: torch.Tensor,
               past_keys: tuple[torch.Tensor, ...], past_values: tuple[torch.Tensor, ...],
               cross_keys: tuple[torch.Tensor, ...] | None = None,
               cross_values: tuple[torch.Tensor, ...] | None = None) -> tuple:
        torch._check(attention_mask.shape[1] == encoder_hidden_states.shape[1])
        own = DynamicCache()
        own.layers = [_filled_layer(k, v) for k, v in zip(past_keys, past_values)]
        cross = DynamicCache()
        if cross_keys is not None:
            cross.layers = [_filled_layer(k, v) for k, v in zip(cross_keys, cross_values)]
        cache = EncoderDecoderCache(own, cross)
        out = forward(encoder_outputs=(encoder_hidden_states,), attention_mask=attention_mask,
                      decoder_input_ids=decoder_input_ids, **{cache_name: cache}, use_cache=True, return_dict=True)
        cache = getattr(out, cache_name)
        presents = (tuple(layer.keys for layer in cache.self_attention_cache.layers),
                    tuple(layer.values for layer in cache.self_attention_cache.layers))
        if cross_keys is not None:
            return (out.logits, *presents)
        return (out.logits, *presents, tuple(layer.keys for layer in cache.cross_attention_cache.layers),
                tuple(layer.values for layer in cache.cross_attention_cache.layers))

    return decode


def capture_seq2seq(model: nn.Module, args: tuple, kwargs: dict, training: bool) -> CapturedGraph:
    del args
    ids = kwargs["decoder_input_ids"]
    b, s, p, src = EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST, EXAMPLE_SOURCE

    def sized(t: torch.Tensor, length: int) -> torch.Tensor:
        return torch.zeros(b, t.shape[1], length, *t.shape[3:], dtype=t.dtype, device=t.device)

    hidden = kwargs["encoder_hidden_states"]
    examples = {
        "encoder_hidden_states": torch.zeros(b, src, *hidden.shape[2:], dtype=hidden.dtype, device=hidden.device),
        "attention_mask": torch.ones(b, src, dtype=kwargs["attention_mask"].dtype, device=ids.device),
        "decoder_input_ids": torch.ones(b, s, dtype=ids.dtype, device=ids.device),
        "past_keys": tuple(sized(t, p) for t in kwargs["past_keys"]),
        "past_values": tuple(sized(t, p) for t in kwargs["past_values"]),
    }
    batch, seq, past, source = Dim("batch", min=1), Dim("seq", min=1), Dim("past", min=0), Dim("source", min=1)
    own = tuple({0: batch, 2: past} for _ in kwargs["past_keys"])
    dynamic: dict[str, Any] = {"encoder_hidden_states": {0: batch, 1: source}, "attention_mask": {0: batch, 1: source},
                               "decoder_input_ids": {0: batch, 1: seq}, "past_keys": own, "past_values": own}
    if "cross_keys" in kwargs:
        examples["cross_keys"] = tuple(sized(t, src) for t in kwargs["cross_keys"])
        examples["cross_values"] = tuple(sized(t, src) for t in kwargs["cross_values"])
        cross = tuple({0: batch, 2: source} for _ in kwargs["cross_keys"])
        dynamic["cross_keys"] = dynamic["cross_values"] = cross
    return export_as_forward(model, _decoder_fn(model), examples, dynamic, training, "(its decoder with a KV cache)")


ENCODER = ProgramKind("encoder", capture_encoder)
SEQ2SEQ = ProgramKind("seq2seq", capture_seq2seq)


def cache_layout(am: Any) -> list[LayerShape]:
    """Each decoder layer's self-attention cache shape, from a one-token eager call (kept until the model moves
    to another dtype or device)."""
    return am.programs.remembered("seq2seq cache layout", lambda: _cache_layout(am))


def _cache_layout(am: Any) -> list[LayerShape]:
    from transformers import DynamicCache, EncoderDecoderCache
    from transformers.cache_utils import DynamicLayer

    source = am.parameter_tree.source
    out = one_token_call(am, "decoder_input_ids")
    cache = getattr(out, cache_argument(source), None)
    caches = (cache.self_attention_cache, cache.cross_attention_cache) if type(cache) is EncoderDecoderCache else ()
    if not caches or any(type(c) is not DynamicCache or any(type(layer) is not DynamicLayer for layer in c.layers)
                         for c in caches):
        raise ConfigError(f"generate: {type(source).__name__}'s cache is not an EncoderDecoderCache of DynamicCaches "
                          "with full-attention layers; peftc's generate graph holds only those")
    return [LayerShape(layer.keys.shape[1], layer.keys.shape[-1], layer.keys.dtype)
            for layer in cache.self_attention_cache.layers]


@dataclasses.dataclass
class GraphEncoder:
    """What `get_encoder()` returns while generating: the encoder program, called as transformers calls it."""

    run: Runner
    index: torch.Tensor | None

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutput

        for name, value in kwargs.items():
            if name != "return_dict" and value is not None and value is not False:
                raise ConfigError(f"generate: {name}={_short(value)} is not supported by peftc's encoder graph")
        if input_ids is None:
            raise ConfigError("generate: peftc's encoder graph needs input_ids (inputs_embeds are not supported)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        call = {"attention_mask": attention_mask.to(torch.long), "input_ids": input_ids.to(torch.long)}
        hidden = self.run(call, _expanded(self.index, input_ids.shape[0]), ENCODER)
        return BaseModelOutput(last_hidden_state=hidden)

    __call__ = forward


def encoder_forward(am: Any, source: nn.Module, run: Runner, index: torch.Tensor | None) -> GraphEncoder:
    import inspect

    encoder = GraphEncoder(run, index)
    signature = inspect.signature(source.get_encoder().forward)
    forward = encoder.forward

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return forward(*args, **kwargs)

    wrapped.__signature__ = signature  # type: ignore[attr-defined]  # generate filters the encoder's kwargs by it
    encoder.forward = wrapped  # type: ignore[method-assign]
    return encoder


def seq2seq_forward(am: Any, source: nn.Module, run: Runner, index: torch.Tensor | None) -> Callable:
    """The `forward` generate calls on an encoder-decoder: self-attention past from the cache, cross-attention
    keys/values from it after the first step, the graph, presents back into the cache."""
    import inspect

    from transformers import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import Seq2SeqLMOutput

    cache_name = cache_argument(source)
    layout = cache_layout(am)

    def forward(**kwargs: Any) -> Any:
        for name, value in kwargs.items():
            if name not in HANDLED and value is not None and value is not False:
                raise ConfigError(f"generate: {name}={_short(value)} is not supported by peftc's generate graph")
        ids, encoded = kwargs.get("decoder_input_ids"), kwargs.get("encoder_outputs")
        if ids is None or encoded is None:
            raise ConfigError("generate: peftc's encoder-decoder graph needs decoder_input_ids and encoder_outputs "
                              "(as transformers' generate passes them)")
        decoder_mask = kwargs.get("decoder_attention_mask")
        if decoder_mask is not None and not bool(decoder_mask.all()):
            raise ConfigError("generate: a decoder_attention_mask with padding is not supported")
        hidden = encoded[0] if not hasattr(encoded, "last_hidden_state") else encoded.last_hidden_state
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        use_cache = kwargs.get("use_cache") is not False
        if cache is not None and (type(cache) is not EncoderDecoderCache
                                  or type(cache.self_attention_cache) is not DynamicCache):
            raise ConfigError(f"generate: a {type(cache).__name__} cache is not supported; peftc's generate graph "
                              "holds an EncoderDecoderCache of DynamicCaches")
        batch, device = ids.shape[0], ids.device
        past_len = cache.get_seq_length() if cache is not None else 0
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=device)
        own = cache.self_attention_cache.layers if past_len else None
        call = {"attention_mask": mask.to(torch.long), "decoder_input_ids": ids.to(torch.long),
                "encoder_hidden_states": hidden, **past_inputs(own, layout, batch, device, use_cache)}
        cross_ready = cache is not None and len(cache.is_updated) == len(layout) and all(cache.is_updated.values())
        if cross_ready:
            cross = cache.cross_attention_cache.layers
            call["cross_keys"] = tuple(layer.keys for layer in cross)
            call["cross_values"] = tuple(layer.values for layer in cross)
        outputs = run(call, _expanded(index, batch), SEQ2SEQ)
        logits, own_k, own_v = outputs[:3]
        if cache is not None and use_cache:
            _write_back(cache.self_attention_cache, own_k, own_v, past_len)
            if not cross_ready:
                for i, (k, v) in enumerate(zip(*outputs[3:])):
                    cache.cross_attention_cache.update(k, v, i)
                    cache.is_updated[i] = True
        out = Seq2SeqLMOutput(logits=logits, **{cache_name: cache if use_cache else None})
        return out if kwargs.get("return_dict", True) is not False else out.to_tuple()

    forward.__signature__ = inspect.signature(source.forward)  # type: ignore[attr-defined]
    return forward
