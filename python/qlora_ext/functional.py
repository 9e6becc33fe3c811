"""The user-facing quantization API, thin wrappers over torch.ops.qlora_ext.

    packed, state = qlora_ext.quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
    w_hat = qlora_ext.dequantize_4bit(packed, state)   # state.dtype, state.shape

Double quantization (QLoRA section 3): the fp32 absmax of each 4-bit block is itself quantized
to 8 bits with the signed dynamic map, after subtracting its mean, in groups of 256 with one
fp32 scale per group. That cuts the overhead from 32/64 = 0.5 to 8/64 + 32/(64*256) = 0.127
bits per weight at blocksize 64. The nested absmax is undone inside the dequantize kernel.
"""

from __future__ import annotations

import functools
import re

import torch

from .quant_state import NestedState, QuantState

NESTED_BLOCKSIZE = 256
_ops = torch.ops.qlora_ext


@functools.cache
def _code_4bit_cpu(quant_type: str) -> torch.Tensor:
    raw = {
        "nf4": [
            -1.0,
            -0.6961928009986877,
            -0.5250730514526367,
            -0.39491748809814453,
            -0.28444138169288635,
            -0.18477343022823334,
            -0.09105003625154495,
            0.0,
            0.07958029955625534,
            0.16093020141124725,
            0.24611230194568634,
            0.33791524171829224,
            0.44070982933044434,
            0.5626170039176941,
            0.7229568362236023,
            1.0,
        ],
        "fp4": [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0]
        + [-2.0, -3.0],
        "int4": [7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7],
    }
    if quant_type not in raw:
        raise ValueError(f"quant_type must be 'nf4', 'fp4' or 'int4', got {quant_type!r}")
    t = torch.tensor(raw[quant_type], dtype=torch.float32)
    return t / t.abs().max()


def get_4bit_code(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-value table (bitsandbytes' quant_map) for nf4, fp4 or int4: a fresh tensor, so
    states never share storage (safetensors refuses shared tensors; an in-place edit of one
    state's table must not reach another's)."""
    return _code_4bit_cpu(quant_type).to(device, copy=True)


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)``: 256 sorted
    fp32 values; for each decade 1e-6 .. 1, the midpoints of an even grid on [0.1, 1], twice as
    fine when unsigned (no sign bit to spend), plus 0 and 1. A fresh tensor on each call."""
    return _dynamic_map_cpu(signed).clone()


@functools.cache
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    data: list[float] = []
    for i in range(7):
        items = 2**i + 1 if signed else 2 ** (i + 1) + 1
        b = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def dynamic_code_8bit(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 sorted values in [-1, 1]), a fresh tensor."""
    return _dynamic_map_cpu(True).to(device, copy=True)


def _check_tensor(w, name: str) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")


# Note [Public argument names]: an error must name the argument the caller passed. The ops'
# schema names are the public ones where an op takes the argument itself (w, x, packed, bias);
# the arguments these functions unpack from a QuantState (absmax, blocksize, quant_type, shape,
# dtype, nested_*) are renamed in the op's message to the state's field, by _renamed, only
# once an op has refused (a try block costs nothing while nothing is raised).
_STATE_NAMES = {
    "absmax": "state.absmax",
    "blocksize": "state.blocksize",
    "quant_type": "state.quant_type",
    "shape": "state.shape",
    "dtype": "state.dtype",
    "nested_absmax": "state.state2.absmax",
    "nested_code": "state.state2.code",
    "nested_offset": "state.offset",
    "nested_blocksize": "state.state2.blocksize",
}


@functools.cache
def _name_pattern(names: tuple[str, ...]) -> re.Pattern:
    # Whole words only, and not already qualified ("state.absmax" stays as it is).
    return re.compile(rf"(?<![\w.])({'|'.join(map(re.escape, names))})(?!\w)")


def _renamed(e: Exception, names: dict[str, str]) -> Exception:
    """`e` again, its message naming each argument by its public name (`names`: op -> public)."""
    msg = _name_pattern(tuple(names)).sub(lambda m: names[m.group(0)], str(e))
    try:
        return type(e)(msg)
    except Exception:  # an exception type with another constructor
        return RuntimeError(msg)


def _check_state(state, needs_2d: str | None = None) -> None:
    """What the ops cannot say about a QuantState in its own words: its type, its fields'
    types, and for a matmul (`needs_2d`: the function's name) a positive 2-D [N, K] shape."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a qlora_ext.QuantState, got {type(state).__name__}")
    if not isinstance(state.absmax, torch.Tensor):
        raise TypeError(f"state.absmax must be a torch.Tensor, got {type(state.absmax).__name__}")
    if state.state2 is not None:
        for name, t in (
            ("state.offset", state.offset),
            ("state.state2.absmax", state.state2.absmax),
            ("state.state2.code", state.state2.code),
        ):
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"{name} must be a torch.Tensor in a double-quantized state, got "
                    f"{type(t).__name__}"
                )
    if needs_2d is not None:
        shape = state.shape
        if (
            len(shape) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or min(shape) <= 0
        ):
            raise ValueError(
                f"state.shape must be a 2-D [N, K] weight shape with N, K > 0 for {needs_2d}, "
                f"got {tuple(shape)}"
            )


def quantize_4bit(
    w: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize `w` (fp32/fp16/bf16, any shape) to 4 bits in blocks of `blocksize`.

    Returns the packed bytes, shaped [ceil(numel/2), 1] like bitsandbytes' Params4bit, and the
    QuantState needed to undo it. Raises ValueError on NaN/Inf, an unknown quant_type or an
    unsupported blocksize.
    """
    _check_tensor(w, "w")
    packed, absmax = _ops.quantize_4bit(w, blocksize, quant_type)
    code = get_4bit_code(quant_type, w.device)
    state = QuantState(
        absmax=absmax,
        shape=w.shape,
        code=code,
        dtype=w.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
    )
    if double_quant:
        # bitsandbytes' exact recipe (same torch ops, so the same bits): mean, subtract, 8-bit.
        offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())
        try:
            qabsmax, nested_absmax = _ops.quantize_blockwise_8bit(
                absmax - offset, dynamic_code_8bit(w.device), NESTED_BLOCKSIZE
            )
        except RuntimeError as e:  # the absmax are finite, so only their mean can overflow
            raise ValueError(
                f"w is too large to double-quantize: the mean of its block absmax overflows "
                f"float32 (w's largest magnitude is {absmax.max().item():.3g}); quantize it with "
                "double_quant=False"
            ) from e
        state.absmax = qabsmax
        state.offset = offset
        state.state2 = NestedState(
            absmax=nested_absmax, code=dynamic_code_8bit(w.device), blocksize=NESTED_BLOCKSIZE
        )
    return packed.view(-1, 1), state


def _nested_args(state: QuantState) -> dict:
    if state.state2 is None:
        return {}
    offset = state.offset
    if offset.dim() != 1:  # reshape and .to cost a microsecond each even as no-ops
        offset = offset.reshape(1)
    if offset.dtype != torch.float32:
        offset = offset.to(torch.float32)
    return dict(
        nested_absmax=state.state2.absmax,
        nested_code=state.state2.code,
        nested_offset=offset,
        nested_blocksize=state.state2.blocksize,
    )


def dequantize_4bit(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Undo quantize_4bit: a tensor of `state.shape` and `state.dtype`."""
    _check_tensor(packed, "packed")
    _check_state(state)
    if packed.dtype != torch.uint8:
        # bitsandbytes allows packed bytes stored in a float dtype (quant_storage, for FSDP).
        packed = packed.contiguous().view(torch.uint8)
    try:
        return _ops.dequantize_4bit(
            packed.reshape(-1),
            state.absmax,
            state.blocksize,
            state.quant_type,
            list(state.shape),
            state.dtype,
            **_nested_args(state),
        )
    except (RuntimeError, TypeError, ValueError) as e:  # Note [Public argument names]
        raise _renamed(e, _STATE_NAMES) from None


def quantize_blockwise_8bit(
    A: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization against `code` (default: the signed dynamic map).
    Returns (uint8 codes shaped like A, fp32 absmax per block)."""
    _check_tensor(A, "A")
    if code is None:
        code = dynamic_code_8bit(A.device)
    return _ops.quantize_blockwise_8bit(A, code, blocksize)


def dequantize_blockwise_8bit(
    q: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor | None = None,
    blocksize: int = 256,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of quantize_blockwise_8bit."""
    _check_tensor(q, "q")
    if code is None:
        code = dynamic_code_8bit(q.device)
    return _ops.dequantize_blockwise_8bit(q, absmax, code, blocksize, dtype)


def matmul_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ dequant(W4)ᵀ (+ bias)`` for a 4-bit weight of shape ``state.shape == [N, K]``.

    Differentiable with respect to ``x`` and ``bias`` (the backward multiplies by the 4-bit
    weight directly, dequantizing it one panel at a time), and traceable by
    ``torch.compile(fullgraph=True)``. ``x`` keeps its dtype: cast it first to compute in
    another one.
    """
    _check_tensor(x, "x")
    _check_tensor(packed, "packed")
    _check_state(state, "matmul_4bit")
    N, K = state.shape
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)
    try:
        return _ops.gemm_4bit(
            x,
            packed.reshape(-1),
            state.absmax,
            N,
            K,
            state.blocksize,
            state.quant_type,
            bias,
            **_nested_args(state),
        )
    except (RuntimeError, TypeError, ValueError) as e:  # Note [Public argument names]
        raise _renamed(e, _STATE_NAMES) from None
