"""Parameters whose tests share a module fixture run on one pytest-xdist worker, which builds it once."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest


def grouped(prefix: str, names: Iterable[str]) -> list[Any]:
    """`names` as pytest params, each in the xdist group `<prefix>-<name>` (--dist loadgroup sends a group's
    tests to one worker): for the params of a module fixture, or of tests that share one built per name."""
    return [pytest.param(name, marks=pytest.mark.xdist_group(f"{prefix}-{name}")) for name in names]
