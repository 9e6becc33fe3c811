#!/usr/bin/env python3
"""The GPU check's driver (run it through scripts/gpu_check.sh): every step in its own process
under its own `timeout`, within one device lease.

    python scripts/gpu_check.py OUTDIR             # on the GPU machine
    python scripts/gpu_check.py --dry-run OUTDIR   # anywhere: the plumbing, CUDA steps skipped

Note [GPU check budget]: a lease runs one command of at most 600 s and returns at most 8 files.
So the caps of all steps, plus the grace `timeout` gives each to exit after SIGTERM, plus the
report, add up to at most BUDGET_S = 540 s (checked before anything runs), and OUTDIR ends up
with four files: summary.txt, results.json, pytest.xml, logs.tar.gz. Both reports are rewritten
after every step, so even a check killed from outside leaves what it measured. Steps run in the
order of the value of their evidence: build, CUDA tests, sanitizers, kernel benchmarks, the
spike test, the quantize-on-load memory check. Each CUDA test file runs in its own pytest
process, so a kernel that breaks the CUDA context fails only its own file. Only a failed build
(or an import without CUDA kernels) stops the later steps.

In a dry run the CUDA steps are replaced by probes that need no GPU: test files are collected
(--collect-only), the sanitizer workload lists its groups, and every script the check runs is
asked for --help, which must show each option the check passes to it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 540
KILL_AFTER_S = 2  # `timeout --kill-after`: the grace between SIGTERM and SIGKILL
REPORT_S = 5  # writing the reports and the log archive
PY = sys.executable
# The CUDA tests: every file that parametrizes over DEVICES or has CUDA-only tests, with its cap.
TEST_FILES = {
    "test_quant": 15,
    "test_matmul": 25,
    "test_lora_ops": 25,
    "test_linear4bit": 15,
    "test_optim": 20,
    "test_op_contract": 20,
}
SANITIZERS = {"memcheck": 30, "racecheck": 25, "initcheck": 25}
# The CUDA benchmarks at a fifth of their CPU measuring time (_common.TIME_SCALE).
BENCHES = {"bench_quant": 13, "bench_matmul": 32, "bench_lora": 22, "bench_optim": 12}


@dataclass
class Step:
    name: str
    cap: int  # seconds
    argv: list[str]
    cuda: bool = True  # needs the GPU: replaced by `dry` in a dry run
    dry: list[str] | None = None  # the dry run's probe; None: the --help check of argv
    env: dict[str, str] = field(default_factory=dict)
    critical: bool = False  # a failure stops every later step
    result: dict = field(default_factory=dict)


def compute_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    for cand in ("/usr/local/cuda/bin/compute-sanitizer", "/usr/local/cuda/compute-sanitizer"):
        if found is None and os.access(cand, os.X_OK):
            found = cand
    return found


def steps(logs: Path) -> list[Step]:
    import_check = (
        "import torch, qlora_ext; info = qlora_ext.build_info(); "
        "print('qlora_ext', info, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    )
    out = [
        Step(
            "gpu",
            5,
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,memory.free,clocks.max.sm",
                "--format=csv",
            ],
        ),
        Step(
            "build",
            120,
            [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-v", "."],
            critical=True,
            env={"TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")},
        ),
        Step(
            "import",
            10,
            [PY, "-c", import_check + "; assert info['cuda'], 'no CUDA kernels'"],
            critical=True,
            dry=[PY, "-c", import_check],
        ),
        Step("static-checks", 10, [PY, "scripts/check_cuda_build.py"]),
    ]
    for name, cap in TEST_FILES.items():
        argv = [
            PY,
            "-m",
            "pytest",
            f"tests/{name}.py",
            "-k",
            "cuda",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            f"--junitxml={logs}/pytest_{name}.xml",
        ]
        out.append(
            Step(
                f"tests:{name}",
                cap,
                argv,
                dry=argv + ["--collect-only"],
                env={"CUDA_LAUNCH_BLOCKING": "1"},
            )
        )
    sanitizer = compute_sanitizer() or "compute-sanitizer"
    for tool, cap in SANITIZERS.items():
        # Only this project's kernels (their mangled names all hold the namespace qlora_ext);
        # without torch's cache every tensor is its own allocation (Note in sanitize_subset.py).
        argv = [
            sanitizer,
            "--tool",
            tool,
            "--kernel-name",
            "kns=qlora_ext",
            "--error-exitcode",
            "9",
            PY,
            "scripts/sanitize_subset.py",
        ]
        out.append(
            Step(
                f"sanitizer:{tool}",
                cap,
                argv,
                dry=[PY, "scripts/sanitize_subset.py", "--list"],
                env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
            )
        )
    for name, cap in BENCHES.items():
        argv = [
            PY,
            f"benchmarks/{name}.py",
            "--device",
            "cuda",
            "--no-results",
            "--time-scale",
            "0.2",
            "--json",
            f"{logs}/{name}.jsonl",
        ]
        out.append(Step(f"bench:{name}", cap, argv))
    out.append(
        Step("spike", 16, [PY, "benchmarks/spike_optim.py", "--json", f"{logs}/spike_optim.json"])
    )
    # Quantize-on-load with device_map="cuda": the peak of max_memory_allocated must stay
    # within the 4-bit model plus one 16-bit tensor (a 0.3B checkpoint made on the spot).
    load_argv = [PY, "benchmarks/bench_load.py", "--device", "cuda", "--no-results"]
    out.append(Step("hf-load", 30, load_argv + ["--json", f"{logs}/bench_load_cuda.json"]))
    # qlora-ext plan against max_memory_allocated of real training steps (two configurations
    # of a 100M-parameter Llama, bf16, with and without checkpointing and the paged optimizer).
    plan_argv = [PY, "benchmarks/bench_plan.py", "--device", "cuda", "--no-results"]
    out.append(Step("plan", 25, plan_argv + ["--json", f"{logs}/bench_plan_cuda.jsonl"]))
    return out


def budget(all_steps: list[Step]) -> int:
    return sum(s.cap + KILL_AFTER_S for s in all_steps) + REPORT_S


def help_check(argv: list[str], env: dict) -> tuple[int, str]:
    """Runs `argv[:2] --help` and checks that it lists every option argv passes."""
    proc = subprocess.run(
        argv[:2] + ["--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    text = proc.stdout + proc.stderr
    missing = [a for a in argv[2:] if a.startswith("--") and a.split("=")[0] not in text]
    if proc.returncode == 0 and missing:
        return 1, text + f"\ngpu_check: --help does not list {missing}\n"
    return proc.returncode, text


def figures(step: Step, log: str, logs: Path) -> dict:
    """The key figures of a finished step, for the summary and results.json."""
    fig: dict = {}
    if step.name.startswith("tests:"):
        xml = logs / f"pytest_{step.name.split(':')[1]}.xml"
        if xml.is_file():
            suite = ET.parse(xml).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            for key in ("tests", "failures", "errors", "skipped"):
                fig[key] = int(suite.get(key, 0))
        m = re.findall(r"^=*\s*(.*\bin [\d.]+s.*?)=*$", log, re.M)
        if m:
            fig["pytest"] = m[-1].strip()
    elif step.name.startswith("sanitizer:"):
        m = re.search(r"ERROR SUMMARY: (\d+) error", log)
        if m:
            fig["errors"] = int(m.group(1))
        fig["groups_done"] = len(re.findall(r"^sanitize_subset: ok ", log, re.M))
    elif step.name.startswith("bench:"):
        path = logs / f"{step.name.split(':')[1]}.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
        fig["rows"] = len(rows)
        step.result["rows"] = rows
    elif step.name == "hf-load":
        path = logs / "bench_load_cuda.json"
        rows = json.loads(path.read_text()) if path.is_file() else []
        for key in ("cuda_peak_bytes", "cuda_budget_bytes", "cuda_ok", "wall_s"):
            if rows and key in rows[0]:
                fig[key] = rows[0][key]
        step.result["rows"] = rows
    elif step.name == "plan":
        path = logs / "bench_plan_cuda.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
        fig["predicted/measured"] = {r["config"]: round(r["ratio"], 3) for r in rows}
        step.result["rows"] = rows
    elif step.name == "spike":
        path = logs / "spike_optim.json"
        if path.is_file():
            step.result["spike"] = json.loads(path.read_text())
        fig["verdict"] = (re.findall(r"spike_optim: (\w+)", log) or ["-"])[-1]
    elif step.name in ("gpu", "import", "static-checks"):
        fig["output"] = log.strip().splitlines()[-3:]
    return fig


def table_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("|")]


def run_capped(argv: list[str], cap: float, log_path: Path, env: dict) -> int:
    """argv under `timeout` (SIGTERM at the cap, SIGKILL KILL_AFTER_S later), appending its
    output to log_path."""
    cmd = ["timeout", f"--kill-after={KILL_AFTER_S}", str(max(1, int(cap)))] + argv
    with open(log_path, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        return subprocess.run(
            cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        ).returncode


def run_step(step: Step, dry: bool, logs: Path, deadline: float) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **step.env)
    log_path = logs / f"{step.name.replace(':', '_')}.log"
    t0 = time.monotonic()
    rc, text, status = 0, "", "ok"
    # Never past the budget, even if earlier steps took their grace seconds too.
    cap = max(1, min(step.cap, int(deadline - t0 - REPORT_S)))
    if dry and step.cuda and step.name in ("gpu", "build"):
        status, text = "skipped (dry run)", f"{step.name}: not run in a dry run\n"
    elif dry and step.cuda and step.dry is None:
        rc, text = help_check(step.argv, env)
        status = "dry: --help ok" if rc == 0 else "FAIL"
    elif not dry and step.argv[0] == "compute-sanitizer":
        status, text = "skipped (compute-sanitizer not found)", ""
    else:
        argv = step.dry if dry and step.cuda else step.argv
        rc = run_capped(argv, cap, log_path, env)
        text = log_path.read_text(errors="replace")
        rejected = "kernel-name" in text or "Unrecognized option" in text
        if step.name.startswith("sanitizer:") and rc not in (0, 9, 124, 137) and rejected:
            # A compute-sanitizer that rejects the kernel filter: check every kernel instead,
            # in what is left of the step's cap.
            argv = [a for a in argv if a not in ("--kernel-name", "kns=qlora_ext")]
            rc = run_capped(argv, cap - (time.monotonic() - t0), log_path, env)
            text = log_path.read_text(errors="replace")
        if rc in (124, 137):
            status = f"TIMEOUT (cap {cap} s)"
        elif rc != 0:
            status = f"FAIL (exit {rc})"
        elif dry and step.cuda:
            status = "dry: probe ok"
        if dry and rc == 5 and step.name.startswith("tests:"):
            # pytest's "no tests collected": without a GPU, a file whose CUDA cases are all
            # parametrized over DEVICES collects none of them.
            rc, status = 0, "dry: probe ok"
    if text and not log_path.exists():
        log_path.write_text(text)
    step.result.update(
        status=status, rc=rc, cap_s=step.cap, seconds=round(time.monotonic() - t0, 1)
    )
    step.result["figures"] = figures(step, text, logs)
    step.result["tables"] = table_lines(text)
    if status.startswith("FAIL") and step.critical:
        step.result["tail"] = text.splitlines()[-40:]


def merge_junit(logs: Path, dest: Path) -> None:
    root = ET.Element("testsuites")
    for xml in sorted(logs.glob("pytest_*.xml")):
        try:
            tree = ET.parse(xml).getroot()
        except ET.ParseError:
            continue
        root.extend(tree if tree.tag == "testsuites" else [tree])
    ET.ElementTree(root).write(dest, encoding="utf-8", xml_declaration=True)


def write_reports(out: Path, all_steps: list[Step], meta: dict) -> None:
    lines = [
        f"qlora_ext GPU check{' (DRY RUN: CUDA steps skipped)' if meta['dry_run'] else ''}",
        f"started {meta['started']}; step caps {meta['cap_sum_s']} s of the {BUDGET_S} s "
        f"budget (Note [GPU check budget])",
        "",
    ]
    for s in all_steps:
        r = s.result
        if not r:
            lines.append(f"{s.name:<26} not run")
            continue
        figs = {k: v for k, v in r["figures"].items() if k != "output"}
        lines.append(
            f"{s.name:<26} {r['status']:<30} {r['seconds']:>6.1f} s / cap {s.cap:>3} s"
            + (f"  {json.dumps(figs)}" if figs else "")
        )
        lines += [
            "    " + x for x in r["figures"].get("output", []) + r["tables"] + r.get("tail", [])
        ]
    lines += ["", f"total {meta.get('total_s', '-')} s; overall: {meta.get('overall', 'running')}"]
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    results = dict(meta, steps={s.name: s.result for s in all_steps})
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: check the plumbing")
    args = ap.parse_args()
    out = Path(args.outdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="gpu_check_logs_"))
    start = time.monotonic()
    all_steps = steps(logs)
    meta = dict(
        started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        dry_run=args.dry_run,
        budget_s=BUDGET_S,
        cap_sum_s=budget(all_steps),
    )
    print(
        f"gpu_check: {len(all_steps)} steps, caps + grace + report = {meta['cap_sum_s']} s "
        f"(budget {BUDGET_S} s)",
        flush=True,
    )
    if meta["cap_sum_s"] > BUDGET_S:
        print(f"gpu_check: the step caps exceed the {BUDGET_S} s budget", file=sys.stderr)
        return 2
    stopped = None
    for s in all_steps:
        if stopped:
            s.result = dict(
                status=f"not run ({stopped} failed)",
                rc=None,
                cap_s=s.cap,
                seconds=0.0,
                figures={},
                tables=[],
            )
        else:
            run_step(s, args.dry_run, logs, start + BUDGET_S)
            if s.critical and s.result["status"].startswith(("FAIL", "TIMEOUT")):
                stopped = s.name
        print(f"gpu_check: {s.name}: {s.result['status']} ({s.result['seconds']} s)", flush=True)
        write_reports(out, all_steps, meta)
    failed = [s.name for s in all_steps if s.result["status"].startswith(("FAIL", "TIMEOUT"))]
    meta.update(
        total_s=round(time.monotonic() - start, 1),
        overall="FAILED: " + ", ".join(failed) if failed or stopped else "all steps ok",
    )
    merge_junit(logs, out / "pytest.xml")
    write_reports(out, all_steps, meta)
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        tar.add(logs, arcname="logs")
    shutil.rmtree(logs, ignore_errors=True)
    print((out / "summary.txt").read_text())
    return 1 if failed or stopped else 0


if __name__ == "__main__":
    sys.exit(main())
