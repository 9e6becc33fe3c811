#!/usr/bin/env python3
"""A short CUDA workload for compute-sanitizer that launches every kernel of this project at
least once, at odd shapes: scripts/gpu_check.sh runs it under memcheck, racecheck and initcheck
with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (so an out-of-bounds access next to a tensor lands outside
any live allocation, where memcheck sees it, rather than inside torch's pooled blocks).

Each group prints one line as it finishes, so a sanitizer log shows how far the run got.
``--list`` prints the groups and exits (used by the dry run, which has no GPU).
"""

from __future__ import annotations

import sys

import torch

GROUPS = [
    "quant-4bit: quantize/dequantize, nf4 fp4 int4, fp32 fp16 bf16, with/without double quant",
    "quant-8bit: blockwise quantize/dequantize, fp32 fp16 bf16, partial last block",
    "gemv: the streaming small-M kernel, one split (K=192) and split-K (K=4096)",
    "gemm: tensor-core and panel paths, fp16 and bf16, nf4 fp4 int4, forward and input gradient",
    "lora: the LoRA epilogue on every GEMM path, dropout 0.1, forward and backward",
    "optim: AdamW 32-bit and 8-bit steps on paged states, the non-finite count",
    "paged: one managed allocation, prefetched to the device and back",
]


def quant_4bit(qlora_ext, dev):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = torch.randn(77, 192, device=dev, dtype=dtype)  # odd N; 14784 = 231 blocks of 64
        for qt in ("nf4", "fp4", "int4"):
            for dq in (False, True):
                packed, state = qlora_ext.quantize_4bit(w, 64, qt, dq)
                qlora_ext.dequantize_4bit(packed, state)
        odd = torch.randn(4097 + 3, device=dev, dtype=dtype)  # partial block, odd numel
        p, s = qlora_ext.quantize_4bit(odd, 4096, "fp4", True)
        qlora_ext.dequantize_4bit(p, s)


def quant_8bit(qlora_ext, dev):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        odd = torch.randn(2 * 4096 + 5, device=dev, dtype=dtype)
        q, a = qlora_ext.quantize_blockwise_8bit(odd)
        qlora_ext.dequantize_blockwise_8bit(q, a, dtype=dtype)


def gemv(qlora_ext, dev):
    qlora_ext._C.set_gemm_path("small")
    for K in (192, 4096):  # gemv_4bit_splits gives one split at K = 192, several at 4096
        w = torch.randn(33, K, device=dev, dtype=torch.bfloat16)
        packed, state = qlora_ext.quantize_4bit(w, 64, "nf4", True)
        for M in (1, 3):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
            qlora_ext.matmul_4bit(x, packed, state).float().sum().backward()
    qlora_ext._C.set_gemm_path("auto")


def gemm(qlora_ext, dev):
    for dtype in (torch.float16, torch.bfloat16):
        w = torch.randn(77, 192, device=dev, dtype=dtype)
        bias = torch.randn(77, device=dev, dtype=dtype)
        for qt in ("nf4", "fp4", "int4"):
            packed, state = qlora_ext.quantize_4bit(w, 64, qt, True)
            for path in ("tc", "panel"):
                qlora_ext._C.set_gemm_path(path)
                for M in (17, 130):
                    x = torch.randn(M, 192, device=dev, dtype=dtype, requires_grad=True)
                    y = qlora_ext.matmul_4bit(x, packed, state, bias)
                    y.float().sum().backward()
        qlora_ext._C.set_gemm_path("auto")


def lora(qlora_ext, dev):
    w = torch.randn(77, 192, device=dev, dtype=torch.bfloat16)
    packed, state = qlora_ext.quantize_4bit(w, 64, "nf4", True)
    bias = torch.randn(77, device=dev, dtype=torch.bfloat16)
    lora_A = torch.randn(8, 192, device=dev, requires_grad=True)
    lora_B = torch.randn(77, 8, device=dev, requires_grad=True)
    for path in ("small", "tc", "panel"):
        qlora_ext._C.set_gemm_path(path)
        for M in (1, 5, 17, 130):
            x = torch.randn(M, 192, device=dev, dtype=torch.bfloat16, requires_grad=True)
            y = qlora_ext.lora_4bit(x, packed, state, lora_A, lora_B, 2.0, 0.1, bias=bias)
            y.float().sum().backward()
    qlora_ext._C.set_gemm_path("auto")


def optim(qlora_ext, dev):
    from qlora_ext.optim import PagedAdamW, PagedAdamW8bit

    for cls in (PagedAdamW, PagedAdamW8bit):
        params = [torch.nn.Parameter(torch.randn(n, device=dev)) for n in (256 * 40 + 3, 777)]
        opt = cls(params, lr=1e-3, min_paged_numel=1000, page_out=True)
        for step in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
            if step == 1:
                params[0].grad[5] = float("nan")  # the non-finite count, and a skipped tensor
            opt.step()


def paged(qlora_ext, dev):
    like = torch.empty(0, device=dev)
    t = qlora_ext._C.paged_empty([300_001], like, 0)
    assert qlora_ext._C.paged_is_managed(t)
    t.fill_(1.0)
    qlora_ext._C.paged_prefetch(t, True)
    qlora_ext._C.paged_prefetch(t, False)
    assert float(t.sum()) == 300_001.0


RUNS = [quant_4bit, quant_8bit, gemv, gemm, lora, optim, paged]


def main() -> int:
    if "--list" in sys.argv:
        print("\n".join(GROUPS))
        return 0
    import qlora_ext

    if not (torch.cuda.is_available() and qlora_ext.build_info()["cuda"]):
        print("sanitize_subset: needs a CUDA device and the CUDA kernels")
        return 2
    torch.manual_seed(0)
    for label, run in zip(GROUPS, RUNS, strict=True):
        run(qlora_ext, "cuda")
        torch.cuda.synchronize()
        print("sanitize_subset: ok", label.split(":")[0], flush=True)
    print("sanitize_subset: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
