#!/usr/bin/env python3
"""A short, representative CUDA workload for compute-sanitizer: every op once, at odd shapes,
on every GEMM path. Run by scripts/gpu_check.sh under --tool memcheck and --tool racecheck."""

import torch

import qlora_ext

ops = torch.ops.qlora_ext


def main() -> None:
    assert torch.cuda.is_available() and qlora_ext.build_info()["cuda"], "needs CUDA"
    torch.manual_seed(0)
    dev = "cuda"
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(77, 192, device=dev, dtype=dtype)  # odd N; 14784 = 231 blocks of 64
        for dq in (False, True):
            packed, state = qlora_ext.quantize_4bit(w, 64, "nf4", dq)
            qlora_ext.dequantize_4bit(packed, state)
        odd = torch.randn(4097 + 3, device=dev, dtype=dtype)  # partial block, odd numel
        p, s = qlora_ext.quantize_4bit(odd, 4096, "fp4", True)
        qlora_ext.dequantize_4bit(p, s)
        q, a = qlora_ext.quantize_blockwise_8bit(odd)
        qlora_ext.dequantize_blockwise_8bit(q, a, dtype=dtype)
        packed, state = qlora_ext.quantize_4bit(w, 64, "nf4", True)
        bias = torch.randn(77, device=dev, dtype=dtype)
        lora_A = torch.randn(8, 192, device=dev, requires_grad=True)
        lora_B = torch.randn(77, 8, device=dev, requires_grad=True)
        for path in ("small", "tc", "panel"):
            qlora_ext._C.set_gemm_path(path)
            for M in (1, 5, 17, 130):
                x = torch.randn(M, 192, device=dev, dtype=dtype, requires_grad=True)
                qlora_ext.matmul_4bit(x, packed, state, bias).sum().backward()
                # The LoRA term in each GEMM's epilogue (Note [LoRA epilogue]).
                y = qlora_ext.lora_4bit(x, packed, state, lora_A, lora_B, 2.0, bias=bias)
                y.float().sum().backward()
        qlora_ext._C.set_gemm_path("auto")
    torch.cuda.synchronize()
    print("sanitize_subset: done")


if __name__ == "__main__":
    main()
