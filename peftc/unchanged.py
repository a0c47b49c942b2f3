"""Regions in which the model's tensors stay as they are: a generate call's token loop.

A program binds the model's tensors at every call, and the inference lowerings keep what they compute
from the adapters' tensors while those are unchanged (`passes/hoist_invariants.py`); both are checked
per call, tensor by tensor, so that `.to()`, `load_state_dict`, hot-swaps and optimizer steps are seen.
Decoding calls a graph once per token with nothing in between that could change a tensor, and those
checks grow with the adapters loaded (8 adapters: ~1,400 tensors at every step). Within
`state_unchanged()` each is done once: the first call's results are kept in the region, and go with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

_REGION: ContextVar[dict[int, Any] | None] = ContextVar("peftc_state_unchanged", default=None)


@contextlib.contextmanager
def state_unchanged() -> Iterator[None]:
    """Within: the model's tensors are neither replaced nor modified in place."""
    token = _REGION.set({})
    try:
        yield
    finally:
        _REGION.reset(token)


def region() -> dict[int, Any] | None:
    """What the current region keeps, by the id of its owner (a program, a kept sub-graph); None outside one."""
    return _REGION.get()
