"""One rank of a QLoRA training run on torch.distributed, launched by tests/test_distributed.py
through torchrun (gloo on the CPU): a tiny Llama made with prepare_model, trained for a few
optimizer steps (AdamW, then SGD with momentum) on its rank's share of a fixed global batch,
under FSDP2 (qlora_ext.distributed.fully_shard_model), DDP (wrap_ddp), or nothing (the
1-process reference). The FSDP2 launch and the 1-process one also train under FSDP2 with the
bf16 mixed-precision policy (at 1 process, FSDP2 over one rank: the same compute dtype), and
the FSDP2 launch runs the checks of tests/distributed_checks.py (errors, single sharded layers,
the transformers loading path).

Rank 0 writes the mean loss of every step, what the state watch found at every step, what DDP
sent, the frozen bytes each rank held, and the checks' results to --out (JSON), and the SGD
run's adapter weights and gathered frozen 4-bit weights and state to its .safetensors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from distributed_checks import (  # noqa: E402
    CommRecorder,
    StateWatch,
    all_ranks,
    error_checks,
    frozen_bytes,
    hf_path_check,
    layer_sharding_checks,
    storage_ptrs,
)
from tiny_llama import tiny_llama, tokens  # noqa: E402

import qlora_ext  # noqa: E402
from qlora_ext.distributed import fully_shard_model, wrap_ddp  # noqa: E402
from qlora_ext.nn import Linear4bit  # noqa: E402

GLOBAL_BATCH = 4


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def full_frozen(model) -> dict[str, torch.Tensor]:
    """Every 4-bit layer's packed weight and state, gathered and viewed as the kernels read
    them (Note [Quant state as bytes]), so both layouts compare."""
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, Linear4bit):
            continue
        layout = m._state_layout or {}
        for k in ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map"):
            t = getattr(m, k)
            if t is not None:
                t = full(t)
                if k in layout:
                    t = t.view(layout[k][0]).view(layout[k][1])
                out[f"frozen.{name}.{k}"] = t
    return out


def train(strategy: str, optim: str, steps: int, rank: int, world: int, mp: bool = False):
    torch.manual_seed(0)
    model = tiny_llama(seed=0, layers=2)
    # No dropout: its masks would differ between one process and two.
    qlora_ext.prepare_model(
        model, r=8, alpha=16, dropout=0.0,
        compute_dtype=torch.bfloat16 if mp else torch.float32, gradient_checkpointing=False,
    )  # fmt: skip
    model.train()
    watch = StateWatch(model)  # before any wrapping: the bytes one process computes with
    ids = tokens(batch=GLOBAL_BATCH, seq=16, seed=1).chunk(world)[rank]
    recorder = None
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = None
        if mp:  # the GPU policy: bf16 compute, fp32 gradient reduction
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        net = fully_shard_model(model, mp_policy=policy)
    elif strategy == "ddp":
        net = wrap_ddp(model)
        recorder = CommRecorder(net, model, storage_ptrs(model))  # from here on
    else:
        net = model
    trainable = [p for p in net.parameters() if p.requires_grad]
    if optim == "adamw":
        opt = torch.optim.AdamW(trainable, lr=1e-2)
    else:
        opt = torch.optim.SGD(trainable, lr=0.5, momentum=0.9)
    losses, checked = [], []
    for _ in range(steps):
        before = watch.checked
        # Every rank has the same number of tokens, so the mean of the rank means is the
        # global batch's mean, and the averaged gradients are the global batch's gradient.
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
        checked.append(watch.checked - before)
    run = dict(losses=losses, state_checked=checked, state_mismatches=watch.mismatches)
    if recorder is not None:
        recorder.undo()
        run.update(
            ddp_bucket_params=sorted(set(recorder.bucket_params)),
            ddp_bucket_numel=recorder.bucket_numel,
            ddp_frozen_sent=recorder.frozen_sent,
            ddp_calls=recorder.calls,
        )
    return run, model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", choices=["fsdp", "ddp", "none"], required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--hf-dir", help="a tiny save_pretrained checkpoint (FSDP2 launches)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    summary: dict = dict(world=world, runs={})
    for optim in ("adamw", "sgd"):
        run, model = train(args.strategy, optim, args.steps, rank, world)
        summary["runs"][optim] = run
    # What the last (SGD) run ends with: its adapters, and the frozen weights it holds.
    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    local, total = frozen_bytes(model)
    summary.update(
        trainable=names,
        frozen_bytes_per_rank=all_ranks(local),
        frozen_bytes_total=total,
        lora_numel_per_rank=all_ranks(sum(params[n].to_local().numel() for n in names))
        if args.strategy == "fsdp"
        else None,
        lora_numel_total=sum(params[n].numel() for n in names),
    )
    tensors = {**{n: full(params[n]) for n in names}, **full_frozen(model)}
    if args.strategy in ("fsdp", "none"):
        # bf16 under FSDP2: at 1 process, FSDP2 over a single rank is the reference.
        run, bf16_model = train("fsdp", "sgd", args.steps, rank, world, mp=True)
        summary["runs"]["sgd_bf16"] = run
        tensors.update({f"bf16.{k}": v for k, v in full_frozen(bf16_model).items()})
    if args.strategy == "fsdp":
        summary["errors"] = error_checks(rank, world)
        summary["single_layers"] = layer_sharding_checks(world)
        if args.hf_dir:
            summary["hf"] = hf_path_check(args.hf_dir, rank, world)
    if rank == 0:
        from safetensors.torch import save_file

        out = Path(args.out)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out.with_suffix(".st")))
        out.write_text(json.dumps(summary))
        print("frozen 4-bit bytes per rank:", summary["frozen_bytes_per_rank"], "of", total)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
