"""The GPU check's plumbing, without a GPU: scripts/gpu_check.sh --dry-run goes through every
step (CUDA ones replaced by probes), keeps the step caps inside the lease's budget and leaves
the same at most 8 files that a real run returns (Note [GPU check budget])."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", str(out)],
        capture_output=True,
        text=True,
        timeout=400,
        env=dict(os.environ, PYTHON=sys.executable),
    )
    return proc, out


def test_dry_run_goes_through_every_step(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["logs.tar.gz", "pytest.xml", "results.json", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    results = json.loads((out / "results.json").read_text())
    names = [s.name for s in gpu_check.steps(out)]
    assert list(results["steps"]) == names
    for name in names:
        assert f"\n{name} " in summary, f"step {name} missing from summary.txt"
        assert results["steps"][name]["status"].startswith(("dry", "skipped"))
    assert "overall: all steps ok" in summary
    # Every CUDA test file and sanitizer tool, and each benchmark's options, were probed.
    assert {n for n in names if n.startswith("tests:")} == {
        f"tests:{f}" for f in gpu_check.TEST_FILES
    }
    assert f"step caps {results['cap_sum_s']} s of the 540 s budget" in summary


def test_step_caps_fit_the_lease():
    # One device command may run 600 s; the check must end by itself within 540 s.
    all_steps = gpu_check.steps(Path("/tmp"))
    total = gpu_check.budget(all_steps)
    assert total == sum(s.cap + gpu_check.KILL_AFTER_S for s in all_steps) + gpu_check.REPORT_S
    assert total <= gpu_check.BUDGET_S == 540
    print(f"gpu_check step caps + grace + report: {total} s")


def test_over_budget_caps_are_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.BENCHES, "bench_matmul", 200)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--dry-run", str(tmp_path)])
    assert gpu_check.main() == 2  # refused before any step runs
    assert not any(tmp_path.iterdir())


def test_help_check_names_missing_options():
    rc, text = gpu_check.help_check(
        [sys.executable, str(ROOT / "scripts" / "check_cuda_build.py"), "--no-such-flag"],
        dict(os.environ),
    )
    assert rc == 1 and "--no-such-flag" in text
