"""Fuzz areas for training: the paged optimizers' constructor and step, and load_adapter.

Optimizer tolerance: the kernels perform tests/reference.py's fp32 operations in the same
order, but torch's own kernels in the reference may contract a multiply-add (Note [AdamW
order]), so m, v and an fp32 parameter are held to 2 ulp of fp32 (rtol 2.4e-7) and a 16-bit
parameter to one ulp of its format (a 1-ulp fp32 difference can flip its rounding). The kernel's
state is copied into the reference after each step, so that such an ulp never compounds. In
the 8-bit optimizer a 1-ulp difference can move a moment across a code midpoint: codes may
differ by one index, the absmax by 2 ulp. A parameter with a non-finite gradient must come back
bit-identical with its state (skipped whole), and its step must not advance.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import torch
from fuzz_support import FLOATS, bits, build, dtype_of, expect_error, same_bits, seeds
from hypothesis import strategies as st
from torch import nn

import qlora_ext
import reference as R
from qlora_ext.functional import dynamic_map
from qlora_ext.optim import PagedAdamW, PagedAdamW8bit

OPT_BAD = {
    "lr_neg": "lr",
    "lr_nan": "lr",
    "lr_str": "lr",
    "betas_one": "betas",
    "betas_neg": "betas",
    "betas_len": "betas",
    "betas_nan": "betas",
    "betas_str": "betas",
    "eps_zero": "eps",
    "eps_nan": "eps",
    "eps_str": "eps",
    "wd_neg": "weight_decay",
    "wd_nan": "weight_decay",
    "amsgrad": "amsgrad",
    "foreach": "foreach",
    "unknown": "nesterov",
    "min_paged": "min_paged_numel",
    "margin": "margin_bytes",
    "param_f64": "params",
}
GRAD_VALUES = ("normal", "normal", "normal", "huge", "subnormal", "zeros", "nan", "inf")
P_SIZES = (0, 1, 2, 7, 255, 256, 257, 1031)


@st.composite
def optim_spec(draw):
    fault = draw(st.sampled_from([None] * 10 + list(OPT_BAD)))
    n_params = draw(st.integers(1, 3))
    return {
        "fault": fault,
        "eight_bit": draw(st.booleans()),
        "params": [
            {
                "shape": draw(st.sampled_from([[s] for s in P_SIZES] + [[3, 5], [17, 16], [2, 0]])),
                "dtype": draw(st.sampled_from(FLOATS)),
                "transposed": draw(st.booleans()),
                "has_grad": draw(st.sampled_from([True, True, True, False])),
            }
            for _ in range(n_params)
        ],
        "grads": [
            draw(st.lists(st.sampled_from(GRAD_VALUES), min_size=n_params, max_size=n_params))
            for _ in range(draw(st.integers(1, 3)))
        ],
        "lr": draw(st.sampled_from([0.0, 1e-3, 0.1, 10.0])),
        "betas": draw(st.sampled_from([(0.9, 0.999), (0.0, 0.0), (0.5, 0.9999)])),
        "eps": draw(st.sampled_from([1e-8, 1e-30, 1.0])),
        "weight_decay": draw(st.sampled_from([0.0, 1e-2, 5.0])),
        "seed": draw(seeds()),
    }


def _opt_kwargs(spec):
    kw = dict(
        lr=spec["lr"], betas=spec["betas"], eps=spec["eps"], weight_decay=spec["weight_decay"]
    )
    kw.update(
        {
            "lr_neg": {"lr": -1e-3},
            "lr_nan": {"lr": math.nan},
            "lr_str": {"lr": "fast"},
            "betas_one": {"betas": (1.0, 0.999)},
            "betas_neg": {"betas": (0.9, -0.5)},
            "betas_len": {"betas": (0.9,)},
            "betas_nan": {"betas": (math.nan, 0.999)},
            "betas_str": {"betas": "ab"},
            "eps_zero": {"eps": 0.0},
            "eps_nan": {"eps": math.nan},
            "eps_str": {"eps": "tiny"},
            "wd_neg": {"weight_decay": -1.0},
            "wd_nan": {"weight_decay": math.nan},
            "amsgrad": {"amsgrad": True},
            "foreach": {"foreach": True},
            "unknown": {"nesterov": True},
            "min_paged": {"min_paged_numel": 0},
            "margin": {"margin_bytes": -1},
        }.get(spec["fault"], {})
    )
    return kw


def _param(p, i, spec):
    dt = torch.float64 if spec["fault"] == "param_f64" and i == 0 else dtype_of(p["dtype"])
    shape = list(p["shape"])
    t = build({"shape": shape, "dtype": "float32", "layout": "contiguous", "values": "normal",
               "seed": spec["seed"] + i}).to(dt)  # fmt: skip
    if p["transposed"] and len(shape) == 2:
        t = t.t().contiguous().t()  # same values, column-major
    return nn.Parameter(t)


def _grad(p, kind, seed):
    # A transposed (strided) gradient: autograd can produce one.
    spec = {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."),
            "layout": "transposed", "values": kind, "seed": seed}  # fmt: skip
    return build(spec)


def _ref_step(eight_bit, p, g, st8, step, kw):
    b1, b2 = kw["betas"]
    args = (step, kw["lr"], b1, b2, kw["eps"], kw["weight_decay"])
    if eight_bit:
        cs, cu = dynamic_map(True), dynamic_map(False)
        return R.adamw_step_8bit_blockwise(p, g, *st8, cs, cu, *args)
    return R.adamw_step_32bit(p, g, *st8, *args)


def _close(got, want, what, dtype=torch.float32, ulps=2):
    got, want = got.detach().reshape(-1), want.detach().reshape(-1)
    if got.dtype == torch.uint8:
        bad = (got.long() - want.long()).abs() > 1
    else:
        rtol = ulps * (2.0**-23 if dtype == torch.float32 else torch.finfo(dtype).eps)
        g, w = got.double(), want.double()
        bad = ~((g == w) | ((g - w).abs() <= rtol * w.abs() + 1e-45) | (g.isnan() & w.isnan()))
    if bad.any():
        i = int(bad.nonzero()[0])
        return f"{what}: {int(bad.sum())} elements differ, first [{i}]: {got[i]} vs {want[i]}"
    return None


def check_optim(spec):
    f = spec["fault"]
    cls = PagedAdamW8bit if spec["eight_bit"] else PagedAdamW
    kw = _opt_kwargs(spec)
    params = [_param(p, i, spec) for i, p in enumerate(spec["params"])]
    if f and f != "param_f64":
        return expect_error(lambda: cls(params, **kw), [OPT_BAD[f]])
    opt = cls(params, **kw)
    keys = list(cls._STATE)
    refs = [p.detach().clone() for p in params]
    for step_i, kinds in enumerate(spec["grads"]):
        for i, (p, kind) in enumerate(zip(params, kinds, strict=True)):
            has = spec["params"][i]["has_grad"] or (f is not None and i == 0)
            p.grad = _grad(p, kind, spec["seed"] + 100 * step_i + i) if has else None
        if f:
            return expect_error(opt.step, ["params"])
        before = {id(p): {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
                  for p in params if p in opt.state}  # fmt: skip
        steps = {id(p): opt.state[p]["step"] if p in opt.state else 0 for p in params}
        opt.step()
        for i, p in enumerate(params):
            if p.grad is None:
                if p in opt.state and opt.state[p]["step"] > 0 and not before.get(id(p)):
                    return f"params[{i}] without a grad was stepped"
                continue
            st = opt.state[p]
            old = before.get(id(p)) or {k: torch.zeros_like(st[k]) for k in keys}
            ref_p = refs[i].clone()
            ref_st = [old[k].clone() for k in keys]
            prev_step = steps[id(p)]
            bad = _ref_step(spec["eight_bit"], ref_p, p.grad, ref_st, prev_step + 1, kw)
            if bad:
                if st["step"] != prev_step or not torch.equal(bits(p), bits(refs[i])):
                    return f"params[{i}] with {bad} non-finite grads was not skipped whole"
                continue
            if st["step"] != prev_step + 1:
                return f"params[{i}]: step {st['step']} after a finite update"
            for k, want in zip(keys, ref_st, strict=True):
                if (e := _close(st[k], want, f"params[{i}] {k}")) is not None:
                    return e
            if e := _close(p, ref_p, f"params[{i}]", p.dtype, 2 if p.dtype == torch.float32 else 1):
                return e
            refs[i] = p.detach().clone()
    return None


# ---- load_adapter -----------------------------------------------------------------------------

AD_BAD = {
    "model_type": "model",
    "no_lora": "model",
    "directory_type": "directory",
    "missing_dir": "adapter_config.json",
    "missing_weights": "adapter_model.safetensors",
    "config_garbage": "adapter_config.json",
    "config_list": "adapter_config.json",
    "peft_type": "peft_type",
    "r_mismatch": "r",
    "r_str": "r",
    "r_missing": "r",
    "alpha_str": "lora_alpha",
    "alpha_nan": "lora_alpha",
    "weights_garbage": "adapter_model.safetensors",
    "key_missing": "lora_B",
    "key_extra": "extra",
    "shape": "lora_A",
    "dtype_int": "lora_A",
    "dtype_bool": "lora_A",
}
_MODEL = {}


def _tiny_model():
    """A two-layer model prepared once per process (prepare_model prints a summary line)."""
    if "m" not in _MODEL:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64))
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            qlora_ext.prepare_model(m, r=4, alpha=8, blocksize=32, compute_dtype=None)
        _MODEL["m"] = m
    return _MODEL["m"]


@st.composite
def adapter_spec(draw):
    return {
        "fault": draw(st.sampled_from([None] * 6 + list(AD_BAD))),
        "dtype": draw(st.sampled_from(["float32", "bfloat16", "float16", "float64"])),
        "values": draw(st.sampled_from(["normal", "zeros", "huge", "subnormal", "nan"])),
        "alpha": draw(st.sampled_from([1, 8, 0.5, 64.0])),
        "peft_prefix": draw(st.booleans()),
        "seed": draw(seeds()),
    }


def _write_adapter(spec, d):
    from safetensors.torch import save_file

    f = spec["fault"]
    model = _tiny_model()
    tensors = {}
    prefix = "base_model.model." if spec["peft_prefix"] else ""
    for name, layer in qlora_ext.adapters._lora_layers(model).items():
        for part, shape in (
            ("lora_A", (4, layer.in_features)),
            ("lora_B", (layer.out_features, 4)),
        ):
            t = build({"shape": list(shape), "dtype": spec["dtype"], "layout": "contiguous",
                       "values": spec["values"], "seed": spec["seed"] + len(tensors)})  # fmt: skip
            tensors[f"{prefix}{name}.{part}.weight"] = t
    first = sorted(tensors)[0]  # a lora_A
    if f == "key_missing":
        del tensors[sorted(tensors)[1]]
    elif f == "key_extra":
        tensors[f"{prefix}extra.lora_A.weight"] = torch.zeros(4, 64)
    elif f == "shape":
        tensors[first] = torch.zeros(4, 65)
    elif f == "dtype_int":
        tensors[first] = torch.ones(tensors[first].shape, dtype=torch.int32)
    elif f == "dtype_bool":
        tensors[first] = torch.ones(tensors[first].shape, dtype=torch.bool)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": spec["alpha"], "target_modules": ["0", "2"]}
    cfg.update(
        {
            "peft_type": {"peft_type": "PREFIX_TUNING"},
            "r_mismatch": {"r": 8},
            "r_str": {"r": "4"},
            "alpha_str": {"lora_alpha": "eight"},
        }.get(f, {})
    )
    if f == "r_missing":
        del cfg["r"]
    text = json.dumps(cfg).replace('"__nan__"', "NaN")
    if f == "alpha_nan":
        text = text.replace(f'"lora_alpha": {json.dumps(spec["alpha"])}', '"lora_alpha": NaN')
    if f == "config_garbage":
        text = '{"peft_type": "LORA", '
    elif f == "config_list":
        text = "[1, 2]"
    if f != "missing_dir":
        with open(os.path.join(d, "adapter_config.json"), "w") as fh:
            fh.write(text)
    if f == "weights_garbage":
        with open(os.path.join(d, "adapter_model.safetensors"), "wb") as fh:
            fh.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    elif f not in ("missing_weights", "missing_dir"):
        save_file(tensors, os.path.join(d, "adapter_model.safetensors"))
    return tensors


def check_adapter(spec):
    f = spec["fault"]
    with tempfile.TemporaryDirectory() as d:
        tensors = _write_adapter(spec, d)
        model = _tiny_model()
        directory = d
        if f == "missing_dir":
            directory = os.path.join(d, "nowhere")
        elif f == "directory_type":
            directory = 42
        target = model
        if f == "model_type":
            target = "model"
        elif f == "no_lora":
            target = nn.Sequential(nn.Linear(4, 4))
        if f:
            allowed = (ValueError, TypeError, RuntimeError, FileNotFoundError)
            return expect_error(lambda: qlora_ext.load_adapter(target, directory), [AD_BAD[f]],
                                allowed)  # fmt: skip
        qlora_ext.load_adapter(model, directory)
    prefix = "base_model.model." if spec["peft_prefix"] else ""
    for name, layer in qlora_ext.adapters._lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            want = tensors[f"{prefix}{name}.{part}.weight"].to(torch.float32)
            got = getattr(layer, part).weight.detach()
            same_bits(got, want, f"{name}.{part}.weight")
        if layer.lora_alpha != float(spec["alpha"]):
            return f"{name}: lora_alpha {layer.lora_alpha} != {spec['alpha']}"
    return None
