"""Fuzz every public function, op and module with hypothesis (tests/fuzz_*.py), each case
giving one of two results: the reference's (tests/reference.py, to the tolerance each area
states), or a ValueError / TypeError / RuntimeError whose message names the offending argument
by its public name (Note [Public argument names] in python/qlora_ext/functional.py).

Cases run in a subprocess per batch (tests/fuzz_runner.py), so that an abort, a segfault or a
hang fails this test instead of killing pytest: the runner logs each case before running it,
and a batch that dies is named by its last case, which is then run again alone to confirm.

``make test`` runs the CI counts below with seed 0 (about 2,000 cases); ``make fuzz`` runs ten
times as many (QLORA_FUZZ_SCALE=10) with the seed QLORA_FUZZ_SEED.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).with_name("fuzz_runner.py")
CI_CASES = {
    "quantize_4bit": 300,
    "dequantize_4bit": 300,
    "blockwise_8bit": 300,
    "from_dict": 250,
    "matmul_4bit": 250,
    "lora_4bit": 200,
    "modules": 150,
    "optim": 200,
    "load_adapter": 100,
}
SCALE = float(os.environ.get("QLORA_FUZZ_SCALE", "1"))
SEED = int(os.environ.get("QLORA_FUZZ_SEED", "0"))
BATCH = 500  # cases per subprocess: a crash loses at most one batch's other cases


def _run(args, timeout):
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(RUNNER), *args], capture_output=True, text=True, timeout=timeout,
        env=env,
    )  # fmt: skip


def _died(proc) -> str:
    if proc.returncode < 0:
        return f"killed by {signal.Signals(-proc.returncode).name}"
    return f"exit status {proc.returncode}"


def _name_the_crash(area, log: Path, how: str) -> str:
    """The case a dead batch was running, confirmed by running it (and, if it passes alone,
    the cases before it) on its own."""
    cases = log.read_text().splitlines() if log.exists() else []
    if not cases:
        return f"{area}: the runner {how} before its first case"
    for spec in reversed(cases[-20:]):
        try:
            proc = _run(["--area", area, "--case", spec], timeout=60)
        except subprocess.TimeoutExpired:
            return f"{area}: hangs alone (60 s) on case {spec}"
        if proc.returncode not in (0, 1) or not proc.stdout.strip():
            return f"{area}: {_died(proc)} on case {spec}\n{proc.stderr[-2000:]}"
    return (
        f"{area}: the batch {how} while running case {cases[-1]}, but neither it nor the 19 "
        "cases before it crash alone (state left by an earlier case?)"
    )


@pytest.mark.parametrize("area", list(CI_CASES))
def test_fuzz(area, tmp_path):
    total = max(1, int(CI_CASES[area] * SCALE))
    ran, failures = 0, []
    for b in range(-(-total // BATCH)):
        count = min(BATCH, total - b * BATCH)
        log = tmp_path / f"{area}-{b}.log"
        args = ["--area", area, "--seed", str(SEED * 1009 + b), "--count", str(count)]
        timeout = 120 + 0.5 * count  # per batch; a normal one takes a few seconds
        try:
            proc = _run([*args, "--log", str(log)], timeout)
        except subprocess.TimeoutExpired:
            last = log.read_text().splitlines()[-1:] if log.exists() else []
            pytest.fail(f"{area}: batch {b} hung ({timeout:.0f} s); last case started: {last}")
        lines = proc.stdout.strip().splitlines()
        if proc.returncode not in (0, 1) or not lines:
            pytest.fail(_name_the_crash(area, log, _died(proc)) + "\n" + proc.stderr[-3000:])
        out = json.loads(lines[-1])
        ran += out["cases"]
        failures += out["failures"]
    assert ran >= 0.8 * total, f"{area}: only {ran} of {total} cases were drawn"
    if failures:
        shown = "\n".join(
            f"- {f['error']}\n  case: {json.dumps(f['spec'])}\n  rerun: python {RUNNER} "
            f"--area {area} --case '{json.dumps(f['spec'])}'"
            for f in failures[:10]
        )
        pytest.fail(f"{area}: {len(failures)} of {ran} cases failed:\n{shown}")
