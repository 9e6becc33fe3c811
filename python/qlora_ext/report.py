"""What ``qlora-ext finetune`` reports at the end of a run: the versions in summary.json, the
loss plot (loss.png) and the before/after table."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def versions() -> dict:
    import qlora_ext

    v = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "qlora_ext": qlora_ext.__version__,
    }
    for mod in ("transformers", "peft"):
        try:
            v[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return v


def plot(history: dict, path: Path, log) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no loss.png")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["step"], history["loss"], lw=1, label="train loss")
    ax.plot(history["eval_step"], history["eval_loss"], "o-", label="held-out loss")
    ax.set(xlabel="step", ylabel="cross-entropy (response tokens)", title="qlora-ext finetune")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(s: dict, log) -> None:
    b, a = s["before"] or {}, s["after"]
    rows = [("held-out loss", b.get("loss"), a["loss"])]
    if "exact_match" in a:
        rows.append(
            ("exact match %", 100 * b["exact_match"] if b else None, 100 * a["exact_match"])
        )
    log("\n                    before      after")
    for name, x, y in rows:
        xs = f"{x:10.3f}" if x is not None else "         -"
        log(f"  {name:<16}{xs} {y:10.3f}")
    log(
        f"  steps {s['config']['steps']}, train {s['train_seconds']:.0f} s, "
        f"{s['tokens_per_second']:.0f} tokens/s, peak memory {fmt_bytes(s['peak_memory_bytes'])}, "
        f"wall {s['wall_seconds']:.0f} s"
    )
    log(f"  wrote {s['config']['output_dir']}/adapter, summary.json, loss.png, checkpoints/")
