"""One run of the 2-process tests: DDP, then FSDP2, on the same LoRA adapter and the same global batches.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.distributed.worker OUT

First rank 0 trains the adapter alone on the whole global batches, before any process group
wrapper touches the model: the single-process reference (one capture fewer than a separate
reference process, on a 2-core machine where captures dominate). Then each rank trains it from
the same start on its slice of every global batch. Rank 0 writes `OUT/results.pt` (the model's
parameter shapes, adapter weights at the start and after each run, the losses, how many elements
each kind of collective moved, how FSDP2 sharded the tensors) and saves the adapter in PEFT's
format to `OUT/single`, `OUT/ddp` and `OUT/fsdp`.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode

import peftc
from tests import oracle, zoo

CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
          "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"]}
GLOBAL_BATCH, SEQ, STEPS, LR = 4, 8, 3, 1e-2


def batches() -> list[torch.Tensor]:
    """The global batches every run sees (the same in every process)."""
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(1, zoo.VOCAB, (GLOBAL_BATCH, SEQ), generator=gen) for _ in range(STEPS)]


def build(batch: int) -> peftc.AdaptedModel:
    """The tiny Llama with LoRA, captured in train mode for (input_ids, labels) of `batch` rows,
    with random adapter weights (so lora_B is not zero)."""
    case = zoo.llama()
    case.model.train()
    ids = batches()[0][:batch]
    am = peftc.apply(case.model, CONFIG, example_inputs={"input_ids": ids, "labels": ids})
    oracle.randomize_adapters(am, seed=1)
    return am


def adapter_weights(am: peftc.AdaptedModel) -> dict[str, torch.Tensor]:
    """Full (unsharded) copies of the active adapter's parameters."""
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in am.adapter_parameters()}


def restore(am: peftc.AdaptedModel, weights: dict[str, torch.Tensor]) -> None:
    """Put the adapter back to `weights` (from `adapter_weights`)."""
    with torch.no_grad():
        for name, p in am.adapter_parameters():
            p.copy_(weights[name])


def train(model: torch.nn.Module, am: peftc.AdaptedModel, rank: int = 0, world: int = 1) -> torch.Tensor:
    """STEPS AdamW steps of `model` (`am` or a wrapper of it) on this rank's slice of each global
    batch; returns this rank's losses."""
    opt = torch.optim.AdamW([p for _, p in am.adapter_parameters()], lr=LR)
    rows = GLOBAL_BATCH // world
    losses = []
    for ids in batches():
        local = ids[rank * rows:(rank + 1) * rows]
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses)


def global_losses(local: torch.Tensor) -> list[float]:
    """The global batches' losses: every rank has as many tokens, so they are the mean of the ranks'."""
    dist.all_reduce(local)
    return (local / dist.get_world_size()).tolist()


class CommSizes(TorchDispatchMode):
    """Counts the elements each kind of collective moves (its largest tensor: the unsharded side)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func.namespace == "c10d":
            sizes = [t.numel() for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            self.numel[func.__name__.split(".")[0]] += max(sizes, default=0)
        return func(*args, **kwargs)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    am = build(GLOBAL_BATCH // world)
    initial = adapter_weights(am)
    results: dict[str, Any] = {
        "world": world, "steps": STEPS, "initial": initial, "adapters": [n for n, _ in am.adapter_parameters()],
        "params": {n: (tuple(p.shape), p.requires_grad) for n, p in am.named_parameters()},
    }
    if rank == 0:  # the reference; the other rank waits in DDP's first broadcast meanwhile
        results["single_losses"] = train(am, am).tolist()
        results["single"] = adapter_weights(am)
        am.save_adapter(str(out / "single"))
        restore(am, initial)

    ddp = DistributedDataParallel(am)
    with CommSizes() as comm:
        local = train(ddp, am, rank, world)
    results.update(ddp_comm=dict(comm.numel), ddp_losses=global_losses(local), ddp=adapter_weights(am))
    if rank == 0:
        am.save_adapter(str(out / "ddp"))
    del ddp

    # FSDP2 on the same model from the same start: the root holds every tensor (the graph runs
    # from the root; submodules are never called), frozen base and trainable adapters in one group
    restore(am, initial)
    fully_shard(am, mesh=init_device_mesh("cpu", (world,)))
    results["fsdp_local_numel"] = {n: (p.to_local().numel(), p.numel()) for n, p in am.named_parameters()}
    with CommSizes() as comm:
        local = train(am, am, rank, world)
    results.update(fsdp_comm=dict(comm.numel), fsdp_losses=global_losses(local), fsdp=adapter_weights(am))
    am.unshard()  # collective: every rank gathers, rank 0 writes
    if rank == 0:
        am.save_adapter(str(out / "fsdp"))
        torch.save(results, out / "results.pt")
    am.reshard()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
