"""Regression tests for what tests/test_fuzz.py found: each failed before its fix. The cases
that used to kill the process run in a subprocess, so a regression fails one test instead of
the whole run."""

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import qlora_ext
import reference as R
from conftest import DEVICES
from qlora_ext.optim import PagedAdamW, PagedAdamW8bit, dynamic_map
from qlora_ext.quant_state import QuantState

ops = torch.ops.qlora_ext


def _in_subprocess(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", "import torch, qlora_ext\n" + code],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-1500:]}"
    return proc.stdout


# ---- crashes ----------------------------------------------------------------------------------


def test_blockwise_8bit_of_nan_or_inf_raises_instead_of_crashing():
    # A NaN quotient made the 65536-entry table index undefined: a read far out of bounds.
    out = _in_subprocess(
        "for bad in (float('nan'), float('inf')):\n"
        "    x = torch.ones(7); x[3] = bad\n"
        "    try:\n"
        "        qlora_ext.quantize_blockwise_8bit(x, blocksize=7)\n"
        "    except RuntimeError as e:\n"
        "        print(e)\n"
    )
    assert out.count("A contains NaN or Inf") == 2, out


def test_double_quant_of_a_huge_weight_names_w():
    # The absmax are finite but their float32 mean overflows: absmax - inf went into the 8-bit
    # quantization and crashed it; now refused, naming w and the way out.
    out = _in_subprocess(
        "w = torch.full((65, 31), 3e38)\n"
        "try:\n"
        "    qlora_ext.quantize_4bit(w, 256, double_quant=True)\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    assert "w is too large to double-quantize" in out and "double_quant=False" in out, out
    packed, state = qlora_ext.quantize_4bit(torch.full((65, 31), 3e38), 256, double_quant=False)
    assert torch.isfinite(qlora_ext.dequantize_4bit(packed, state)).all()


def test_blockwise_8bit_of_a_block_below_2_to_the_minus_128():
    # Note [Tiny 8-bit blocks]: 1 / absmax overflowed to inf and 0 * inf = NaN indexed the
    # table out of bounds; every other value went to +-1. Now such a block divides.
    out = _in_subprocess(
        "x = torch.tensor([1e-40, 0.0, -5e-41, 2.5e-41])\n"
        "q, absmax = qlora_ext.quantize_blockwise_8bit(x, blocksize=4)\n"
        "print(qlora_ext.dequantize_blockwise_8bit(q, absmax, blocksize=4).tolist())\n"
    )
    got = json.loads(out)
    # Within the 8-bit map's resolution of absmax (the map's code nearest 0 is 2.8e-5, not 0).
    want = [1e-40, 0.0, -5e-41, 2.5e-41]
    assert all(abs(g - w) <= 0.02e-40 for g, w in zip(got, want, strict=True)), got


@pytest.mark.parametrize("device", DEVICES)
def test_blockwise_8bit_takes_a_blocksize_near_2_to_the_63(device):
    # ceil_div(n, blocksize) computed n + blocksize - 1, which wrapped: a negative size (on
    # CUDA, the launcher's own block count did the same and asked for a grid of 2^32 - 1).
    x = torch.randn(300, device=device)
    q, absmax = qlora_ext.quantize_blockwise_8bit(x, blocksize=2**63 - 1)
    q1, absmax1 = qlora_ext.quantize_blockwise_8bit(x, blocksize=300)
    assert torch.equal(q, q1) and torch.equal(absmax, absmax1)
    back = qlora_ext.dequantize_blockwise_8bit(q, absmax, blocksize=2**63 - 1)
    assert torch.equal(back, qlora_ext.dequantize_blockwise_8bit(q1, absmax1, blocksize=300))


# ---- silently wrong results ------------------------------------------------------------------


def test_modules_refuse_a_complex_or_integer_input():
    # The cast to compute_dtype dropped the imaginary part (or made integers values) silently.
    from qlora_ext.nn import Linear4bit

    for layer in (Linear4bit(64, 8, compute_dtype=torch.float32), qlora_ext.LoRALinear4bit(64, 8)):
        for x in (torch.ones(2, 64, dtype=torch.complex64), torch.ones(2, 64, dtype=torch.int64)):
            with pytest.raises(TypeError, match="^x must be a floating-point torch.Tensor"):
                layer(x)


def test_adamw_8bit_leaves_a_nan_moment_out_of_the_absmax_wherever_it_is():
    # The fuzz case (two steps of huge gradients with beta2 = 0, so that v = inf * 0 = NaN):
    # the AVX-512 block kept a NaN moment as its block's absmax only when it sat in the last 16
    # elements of the block, the scalar tail and CUDA left it out; now every path leaves it
    # out, and the 8-bit state matches tests/reference.py (which does the same).
    import fuzz_train

    spec = SPEC_NAN_MOMENT
    assert fuzz_train.check_optim(spec) is None


SPEC_NAN_MOMENT = {
    "fault": None,
    "eight_bit": True,
    "params": [
        {"shape": [2], "dtype": "bfloat16", "transposed": True, "has_grad": False},
        {"shape": [17, 16], "dtype": "float32", "transposed": False, "has_grad": True},
        {"shape": [2, 0], "dtype": "bfloat16", "transposed": True, "has_grad": False},
    ],
    "grads": [["normal", "huge", "subnormal"], ["normal", "huge", "subnormal"]],
    "lr": 0.001,
    "betas": [0.0, 0.0],
    "eps": 1e-08,
    "weight_decay": 5.0,
    "seed": 26930,
}


def test_quantize_blockwise_8bit_refuses_an_unsorted_code():
    code = qlora_ext.dynamic_code_8bit()
    x = torch.randn(300)
    for bad in (code.flip(0), torch.where(torch.arange(256) == 7, math.nan, code)):
        with pytest.raises(RuntimeError, match="code must be sorted"):
            qlora_ext.quantize_blockwise_8bit(x, bad)


def test_from_dict_refuses_a_quant_map_that_is_not_its_quant_type_table():
    # The kernels decode with quant_type's own table: another quant_map was ignored silently.
    packed, state = qlora_ext.quantize_4bit(torch.randn(8, 64), 64, "nf4")
    d = state.as_dict(packed=True)
    for other in (qlora_ext.get_4bit_code("fp4"), d["quant_map"][:8]):
        with pytest.raises(ValueError, match="quant_map"):
            QuantState.from_dict({**d, "quant_map": other})


def test_from_dict_refuses_a_blob_whose_quant_type_disagrees_with_its_key():
    _, state = qlora_ext.quantize_4bit(torch.randn(8, 64), 64, "fp4")
    d = state.as_dict(packed=True)
    d["quant_state.bitsandbytes__nf4"] = d.pop("quant_state.bitsandbytes__fp4")
    with pytest.raises(ValueError, match="quant_state.bitsandbytes__nf4 names quant type 'nf4'"):
        QuantState.from_dict(d)


def test_adamw_8bit_keeps_an_overflowed_moment_at_inf():
    # g * g overflows float32: v = inf, so its block's absmax is inf. Its code was 0, which
    # decodes to 0 * inf = NaN and turned the parameter NaN at the next step; the top code
    # decodes to inf again, as the 32-bit state holds it.
    for n in (256, 300):  # the AVX-512 whole-block path and the scalar tail
        p = nn.Parameter(torch.ones(n))
        opt = PagedAdamW8bit([p], lr=1e-3)
        p.grad = torch.full((n,), 3e38)
        opt.step()
        st = opt.state[p]
        assert math.isinf(st["exp_avg_sq_absmax"][0]) and (st["exp_avg_sq_q"] == 255).all()
        p.grad = torch.ones(n)
        opt.step()
        assert torch.isfinite(p).all()
    inf = torch.tensor(math.inf)
    q = R.quantize_nearest(dynamic_map(True), torch.tensor([-math.inf, math.inf]), inf)
    assert q.tolist() == [0, 255]


def test_optimizer_steps_a_strided_parameter():
    w = torch.randn(17, 16)
    p = nn.Parameter(w.t().contiguous().t())  # column-major: the ops want a dense buffer
    ref = nn.Parameter(w.clone())
    for cls in (PagedAdamW, PagedAdamW8bit):
        a, b = cls([p], lr=0.1), cls([ref], lr=0.1)
        for _ in range(2):
            p.grad, ref.grad = torch.ones_like(p), torch.ones_like(ref)
            a.step()
            b.step()
        assert not p.is_contiguous() and torch.equal(p, ref)


def test_load_adapter_refuses_integer_and_bool_tensors():
    from safetensors.torch import save_file

    model = nn.Sequential(nn.Linear(64, 32))
    qlora_ext.prepare_model(model, r=4, blocksize=32, compute_dtype=None)
    d = _adapter_dir(model)
    for dtype in (torch.int32, torch.bool):
        tensors = {
            "0.lora_A.weight": torch.ones(4, 64, dtype=dtype),
            "0.lora_B.weight": torch.ones(32, 4),
        }
        save_file(tensors, str(d / "adapter_model.safetensors"))
        with pytest.raises(
            ValueError, match="0.lora_A is torch.(int32|bool); LoRA weights must be floating point"
        ):
            qlora_ext.load_adapter(model, d)


def test_load_adapter_refuses_a_non_finite_lora_alpha():
    model = nn.Sequential(nn.Linear(64, 32))
    qlora_ext.prepare_model(model, r=4, blocksize=32, compute_dtype=None)
    d = _adapter_dir(model)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": math.nan}))  # NaN
    with pytest.raises(ValueError, match="lora_alpha must be a finite number"):
        qlora_ext.load_adapter(model, d)


def _adapter_dir(model):
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp())
    qlora_ext.save_adapter(model, d)
    return d


# ---- errors that named an internal argument, or none -------------------------------------------


def test_quantize_4bit_names_w_and_the_ops_use_the_public_names():
    with pytest.raises(RuntimeError, match="^w must be float32, float16 or bfloat16"):
        qlora_ext.quantize_4bit(torch.ones(64, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="^w contains NaN or Inf"):
        qlora_ext.quantize_4bit(torch.tensor([1.0, math.nan]))
    with pytest.raises(RuntimeError, match="^x must be float32"):
        packed, state = qlora_ext.quantize_4bit(torch.randn(4, 64))
        qlora_ext.matmul_4bit(torch.ones(2, 64, dtype=torch.int64), packed, state)
    with pytest.raises(RuntimeError, match="^q must be uint8"):
        qlora_ext.dequantize_blockwise_8bit(torch.zeros(4, dtype=torch.int16), torch.ones(1))
    schema = {a.name for a in ops.gemm_4bit.default._schema.arguments}
    assert "x" in schema and "A" not in schema


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("absmax", "half", r"state\.absmax must be float32"),
        ("dtype", torch.int32, r"state\.dtype must be float32"),
        ("shape", torch.Size([2**32, 2**32, 8, 64]), r"state\.shape .* more elements than"),
        ("shape", torch.Size([-1, 8, 64]), r"state\.shape must not have negative sizes"),
        ("blocksize", "64", r"argument 'state\.blocksize'"),
        ("offset", None, r"state\.offset must be a torch\.Tensor"),
    ],
)
def test_dequantize_4bit_names_the_state_field(field, value, match):
    packed, state = qlora_ext.quantize_4bit(torch.randn(8, 64), 64, double_quant=True)
    setattr(state, field, state.absmax.half() if value == "half" else value)
    with pytest.raises((RuntimeError, TypeError, ValueError), match=match):
        qlora_ext.dequantize_4bit(packed, state)


def test_matmul_and_lora_name_packed_and_state():
    packed, state = qlora_ext.quantize_4bit(torch.randn(8, 64))
    x, A, B = torch.randn(2, 64), torch.randn(4, 64), torch.randn(8, 4)
    for f in (
        lambda pk, s: qlora_ext.matmul_4bit(x, pk, s),
        lambda pk, s: qlora_ext.lora_4bit(x, pk, s, A, B, 1.0),
    ):
        with pytest.raises(TypeError, match="^packed must be a torch.Tensor"):
            f(packed.numpy(), state)
        state.shape = torch.Size([512])
        with pytest.raises(ValueError, match="^state.shape must be a 2-D"):
            f(packed, state)
        state.shape = torch.Size([8, 64])
    with pytest.raises(RuntimeError, match=r"state\.blocksize=64"):
        _, ragged = qlora_ext.quantize_4bit(torch.randn(4, 66))
        qlora_ext.matmul_4bit(torch.randn(2, 66), torch.zeros(132, dtype=torch.uint8), ragged)


def test_lora_4bit_names_scale_and_dropout_p():
    packed, state = qlora_ext.quantize_4bit(torch.randn(8, 64))
    args = (torch.randn(2, 64), packed, state, torch.randn(4, 64), torch.randn(8, 4))
    with pytest.raises(TypeError, match="^scale must be a number"):
        qlora_ext.lora_4bit(*args, "two")
    with pytest.raises(TypeError, match="^dropout_p must be a number"):
        qlora_ext.lora_4bit(*args, 1.0, "half")


def test_linear4bit_checks_its_arguments_by_name():
    from qlora_ext.nn import Linear4bit

    cases = [
        (dict(compute_dtype=torch.int32), TypeError, "compute_dtype"),
        (dict(compute_dtype="bfloat16"), TypeError, "compute_dtype"),
        (dict(in_features=64.0), ValueError, "in_features"),
        (dict(out_features="eight"), ValueError, "out_features"),
        (dict(dtype=torch.int64), TypeError, "dtype"),
        (dict(blocksize=0), ValueError, "blocksize"),
    ]
    for kw, exc, name in cases:
        with pytest.raises(exc, match=f"^{name} must be"):
            Linear4bit(**{"in_features": 64, "out_features": 8, **kw})
    with pytest.raises(TypeError, match="^compute_dtype must be"):
        Linear4bit.from_linear(nn.Linear(64, 8), compute_dtype=torch.int8)
    lin = nn.Linear(64, 8)
    with torch.no_grad():
        lin.weight[0, 0] = math.nan
    with pytest.raises(RuntimeError, match="^linear.weight contains NaN"):
        Linear4bit.from_linear(lin)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(lr="fast"), "lr must be a number"),
        (dict(betas=(0.9,)), r"betas must be a pair"),
        (dict(betas="ab"), r"betas must be a pair"),
        (dict(eps="tiny"), "eps must be a number"),
        (dict(weight_decay=[0.1]), "weight_decay must be a number"),
    ],
)
def test_optimizer_hyperparameters_are_named(kw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        PagedAdamW([nn.Parameter(torch.ones(3))], **kw)


def test_optimizer_step_names_the_parameter():
    p = nn.Parameter(torch.ones(5, dtype=torch.float64))
    opt = PagedAdamW8bit([nn.Parameter(torch.ones(2)), p])
    p.grad = torch.ones(5, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"params\[1\] of param group 0 is torch.float64"):
        opt.step()


def test_from_dict_names_the_entry():
    packed, state = qlora_ext.quantize_4bit(torch.randn(8, 64), 64, double_quant=True)
    unpacked = {"weight." + k: v for k, v in state.as_dict(packed=False).items()}
    back = QuantState.from_dict(unpacked)  # a prefixed unpacked dict was refused
    assert torch.equal(
        qlora_ext.dequantize_4bit(packed, back), qlora_ext.dequantize_4bit(packed, state)
    )
    d = state.as_dict(packed=True)
    blob_key = "quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(d[blob_key].tolist()))

    def with_meta(**kw):
        return {
            **d,
            blob_key: torch.tensor(list(json.dumps({**meta, **kw}).encode()), dtype=torch.uint8),
        }

    no_nested = {k: v for k, v in d.items() if k != "nested_absmax"}
    cases = [
        (no_nested, ValueError, "nested_absmax, its scales, is missing"),
        ({**d, "absmax": None}, TypeError, "absmax must be a torch.Tensor"),
        ({**d, "nested_quant_map": [0.0] * 256}, TypeError, "nested_quant_map must be"),
        (
            {**d, blob_key: torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)},
            ValueError,
            "JSON object",
        ),
        (with_meta(blocksize="sixty-four"), ValueError, "blocksize must be an integer"),
        (with_meta(blocksize=48), ValueError, "blocksize must be a power of two"),
        (with_meta(shape="abc"), ValueError, "shape must be a list"),
        (with_meta(shape=[2**40, 2**40]), ValueError, "shape"),
        (with_meta(dtype="int32"), ValueError, "dtype must be float32"),
        (with_meta(nested_offset="x"), ValueError, "nested_offset must be a number"),
        (with_meta(nested_blocksize=0), ValueError, "nested_blocksize must be positive"),
        ({**d, "absmax": d["absmax"].float()}, ValueError, "absmax must be torch.uint8"),
    ]
    for bad, exc, match in cases:
        with pytest.raises(exc, match=match):
            QuantState.from_dict(bad)


def test_load_adapter_names_its_arguments():
    model = nn.Sequential(nn.Linear(64, 32))
    qlora_ext.prepare_model(model, r=4, blocksize=32, compute_dtype=None)
    d = _adapter_dir(model)
    with pytest.raises(TypeError, match="^model must be a torch.nn.Module"):
        qlora_ext.load_adapter("model", d)
    with pytest.raises(TypeError, match="^directory must be a str or os.PathLike"):
        qlora_ext.load_adapter(model, 42)
    cfg = d / "adapter_config.json"
    good = json.loads(cfg.read_text())
    for text, match in (
        ("[1, 2]", "must hold a JSON object"),
        (json.dumps({**good, "lora_alpha": "eight"}), "lora_alpha must be a finite"),
    ):
        cfg.write_text(text)
        with pytest.raises(ValueError, match=match):
            qlora_ext.load_adapter(model, d)
