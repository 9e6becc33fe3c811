"""QLoRA on more than one process: FSDP2 and DDP over the 4-bit layers.

- ``make_fsdp2_shardable(model)`` turns every 4-bit layer's quantization state into frozen
  ``uint8`` parameters (Note [Quant state as bytes] in nn.py), so that FSDP2, which shards
  parameters and not buffers, shards the state with the packed weight and never casts it.
  Call it before anything applies ``fully_shard`` (accelerate and the HF Trainer do their own).
- ``fully_shard_model(model, ...)`` does that, then ``fully_shard`` on each decoder layer and
  on the root.
- ``wrap_ddp(model, ...)`` is DDP that never re-sends the frozen model after its construction.

Importing this module imports torch.distributed; ``import qlora_ext`` does not.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .nn import Linear4bit

__all__ = ["fully_shard_model", "make_fsdp2_shardable", "wrap_ddp"]


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def make_fsdp2_shardable(model: nn.Module) -> nn.Module:
    """Make every ``Linear4bit`` (and ``LoRALinear4bit``) in ``model`` shardable by FSDP2, in
    place, and return ``model``. Idempotent.

    Each layer's quantization state (absmax, nested absmax, code tables, nested offset) moves
    from buffers into frozen 1-D ``uint8`` parameters holding its raw bytes: FSDP2 then shards
    and gathers it with the packed weight, and its mixed-precision cast, which applies to
    floating-point parameters only, cannot reach it. The state_dict (bitsandbytes' keys) is
    unchanged. Must run before ``fully_shard`` reaches a 4-bit layer.
    """
    _check_model(model)
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit):
            m._layer_name = name or type(model).__name__
            m._state_to_parameters_()
    return model


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: transformers' ``_no_split_modules`` classes
    (the decoder layers), else the entries of any ``nn.ModuleList`` that hold a 4-bit layer.
    Outermost only: a block inside another is sharded with it."""
    classes = set()
    for m in model.modules():
        classes.update(getattr(m, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if m is not model and type(m).__name__ in classes]
    if not found:
        found = [
            child
            for m in model.modules()
            if isinstance(m, nn.ModuleList)
            for child in m
            if any(isinstance(x, Linear4bit) for x in child.modules())
        ]
    inner = {id(d) for m in found for d in m.modules() if d is not m}
    return [m for m in found if id(m) not in inner]


def fully_shard_model(
    model: nn.Module,
    *,
    mp_policy=None,
    mesh=None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """``make_fsdp2_shardable(model)``, then FSDP2's ``fully_shard`` on each decoder layer and
    on ``model`` itself (which takes the embeddings, final norm and output layer). Returns
    ``model`` (now an FSDP module).

    ``mp_policy`` is a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (None: FSDP2's default,
    no casting); e.g. ``MixedPrecisionPolicy(param_dtype=torch.bfloat16,
    reduce_dtype=torch.float32)`` on GPUs. It casts the adapters and the unquantized
    parameters; the 4-bit weights and their state are bytes and stay bytes. ``mesh`` and
    ``reshard_after_forward`` are passed to ``fully_shard``.
    """
    _check_model(model)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mp_policy is None:
        mp_policy = MixedPrecisionPolicy()
    elif not isinstance(mp_policy, MixedPrecisionPolicy):
        raise TypeError(
            "mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy or None, got "
            f"{type(mp_policy).__name__}"
        )
    make_fsdp2_shardable(model)
    kwargs = dict(mp_policy=mp_policy, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for layer in _decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _buffer_sync_flag() -> str:
    # forward_sync_buffers from torch 2.14 on; broadcast_buffers before.
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"


def wrap_ddp(model: nn.Module, **ddp_kwargs) -> torch.nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(model, **ddp_kwargs)`` that never re-sends the frozen model.

    DDP all-reduces the gradients of parameters that require them, the adapters only here.
    Its construction broadcasts rank 0's parameters and buffers once; after that, by default,
    it would broadcast every buffer again before each forward, which is the whole quantization
    state of a model whose state is in buffers. So buffer syncing is off
    (``forward_sync_buffers=False``, ``broadcast_buffers=False`` before torch 2.14): every
    buffer of a QLoRA model is frozen, so the copies cannot drift apart. Passing either flag
    as True is refused.
    """
    _check_model(model)
    for flag in ("forward_sync_buffers", "broadcast_buffers"):
        if ddp_kwargs.get(flag, False):
            raise ValueError(
                f"{flag}=True would re-send the frozen quantization state before every "
                "forward; wrap_ddp keeps it off (every buffer of a QLoRA model is frozen)"
            )
        ddp_kwargs.pop(flag, None)
    ddp_kwargs[_buffer_sync_flag()] = False
    return torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
