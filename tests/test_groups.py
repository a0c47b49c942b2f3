"""The suite's xdist groups reach the scheduler (tests/conftest.py): under `--dist loadgroup` a grouped test's
node id ends in `@<group>`, which is all the scheduler groups by. Without it nothing fails, the groups are
just split across workers and each rebuilds their shared fixture (an ONNX export, a torchrun launch)."""

import pytest

from tests.groups import grouped


@pytest.mark.xdist_group("groups-check")
def test_marked_test_carries_its_group(request: pytest.FixtureRequest) -> None:
    if getattr(request.config.option, "loadgroup", False):  # an xdist worker of the default run
        assert request.node.nodeid.endswith("::test_marked_test_carries_its_group@groups-check")


@pytest.mark.parametrize("name", grouped("groups-check", ["a"]))
def test_grouped_param_carries_its_group(request: pytest.FixtureRequest, name: str) -> None:
    if getattr(request.config.option, "loadgroup", False):
        assert request.node.nodeid.endswith(f"[{name}]@groups-check-{name}")
