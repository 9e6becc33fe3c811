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
def _(w, blocksize, quant_type):
    _check_4bit_args(blocksize, quant_type)
    torch._check(
        w.dtype in _FLOATS, lambda: f"w must be float32, float16 or bfloat16, got {w.dtype}"
    )
    n = w.numel()
    packed = w.new_empty((_ceil_div(n, 2),), dtype=torch.uint8)
    absmax = w.new_empty((_ceil_div(n, blocksize),), dtype=torch.float32)
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
def _(q, absmax, code, blocksize, dtype):
    torch._check(blocksize > 0, lambda: f"blocksize must be positive, got {blocksize}")
    torch._check(q.dtype == torch.uint8, lambda: f"q must be uint8, got {q.dtype}")
    torch._check(
        dtype in _FLOATS, lambda: f"dtype must be float32, float16 or bfloat16, got {dtype}"
    )
    return torch.empty_like(q, dtype=dtype)


def _check_gemm(x, x_name, x_last, packed, absmax, N, K, blocksize, quant_type):
    _check_4bit_args(blocksize, quant_type)
    torch._check(
        x.dtype in _FLOATS or (x.dtype == torch.float64 and x.device.type in ("cpu", "meta")),
        lambda: (
            f"{x_name} must be float32, float16 or bfloat16 (or float64 on the CPU), got {x.dtype}"
        ),
    )
    torch._check(
        x.dim() >= 1 and x.shape[-1] == x_last,
        lambda: (
            f"{x_name} has last dimension {x.shape[-1] if x.dim() else 0} but the 4-bit "
            f"weight [N={N}, K={K}] needs {x_last}"
        ),
    )
    torch._check(
        K % blocksize == 0,
        lambda: (
            f"K={K} is not a multiple of blocksize={blocksize}: a 4-bit block would span two "
            "rows of the weight; quantize it with a blocksize that divides K"
        ),
    )
    torch._check(
        packed.numel() == _ceil_div(N * K, 2),
        lambda: (
            f"packed has {packed.numel()} bytes but shape [{N}, {K}] needs {_ceil_div(N * K, 2)}"
        ),
    )


@torch.library.register_fake("qlora_ext::gemm_4bit")
def _(
    x,
    packed,
    absmax,
    N,
    K,
    blocksize,
    quant_type,
    bias=None,
    nested_absmax=None,
    nested_code=None,
    nested_offset=None,
    nested_blocksize=256,
):
    _check_gemm(x, "x", K, packed, absmax, N, K, blocksize, quant_type)
    if bias is not None:
        torch._check(
            bias.dim() == 1 and bias.shape[0] == N,
            lambda: f"bias must have shape [{N}], got {list(bias.shape)}",
        )
    return x.new_empty((*x.shape[:-1], N))


@torch.library.register_fake("qlora_ext::gemm_4bit_grad_input")
def _(
    grad_out,
    packed,
    absmax,
    N,
    K,
    blocksize,
    quant_type,
    nested_absmax=None,
    nested_code=None,
    nested_offset=None,
    nested_blocksize=256,
):
    _check_gemm(grad_out, "grad_out", N, packed, absmax, N, K, blocksize, quant_type)
    return grad_out.new_empty((*grad_out.shape[:-1], K))


# ---- autograd for gemm_4bit -----------------------------------------------------------------
# out = x @ W^T + b with W = dequant(W4) frozen:
#   dL/dx = dL/dout @ W        (gemm_4bit_grad_input: W is dequantized panel by panel, never whole)
#   dL/db = sum of dL/dout over every leading dimension
# W4, its absmax and the nested state are integer/constant data and get no gradient.

_GEMM_WEIGHT_ARGS = ("packed", "absmax", "N", "K", "blocksize", "quant_type")
_GEMM_NESTED_ARGS = ("nested_absmax", "nested_code", "nested_offset", "nested_blocksize")


def _gemm_setup_context(ctx, inputs, output):
    (A, packed, absmax, N, K, blocksize, quant_type, bias, na, nc, no, nbs) = inputs
    ctx.weight = (packed, absmax, N, K, blocksize, quant_type)
    ctx.nested = dict(nested_absmax=na, nested_code=nc, nested_offset=no, nested_blocksize=nbs)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _gemm_backward(ctx, grad_out):
    grad_A = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_A = torch.ops.qlora_ext.gemm_4bit_grad_input(grad_out, *ctx.weight, **ctx.nested)
    if ctx.has_bias and ctx.needs_input_grad[7]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_A, None, None, None, None, None, None, grad_bias, None, None, None, None


torch.library.register_autograd(
    "qlora_ext::gemm_4bit", _gemm_backward, setup_context=_gemm_setup_context
)


# ---- LoRA over a 4-bit weight ----------------------------------------------------------------
# Fakes for lora_4bit_forward/backward and the autograd formula; the derivation is in
# qlora_ext.lora's module docstring. xa (dropout(x) @ A^T) comes back in fp32 (fp64 for fp64
# x): Note [LoRA accumulation] in cpp/lora_impl.h.


def _check_lora(x, lora_A, lora_B, N, K, dropout_p, seed):
    torch._check(
        lora_A.dim() == 2 and lora_A.shape[1] == K and lora_A.shape[0] > 0,
        lambda: f"lora_A must have shape [r, K={K}] with r > 0, got {list(lora_A.shape)}",
    )
    r = lora_A.shape[0]
    torch._check(
        lora_B.dim() == 2 and lora_B.shape[0] == N and lora_B.shape[1] == r,
        lambda: f"lora_B must have shape [N={N}, r={r}], got {list(lora_B.shape)}",
    )
    torch._check(0.0 <= dropout_p < 1.0, lambda: f"dropout_p must be in [0, 1), got {dropout_p}")
    torch._check(
        dropout_p == 0.0 or (seed is not None and seed.numel() == 1 and seed.dtype == torch.int64),
        lambda: "seed must be a one-element int64 tensor when dropout_p > 0",
    )


def _lora_acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("qlora_ext::lora_4bit_forward")
def _(
    x,
    packed,
    absmax,
    N,
    K,
    blocksize,
    quant_type,
    lora_A,
    lora_B,
    scale,
    dropout_p=0.0,
    seed=None,
    bias=None,
    nested_absmax=None,
    nested_code=None,
    nested_offset=None,
    nested_blocksize=256,
):
    _check_gemm(x, "x", K, packed, absmax, N, K, blocksize, quant_type)
    _check_lora(x, lora_A, lora_B, N, K, dropout_p, seed)
    y = x.new_empty((*x.shape[:-1], N))
    xa = x.new_empty((*x.shape[:-1], lora_A.shape[0]), dtype=_lora_acc_dtype(x))
    return y, xa


@torch.library.register_fake("qlora_ext::lora_4bit_backward")
def _(
    grad_out,
    x,
    xa,
    packed,
    absmax,
    N,
    K,
    blocksize,
    quant_type,
    lora_A,
    lora_B,
    scale,
    dropout_p=0.0,
    seed=None,
    nested_absmax=None,
    nested_code=None,
    nested_offset=None,
    nested_blocksize=256,
):
    _check_gemm(grad_out, "grad_out", N, packed, absmax, N, K, blocksize, quant_type)
    _check_gemm(x, "x", K, packed, absmax, N, K, blocksize, quant_type)
    _check_lora(x, lora_A, lora_B, N, K, dropout_p, seed)
    return torch.empty_like(x), torch.empty_like(lora_A), torch.empty_like(lora_B)


def _lora_setup_context(ctx, inputs, output):
    (x, packed, absmax, N, K, bs, qt, lora_A, lora_B, scale, p, seed, bias, na, nc, no, nbs) = (
        inputs
    )
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, output[1], lora_A, lora_B)
    ctx.weight = (packed, absmax, N, K, bs, qt)
    ctx.lora = (scale, p, seed)
    ctx.nested = dict(nested_absmax=na, nested_code=nc, nested_offset=no, nested_blocksize=nbs)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _lora_backward(ctx, grad_out, _grad_xa):
    x, xa, lora_A, lora_B = ctx.saved_tensors
    scale, p, seed = ctx.lora
    grad_x, grad_A, grad_B = torch.ops.qlora_ext.lora_4bit_backward(
        grad_out, x, xa, *ctx.weight, lora_A, lora_B, scale, p, seed, **ctx.nested
    )
    need = ctx.needs_input_grad
    grad_bias = None
    if ctx.bias_dtype is not None and need[12]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
    return (
        grad_x if need[0] else None,
        *([None] * 6),
        grad_A if need[7] else None,
        grad_B if need[8] else None,
        *([None] * 3),
        grad_bias,
        *([None] * 4),
    )


torch.library.register_autograd(
    "qlora_ext::lora_4bit_forward", _lora_backward, setup_context=_lora_setup_context
)
# ---- fused AdamW (paged optimizers) ---------------------------------------------------------
# Both ops update param and states in place and return a 0-d int64 count of non-finite grad
# elements (non-zero: nothing was written). States are always fp32 / uint8 whatever param is.

_OPTIM_BLOCK = 256


def _check_adamw(param, grad, step, lr, beta1, beta2, eps, weight_decay):
    torch._check(
        param.dtype in _FLOATS,
        lambda: f"param must be float32, float16 or bfloat16, got {param.dtype}",
    )
    torch._check(
        grad.dtype == param.dtype,
        lambda: f"grad must have param's dtype {param.dtype}, got {grad.dtype}",
    )
    torch._check(
        grad.numel() == param.numel(),
        lambda: f"grad has {grad.numel()} elements but param has {param.numel()}",
    )
    torch._check(step >= 1, lambda: f"step must be >= 1 (1-based), got {step}")
    torch._check(lr >= 0, lambda: f"lr must be >= 0, got {lr}")
    torch._check(0 <= beta1 < 1, lambda: f"beta1 must be in [0, 1), got {beta1}")
    torch._check(0 <= beta2 < 1, lambda: f"beta2 must be in [0, 1), got {beta2}")
    torch._check(eps > 0, lambda: f"eps must be > 0, got {eps}")
    torch._check(weight_decay >= 0, lambda: f"weight_decay must be >= 0, got {weight_decay}")


def _check_state(t, name, dtype, numel):
    torch._check(t.dtype == dtype, lambda: f"{name} must be {dtype}, got {t.dtype}")
    torch._check(t.numel() == numel, lambda: f"{name} has {t.numel()} elements, expected {numel}")


@torch.library.register_fake("qlora_ext::adamw_step_32bit")
def _(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    _check_adamw(param, grad, step, lr, beta1, beta2, eps, weight_decay)
    _check_state(exp_avg, "exp_avg", torch.float32, param.numel())
    _check_state(exp_avg_sq, "exp_avg_sq", torch.float32, param.numel())
    return param.new_empty((), dtype=torch.int64)


@torch.library.register_fake("qlora_ext::adamw_step_32bit_multi")
def _(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay):
    n = len(params)
    torch._check(
        len(grads) == n and len(exp_avgs) == n and len(exp_avg_sqs) == n and len(steps) == n,
        lambda: "params, grads, exp_avgs, exp_avg_sqs and steps must have the same length",
    )
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        _check_adamw(p, g, step, lr, beta1, beta2, eps, weight_decay)
        _check_state(m, "exp_avg", torch.float32, p.numel())
        _check_state(v, "exp_avg_sq", torch.float32, p.numel())
    device = params[0].device if n else torch.device("cpu")
    return torch.empty((n,), dtype=torch.int64, device=device)


@torch.library.register_fake("qlora_ext::adamw_step_8bit_blockwise")
def _(
    param,
    grad,
    exp_avg_q,
    exp_avg_absmax,
    exp_avg_sq_q,
    exp_avg_sq_absmax,
    code_signed,
    code_unsigned,
    step,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
):
    _check_adamw(param, grad, step, lr, beta1, beta2, eps, weight_decay)
    n = param.numel()
    nb = _ceil_div(n, _OPTIM_BLOCK)
    _check_state(exp_avg_q, "exp_avg_q", torch.uint8, n)
    _check_state(exp_avg_absmax, "exp_avg_absmax", torch.float32, nb)
    _check_state(exp_avg_sq_q, "exp_avg_sq_q", torch.uint8, n)
    _check_state(exp_avg_sq_absmax, "exp_avg_sq_absmax", torch.float32, nb)
    _check_state(code_signed, "code_signed", torch.float32, 256)
    _check_state(code_unsigned, "code_unsigned", torch.float32, 256)
    return param.new_empty((), dtype=torch.int64)
