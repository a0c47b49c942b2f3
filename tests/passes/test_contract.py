"""The method contract, checked for every registered method from the registry (a new method is tested by
being registered): each method's `example_config` on its `example_model` (tests/zoo.py), against PEFT on
the same weights.

- numerics and gradients (eval at two shapes, train), and checkpoints across in both directions;
- fold: the folded graph and merge_and_unload against PEFT's merge_and_unload;
- per-sample dispatch: in a mixed batch each sample's output and each adapter's gradients are those of the
  sample run with its adapter alone (WEIGHT placements refuse mixed batches with a clear error, as PEFT);
- the declaration itself: placement, kinds, an example config of the method's peft_type.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import peft
import pytest
import torch

import peftc
from peftc.config import load_config
from peftc.errors import ConfigError
from peftc.method import ANY, METHODS, Method, Placement, registered_methods
from tests import zoo
from tests.oracle import check_checkpoints, check_eval, check_fold, check_train, make_pair, randomize_adapters

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:peft"),
]

REGISTERED = registered_methods()
TOL = {"atol": 1e-5, "rtol": 1e-5}
MIXED = ["y", "__base__", "x", "y"]  # per sample of the example model's batch of 4


def peft_config(config: dict[str, Any]) -> peft.PeftConfig:
    fields = {k: v for k, v in config.items() if k != "peft_type"}
    return peft.PEFT_TYPE_TO_CONFIG_MAPPING[config["peft_type"]](**fields)


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_method_class_is_registered():
    """A method is its file in passes/ (imported by the package) with `@register_method`: every concrete
    Method class there is in the registry, so the tests below cover it."""
    registered = {type(m) for m in REGISTERED.values()}
    concrete = {c for c in _subclasses(Method)
                if not inspect.isabstract(c) and c.__module__.startswith("peftc.passes.")}
    assert concrete == registered


@pytest.mark.parametrize("name", list(REGISTERED))
def test_method_declares_its_contract(name: str):
    method = REGISTERED[name]
    assert isinstance(method.placement, Placement)
    assert method.layer_types and set(method.site_ops) == set(method.layer_types)  # the kinds it supports
    config = load_config(method.example_config)
    assert method.peft_type in (config.peft_type, ANY)  # a part of any method's config (ANY) shows one of them
    assert type(config) is METHODS[config.peft_type].config_cls
    if method.part_of_field is not None:  # a part: selected by its field of its method's config
        assert getattr(config, method.part_of_field)
    assert method.example_model in zoo.FACTORIES


@pytest.mark.parametrize("name", list(REGISTERED))
def test_method_matches_peft_outputs_grads_checkpoints_and_fold(name: str, tmp_path: Path):
    method = REGISTERED[name]
    pair = make_pair(method.example_model, method.example_config, peft_config(method.example_config))
    check_eval(pair, TOL)
    check_checkpoints(pair, tmp_path, TOL)
    check_train(pair, TOL)
    if method.mergeable:
        check_fold(pair, TOL)


def _two_adapters(method: Method) -> tuple[zoo.Case, peftc.AdaptedModel]:
    """Adapters "x" and "y" of the example config on the example model, with different random weights."""
    case = zoo.FACTORIES[method.example_model]()
    am = peftc.apply(case.model, method.example_config, adapter_name="x", example_inputs=case.inputs)
    am.add_adapter("y", method.example_config)
    for seed, adapter in enumerate(("x", "y")):
        am.set_adapter(adapter)
        randomize_adapters(am, seed=seed)
    return case, am


@pytest.mark.parametrize("name", list(REGISTERED))
def test_method_mixed_batch_equals_each_sample_alone(name: str):
    method = REGISTERED[name]
    case, am = _two_adapters(method)
    (x,) = case.inputs
    am.eval()  # the example model's own dropout off: a sample's output does not depend on its batch
    if method.placement is not Placement.OP_SITE:
        with pytest.raises(ConfigError, match="mixed batches"):
            am(x, adapter_names=MIXED)
        return
    am.set_adapter(["x", "y"])  # both trainable
    weights = torch.randn(*am(x).shape, generator=torch.Generator().manual_seed(3))  # a loss with no symmetry
    am.zero_grad(set_to_none=True)
    mixed = am(x, adapter_names=MIXED)
    (mixed * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in am.adapter_parameters()}
    with torch.no_grad():
        with am.disable_adapter():
            base = am(x)
        rows = [i for i, n in enumerate(MIXED) if n == "__base__"]
        torch.testing.assert_close(mixed[rows].detach(), base[rows], **TOL)
    for adapter in ("x", "y"):
        rows = [i for i, n in enumerate(MIXED) if n == adapter]
        am.set_adapter(adapter)
        am.zero_grad(set_to_none=True)
        alone = am(x[rows])
        torch.testing.assert_close(mixed[rows].detach(), alone.detach(), **TOL, msg=lambda m, a=adapter: f"{a}: {m}")
        (alone * weights[rows]).sum().backward()
        params = dict(am.adapter_parameters(adapter))
        assert params and any(grads[n].abs().sum() > 0 for n in params)
        for n, p in params.items():
            torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
