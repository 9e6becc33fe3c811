"""Fuzz areas for the 4-bit products: matmul_4bit and lora_4bit with their gradients, and the
Linear4bit / LoRALinear4bit modules. Results are held to Note [Fuzz product bounds]
(fuzz_support.py) against float64 references built from the same decoded weight.
"""

from __future__ import annotations

import math

import torch
from fuzz_quant import BLOCKSIZES, QUANT_TYPES, _state_absmax
from fuzz_support import (
    FLOATS,
    LAYOUTS,
    UNIT,
    Mismatch,
    build,
    check_product,
    dtype_of,
    expect_error,
    rand,
    seeds,
    tensor_spec,
)
from hypothesis import strategies as st

import qlora_ext
import reference as R
from qlora_ext.lora import LoRALinear4bit
from qlora_ext.nn import Linear4bit

X_DTYPES = FLOATS + ("float64",)
BAD_X_DTYPES = ("int32", "int64", "bool", "complex64", "uint8")
M_SIZES = (0, 1, 2, 3, 5, 16, 17, 40, 41, 64, 65)
N_SIZES = (1, 2, 3, 7, 31, 61, 64, 257)
VALUES_X = ("normal", "normal", "normal", "huge", "subnormal", "zeros", "nan", "inf")


def _weight_f64(packed, state):
    return R.dequantize_4bit(
        packed.reshape(-1), _state_absmax(state), state.blocksize, state.quant_type,
        tuple(state.shape), torch.float64,
    )  # fmt: skip


def _acc_unit(dtype):
    # CPU kernels accumulate fp32 (fp64 for fp64 inputs); Note [LoRA accumulation].
    return UNIT[torch.float64] if dtype == torch.float64 else UNIT[torch.float32]


def _leaf(t, requires_grad):
    # detach() keeps the strides and storage offset, so the view stays what the spec made it.
    return t.detach().requires_grad_(requires_grad) if t.is_floating_point() else t


@st.composite
def _weight_spec(draw):
    bs = draw(st.sampled_from(BLOCKSIZES[:5]))
    return {
        "N": draw(st.sampled_from(N_SIZES)),
        "K": bs * draw(st.sampled_from([1, 2, 3, 5])),
        "blocksize": bs,
        "quant_type": draw(st.sampled_from(QUANT_TYPES)),
        "double_quant": draw(st.booleans()),
        "w_seed": draw(seeds()),
    }


def _make_weight(spec):
    w = rand((spec["N"], spec["K"]), seed=spec["w_seed"])
    return qlora_ext.quantize_4bit(w, spec["blocksize"], spec["quant_type"], spec["double_quant"])


def _x_shape(draw, K):
    lead = draw(st.sampled_from([[], [1], [2], [3, 1]]))
    return [*lead, draw(st.sampled_from(M_SIZES)), K]


# ---- matmul_4bit --------------------------------------------------------------------------------

MM_BAD = {
    "x_type": "x",
    "x_dtype": "x",
    "x_lastdim": "x",
    "x_0dim": "x",
    "packed_short": "packed",
    "packed_type": "packed",
    "state_type": "state",
    "state_1d": "state",
    "state_k_ragged": "state",
    "bias_shape": "bias",
    "bias_dtype": "bias",
    "bias_type": "bias",
}


@st.composite
def matmul_spec(draw):
    fault = draw(st.sampled_from([None] * 12 + list(MM_BAD)))
    wspec = draw(_weight_spec())
    xshape = _x_shape(draw, wspec["K"])
    return {
        **wspec,
        "fault": fault,
        "x": draw(
            tensor_spec(
                xshape,
                dtypes=BAD_X_DTYPES if fault == "x_dtype" else X_DTYPES,
                values=VALUES_X,
                layouts=LAYOUTS,
            )
        ),
        "bias": draw(st.sampled_from([None, "float32", "same", "bfloat16"])),
        "grad": draw(st.booleans()),
        "seed": draw(seeds()),
    }


def _apply_mm_fault(spec, x, packed, state, bias):
    f = spec["fault"]
    N, K = spec["N"], spec["K"]
    if f == "x_type":
        x = x.tolist()
    elif f == "x_lastdim":
        x = torch.randn(*x.shape[:-1], K + 1)
    elif f == "x_0dim":
        x = torch.tensor(1.0)
    elif f == "packed_short":
        packed = packed[:-1]
    elif f == "packed_type":
        packed = packed.numpy()
    elif f == "state_type":
        state = state.as_dict()
    elif f == "state_1d":
        state.shape = torch.Size([N * K])
    elif f == "state_k_ragged":
        w = rand((N, K + 2), seed=spec["seed"])
        packed, state = qlora_ext.quantize_4bit(w, spec["blocksize"], spec["quant_type"])
        x = torch.randn(*x.shape[:-1], K + 2)
    elif f == "bias_shape":
        bias = torch.zeros(N + 1)
    elif f == "bias_dtype":
        bias = torch.zeros(N, dtype=torch.int32)
    elif f == "bias_type":
        bias = [0.0] * N
    return x, packed, state, bias


def _bias(spec, x_dtype):
    if spec["bias"] is None:
        return None
    dt = x_dtype if spec["bias"] == "same" else dtype_of(spec["bias"])
    if not dt.is_floating_point:
        dt = torch.float32
    return rand((spec["N"],), dt, spec["seed"] + 1)


def check_matmul(spec):
    packed, state = _make_weight(spec)
    x = build(spec["x"])
    bias = _bias(spec, x.dtype)
    if spec["fault"]:
        x, packed, state, bias = _apply_mm_fault(spec, x, packed, state, bias)
        return expect_error(
            lambda: qlora_ext.matmul_4bit(x, packed, state, bias), [MM_BAD[spec["fault"]]]
        )
    grad = spec["grad"]
    x = _leaf(x, grad)
    bias = None if bias is None else _leaf(bias, grad)
    y = qlora_ext.matmul_4bit(x, packed, state, bias)
    W = _weight_f64(packed, state)
    x64 = x.detach().double()
    ref = x64 @ W.t() + (0 if bias is None else bias.detach().double())
    mag = x64.abs() @ W.abs().t() + (0 if bias is None else bias.detach().double().abs())
    u = _acc_unit(x.dtype)
    nan_rows = x64.isnan().any(-1, keepdim=True).expand_as(ref)
    check_product(y, ref, mag, spec["K"], u, x.dtype, "matmul_4bit", nan_rows)
    if not grad:
        return None
    G = rand(y.shape, x.dtype, spec["seed"] + 2)
    y.backward(G)
    G64 = G.double()
    check_product(x.grad, G64 @ W, G64.abs() @ W.abs(), spec["N"], u, x.dtype, "x.grad")
    if bias is not None:
        rows = G64.reshape(-1, spec["N"])
        check_product(
            bias.grad, rows.sum(0), rows.abs().sum(0), rows.shape[0], UNIT[x.dtype],
            bias.dtype, "bias.grad",
        )  # fmt: skip
    return None


# ---- lora_4bit ---------------------------------------------------------------------------------

LORA_BAD = {
    "x_type": "x",
    "x_dtype": "x",
    "x_lastdim": "x",
    "state_type": "state",
    "lora_A_shape": "lora_A",
    "lora_A_rank0": "lora_A",
    "lora_A_dtype": "lora_A",
    "lora_A_type": "lora_A",
    "lora_B_shape": "lora_B",
    "lora_B_dtype": "lora_B",
    "scale_nan": "scale",
    "scale_inf": "scale",
    "scale_str": "scale",
    "dropout_one": "dropout_p",
    "dropout_neg": "dropout_p",
    "dropout_nan": "dropout_p",
    "dropout_str": "dropout_p",
    "seed_int32": "seed",
    "seed_two": "seed",
    "bias_shape": "bias",
}


@st.composite
def lora_spec(draw):
    fault = draw(st.sampled_from([None] * 14 + list(LORA_BAD)))
    wspec = draw(_weight_spec())
    return {
        **wspec,
        "fault": fault,
        "x": draw(
            tensor_spec(
                _x_shape(draw, wspec["K"]),
                dtypes=BAD_X_DTYPES if fault == "x_dtype" else X_DTYPES,
                values=("normal", "normal", "huge", "subnormal", "zeros", "nan"),
            )
        ),
        "r": draw(st.sampled_from([1, 2, 3, 8, 16])),
        "ab_dtype": draw(st.sampled_from(["float32", "float32", "bfloat16", "float64"])),
        "scale": draw(st.sampled_from([0.0, 1.0, 2.0, -0.5, 1e-3, 64.0])),
        "dropout_p": draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 0.9])),
        "bias": draw(st.booleans()),
        "grad": draw(st.booleans()),
        "seed": draw(seeds()),
    }


def _lora_args(spec):
    packed, state = _make_weight(spec)
    N, K, r = spec["N"], spec["K"], spec["r"]
    x = build(spec["x"])
    ab = dtype_of(spec["ab_dtype"])
    if ab == torch.float64 and x.dtype != torch.float64:
        ab = torch.float32
    A = rand((r, K), ab, spec["seed"] + 3) * 0.1
    B = rand((N, r), ab, spec["seed"] + 4) * 0.1
    seed = torch.tensor([spec["seed"] * 7919 - 2**40], dtype=torch.int64)
    bias = rand((N,), torch.float32, spec["seed"] + 5) if spec["bias"] else None
    args = dict(
        x=x, packed=packed, state=state, lora_A=A, lora_B=B, scale=spec["scale"],
        dropout_p=spec["dropout_p"], seed=seed, bias=bias,
    )  # fmt: skip
    return args


def _apply_lora_fault(spec, a):
    f = spec["fault"]
    N, K, r = spec["N"], spec["K"], spec["r"]
    change = {
        "x_type": lambda: {"x": a["x"].tolist()},
        "x_lastdim": lambda: {"x": torch.randn(3, K + 1)},
        "state_type": lambda: {"state": a["state"].as_dict()},
        "lora_A_shape": lambda: {"lora_A": torch.randn(r, K + 1)},
        "lora_A_rank0": lambda: {"lora_A": torch.randn(0, K), "lora_B": torch.randn(N, 0)},
        "lora_A_dtype": lambda: {"lora_A": torch.ones(r, K, dtype=torch.int32)},
        "lora_A_type": lambda: {"lora_A": [[0.0] * K] * r},
        "lora_B_shape": lambda: {"lora_B": torch.randn(N + 1, r)},
        "lora_B_dtype": lambda: {"lora_B": torch.ones(N, r, dtype=torch.bool)},
        "scale_nan": lambda: {"scale": math.nan},
        "scale_inf": lambda: {"scale": -math.inf},
        "scale_str": lambda: {"scale": "two"},
        "dropout_one": lambda: {"dropout_p": 1.0},
        "dropout_neg": lambda: {"dropout_p": -0.1},
        "dropout_nan": lambda: {"dropout_p": math.nan},
        "dropout_str": lambda: {"dropout_p": "half"},
        "seed_int32": lambda: {"seed": torch.tensor([1], dtype=torch.int32), "dropout_p": 0.5},
        "seed_two": lambda: {"seed": torch.tensor([1, 2]), "dropout_p": 0.5},
        "bias_shape": lambda: {"bias": torch.zeros(N + 2)},
    }.get(f)
    if change is not None:
        a.update(change())
    return a


def check_lora(spec):
    a = _lora_args(spec)
    if spec["fault"]:
        a = _apply_lora_fault(spec, a)
        return expect_error(lambda: qlora_ext.lora_4bit(**a), [LORA_BAD[spec["fault"]]])
    grad = spec["grad"]
    x, A, B, bias = (
        _leaf(a[k], grad) if a[k] is not None else None for k in ("x", "lora_A", "lora_B", "bias")
    )
    a.update(x=x, lora_A=A, lora_B=B, bias=bias)
    y = qlora_ext.lora_4bit(**a)
    N, K, r, s, p = spec["N"], spec["K"], spec["r"], a["scale"], a["dropout_p"]
    W = _weight_f64(a["packed"], a["state"])
    x64 = x.detach().double()
    keep = R.lora_dropout_mask(int(a["seed"]), x.numel(), p).reshape(x.shape) if p else None
    d64 = torch.where(keep, x64 / (1 - p), 0.0) if p else x64  # as R.lora_4bit
    A64, B64 = A.detach().double(), B.detach().double()
    b64 = 0 if bias is None else bias.detach().double()
    ref = x64 @ W.t() + s * (d64 @ A64.t()) @ B64.t() + b64
    mag = (
        x64.abs() @ W.abs().t()
        + abs(s) * (d64.abs() @ A64.abs().t()) @ B64.abs().t()
        + (0 if bias is None else b64.abs())
    )
    u = _acc_unit(x.dtype)
    # dropout(x) and xa are intermediates in the accumulation format (Note [LoRA
    # accumulation]); where they overflow it, the result may be anything but NaN-free rows.
    acc_max = torch.finfo(torch.float64 if u == UNIT[torch.float64] else torch.float32).max
    xa_mag = d64.abs() @ A64.abs().t()
    overflow = bool((d64.abs() > acc_max / 4).any() or (xa_mag > acc_max / 4).any())
    if overflow:
        mag = torch.full_like(mag, math.inf)
    nan_rows = x64.isnan().any(-1, keepdim=True).expand_as(ref)
    check_product(y, ref, mag, K + r, u, x.dtype, "lora_4bit", nan_rows)
    if not grad:
        return None
    G = rand(y.shape, x.dtype, spec["seed"] + 6)
    y.backward(G)
    G64 = G.double()
    g = s * G64 @ B64  # dL/dxa
    gmag = abs(s) * G64.abs() @ B64.abs()
    mask = keep.double() / (1 - p) if p else 1
    gx = G64 @ W + (g @ A64) * mask
    gx_mag = G64.abs() @ W.abs() + (gmag @ A64.abs()) * mask
    if overflow:  # an intermediate overflowed the accumulation format: nothing to hold it to
        return None
    check_product(x.grad, gx, gx_mag, N + r + 1, u, x.dtype, "x.grad")
    rows = lambda t, n: t.reshape(-1, n)  # noqa: E731
    gA = rows(g, r).t() @ rows(d64, K)
    gA_mag = rows(gmag, r).t() @ rows(d64.abs(), K)
    check_product(A.grad, gA, gA_mag, N + rows(x64, K).shape[0], u, A.dtype, "lora_A.grad")
    xa = rows(d64, K) @ A64.t()
    xa_mag = rows(d64.abs(), K) @ A64.abs().t()
    gB = s * rows(G64, N).t() @ xa
    gB_mag = abs(s) * rows(G64.abs(), N).t() @ xa_mag
    check_product(B.grad, gB, gB_mag, K + rows(x64, K).shape[0], u, B.dtype, "lora_B.grad")
    if bias is not None:
        G2 = rows(G64, N)
        check_product(
            bias.grad, G2.sum(0), G2.abs().sum(0), G2.shape[0], UNIT[x.dtype], bias.dtype,
            "bias.grad",
        )  # fmt: skip
    return None


# ---- Linear4bit / LoRALinear4bit -------------------------------------------------------------

MOD_BAD = {
    "in_features_zero": "in_features",
    "in_features_ragged": "in_features",
    "in_features_float": "in_features",
    "out_features_neg": "out_features",
    "out_features_str": "out_features",
    "blocksize": "blocksize",
    "quant_type": "quant_type",
    "compute_dtype_int": "compute_dtype",
    "compute_dtype_str": "compute_dtype",
    "dtype_int": "dtype",
    "r_zero": "r",
    "r_float": "r",
    "r_bool": "r",
    "dropout_one": "dropout",
    "dropout_nan": "dropout",
    "linear_type": "linear",
    "x_lastdim": "x",
    "x_dtype": "x",
}


@st.composite
def module_spec(draw):
    fault = draw(st.sampled_from([None] * 10 + list(MOD_BAD)))
    bs = draw(st.sampled_from(BLOCKSIZES[:4]))
    K = bs * draw(st.sampled_from([1, 2, 3]))
    lora = draw(st.booleans())
    if fault in ("r_zero", "r_float", "r_bool", "dropout_one", "dropout_nan"):
        lora = True
    return {
        "fault": fault,
        "lora": lora,
        "from_linear": draw(st.booleans()),
        "in": K,
        "out": draw(st.sampled_from(N_SIZES)),
        "blocksize": bs,
        "quant_type": draw(st.sampled_from(QUANT_TYPES)),
        "double_quant": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "compute_dtype": draw(st.sampled_from([None, "float32", "bfloat16", "float16"])),
        "r": draw(st.sampled_from([1, 4, 16])),
        "x": draw(
            tensor_spec(
                [draw(st.sampled_from([0, 1, 3, 17])), K],
                dtypes=BAD_X_DTYPES if fault == "x_dtype" else X_DTYPES,
                values=("normal", "zeros", "subnormal"),
            )
        ),
        "seed": draw(seeds()),
    }


def _module_kwargs(spec):
    f = spec["fault"]
    kw = dict(
        in_features=spec["in"], out_features=spec["out"], bias=spec["bias"],
        compute_dtype=None if spec["compute_dtype"] is None else dtype_of(spec["compute_dtype"]),
        quant_type=spec["quant_type"], blocksize=spec["blocksize"],
        double_quant=spec["double_quant"],
    )  # fmt: skip
    if spec["lora"]:
        kw.update(r=spec["r"], alpha=2.0 * spec["r"], dropout=0.0)
    bad = {
        "in_features_zero": {"in_features": 0},
        "in_features_ragged": {"in_features": spec["in"] + 1},
        "in_features_float": {"in_features": float(spec["in"])},
        "out_features_neg": {"out_features": -3},
        "out_features_str": {"out_features": "eight"},
        "blocksize": {"blocksize": 48},
        "quant_type": {"quant_type": "nf8"},
        "compute_dtype_int": {"compute_dtype": torch.int32},
        "compute_dtype_str": {"compute_dtype": "bfloat16"},
        "dtype_int": {"dtype": torch.int64},
        "r_zero": {"r": 0},
        "r_float": {"r": 2.5},
        "r_bool": {"r": True},
        "dropout_one": {"dropout": 1.0},
        "dropout_nan": {"dropout": math.nan},
    }.get(f, {})
    kw.update(bad)
    return kw


def _construct(spec, kw):
    cls = LoRALinear4bit if spec["lora"] else Linear4bit
    if not spec["from_linear"] or "features" in str(spec["fault"]):
        return cls(**kw)
    if spec["fault"] == "linear_type":
        return cls.from_linear(torch.nn.Conv1d(1, 1, 1))
    if spec["fault"] == "dtype_int":
        kw.pop("dtype")
        return cls.from_linear(torch.nn.Linear(1, 1).to(torch.float64).to(torch.int64))
    lin = torch.nn.Linear(kw["in_features"], kw["out_features"], bias=kw["bias"])
    extra = {k: kw[k] for k in ("quant_type", "blocksize", "double_quant", "compute_dtype")}
    if spec["lora"]:
        extra.update(r=kw["r"], alpha=kw["alpha"], dropout=kw["dropout"])
    return cls.from_linear(lin, **extra)


def check_module(spec):
    f = spec["fault"]
    torch.manual_seed(spec["seed"])
    kw = _module_kwargs(spec)
    if f and f not in ("x_lastdim", "x_dtype"):
        if f == "linear_type" and not spec["from_linear"]:
            return None
        return expect_error(lambda: _construct(spec, kw), [MOD_BAD[f]])
    m = _construct(spec, kw).eval()
    x = build(spec["x"])
    if spec["lora"]:
        with torch.no_grad():
            m.lora_B.weight.normal_(0, 0.1)
    if f:
        if f == "x_lastdim":
            x = torch.randn(2, spec["in"] + 1)
        return expect_error(lambda: m(x), ["x"])
    y = m(x)
    cd = m.compute_dtype or x.dtype
    xc = x.to(cd).double()
    W = _weight_f64(m.weight, m.quant_state)
    bias = 0 if m.bias is None else m.bias.detach().to(cd).double()
    ref = xc @ W.t() + bias
    mag = xc.abs() @ W.abs().t() + (0 if m.bias is None else abs(bias))
    terms = spec["in"]
    if spec["lora"]:
        A, B = m.lora_A.weight.double(), m.lora_B.weight.double()
        ref = ref + m.scaling * (xc @ A.t()) @ B.t()
        mag = mag + m.scaling * (xc.abs() @ A.abs().t()) @ B.abs().t()
        terms += m.r
    # Computed in compute_dtype, then cast back to x's dtype: two output roundings, checked
    # against the coarser format of the two.
    out_dtype = cd if UNIT[cd] > UNIT[x.dtype] else x.dtype
    if y.dtype != x.dtype:
        raise Mismatch(f"module output dtype {y.dtype}, input {x.dtype}")
    # The cast back to x's dtype may land in its subnormals: half its smallest step more.
    underflow = torch.finfo(x.dtype).smallest_normal * UNIT[x.dtype]
    check_product(
        y.to(out_dtype), ref, mag, terms, _acc_unit(cd), out_dtype, "module forward", None,
        underflow,
    )  # fmt: skip
    return None
