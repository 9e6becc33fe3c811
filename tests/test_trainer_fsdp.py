"""transformers.Trainer trains a QLoRA model (QloraExtConfig + PEFT on our layers) under FSDP2
through accelerate, on two CPU processes (gloo, tests/trainer_fsdp_worker.py under torchrun):
the loss falls, the model really is sharded, and the adapter rank 0 saves loads into a
one-process model that computes the logits the sharded model computed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("datasets")
from tiny_hf_model import make_tiny_model_dir  # noqa: E402

import qlora_ext  # noqa: E402

WORKER = Path(__file__).with_name("trainer_fsdp_worker.py")
STEPS = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"), seed=2)


def test_trainer_with_fsdp2_on_two_cpu_ranks(model_dir, tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["--", str(WORKER), "--model-dir", model_dir, "--out", str(out), "--steps", str(STEPS)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2
    # Two decoder layers, the embeddings, the final norm + output layer, and the root: without
    # hf_fsdp.enable_fsdp2_on_cpu, accelerate would have trained this with DDP (no FSDP module).
    assert res["fsdp_modules"] == 5, res["fsdp_modules"]
    losses = res["losses"]
    assert len(losses) == STEPS
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    # Random init starts near ln(128) = 4.85; rank-8 adapters on a frozen random base learn the
    # repeated sentence's character statistics, about 0.7 nat in these steps (the one-process
    # Trainer test in test_trainers.py sees 0.9 in 40), while step-to-step noise is under 0.1.
    assert last < first - 0.4, losses

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=qlora_ext.QloraExtConfig(compute_dtype=torch.float32),
        dtype=torch.float32,
        device_map="cpu",
    )
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        logits = model(**tok([res["probe"]], return_tensors="pt")).logits[0]
    # The same weights and the same kernels, in one process instead of gathered from two
    # shards: only the summation order of the fp32 GEMMs may differ (a few ulps of logits of
    # size ~5), so 1e-5 is far below the change training made (asserted next).
    torch.testing.assert_close(logits, torch.tensor(res["logits"]), rtol=1e-5, atol=1e-5)
    with torch.no_grad(), model.disable_adapter():
        untrained = model(**tok([res["probe"]], return_tensors="pt")).logits[0]
    assert (logits - untrained).abs().max() > 0.1  # the adapter is trained, not its init


def test_enable_fsdp2_on_cpu_names_the_missing_settings(model_dir, tmp_path):
    from qlora_ext.hf_fsdp import enable_fsdp2_on_cpu

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = transformers.Trainer(model=model, args=args)
    with pytest.raises(ValueError, match=r"fsdp=True and fsdp_config=\{'version': 2"):
        enable_fsdp2_on_cpu(trainer)
