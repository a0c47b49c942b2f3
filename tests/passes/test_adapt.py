"""The adapt pass on chained targets: a targeted layer whose input is another targeted layer's output.

Each adapter must read its site's input as it is after the earlier sites were rewritten (the adapted
output), not the base op's output from before: checked on the graph, against PEFT for every method,
through the dispatch pass (mixed batches) and through the fold pass.
"""

from __future__ import annotations

from typing import Any

import peft
import pytest
import torch

import peftc
from peftc.graph import ADAPTER
from peftc.sites import sites_by_module
from tests import oracle, zoo

pytestmark = [pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning")]

CHAIN = ["a", "b"]  # a feeds b directly; c is left alone so b's output reaches it through a ReLU
METHODS: dict[str, dict[str, Any]] = {
    "lora": {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "init_lora_weights": False},
    "dora": {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": True},
    "ia3-feedforward": {"peft_type": "IA3", "feedforward_modules": ["b"], "init_ia3_weights": False},
    "loha": {"peft_type": "LOHA", "r": 2, "alpha": 4, "init_weights": False},
    "lokr": {"peft_type": "LOKR", "r": 2, "alpha": 4, "init_weights": False},
    "oft": {"peft_type": "OFT", "r": 0, "oft_block_size": 4, "init_weights": False},
    "boft": {"peft_type": "BOFT", "boft_block_size": 4, "init_weights": False},
    "vera": {"peft_type": "VERA", "r": 2},
    "hra": {"peft_type": "HRA", "r": 2, "init_weights": False},
}


def configs(method: str, targets: list[str]) -> tuple[dict[str, Any], peft.PeftConfig]:
    config = {**METHODS[method], "target_modules": targets}
    return config, peft.get_peft_config(dict(config))


@pytest.mark.parametrize("method", METHODS)
def test_chained_targets_match_peft(method: str) -> None:
    pair = oracle.make_pair("chain", *configs(method, CHAIN))
    oracle.check_eval(pair)
    oracle.check_train(pair)


def test_second_adapter_reads_the_first_ones_output() -> None:
    """b's LoRA A multiplies b's current input, the output of a's adapter (the `add` after a's linear)."""
    am = peftc.apply(zoo.chain().model, configs("lora", CHAIN)[0], example_inputs=zoo.chain().inputs)
    graph = am.graph_for(*zoo.chain().inputs).gm.graph
    site_b = sites_by_module(graph)["b"][0]
    assert site_b.input.meta.get(ADAPTER, (None,))[0] == "a"  # a's adapted output feeds b's base op ...
    lora_nodes_b = [n for n in graph.nodes if n.meta.get(ADAPTER, (None,))[0] == "b"]
    readers = [n for n in lora_nodes_b if site_b.input in n.all_input_nodes]
    assert readers, "no node of b's adapter reads b's input"  # ... and b's adapter reads the same value
    assert not any(site_b.node in n.all_input_nodes and n.target is torch.ops.aten.linear.default
                   and n.args[0] is not site_b.input for n in lora_nodes_b)


@pytest.mark.parametrize("method", ["lora", "ia3-feedforward", "oft"])
def test_chained_targets_in_a_mixed_batch_equal_each_sample_alone(method: str) -> None:
    case = zoo.chain()
    config = configs(method, CHAIN)[0]
    am = peftc.apply(case.model, config, example_inputs=case.inputs)
    am.add_adapter("other", config)
    oracle.randomize_adapters(am)
    (x,) = case.inputs
    names = ["default", "other", "__base__", "other"]
    with torch.no_grad():
        mixed = am(x, adapter_names=names)
        for i, name in enumerate(names):
            if name == "__base__":
                with am.disable_adapter():
                    alone = am(x)
            else:
                am.set_adapter(name)
                alone = am(x)
            torch.testing.assert_close(mixed[i], alone[i], **oracle.TOL)


@pytest.mark.parametrize("method", ["lora", "ia3-feedforward", "oft"])
def test_folded_chain_equals_unfolded(method: str) -> None:
    case = zoo.chain()
    am = peftc.apply(case.model, configs(method, CHAIN)[0], example_inputs=case.inputs)
    oracle.randomize_adapters(am)
    (x,) = case.inputs
    with torch.no_grad():
        torch.testing.assert_close(am.fold()(x), am(x), **oracle.TOL)
