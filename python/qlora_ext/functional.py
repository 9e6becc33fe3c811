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
        qabsmax, nested_absmax = _ops.quantize_blockwise_8bit(
            absmax - offset, dynamic_code_8bit(w.device), NESTED_BLOCKSIZE
        )
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
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a qlora_ext.QuantState, got {type(state).__name__}")
    if packed.dtype != torch.uint8:
        # bitsandbytes allows packed bytes stored in a float dtype (quant_storage, for FSDP).
        packed = packed.contiguous().view(torch.uint8)
    return _ops.dequantize_4bit(
        packed.reshape(-1),
        state.absmax,
        state.blocksize,
        state.quant_type,
        list(state.shape),
        state.dtype,
        **_nested_args(state),
    )


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
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a qlora_ext.QuantState, got {type(state).__name__}")
    if len(state.shape) != 2:
        raise ValueError(f"matmul_4bit needs a 2-D [N, K] weight, got shape {tuple(state.shape)}")
    N, K = state.shape
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)
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
