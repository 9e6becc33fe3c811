"""What the fuzz areas share: tensor specs (drawn by hypothesis, built deterministically), the
two accepted outcomes of a case, and the error bounds the numeric checks use.

A case is a plain JSON-able dict (a *spec*), never a tensor: the runner logs each spec before it
runs it, so a case that kills the process is named by the last line of the log and can be run
again on its own (``python tests/fuzz_runner.py --case '<json>'``).

Tensor specs: ``{"shape", "dtype", "layout", "values", "seed"}``. ``layout`` is how the tensor is
laid out in memory (contiguous, transposed, every other element, expanded with stride 0, or at a
storage offset); ``values`` is what it holds (normal, huge, subnormal, all zeros, with a NaN or
an Inf).
"""

from __future__ import annotations

import math
import re

import torch
from hypothesis import strategies as st

FLOATS = ("float32", "float16", "bfloat16")
NON_FLOATS = ("float64", "int32", "int64", "uint8", "int8", "bool", "complex64")
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded", "offset")
VALUES = ("normal", "normal", "huge", "subnormal", "zeros")
NONFINITE = ("nan", "inf", "-inf")
# Sizes that reach the edges: empty, one, small primes, a power of two and its neighbours (the
# kernels' vector widths and block ends), and a large prime.
SIZES = (0, 1, 2, 3, 5, 7, 13, 31, 61, 63, 64, 65, 127, 257, 4099)
ALLOWED = (ValueError, TypeError, RuntimeError)


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


# ---- strategies -----------------------------------------------------------------------------


def shapes(max_dims=3, max_numel=1 << 17, sizes=SIZES):
    return st.lists(st.sampled_from(sizes), min_size=0, max_size=max_dims).filter(
        lambda s: math.prod(s) <= max_numel
    )


def seeds():
    return st.integers(0, 2**31 - 1)


def tensor_spec(shape, dtypes=FLOATS, values=VALUES, layouts=LAYOUTS):
    """A spec for a tensor of `shape` (a list or a strategy of lists)."""
    shape_st = shape if isinstance(shape, st.SearchStrategy) else st.just(list(shape))
    return st.fixed_dictionaries(
        {
            "shape": shape_st,
            "dtype": st.sampled_from(dtypes),
            "layout": st.sampled_from(layouts),
            "values": st.sampled_from(values),
            "seed": seeds(),
        }
    )


# ---- building tensors -------------------------------------------------------------------------


def _values(spec, n: int, gen: torch.Generator) -> torch.Tensor:
    """n float64 values of the kind spec["values"] names, for a tensor of spec["dtype"]."""
    dt = dtype_of(spec["dtype"])
    kind = spec["values"]
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    if dt.is_floating_point:
        fi = torch.finfo(dt)
        if kind == "huge":
            x = (
                x.sign()
                * fi.max
                * (0.25 + 0.75 * torch.rand(n, generator=gen, dtype=torch.float64))
            )
        elif kind == "subnormal":
            x = x.clamp(-2, 2) * fi.tiny * 0.25
        elif kind == "zeros":
            x = torch.zeros(n, dtype=torch.float64)
    return x


def _poison(spec, view, base, gen) -> None:
    """Put the NaN or Inf spec["values"] asks for at one element the view shows."""
    n = view.numel()
    if spec["values"] not in NONFINITE or n == 0 or not view.is_floating_point():
        return
    bad = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[spec["values"]]
    i = int(torch.randint(n, (1,), generator=gen))
    if spec["layout"] == "expanded" and view.dim() >= 1:
        base.view(-1)[i % base.numel()] = bad  # every expanded row shows the base row
    else:
        view[torch.unravel_index(torch.tensor(i), view.shape)] = bad


def build(spec) -> torch.Tensor:
    """The tensor a spec describes: its logical shape and values, laid out as it says."""
    shape = list(spec["shape"])
    dt = dtype_of(spec["dtype"])
    gen = torch.Generator().manual_seed(int(spec["seed"]))
    layout = spec["layout"]
    n = math.prod(shape)

    def make(base_shape):
        m = math.prod(base_shape)
        v = _values(spec, m, gen)
        if dt == torch.bool:
            t = v > 0
        elif dt.is_complex:
            t = torch.complex(v, v.flip(0)).to(dt)
        elif not dt.is_floating_point:
            t = (v * 3).round().clamp(-100, 100).to(dt)
        else:
            t = v.to(dt)
        return t.reshape(base_shape)

    if layout == "transposed" and len(shape) >= 2:
        base = make(shape[:-2] + [shape[-1], shape[-2]])
        view = base.transpose(-1, -2)
    elif layout == "sliced" and len(shape) >= 1:
        base = make(shape[:-1] + [shape[-1] * 2])
        view = base[..., ::2]
    elif layout == "expanded" and len(shape) >= 1:
        base = make([1] + shape[1:])
        view = base.expand(shape)
    elif layout == "offset":
        base = make([n + 3])
        view = base[3:].view(shape)
    else:
        base = view = make(shape)
    _poison(spec, view, base, gen)
    return view


def rand(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


# ---- outcomes -------------------------------------------------------------------------------


def names_argument(msg: str, names) -> bool:
    """Whether msg names one of `names` as a word of its own (``state.absmax`` names
    ``state``; ``nested_absmax`` does not name ``absmax``; ``A`` is not ``w``)."""
    return any(re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", msg) for n in names)


def judge(e: BaseException, names, allowed=ALLOWED) -> str | None:
    """None if e is one of `allowed` and its message names one of `names`; else what is wrong."""
    if not isinstance(e, allowed):
        return (
            f"wrong exception type {type(e).__name__} (expected one naming {list(names)}): {e!r}"[
                :600
            ]
        )
    if not names_argument(str(e), names):
        return f"{type(e).__name__} does not name {list(names)}: {str(e)[:400]!r}"
    return None


def expect_error(fn, names, allowed=ALLOWED) -> str | None:
    """None if fn raises one of `allowed` whose message names one of `names`; else what
    went wrong."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the wrong type is the finding
        return judge(e, names, allowed)
    return f"no exception (expected one naming {list(names)})"


class Mismatch(AssertionError):
    """A result that differs from the reference by more than the stated tolerance."""


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    if t.dtype in (torch.float32, torch.int32):
        return t.view(torch.int32)
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16)
    if t.dtype == torch.float64:
        return t.view(torch.int64)
    return t


def same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if got.shape != want.shape or got.dtype != want.dtype:
        raise Mismatch(f"{what}: {got.dtype}{list(got.shape)} != {want.dtype}{list(want.shape)}")
    # NaN payloads may differ between a kernel and torch; any NaN matches any NaN.
    g, w = got.detach().cpu(), want.detach().cpu()
    if g.is_floating_point():
        both_nan = g.isnan() & w.isnan()
        g, w = torch.where(both_nan, 0, g), torch.where(both_nan, 0, w)
    diff = (bits(g) != bits(w)).nonzero()
    if len(diff):
        i = tuple(diff[0].tolist())
        raise Mismatch(f"{what}: {len(diff)} elements differ, first at {i}: {g[i]} != {w[i]}")


# ---- error bounds for products --------------------------------------------------------------
# Note [Fuzz product bounds]: a sum of K products computed in a floating-point format of unit
# roundoff u, in any order and with or without FMA, is within K*u * sum|a_k*b_k| of the exact
# sum (Higham, Accuracy and Stability, 3.1); rounding the result to an output format of unit
# roundoff u_out adds u_out*|exact|. The references compute in float64 from the same fp32
# weight values the kernels decode, so the bound is (K+2) * (u_acc * (|x| @ |W|^T) + step_acc)
# + 2 * u_out * |ref| + step_out: the accumulation; one subnormal step of the accumulation
# format per operation (what an operation that underflows may lose); the final rounding (twice:
# a kernel may round an fp32 partial to the output and add again); a result that underflows.
# Where the magnitude sum overflows the accumulation format (or the reference is NaN: in
# float64 an overflowing partial sum can turn into inf - inf in one order and not another), any
# value is accepted, except that an output a NaN input reaches must be NaN (NaN times anything
# is NaN, in every order).

UNIT = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


def check_product(
    got, ref, mag, terms, u_acc, out_dtype, what, must_nan=None, underflow=0.0
) -> None:
    """got vs the float64 ref of a sum of `terms` products whose magnitudes sum to mag;
    `must_nan` marks the elements a NaN input reaches (they must be NaN)."""
    if got.shape != ref.shape:
        raise Mismatch(f"{what}: shape {list(got.shape)} != {list(ref.shape)}")
    if got.dtype != out_dtype:
        raise Mismatch(f"{what}: dtype {got.dtype} != {out_dtype}")
    g = got.detach().double().cpu()
    acc_max = torch.finfo(torch.float32 if u_acc > 2.0**-53 else torch.float64).max
    out_max = torch.finfo(out_dtype).max
    risky = ~torch.isfinite(mag) | (mag > acc_max / 4) | (ref.abs() > out_max / 2)
    nan_lost = must_nan & ~g.isnan() if must_nan is not None else torch.zeros((), dtype=bool)
    if nan_lost.any():
        i = tuple(nan_lost.nonzero()[0].tolist())
        raise Mismatch(f"{what}: reference NaN at {i} but got {g[i]}")
    # One subnormal step of each format (half of one is the most a rounding there is off by;
    # a whole one, so that float64's is not rounded to 0).
    tiny = max(torch.finfo(out_dtype).smallest_normal * 2 * UNIT[out_dtype], underflow)
    acc = torch.float32 if u_acc > 2.0**-53 else torch.float64
    acc_step = torch.finfo(acc).smallest_normal * 2 * u_acc
    bound = (terms + 2) * (u_acc * mag + acc_step) + 2 * UNIT[out_dtype] * ref.abs() + tiny
    ok = risky | ref.isnan() | ((g - ref).abs() <= bound) | (g == ref)
    if not ok.all():
        i = tuple((~ok).nonzero()[0].tolist())
        raise Mismatch(
            f"{what}: {int((~ok).sum())} elements outside the bound, first at {i}: got {g[i]}, "
            f"reference {ref[i]}, bound {bound[i]}"
        )
