"""The QLoRA paper's data-type experiment, small but real: perplexity of SmolLM2-135M-Instruct
on a fixed English text after round-tripping every linear layer's weight (lm_head and
embeddings excepted) through 4-bit quantization.

    python benchmarks/exp_datatypes.py [--ctx 512] [--text /usr/share/common-licenses/GPL-3]

Configurations: fp32; NF4, NF4+DQ, FP4 and int4 at blocksize 64; NF4 at blocksizes 32, 128 and
256. Perplexity is exp(mean token cross-entropy) over non-overlapping windows of --ctx tokens.
The weights are bit-identical to bitsandbytes' (tests/test_bnb_compat.py), so NF4 and FP4 must
reproduce bitsandbytes' perplexities exactly; --bnb recomputes those two with bitsandbytes.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
from _common import markdown_table, pyplot, write_json, write_section

import qlora_ext
from qlora_ext.loading import load_model

CONFIGS = [  # name, quant_type, blocksize, double_quant
    ("fp32", None, None, False),
    ("NF4", "nf4", 64, False),
    ("NF4+DQ", "nf4", 64, True),
    ("FP4", "fp4", 64, False),
    ("int4", "int4", 64, False),
    ("NF4 bs32", "nf4", 32, False),
    ("NF4 bs128", "nf4", 128, False),
    ("NF4 bs256", "nf4", 256, False),
]


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, ctx: int) -> float:
    nll, count = 0.0, 0
    for i in range(0, ids.numel() - 1, ctx):
        chunk = ids[i : i + ctx + 1]
        if chunk.numel() < 2:
            break
        logits = model(input_ids=chunk[:-1].unsqueeze(0)).logits[0].float()
        nll += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += chunk.numel() - 1
    return math.exp(nll / count)


@torch.no_grad()
def round_trip(model, quant_type, blocksize, double_quant, use_bnb=False):
    m = copy.deepcopy(model)
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
            w = mod.weight.data
            if use_bnb:
                import bitsandbytes.functional as bnb_F

                p, s = bnb_F.quantize_4bit(
                    w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
                )
                mod.weight.data = bnb_F.dequantize_4bit(p, s).reshape(w.shape)
            else:
                p, s = qlora_ext.quantize_4bit(w, blocksize, quant_type, double_quant)
                mod.weight.data = qlora_ext.dequantize_4bit(p, s)
    return m


PNG = Path(__file__).with_name("exp_datatypes.png")


def plot(rows: list[dict], png: Path) -> None:
    """Perplexity per configuration, ours as bars and bitsandbytes' as markers on them."""
    plt = pyplot()
    if plt is None:
        return

    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    names = [r["config"] for r in rows]
    ppl = [r["perplexity"] for r in rows]
    ax.bar(range(len(rows)), ppl, color=["#888888"] + ["#3b6ea5"] * (len(rows) - 1))
    for i, r in enumerate(rows):
        ax.annotate(f"{ppl[i]:.2f}", (i, ppl[i]), ha="center", va="bottom", fontsize=7)
        if "bnb_perplexity" in r:
            ax.plot(
                i,
                r["bnb_perplexity"],
                "x",
                color="#c0392b",
                label="bitsandbytes" if i == 1 else None,
            )
    ax.set_xticks(range(len(rows)), names, fontsize=7)
    ax.set(ylabel="perplexity (lower is better)", ylim=(0, max(ppl) * 1.15))
    ax.set_title("SmolLM2-135M after 4-bit round trips of every linear layer", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print("wrote", png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--bnb", action="store_true", help="also run NF4/FP4 through bitsandbytes")
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=str(PNG), help="the plot (default: %(default)s)")
    ap.add_argument("--plot-only", default=None, help="only re-plot the rows of an earlier --json")
    ap.add_argument("--no-results", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated config names (default: all)")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.plot_only).read_text()), Path(args.png))
        return
    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = load_model(None, torch.float32, "cpu")
    model.eval()
    text = open(args.text, encoding="utf-8").read()
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    print(f"{args.text}: {ids.numel()} tokens, windows of {args.ctx}")
    rows, table = [], []
    configs = CONFIGS
    if args.only:
        keep = set(args.only.split(","))
        configs = [c for c in CONFIGS if c[0] in keep]
    for name, qt, bs, dq in configs:
        t = time.time()
        m = model if qt is None else round_trip(model, qt, bs, dq)
        ppl = perplexity(m, ids, args.ctx)
        row = {
            "config": name,
            "quant_type": qt,
            "blocksize": bs,
            "double_quant": dq,
            "perplexity": ppl,
        }
        if args.bnb and name in ("NF4", "FP4", "NF4+DQ"):
            row["bnb_perplexity"] = perplexity(round_trip(model, qt, bs, dq, True), ids, args.ctx)
        rows.append(row)
        table.append(
            [name, f"{ppl:.2f}", f"{row['bnb_perplexity']:.2f}" if "bnb_perplexity" in row else "-"]
        )
        print(f"{name:>10}: perplexity {ppl:.3f}  ({time.time() - t:.0f} s)", flush=True)
    by = {r["config"]: r["perplexity"] for r in rows}
    verdict = ""
    if all(k in by for k in ("NF4", "FP4", "int4")):
        holds = by["NF4"] <= by["FP4"] <= by["int4"]
        verdict = (
            f"NF4 <= FP4 <= int4: {'holds' if holds else 'does NOT hold'} "
            f"({by['NF4']:.2f} / {by['FP4']:.2f} / {by['int4']:.2f})."
        )
        print(verdict)
    md = markdown_table(["configuration", "perplexity (ours)", "perplexity (bitsandbytes)"], table)
    print(md)
    write_json(args.json, rows)
    plot(rows, Path(args.png))
    if not args.no_results:
        write_section(
            "exp_datatypes",
            "Data types: perplexity after 4-bit round trips",
            md,
            "cpu",
            f"SmolLM2-135M-Instruct, {ids.numel()} tokens of {args.text}, "
            f"windows of {args.ctx} tokens. {verdict} Plot: `{Path(args.png).name}`.",
        )


if __name__ == "__main__":
    main()
