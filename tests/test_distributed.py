"""QLoRA on torch.distributed, two gloo ranks on the CPU against one process with the same
global batch (tests/distributed_worker.py, launched with torchrun): FSDP2 (fully_shard per
decoder layer, then the root) and DDP train the same adapters, and FSDP2 shards the frozen
4-bit weights without changing a byte of them.

Tolerance: the runs differ only in the order of fp32 sums (each rank's half of the batch, then
the gradient average, against one batch): a few ulps per step. Losses agree to 1e-6 relative
(measured ~1e-7) under AdamW and SGD. Adapter weights are compared after SGD with momentum,
whose update is proportional to the gradient, to 1e-5: AdamW's first steps move every element
by about lr whatever its gradient's size, so a gradient element at rounding level (lora_B
starts at zero) can step either way, and its weights differ by up to 2 lr per step (measured
1.6e-3 relative) without anything being wrong."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors.torch")
WORKER = Path(__file__).with_name("distributed_worker.py")


def launch(strategy: str, nproc: int, out: Path) -> tuple[dict, dict]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(WORKER),
        "--strategy",
        strategy,
        "--out",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), safetensors.load_file(str(out.with_suffix(".safetensors")))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return launch("none", 1, tmp_path_factory.mktemp("dist") / "none.json")


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_ranks_train_like_one_process(strategy, single, tmp_path):
    ref, ref_t = single
    got, got_t = launch(strategy, 2, tmp_path / f"{strategy}.json")
    assert got["world"] == 2 and got["trainable"] == ref["trainable"]
    assert all("lora_" in n for n in got["trainable"])  # nothing frozen was trained
    for optim in ("adamw", "sgd"):
        key = f"losses_{optim}"
        torch.testing.assert_close(
            torch.tensor(got[key]), torch.tensor(ref[key]), rtol=1e-6, atol=0
        )
        assert ref[key][-1] < ref[key][0]  # it did train
    assert set(got_t) == set(ref_t)
    for name, t in ref_t.items():
        if name.startswith("packed."):
            # The frozen 4-bit weights, gathered from the shards: the same bytes.
            assert torch.equal(got_t[name], t), name
        else:
            torch.testing.assert_close(got_t[name], t, rtol=1e-5, atol=1e-7)
    per_rank, total = got["frozen_bytes_per_rank"], got["frozen_bytes_total"]
    if strategy == "fsdp":
        # Each rank keeps half of every packed weight (dim 0 is even here, so no padding).
        assert per_rank == [total // 2, total // 2], per_rank
    else:
        assert per_rank == [total, total]  # DDP replicates the model
