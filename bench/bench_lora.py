"""LoRA on a ~42M-parameter Llama-shaped model: peftc vs PEFT vs the base model, in one run.

    python bench/bench_lora.py                   # r=16 on q_proj,v_proj, then all-linear
    python bench/bench_lora.py --configs qv --rounds 3

Measures (CPU, torch.set_num_threads):
  - setup: `peftc.apply` (capture + rewrite) vs `peft.get_peft_model`, and peftc's first
    train-mode call (a second capture, in train mode);
  - forward: eval, no_grad, unmerged LoRA;
  - train step: forward + cross-entropy + backward + AdamW step on the adapter parameters.
    The base model's "train step" is forward + backward to the input embeddings with every
    weight frozen (no optimizer step): the backward work any adapter method pays at least.
Candidates run interleaved in rounds (rotating order, one call each per round) after warmup;
figures are medians, so ratios from one run are comparable on a noisy machine. IQR/median is
the largest interquartile spread among the candidates of a row: a high one means the machine
was noisy during that row. Needs `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import peftc

CONFIGS = {
    "qv": {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]},
    "all-linear": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
}


def build_model(tie: bool, hidden: int = 512) -> LlamaForCausalLM:
    """The bench model (seeded): 8 Llama layers; `hidden` 512 (41.7M parameters tied) unless a wider one is asked
    for, its MLP and heads scaled with it (intermediate 2.6875x hidden, 64-wide heads)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 43 // 16, num_hidden_layers=8,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      max_position_embeddings=1024, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def timing_parser(doc: str, batch: int, rounds: int, warmup: int = 2) -> argparse.ArgumentParser:
    """The options every bench shares: the batch shape, interleaved rounds, threads."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--iters", type=int, default=1, help="calls per candidate per round")
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--threads", type=int, default=2)
    return parser


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(
    candidates: dict[str, Callable[[], object]], rounds: int, iters: int, warmup: int
) -> tuple[dict[str, float], float]:
    """Median seconds per call of each candidate, run in rounds with a rotating order, and the
    largest interquartile range / median among them (how noisy the machine was meanwhile)."""
    samples = interleaved_samples(candidates, rounds, iters, warmup)
    return {n: statistics.median(s) for n, s in samples.items()}, noise_of(samples)


def noise_of(samples: dict[str, list[float]]) -> float:
    """The largest interquartile range / median among the candidates' samples."""
    return max((q[2] - q[0]) / q[1] for q in (statistics.quantiles(s, n=4) for s in samples.values()))


def interleaved_samples(
    candidates: dict[str, Callable[[], object]], rounds: int, iters: int, warmup: int, settle: int = 0
) -> dict[str, list[float]]:
    """Seconds of each call of each candidate, `iters` per round, in rounds with a rotating order; each
    candidate's turn starts with `settle` untimed calls."""
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            for _ in range(settle):
                candidates[name]()
            for _ in range(iters):
                samples[name].append(timed(candidates[name]))
    return samples


def paired_ratios(samples: dict[str, list[float]], reference: str) -> dict[str, float]:
    """Each candidate's time over the reference's, taken call by call in the same round, then the median: the
    machine's slow spells (it is shared) hit both sides of a ratio, where a ratio of two medians mixes rounds."""
    return {n: statistics.median(t / r for t, r in zip(s, samples[reference])) for n, s in samples.items()}


def same_random_adapters(base: torch.nn.Module, spec: dict, k: int) -> tuple[peftc.AdaptedModel, torch.nn.Module]:
    """peftc and PEFT on copies of `base` with the same k random LoRA adapters a0..a{k-1} of `spec`."""
    from peft import LoraConfig, get_peft_model

    am = peftc.apply(base, {"peft_type": "LORA", **spec}, adapter_name="a0")
    for i in range(1, k):
        am.add_adapter(f"a{i}", {"peft_type": "LORA", **spec})
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for name, p in am.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.02, generator=gen)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**spec), adapter_name="a0")
    for i in range(1, k):
        pm.add_adapter(f"a{i}", LoraConfig(**spec))
    pm.load_state_dict(am.state_dict(), strict=True)
    return am.eval(), pm.eval()


def train_step(model: torch.nn.Module, ids: torch.Tensor, opt: torch.optim.Optimizer | None) -> None:
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def bench_config(name: str, base: LlamaForCausalLM, args: argparse.Namespace) -> list[list[str]]:
    from peft import LoraConfig, get_peft_model

    spec = CONFIGS[name]
    rows = []

    # setup cost, interleaved: PEFT mutates the model it wraps, so it gets a fresh copy (untimed)
    apply_s, peft_s = [], []
    for _ in range(args.setup_rounds):
        apply_s.append(timed(lambda: peftc.apply(base, {"peft_type": "LORA", **spec})))
        fresh = copy.deepcopy(base)
        peft_s.append(timed(lambda fresh=fresh: get_peft_model(fresh, LoraConfig(**spec))))
    apply_t, peft_t = statistics.median(apply_s), statistics.median(peft_s)

    # PEFT model with non-zero B (so outputs differ from base); peftc loads PEFT's checkpoint of it
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**spec))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
    with tempfile.TemporaryDirectory() as d:
        peft_model.save_pretrained(d)
        am = peftc.load(base, d, is_trainable=True)
    peft_model.eval()
    am.eval()
    n_train = am.get_nb_trainable_parameters()[0]
    n_train_peft = peft_model.get_nb_trainable_parameters()[0]

    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = peft_model(input_ids=ids).logits, am(input_ids=ids).logits
    max_diff = (ref - out).abs().max().item()

    def no_grad(m: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return m(input_ids=ids)
        return run

    fwd, fwd_noise = interleaved({"base": no_grad(base), "peft": no_grad(peft_model), "peftc": no_grad(am)},
                      args.rounds, args.iters, args.warmup)

    # train mode: peftc captures a train-mode graph on the first call (timed here, once)
    am.train()
    peft_model.train()
    train_capture = timed(lambda: am(input_ids=ids[:2, :16]))
    base_train = copy.deepcopy(base).train().requires_grad_(False)  # frozen, like the adapted models' base
    base_train.model.embed_tokens.register_forward_hook(lambda m, i, o: o.requires_grad_())
    opt_am = torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=1e-4)
    opt_peft = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    step, step_noise = interleaved({
        "base": lambda: train_step(base_train, ids, None),
        "peft": lambda: train_step(peft_model, ids, opt_peft),
        "peftc": lambda: train_step(am, ids, opt_am),
    }, args.rounds, args.iters, args.warmup)

    rows.append([name, "setup (s)", "-", f"{peft_t:.3f}", f"{apply_t:.3f}", "-", f"{apply_t / peft_t:.1f}", "-", "-"])
    rows.append([name, "train-mode capture (s)", "-", "-", f"{train_capture:.3f}", "-", "-", "-", "-"])
    for label, t, noise in (("forward eval (ms)", fwd, fwd_noise), ("train step (ms)", step, step_noise)):
        rows.append([name, label, f"{1e3 * t['base']:.1f}", f"{1e3 * t['peft']:.1f}", f"{1e3 * t['peftc']:.1f}",
                     f"{t['peftc'] / t['base']:.3f}", f"{t['peftc'] / t['peft']:.3f}", f"{t['peft'] / t['base']:.3f}",
                     f"{100 * noise:.0f}%"])
    print(f"[{name}] trainable params peftc {n_train:,d} / peft {n_train_peft:,d}; "
          f"max |logits peftc - peft| = {max_diff:.2e}", flush=True)
    return rows


def main() -> None:
    parser = timing_parser(__doc__, batch=4, rounds=10)
    parser.add_argument("--configs", default="qv,all-linear", help="comma list of " + ", ".join(CONFIGS))
    parser.add_argument("--setup-rounds", type=int, default=3)
    parser.add_argument("--untied", action="store_true", help="separate lm_head (58M params instead of 42M)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    base = build_model(tie=not args.untied)
    n = sum(p.numel() for p in base.parameters())
    print(f"model: LlamaForCausalLM hidden 512, 8 layers, intermediate 1376, 8 heads, vocab 32000, "
          f"tie_word_embeddings={not args.untied}: {n / 1e6:.1f}M params", flush=True)
    print(f"torch {torch.__version__}, {args.threads} threads; batch {args.batch} x seq {args.seq}; "
          f"{args.rounds} rounds x {args.iters} calls after {args.warmup} warmup, medians", flush=True)

    rows = []
    for name in args.configs.split(","):
        rows += bench_config(name.strip(), base, args)
    header = ["config", "measure", "base", "peft", "peftc", "peftc/base", "peftc/peft", "peft/base", "IQR/median"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


if __name__ == "__main__":
    main()
