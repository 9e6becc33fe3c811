"""The contract every op keeps: opcheck (schema, fake kernel, autograd registration, AOT
dispatch), clear errors that name the argument, and QuantState (de)serialization checks."""

import pytest
import torch

import qlora_ext
from conftest import DEVICES, HAS_CUDA_KERNELS

ops = torch.ops.qlora_ext


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_all_ops(device, dtype):
    w = torch.randn(37, 70, device=device, dtype=dtype)
    torch.library.opcheck(ops.quantize_4bit, (w, 64, "nf4"))
    packed, absmax = ops.quantize_4bit(w, 64, "nf4")
    torch.library.opcheck(ops.dequantize_4bit, (packed, absmax, 64, "nf4", [37, 70], dtype))
    code = qlora_ext.dynamic_code_8bit(device)
    torch.library.opcheck(ops.quantize_blockwise_8bit, (absmax, code, 256))
    q, nabs = ops.quantize_blockwise_8bit(absmax - absmax.mean(), code, 256)
    torch.library.opcheck(ops.dequantize_blockwise_8bit, (q, nabs, code, 256, dtype))
    offset = absmax.mean().reshape(1)
    torch.library.opcheck(
        ops.dequantize_4bit,
        (packed, q, 64, "nf4", [37, 70], dtype),
        {"nested_absmax": nabs, "nested_code": code, "nested_offset": offset},
    )


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_name_the_argument(device):
    w = torch.randn(64, 64, device=device)
    with pytest.raises(RuntimeError, match="w must be float32, float16 or bfloat16"):
        ops.quantize_4bit(torch.ones(64, 64, dtype=torch.int32, device=device), 64, "nf4")
    with pytest.raises(RuntimeError, match="blocksize must be one of"):
        ops.quantize_4bit(w, 48, "nf4")
    with pytest.raises(RuntimeError, match="quant_type must be 'nf4', 'fp4' or 'int4', got 'nf8'"):
        ops.quantize_4bit(w, 64, "nf8")
    for bad in (float("nan"), float("inf"), float("-inf")):
        w2 = w.clone()
        w2[3, 5] = bad
        with pytest.raises(RuntimeError, match="w contains NaN or Inf"):
            qlora_ext.quantize_4bit(w2)
    packed, state = qlora_ext.quantize_4bit(w, 64, "nf4", double_quant=False)
    with pytest.raises(RuntimeError, match="packed has 2048 bytes but shape"):
        ops.dequantize_4bit(packed.reshape(-1), state.absmax, 64, "nf4", [64, 65], torch.float32)
    with pytest.raises(RuntimeError, match="absmax has 64 elements"):
        ops.dequantize_4bit(packed.reshape(-1), state.absmax, 128, "nf4", [64, 64], torch.float32)
    with pytest.raises(RuntimeError, match="dtype must be float32, float16 or bfloat16"):
        ops.dequantize_4bit(packed.reshape(-1), state.absmax, 64, "nf4", [64, 64], torch.int8)
    with pytest.raises(RuntimeError, match="absmax must be float32 .plain. or uint8"):
        ops.dequantize_4bit(
            packed.reshape(-1), state.absmax.half(), 64, "nf4", [64, 64], torch.float32
        )
    with pytest.raises(RuntimeError, match="needs nested_absmax, nested_code and nested_offset"):
        ops.dequantize_4bit(
            packed.reshape(-1), state.absmax.to(torch.uint8), 64, "nf4", [64, 64], torch.float32
        )
    with pytest.raises(RuntimeError, match="packed must be uint8"):
        ops.dequantize_4bit(
            packed.reshape(-1).float(), state.absmax, 64, "nf4", [64, 64], torch.float32
        )
    code = qlora_ext.dynamic_code_8bit(device)
    with pytest.raises(RuntimeError, match="code must be a float32 tensor of 256"):
        ops.quantize_blockwise_8bit(w, code[:128], 256)
    with pytest.raises(RuntimeError, match="blocksize must be positive"):
        ops.quantize_blockwise_8bit(w, code, 0)
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        qlora_ext.quantize_4bit([1.0, 2.0])
    with pytest.raises(TypeError, match="state must be a qlora_ext.QuantState"):
        qlora_ext.dequantize_4bit(packed, {"absmax": state.absmax})


@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a CUDA device and the CUDA kernels")
def test_device_mismatch_is_reported():
    w = torch.randn(64, 64, device="cuda")
    packed, absmax = ops.quantize_4bit(w, 64, "nf4")
    with pytest.raises(RuntimeError, match="absmax is on cpu but packed is on cuda"):
        ops.dequantize_4bit(packed, absmax.cpu(), 64, "nf4", [64, 64], torch.float32)


@pytest.mark.skipif(
    not torch.cuda.is_available() or qlora_ext.build_info()["cuda"],
    reason="needs a CUDA device and a build without CUDA kernels",
)
def test_cuda_tensor_without_cuda_build():
    with pytest.raises(RuntimeError, match="built without CUDA: rebuild with nvcc"):
        ops.quantize_4bit(torch.randn(64, device="cuda"), 64, "nf4")


def test_quant_state_round_trip_and_errors():
    w = torch.randn(10, 100)
    packed, state = qlora_ext.quantize_4bit(w, 64, "fp4", double_quant=True)
    d = state.as_dict(packed=True)
    back = qlora_ext.QuantState.from_dict(d)
    assert torch.equal(
        qlora_ext.dequantize_4bit(packed, back), qlora_ext.dequantize_4bit(packed, state)
    )
    unpacked = qlora_ext.QuantState.from_dict(state.as_dict(packed=False))
    assert unpacked.blocksize == 64 and unpacked.quant_type == "fp4" and unpacked.nested
    with pytest.raises(ValueError, match="unknown quant-state keys"):
        qlora_ext.QuantState.from_dict({**d, "bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match="expected a quant_state.bitsandbytes__<type>"):
        qlora_ext.QuantState.from_dict({"absmax": state.absmax})
    bad = dict(d)
    bad["quant_state.bitsandbytes__fp4"] = torch.tensor([0xFF, 0xFE], dtype=torch.uint8)
    with pytest.raises(ValueError, match="not a UTF-8 JSON quant-state blob"):
        qlora_ext.QuantState.from_dict(bad)
    short = {k: v for k, v in d.items() if k != "nested_quant_map"}
    with pytest.raises(ValueError, match="nested quant state is missing 'nested_quant_map'"):
        qlora_ext.QuantState.from_dict(short)
    # Wrong-sized packed tensor for the state's shape.
    with pytest.raises(RuntimeError, match="packed has 499 bytes but state.shape"):
        qlora_ext.dequantize_4bit(packed[:-1], state)


def test_build_info():
    info = qlora_ext.build_info()
    assert set(info) >= {"cuda", "cuda_archs", "cpu_isa", "cpu_isa_detected"}
    if info["cuda"]:
        for arch in ("80", "86", "89", "90"):
            assert arch in info["cuda_archs"] or "TORCH_CUDA_ARCH_LIST" in __import__("os").environ
    with pytest.raises(RuntimeError, match="isa must be"):
        qlora_ext._C.set_cpu_isa("sse9")


def test_fill_defaults_replacement_matches_torch():
    """Note [fill_defaults]: the cached replacement is installed on this torch and returns what
    torch's own returns, for our ops and for aten schemas with defaults and keyword-only
    arguments (given or not), so every register_autograd op in the process is unaffected."""
    import torch._library.utils as U

    from qlora_ext import _torch_fixes

    assert _torch_fixes.INSTALLED and _torch_fixes.ORIGINAL is not None
    assert U.fill_defaults is not _torch_fixes.ORIGINAL
    ours = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("qlora_ext::")]
    ops = [getattr(torch.ops.qlora_ext, n.split("::")[1]).default for n in ours]
    ops += [
        torch.ops.aten.sum.dim_IntList,
        torch.ops.aten.div.Tensor_mode,
        torch.ops.aten.full.default,
        torch.ops.aten.native_layer_norm.default,
    ]
    assert len(ops) >= 14
    for op in ops:
        schema = op._schema
        positional = [a for a in schema.arguments if not a.kwarg_only]
        kw_only = [a.name for a in schema.arguments if a.kwarg_only]
        for n in range(len(positional) + 1):
            args = tuple(object() for _ in range(n))
            for kwargs in ({}, {name: object() for name in kw_only}):
                want = _torch_fixes.ORIGINAL(schema, args, kwargs)
                assert U.fill_defaults(schema, args, kwargs) == want, (op, n, kwargs)
