"""`peftc generate`: a local model folder with a tokenizer, adapters from folders, prompts in; the printed
continuations equal PEFT's generate on the same adapter."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import peftc
from peftc.cli import main
from tests import zoo
from tests.oracle import randomize_adapters

pytestmark = [pytest.mark.filterwarnings("ignore:Attempted to insert a get_attr Node:UserWarning")]


def words() -> list[str]:
    return ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(3, zoo.VOCAB)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cli_generate")
    model_dir, adapter_dir, bare = root / "llama", root / "fr", root / "no_tokenizer"
    case = zoo.llama()
    case.model.generation_config.pad_token_id = 0
    case.model.save_pretrained(model_dir)
    case.model.save_pretrained(bare)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words())}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(model_dir)
    am = peftc.apply(case.model, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    randomize_adapters(am, seed=3)
    am.save_adapter(str(adapter_dir))
    return model_dir, adapter_dir, bare


def test_generate_prints_peft_continuations(folders, capsys: pytest.CaptureFixture) -> None:
    model_dir, adapter_dir, _ = folders
    prompts = ["w5 w6 w7 w8", "w9 w10"]
    code = main(["generate", str(model_dir), "--adapter", f"fr={adapter_dir}", "--prompt", prompts[0],
                 "--prompt", prompts[1], "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert code == 0, out
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir, padding_side="left")
    pm = peft.PeftModel.from_pretrained(zoo.llama().model, adapter_dir).eval()
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    ids = pm.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=0)[:, batch["input_ids"].shape[1]:]
    for prompt, row in zip(prompts, ids):
        assert f"[fr] {prompt!r} -> {tokenizer.decode(row, skip_special_tokens=True)!r}" in out


def test_generate_needs_a_tokenizer(folders, capsys: pytest.CaptureFixture) -> None:
    _, adapter_dir, bare = folders
    code = main(["generate", str(bare), "--adapter", str(adapter_dir), "--prompt", "w5"])
    assert code == 2
    assert "tokenizer" in capsys.readouterr().err


def test_generate_adapter_names_per_prompt(folders, capsys: pytest.CaptureFixture) -> None:
    model_dir, adapter_dir, _ = folders
    code = main(["generate", str(model_dir), "--adapter", f"fr={adapter_dir}", "--prompt", "w5 w6", "--prompt", "w7",
                 "--adapter-names", "fr", "--max-new-tokens", "2"])
    assert code == 2 and "1 names for 2 prompts" in capsys.readouterr().err
    code = main(["generate", str(model_dir), "--adapter", f"fr={adapter_dir}", "--prompt", "w5 w6", "--prompt", "w7",
                 "--adapter-names", "fr,__base__", "--max-new-tokens", "2"])
    out = capsys.readouterr().out
    assert code == 0 and "[__base__] 'w7'" in out and "[fr] 'w5 w6'" in out
