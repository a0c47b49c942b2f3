"""KV cache tensors with room after them: a decode step writes its new keys and values in place after the
past, where transformers' DynamicCache concatenates and so copies the whole cache at every step (on the
bench model at a 512-token prompt and batch 8, about a third of a CPU decode step).

`appended(past, new)` equals `torch.cat([past, new], dim=-2)`. Its result is a view of a buffer with room
after it; when that view comes back as the next step's past, the step's keys are written into the room and
a longer view of the same buffer is returned. The room is a quarter of what the buffer holds, at least 64
positions, and never more than the generation's tokens to come (`room_for`, set by generate): a buffer
outgrown is copied into a larger one (a few copies over a long generation, where transformers copies at
every step), and memory stays within 1.25x of the cache plus 64 positions when a generation stops early,
not the static cache's reservation for `max_new_tokens`. Nothing
visible through a view is ever written: only the room after the latest view of a buffer, and only by the
step given that very view (the registry below keeps one latest view per buffer, by identity, and a step
takes it out). Any other past, a reordered beam, a cropped cache or a caller's own tensors, is copied into
a new buffer, as the concatenation would have copied it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from contextvars import ContextVar

import torch

_ROOM: ContextVar[int] = ContextVar("peftc_cache_room", default=0)
MIN_ROOM = 64  # positions: a buffer's room is at least this, a quarter of what it holds otherwise
_latest: dict[int, weakref.ref] = {}  # id(view) -> the view: the latest view of its buffer, free to grow


@contextlib.contextmanager
def room_for(tokens: int) -> Iterator[None]:
    """Within: a new buffer has room for up to `tokens` more positions than the call needs (a generation's
    new tokens), so that the steps after it write in place."""
    token = _ROOM.set(max(int(tokens), 0))
    try:
        yield
    finally:
        _ROOM.reset(token)


def room_after(past: torch.Tensor, count: int) -> torch.Tensor:
    """A buffer whose first positions (dim -2) hold `past` and that has room for `count` more: past's own
    buffer where past is the latest view of it and the room suffices (nothing copied, and past is no longer
    the latest: one step grows it), else a new buffer with room for the tokens to come, past copied in."""
    dim = past.dim() - 2
    length = past.shape[dim]
    latest = _latest.pop(id(past), None)
    buffer = past._base
    if latest is not None and latest() is past and buffer is not None and buffer.shape[dim] >= length + count:
        return buffer
    size = list(past.shape)
    size[dim] = length + count + min(_ROOM.get(), max(MIN_ROOM, (length + count) // 4))
    buffer = past.new_empty(size)
    buffer.narrow(dim, 0, length).copy_(past)
    return buffer


def mark_latest(view: torch.Tensor) -> None:
    """`view` (of a buffer from `room_after`) is the one the next step may grow in place."""
    key = id(view)
    _latest[key] = weakref.ref(view, lambda ref: _latest.pop(key) if _latest.get(key) is ref else None)


def appended(past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """`torch.cat([past, new], dim=-2)`, written into the room after `past` where `past` is the latest view
    of a buffer and the room suffices, else into a new buffer with room."""
    dim = past.dim() - 2
    if new.dtype != past.dtype:
        return torch.cat([past, new], dim=dim)  # promotes, as the graph's concatenation does
    length, count = past.shape[dim], new.shape[dim]
    grown = room_after(past, count).narrow(dim, 0, length + count)
    grown.narrow(dim, length, count).copy_(new)
    mark_latest(grown)
    return grown
