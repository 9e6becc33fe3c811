"""Training checkpoints of ``qlora-ext finetune``: safetensors and JSON only, formats that hold
data and never code, so loading a checkpoint folder from anyone cannot run anything.

A checkpoint is a directory ``checkpoints/step_NNNNNN`` holding

- ``tensors.safetensors``: the trainable parameters (``trainable/<name>``), every tensor of the
  optimizer and scheduler state (``state/<n>``) and the torch RNG states (``rng/...``);
- ``state.json``: the step, the loss history, the pre-training evaluation, and the optimizer
  and scheduler ``state_dict``s with each tensor replaced by a reference into the safetensors
  file (Note [Checkpoint encoding]); Python's and numpy's RNG states as plain numbers; the
  number of processes that trained it (``world_size``);
- ``COMPLETE``: written last. The directory is assembled under a temporary name and renamed,
  so a kill never leaves a half checkpoint that looks complete.

On N processes (ranks.py) every tensor is gathered in full first and rank 0 alone writes, so
the files are those one process would write, plus each rank's torch RNG states
(``rng/rank<r>/...``). Resuming needs the same N: the data order (the global micro-batch is
``--batch-size`` x N) and each rank's dropout RNG stream depend on it, so another N is refused
(WorldSizeMismatch) rather than continued as a different run.

Note [Checkpoint encoding]: ``state_dict``s hold tensors, tuples and dicts with int keys, none of
which JSON has. A tensor becomes ``{"__tensor__": key}``, a tuple ``{"__tuple__": [...]}`` and a
dict with any non-string key ``{"__items__": [[key, value], ...]}``; decoding restores each
exactly, so ``load_state_dict`` gets back what ``state_dict`` gave.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

STATE_NAME = "state.json"
TENSORS_NAME = "tensors.safetensors"
FORMAT = "qlora_ext-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, or does not match the run."""


class WorldSizeMismatch(ValueError):
    """A sound checkpoint written by another number of processes than this run's: not a
    corrupt one to skip, so --resume stops on it."""


def _encode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        key = f"state/{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint: {obj!r}")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__items__"}:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _rng_state(tensors: dict[str, torch.Tensor], ranks, device: str) -> dict:
    from .ranks import gather_rng

    per_rank = gather_rng(ranks, device)  # collective: before any rank may return
    if ranks.distributed:
        for r, states in enumerate(per_rank):
            for k, v in states.items():
                tensors[f"rng/rank{r}/{k}"] = v
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }


def _set_rng_state(st: dict, tensors: dict[str, torch.Tensor], ranks, device: str) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    if st["cuda_devices"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"rng/cuda/{i}"] for i in range(st["cuda_devices"])])
    if ranks.distributed:  # this rank's own streams
        torch.set_rng_state(tensors[f"rng/rank{ranks.rank}/torch"])
        if f"rng/rank{ranks.rank}/cuda" in tensors and device.startswith("cuda"):
            torch.cuda.set_rng_state(tensors[f"rng/rank{ranks.rank}/cuda"], device)
    version, mt, gauss = st["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    out: Path,
    step: int,
    model,
    opt,
    sched,
    history: dict,
    keep: int = 2,
    before=None,
    ranks=None,
    device: str = "cpu",
) -> Path:
    """Writes checkpoints/step_NNNNNN (see the module docstring), keeping the newest ``keep``.
    A write that fails (a full disk, say) removes its temporary directory and leaves every
    earlier checkpoint as it was. With ``ranks`` (ranks.Ranks) of a distributed run, every
    rank must call it: all take part in gathering, rank 0 writes."""
    from safetensors.torch import save_file

    from .ranks import Ranks, full_tensors

    ranks = ranks or Ranks()
    ckdir = out / "checkpoints"
    final = ckdir / f"step_{step:06d}"
    tensors: dict[str, torch.Tensor] = {}
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for n, t in full_tensors(trainable).items():
        tensors[f"trainable/{n}"] = t.cpu().contiguous().clone()
    state = {
        "format": FORMAT,
        "step": step,
        "world_size": ranks.world,
        "optimizer": _encode(full_tensors(opt.state_dict()), tensors),
        "scheduler": _encode(sched.state_dict(), tensors),
        "rng": _rng_state(tensors, ranks, device),
        "history": history,
        "before": before,  # the pre-training eval, which a resumed run cannot redo
    }
    if not ranks.main:
        return final
    ckdir.mkdir(parents=True, exist_ok=True)
    tmp = ckdir / f".tmp_step_{step:06d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(tensors, str(tmp / TENSORS_NAME))
        (tmp / STATE_NAME).write_text(json.dumps(state))
        (tmp / "COMPLETE").write_text(str(step))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(ckdir.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(out: Path) -> list[Path]:
    """The finished checkpoints under out/checkpoints, oldest first."""
    return [p for p in sorted((out / "checkpoints").glob("step_*")) if (p / "COMPLETE").exists()]


def latest_checkpoint(out: Path) -> Path | None:
    done = complete_checkpoints(out)
    return done[-1] if done else None


def load_checkpoint(
    path: Path, model, opt, sched, ranks=None, device: str = "cpu"
) -> tuple[int, dict, dict | None]:
    """Restores the trainable parameters, optimizer, scheduler and RNG states saved at
    ``path``; returns (step, history, pre-training eval). Raises CheckpointError, naming the
    file and the problem, for a checkpoint that is incomplete, corrupt or from another run, and
    WorldSizeMismatch for one written by another number of processes. With ``ranks`` of a
    distributed run, every rank loads it and keeps its own shards and RNG streams."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .ranks import Ranks, shard_like, shard_optimizer_state

    ranks = ranks or Ranks()

    state_path, tensors_path = path / STATE_NAME, path / TENSORS_NAME
    for f in (state_path, tensors_path):
        if not f.is_file():
            legacy = (
                " (a checkpoint of an older qlora_ext, which is not read)"
                if (path / "state.pt").exists()
                else ""
            )
            raise CheckpointError(f"{f}: missing{legacy}")
    try:
        state = json.loads(state_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{state_path}: not valid JSON ({e})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{state_path}: not a {FORMAT} file")
    saved_world = state.get("world_size", 1)  # older checkpoints: one process
    if saved_world != ranks.world:
        raise WorldSizeMismatch(
            f"--resume: {path} was written by {saved_world} process(es) and this run has "
            f"{ranks.world}: resume with torchrun --nproc-per-node {saved_world} (or without "
            "torchrun for 1), since the data order and the dropout RNG streams depend on it"
        )
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{tensors_path}: unreadable ({e})") from e
    params = dict(model.named_parameters())
    saved = {k[len("trainable/") :]: t for k, t in tensors.items() if k.startswith("trainable/")}
    wanted = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != wanted:
        diff = sorted(set(saved) ^ wanted)[:3]
        raise CheckpointError(f"{tensors_path}: does not match the model's adapters ({diff} ...)")
    for n, t in saved.items():
        if t.shape != params[n].shape or t.dtype != params[n].dtype:
            raise CheckpointError(
                f"{tensors_path}: {n} is {t.dtype} {tuple(t.shape)}, the model has "
                f"{params[n].dtype} {tuple(params[n].shape)}"
            )
    try:
        opt_state = _decode(state["optimizer"], tensors)
        sched_state = _decode(state["scheduler"], tensors)
        step, history, before, rng = (
            int(state["step"]),
            state["history"],
            state.get("before"),
            state["rng"],
        )
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(shard_like(t, params[n]))
        opt.load_state_dict(shard_optimizer_state(opt_state, opt))
        sched.load_state_dict(sched_state)
        _set_rng_state(rng, tensors, ranks, device)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: inconsistent checkpoint ({type(e).__name__}: {e})") from e
    return step, history, before


def resume(
    out: Path, model, opt, sched, log, ranks=None, device: str = "cpu"
) -> tuple[Path, int, dict, dict | None] | None:
    """Loads the newest checkpoint under ``out`` that loads cleanly, warning about each newer
    one that does not; None when there is none at all."""
    done = complete_checkpoints(out)
    for path in reversed(done):
        try:
            return (path, *load_checkpoint(path, model, opt, sched, ranks, device))
        except CheckpointError as e:
            warnings.warn(f"--resume: skipping a corrupt checkpoint: {e}", stacklevel=2)
            log(f"warning: --resume: skipping a corrupt checkpoint: {e}")
    if done:
        raise CheckpointError(
            f"--resume: none of the {len(done)} checkpoints in {out / 'checkpoints'} loads "
            "(see the warnings above)"
        )
    return None
