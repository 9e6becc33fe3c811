"""Tensors of more than 2^31 elements on the CPU: quantize_4bit, dequantize_4bit and matmul_4bit
(forward and input gradient) against tests/reference.py on sampled blocks, rows and columns,
on every CPU ISA. An int32 element count, block index or byte offset would wrap past 2^31
elements (or 2^31 bytes) and read or write the wrong place, so the samples sit on both sides of
2^29, 2^30 and 2^31 elements, at both ends, and at random.

About 4.3 GB of bf16 input and a peak near 8 GB, two minutes on 2 cores: `make test-slow`
(marked slow, so `make test` and a plain pytest leave them out)."""

import pytest
import torch

import qlora_ext
import reference as R
from conftest import FORCED_ISA, ISA_ORDER, _isa_available
from qlora_ext.functional import dynamic_code_8bit, get_4bit_code
from qlora_ext.quant_state import NestedState, QuantState

pytestmark = pytest.mark.slow
ops = torch.ops.qlora_ext
BIG = 2**31 + 192 + 7  # odd, and a partial last block of 7 at blocksize 64
BS = 64


def isas() -> list[str]:
    """The ISAs to run, best first: all this CPU has, or QLORA_EXT_CPU_ISA's alone."""
    if FORCED_ISA is not None:
        return [FORCED_ISA]
    return [isa for isa in reversed(ISA_ORDER) if _isa_available(isa)]


def sampled_blocks(nblocks: int, blocksize: int, count: int = 256) -> torch.Tensor:
    """Block indices: both ends, both sides of 2^29, 2^30 and 2^31 elements, and random ones."""
    picks = {0, 1, 2, nblocks - 3, nblocks - 2, nblocks - 1}
    for edge in (2**29, 2**30, 2**31):
        b = edge // blocksize
        picks |= {b - 2, b - 1, b, b + 1}
    picks |= set(torch.randint(0, nblocks, (count,)).tolist())
    return torch.tensor(sorted(p for p in picks if 0 <= p < nblocks))


def element_index(blocks: torch.Tensor, blocksize: int, n: int) -> torch.Tensor:
    """The flat positions of the elements of `blocks` (all full blocks)."""
    idx = blocks.view(-1, 1) * blocksize + torch.arange(blocksize)
    assert int(idx.max()) < n
    return idx.reshape(-1)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def test_quantize_and_dequantize_past_2_to_the_31_elements():
    w = torch.empty(BIG, dtype=torch.bfloat16).normal_()
    nblocks = -(-BIG // BS)
    blocks = sampled_blocks(nblocks - 1, BS)  # the partial last block is checked on its own
    idx = element_index(blocks, BS, BIG)
    w_sampled, tail = w[idx], w[(nblocks - 1) * BS :].clone()

    first = None
    for isa in isas():
        qlora_ext._C.set_cpu_isa(isa)
        packed, absmax = ops.quantize_4bit(w, BS, "nf4")
        if first is None:
            first = packed, absmax
        else:  # every ISA writes the same bytes
            assert torch.equal(packed, first[0]) and torch.equal(absmax, first[1]), isa
        del packed, absmax
    packed, absmax = first
    assert packed.numel() == (BIG + 1) // 2 and absmax.numel() == nblocks
    # Sampled full blocks against the oracle: blocks are independent, so quantizing only the
    # sampled ones gives their bytes. Sampled block j's bytes are packed[32 b_j ... 32 b_j + 32).
    ref_packed, ref_absmax = R.quantize_4bit(w_sampled, BS, "nf4")
    byte_idx = (blocks.view(-1, 1) * (BS // 2) + torch.arange(BS // 2)).reshape(-1)
    assert torch.equal(packed[byte_idx], ref_packed)
    assert torch.equal(bits(absmax[blocks]), bits(ref_absmax))
    ref_tail, ref_tail_absmax = R.quantize_4bit(tail, BS, "nf4")
    assert torch.equal(packed[(nblocks - 1) * BS // 2 :], ref_tail)
    assert torch.equal(bits(absmax[-1:]), bits(ref_tail_absmax))

    # Double quantization of all 33.5M absmax: sampled codes against the oracle.
    dq_packed, state = qlora_ext.quantize_4bit(w, BS, "nf4", double_quant=True)
    del w, dq_packed
    assert state.absmax.dtype == torch.uint8
    ref_q, ref_nested = R.quantize_blockwise_8bit(absmax - state.offset, dynamic_code_8bit(), 256)
    assert torch.equal(state.absmax[blocks], ref_q[blocks])
    assert torch.equal(state.state2.absmax, ref_nested)
    del ref_q

    plain = QuantState(
        absmax=absmax,
        shape=torch.Size([BIG]),
        code=get_4bit_code("nf4"),
        dtype=torch.bfloat16,
        blocksize=BS,
        quant_type="nf4",
    )
    tail_idx = torch.arange((nblocks - 1) * BS, BIG)
    for isa in isas():
        qlora_ext._C.set_cpu_isa(isa)
        for s in (plain, state):
            out = qlora_ext.dequantize_4bit(packed, s)
            assert out.shape == (BIG,) and out.dtype == torch.bfloat16
            used = _fp32_absmax(s)
            for where in (idx, tail_idx):
                want = R.dequantize_4bit_elements(packed, used, BS, "nf4", where)
                assert torch.equal(bits(out[where]), bits(want.to(torch.bfloat16))), (isa, s.nested)
            del out
    qlora_ext._C.set_cpu_isa(FORCED_ISA or "auto")


def _fp32_absmax(state: QuantState) -> torch.Tensor:
    """The fp32 block scales the kernels use, the nested quantization undone (two roundings)."""
    if state.state2 is None:
        return state.absmax
    s2 = state.state2
    return (
        R.dequantize_blockwise_8bit(state.absmax, s2.absmax, s2.code, s2.blocksize, torch.float32)
        + state.offset
    )


def random_4bit_weight(N: int, K: int, blocksize: int, quant_type: str) -> QuantState:
    """(packed, state): random codes and block scales, double-quantized as quantize_4bit does
    (what is checked is where the GEMMs read, not how the weight was made)."""
    packed = torch.randint(0, 256, (N * K // 2,), dtype=torch.uint8)
    absmax = torch.rand(N * K // blocksize) + 0.05
    offset = absmax.mean()
    q, nested = qlora_ext.quantize_blockwise_8bit(absmax - offset, dynamic_code_8bit(), 256)
    state = QuantState(
        absmax=q,
        shape=torch.Size([N, K]),
        code=get_4bit_code(quant_type),
        dtype=torch.float32,
        blocksize=blocksize,
        quant_type=quant_type,
        offset=offset,
        state2=NestedState(absmax=nested, code=dynamic_code_8bit(), blocksize=256),
    )
    return packed.view(-1, 1), state


def within_2x_of_torch(out: torch.Tensor, ref: torch.Tensor, torch_out: torch.Tensor, what):
    """Per column: the kernel's error against the fp64 oracle is at most twice that of torch's
    fp32 product with the same dequantized weight, plus a floor at fp32 rounding level."""
    err = (out.double() - ref).norm(dim=0) / ref.norm(dim=0)
    torch_err = (torch_out.double() - ref).norm(dim=0) / ref.norm(dim=0)
    bad = (err > 2 * torch_err + 1e-6).nonzero().flatten()
    assert bad.numel() == 0, (what, bad[:8].tolist(), err[bad[:8]].tolist())


@pytest.mark.parametrize("quant_type", ["fp4"])
def test_matmul_past_2_to_the_31_weight_elements(quant_type):
    # 524288 rows of 4096 is 2^31 elements: the last 37 rows lie wholly past it.
    N, K, bs = 2**19 + 37, 4096, 64
    packed, state = random_4bit_weight(N, K, bs, quant_type)
    absmax32 = _fp32_absmax(state)
    flat = packed.reshape(-1)
    rows = sampled_blocks(N, K, count=96)  # rows of W (output columns of the forward)
    w_rows = R.dequantize_4bit_elements(
        flat, absmax32, bs, quant_type, element_index(rows, K, N * K)
    )
    w_rows = w_rows.view(-1, K)
    cols = sampled_blocks(K, 1, count=48)  # columns of W (output columns of the input gradient)
    col_idx = (torch.arange(N).view(-1, 1) * K + cols).reshape(-1)
    w_cols = R.dequantize_4bit_elements(flat, absmax32, bs, quant_type, col_idx).view(N, -1)
    del absmax32, col_idx
    for isa in isas():
        qlora_ext._C.set_cpu_isa(isa)
        # M = 3: the fused kernels (AVX-512 and AVX2 planes; streamed rows on scalar); 48: the
        # panels, transposed; 70: the panels, A @ panel^T.
        for M in (3, 48, 70):
            x = torch.randn(M, K)
            out = qlora_ext.matmul_4bit(x, packed, state)
            assert out.shape == (M, N)
            within_2x_of_torch(
                out[:, rows], x.double() @ w_rows.double().t(), x @ w_rows.t(), ("fwd", isa, M)
            )
            del out
        # M = 3: the fused input gradient on AVX-512, the panels elsewhere; 70: the panels.
        for M in (3, 70):
            g = torch.randn(M, N)
            grad = ops.gemm_4bit_grad_input(
                g,
                flat,
                state.absmax,
                N,
                K,
                bs,
                quant_type,
                **qlora_ext.functional._nested_args(state),
            )
            assert grad.shape == (M, K)
            within_2x_of_torch(
                grad[:, cols], g.double() @ w_cols.double(), g @ w_cols, ("grad", isa, M)
            )
            del grad
    qlora_ext._C.set_cpu_isa(FORCED_ISA or "auto")
