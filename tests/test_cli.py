"""qlora-ext: the fine-tuning job end to end on a tiny offline model, resume after a real
kill, and the command-line surface (help, errors)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
import torch  # noqa: E402
from tiny_hf_model import make_tiny_model_dir  # noqa: E402

import qlora_ext  # noqa: E402
from qlora_ext import cli  # noqa: E402

FAST = [
    "--train-size",
    "60",
    "--eval-size",
    "4",
    "--batch-size",
    "4",
    "--seq-len",
    "96",
    "--lr",
    "3e-3",
    "--r",
    "4",
    "--alpha",
    "8",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def run_cli(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "qlora_ext.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_finetune_writes_everything(tiny_dir, tmp_path):
    out = tmp_path / "run"
    rc = cli.main(
        [
            "finetune",
            "--model",
            tiny_dir,
            "--output-dir",
            str(out),
            "--steps",
            "8",
            "--save-every",
            "4",
            *FAST,
        ]
    )
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["steps"] == 8 and len(s["history"]["loss"]) == 8
    assert s["after"]["loss"] < s["before"]["loss"]  # even 8 steps of a tiny model learn
    assert "exact_match" in s["after"] and s["peak_memory_bytes"] > 0
    assert (out / "loss.png").stat().st_size > 1000
    assert {p.name for p in (out / "adapter").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [
        "step_000004",
        "step_000008",
    ]


RESUME_STEPS = ["--steps", "40", "--save-every", "5", "--dropout", "0.1", *FAST]


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, tmp_path_factory):
    """The loss curve of the run that the interrupted-and-resumed runs must reproduce."""
    full = tmp_path_factory.mktemp("full")
    argv = ["finetune", "--model", tiny_dir, "--output-dir", str(full), *RESUME_STEPS]
    assert cli.main(argv) == 0
    return json.loads((full / "summary.json").read_text())["history"]


def test_resume_after_kill_reproduces_the_loss_curve(tiny_dir, tmp_path, uninterrupted):
    steps = RESUME_STEPS
    killed = tmp_path / "killed"
    # A real kill: SIGKILL as soon as the first checkpoint is complete.
    p = run_cli("finetune", "--model", tiny_dir, "--output-dir", str(killed), *steps)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step_000005" / "COMPLETE").exists():
        assert p.poll() is None, p.stdout.read()
        assert time.time() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (killed / "summary.json").exists(), "the run finished before the kill"
    assert (
        cli.main(["finetune", "--model", tiny_dir, "--output-dir", str(killed), "--resume", *steps])
        == 0
    )
    b = json.loads((killed / "summary.json").read_text())["history"]
    assert b["loss"] == uninterrupted["loss"]  # bitwise: same batches, masks and updates
    assert b["step"] == uninterrupted["step"]


# The child run: a real SIGINT (Ctrl-C) delivered to itself while the step-10 checkpoint is
# half written (its tensors file is on disk, its state.json and COMPLETE marker are not).
SIGINT_CHILD = """
import os, signal, sys, time
import safetensors.torch as st
from qlora_ext import cli
save = st.save_file
def interrupted_save(tensors, path, *args, **kwargs):
    save(tensors, path, *args, **kwargs)
    if "step_000010" in path:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)  # KeyboardInterrupt is raised here, inside the checkpoint write
st.save_file = interrupted_save
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ctrl_c_during_a_checkpoint_write_then_resume(tiny_dir, tmp_path, uninterrupted):
    out = tmp_path / "interrupted"
    args = ["finetune", "--model", tiny_dir, "--output-dir", str(out), *RESUME_STEPS]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run(
        [sys.executable, "-c", SIGINT_CHILD, *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 130, p.stderr[-3000:]
    assert "interrupted; the last complete checkpoint is" in p.stderr
    assert "step_000005: add --resume" in p.stderr
    assert "Traceback" not in p.stderr
    # The half-written checkpoint left nothing behind; the previous one is intact.
    assert sorted(q.name for q in (out / "checkpoints").iterdir()) == ["step_000005"]
    assert cli.main([*args, "--resume"]) == 0
    b = json.loads((out / "summary.json").read_text())["history"]
    assert b["loss"] == uninterrupted["loss"] and b["step"] == uninterrupted["step"]


def test_bad_inputs_and_help(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    helptext = capsys.readouterr().out
    assert "--quant-type" in helptext and "example:" in helptext and "(default: nf4)" in helptext
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    assert (
        cli.main(
            [
                "finetune",
                "--model",
                tiny_dir,
                "--data",
                str(bad),
                "--output-dir",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "line 2: not valid JSON" in err
    assert (
        cli.main(
            ["finetune", "--model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "y")]
        )
        == 2
    )
    assert "no such file or directory" in capsys.readouterr().err
    assert cli.main(["finetune", "--model", tiny_dir, "--r", "0"]) == 2
    assert "--r must be positive" in capsys.readouterr().err


def test_eval_generate_merge_quantize(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        cli.main(["finetune", "--model", tiny_dir, "--output-dir", str(out), "--steps", "3", *FAST])
        == 0
    )
    adapter = str(out / "adapter")
    capsys.readouterr()
    assert cli.main(["eval", "--model", tiny_dir, "--adapter", adapter, "--eval-size", "3"]) == 0
    assert "held-out loss" in capsys.readouterr().out
    assert (
        cli.main(
            [
                "generate",
                "--model",
                tiny_dir,
                "--adapter",
                adapter,
                "--prompt",
                "Hi",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    merged = tmp_path / "merged"
    assert (
        cli.main(["merge", "--model", tiny_dir, "--adapter", adapter, "--output-dir", str(merged)])
        == 0
    )
    assert (merged / "model.safetensors").exists() and (merged / "config.json").exists()
    from safetensors.torch import load_file

    qpath = tmp_path / "q.safetensors"
    assert cli.main(["quantize", "--model", tiny_dir, "--output", str(qpath)]) == 0
    sd = load_file(str(qpath))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert sd[key].dtype.is_floating_point is False and f"{key}.quant_state.bitsandbytes__nf4" in sd
    assert "model.embed_tokens.weight" in sd and "lm_head.weight" in sd


def test_quantize_writes_a_4bit_checkpoint_every_command_loads(tiny_dir, tmp_path, capsys):
    import transformers

    from qlora_ext.nn import Linear4bit

    q = tmp_path / "tiny-nf4"
    assert cli.main(["quantize", "--model", tiny_dir, "--output", str(q)]) == 0
    cfg = json.loads((q / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "qlora_ext" and cfg["quant_type"] == "nf4"
    # It reloads in 4 bits, bit-identical to quantizing the 16-bit model's weight.
    model = transformers.AutoModelForCausalLM.from_pretrained(q, device_map="cpu")
    layer = model.model.layers[1].mlp.down_proj
    assert type(layer) is Linear4bit
    src = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    packed, _ = qlora_ext.quantize_4bit(src.model.layers[1].mlp.down_proj.weight, 64, "nf4")
    assert torch.equal(layer.weight.reshape(-1), packed.reshape(-1))
    out = tmp_path / "run"
    args = ["--output-dir", str(out), "--steps", "2", *FAST]
    assert cli.main(["finetune", "--model", str(q), *args]) == 0
    adapter = str(out / "adapter")
    assert cli.main(["eval", "--model", str(q), "--adapter", adapter, "--eval-size", "2"]) == 0
    assert "held-out loss" in capsys.readouterr().out
    gen = ["generate", "--model", str(q), "--adapter", adapter, "--prompt", "Hi"]
    assert cli.main([*gen, "--max-new-tokens", "3"]) == 0
