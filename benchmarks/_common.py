"""Shared benchmark plumbing: timing (CUDA events or a wall clock), machine description,
and writing a result table into a marked section of benchmarks/RESULTS.md."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS_MD = Path(__file__).with_name("RESULTS.md")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a notice) where matplotlib
    is not installed: a plot is never worth losing a run's numbers."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Weight shapes [N, K] of the models the issues name: LLaMA-7B, LLaMA-70B and SmolLM2-135M.
LAYER_SHAPES = {
    "llama7b-qkvo": (4096, 4096),
    "llama7b-up": (11008, 4096),
    "llama7b-down": (4096, 11008),
    "llama70b-qkvo": (8192, 8192),
    "llama70b-up": (28672, 8192),
    "smollm2-qkvo": (576, 576),
    "smollm2-up": (1536, 576),
}


# --time-scale multiplies every min_time and warm-up below: scripts/gpu_check.sh runs the CUDA
# benchmarks at 0.2, since a GPU kernel of microseconds gives thousands of samples in 0.1 s and
# the whole check must fit in one short device lease.
TIME_SCALE = [1.0]


def add_common_args(ap) -> None:
    """The options every kernel benchmark takes besides its own."""
    ap.add_argument("--json", default=None, help="append each row here as a JSON line")
    ap.add_argument("--no-results", action="store_true", help="do not update RESULTS.md")
    ap.add_argument(
        "--time-scale", type=float, default=1.0, help="scale the time spent on each measurement"
    )


def apply_common_args(args) -> None:
    if not args.time_scale > 0:
        raise SystemExit(f"--time-scale must be > 0, got {args.time_scale}")
    TIME_SCALE[0] = args.time_scale
    if args.json:  # a fresh file per run: RowLog appends
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text("")


class RowLog(list):
    """The result rows of a run, each also appended to a JSON Lines file (and flushed) as it
    is added, so a benchmark stopped by a timeout still leaves every row it measured."""

    def __init__(self, path: str | None):
        super().__init__()
        self.path = path

    def append(self, row: dict) -> None:
        super().append(row)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def time_fn(
    fn, device: str, min_time: float = 0.5, min_runs: int = 5, warmup: float = 0.2
) -> float:
    """Median seconds per call. CUDA work is timed with events, so launch latency and the host
    clock are out of it; CPU work with perf_counter. Warm-up runs for `warmup` seconds (at least
    twice): the first large allocations of a process pay page faults that later ones, reusing
    freed memory, do not."""
    min_time, warmup = min_time * TIME_SCALE[0], warmup * TIME_SCALE[0]
    t_end = time.perf_counter() + warmup
    for i in range(1000):
        fn()
        if i >= 1 and time.perf_counter() > t_end:
            break
    times = []
    start_all = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start_all < min_time:
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if len(times) >= 1000:
            break
    return statistics.median(times)


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def copy_bandwidth_gbs(device: str, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy ceiling, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device)
    return 2 * nbytes / t / 1e9


def command_line() -> str:
    # Relative to the repository root, whatever the working directory was.
    script = os.path.relpath(os.path.abspath(sys.argv[0]), RESULTS_MD.parent.parent)
    return "python " + " ".join([script] + sys.argv[1:])


def write_section(name: str, title: str, table: str, device: str, notes: str = "") -> None:
    """Replace (or append) the section `name` of RESULTS.md with a fresh table."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    body = (
        f"<!-- {name}:start -->\n## {title}\n\n"
        f"- machine: {machine(device)}\n- date: {stamp}, commit {commit or 'n/a'}\n"
        f"- command: `{command_line()}`\n\n{table}\n{notes}\n<!-- {name}:end -->"
    )
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    pattern = re.compile(
        rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S
    )
    text = (
        pattern.sub(lambda _: body, text) if pattern.search(text) else text.rstrip() + "\n\n" + body
    )
    RESULTS_MD.write_text(text.rstrip() + "\n")


def write_json(path: str | None, rows: list[dict]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(rows, indent=2))


def markdown_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"
