"""Fake (meta) kernels for every qlora_ext op, in one place.

They compute output shapes and dtypes without touching data, so the ops trace under
torch.compile and pass torch.library.opcheck. They check the same things as the C++ kernels,
with the same messages, so a bad call fails at trace time too.
"""

from __future__ import annotations

import torch

_BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_QUANT_TYPES = ("nf4", "fp4", "int4")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _ceil_div(a, b):
    return (a + b - 1) // b


def _check_4bit_args(blocksize: int, quant_type: str) -> None:
    torch._check(
        blocksize in _BLOCKSIZES_4BIT,
        lambda: (
            f"blocksize must be one of {', '.join(map(str, _BLOCKSIZES_4BIT))}, got {blocksize}"
        ),
    )
    torch._check(
        quant_type in _QUANT_TYPES,
        lambda: f"quant_type must be 'nf4', 'fp4' or 'int4', got '{quant_type}'",
    )


@torch.library.register_fake("qlora_ext::quantize_4bit")
def _(A, blocksize, quant_type):
    _check_4bit_args(blocksize, quant_type)
    torch._check(
        A.dtype in _FLOATS, lambda: f"A must be float32, float16 or bfloat16, got {A.dtype}"
    )
    n = A.numel()
    packed = A.new_empty((_ceil_div(n, 2),), dtype=torch.uint8)
    absmax = A.new_empty((_ceil_div(n, blocksize),), dtype=torch.float32)
    return packed, absmax


@torch.library.register_fake("qlora_ext::dequantize_4bit")
def _(
    packed,
    absmax,
    blocksize,
    quant_type,
    shape,
    dtype,
    nested_absmax=None,
    nested_code=None,
    nested_offset=None,
    nested_blocksize=256,
):
    _check_4bit_args(blocksize, quant_type)
    torch._check(
        dtype in _FLOATS, lambda: f"dtype must be float32, float16 or bfloat16, got {dtype}"
    )
    torch._check(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {packed.dtype}")
    n = 1
    for d in shape:
        n *= d
    torch._check(
        packed.numel() == _ceil_div(n, 2),
        lambda: (
            f"packed has {packed.numel()} bytes but shape {list(shape)} needs {_ceil_div(n, 2)}"
        ),
    )
    torch._check(
        absmax.numel() == _ceil_div(n, blocksize),
        lambda: (
            f"absmax has {absmax.numel()} elements but shape {list(shape)} with blocksize "
            f"{blocksize} needs {_ceil_div(n, blocksize)}"
        ),
    )
    nested = absmax.dtype == torch.uint8
    torch._check(
        nested or absmax.dtype == torch.float32,
        lambda: f"absmax must be float32 (plain) or uint8 (double-quantized), got {absmax.dtype}",
    )
    if nested:
        torch._check(
            nested_absmax is not None and nested_code is not None and nested_offset is not None,
            lambda: (
                "a uint8 (double-quantized) absmax needs nested_absmax, nested_code and "
                "nested_offset"
            ),
        )
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.register_fake("qlora_ext::quantize_blockwise_8bit")
def _(A, code, blocksize):
    torch._check(blocksize > 0, lambda: f"blocksize must be positive, got {blocksize}")
    torch._check(
        A.dtype in _FLOATS, lambda: f"A must be float32, float16 or bfloat16, got {A.dtype}"
    )
    torch._check(
        code.dtype == torch.float32 and code.numel() == 256,
        lambda: "code must be a float32 tensor of 256 sorted values",
    )
    return (
        torch.empty_like(A, dtype=torch.uint8),
        A.new_empty((_ceil_div(A.numel(), blocksize),), dtype=torch.float32),
    )


@torch.library.register_fake("qlora_ext::dequantize_blockwise_8bit")
def _(A, absmax, code, blocksize, dtype):
    torch._check(blocksize > 0, lambda: f"blocksize must be positive, got {blocksize}")
    torch._check(A.dtype == torch.uint8, lambda: f"A must be uint8, got {A.dtype}")
    torch._check(
        dtype in _FLOATS, lambda: f"dtype must be float32, float16 or bfloat16, got {dtype}"
    )
    return torch.empty_like(A, dtype=dtype)
