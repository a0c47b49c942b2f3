"""Train a causal-LM LoRA adapter on several processes: DDP, or FSDP2 with --fsdp.

    torchrun --nproc_per_node 2 examples/distributed_causal_lm.py --out adapter/          # DDP
    torchrun --nproc_per_node 2 examples/distributed_causal_lm.py --fsdp --out adapter/   # FSDP2
    accelerate launch --multi_gpu --num_processes 2 examples/distributed_causal_lm.py --out adapter/
    python examples/distributed_causal_lm.py --out adapter/                               # one process

The adapted model is a plain nn.Module whose only trainable parameters are the adapters', so
DDP all-reduces adapter gradients and never the frozen base weights, and `fully_shard` shards
base and adapter tensors alike. Each rank trains on its slice of every global batch, so a run
follows what one process does on the whole batch. Rank 0 saves the adapter in PEFT's format.
Processes talk over NCCL on GPUs and gloo on CPUs. Without --model the base is a small randomly
initialised Llama and the data teaches it to count (token t+1 follows t): the loss falls within
a few steps.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import peftc

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", help="a local Hugging Face causal-LM folder (default: a small random Llama)")
parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2's fully_shard instead of DDP")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--batch", type=int, default=8, help="global batch: each rank takes batch / world size rows")
parser.add_argument("--seq", type=int, default=32)
parser.add_argument("--lr", type=float, default=1e-2)
parser.add_argument("--out", default="adapter")
args = parser.parse_args()

distributed = "RANK" in os.environ  # set by torchrun and accelerate launch
cuda = torch.cuda.is_available()
if distributed:
    dist.init_process_group("nccl" if cuda else "gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
if args.fsdp and not distributed:
    parser.error("--fsdp needs several processes: launch with torchrun or accelerate launch")
if args.batch % world:
    parser.error(f"--batch {args.batch} does not split over {world} processes")
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")

# every rank must start from the same weights (FSDP2 keeps each rank's own slice of them): same seed
torch.manual_seed(0)
if args.model:
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
else:
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
model.to(device).train()
vocab, rows = model.config.vocab_size, args.batch // world


def local_batch(step: int) -> torch.Tensor:
    """This rank's rows of the step's global batch: sequences counting up from a random start."""
    start = torch.randint(0, vocab, (args.batch, 1), generator=torch.Generator().manual_seed(step))
    ids = (start + torch.arange(args.seq)) % vocab
    return ids[rank * rows:(rank + 1) * rows].to(device)


config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"}
ids = local_batch(0)
# captured once, in train mode, for the (input_ids, labels) calls of the loop
am = peftc.apply(model, config, example_inputs={"input_ids": ids, "labels": ids})
if args.fsdp:
    fully_shard(am, mesh=init_device_mesh(device.type, (world,)))  # the root: the graph runs from it
    runner = am
elif distributed:
    runner = DistributedDataParallel(am, device_ids=[device.index] if cuda else None)
else:
    runner = am

optimizer = torch.optim.AdamW([p for _, p in am.adapter_parameters()], lr=args.lr)
for step in range(args.steps):
    ids = local_batch(step)
    loss = runner(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = loss.detach()
    if distributed:  # the global batch's loss: every rank has as many tokens
        dist.all_reduce(loss)
        loss /= world
    if rank == 0:
        print(f"step {step}: loss {loss.item():.4f}")

if args.fsdp:
    am.unshard()  # a collective: every rank gathers the full tensors, then rank 0 writes them
if rank == 0:
    am.save_adapter(args.out)
    print(f"saved the adapter to {args.out} (world size {world})")
if args.fsdp:
    am.reshard()
if distributed:
    dist.destroy_process_group()
