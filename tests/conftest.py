"""Test-wide settings: one torch thread per pytest-xdist worker, so workers do not oversubscribe the cores;
every pass's graph is linted after it runs (the pipeline's checks); hypothesis draws the same examples on
every run; and `xdist_group` marks that work under pytest >= 9.2."""

from __future__ import annotations

import os

os.environ.setdefault("PEFTC_CHECK_PASSES", "1")  # read when peftc.pipeline is imported, and by subprocesses

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

pytest_plugins = ("pytester",)  # tests/test_groups.py runs pytest -n 2 on a small file

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# "ci" (the default, what `python -m pytest` and .ci/run use): the same draws on every run and every machine,
# so a fresh clone passes or fails as CI did. "explore" (HYPOTHESIS_PROFILE=explore): new random draws each run,
# to look for failures the fixed draws miss (a failure prints its example as drawn). No deadline: a capture takes
# seconds, and a timing limit would fail at random on a loaded machine.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("explore", derandomize=False, database=None, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Name each grouped test `<nodeid>@<group>`, as pytest-xdist's `--dist loadgroup` means to.

    xdist 3.8 does it by assigning `item._nodeid`, which pytest 9.2's structured node ids no longer
    read (pytest-dev/pytest-xdist#1386): every group was silently split across workers, each one
    rebuilding the group's shared fixture (an ONNX export, a torchrun launch). This runs after
    xdist's hook and does nothing where xdist's suffix took effect."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        suffix = f"@{'_'.join(groups)}"
        if groups and not item.nodeid.endswith(suffix):
            from _pytest.nodeid import NodeId  # pytest >= 9.2: the versions where xdist's suffix is lost

            item._id = NodeId.parse(item.nodeid + suffix)
