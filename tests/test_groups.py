"""The suite's xdist groups reach the scheduler (tests/conftest.py): under `--dist loadgroup` a grouped test's
node id ends in `@<group>`, which is all the scheduler groups by. Without it nothing fails, the groups are
just split across workers and each rebuilds their shared fixture (an ONNX export, a torchrun launch).

The first test runs pytest with `-n 2 --dist loadgroup` on a small file of grouped tests, with the suite's hook,
whatever mode this run is in (`-n 0` too): every grouped test's id carries its group, and each group ran on one
worker. The last two check the real suite's own ids, and are skipped where this run does not distribute."""

from __future__ import annotations

import inspect
import re
from collections import defaultdict

import pytest

from tests import conftest
from tests.groups import grouped

GROUPS = ("alpha", "beta", "gamma", "delta")
PER_GROUP = 4  # 16 grouped tests and as many loose ones: split at random across 2 workers, a group rarely stays whole


def _inner_file() -> str:
    """16 tests in 4 groups, marked on their params as `tests.groups.grouped` marks them, and 16 loose ones."""
    lines = ["import pytest", "", "PARAMS = ["]
    for group in GROUPS:
        for i in range(PER_GROUP):
            lines.append(f"    pytest.param({group!r}, {i}, marks=pytest.mark.xdist_group({group!r})),")
    lines += ["]", "", "", "@pytest.mark.parametrize(('group', 'i'), PARAMS)", "def test_grouped(group, i):",
              "    pass", "", "", f"@pytest.mark.parametrize('i', range({len(GROUPS) * PER_GROUP}))",
              "def test_loose(i):", "    pass", ""]
    return "\n".join(lines)


def test_groups_reach_the_scheduler_in_a_fresh_run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    # the suite's hook itself, without the rest of tests/conftest.py (torch, in each worker, would cost seconds)
    pytester.makeconftest("from __future__ import annotations\n\nimport pytest\n\n\n"
                          + inspect.getsource(conftest.pytest_collection_modifyitems))
    pytester.makepyfile(test_inner=_inner_file())
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # only xdist (-p xdist): each process starts faster
    result = pytester.runpytest_subprocess("-p", "xdist", "-n", "2", "--dist", "loadgroup", "-v",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2 * len(GROUPS) * PER_GROUP)
    ran = re.findall(r"\[(gw\d+)\][^\n]*? PASSED (test_inner\.py::\S+)", result.stdout.str())
    assert len(ran) == 2 * len(GROUPS) * PER_GROUP, result.stdout.str()
    workers: dict[str, set[str]] = defaultdict(set)
    for worker, nodeid in ran:
        if nodeid.startswith("test_inner.py::test_grouped["):
            group = nodeid.rpartition("@")[2]
            assert group in GROUPS, f"{nodeid}: no @<group> suffix, the scheduler cannot group it"
            workers[group].add(worker)
        else:
            assert "@" not in nodeid, nodeid
    assert set(workers) == set(GROUPS)
    assert all(len(w) == 1 for w in workers.values()), f"groups split across workers: {dict(workers)}"
    assert {w for w, _ in ran} == {"gw0", "gw1"}  # both workers had work: staying on one was not a given


def _distributed(request: pytest.FixtureRequest) -> None:
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("this run does not distribute (-n 0): no scheduler reads the node ids; "
                    "test_groups_reach_the_scheduler_in_a_fresh_run checks the grouping in its own -n 2 run")


@pytest.mark.xdist_group("groups-check")
def test_marked_test_carries_its_group(request: pytest.FixtureRequest) -> None:
    _distributed(request)
    assert request.node.nodeid.endswith("::test_marked_test_carries_its_group@groups-check")


@pytest.mark.parametrize("name", grouped("groups-check", ["a"]))
def test_grouped_param_carries_its_group(request: pytest.FixtureRequest, name: str) -> None:
    _distributed(request)
    assert request.node.nodeid.endswith(f"[{name}]@groups-check-{name}")
