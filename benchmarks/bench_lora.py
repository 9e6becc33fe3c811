"""LoRA training step of one layer (forward + backward): our fused LoRALinear4bit against PEFT
LoRA over bitsandbytes' Linear4bit (the usual QLoRA stack) and PEFT LoRA over a dense
nn.Linear, all measured in the same run.

LLaMA-7B layer shapes, M tokens, r = 16, alpha = 32, dropout 0.05, training mode; gradients
flow to the input and to the adapters, the base weight is frozen. Reports time and the bytes
the autograd graph saves for the backward (activation memory, counted with saved-tensor
hooks, so it is the same measure on the CPU and the GPU), plus the peak allocated memory on
CUDA; ratios are against dense PEFT and PEFT+bitsandbytes.

    python benchmarks/bench_lora.py                  # CPU, 2 threads, fp32, a quick subset
    python benchmarks/bench_lora.py --full           # every shape at M = 512 and 4096 (slow)
    python benchmarks/bench_lora.py --device cuda    # GPU, bf16, the full grid
"""

from __future__ import annotations

import argparse
import warnings
from functools import partial

import torch
from _common import (
    LAYER_SHAPES,
    RowLog,
    add_common_args,
    apply_common_args,
    markdown_table,
    time_fn,
    write_section,
)
from torch import nn

import qlora_ext

try:
    import bitsandbytes as bnb
except Exception:  # optional baseline
    bnb = None
try:
    import peft
except Exception:  # optional baseline
    peft = None

SHAPES = {k: v for k, v in LAYER_SHAPES.items() if k.startswith("llama7b")}
MS = [512, 4096]
CPU_DEFAULT = {"shapes": ["llama7b-qkvo", "llama7b-down"], "ms": [512]}
R, ALPHA, DROPOUT = 16, 32, 0.05


class Holder(nn.Module):
    """PEFT wraps named submodules; this gives the layer a name to target."""

    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


class TorchLoRA(nn.Module):
    """Where peft is not installed (the offline GPU machine): the computation of PEFT's
    lora.Linear.forward, base(x) + lora_B(lora_A(dropout(x.to(A's dtype)))) * scaling, with
    PEFT's initialisation; the table then says "torch LoRA" instead of "PEFT"."""

    def __init__(self, base):
        super().__init__()
        self.base = base.requires_grad_(False)
        dev = next(base.parameters()).device
        self.lora_A = nn.Linear(base.in_features, R, bias=False, device=dev)
        self.lora_B = nn.Linear(R, base.out_features, bias=False, device=dev)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x):
        y = self.base(x)
        h = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return y + (h * (ALPHA / R)).to(y.dtype)


def peft_wrap(layer):
    if peft is None:
        return TorchLoRA(layer).train()
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=["proj"])
    m = peft.get_peft_model(Holder(layer), cfg)
    m.train()
    return m


def bnb_layer(w, dtype):
    layer = bnb.nn.Linear4bit(
        w.shape[1], w.shape[0], bias=False, compute_dtype=dtype, quant_type="nf4",
        compress_statistics=True,
    )  # fmt: skip
    layer.weight = bnb.nn.Params4bit(
        w.detach().clone(), requires_grad=False, quant_type="nf4", blocksize=64,
        compress_statistics=True,
    )  # fmt: skip
    return layer.to(w.device)


def step(model, x, g):
    x.grad = None
    model(x).backward(g)
    for p in model.parameters():
        p.grad = None


def saved_bytes(model, x, g) -> int:
    """Activation bytes the autograd graph keeps for the backward: distinct storages of saved
    tensors with one row per token (weights, adapters and quantization state are not
    activations, and x itself is kept by the previous layer anyway)."""
    M = x.shape[0]
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == M:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    y.backward(g)
    seen.pop(x.untyped_storage().data_ptr(), None)
    return sum(seen.values())


def peak_bytes(model, x, g, dev) -> int | None:
    if dev != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(model, x, g)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="every shape at M = 512 and 4096")
    add_common_args(ap)
    args = ap.parse_args()
    apply_common_args(args)
    dev = args.device
    if dev == "cpu":
        torch.set_num_threads(args.threads)
    if peft is None:
        print("peft is not installed: the baselines are torch LoRA layers with PEFT's maths")
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    full = args.full or dev == "cuda"
    shapes = list(SHAPES) if full else CPU_DEFAULT["shapes"]
    ms = MS if full else CPU_DEFAULT["ms"]
    rows, table = RowLog(args.json), []
    for name in shapes:
        N, K = SHAPES[name]
        torch.manual_seed(0)
        lin = nn.Linear(K, N, bias=False, device=dev, dtype=dtype)
        runs = {
            "dense": peft_wrap(lin),
            "ours": qlora_ext.LoRALinear4bit.from_linear(
                lin, r=R, alpha=ALPHA, dropout=DROPOUT, compute_dtype=dtype
            ).train(),
        }
        if bnb is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                runs["bnb"] = peft_wrap(bnb_layer(lin.weight, dtype))
        for M in ms:
            x = torch.randn(M, K, device=dev, dtype=dtype, requires_grad=True)
            g = torch.randn(M, N, device=dev, dtype=dtype)
            res = {"shape": name, "N": N, "K": K, "M": M, "dtype": str(dtype), "device": dev}
            # Note [Interleaved rounds]: the methods take turns, three rounds, best of each, so
            # load from other processes on a shared machine hits all of them alike.
            for _ in range(3):
                for who, model in runs.items():
                    t = time_fn(partial(step, model, x, g), dev, min_time=0.3) * 1e3
                    res[f"{who}_ms"] = min(t, res.get(f"{who}_ms", t))
            for who, model in runs.items():
                res[f"{who}_saved_mb"] = saved_bytes(model, x, g) / 2**20
                peak = peak_bytes(model, x, g, dev)
                res[f"{who}_peak_mb"] = None if peak is None else peak / 2**20
            rows.append(res)
            o, d, b = res["ours_ms"], res["dense_ms"], res.get("bnb_ms")
            so, sd, sb = res["ours_saved_mb"], res["dense_saved_mb"], res.get("bnb_saved_mb")
            line = [
                name, f"{N}x{K}", M, f"{d:.1f}", f"{o:.1f} (**{o / d:.2f}x**)",
                "-" if b is None else f"{b:.1f} (ours **{b / o:.2f}x** faster)",
                f"{sd:.2f}", f"{so:.2f}", "-" if sb is None else f"{sb:.2f} ({sb / so:.0f}x ours)",
            ]  # fmt: skip
            if dev == "cuda":
                pb = res.get("bnb_peak_mb")
                line += [
                    f"{res['dense_peak_mb']:.0f}", f"{res['ours_peak_mb']:.0f}",
                    "-" if pb is None else f"{pb:.0f}",
                ]  # fmt: skip
            table.append(line)
            print(" | ".join(str(c) for c in line), flush=True)
    lib = "PEFT" if peft is not None else "torch LoRA"
    headers = [
        "layer", "N x K", "M", f"{lib} dense ms", "ours ms (vs dense)", f"{lib}+bnb ms",
        "dense saved MB", "ours saved MB", f"{lib}+bnb saved MB",
    ]  # fmt: skip
    if dev == "cuda":
        headers += ["dense peak MB", "ours peak MB", "PEFT+bnb peak MB"]
    md = markdown_table(headers, table)
    print(md)
    if not args.no_results:
        notes = (
            f"One layer's training step (forward + backward to x, A and B), r={R}, "
            f"alpha={ALPHA}, dropout={DROPOUT}, {str(dtype).replace('torch.', '')}; NF4, "
            "blocksize 64, double quantization. 'saved MB' counts the tensors autograd keeps "
            "for the backward with one row per token (activations), the layer input "
            "excluded. PEFT 'dense' is PEFT LoRA over an nn.Linear with the full-precision "
            "weight; 'PEFT+bnb' is PEFT LoRA over bitsandbytes.nn.Linear4bit."
        )
        write_section(f"bench_lora:{dev}", f"LoRA layer training step ({dev})", md, dev, notes)


if __name__ == "__main__":
    main()
