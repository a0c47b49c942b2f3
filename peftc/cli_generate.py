"""`peftc generate`: try an adapter on a local causal LM (or seq2seq) folder with its tokenizer.

    peftc generate MODEL --adapter [NAME=]DIR [--adapter ...] --prompt TEXT [--prompt ...]
                   [--adapter-names NAME,NAME,...] [--max-new-tokens N] [--sample --temperature T --top-p P --seed S]
                   [--num-beams N]

Several prompts are one left-padded batch; `--adapter-names` picks an adapter per prompt ("__base__" for
none), otherwise the first adapter runs for all. Decoding is transformers' `generate` over peftc's
KV-cache graph (`AdaptedModel.generate`).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def register(sub: Any) -> None:
    """Add the `generate` command to the CLI's subparsers."""
    p = sub.add_parser(
        "generate",
        help="generate text from a local model folder with one or more adapters (transformers' generate)",
        description="Load MODEL (a local folder with a tokenizer) and the adapters saved in each --adapter "
        "folder, and print each prompt's continuation.",
    )
    p.add_argument("model", metavar="MODEL", help="a local Hugging Face model folder holding a tokenizer")
    p.add_argument("--adapter", action="append", required=True, metavar="[NAME=]DIR",
                   help="an adapter folder (repeat for several); its name defaults to the folder's name")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="a prompt (repeat for a batch)")
    p.add_argument("--adapter-names", metavar="NAME,...",
                   help="one adapter name per prompt ('__base__': no adapter); default: the first adapter for all")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="torch seed for --sample (default: %(default)s)")
    p.set_defaults(func=cmd_generate)


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    from peftc.cli import UserError

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: generate needs the model's tokenizer in its folder (tokenizer.json or "
                        f"tokenizer_config.json): {first}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"{path}: the tokenizer has neither a pad token nor an eos token to pad a batch with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    import peftc
    from peftc.cli import UserError, load_model, named_adapters

    adapters = named_adapters(args.adapter)
    model, model_path = load_model(args.model)
    tokenizer = load_tokenizer(model_path)
    names = list(adapters)
    am = peftc.load(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        am.load_adapter(adapters[name], name)
    per_prompt = None
    if args.adapter_names:
        per_prompt = [n.strip() for n in args.adapter_names.split(",")]
        if len(per_prompt) != len(args.prompt):
            raise UserError(f"--adapter-names has {len(per_prompt)} names for {len(args.prompt)} prompts")
    seq2seq = getattr(model.config, "is_encoder_decoder", False)
    tokenizer.padding_side = "right" if seq2seq else "left"
    batch = tokenizer(args.prompt, return_tensors="pt", padding=True)
    options = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "do_sample": args.sample,
               "pad_token_id": tokenizer.pad_token_id}
    if args.sample:
        options.update(temperature=args.temperature, top_p=args.top_p)
        torch.manual_seed(args.seed)
    print(f"model:    {type(model).__name__} from {model_path}")
    print(f"adapters: {', '.join(f'{n} ({d})' for n, d in adapters.items())}")
    start = time.perf_counter()
    out = am.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], adapter_names=per_prompt,
                      **options)
    seconds = time.perf_counter() - start
    new = out if seq2seq else out[:, batch["input_ids"].shape[1]:]
    for i, prompt in enumerate(args.prompt):
        which = per_prompt[i] if per_prompt else names[0]
        text = tokenizer.decode(new[i], skip_special_tokens=True)
        print(f"[{which}] {prompt!r} -> {text!r}")
    print(f"generated {new.shape[1]} tokens x {new.shape[0]} in {seconds:.1f} s (first call includes the capture)",
          file=sys.stderr)
    return 0
