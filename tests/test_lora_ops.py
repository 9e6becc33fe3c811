"""lora_4bit_forward / lora_4bit_backward: against the float64 reference, gradcheck, dropout
by seed, mixed precision, opcheck, torch.compile(fullgraph=True), and errors that name the
argument."""

import pytest
import torch

import qlora_ext
import reference as ref
from conftest import DEVICES, HAS_CUDA_KERNELS

ops = torch.ops.qlora_ext
N, K, R = 48, 128, 8


def make(device, nested=True, dtype=torch.float32):
    w = torch.randn(N, K, device=device)
    packed, state = qlora_ext.quantize_4bit(w, 64, "nf4", double_quant=nested)
    A = (torch.randn(R, K, device=device) / K**0.5).to(dtype)
    B = torch.randn(N, R, device=device).to(dtype)
    return packed, state, A, B


def weight_args(packed, state):
    return (packed.reshape(-1), state.absmax, N, K, 64, "nf4")


def nested(state):
    from qlora_ext.functional import _nested_args

    return _nested_args(state)


def plain_absmax(state):
    # The reference dequantizes with fp32 absmax: undo the double quantization first.
    if state.state2 is None:
        return state.absmax
    code, nabs = state.state2.code, state.state2.absmax
    q = state.absmax.long().cpu()
    return (code.cpu()[q] * nabs.cpu()[torch.arange(q.numel()) // 256]) + state.offset.cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M", [3, 40], ids=["stream", "panel"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_forward_backward_match_fp64_reference(device, M, p):
    packed, state, A, B = make(device)
    x = torch.randn(2, M, K, device=device)
    seed = torch.tensor([1234567890123], dtype=torch.int64)
    bias = torch.randn(N, device=device)
    y, xa = ops.lora_4bit_forward(
        x, *weight_args(packed, state), A, B, 0.5, p, seed, bias, **nested(state)
    )
    absmax = plain_absmax(state)
    args64 = (packed.reshape(-1).cpu(), absmax, N, K, 64, "nf4", A.cpu(), B.cpu(), 0.5)
    y_ref, xa_ref = ref.lora_4bit(x.cpu(), *args64, p=p, seed=1234567890123)
    y_ref = y_ref + bias.double().cpu()
    # fp32 throughout: errors are fp32 accumulation over K = 128 (~1e-6 relative); 1e-4 leaves
    # room for the different summation orders, far below any error in the mask or the maths.
    torch.testing.assert_close(xa.cpu().double(), xa_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.cpu().double(), y_ref, rtol=1e-4, atol=1e-4)

    # Backward against autograd through the float64 reference (same mask).
    G = torch.randn(2, M, N, device=device)
    gx, gA, gB = ops.lora_4bit_backward(
        G, x, xa, *weight_args(packed, state), A, B, 0.5, p, seed, **nested(state)
    )
    x64 = x.cpu().double().requires_grad_()
    A64 = A.cpu().double().requires_grad_()
    B64 = B.cpu().double().requires_grad_()
    y64, _ = ref.lora_4bit(x64, *args64[:6], A64, B64, 0.5, p=p, seed=1234567890123)
    y64.backward(G.cpu().double())
    for got, want in ((gx, x64.grad), (gA, A64.grad), (gB, B64.grad)):
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-4)


def test_dropout_mask_matches_reference_and_rate():
    """The kernel's mask is the documented hash: a ones matrix through A = I exposes it."""
    n, p = 64 * 64, 0.25
    packed, state = qlora_ext.quantize_4bit(torch.randn(N, 64), 64, "nf4")
    x = torch.ones(64, 64)
    A = torch.eye(64)
    B = torch.zeros(N, 64)
    seed = torch.tensor([-42], dtype=torch.int64)  # negative seeds wrap to uint64, as in C
    _, xa = ops.lora_4bit_forward(
        x,
        packed.reshape(-1),
        state.absmax,
        N,
        64,
        64,
        "nf4",
        A,
        B,
        1.0,
        p,
        seed,
        **nested(state),
    )
    keep = ref.lora_dropout_mask(-42, n, p).reshape(64, 64)
    torch.testing.assert_close(xa, keep.float() / (1 - p), rtol=0, atol=0)
    # 4096 Bernoulli(0.75) draws: the kept fraction is within 4 sigma (0.027) of 0.75.
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03


@pytest.mark.parametrize("M", [64, 131])
def test_every_cpu_isa_gives_the_same_bits_with_dropout(cpu_isa, M):
    """The dropout hash has an AVX-512 copy (lora_cpu.cpp): every ISA must give the scalar
    loop's bits, forward and backward. M >= 64 takes the panel GEMMs, whose BLAS is the same
    on every ISA, so any difference is the dropout's (the streaming kernels below differ in
    rounding by design)."""
    packed, state, A, B = make("cpu")

    def run():
        torch.manual_seed(7)
        x = torch.randn(M, K, requires_grad=True)
        a, b = A.clone().requires_grad_(), B.clone().requires_grad_()
        seed = torch.tensor([1234])
        y = qlora_ext.lora_4bit(x, packed, state, a, b, 1.5, 0.3, seed)
        y.backward(torch.randn_like(y))
        return y, x.grad, a.grad, b.grad

    got = run()
    qlora_ext._C.set_cpu_isa("scalar")
    want = run()
    qlora_ext._C.set_cpu_isa(cpu_isa)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("M", [5, 64, 131])
def test_cpu_fused_dropout_passes_give_the_separate_passes_bits(cpu_isa, M):
    """Note [Fused dropout passes]: on the CPU dropout(x) is written in one pass and the masked
    rank-r part of grad_x is added in one pass. Rebuilt here from the separate steps they
    replace (each fp32 product or sum rounded once, the same at::mm calls), the results must be
    bitwise equal: xa, grad_A (both from dropout(x)) and grad_x."""
    packed, state, A, B = make("cpu")
    p, seed, scale = 0.3, 987654321, 0.75
    x = torch.randn(M, K)
    G = torch.randn(M, N)
    s = torch.tensor([seed])
    w = weight_args(packed, state)
    y, xa = ops.lora_4bit_forward(x, *w, A, B, scale, p, s, None, **nested(state))
    gx, gA, gB = ops.lora_4bit_backward(G, x, xa, *w, A, B, scale, p, s, **nested(state))

    keep = ref.lora_dropout_mask(seed, M * K, p).reshape(M, K)
    inv_keep = 1.0 / (1.0 - p)  # rounded to fp32 when it scales an fp32 tensor, as in C++
    dropped = torch.where(keep, x * inv_keep, torch.zeros(()))
    assert torch.equal(xa, dropped @ A.t())
    g = (G @ B).mul_(scale)
    assert torch.equal(gA, g.t() @ dropped)
    base = ops.gemm_4bit_grad_input(G, *w, **nested(state))
    assert torch.equal(gx, base + torch.where(keep, (g @ A) * inv_keep, torch.zeros(())))


def test_gradcheck_fp64_with_dropout():
    """gradcheck with respect to x, A, B and bias, dropout on (a fixed seed fixes the mask).
    Small shapes: gradcheck perturbs every input element twice."""
    n, k, r = 16, 64, 2
    packed, state = qlora_ext.quantize_4bit(torch.randn(n, k), 64, "nf4", double_quant=False)
    x = torch.randn(3, k, dtype=torch.float64, requires_grad=True)
    A = torch.randn(r, k, dtype=torch.float64, requires_grad=True)
    B = torch.randn(n, r, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(n, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor([7], dtype=torch.int64)

    def f(x, A, B, bias):
        return qlora_ext.lora_4bit(x, packed, state, A, B, 2.0, 0.2, seed, bias)

    assert torch.autograd.gradcheck(f, (x, A, B, bias), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_precision_bf16_x_fp32_adapters(device):
    """bf16 x with fp32 A/B: y and grad_x come back in bf16, grad_A/grad_B in fp32, and each
    is within bf16 rounding of the fp64 computation on the same bf16 inputs."""
    packed, state, A, B = make(device)
    x = torch.randn(33, K, device=device).bfloat16().requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    y = qlora_ext.lora_4bit(x, packed, state, A, B, 2.0)
    assert y.dtype == torch.bfloat16
    G = torch.randn_like(y)
    y.backward(G)
    assert x.grad.dtype == torch.bfloat16
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    W = qlora_ext.dequantize_4bit(packed, state).double()
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    y64 = x64 @ W.T + 2.0 * (x64 @ A64.T) @ B64.T
    y64.backward(G.double())
    # y, grad_x: one bf16 rounding of values of size ~10 (relative 2^-8 = 0.4%); 2e-2 absolute
    # on ~|10| values, plus 1e-2 relative, covers it.
    torch.testing.assert_close(y.double(), y64, rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-2, atol=2e-2)
    # grad_A, grad_B are accumulated and kept in fp32 from bf16 inputs: fp32-level agreement.
    torch.testing.assert_close(A.grad.double(), A64.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(B.grad.double(), B64.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs the CUDA kernels and a device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("gemm_path", ["small", "tc", "panel"])
@pytest.mark.parametrize("r", [8, 40])  # one extra tensor-core K step, and two (r_pad = 64)
def test_cuda_lora_term_in_every_gemm_epilogue(dtype, gemm_path, r):
    """Each CUDA GEMM path adds the rank-r term inside the GEMM (Note [LoRA epilogue]): y
    against the fp64 computation on the same 16-bit inputs, with bias, at an M the path
    handles. One rounding of y to 16 bits (0.4% for bf16) plus the 16-bit rounding of
    xa * scale and B on the tensor-core and panel paths: 2e-2 relative."""
    n, k = 200, 256  # N not a multiple of the 128-wide tile
    w = torch.randn(n, k, device="cuda")
    packed, state = qlora_ext.quantize_4bit(w, 64, "nf4", double_quant=True)
    A = torch.randn(r, k, device="cuda") / k**0.5
    B = torch.randn(n, r, device="cuda")
    bias = torch.randn(n, device="cuda").to(dtype)
    M = {"small": 5, "tc": 150, "panel": 300}[gemm_path]
    x = torch.randn(M, k, device="cuda").to(dtype)
    qlora_ext._C.set_gemm_path(gemm_path)
    try:
        y = qlora_ext.lora_4bit(x, packed, state, A, B, 1.5, bias=bias)
    finally:
        qlora_ext._C.set_gemm_path("auto")
    W = qlora_ext.dequantize_4bit(packed, state).double()
    x64 = x.double()
    want = x64 @ W.T + 1.5 * (x64 @ A.double().T) @ B.double().T + bias.double()
    err = (y.double() - want).norm() / want.norm()
    assert y.dtype == dtype and err < 2e-2, (gemm_path, float(err))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    packed, state, A, B = make(device)
    x = torch.randn(6, K, device=device, requires_grad=True)
    seed = torch.tensor([3], dtype=torch.int64)
    args = (x, *weight_args(packed, state), A.requires_grad_(), B.requires_grad_(), 0.5, 0.1, seed)
    torch.library.opcheck(ops.lora_4bit_forward, args, nested(state))
    y, xa = ops.lora_4bit_forward(*args, **nested(state))
    G = torch.randn_like(y)
    bargs = (G, x.detach(), xa, *weight_args(packed, state), A.detach(), B.detach(), 0.5, 0.1)
    torch.library.opcheck(ops.lora_4bit_backward, (*bargs, seed), nested(state))


def test_torch_compile_fullgraph():
    """The op and its backward trace into one graph under inductor: with an explicit seed the
    compiled gradients equal eager ones; a LoRALinear4bit with dropout (its seed drawn inside
    the graph, by inductor's own RNG) also compiles without a graph break."""
    torch._dynamo.reset()
    packed, state, A, B = make("cpu")
    A.requires_grad_()
    B.requires_grad_()
    seed = torch.tensor([11], dtype=torch.int64)

    def f(x, A, B):
        return qlora_ext.lora_4bit(x, packed, state, A, B, 0.5, 0.1, seed).square().sum()

    x = torch.randn(4, K, requires_grad=True)
    torch.compile(f, fullgraph=True)(x, A, B).backward()
    grads = [t.grad.clone() for t in (x, A, B)]
    for t in (x, A, B):
        t.grad = None
    f(x, A, B).backward()
    for got, t in zip(grads, (x, A, B), strict=True):
        torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=1e-5)

    layer = qlora_ext.LoRALinear4bit.from_linear(
        torch.nn.Linear(K, N), r=R, dropout=0.1, compute_dtype=None
    )
    torch.compile(layer, fullgraph=True)(x).sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_name_the_argument(device):
    packed, state, A, B = make(device)
    x = torch.randn(3, K, device=device)
    w = weight_args(packed, state)
    nst = nested(state)
    with pytest.raises(RuntimeError, match=r"lora_A must have shape \[r, K=128\]"):
        ops.lora_4bit_forward(x, *w, A[:, :64], B, 1.0, **nst)
    with pytest.raises(RuntimeError, match=r"lora_B must have shape \[N=48, r=8\]"):
        ops.lora_4bit_forward(x, *w, A, B[:, :4], 1.0, **nst)
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\)"):
        ops.lora_4bit_forward(x, *w, A, B, 1.0, 1.0, torch.tensor([1]), **nst)
    with pytest.raises(RuntimeError, match="seed must be a one-element int64 tensor"):
        ops.lora_4bit_forward(x, *w, A, B, 1.0, 0.1, None, **nst)
    with pytest.raises(RuntimeError, match="x has last dimension 64"):
        ops.lora_4bit_forward(x[:, :64], *w, A, B, 1.0, **nst)
    with pytest.raises(RuntimeError, match="lora_A must be float32"):
        ops.lora_4bit_forward(x, *w, A.int(), B, 1.0, **nst)
