"""torch.compile backend: compiled outputs equal eager, and nothing a user switches at run time
(the active adapter, a scale, hot-swapped weights, the per-sample adapter choice, the batch and
sequence sizes) compiles again. A counting backend (dynamo's CompileCounter) counts compiles;
fullgraph=True makes a graph break an error."""

from __future__ import annotations

import pytest
import torch
from peftc.backends.compile import compile_model
from torch._dynamo.testing import CompileCounter

import peftc
from tests import zoo
from tests.oracle import assert_same_outputs, randomize_adapters

TARGETS = ["q_proj", "v_proj", "down_proj"]
pytestmark = pytest.mark.xdist_group("compile")  # the tests share one compiled model: one worker builds it


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    torch._dynamo.reset()
    case = zoo.llama()
    am = peftc.apply(case.model, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": TARGETS})
    am.add_adapter("other", {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "target_modules": TARGETS})
    am.set_adapter(["default", "other"])
    randomize_adapters(am, seed=1)
    am.set_adapter("default")
    swap_dir = tmp_path_factory.mktemp("swap")
    am.save_adapter(str(swap_dir), "other")  # hot-swapped into "default" below (PEFT's layout: a subfolder)
    counter = CompileCounter()
    compiled = compile_model(am, backend=counter)
    with torch.no_grad():
        compiled(**case.inputs)  # the one compile every test below must not add to
    assert counter.frame_count == 1
    yield case, am, compiled, counter, str(swap_dir / "other")
    torch._dynamo.reset()


def check(am: peftc.AdaptedModel, compiled, counter: CompileCounter, inputs: dict, **kwargs) -> None:
    """Compiled equals eager for this call, and the call compiled nothing new."""
    with torch.no_grad():
        got = compiled(**inputs, **kwargs)
        want = am(**inputs, **kwargs)
    assert_same_outputs(got, want)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} compiles"


def ids(batch: int, seq: int) -> dict:
    return {"input_ids": torch.randint(1, zoo.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(batch))}


def test_matches_eager_at_new_shapes(setup) -> None:
    case, am, compiled, counter, _ = setup
    check(am, compiled, counter, case.inputs)
    check(am, compiled, counter, ids(5, 7))  # dynamic batch and sequence
    with torch.no_grad():  # and the adapter is really there
        assert not torch.allclose(am(**case.inputs).logits, am.unload()(**case.inputs).logits, atol=1e-4)


def test_set_adapter_and_disable(setup) -> None:
    case, am, compiled, counter, _ = setup
    with torch.no_grad():
        before = compiled(**case.inputs).logits
    am.set_adapter("other")
    try:
        check(am, compiled, counter, case.inputs)
        with torch.no_grad():
            assert not torch.allclose(compiled(**case.inputs).logits, before, atol=1e-4)
        with am.disable_adapter():
            check(am, compiled, counter, case.inputs)
    finally:
        am.set_adapter("default")


def test_scale_change(setup) -> None:
    case, am, compiled, counter, _ = setup
    scales = [t for mas in am.targeted_modules.values() for ma in mas if ma.adapter == "default"
              for key, (_, t) in ma.tensors.items() if key == ("lora_scaling", None)]
    assert len(scales) == len(am.targeted_modules)
    old = [s.clone() for s in scales]
    with torch.no_grad():
        before = compiled(**case.inputs).logits
        for s in scales:
            s.mul_(3.0)
    try:
        check(am, compiled, counter, case.inputs)
        with torch.no_grad():
            assert not torch.allclose(compiled(**case.inputs).logits, before, atol=1e-4)
    finally:
        with torch.no_grad():
            for s, o in zip(scales, old):
                s.copy_(o)


def test_per_sample_adapters(setup) -> None:
    case, am, compiled, counter, _ = setup
    check(am, compiled, counter, case.inputs, adapter_names=["other", "__base__", "default"])
    check(am, compiled, counter, case.inputs, adapter_names=["default", "other", "other"])
    check(am, compiled, counter, ids(4, 6), adapter_index=torch.tensor([1, -1, 0, 1]))
    # each sample equals that adapter run alone on it
    with torch.no_grad():
        mixed = compiled(**case.inputs, adapter_names=["other", "__base__", "default"]).logits
        am.set_adapter("other")
        alone = compiled(**case.inputs).logits
        am.set_adapter("default")
        with am.disable_adapter():
            base = compiled(**case.inputs).logits
    torch.testing.assert_close(mixed[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], base[1], atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1


def test_hotswap(setup) -> None:
    case, am, compiled, counter, swap_dir = setup
    with torch.no_grad():
        before = compiled(**case.inputs).logits
        am.set_adapter("other")
        want = am(**case.inputs).logits  # "other" as saved: what "default" runs after the swap
        am.set_adapter("default")
    am.hotswap_adapter(swap_dir, "default")
    check(am, compiled, counter, case.inputs)
    with torch.no_grad():
        got = compiled(**case.inputs).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, before, atol=1e-4)


def test_bad_calls(setup) -> None:
    case, am, compiled, counter, _ = setup
    with pytest.raises(peftc.ConfigError, match="unknown adapter"):
        compiled(**case.inputs, adapter_names=["default", "nope", "other"])
    with pytest.raises(peftc.ConfigError, match=r"\[-1, 1\]"):
        compiled(**case.inputs, adapter_index=torch.tensor([0, 2, 1]))
    with pytest.raises(peftc.ConfigError, match="3 entries for a batch of 5"):
        compiled(**ids(5, 7), adapter_index=torch.tensor([0, 1, 1]))
    assert counter.frame_count == 1
