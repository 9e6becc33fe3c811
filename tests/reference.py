"""Pure-PyTorch oracles for every qlora_ext op.

These functions define the maths (and the exact rounding) that the C++/CUDA kernels must
reproduce. They are written for clarity, not speed, and are bit-compatible with
bitsandbytes 0.50.2 on CPU:

* 4-bit: ``scaled = clamp(x * (1 / absmax), -1, 1)`` for full blocks, ``x / absmax`` for a
  partial last block (whose absmax is clamped to 1e-38), then the code whose value is nearest,
  a value exactly on a midpoint going to the lower one (``torch.bucketize`` on midpoints).
* 8-bit dynamic: bitsandbytes' CPU path looks the code up in a 65536-entry table indexed by
  ``uint16((v + 1) * 0.5 * 65535 + 0.5)``; entry ``i`` holds the number of midpoints below
  ``-1 + 2i/65535``. That is *not* always the nearest code (about 0.1% of values near a
  midpoint land one code away), so the oracle mirrors the table exactly.
"""

from __future__ import annotations

import torch

NF4 = [
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
]
FP4_RAW = [
    0,
    0.0625,
    8.0,
    12.0,
    4.0,
    6.0,
    2.0,
    3.0,
    0.0,
    -0.0625,
    -8.0,
    -12.0,
    -4.0,
    -6.0,
    -2.0,
    -3.0,
]
INT4_RAW = [7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7]

# Codes sorted by value. The two zeros (codes 0 and 8) keep the order bitsandbytes' argsort
# produces, so a tiny positive value maps to code 8 exactly as bitsandbytes does.
SORTED_ORDER = {
    "nf4": list(range(16)),
    "fp4": [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3],
    "int4": [15, 14, 13, 12, 11, 10, 9, 7, 8, 6, 5, 4, 3, 2, 1, 0],
}


def code_4bit(quant_type: str) -> torch.Tensor:
    raw = {"nf4": NF4, "fp4": FP4_RAW, "int4": INT4_RAW}[quant_type]
    t = torch.tensor(raw, dtype=torch.float32)
    return t / t.abs().max()


def dynamic_code_8bit() -> torch.Tensor:
    """bitsandbytes' signed dynamic map (create_dynamic_map(signed=True, 7, 8))."""
    data: list[float] = []
    for i in range(7):
        n = 2**i + 1
        b = torch.linspace(0.1, 1, n, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _blocks(x: torch.Tensor, blocksize: int):
    n = x.numel()
    full = n - n % blocksize
    return full // blocksize, full


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    code = code_4bit(quant_type)
    order = torch.tensor(SORTED_ORDER[quant_type])
    s = code[order]
    bounds = (s[:-1] + s[1:]) / 2
    x = A.reshape(-1).float()
    n = x.numel()
    nb, full = _blocks(x, blocksize)
    xb = x[:full].reshape(nb, blocksize)
    absmax = xb.abs().amax(dim=-1) if nb else torch.empty(0)
    scaled = torch.clamp(xb * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)
    if full < n:
        am = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.view(1)])
        scaled = torch.cat([scaled, torch.clamp(x[full:] / am, -1, 1)])
    if n % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    q = order[torch.bucketize(scaled, bounds)].to(torch.uint8)
    packed = (q[0::2] << 4) | q[1::2]
    return packed, absmax


def dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype):
    n = 1
    for d in shape:
        n *= d
    vals = dequantize_4bit_elements(packed, absmax, blocksize, quant_type, torch.arange(n))
    return vals.to(dtype).reshape(shape)


def dequantize_4bit_elements(packed, absmax, blocksize, quant_type, index):
    """Elements `index` (flat int64 positions) of a 4-bit tensor in float32, code[nibble] *
    absmax[block] (the high nibble first): dequantize_4bit is this over every position, and the
    large-tensor tests take a scattered selection of a tensor too large to dequantize whole."""
    code = code_4bit(quant_type)
    byte = packed.reshape(-1)[index // 2].long()
    q = torch.where(index % 2 == 0, byte >> 4, byte & 0xF)
    return code[q] * absmax.float()[index // blocksize]


def lut_8bit(code: torch.Tensor) -> torch.Tensor:
    mids = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(65536, dtype=torch.float32)
    val = -1.0 + (2.0 * i) / 65535.0
    return torch.searchsorted(mids, val, side="left").to(torch.uint8)  # count of mids < val


def quantize_blockwise_8bit(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    x = A.reshape(-1).float()
    n = x.numel()
    nblocks = -(-n // blocksize)
    pad = nblocks * blocksize - n
    xb = torch.cat([x, x.new_zeros(pad)]).reshape(nblocks, blocksize)
    absmax = xb.abs().amax(dim=-1)
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)
    # Note [Tiny 8-bit blocks] (cpp/cpu/quant_cpu.cpp): a reciprocal that overflows divides.
    tiny = torch.isinf(inv).view(-1, 1)
    v = torch.where(tiny, xb / absmax.view(-1, 1), xb * inv.view(-1, 1))
    v = torch.clamp(v, -1, 1)
    idx = ((v + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)
    q = lut_8bit(code)[idx]
    q[absmax == 0] = 0  # an all-zero block stores code 0, as bitsandbytes does
    q = q.reshape(-1)[:n]
    return q.reshape(A.shape), absmax


def dequantize_blockwise_8bit(q, absmax, code, blocksize, dtype):
    n = q.numel()
    idx = torch.arange(n) // blocksize
    return (code[q.reshape(-1).long()] * absmax[idx]).to(dtype).reshape(q.shape)


def gemm_4bit(A, packed, absmax, N, K, blocksize, quant_type, bias=None):
    """A @ dequant(W)^T (+ bias) in float64: the oracle for gemm_4bit."""
    W = dequantize_4bit(packed, absmax, blocksize, quant_type, (N, K), torch.float64)
    out = A.double() @ W.t()
    return out if bias is None else out + bias.double()


def gemm_4bit_grad_input(G, packed, absmax, N, K, blocksize, quant_type):
    """grad_out @ dequant(W) in float64: the oracle for gemm_4bit_grad_input."""
    W = dequantize_4bit(packed, absmax, blocksize, quant_type, (N, K), torch.float64)
    return G.double() @ W


# ---- LoRA ------------------------------------------------------------------------------------


def lora_dropout_mask(seed: int, n: int, p: float) -> torch.Tensor:
    """Note [Dropout by seed] (cpp/lora_dropout.h) in numpy uint64 arithmetic, which wraps
    like C's: element i is kept when the top 32 bits of splitmix64's finaliser applied to
    seed + golden * (i + 1) are at least p * 2^32. A bool tensor of n elements."""
    import numpy as np

    with np.errstate(over="ignore"):
        z = np.uint64(seed % 2**64) + np.uint64(0x9E3779B97F4A7C15) * (
            np.arange(n, dtype=np.uint64) + np.uint64(1)
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    threshold = min(int(p * 2**32), 2**32 - 1)
    return torch.from_numpy((z >> np.uint64(32)) >= np.uint64(threshold))


def lora_4bit(x, packed, absmax, N, K, blocksize, quant_type, A, B, scale, p=0.0, seed=0):
    """(y, xa) of lora_4bit_forward in float64, with the dropout mask of lora_dropout_mask."""
    W = dequantize_4bit(packed, absmax, blocksize, quant_type, (N, K), torch.float64)
    x64 = x.double()
    if p > 0:
        # A dropped element is 0 even where x holds a NaN or an Inf (the kernels select, not
        # multiply by the mask).
        keep = lora_dropout_mask(seed, x.numel(), p).reshape(x.shape)
        xd = torch.where(keep, x64 / (1 - p), 0.0)
    else:
        xd = x64
    xa = xd @ A.double().t()
    return x64 @ W.t() + scale * xa @ B.double().t(), xa


# ---- AdamW (paged optimizers) ---------------------------------------------------------------
# One fp32 tensor op per rounding, in the order of torch.optim.AdamW's single-tensor path
# (Note [AdamW order] in cpp/optim_math.h); the scalars are Python doubles rounded once to fp32.


def adamw_scalars(step, lr, beta1, beta2, eps, weight_decay):
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    return dict(
        decay=1 - lr * weight_decay,
        weight=1 - beta1,
        beta2=beta2,
        one_minus_beta2=1 - beta2,
        bc2_sqrt=bc2**0.5,
        neg_step_size=-(lr / bc1),
        eps=eps,
    )


def _fma(a, b, c):
    """fp32 a * b + c rounded once (to within float64's double rounding): the product is exact
    in float64, the sum rounds there and then to fp32."""
    a = a.double() if torch.is_tensor(a) else torch.tensor(a, dtype=torch.float32).double()
    return (a * b.double() + c.double()).float()


def adamw_elementwise(p, g, m, v, s):
    """Returns new (p, m, v) as fp32 tensors; p and g may be any float dtype."""
    p, g = p.float(), g.float()
    p = p * s["decay"]
    w = s["weight"]
    m = _fma(w, g - m, m) if abs(w) < 0.5 else _fma(w - 1, g - m, g)
    v = _fma(s["one_minus_beta2"] * g, g, v * s["beta2"])
    denom = v.double().sqrt().float() / s["bc2_sqrt"] + s["eps"]  # correctly rounded sqrt
    p = p + (s["neg_step_size"] * m) / denom
    return p, m, v


def adamw_step_32bit(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd):
    """In place, like the op; returns the non-finite count (then nothing is written)."""
    bad = int((~torch.isfinite(grad)).sum())
    if bad:
        return bad
    s = adamw_scalars(step, lr, beta1, beta2, eps, wd)
    p, m, v = adamw_elementwise(param, grad, exp_avg, exp_avg_sq, s)
    param.copy_(p.to(param.dtype))
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    return 0


def quantize_nearest(code, x, absmax):
    """Index of the nearest code to x / absmax; a value on a midpoint takes the lower code."""
    mids = (code[:-1] + code[1:]) * 0.5
    scaled = torch.where(absmax > 0, x / torch.where(absmax > 0, absmax, 1.0), 0.0)
    q = torch.searchsorted(mids, scaled.contiguous(), right=False)
    # An overflowed moment (+-inf in a block whose absmax is inf) keeps its sign at the end of
    # the map, so that it decodes to +-inf again (Note [8-bit state quantization]).
    q = torch.where(scaled.isnan(), torch.where(x > 0, len(code) - 1, 0), q)
    return q.to(torch.uint8)


def adamw_step_8bit_blockwise(param, grad, qm, am, qv, av, cs, cu, step, lr, b1, b2, eps, wd):
    bad = int((~torch.isfinite(grad)).sum())
    if bad:
        return bad
    n, bs = param.numel(), 256
    nb = -(-n // bs)
    pad = nb * bs - n

    def blocks(t, fill=0):
        t = t.reshape(-1)
        return torch.cat([t, t.new_full((pad,), fill)]).reshape(nb, bs)

    m = cs[blocks(qm).long()] * am.view(-1, 1)
    v = cu[blocks(qv).long()] * av.view(-1, 1)
    s = adamw_scalars(step, lr, b1, b2, eps, wd)
    p, m, v = adamw_elementwise(blocks(param), blocks(grad), m, v, s)
    live = (torch.arange(nb * bs) < n).reshape(nb, bs)
    m, v = torch.where(live, m, 0.0), torch.where(live, v, 0.0)
    # A NaN moment (inf * 0 in the update) is left out of its block's absmax, as the kernels do.
    inf = float("inf")
    new_am = m.abs().nan_to_num(0.0, inf, -inf).amax(1)
    new_av = v.nan_to_num(0.0, inf, -inf).amax(1)
    param.copy_(p.reshape(-1)[:n].to(param.dtype).reshape(param.shape))
    qm.copy_(quantize_nearest(cs, m, new_am.view(-1, 1)).reshape(-1)[:n].reshape(qm.shape))
    qv.copy_(quantize_nearest(cu, v, new_av.view(-1, 1)).reshape(-1)[:n].reshape(qv.shape))
    am.copy_(new_am)
    av.copy_(new_av)
    return 0
