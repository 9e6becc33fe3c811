"""4-bit matmul against dense F.linear and bitsandbytes 0.50.2, from the same run.

Weight shapes [N, K] from LLaMA-7B, LLaMA-70B and SmolLM2-135M; M tokens; forward, and forward +
backward with respect to the input. Prints a table, writes JSON, a Markdown section of
benchmarks/RESULTS.md and a PNG of time / dense time against M.

    python benchmarks/bench_matmul.py                  # CPU, 2 threads, fp32, the target cases
    python benchmarks/bench_matmul.py --full           # every shape and M (slow on a CPU)
    python benchmarks/bench_matmul.py --device cuda    # GPU, bf16, the full grid
"""

from __future__ import annotations

import argparse
import copy
import itertools
import warnings
from functools import partial
from pathlib import Path

import torch
from _common import (
    LAYER_SHAPES,
    RowLog,
    add_common_args,
    apply_common_args,
    markdown_table,
    pyplot,
    time_fn,
    write_section,
)

import qlora_ext

try:
    import bitsandbytes as bnb
except Exception:  # optional baseline
    bnb = None

SHAPES = LAYER_SHAPES
MS = [1, 4, 16, 64, 512, 4096]
CPU_DEFAULT = {"shapes": ["llama7b-qkvo", "smollm2-up"], "ms": [1, 16, 512]}


# Note [Rotating weights]: a model touches each layer's weight once per step, so the weight comes
# from DRAM (or HBM), not from cache. This CPU has a 260 MB L3 that holds a whole 64 MB dense
# weight (and the GPU a 60 MB L2), so timing one weight over and over measures the cache: dense
# M=1 here takes 1.2 ms that way and 2.3 ms from DRAM. Every method therefore cycles through
# enough copies of its weight to exceed the cache several times over.
ROTATE_BYTES = {"cpu": 1 << 30, "cuda": 512 << 20}


def rotation(make, nbytes, device):
    """`make()` called once per copy (each copy is its own memory)."""
    copies = max(1, -(-ROTATE_BYTES[device] // nbytes))
    return itertools.cycle([make() for _ in range(copies)])


def frozen_copy(lin):
    # Backward is measured with respect to the input only, as for the frozen 4-bit weight.
    c = copy.deepcopy(lin)
    c.weight.requires_grad_(False)
    return c


def fwd(fs, x):
    return next(fs)(x)


def fwd_bwd(fs, x, g):
    x.grad = None
    next(fs)(x).backward(g)


def bnb_layer(w, dtype):
    layer = bnb.nn.Linear4bit(
        w.shape[1],
        w.shape[0],
        bias=False,
        compute_dtype=dtype,
        quant_type="nf4",
        compress_statistics=True,
    )
    layer.weight = bnb.nn.Params4bit(
        w.detach().clone(),
        requires_grad=False,
        quant_type="nf4",
        blocksize=64,
        compress_statistics=True,
    )
    return layer.to(w.device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--isa",
        default="auto",
        choices=["auto", "avx512", "avx2", "scalar"],
        help="CPU kernels to use (an AVX2-only machine's paths can be timed on an AVX-512 one)",
    )
    ap.add_argument("--full", action="store_true", help="every shape and M")
    ap.add_argument("--png", default=None, help="plot (default benchmarks/matmul_ratio*.png)")
    add_common_args(ap)
    args = ap.parse_args()
    apply_common_args(args)
    dev = args.device
    if dev == "cpu":
        torch.set_num_threads(args.threads)
        qlora_ext._C.set_cpu_isa(args.isa)
    forced = None if dev == "cuda" or args.isa == "auto" else args.isa  # forced CPU kernels
    tag = f"{dev}, {forced} kernels" if forced else dev
    if args.png is None:
        suffix = f"_{forced}" if forced else ""
        args.png = str(Path(__file__).with_name(f"matmul_ratio{suffix}.png"))
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    full = args.full or dev == "cuda"
    shapes = list(SHAPES) if full else CPU_DEFAULT["shapes"]
    ms = MS if full else CPU_DEFAULT["ms"]
    rows, table = RowLog(args.json), []
    for name in shapes:
        N, K = SHAPES[name]
        w = torch.randn(N, K, device=dev, dtype=dtype) / K**0.5
        lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=dtype)
        lin.weight.data = w
        packed_bytes = N * K // 2 + N * K // 64
        dense = rotation(partial(frozen_copy, lin), N * K * w.element_size(), dev)
        q = rotation(
            partial(qlora_ext.nn.Linear4bit.from_linear, lin, "nf4", 64, True), packed_bytes, dev
        )
        ref = None
        if bnb is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = rotation(partial(bnb_layer, w, dtype), packed_bytes, dev)
        for M in ms:
            x = torch.randn(M, K, device=dev, dtype=dtype)
            xg = x.clone().requires_grad_()
            g = torch.randn(M, N, device=dev, dtype=dtype)
            res = {"shape": name, "N": N, "K": K, "M": M, "dtype": str(dtype), "device": dev}
            for mode in ("fwd", "fwd+bwd"):
                runs = {"dense": dense, "ours": q}
                if ref is not None:
                    runs["bnb"] = ref
                for who, f in runs.items():
                    call = partial(fwd, f, x) if mode == "fwd" else partial(fwd_bwd, f, xg, g)
                    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                        res[f"{mode}_{who}_ms"] = time_fn(call, dev, min_time=0.3) * 1e3
            if dev == "cuda" and M > 16:
                # Each forced GEMM path, so the dispatch bounds can be set from measurements.
                for path in ("tc", "panel"):
                    qlora_ext._C.set_gemm_path(path)
                    with torch.no_grad():
                        res[f"fwd_ours_{path}_ms"] = time_fn(partial(fwd, q, x), dev) * 1e3
                    qlora_ext._C.set_gemm_path("auto")
            rows.append(res)
            line = [name, f"{N}x{K}", M]
            for mode in ("fwd", "fwd+bwd"):
                d, o = res[f"{mode}_dense_ms"], res[f"{mode}_ours_ms"]
                b = res.get(f"{mode}_bnb_ms")
                line.append(f"{d:.2f}")
                line.append(f"{o:.2f} (**{o / d:.2f}x**)")
                line.append(
                    "-" if b is None else f"{b:.2f} ({b / d:.2f}x; ours {b / o:.1f}x faster)"
                )
            table.append(line)
            print(" | ".join(str(c) for c in line), flush=True)
    headers = ["layer", "N x K", "M"]
    for mode in ("fwd", "fwd+bwd"):
        headers += [f"{mode} dense ms", f"{mode} ours ms (vs dense)", f"{mode} bnb ms (vs dense)"]
    md = markdown_table(headers, table)
    print(md)
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in shapes:
            sel = [r for r in rows if r["shape"] == name]
            mm = [r["M"] for r in sel]
            ax.plot(mm, [r["fwd_ours_ms"] / r["fwd_dense_ms"] for r in sel], "o-", label=name)
            if bnb is not None:
                ax.plot(
                    mm,
                    [r["fwd_bnb_ms"] / r["fwd_dense_ms"] for r in sel],
                    "x--",
                    label=f"{name} (bnb)",
                )
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="M (tokens)",
            ylabel="time / dense F.linear",
            title=f"4-bit matmul forward, {tag}, {str(dtype).replace('torch.', '')}",
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        print("wrote", args.png)
    if not args.no_results:
        notes = (
            f"NF4, blocksize 64, double quantization, {str(dtype).replace('torch.', '')} "
            "activations. Ratios are against dense F.linear with the full-precision weight, "
            "measured in the same run. Each method cycles through copies of its weight "
            f"totalling {ROTATE_BYTES[dev] >> 20} MB, so weights come from memory, not cache "
            f"(Note [Rotating weights] in bench_matmul.py). Plot: `{Path(args.png).name}`."
        )
        if forced:
            notes += (
                f" Our kernels forced to {forced} (qlora_ext._C.set_cpu_isa) on this machine, "
                "to show an AVX2-only CPU's paths; dense and bitsandbytes are unaffected."
            )
        section = f"bench_matmul:{dev}-{forced}" if forced else f"bench_matmul:{dev}"
        write_section(section, f"4-bit matmul ({tag})", md, dev, notes)


if __name__ == "__main__":
    main()
