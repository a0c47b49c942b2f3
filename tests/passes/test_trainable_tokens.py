"""LoRA's `trainable_token_indices` against PEFT's TrainableTokensLayer: chosen embedding rows trained
(and, on a tied model, the output head's same rows), beside LoRA adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftc
from peftc.errors import ConfigError
from peftc.graph import adapter_nodes
from tests import zoo
from tests.oracle import (
    MethodPair,
    check_checkpoints,
    check_eval,
    check_fold,
    check_train,
    make_pair,
    randomize_adapters,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning",
                                        "ignore:fan_in_fan_out is set to False:UserWarning")

LINEAR = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def tokens(case_name: str) -> list[int]:
    """Token ids the zoo inputs contain (so their rows matter), and one they do not."""
    ids = zoo.FACTORIES[case_name]().inputs["input_ids"].unique().tolist()
    return [ids[0], ids[3], ids[7], next(i for i in range(zoo.VOCAB) if i not in ids)]


def pair_of(case_name: str, **extra: Any) -> MethodPair:
    fields = {"r": 2, "lora_alpha": 6, "target_modules": LINEAR[case_name],
              "trainable_token_indices": tokens(case_name), **extra}
    return make_pair(case_name, {"peft_type": "LORA", **fields}, peft.LoraConfig(**fields))


@pytest.mark.parametrize("name", ["llama", "gpt2"])  # gpt2: lm_head is tied to wte
def test_trainable_tokens_match_peft(name: str, tmp_path: Path):
    pair = pair_of(name)
    check_eval(pair)
    check_checkpoints(pair, tmp_path)
    check_train(pair)
    delta = dict(pair.am.adapter_parameters())
    key = next(k for k in delta if k.endswith("token_adapter.trainable_tokens_delta.default"))
    grad = delta[key].grad
    assert grad[:3].abs().sum(dim=1).gt(0).all()  # the rows the inputs use are trained ...
    # an absent token's row is trained only through a tied head (which reads every row); the base weight never
    assert grad[3].eq(0).all() == (name == "llama")
    check_fold(pair)


def test_keys_and_graph(tmp_path: Path):
    pair = pair_of("gpt2")
    keys = set(pair.am.state_dict())
    for head in ("transformer.wte", "lm_head"):  # PEFT's names, the tied head's included
        assert f"base_model.model.{head}.token_adapter.base_layer.weight" in keys
        assert f"base_model.model.{head}.token_adapter.trainable_tokens_delta.default" in keys
    pair.am.save_adapter(tmp_path)
    saved = [k for k in load_file(tmp_path / "adapter_model.safetensors") if "lora_" not in k]
    assert saved == ["base_model.model.transformer.wte.token_adapter.trainable_tokens_delta"]
    graph = pair.am.graph_for(**zoo.gpt2().inputs).gm.graph
    copies = [n for n in adapter_nodes(graph) if n.target == torch.ops.aten.index_copy.default]
    assert len(copies) == 2  # the lookup and the tied head each run on W with the trained rows
    users = sorted(u.target.__name__ for n in copies for u in n.users)
    assert users == ["embedding.default", "linear.default"]


def test_fresh_rows_are_the_base_rows():
    # the dict form names the layer (a model without get_input_embeddings); no LoRA beside it
    case = zoo.embedding_model()
    config = {"peft_type": "LORA", "target_modules": [], "trainable_token_indices": {"emb": [1, 2]}}
    am = peftc.apply(case.model, config, example_inputs=case.inputs)
    names = [k for k, _ in am.adapter_parameters()]
    assert names == ["base_model.model.emb.token_adapter.trainable_tokens_delta.default"]
    with torch.no_grad():
        torch.testing.assert_close(am(*case.inputs), zoo.embedding_model().model(*case.inputs))


def test_mixed_batch_picks_each_sample_s_rows():
    case = zoo.llama()
    base = {"peft_type": "LORA", "target_modules": [], "trainable_token_indices": tokens("llama")}
    am = peftc.apply(case.model, base)
    am.add_adapter("other", {**base, "trainable_token_indices": tokens("llama")[:2]})
    with torch.no_grad():
        for _, p in am.named_parameters():
            if "trainable_tokens_delta" in _:
                p.add_(torch.randn_like(p))
        ids = case.inputs["input_ids"]
        mixed = am(input_ids=ids, adapter_names=["other", "__base__", "default"]).logits
        for i, name in enumerate(["other", None, "default"]):
            if name is None:
                with am.disable_adapter():
                    want = am(input_ids=ids).logits
            else:
                am.set_adapter(name)
                want = am(input_ids=ids).logits
            torch.testing.assert_close(mixed[i], want[i])


def test_refused_configs():
    case = zoo.llama()
    for bad in ([0, zoo.VOCAB], {"q_proj": [1]}, {"no_such_layer": [1]}, [True]):
        with pytest.raises(ConfigError, match="trainable_token_indices"):
            peftc.apply(case.model, {"peft_type": "LORA", "target_modules": ["q_proj"],
                                     "trainable_token_indices": bad})
    with pytest.raises(ConfigError, match="embed_tokens"):
        peftc.apply(case.model, {"peft_type": "LORA", "target_modules": ["embed_tokens"],
                                 "trainable_token_indices": [1]})


# -- PEFT's standalone TRAINABLE_TOKENS method: the same adapter, placed by its own config ---------------------

def standalone_pair(case_name: str, **extra: Any) -> MethodPair:
    fields = {"token_indices": tokens(case_name), **extra}
    return make_pair(case_name, {"peft_type": "TRAINABLE_TOKENS", **fields}, peft.TrainableTokensConfig(**fields))


@pytest.mark.parametrize("name", ["llama", "gpt2"])  # gpt2: lm_head is tied to wte
def test_standalone_trainable_tokens_match_peft(name: str, tmp_path: Path):
    pair = standalone_pair(name)
    check_eval(pair)
    check_checkpoints(pair, tmp_path)  # the saved keys are PEFT's too
    # no target_modules: PEFT's input embedding, saved by its full name
    assert pair.am.peft_config["default"].target_modules == pair.pm.peft_config["default"].target_modules
    check_train(pair)
    check_fold(pair)


def test_standalone_tied_head_is_saved_as_peft_saves_it(tmp_path: Path):
    pair = standalone_pair("gpt2")
    pair.am.save_adapter(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(saved) == ["base_model.model.lm_head.trainable_tokens_delta",
                             "base_model.model.transformer.wte.trainable_tokens_delta"]
    torch.testing.assert_close(saved["base_model.model.lm_head.trainable_tokens_delta"],
                               saved["base_model.model.transformer.wte.trainable_tokens_delta"], atol=0, rtol=0)
    # one trainable tensor, read by the lookup and the head
    assert [k for k, _ in pair.am.adapter_parameters()] == \
        ["base_model.model.transformer.wte.trainable_tokens_delta.default"]
    graph = pair.am.graph_for(**zoo.gpt2().inputs).gm.graph
    copies = [n for n in adapter_nodes(graph) if n.target == torch.ops.aten.index_copy.default]
    assert sorted(u.target.__name__ for n in copies for u in n.users) == ["embedding.default", "linear.default"]


def test_standalone_random_init_is_peft_s(tmp_path: Path):
    """init_weights=False draws the rows as PEFT does: the same values on the same seed."""
    case, ref = zoo.llama(), zoo.llama()
    fields = {"token_indices": [3, 5], "init_weights": False}
    torch.manual_seed(7)
    am = peftc.apply(case.model, {"peft_type": "TRAINABLE_TOKENS", **fields})
    torch.manual_seed(7)
    pm = peft.get_peft_model(ref.model, peft.TrainableTokensConfig(**fields))
    ours, theirs = dict(am.adapter_parameters()), dict(pm.named_parameters())
    assert ours and all(torch.equal(t, theirs[k]) for k, t in ours.items())
    assert not torch.equal(next(iter(ours.values())), case.model.model.embed_tokens.weight[[3, 5]])


def test_standalone_refused_configs():
    case = zoo.llama()
    with pytest.raises(ConfigError, match=r"token_indices for 'model.embed_tokens'"):
        peftc.apply(case.model, {"peft_type": "TRAINABLE_TOKENS", "token_indices": [0, zoo.VOCAB]})
    with pytest.raises(ConfigError, match=r"token_indices for 'model.embed_tokens'.*\[\]"):
        peftc.apply(case.model, {"peft_type": "TRAINABLE_TOKENS"})
    with pytest.raises(peftc.TargetError, match=r"'lm_head' \(Linear\).*only as a head tied"):
        peftc.apply(case.model, {"peft_type": "TRAINABLE_TOKENS", "target_modules": ["lm_head"],
                                 "token_indices": [1]})


def test_standalone_hotswap_with_a_tied_head(tmp_path: Path):
    """Other rows hot-swapped in: the embedding and its tied head read them, no new capture."""
    pair = standalone_pair("gpt2")
    other = standalone_pair("gpt2", token_indices=tokens("gpt2")[::-1])
    randomize_adapters(other.am, seed=5)
    other.am.save_adapter(tmp_path)
    n = len(pair.am.graphs)
    pair.am.hotswap_adapter(str(tmp_path))
    assert len(pair.am.graphs) == n
    with torch.no_grad():
        torch.testing.assert_close(pair.am(**zoo.gpt2().inputs).logits, other.am(**zoo.gpt2().inputs).logits)
