"""QLoRA on torch.distributed, two gloo ranks on the CPU against one process with the same
global batch (tests/distributed_worker.py, launched with torchrun; what it checks inside each
rank is in tests/distributed_checks.py): FSDP2 (qlora_ext.distributed.fully_shard_model) and
DDP (wrap_ddp) train the same adapters; FSDP2 shards the frozen 4-bit weights and their
quantization state without changing a bit of them, under fp32 and under the bf16
mixed-precision policy; DDP never sends them after its construction.

Tolerances. fp32: the runs differ only in the order of fp32 sums (each rank's half of the
batch, then the gradient average, against one batch): a few ulps per step. Losses agree to
1e-6 relative (measured ~1e-7) under AdamW and SGD. Adapter weights are compared after SGD with
momentum, whose update is proportional to the gradient, to 1e-5: AdamW's first steps move every
element by about lr whatever its gradient's size, so a gradient element at rounding level
(lora_B starts at zero) can step either way, and its weights differ by up to 2 lr per step
(measured 1.6e-3 relative) without anything being wrong.
bf16 (param_dtype=bf16, reduce_dtype=fp32), against FSDP2 at one process with the same policy:
each rank's bf16 gradient of half the batch is rounded to bf16 before the fp32 average, one
process rounds the whole batch's; a bf16 rounding is 2^-9 relative, and the SGD steps carry it
into the next losses: they agree to 2e-4 relative (measured 3.2e-5). The weights and state the
kernels read are compared to the bit at every forward, under both policies.

The three launches (1 process, FSDP2 and DDP on 2 ranks) take about 25-35 s each on 2 shared
cores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
safetensors = pytest.importorskip("safetensors.torch")
WORKER = Path(__file__).with_name("distributed_worker.py")
N_LAYERS = 14  # 4-bit layers of the tiny Llama: 7 per decoder layer, 2 layers


def launch(strategy: str, nproc: int, out: Path, hf_dir=None) -> tuple[dict, dict]:
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
    if hf_dir is not None:
        cmd += ["--hf-dir", str(hf_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), safetensors.load_file(str(out.with_suffix(".st")))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return launch("none", 1, tmp_path_factory.mktemp("dist") / "none.json")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tiny_hf_model import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def fsdp(hf_dir, tmp_path_factory):
    return launch("fsdp", 2, tmp_path_factory.mktemp("dist") / "fsdp.json", hf_dir)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return launch("ddp", 2, tmp_path_factory.mktemp("dist") / "ddp.json")


def check_state_watch(run: dict, steps: int) -> None:
    # Every 4-bit layer's forward of every step read exactly the bytes one process builds.
    assert run["state_mismatches"] == [], run["state_mismatches"][:5]
    assert run["state_checked"] == [N_LAYERS] * steps


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_ranks_train_like_one_process(strategy, single, request):
    ref, ref_t = single
    got, got_t = request.getfixturevalue(strategy)
    assert got["world"] == 2 and got["trainable"] == ref["trainable"]
    assert all("lora_" in n for n in got["trainable"])  # nothing frozen was trained
    for optim in ("adamw", "sgd"):
        r, g = ref["runs"][optim], got["runs"][optim]
        check_state_watch(r, len(r["losses"]))
        check_state_watch(g, len(g["losses"]))
        torch.testing.assert_close(
            torch.tensor(g["losses"]), torch.tensor(r["losses"]), rtol=1e-6, atol=0
        )
        assert r["losses"][-1] < r["losses"][0]  # it did train
    if strategy == "ddp":  # the bf16 run is FSDP2's
        ref_t = {k: v for k, v in ref_t.items() if not k.startswith("bf16.")}
    assert set(got_t) == set(ref_t)
    for name, t in ref_t.items():
        if name.startswith(("frozen.", "bf16.frozen.")):
            # The frozen 4-bit weights and state, gathered: the same dtypes and bits.
            assert got_t[name].dtype == t.dtype and torch.equal(got_t[name], t), name
        else:
            torch.testing.assert_close(got_t[name], t, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_frozen_bytes_per_rank(strategy, single, request):
    got = request.getfixturevalue(strategy)[0]
    per_rank, total = got["frozen_bytes_per_rank"], got["frozen_bytes_total"]
    assert single[0]["frozen_bytes_per_rank"] == [total]
    if strategy == "fsdp":
        # Each rank keeps half of every packed weight and of every state tensor (dim 0 is
        # even for each of them here, so FSDP2 pads nothing).
        assert per_rank == [total // 2, total // 2], per_rank
        # The adapters are sharded too (and trained: their gathered values match above).
        assert got["lora_numel_per_rank"] == [got["lora_numel_total"] // 2] * 2
    else:
        assert per_rank == [total, total]  # DDP replicates the model


def test_fsdp_bf16_mixed_precision(single, fsdp):
    # bf16 mixed precision, against the same compute dtype at 1 process (FSDP2 over one rank).
    r, g = single[0]["runs"]["sgd_bf16"], fsdp[0]["runs"]["sgd_bf16"]
    check_state_watch(r, len(r["losses"]))
    check_state_watch(g, len(g["losses"]))
    torch.testing.assert_close(
        torch.tensor(g["losses"]), torch.tensor(r["losses"]), rtol=2e-4, atol=0
    )
    assert r["losses"][-1] < r["losses"][0]


def test_fsdp_errors_and_single_layers(fsdp):
    got = fsdp[0]
    # Each configuration that cannot work fails with its error ("ok"), none trains wrongly.
    assert got["errors"] == dict.fromkeys(got["errors"], "ok") and len(got["errors"]) == 5
    # fully_shard on a single Linear4bit with uneven dim-0 sizes computes the same bits.
    assert got["single_layers"] == {"double_quant=True": True, "double_quant=False": True}


def test_fsdp_from_pretrained_and_peft(fsdp):
    hf = fsdp[0]["hf"]
    # transformers' loading path + PEFT: the same loss as unsharded (fp32, order of sums:
    # 1e-6 as above), half the frozen bytes per rank, gradients on every adapter, and every
    # fused layer read its exact bytes.
    assert hf["state_mismatches"] == [] and hf["state_checked"] == N_LAYERS
    torch.testing.assert_close(hf["loss"], hf["ref_loss"], rtol=1e-6, atol=0)
    assert hf["bytes_per_rank"] == [hf["bytes_total"] // 2] * 2
    assert hf["lora_grads"]


def test_ddp_sends_only_adapter_gradients(ddp):
    got = ddp[0]
    for optim in ("adamw", "sgd"):
        run = got["runs"][optim]
        # The gradient buckets held the adapters' gradients only, each once per step.
        assert run["ddp_bucket_params"] == sorted(got["trainable"])
        steps = len(run["losses"])
        assert run["ddp_bucket_numel"] == steps * got["lora_numel_total"]
        # No collective after construction touched a frozen tensor (or any uint8 one), and
        # the per-forward buffer broadcast never ran.
        assert run["ddp_frozen_sent"] == [] and run["ddp_calls"]["_broadcast_coalesced"] == 0
        assert run["ddp_calls"]["broadcast"] == 0
