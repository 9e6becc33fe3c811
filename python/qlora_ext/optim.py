"""Paged AdamW optimizers: fused 32-bit and 8-bit blockwise AdamW steps with optimizer states in
CUDA managed memory.

Policy (Note [Paging policy]):

- A state tensor of at least ``min_paged_numel`` elements (100k, bitsandbytes' threshold) is
  allocated with ``cudaMallocManaged`` when its parameter is on a GPU; smaller ones (scalars,
  8-bit absmax vectors) are ordinary tensors. On the CPU, or in a build without CUDA, the
  "paged" tensors are ordinary host memory and the same code runs.
- Before a parameter's update its paged states are prefetched to the GPU on the current stream;
  with ``page_out=True`` they are prefetched back to the host right after, so between steps the
  states hold no GPU memory (at the cost of two PCIe transfers per step). Without it the driver
  migrates pages only when the GPU runs out of memory.
- A managed allocation is refused when the managed bytes this process already holds on that GPU
  plus the request exceed its free memory minus ``margin_bytes`` (Note [Managed-memory budget]
  in cpp/managed_budget.h): asking for more than the GPU has free can hang it.

The maths is torch.optim.AdamW's (decoupled weight decay, bias correction; Note [AdamW order] in
cpp/optim_math.h). A parameter whose gradient has a NaN/Inf is skipped whole: parameter and
states stay untouched and its step counter does not advance. ``step()`` logs the skipped tensors
and keeps the counts in ``skipped_last_step`` / ``nonfinite_last_step`` / ``skipped_total``.
"""

from __future__ import annotations

import logging
import math

import torch

from . import _C
from .functional import dynamic_map

__all__ = ["PagedAdamW", "PagedAdamW8bit", "dynamic_map"]

_log = logging.getLogger(__name__)
_OPS = torch.ops.qlora_ext
_BLOCK = 256  # 8-bit state quantization block (kOptimBlock in cpp/optim_math.h)

# torch.optim.AdamW options we do not implement; their "off" value is accepted so code written
# for torch's optimizer runs unchanged.
_TORCH_OFF = {
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": None,
}
_GROUP_KEYS = {"params", "lr", "betas", "eps", "weight_decay", "amsgrad"}


def _real(v, key: str, name: str) -> float:
    """A hyperparameter as a float; a string or another object is refused by its key."""
    if isinstance(v, (str, bytes)) or (torch.is_tensor(v) and v.numel() != 1):
        raise TypeError(f"{name}: {key} must be a number, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: {key} must be a number, got {type(v).__name__}") from None


_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _step_error(opt, e: Exception, group_index: int, group: dict) -> Exception:
    """e, naming the parameter it is about by its place in params (the ops call it param)."""
    name = type(opt).__name__
    for i, p in enumerate(group["params"]):
        if p.grad is None:
            continue
        if p.dtype not in _PARAM_DTYPES:
            return TypeError(
                f"{name}.step: params[{i}] of param group {group_index} is {p.dtype}; the "
                "fused AdamW updates float32, float16 and bfloat16 parameters"
            )
        if p.grad.dtype != p.dtype or p.grad.shape != p.shape:
            return TypeError(
                f"{name}.step: params[{i}] of param group {group_index} is {p.dtype} "
                f"{list(p.shape)} but its grad is {p.grad.dtype} {list(p.grad.shape)}"
            )
    return type(e)(f"{name}.step: params of param group {group_index}: {e}")


def _cpu_copy(v):
    return v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v


class _PagedAdamWBase(torch.optim.Optimizer):
    # state key -> dtype; shapes come from _state_shapes
    _STATE: dict[str, torch.dtype] = {}

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        page_out: bool = False,
        min_paged_numel: int = 100_000,
        margin_bytes: int = 256 << 20,
        **options,
    ):
        name = type(self).__name__
        for key, value in options.items():
            if key not in _TORCH_OFF:
                raise TypeError(f"{name}: unknown option '{key}'")
            if value != _TORCH_OFF[key]:
                raise ValueError(f"{name}: option {key}={value!r} is not supported")
        if amsgrad:
            raise ValueError(f"{name}: amsgrad=True is not supported")
        if min_paged_numel < 1:
            raise ValueError(f"{name}: min_paged_numel must be >= 1, got {min_paged_numel}")
        if margin_bytes < 0:
            raise ValueError(f"{name}: margin_bytes must be >= 0, got {margin_bytes}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        self._check_hparams(defaults, name)
        self.page_out = bool(page_out)
        self.min_paged_numel = int(min_paged_numel)
        self.margin_bytes = int(margin_bytes)
        self.skipped_last_step = 0  # parameter tensors skipped by the last step()
        self.nonfinite_last_step = 0  # their non-finite gradient elements
        self.skipped_total = 0
        self._codes: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        super().__init__(params, defaults)

    # ---- options ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        name = type(self).__name__
        unknown = set(param_group) - _GROUP_KEYS
        if unknown:
            raise ValueError(f"{name}: param group option(s) {sorted(unknown)} are not supported")
        if param_group.get("amsgrad", False):
            raise ValueError(f"{name}: amsgrad=True is not supported")
        self._check_hparams(param_group, name)
        super().add_param_group(param_group)

    @staticmethod
    def _check_hparams(group: dict, name: str) -> None:
        lr = _real(group.get("lr", 0.0), "lr", name)
        betas = group.get("betas", (0.9, 0.999))
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{name}: betas must be a pair (beta1, beta2), got {betas!r}")
        b1, b2 = (_real(b, "betas", name) for b in betas)
        eps = _real(group.get("eps", 1e-8), "eps", name)
        wd = _real(group.get("weight_decay", 0.0), "weight_decay", name)
        if not lr >= 0.0:
            raise ValueError(f"{name}: lr must be >= 0, got {lr}")
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"{name}: betas must be in [0, 1), got {(b1, b2)}")
        if not eps > 0.0:
            raise ValueError(f"{name}: eps must be > 0, got {eps}")
        if not wd >= 0.0:
            raise ValueError(f"{name}: weight_decay must be >= 0, got {wd}")

    # ---- state -----------------------------------------------------------------------------
    def _state_shapes(self, p: torch.Tensor) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def _alloc(self, p: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if math.prod(shape) >= self.min_paged_numel:
            like = torch.empty(0, dtype=dtype, device=p.device)
            return _C.paged_empty(list(shape), like, self.margin_bytes).zero_()
        return torch.zeros(shape, dtype=dtype, device=p.device)

    def _init_state(self, p: torch.Tensor) -> dict:
        st = {"step": 0}
        for key, shape in self._state_shapes(p).items():
            st[key] = self._alloc(p, shape, self._STATE[key])
        return st

    def _prefetch(self, st: dict, to_device: bool) -> None:
        for key in self._STATE:
            t = st[key]
            if t.is_cuda and t.numel() >= self.min_paged_numel:
                _C.paged_prefetch(t, to_device)

    # ---- step ------------------------------------------------------------------------------
    def _update(self, p, grad, st, step, lr, beta1, beta2, eps, wd) -> torch.Tensor:
        raise NotImplementedError

    # Optional: one op call for a list of (param, state) on the CPU, returning their counts.
    _update_many = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        done = []
        for gi, group in enumerate(self.param_groups):
            try:
                self._step_group(group, done)
            except (RuntimeError, TypeError, ValueError) as e:  # Note [Public argument names]
                raise _step_error(self, e, gi, group) from None
        self._count(done)
        return loss

    def _step_group(self, group: dict, done: list) -> None:
        lr = float(group["lr"])
        beta1, beta2 = (float(b) for b in group["betas"])
        eps, wd = float(group["eps"]), float(group["weight_decay"])
        batch = []  # CPU tensors for one multi-tensor call (_update_many)
        strided = []  # (parameter, the contiguous copy the op updates in its place)
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            st = self.state[p]
            if not st:
                st.update(self._init_state(p))
            # The ops update a dense buffer in place; a strided parameter (a transposed view,
            # say) is updated through a contiguous copy, written back after its update.
            q = p if p.is_contiguous() else p.contiguous()
            if q is not p:
                q.grad = p.grad
                strided.append((p, q))
            if p.device.type == "cpu" and self._update_many is not None:
                batch.append((q, st))  # nothing to page on the CPU
                continue
            self._prefetch(st, True)
            skipped = self._update(q, p.grad, st, st["step"] + 1, lr, beta1, beta2, eps, wd)
            if self.page_out:
                self._prefetch(st, False)
            done.append((st, skipped))
        if batch:
            counts = self._update_many(batch, lr, beta1, beta2, eps, wd)
            done.extend((st, c) for (_, st), c in zip(batch, counts, strict=True))
        for p, q in strided:
            q.grad = None
            p.copy_(q)

    def _count(self, done: list) -> None:
        # One host read per tensor (a sync on the GPU, once per step): a skipped tensor's step
        # counter must not advance, or its bias correction would be off from then on.
        counts = [int(s) for _, s in done]
        for (st, _), c in zip(done, counts, strict=True):
            if c == 0:
                st["step"] += 1
        self.skipped_last_step = sum(1 for c in counts if c)
        self.nonfinite_last_step = sum(counts)
        self.skipped_total += self.skipped_last_step
        if self.skipped_last_step:
            _log.warning(
                "%s: skipped %d parameter tensor(s) with %d non-finite gradient value(s)",
                type(self).__name__,
                self.skipped_last_step,
                self.nonfinite_last_step,
            )

    # ---- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Like torch's, with every state tensor an independent CPU copy (loads without CUDA)."""
        sd = super().state_dict()
        sd["state"] = {k: {n: _cpu_copy(v) for n, v in s.items()} for k, s in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        name = type(self).__name__
        for g in state_dict["param_groups"]:
            if g.get("amsgrad", False):
                raise ValueError(f"{name}: the state_dict has amsgrad=True, which is not supported")
        saved_groups = state_dict["param_groups"]
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in saved_groups for i in g["params"]]
        by_id = dict(zip(ids, params, strict=True))
        new_state = {}
        for k, saved in state_dict["state"].items():
            if k not in by_id:
                raise ValueError(f"{name}: state_dict['state'] has key {k!r} with no parameter")
            p = by_id[k]
            new_state[p] = self._restore(p, saved, f"state_dict['state'][{k!r}]")
        for p, st in new_state.items():
            self.state[p] = st

    def _restore(self, p: torch.Tensor, saved: dict, where: str) -> dict:
        name = type(self).__name__
        shapes = self._state_shapes(p)
        missing = ({"step"} | set(shapes)) - set(saved)
        extra = set(saved) - ({"step"} | set(shapes))
        if missing or extra:
            raise ValueError(
                f"{name}: {where} has keys {sorted(saved)}, expected "
                f"{sorted({'step'} | set(shapes))}"
            )
        step = saved["step"]
        st = {"step": int(step.item()) if torch.is_tensor(step) else int(step)}
        for key, shape in shapes.items():
            v = saved[key]
            want = self._STATE[key]
            if not torch.is_tensor(v) or v.dtype != want:
                got = v.dtype if torch.is_tensor(v) else type(v).__name__
                raise ValueError(f"{name}: {where}['{key}'] must be {want}, got {got}")
            if v.numel() != math.prod(shape):
                raise ValueError(
                    f"{name}: {where}['{key}'] has {v.numel()} elements, expected "
                    f"{math.prod(shape)} for a parameter of shape {tuple(p.shape)}"
                )
            st[key] = self._alloc(p, shape, want).copy_(v.reshape(shape))
        return st


class PagedAdamW(_PagedAdamWBase):
    """AdamW with fp32 states (8 bytes per parameter), paged (see the module docstring).

    Same arguments as ``torch.optim.AdamW`` except amsgrad/maximize/foreach/capturable/
    differentiable/fused, which must stay off; plus ``page_out``, ``min_paged_numel`` and
    ``margin_bytes``.
    """

    _STATE = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32}

    def _state_shapes(self, p):
        return {"exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}

    def _update(self, p, grad, st, step, lr, beta1, beta2, eps, wd):
        return _OPS.adamw_step_32bit(
            p, grad, st["exp_avg"], st["exp_avg_sq"], step, lr, beta1, beta2, eps, wd
        )

    def _update_many(self, batch, lr, beta1, beta2, eps, wd):
        # One call for every CPU tensor of the group: a QLoRA model has hundreds of small
        # adapter tensors, and one op call each cost more than their update on 2 cores.
        return _OPS.adamw_step_32bit_multi(
            [p for p, _ in batch],
            [p.grad for p, _ in batch],
            [st["exp_avg"] for _, st in batch],
            [st["exp_avg_sq"] for _, st in batch],
            [st["step"] + 1 for _, st in batch],
            lr,
            beta1,
            beta2,
            eps,
            wd,
        )


class PagedAdamW8bit(_PagedAdamWBase):
    """AdamW with both moments in 8 bits (about 2.03 bytes per parameter), paged.

    Blocks of 256 elements with an fp32 absmax each; exp_avg against the signed dynamic map,
    exp_avg_sq against the unsigned one (bitsandbytes' maps). Each step dequantizes, updates and
    requantizes to the nearest code in one kernel per parameter tensor.
    """

    _STATE = {
        "exp_avg_q": torch.uint8,
        "exp_avg_absmax": torch.float32,
        "exp_avg_sq_q": torch.uint8,
        "exp_avg_sq_absmax": torch.float32,
    }

    def _state_shapes(self, p):
        nb = -(-p.numel() // _BLOCK)
        return {
            "exp_avg_q": tuple(p.shape),
            "exp_avg_absmax": (nb,),
            "exp_avg_sq_q": tuple(p.shape),
            "exp_avg_sq_absmax": (nb,),
        }

    def _maps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._codes:
            self._codes[device] = (dynamic_map(True).to(device), dynamic_map(False).to(device))
        return self._codes[device]

    def _update(self, p, grad, st, step, lr, beta1, beta2, eps, wd):
        cs, cu = self._maps(p.device)
        return _OPS.adamw_step_8bit_blockwise(
            p,
            grad,
            st["exp_avg_q"],
            st["exp_avg_absmax"],
            st["exp_avg_sq_q"],
            st["exp_avg_sq_absmax"],
            cs,
            cu,
            step,
            lr,
            beta1,
            beta2,
            eps,
            wd,
        )
