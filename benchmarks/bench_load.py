"""Memory and time of loading a checkpoint in 4 bits: four ways, compute dtype fp32 and bf16.

The checkpoint is made here: a Llama-shaped model of about 1.1B parameters (TinyLlama's
shape) with random weights, written by ``save_pretrained`` in bf16, shards of at most 500 MB,
into benchmarks/out/ (ignored by git; reused on later runs). Each load runs in its own process,
which samples its RssAnon (/proc/self/status) every 2 ms during the load; the table gives the
peak above the idle interpreter (torch and transformers imported), the peak RSS and the time.

    python benchmarks/bench_load.py                 # CPU table into RESULTS.md
    python benchmarks/bench_load.py --device cuda   # GPU check: max_memory_allocated, JSON row

The ways: ``plain`` (from_pretrained in the dtype), ``plain+prepare_model`` (then our
prepare_model), ``qlora_ext`` (from_pretrained with QloraExtConfig) and ``bitsandbytes``
(from_pretrained with BitsAndBytesConfig(load_in_4bit=True)). Target for ``qlora_ext``: peak
anonymous memory at most the loaded model + its largest tensor in the compute dtype + 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

OUT = Path(__file__).with_name("out")
WAYS = ["plain", "plain+prepare_model", "qlora_ext", "bitsandbytes"]
# TinyLlama-1.1B's shape (1.10B parameters); the CUDA check uses a smaller one to fit in 30 s.
SHAPES = {
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, vocab_size=32000),
    "0.3b": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, vocab_size=32000),
}


def make_checkpoint(shape: str) -> Path:
    d = OUT / f"llama-{shape}-bf16"
    if (d / "config.json").is_file():
        return d
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **SHAPES[shape], num_attention_heads=32 if shape == "1.1b" else 16,
        num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no fp32 model on the way
    model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(d, max_shard_size="500MB")
    return d


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def child(way: str, dtype_name: str, path: str, device: str) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import resource

    import torch
    import transformers

    import qlora_ext

    dtype = getattr(torch, dtype_name)
    kw: dict = dict(dtype=dtype, device_map=device)
    if way == "qlora_ext":
        kw["quantization_config"] = qlora_ext.QloraExtConfig(compute_dtype=dtype)
    elif way == "bitsandbytes":
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )  # fmt: skip
    idle, peak, done = _rss_anon(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kw)
    if way == "plain+prepare_model":
        qlora_ext.prepare_model(model, compute_dtype=dtype, gradient_checkpointing=False)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    done.set()
    t.join()
    peak[0] = max(peak[0], _rss_anon())
    tensors = {id(v): v for v in model.state_dict().values()}.values()
    model_bytes = sum(v.numel() * v.element_size() for v in tensors)
    biggest = max(v.numel() for v in tensors if v.is_floating_point())
    row = dict(
        way=way, dtype=dtype_name, device=device, wall_s=wall, model_bytes=model_bytes,
        largest_tensor_bytes=biggest * dtype.itemsize, anon_peak_bytes=peak[0] - idle,
        rss_peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )  # fmt: skip
    if device == "cuda":
        row["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
        # One 16-bit tensor: the largest weight as it streams in, before it is quantized.
        row["cuda_budget_bytes"] = model_bytes + biggest * 2
        row["cuda_ok"] = row["cuda_peak_bytes"] <= row["cuda_budget_bytes"]
    return row


def _run(way, dtype, path, device) -> dict | None:
    cmd = [sys.executable, __file__, "--child", way, "--dtype", dtype, "--path", str(path)]
    p = subprocess.run([*cmd, "--device", device], capture_output=True, text=True)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not line:
        print(f"{way} {dtype} failed:\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}")
        return None
    return json.loads(line[0][7:])


def isa() -> str:
    import qlora_ext

    info = qlora_ext.build_info()
    return str(info.get("cpu_isa", info))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default=None, choices=list(SHAPES), help="1.1b (cpu), 0.3b (cuda)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-results", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        row = child(args.child, args.dtype, args.path, args.device)
        print("RESULT " + json.dumps(row), flush=True)
        return
    from _common import machine, markdown_table, write_json, write_section

    print(f"machine: {machine(args.device)}; qlora_ext CPU ISA: {isa()}")
    path = make_checkpoint(args.shape or ("1.1b" if args.device == "cpu" else "0.3b"))
    if args.device == "cuda":
        row = _run("qlora_ext", "bfloat16", path, "cuda")
        print(json.dumps(row))
        write_json(args.json, [row] if row else [])
        sys.exit(0 if row and row["cuda_ok"] else 1)
    rows = [r for d in ("float32", "bfloat16") for w in WAYS if (r := _run(w, d, path, "cpu"))]
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    table = []
    for r in rows:
        target = ""
        if r["way"] == "qlora_ext":
            budget = 1.1 * (r["model_bytes"] + r["largest_tensor_bytes"])
            target = f"{mib(budget)} ({'met' if r['anon_peak_bytes'] <= budget else 'MISSED'})"
        table.append(
            [r["way"], r["dtype"], mib(r["anon_peak_bytes"]), mib(r["rss_peak_bytes"]),
             f"{r['wall_s']:.1f}", mib(r["model_bytes"]), target]
        )  # fmt: skip
    md = markdown_table(
        ["load", "compute dtype", "peak RssAnon MiB", "peak RSS MiB", "wall s", "model MiB",
         "target MiB"],
        table,
    )  # fmt: skip
    print(md)
    write_json(args.json, rows)
    if not args.no_results:
        write_section(
            "bench_load:cpu",
            "Loading a 1.1B-parameter bf16 checkpoint (CPU)",
            md,
            "cpu",
            f"Llama-shaped random weights (TinyLlama's shape), save_pretrained in bf16, 500 MB "
            f"shards, on local disk. qlora_ext CPU ISA: {isa()}. Peak RssAnon is above the idle "
            "interpreter, sampled every 2 ms; target = 1.1 x (loaded model + its largest tensor "
            "in the compute dtype). Each load in its own process.",
        )


if __name__ == "__main__":
    main()
