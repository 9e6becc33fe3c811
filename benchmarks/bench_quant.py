"""Quantize / dequantize throughput: qlora_ext against bitsandbytes 0.50.2, same run, same
device. Weights from LLaMA-7B (4096x4096 and 11008x4096), fp32 and bf16, with and without
double quantization, NF4 at blocksize 64.

    python benchmarks/bench_quant.py                 # CPU
    python benchmarks/bench_quant.py --device cuda   # GPU: adds % of measured copy bandwidth
"""

from __future__ import annotations

import argparse
import time
import warnings
from functools import partial

import torch
from _common import (
    RowLog,
    add_common_args,
    apply_common_args,
    copy_bandwidth_gbs,
    markdown_table,
    time_fn,
    write_section,
)

import qlora_ext

try:
    import bitsandbytes.functional as bnb_F
except Exception:  # bitsandbytes is optional: the table then shows only our figures
    bnb_F = None

SHAPES = [(4096, 4096), (11008, 4096)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def first_call(fn, device: str) -> float:
    """Seconds for one call into memory nobody has touched yet: our cache of large CPU output
    blocks is emptied first, so the page faults are paid."""
    if device == "cpu":
        qlora_ext._C.empty_cpu_cache()
    else:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    ap.add_argument("--quick", action="store_true", help="first shape only")
    add_common_args(ap)
    args = ap.parse_args()
    apply_common_args(args)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dev = args.device
    ceiling = copy_bandwidth_gbs(dev) if dev == "cuda" else None
    rows, table = RowLog(args.json), []
    for shape in SHAPES[:1] if args.quick else SHAPES:
        for dname, dtype in DTYPES.items():
            w = torch.randn(shape, device=dev).to(dtype)
            n = w.numel()
            for dq in (False, True):
                ours_q = partial(qlora_ext.quantize_4bit, w, 64, "nf4", dq)
                packed, state = ours_q()
                t_q = time_fn(ours_q, dev)
                ours_d = partial(qlora_ext.dequantize_4bit, packed, state)
                t_d1 = first_call(ours_d, dev)
                t_d = time_fn(ours_d, dev)
                b_q = b_d = b_d1 = None
                if bnb_F is not None:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        bq = partial(
                            bnb_F.quantize_4bit,
                            w,
                            blocksize=64,
                            quant_type="nf4",
                            compress_statistics=dq,
                        )
                        bp, bstate = bq()
                        b_q = time_fn(bq, dev, min_runs=3)
                        bnb_d = partial(bnb_F.dequantize_4bit, bp, bstate)
                        b_d1 = first_call(bnb_d, dev)
                        b_d = time_fn(bnb_d, dev)
                # Bytes that must move: the weight once, the packed codes and the scales once.
                scale_bytes = state.absmax.numel() * state.absmax.element_size()
                moved = n * w.element_size() + n // 2 + scale_bytes
                row = dict(
                    shape=list(shape),
                    dtype=dname,
                    double_quant=dq,
                    device=dev,
                    quantize_ms=t_q * 1e3,
                    dequantize_ms=t_d * 1e3,
                    bnb_quantize_ms=None if b_q is None else b_q * 1e3,
                    bnb_dequantize_ms=None if b_d is None else b_d * 1e3,
                    dequantize_first_call_ms=t_d1 * 1e3,
                    bnb_dequantize_first_call_ms=None if b_d1 is None else b_d1 * 1e3,
                    quantize_gbs=moved / t_q / 1e9,
                    dequantize_gbs=moved / t_d / 1e9,
                    copy_ceiling_gbs=ceiling,
                )
                rows.append(row)

                def fmt(ours, theirs):
                    if theirs is None:
                        return f"{ours * 1e3:.2f}"
                    return f"{ours * 1e3:.2f} vs {theirs * 1e3:.2f} (**{theirs / ours:.1f}x**)"

                line = [
                    f"{shape[0]}x{shape[1]}",
                    dname,
                    "yes" if dq else "no",
                    fmt(t_q, b_q),
                    fmt(t_d, b_d),
                    fmt(t_d1, b_d1),
                    f"{row['quantize_gbs']:.1f} / {row['dequantize_gbs']:.1f}",
                ]
                if ceiling:
                    line.append(
                        f"{100 * row['quantize_gbs'] / ceiling:.0f}% / "
                        f"{100 * row['dequantize_gbs'] / ceiling:.0f}%"
                    )
                table.append(line)
                print(" | ".join(line), flush=True)
    headers = [
        "weight",
        "dtype",
        "double quant",
        "quantize ms: ours vs bnb (speed-up)",
        "dequantize ms: ours vs bnb (speed-up)",
        "dequantize first call ms, uncached",
        "GB/s quant / dequant",
    ]
    if ceiling:
        headers.append(f"of copy ceiling ({ceiling:.0f} GB/s)")
    md = markdown_table(headers, table)
    print(md)
    if not args.no_results:
        notes = (
            "Dequantize writes the weight's dtype (fp32 rows: fp32 out; bf16 rows: bf16 out). "
            "GB/s counts the weight, packed codes and scales once each. Our outputs of 32 MB "
            "and more reuse the blocks of freed ones (Note [Large CPU outputs], "
            "cpp/cpu/cpu_alloc.h), so the steady-state column writes into memory already "
            "faulted in; the first-call column empties that cache first "
            "(qlora_ext._C.empty_cpu_cache) and times one call each, page faults included "
            "(bitsandbytes allocates through torch, whose freed blocks glibc may or may not "
            "reuse)."
        )
        write_section(f"bench_quant:{dev}", f"Quantize / dequantize ({dev})", md, dev, notes)


if __name__ == "__main__":
    main()
