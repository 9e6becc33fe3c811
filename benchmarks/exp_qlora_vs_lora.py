"""The QLoRA paper's second claim at small scale: does NF4 QLoRA match 16-bit LoRA?

The same fine-tune (qlora-ext finetune defaults: SmolLM2-135M-Instruct, built-in tasks, same
steps, seed and data) with --quant-type none (16-bit LoRA through PEFT), nf4 with double
quantization, and fp4. Reports held-out loss and exact-match accuracy for each.

    python benchmarks/exp_qlora_vs_lora.py [--steps N]
    python benchmarks/exp_qlora_vs_lora.py --plot-only benchmarks/out/exp_qlora_vs_lora.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import markdown_table, pyplot, write_json, write_section

from qlora_ext.train import TrainConfig, finetune

RUNS = [
    ("16-bit LoRA", "none", False),
    ("NF4 + DQ QLoRA", "nf4", True),
    ("FP4 QLoRA", "fp4", False),
]


PNG = Path(__file__).with_name("exp_qlora_vs_lora.png")


def plot(rows: list[dict], png: Path) -> None:
    """Held-out loss and exact match before/after per run, and the training loss curves when
    the rows carry them (runs from before they were recorded do not)."""
    plt = pyplot()
    if plt is None:
        return

    curves = [r for r in rows if r.get("history")]
    fig, axes = plt.subplots(1, 3 if curves else 2, figsize=(13 if curves else 9, 3.6))
    names = [r["run"] for r in rows]
    x = range(len(rows))
    for ax, key, label, scale in (
        (axes[0], "loss", "held-out loss", 1),
        (axes[1], "exact_match", "held-out exact match %", 100),
    ):
        before = [scale * r["before"][key] for r in rows]
        after = [scale * r["after"][key] for r in rows]
        ax.bar([i - 0.2 for i in x], before, 0.4, label="before", color="#bbbbbb")
        ax.bar([i + 0.2 for i in x], after, 0.4, label="after", color="#3b6ea5")
        for i, v in enumerate(after):
            ax.annotate(f"{v:.3g}", (i + 0.2, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(x), names, fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    if curves:
        for r in curves:
            h = r["history"]
            axes[2].plot(h["step"], h["loss"], lw=0.8, label=r["run"])
        axes[2].set(xlabel="step", ylabel="training loss", title="training loss")
        axes[2].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M: QLoRA against 16-bit LoRA, same fine-tune", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print("wrote", png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=TrainConfig().steps)
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=str(PNG), help="the plot (default: %(default)s)")
    ap.add_argument("--plot-only", default=None, help="only re-plot the rows of an earlier --json")
    ap.add_argument("--no-results", action="store_true")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.plot_only).read_text()), Path(args.png))
        return
    rows, table = [], []
    for name, qt, dq in RUNS:
        with tempfile.TemporaryDirectory() as out:
            s = finetune(
                TrainConfig(
                    quant_type=qt,
                    double_quant=dq,
                    steps=args.steps,
                    output_dir=out,
                    save_every=10**9,
                )
            )
        b, a = s["before"], s["after"]
        rows.append(
            {
                "run": name,
                "before": b,
                "after": a,
                "train_seconds": s["train_seconds"],
                "history": s["history"],
            }
        )
        table.append(
            [
                name,
                f"{b['loss']:.3f} -> {a['loss']:.3f}",
                f"{100 * b['exact_match']:.1f}% -> {100 * a['exact_match']:.1f}%",
                f"{s['train_seconds']:.0f}",
            ]
        )
    md = markdown_table(["run", "held-out loss", "exact match", "train s"], table)
    base = rows[0]["after"]
    notes = []
    for r in rows[1:]:
        d_loss = r["after"]["loss"] - base["loss"]
        d_em = 100 * (r["after"]["exact_match"] - base["exact_match"])
        notes.append(
            f"{r['run']}: held-out loss {d_loss:+.3f}, exact match {d_em:+.1f} points "
            "against 16-bit LoRA."
        )
    print(md + "\n" + "\n".join(notes))
    write_json(args.json, rows)
    plot(rows, Path(args.png))
    notes.append(f"Plot: `{Path(args.png).name}`.")
    if not args.no_results:
        write_section(
            "exp_qlora_vs_lora",
            "QLoRA against 16-bit LoRA (same fine-tune)",
            md,
            "cpu",
            f"{args.steps} steps each, defaults otherwise. " + " ".join(notes),
        )


if __name__ == "__main__":
    main()
