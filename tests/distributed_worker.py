"""One rank of a QLoRA training run on torch.distributed, launched by tests/test_distributed.py
through torchrun (gloo on the CPU): a tiny Llama made with prepare_model, trained for a few
optimizer steps (AdamW, then SGD with momentum) on its rank's share of a fixed global batch,
under FSDP2 (fully_shard on every decoder layer, then on the root), DDP, or nothing (the
1-process reference).

Rank 0 writes the mean loss of every step of both runs, the SGD run's adapter weights and
frozen 4-bit weights (gathered in full) and what every rank held of the latter, to --out
(safetensors + JSON).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_llama import tiny_llama, tokens  # noqa: E402

import qlora_ext  # noqa: E402

GLOBAL_BATCH = 4


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t  # an FSDP2 DTensor holds one shard
    return t.numel() * t.element_size()


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def train(strategy: str, optim: str, steps: int, rank: int, world: int):
    torch.manual_seed(0)
    model = tiny_llama(seed=0, layers=2)
    # No dropout: its masks would differ between one process and two.
    qlora_ext.prepare_model(
        model, r=8, alpha=16, dropout=0.0, compute_dtype=torch.float32,
        gradient_checkpointing=False,
    )  # fmt: skip
    model.train()
    ids = tokens(batch=GLOBAL_BATCH, seq=16, seed=1).chunk(world)[rank]
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        net = model
    elif strategy == "ddp":
        # The quantization state is in buffers: syncing them before every forward would send
        # the frozen model's state each step, so only the set-up broadcast happens (the option
        # is forward_sync_buffers from torch 2.14 on, broadcast_buffers before).
        DDP = torch.nn.parallel.DistributedDataParallel
        new = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
        net = DDP(model, **{"forward_sync_buffers" if new else "broadcast_buffers": False})
    else:
        net = model
    trainable = [p for p in net.parameters() if p.requires_grad]
    if optim == "adamw":
        opt = torch.optim.AdamW(trainable, lr=1e-2)
    else:
        opt = torch.optim.SGD(trainable, lr=0.5, momentum=0.9)
    losses = []
    for _ in range(steps):
        # Every rank has the same number of tokens, so the mean of the rank means is the
        # global batch's mean, and the averaged gradients are the global batch's gradient.
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    return losses, model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", choices=["fsdp", "ddp", "none"], required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    summary: dict = dict(world=world)
    for optim in ("adamw", "sgd"):
        losses, model = train(args.strategy, optim, args.steps, rank, world)
        summary[f"losses_{optim}"] = losses
    # What the last (SGD) run ends with: its adapters, and the frozen weights it holds.
    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    frozen = {n: local_bytes(p) for n, p in params.items() if p.dtype == torch.uint8}
    frozen_bytes = torch.tensor([sum(frozen.values())], dtype=torch.int64)
    per_rank = [torch.zeros_like(frozen_bytes) for _ in range(world)]
    dist.all_gather(per_rank, frozen_bytes)
    adapters = {n: full(params[n]) for n in names}
    packed = {f"packed.{n}": full(params[n]) for n in frozen}
    if rank == 0:
        from safetensors.torch import save_file

        out = Path(args.out)
        save_file({**adapters, **packed}, str(out.with_suffix(".safetensors")))
        summary.update(
            trainable=names,
            frozen_bytes_per_rank=[int(b) for b in per_rank],
            frozen_bytes_total=sum(p.numel() for p in packed.values()),
        )
        out.write_text(json.dumps(summary))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
