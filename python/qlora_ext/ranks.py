"""Rank-aware plumbing of ``qlora-ext finetune`` on several processes.

    torchrun --nproc-per-node 2 -- $(which qlora-ext) finetune --strategy fsdp ...

``setup`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR) and starts
the process group: gloo on the CPU, NCCL on the GPU, where rank r takes ``cuda:LOCAL_RANK``.
``wrap`` puts the prepared model under FSDP2 or DDP. The rest turns what train.py and
checkpoint.py do on one process into the same thing on N:

- the data: each global micro-batch is ``--batch-size`` x N examples drawn in one process's
  order, and rank r trains on the r-th slice of it (``rank_slice``);
- the loss (Note [The global-mean loss]);
- checkpoints: every rank takes part in gathering the FSDP shards into full tensors
  (``full_tensors``), and rank 0 alone writes them, so a checkpoint is the same files whatever
  the number of processes; loading gives each rank its shard back (``shard_like``).

Note [The global-mean loss]: one process minimises, per micro-batch, the mean cross-entropy over
its response tokens. On N ranks each rank holds a different number of those tokens, so the mean
of the N rank means is not that mean. Each rank instead takes the sum of its token losses over
the token count of the whole global micro-batch (which every rank knows: each has the whole
data plan), so the N parts add up to the one-process loss exactly. FSDP and DDP average the
gradients over the ranks, so the part is multiplied by N before the backward; the average is
then the gradient of the one-process loss, up to the order of the fp32 sums.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn

STRATEGIES = ("none", "fsdp", "ddp")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank 0 of 1 without torchrun."""

    rank: int = 0
    world: int = 1
    strategy: str = "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.strategy != "none"


def launched_world() -> int | None:
    """WORLD_SIZE when torchrun (or another launcher that sets its variables) started us."""
    if not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return None
    return int(os.environ["WORLD_SIZE"])


def setup(strategy: str, device: str | None) -> tuple[Ranks, str]:
    """(this process's Ranks, its device), starting the process group for fsdp and ddp.
    Raises ValueError, naming --strategy or --device, where the launch and the options
    disagree."""
    import torch.distributed as dist

    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    world = launched_world()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if strategy == "none":
        if world is not None and world > 1:
            raise ValueError(
                f"this is one of {world} processes (torchrun) but --strategy is none, so each "
                "would train on its own: pass --strategy fsdp or --strategy ddp"
            )
        return Ranks(), device
    if world is None and not dist.is_initialized():
        raise ValueError(
            f"--strategy {strategy} needs a process group, and RANK, WORLD_SIZE, MASTER_ADDR "
            "and MASTER_PORT are not set: launch with torchrun --nproc-per-node N "
            f"-- $(which qlora-ext) finetune --strategy {strategy} ..."
        )
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if device != "cuda":
            raise ValueError(
                f"--device {device} would put every rank on one GPU: pass --device cuda, and "
                "rank r takes cuda:LOCAL_RANK"
            )
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    elif device != "cpu":
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), strategy), device


def teardown(ranks: Ranks, clean: bool) -> None:
    """Ends the process group. After an error on this rank there is no barrier: the other
    ranks may be inside a collective it would be mistaken for (torchrun stops them)."""
    import torch.distributed as dist

    if ranks.distributed and dist.is_initialized():
        if clean:
            dist.barrier()  # no rank leaves while rank 0 still writes the run's files
        dist.destroy_process_group()


def wrap(model: nn.Module, ranks: Ranks) -> nn.Module:
    """The module to train: FSDP2 (qlora_ext.distributed.fully_shard_model: each decoder layer,
    then the root, sharded in place, so the returned module is ``model``), DDP (a wrapper around
    ``model``) or ``model`` itself. Evaluation and saving use ``model``."""
    if ranks.strategy == "fsdp":
        from torch.distributed.fsdp import register_fsdp_forward_method

        from .distributed import fully_shard_model

        fully_shard_model(model)
        # generate() is not forward: without this, a PEFT model's generate reaches the base
        # model around the root's hooks, and the root's own shards (embeddings, output layer)
        # are never gathered for it.
        register_fsdp_forward_method(model, "generate")
        return model
    if ranks.strategy == "ddp":
        from .distributed import wrap_ddp

        return wrap_ddp(model)
    return model


def rank_slice(idx: list[int], ranks: Ranks) -> list[int]:
    """This rank's examples of one global micro-batch: the r-th of N equal slices."""
    n = len(idx) // ranks.world
    return idx[ranks.rank * n : (ranks.rank + 1) * n]


def loss_tokens(rows) -> int:
    """The response tokens a micro-batch takes the loss on (each label predicts from the token
    before it, so a row's first label never counts)."""
    return sum(sum(lab != -100 for lab in r.labels[1:]) for r in rows)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The summed next-token cross-entropy over the labelled positions, in fp32."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def all_sum(values: list[float], ranks: Ranks, device: str) -> list[float]:
    """The element-wise sum of ``values`` over the ranks (one collective)."""
    if not ranks.distributed:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def frozen_4bit_bytes(model: nn.Module, ranks: Ranks, device: str) -> tuple[list[int], int]:
    """(the bytes of 4-bit weights and quantization state each rank holds, those of the whole
    model): under FSDP2 each rank's share, about 1/N of the whole; under DDP the whole."""
    from .nn import _STATE_BUFFERS, Linear4bit

    local = total = 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            for t in [m.weight] + [getattr(m, n) for n in _STATE_BUFFERS]:
                if t is not None:
                    shard = t.to_local() if _is_dtensor(t) else t
                    local += shard.numel() * shard.element_size()
                    total += t.numel() * t.element_size()  # a DTensor's numel is the whole
    one_hot = [0.0] * ranks.world
    one_hot[ranks.rank] = float(local)
    return [int(b) for b in all_sum(one_hot, ranks, device)], total


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensors(obj):
    """``obj`` (a state_dict: tensors in dicts, lists and tuples) with every DTensor replaced by
    the full tensor its shards make up. Collective: every rank must call it on the same
    structure, in the same order."""
    if isinstance(obj, torch.Tensor):
        return obj.full_tensor() if _is_dtensor(obj) else obj
    if isinstance(obj, dict):
        return {k: full_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_tensors(v) for v in obj)
    return obj


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``param``: this rank's shard when ``param`` is a DTensor (every
    rank read the same checkpoint, so no data moves between them), else ``full`` itself."""
    if not _is_dtensor(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    full = full.to(device=param.device, dtype=param.dtype)
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)


def shard_optimizer_state(state: dict, opt) -> dict:
    """A full-tensor optimizer ``state_dict`` (from a checkpoint) with each per-parameter
    tensor shaped like its DTensor parameter sharded like it, for ``load_state_dict``."""
    params = [p for g in opt.param_groups for p in g["params"]]
    out = dict(state)
    out["state"] = {
        i: {
            k: shard_like(v, params[i])
            if isinstance(v, torch.Tensor) and v.shape == params[i].shape
            else v
            for k, v in s.items()
        }
        for i, s in state["state"].items()
    }
    return out


@contextlib.contextmanager
def full_trainable(model: nn.Module):
    """Inside, every trainable DTensor parameter of ``model`` is its full tensor (a plain
    Parameter), so code written for one process (adapters.save_adapter) reads whole adapters;
    the sharded parameters are back on exit. Collective, as ``full_tensors``."""
    swapped = []
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.requires_grad and _is_dtensor(p):
                mod._parameters[name] = nn.Parameter(p.full_tensor(), requires_grad=False)
                swapped.append((mod, name, p))
    try:
        yield model
    finally:
        for mod, name, p in swapped:
            mod._parameters[name] = p


def gather_rng(ranks: Ranks, device: str) -> list[dict[str, torch.Tensor]]:
    """Every rank's torch RNG states (CPU, and this rank's GPU), rank 0's first (collective)."""
    mine = {"torch": torch.get_rng_state()}
    if device.startswith("cuda"):
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if not ranks.distributed:
        return [mine]
    import torch.distributed as dist

    got: list = [None] * ranks.world
    dist.all_gather_object(got, mine)
    return got
