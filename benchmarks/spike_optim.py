"""GPU spike test for the paged optimizers (not a bench_*.py: gpu_check.sh runs it once, on its
own). Under a per-process memory cap that fits parameters and gradients but not AdamW's states,
torch.optim.AdamW runs out of memory while qlora_ext's PagedAdamW(page_out=True) completes,
because its states live in CUDA managed memory (outside torch's allocator) and are prefetched
to the GPU only for their own update. Reports the device bytes the states hold between steps
(from cudaMemGetInfo) and the time per step, paged in/out against resident.

    python benchmarks/spike_optim.py [--params 500_000_000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from qlora_ext.optim import PagedAdamW

N_TENSORS = 8
GIB = 1 << 30


def used_bytes() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


def timed_steps(opt, steps: int) -> float:
    opt.step()  # creates the states
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=int, default=500_000_000, help="fp32 parameters (500M)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("spike_optim: needs a CUDA device; skipped")
        return 0
    free, total = torch.cuda.mem_get_info()
    state_bytes = 8 * args.params  # exp_avg + exp_avg_sq, fp32
    # Managed memory is not covered by the allocator cap: keep it well inside the free memory.
    if state_bytes > free // 4:
        print(f"spike_optim: {state_bytes / GIB:.1f} GiB of states exceeds a quarter of the free "
              f"{free / GIB:.1f} GiB; lower --params")  # fmt: skip
        return 1
    # Cap: parameters + gradients + 1 GiB of headroom, which AdamW's states do not fit in.
    cap = 8 * args.params + GIB
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    per = args.params // N_TENSORS
    params = [torch.nn.Parameter(torch.zeros(per, device="cuda")) for _ in range(N_TENSORS)]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    torch.cuda.synchronize()
    base = used_bytes()
    result = dict(params=args.params, cap_bytes=cap, state_bytes=state_bytes)

    try:
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
        opt.step()
        torch.cuda.synchronize()
        result["torch_adamw"] = "completed (cap not binding?)"
    except torch.OutOfMemoryError:
        result["torch_adamw"] = "OOM"
    opt = None  # frees whatever state torch allocated before failing
    torch.cuda.empty_cache()

    for page_out in (True, False):
        opt = PagedAdamW(params, lr=1e-4, page_out=page_out)
        t = timed_steps(opt, args.steps)
        torch.cuda.synchronize()
        held = used_bytes() - base
        key = "paged_page_out" if page_out else "paged_resident"
        result[key] = dict(step_s=t, device_bytes_between_steps=held)
        del opt
        torch.cuda.empty_cache()

    print(json.dumps(result, indent=2))
    print("| run | result | step s | device GiB held by states between steps |")
    print("|---|---|---|---|")
    print(f"| torch AdamW under the cap | {result['torch_adamw']} | - | - |")
    for key, name in (("paged_page_out", "PagedAdamW page_out=True"),
                      ("paged_resident", "PagedAdamW (resident)")):  # fmt: skip
        r = result[key]
        print(f"| {name} | completed | {r['step_s']:.3f} | "
              f"{r['device_bytes_between_steps'] / GIB:.2f} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    ok = result["torch_adamw"] == "OOM"
    ok &= result["paged_page_out"]["device_bytes_between_steps"] < 0.25 * state_bytes
    print("spike_optim:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
