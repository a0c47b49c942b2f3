"""LoRA training on several CPU processes (gloo) vs one, on the same global batch, in one run.

    python bench/bench_distributed.py                       # DDP and FSDP2, 2 processes, global batch 8 x 64
    python bench/bench_distributed.py --no-fsdp --steps 20

Each setup runs in fresh processes (torch.multiprocessing, spawned, torchrun-style env:// rendezvous)
on bench_lora.py's ~42M-parameter Llama with LoRA: the same train step as there (forward +
cross-entropy + backward + AdamW on the adapter), the same global batch every step, each of W
processes taking batch / W rows. A process gets `--threads` torch threads (default 1), so
"1 proc x 1 thread" vs "2 procs x 1 thread" compares the same compute per process; "1 proc x 2
threads" is the same two cores used by intra-op threads instead. Figures are medians of rank 0's
step times after warmup (a DDP or FSDP2 step ends in collectives, so the ranks move in lockstep).
Setups run one after another, so on a shared machine their ratios are only as good as its
quietness over the run: the IQR/median column says how steady each setup was.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_lora import CONFIGS, build_model, timed, train_step
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import peftc

# (label, processes, threads per process, wrapper)
SETUPS = [("1 proc x 1 thread", 1, 1, "none"), ("1 proc x 2 threads", 1, 2, "none"),
          ("2 procs x 1 thread, DDP", 2, 1, "ddp"), ("2 procs x 1 thread, FSDP2", 2, 1, "fsdp")]


def run_rank(rank: int, world: int, threads: int, wrapper: str, args: argparse.Namespace, out: str) -> None:
    """One process of a setup: train `args.warmup + args.steps` steps; rank 0 writes its step times."""
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    base = build_model(tie=True).train()  # seeded: every rank builds the same weights and LoRA init
    rows, gen = args.batch // world, torch.Generator().manual_seed(1)
    global_batches = [torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=gen)
                      for _ in range(args.warmup + args.steps)]
    batches = [ids[rank * rows:(rank + 1) * rows] for ids in global_batches]
    am = peftc.apply(base, {"peft_type": "LORA", **CONFIGS[args.config]}, example_inputs={"input_ids": batches[0]})
    model: torch.nn.Module = am
    if wrapper == "ddp":
        model = DistributedDataParallel(am)
    elif wrapper == "fsdp":
        fully_shard(am, mesh=init_device_mesh("cpu", (world,)))  # the root: the graph runs from it
    opt = torch.optim.AdamW([p for _, p in am.adapter_parameters()], lr=1e-4)
    times = [timed(lambda ids=ids: train_step(model, ids, opt)) for ids in batches]
    if rank == 0:
        Path(out).write_text(json.dumps(times[args.warmup:]))
    if world > 1:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_setup(world: int, threads: int, wrapper: str, args: argparse.Namespace) -> list[float]:
    """Step times (seconds) of one setup, from fresh processes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "times.json")
        mp.spawn(run_rank, args=(world, threads, wrapper, args, out), nprocs=world)
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="qv", choices=list(CONFIGS))
    parser.add_argument("--batch", type=int, default=8, help="global batch: each of W processes takes batch / W")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setup")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-fsdp", action="store_true", help="skip the FSDP2 setup")
    args = parser.parse_args()

    n = sum(p.numel() for p in build_model(tie=True).parameters())
    print(f"model: bench_lora.py's Llama, {n / 1e6:.1f}M params; LoRA {args.config} {CONFIGS[args.config]}", flush=True)
    print(f"torch {torch.__version__}, gloo; global batch {args.batch} x seq {args.seq}; "
          f"median of {args.steps} steps after {args.warmup} warmup; {os.cpu_count()} CPUs", flush=True)

    rows, ref = [], None
    for label, world, threads, wrapper in SETUPS:
        if wrapper == "fsdp" and args.no_fsdp:
            continue
        times = run_setup(world, threads, wrapper, args)
        median = statistics.median(times)
        q = statistics.quantiles(times, n=4)
        ref = ref or median  # the first setup: 1 process x 1 thread
        rows.append([label, f"{args.batch // world} x {args.seq}", f"{1e3 * median:.0f}",
                     f"{args.batch * args.seq / median:.0f}", f"{median / ref:.2f}",
                     f"{100 * (q[2] - q[0]) / median:.0f}%"])
        print(f"[{label}] {1e3 * median:.0f} ms/step", flush=True)

    header = ["setup", "rows/proc", "step (ms)", "tokens/s", "time / 1x1", "IQR/median"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


if __name__ == "__main__":
    main()
