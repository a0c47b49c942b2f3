"""Errors peftc raises. Each names the file, layer or field it is about."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PeftcError(Exception):
    """Base class of every error peftc raises on bad input."""


class ConfigError(PeftcError, ValueError):
    """A config field is unknown, unsupported, or has an invalid value."""


class TargetError(PeftcError, ValueError):
    """Target selection matched nothing, or matched something that cannot be adapted."""


class CaptureError(PeftcError, RuntimeError):
    """torch.export could not trace the model."""


class CheckpointError(PeftcError, ValueError):
    """A checkpoint does not fit the model, or cannot be read or written."""


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates most similar to `name`, for 'did you mean' messages."""
    candidates = list(candidates)
    # compare last segments ("q_proj" vs "query"), then show full names that end that way
    segments = sorted({c.rsplit(".", 1)[-1] for c in candidates})
    near = difflib.get_close_matches(name.rsplit(".", 1)[-1], segments, n=n, cutoff=0.3)
    shown = [c for seg in near for c in candidates if c.rsplit(".", 1)[-1] == seg][:n]
    return shown or difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
