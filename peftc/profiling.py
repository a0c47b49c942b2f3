"""Measuring what a rewrite saves: peak tensor memory of a step (the remat and gate passes' figure)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def peak_memory(fn: Callable[[], Any]) -> int:
    """Peak bytes of CPU tensor memory allocated while `fn()` runs, above what was allocated before:
    what checkpointing saves, measured exactly from the allocator's running total (torch.profiler),
    unlike RSS, which also counts the allocator's cached and fragmented pages."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == torch._C._profiler._EventType.Allocation:
            peak = max(peak, event.extra_fields.total_allocated)
    return peak
