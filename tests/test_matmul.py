"""gemm_4bit / gemm_4bit_grad_input / matmul_4bit: accuracy against an fp64 reference, autograd,
torch.compile, and the errors they raise."""

import pytest
import torch
import torch.nn.functional as F

import qlora_ext
import reference as R
from conftest import DEVICES, HAS_CUDA_KERNELS

ops = torch.ops.qlora_ext
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# M on both sides of the small-M thresholds (16 without AVX-512, 48 with), odd N, K a whole
# number of blocks.
MS = [1, 3, 16, 17, 48, 49, 70]
SHAPES = [(77, 256), (130, 384)]


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def quantized(N, K, blocksize, quant_type, double_quant, device):
    w = torch.randn(N, K, device=device)
    packed, state = qlora_ext.quantize_4bit(w, blocksize, quant_type, double_quant)
    w_hat = qlora_ext.dequantize_4bit(packed, state)  # the weight the GEMM multiplies by
    return packed, state, w_hat


def fp32_absmax(state):
    """The fp32 absmax the kernels use, with a nested (double-quantized) one undone."""
    if not state.nested:
        return state.absmax.cpu()
    s2 = state.state2
    return (
        R.dequantize_blockwise_8bit(
            state.absmax.cpu(), s2.absmax.cpu(), s2.code.cpu(), s2.blocksize, torch.float32
        )
        + state.offset.cpu()
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_gemm_error_within_2x_of_torch(device, dtype, double_quant, blocksize):
    """Error against fp64 is at most 2x that of PyTorch doing the same product in `dtype` with
    the dequantized weight (F.linear on dequant(W).to(dtype)). A small absolute floor covers
    the fp32 case, where both errors sit at rounding level (~1e-7)."""
    shapes = SHAPES if blocksize <= 128 else [(77, blocksize), (130, 2 * blocksize)]
    for N, K in shapes:
        packed, state, w_hat = quantized(N, K, blocksize, "nf4", double_quant, device)
        bias = torch.randn(N, device=device).to(dtype)
        for M in MS:
            A = torch.randn(M, K, device=device).to(dtype)
            ref = R.gemm_4bit(
                A.cpu(),
                packed.cpu().reshape(-1),
                fp32_absmax(state),
                N,
                K,
                blocksize,
                "nf4",
                bias.cpu(),
            )
            out = qlora_ext.matmul_4bit(A, packed, state, bias)
            assert out.shape == (M, N) and out.dtype == dtype
            torch_out = F.linear(A, w_hat.to(dtype), bias)
            floor = 1e-6 if dtype == torch.float32 else 0
            assert rel_err(out.cpu(), ref) <= 2 * rel_err(torch_out.cpu(), ref) + floor, (N, K, M)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_small_m_cpu_kernels_odd_k(cpu_isa, quant_type, double_quant):
    """The fused small-M CPU kernels on every ISA: K that ends in a partial 128-element chunk
    (the masked load), K long enough for several K tiles, every M from 1 to 16 (one compiled
    kernel per group size), M up to the limit of 40 in several groups of rows and just past it
    (the panels), blocksizes below and above the chunk."""
    cases = [(37, 96, 32), (29, 576, 64), (21, 1088, 64), (19, 4160, 64), (23, 1280, 256)]
    for N, K, bs in cases:
        packed, state, w_hat = quantized(N, K, bs, quant_type, double_quant, "cpu")
        bias = torch.randn(N)
        for M in [*range(1, 17), 17, 25, 33, 39, 40, 41]:
            A = torch.randn(M, K)
            ref = R.gemm_4bit(A, packed.reshape(-1), fp32_absmax(state), N, K, bs, quant_type, bias)
            out = qlora_ext.matmul_4bit(A, packed, state, bias)
            torch_out = F.linear(A, w_hat, bias)
            assert rel_err(out, ref) <= 2 * rel_err(torch_out, ref) + 1e-6, (N, K, bs, M)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_small_m_cpu_grad_input_odd_k_long_n(cpu_isa, quant_type, double_quant):
    """The fused small-M input gradient (Note [Fused input gradient]) on every ISA: every M from
    1 to 16 (one kernel each), groups of rows up to 64 and 65 (the panels), K ending in a
    partial chunk, blocksizes below and above the chunk, and N = 4160 rows summed per output
    (where one running sum was 5x torch's error), bf16 too."""
    cases = [(4160, 96, 32), (131, 576, 64), (77, 1280, 256), (40, 4160, 64)]
    for N, K, bs in cases:
        packed, state, w_hat = quantized(N, K, bs, quant_type, double_quant, "cpu")
        args = (packed.reshape(-1), state.absmax, N, K, bs, quant_type)
        nested = qlora_ext.functional._nested_args(state)
        for M in [*range(1, 18), 24, 33, 47, 64, 65]:
            for dtype in (torch.float32, torch.bfloat16):
                G = torch.randn(M, N).to(dtype)
                ref = R.gemm_4bit_grad_input(G, args[0], fp32_absmax(state), *args[2:])
                out = ops.gemm_4bit_grad_input(G, *args, **nested)
                assert out.shape == (M, K) and out.dtype == dtype
                torch_out = G @ w_hat.to(dtype)
                floor = 1e-6 if dtype == torch.float32 else 0
                assert rel_err(out, ref) <= 2 * rel_err(torch_out, ref) + floor, (N, K, bs, M)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_grad_input_error_within_2x_of_torch(device, dtype, quant_type):
    for N, K in SHAPES:
        packed, state, w_hat = quantized(N, K, 64, quant_type, True, device)
        for M in MS:
            G = torch.randn(M, N, device=device).to(dtype)
            ref = R.gemm_4bit_grad_input(
                G.cpu(), packed.cpu().reshape(-1), fp32_absmax(state), N, K, 64, quant_type
            )
            out = ops.gemm_4bit_grad_input(
                G,
                packed.reshape(-1),
                state.absmax,
                N,
                K,
                64,
                quant_type,
                **qlora_ext.functional._nested_args(state),
            )
            assert out.shape == (M, K) and out.dtype == dtype
            torch_out = G @ w_hat.to(dtype)
            floor = 1e-6 if dtype == torch.float32 else 0
            assert rel_err(out.cpu(), ref) <= 2 * rel_err(torch_out.cpu(), ref) + floor, (N, K, M)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_3d_and_noncontiguous(device):
    packed, state, w_hat = quantized(96, 128, 64, "nf4", True, device)
    x = torch.randn(2, 5, 128, device=device)
    y = qlora_ext.matmul_4bit(x, packed, state)
    assert y.shape == (2, 5, 96)
    torch.testing.assert_close(y, F.linear(x, w_hat), rtol=1e-5, atol=1e-5)
    # Not contiguous in the last dimension: handled by a copy.
    xt = torch.randn(2, 128, 5, device=device).transpose(1, 2)
    assert xt.stride(-1) != 1
    torch.testing.assert_close(
        qlora_ext.matmul_4bit(xt, packed, state), F.linear(xt, w_hat), rtol=1e-5, atol=1e-5
    )
    # Empty batch.
    assert qlora_ext.matmul_4bit(x[:0], packed, state).shape == (0, 5, 96)


def test_gradcheck_fp64():
    """gradcheck in float64 (CPU), with respect to the input and the bias."""
    packed, state, _ = quantized(24, 64, 32, "nf4", True, "cpu")
    for M in (2, 20):  # the streaming and the panel path
        x = torch.randn(M, 64, dtype=torch.float64, requires_grad=True)
        b = torch.randn(24, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x, b: qlora_ext.matmul_4bit(x, packed, state, b), (x, b)
        )


@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_reference(device):
    packed, state, w_hat = quantized(64, 128, 64, "fp4", False, device)
    x = torch.randn(3, 7, 128, device=device, requires_grad=True)
    b = torch.randn(64, device=device, requires_grad=True)
    g = torch.randn(3, 7, 64, device=device)
    qlora_ext.matmul_4bit(x, packed, state, b).backward(g)
    x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    F.linear(x2, w_hat, b2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    packed, state, _ = quantized(40, 64, 32, "nf4", True, device)
    nested = qlora_ext.functional._nested_args(state)
    args = (packed.reshape(-1), state.absmax, 40, 64, 32, "nf4")
    for M in (2, 33):
        x = torch.randn(M, 64, device=device, requires_grad=True)
        b = torch.randn(40, device=device, requires_grad=True)
        torch.library.opcheck(ops.gemm_4bit, (x, *args, b), nested)
        torch.library.opcheck(ops.gemm_4bit, (x, *args), nested)
        g = torch.randn(M, 40, device=device)
        torch.library.opcheck(ops.gemm_4bit_grad_input, (g, *args), nested)


def test_torch_compile_fullgraph():
    """matmul_4bit and its backward trace into one graph (no graph break) under inductor."""
    torch._dynamo.reset()
    packed, state, w_hat = quantized(32, 64, 64, "nf4", True, "cpu")
    b = torch.randn(32, requires_grad=True)

    @torch.compile(fullgraph=True)
    def f(x):
        return torch.relu(qlora_ext.matmul_4bit(x, packed, state, b)).sum()

    x = torch.randn(5, 64, requires_grad=True)
    f(x).backward()
    x2 = x.detach().clone().requires_grad_()
    torch.relu(F.linear(x2, w_hat, b)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    packed, state, _ = quantized(32, 128, 64, "nf4", False, device)
    p = packed.reshape(-1)
    with pytest.raises(RuntimeError, match="x has last dimension 100 but the 4-bit weight"):
        ops.gemm_4bit(torch.randn(2, 100, device=device), p, state.absmax, 32, 128, 64, "nf4")
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        ops.gemm_4bit(
            torch.ones(2, 128, dtype=torch.int32, device=device),
            p,
            state.absmax,
            32,
            128,
            64,
            "nf4",
        )
    with pytest.raises(RuntimeError, match="is not a multiple of blocksize=128"):
        ops.gemm_4bit(torch.randn(2, 64, device=device), p, state.absmax, 64, 64, 128, "nf4")
    with pytest.raises(RuntimeError, match="bias must have shape \\[32\\]"):
        ops.gemm_4bit(
            torch.randn(2, 128, device=device),
            p,
            state.absmax,
            32,
            128,
            64,
            "nf4",
            torch.randn(31, device=device),
        )
    with pytest.raises(RuntimeError, match="grad_out has last dimension 31"):
        ops.gemm_4bit_grad_input(
            torch.randn(2, 31, device=device), p, state.absmax, 32, 128, 64, "nf4"
        )
    with pytest.raises(ValueError, match="state.shape must be a 2-D \\[N, K\\] weight shape"):
        w3 = torch.randn(2, 4, 64)
        qlora_ext.matmul_4bit(torch.randn(1, 64), *qlora_ext.quantize_4bit(w3))


@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a CUDA device and the CUDA kernels")
def test_device_mismatch():
    packed, state, _ = quantized(32, 128, 64, "nf4", False, "cuda")
    with pytest.raises(RuntimeError, match="A is on cpu but the 4-bit weight is on cuda"):
        qlora_ext.matmul_4bit(torch.randn(2, 128), packed, state)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blas", ["aten", "onednn"])
def test_both_cpu_panel_blas(dtype, blas):
    """Each BLAS of the CPU panel GEMMs (Note [Panel BLAS]) against the fp64 reference, forward
    and input gradient, with one panel (130 x 256) and several (4160 x 512 is 8.5 MB of fp32:
    two forward panels, seventeen gradient ones), same 2x rule as above."""
    qlora_ext._C.set_cpu_blas(blas)
    try:
        assert qlora_ext.build_info()["cpu_blas"] == blas
        for N, K in ((130, 256), (4160, 512)):
            packed, state, w_hat = quantized(N, K, 64, "nf4", True, "cpu")
            bias = torch.randn(N).to(dtype)
            absmax = fp32_absmax(state)
            for M in (64, 150):
                A = torch.randn(M, K).to(dtype)
                G = torch.randn(M, N).to(dtype)
                ref = R.gemm_4bit(A, packed.reshape(-1), absmax, N, K, 64, "nf4", bias)
                out = qlora_ext.matmul_4bit(A, packed, state, bias)
                floor = 1e-6 if dtype == torch.float32 else 0
                torch_out = F.linear(A, w_hat.to(dtype), bias)
                assert rel_err(out, ref) <= 2 * rel_err(torch_out, ref) + floor, (N, M)
                ref_g = R.gemm_4bit_grad_input(G, packed.reshape(-1), absmax, N, K, 64, "nf4")
                got_g = torch.ops.qlora_ext.gemm_4bit_grad_input(
                    G, packed.reshape(-1), state.absmax, N, K, 64, "nf4",
                    **_nested(state),
                )  # fmt: skip
                torch_g = G @ w_hat.to(dtype)
                assert rel_err(got_g, ref_g) <= 2 * rel_err(torch_g, ref_g) + floor, (N, M)
    finally:
        qlora_ext._C.set_cpu_blas("auto")
    with pytest.raises(RuntimeError, match="blas must be 'auto', 'aten' or 'onednn'"):
        qlora_ext._C.set_cpu_blas("mkl")


def _nested(state):
    from qlora_ext.functional import _nested_args

    return _nested_args(state)


@pytest.fixture
def gemm_path(request):
    qlora_ext._C.set_gemm_path(request.param)
    yield request.param
    qlora_ext._C.set_gemm_path("auto")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gemm_path", ["small", "tc", "panel"], indirect=True)
def test_every_gemm_path(device, dtype, gemm_path):
    """Each forced path (where it applies) against the fp64 reference, same 2x rule."""
    N, K = 130, 256
    packed, state, w_hat = quantized(N, K, 64, "nf4", True, device)
    bias = torch.randn(N, device=device).to(dtype)
    for M in (1, 16, 17, 150, 300):
        A = torch.randn(M, K, device=device).to(dtype)
        ref = R.gemm_4bit(
            A.cpu(), packed.cpu().reshape(-1), fp32_absmax(state), N, K, 64, "nf4", bias.cpu()
        )
        out = qlora_ext.matmul_4bit(A, packed, state, bias)
        torch_out = F.linear(A, w_hat.to(dtype), bias)
        floor = 1e-6 if dtype == torch.float32 else 0
        assert rel_err(out.cpu(), ref) <= 2 * rel_err(torch_out.cpu(), ref) + floor, M
    with pytest.raises(RuntimeError, match="path must be 'auto', 'small', 'tc' or 'panel'"):
        qlora_ext._C.set_gemm_path("fast")
