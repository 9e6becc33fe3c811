"""The QLoRA paper's second claim at small scale: does NF4 QLoRA match 16-bit LoRA?

The same fine-tune (qlora-ext finetune defaults: SmolLM2-135M-Instruct, built-in tasks, same
steps, seed and data) with --quant-type none (16-bit LoRA through PEFT), nf4 with double
quantization, and fp4. Reports held-out loss and exact-match accuracy for each.

    python benchmarks/exp_qlora_vs_lora.py [--steps N]
"""

from __future__ import annotations

import argparse
import tempfile

from _common import markdown_table, write_json, write_section

from qlora_ext.train import TrainConfig, finetune

RUNS = [
    ("16-bit LoRA", "none", False),
    ("NF4 + DQ QLoRA", "nf4", True),
    ("FP4 QLoRA", "fp4", False),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=TrainConfig().steps)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-results", action="store_true")
    args = ap.parse_args()
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
        rows.append({"run": name, "before": b, "after": a, "train_seconds": s["train_seconds"]})
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
