"""Fuzz areas for quantization: quantize_4bit, dequantize_4bit, the 8-bit blockwise pair and
QuantState.from_dict. Each area is a hypothesis strategy of specs and a check that returns None
(the reference's result, or an exception naming the right argument) or what went wrong.

Tolerances: all of these are bit-exact against tests/reference.py. The codes, the absmax and
the dequantized values are each one fp32 rounding of the same operations in the same order
(the kernels and the reference agree on it; tests/test_quant.py holds them to it too), so any
difference is a bug, not rounding.
"""

from __future__ import annotations

import json
import math

import torch
from fuzz_support import (
    FLOATS,
    LAYOUTS,
    NON_FLOATS,
    NONFINITE,
    VALUES,
    build,
    dtype_of,
    expect_error,
    judge,
    same_bits,
    seeds,
    shapes,
    tensor_spec,
)
from hypothesis import strategies as st

import qlora_ext
import reference as R
from qlora_ext.quant_state import NestedState, QuantState

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
BAD_BLOCKSIZES = (0, -64, 16, 48, 63, 100, 8192, 2**31, 2**62, "64", 64.5)
QUANT_TYPES = ("nf4", "fp4", "int4")
BAD_QUANT_TYPES = ("NF4", "nf8", "", "fp8", None, 4)


def _ref_quantize(w, blocksize, quant_type, double_quant):
    """(packed, absmax or its codes, nested absmax, offset) as quantize_4bit must return them."""
    packed, absmax = R.quantize_4bit(w, blocksize, quant_type)
    if not double_quant:
        return packed, absmax, None, None
    offset = absmax.mean() if absmax.numel() else torch.zeros(())
    if not torch.isfinite(offset):
        return packed, None, None, offset
    q, nabs = R.quantize_blockwise_8bit(absmax - offset, R.dynamic_code_8bit(), 256)
    return packed, q, nabs, offset


def _state_absmax(state: QuantState) -> torch.Tensor:
    """The fp32 absmax a state stands for (its nested step undone as the reference does)."""
    if state.state2 is None:
        return state.absmax
    s2 = state.state2
    am = R.dequantize_blockwise_8bit(state.absmax, s2.absmax, s2.code, s2.blocksize, torch.float32)
    return am + state.offset


# ---- quantize_4bit -----------------------------------------------------------------------------


@st.composite
def quantize_4bit_spec(draw):
    fault = draw(st.sampled_from([None] * 6 + ["w_type", "w_dtype", "w_nonfinite", "blocksize"]))
    fault = fault or draw(st.sampled_from([None] * 8 + ["quant_type"]))
    spec = {
        "fault": fault,
        "w": draw(
            tensor_spec(
                shapes(),
                dtypes=NON_FLOATS if fault == "w_dtype" else FLOATS,
                values=NONFINITE if fault == "w_nonfinite" else VALUES,
            )
        ),
        "blocksize": draw(st.sampled_from(BAD_BLOCKSIZES if fault == "blocksize" else BLOCKSIZES)),
        "quant_type": draw(
            st.sampled_from(BAD_QUANT_TYPES if fault == "quant_type" else QUANT_TYPES)
        ),
        "double_quant": draw(st.booleans()),
        "w_as": draw(st.sampled_from(["list", "ndarray", "none"])) if fault == "w_type" else None,
    }
    if fault == "w_nonfinite" and not spec["w"]["shape"]:
        spec["w"]["shape"] = [1]
    if fault == "w_nonfinite" and 0 in spec["w"]["shape"]:
        spec["w"]["shape"] = [s or 1 for s in spec["w"]["shape"]]
    return spec


def check_quantize_4bit(spec):
    w = build(spec["w"])
    if spec["w_as"]:
        w = {"list": w.tolist(), "ndarray": w.float().numpy(), "none": None}[spec["w_as"]]
    args = (w, spec["blocksize"], spec["quant_type"], spec["double_quant"])
    fault = spec["fault"]
    if fault:
        name = {"w_type": "w", "w_dtype": "w", "w_nonfinite": "w"}.get(fault, fault)
        return expect_error(lambda: qlora_ext.quantize_4bit(*args), [name])
    rp, ra, rn, ro = _ref_quantize(w, spec["blocksize"], spec["quant_type"], spec["double_quant"])
    if ro is not None and not torch.isfinite(ro):
        # The mean of the block absmax overflows float32: refused, naming w.
        return expect_error(lambda: qlora_ext.quantize_4bit(*args), ["w"])
    packed, state = qlora_ext.quantize_4bit(*args)
    same_bits(packed.reshape(-1), rp, "packed")
    same_bits(state.absmax, ra, "state.absmax")
    if rn is not None:
        same_bits(state.state2.absmax, rn, "state.state2.absmax")
        same_bits(state.offset.reshape(()), ro.reshape(()), "state.offset")
    if packed.shape != (math.ceil(w.numel() / 2), 1):
        return f"packed has shape {list(packed.shape)}"
    if state.shape != w.shape or state.dtype != w.dtype:
        return f"state describes {state.dtype}{list(state.shape)}, w is {w.dtype}{list(w.shape)}"
    return None


# ---- dequantize_4bit -----------------------------------------------------------------------------

# Tampering that must be refused, and the argument the message must name.
DEQ_BAD = {
    "packed_type": "packed",
    "packed_short": "packed",
    "packed_long": "packed",
    "state_type": "state",
    "absmax_half": "state",
    "absmax_short": "state",
    "absmax_list": "state",
    "shape_other": "state",
    "shape_negative": "state",
    "shape_overflow": "state",
    "dtype_int": "state",
    "dtype_f64": "state",
    "dtype_str": "state",
    "blocksize_bad": "state",
    "blocksize_str": "state",
    "quant_type_bad": "state",
    "offset_none": "state",
    "nested_absmax_short": "state",
    "nested_code_short": "state",
    "nested_blocksize_zero": "state",
}
# Changes a valid state may legitimately carry: the result must then be the reference's for
# the state as it now stands (another blocksize over the same blocks, another code table,
# another tensor's absmax of the same size, bytes stored as another dtype or strided).
DEQ_MAYBE = ("blocksize_other", "quant_type_other", "absmax_other", "packed_storage", "packed_view")


@st.composite
def dequantize_4bit_spec(draw):
    tamper = draw(st.sampled_from([None] * 8 + list(DEQ_BAD) + list(DEQ_MAYBE)))
    return {
        "w": draw(tensor_spec(shapes(), values=("normal", "huge", "subnormal", "zeros"))),
        "blocksize": draw(st.sampled_from(BLOCKSIZES)),
        "quant_type": draw(st.sampled_from(QUANT_TYPES)),
        "double_quant": True
        if tamper in ("offset_none",) or "nested" in str(tamper)
        else draw(st.booleans()),
        "tamper": tamper,
        "other": draw(st.sampled_from(BLOCKSIZES + QUANT_TYPES)),
        "seed": draw(seeds()),
    }


def _tamper_dequant(spec, packed, state):
    t = spec["tamper"]
    gen = torch.Generator().manual_seed(spec["seed"])
    s = QuantState(**{f: getattr(state, f) for f in state.__dataclass_fields__})
    if t == "packed_type":
        packed = packed.tolist()
    elif t == "packed_short":
        packed = packed.reshape(-1)[:-1] if packed.numel() else torch.zeros(1, dtype=torch.uint8)
    elif t == "packed_long":
        packed = torch.cat([packed.reshape(-1), torch.zeros(2, dtype=torch.uint8)])
    elif t == "packed_storage" and packed.numel() % 4 == 0:
        packed = packed.reshape(-1).view(torch.float32)  # bitsandbytes' quant_storage
    elif t == "packed_view":
        packed = torch.stack([packed.reshape(-1), torch.zeros_like(packed.reshape(-1))], 1)[:, 0]
    elif t == "state_type":
        s = state.as_dict()
    elif t == "absmax_half":
        s.absmax = s.absmax.half()
    elif t == "absmax_short":
        a = s.absmax
        s.absmax = a[:-1] if a.numel() >= 2 else torch.cat([a, a.new_zeros(1)])
    elif t == "absmax_list":
        s.absmax = s.absmax.tolist()
    elif t == "absmax_other":
        s.absmax = (
            torch.randint(0, 256, s.absmax.shape, generator=gen).to(torch.uint8)
            if s.absmax.dtype == torch.uint8
            else torch.rand(s.absmax.shape, generator=gen)
        )
    elif t == "shape_other":
        s.shape = torch.Size([math.prod(s.shape) + 2])
    elif t == "shape_negative":
        s.shape = torch.Size([-1, *s.shape])
    elif t == "shape_overflow":
        s.shape = torch.Size([2**32, 2**32, *s.shape])
    elif t == "dtype_int":
        s.dtype = torch.int32
    elif t == "dtype_f64":
        s.dtype = torch.float64
    elif t == "dtype_str":
        s.dtype = "float32"
    elif t == "blocksize_bad":
        s.blocksize = 48
    elif t == "blocksize_str":
        s.blocksize = str(s.blocksize)
    elif t == "blocksize_other" and spec["other"] in BLOCKSIZES:
        s.blocksize = spec["other"]
    elif t == "quant_type_bad":
        s.quant_type = "nf8"
    elif t == "quant_type_other" and spec["other"] in QUANT_TYPES:
        s.quant_type = spec["other"]
    elif t == "offset_none":
        s.offset = None
    elif t.startswith("nested_"):
        s2 = state.state2
        s.state2 = NestedState(s2.absmax, s2.code, s2.blocksize)
        if t == "nested_absmax_short":
            s.state2.absmax = torch.cat([s2.absmax, torch.ones(1)])  # one too many, even empty
        elif t == "nested_code_short":
            s.state2.code = s2.code[:128]
        else:
            s.state2.blocksize = 0
    return packed, s


def quantize_setup(w, blocksize, quant_type, double_quant):
    """quantize_4bit for a case that needs a valid state: without double quantization where w
    is too large for it (quantize_4bit refuses that, naming w; checked in its own area)."""
    try:
        return qlora_ext.quantize_4bit(w, blocksize, quant_type, double_quant)
    except ValueError as e:
        if "too large to double-quantize" not in str(e):
            raise
        return qlora_ext.quantize_4bit(w, blocksize, quant_type, False)


def check_dequantize_4bit(spec):
    w = build(spec["w"])
    packed, state = quantize_setup(w, spec["blocksize"], spec["quant_type"], spec["double_quant"])
    t = spec["tamper"]
    if state.state2 is None and (t == "offset_none" or str(t).startswith("nested_")):
        return None  # w was too large to double-quantize: nothing nested to tamper with
    if t:
        packed, state = _tamper_dequant(spec, packed, state)
    if t in DEQ_BAD:
        return expect_error(
            lambda: qlora_ext.dequantize_4bit(packed, state), [DEQ_BAD[spec["tamper"]]]
        )
    try:
        got = qlora_ext.dequantize_4bit(packed, state)
    except Exception as e:  # noqa: BLE001
        if spec["tamper"] in DEQ_MAYBE:  # refused: then it must say why, naming the state
            return judge(e, ["state", "packed"])
        raise
    u8 = packed.contiguous().view(torch.uint8).reshape(-1)
    want = R.dequantize_4bit(
        u8, _state_absmax(state), state.blocksize, state.quant_type, state.shape, state.dtype
    )
    same_bits(got, want, "dequantize_4bit")
    return None


# ---- the 8-bit blockwise pair -------------------------------------------------------------------

BS8 = (1, 2, 7, 64, 256, 4096, 2**20, 2**62, 2**63 - 1)
BAD_BS8 = (0, -1, -256, "256", 2.5)
Q8_BAD = {
    "A_type": "A",
    "A_dtype": "A",
    "A_nonfinite": "A",
    "blocksize": "blocksize",
    "code_short": "code",
    "code_f64": "code",
    "code_list": "code",
    "code_unsorted": "code",
    "code_nan": "code",
}
DQ8_BAD = {
    "q_dtype": "q",
    "q_type": "q",
    "absmax_short": "absmax",
    "absmax_f64": "absmax",
    "absmax_list": "absmax",
    "dtype_int": "dtype",
    "dtype_f64": "dtype",
    "blocksize": "blocksize",
    "code_short": "code",
}


@st.composite
def blockwise_8bit_spec(draw):
    q_fault = draw(st.sampled_from([None] * 8 + list(Q8_BAD)))
    dq_fault = None if q_fault else draw(st.sampled_from([None] * 6 + list(DQ8_BAD)))
    return {
        "q_fault": q_fault,
        "dq_fault": dq_fault,
        "A": draw(
            tensor_spec(
                shapes(),
                dtypes=NON_FLOATS if q_fault == "A_dtype" else FLOATS,
                values=NONFINITE if q_fault == "A_nonfinite" else VALUES,
                layouts=LAYOUTS,
            )
        ),
        "blocksize": draw(st.sampled_from(BAD_BS8 if q_fault == "blocksize" else BS8)),
        "dq_blocksize": draw(st.sampled_from(BAD_BS8)) if dq_fault == "blocksize" else None,
        "default_code": draw(st.booleans()),
        "out_dtype": draw(st.sampled_from(FLOATS)),
        "seed": draw(seeds()),
    }


def _code(fault, gen):
    code = qlora_ext.dynamic_code_8bit()
    if fault == "code_short":
        return code[:128]
    if fault == "code_f64":
        return code.double()
    if fault == "code_list":
        return code.tolist()
    if fault == "code_unsorted":
        return code[torch.randperm(256, generator=gen)]
    if fault == "code_nan":
        code[int(torch.randint(256, (1,), generator=gen))] = math.nan
        return code
    return code


def check_blockwise_8bit(spec):
    gen = torch.Generator().manual_seed(spec["seed"])
    A = build(spec["A"])
    qf, dqf = spec["q_fault"], spec["dq_fault"]
    if qf == "A_nonfinite" and A.numel() == 0:
        qf = None
    if qf == "A_type":
        A = A.tolist()
    code = _code(qf, gen)
    bs = spec["blocksize"]
    if qf:
        use_default = spec["default_code"] and not qf.startswith("code")
        args = (A, None, bs) if use_default else (A, code, bs)
        return expect_error(lambda: qlora_ext.quantize_blockwise_8bit(*args), [Q8_BAD[qf]])
    q, absmax = qlora_ext.quantize_blockwise_8bit(A, None if spec["default_code"] else code, bs)
    n = A.numel()
    ref_bs = min(bs, max(n, 1))  # one block either way; the reference pads to a whole block
    rq, ra = R.quantize_blockwise_8bit(A, code, ref_bs)
    same_bits(q, rq, "q")
    same_bits(absmax, ra, "absmax")
    dq_args = dict(q=q, absmax=absmax, code=code, blocksize=bs, dtype=dtype_of(spec["out_dtype"]))
    if dqf:
        dq_args.update(
            {
                "q_dtype": {"q": q.to(torch.int16)},
                "q_type": {"q": q.tolist()},
                "absmax_short": {"absmax": absmax[:-1] if n else torch.ones(1)},
                "absmax_f64": {"absmax": absmax.double()},
                "absmax_list": {"absmax": absmax.tolist()},
                "dtype_int": {"dtype": torch.int32},
                "dtype_f64": {"dtype": torch.float64},
                "blocksize": {"blocksize": spec["dq_blocksize"]},
                "code_short": {"code": code[:100]},
            }[dqf]
        )
        return expect_error(lambda: qlora_ext.dequantize_blockwise_8bit(**dq_args), [DQ8_BAD[dqf]])
    got = qlora_ext.dequantize_blockwise_8bit(**dq_args)
    want = R.dequantize_blockwise_8bit(q, absmax, code, bs, dtype_of(spec["out_dtype"]))
    same_bits(got, want, "dequantize_blockwise_8bit")
    return None


# ---- QuantState.from_dict ----------------------------------------------------------------------

# (what is done to the dict, the key the message must name)
FD_TAMPER = {
    "drop": None,  # the key dropped
    "unknown_key": "bogus",
    "tensor_to_list": None,
    "tensor_to_none": None,
    "blob_garbage": "quant_state",
    "blob_truncated": "quant_state",
    "blob_json_list": "quant_state",
    "blob_key_mismatch": "quant_state",
    "blocksize_str": "blocksize",
    "blocksize_bad": "blocksize",
    "shape_str": "shape",
    "shape_negative": "shape",
    "shape_overflow": "shape",
    "dtype_int": "dtype",
    "dtype_bogus": "dtype",
    "quant_type_bad": "quant_type",
    "nested_offset_str": "nested_offset",
    "nested_blocksize_zero": "nested_blocksize",
    "quant_map_other": "quant_map",
    "quant_map_short": "quant_map",
    "absmax_half": "absmax",
}


@st.composite
def from_dict_spec(draw):
    return {
        "shape": draw(shapes(max_dims=2, max_numel=5000)),
        "blocksize": draw(st.sampled_from(BLOCKSIZES[:4])),
        "quant_type": draw(st.sampled_from(QUANT_TYPES)),
        "double_quant": draw(st.booleans()),
        "packed": draw(st.booleans()),
        "prefix": draw(st.sampled_from(["", "weight.", "model.layers.0.q_proj.weight."])),
        "tamper": draw(st.sampled_from([None] * 6 + list(FD_TAMPER))),
        "pick": draw(st.integers(0, 100)),
        "seed": draw(seeds()),
    }


def _tamper_dict(spec, d: dict):
    """The tampered dict and the key the error must name (None: the dict is still valid)."""
    t = spec["tamper"]
    blob_key = next((k for k in d if "quant_state" in k), None)
    meta = None
    if blob_key is not None:
        meta = json.loads(bytes(d[blob_key].tolist()).decode())

    def set_meta(k, v):
        if meta is not None:
            meta[k] = v
            d[blob_key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        else:
            d[k] = v

    tensor_keys = [k for k, v in d.items() if isinstance(v, torch.Tensor) and k != blob_key]
    pick = spec["pick"]
    if t == "drop":
        key = sorted(d)[pick % len(d)]
        del d[key]
        return d, key.split(".")[-1] if "quant_state" not in key else "quant_state"
    if t == "unknown_key":
        d["bogus"] = torch.zeros(1)
        return d, "bogus"
    if t in ("tensor_to_list", "tensor_to_none"):
        key = sorted(tensor_keys)[pick % len(tensor_keys)]
        d[key] = d[key].tolist() if t == "tensor_to_list" else None
        return d, key.split(".")[-1]
    if t.startswith("blob_"):
        if blob_key is None:
            return d, None
        if t == "blob_garbage":
            d[blob_key] = torch.tensor([0xFF, 0xFE, 0x00], dtype=torch.uint8)
        elif t == "blob_truncated":
            d[blob_key] = d[blob_key][: len(d[blob_key]) // 2]
        elif t == "blob_json_list":
            d[blob_key] = torch.tensor(list(b"[1, 2, 3]"), dtype=torch.uint8)
        else:
            other = {"nf4": "fp4", "fp4": "int4", "int4": "nf4"}[meta["quant_type"]]
            d[blob_key.rsplit("__", 1)[0] + "__" + other] = d.pop(blob_key)
        return d, "quant_state"
    name = FD_TAMPER[t]
    prefix = spec["prefix"]
    value = {
        "blocksize_str": "sixty-four",
        "blocksize_bad": 48,
        "shape_str": "abc",
        "shape_negative": [-4, 16],
        "shape_overflow": [2**40, 2**40],
        "dtype_int": "int32",
        "dtype_bogus": "float99",
        "quant_type_bad": "nf8",
        "nested_offset_str": "x",
        "nested_blocksize_zero": 0,
    }.get(t)
    if t.startswith("nested") and prefix + "nested_absmax" not in d:
        return d, None
    if value is not None:
        if t == "quant_type_bad" and blob_key is not None:
            return d, None  # the blob key's type and the JSON's are covered by key_mismatch
        set_meta(name, value)
        return d, name
    key = prefix + name
    if t == "quant_map_other":
        d[key] = qlora_ext.get_4bit_code(
            {"nf4": "fp4", "fp4": "int4", "int4": "nf4"}[spec["quant_type"]]
        )
    elif t == "quant_map_short":
        d[key] = d[key][:8]
    elif t == "absmax_half":
        d[key] = d[key].half()
    return d, name


def check_from_dict(spec):
    w = torch.randn(spec["shape"], generator=torch.Generator().manual_seed(spec["seed"]))
    packed, state = qlora_ext.quantize_4bit(
        w, spec["blocksize"], spec["quant_type"], spec["double_quant"]
    )
    d = {spec["prefix"] + k: v for k, v in state.as_dict(packed=spec["packed"]).items()}
    name = None
    if spec["tamper"]:
        d, name = _tamper_dict(spec, d)
    try:
        s = QuantState.from_dict(d)
    except Exception as e:  # noqa: BLE001
        return judge(e, [name or "d"])
    # Accepted: the state must mean what the dict says, and dequantize must honour it or refuse.
    try:
        got = qlora_ext.dequantize_4bit(packed, s)
    except Exception as e:  # noqa: BLE001
        if name is None:
            return f"from_dict of an untampered dict gave a state dequantize refuses: {e!r}"
        return judge(e, ["state"])
    code = s.code
    p = packed.reshape(-1)
    q = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1).long()
    n = math.prod(s.shape)
    if code.numel() != 16 or q.numel() < n:
        return f"from_dict accepted quant_map {list(code.shape)} for {n} values"
    am = _state_absmax(s).float()
    want = (code.float()[q[:n]] * am[torch.arange(n) // s.blocksize]).to(s.dtype).reshape(s.shape)
    same_bits(got, want, "dequantize_4bit(packed, from_dict(d))")
    return None
