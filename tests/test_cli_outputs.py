"""What `qlora-ext` shows and writes: help with defaults and examples, the progress bar and the
summary, user data (format, samples), errors for missing paths and unusable settings, resume
keeping the pre-training eval, and adapters that eval/generate/merge rebuild on the base they
were trained on (fp4, no double quant, 16-bit) rather than on the default NF4 one."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
from tiny_hf_model import make_tiny_model_dir  # noqa: E402
from tiny_llama import tiny_llama  # noqa: E402

from qlora_ext import cli, data, train  # noqa: E402

FAST = ["--eval-size", "3", "--batch-size", "4", "--seq-len", "128", "--lr", "3e-3"]
FAST += ["--r", "4", "--alpha", "8"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def finetune(tiny_dir, out, *args):
    return cli.main(["finetune", "--model", tiny_dir, "--output-dir", str(out), *FAST, *args])


def test_help_of_every_command_shows_every_default_and_an_example():
    parser = cli._parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "example:" in parser.format_help()
    assert set(subs.choices) == {"finetune", "eval", "generate", "merge", "quantize", "plan"}
    for name, sub in subs.choices.items():
        text = " ".join(sub.format_help().split())
        assert "example: qlora-ext " + name in text, name
        assert "(default: None)" not in text
        for action in sub._actions:
            if action.default in (None, argparse.SUPPRESS) or not action.option_strings:
                continue
            assert f"(default: {action.default})" in text, (name, action.option_strings)


def test_progress_bar_summary_table_and_summary_json(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune(tiny_dir, out, "--steps", "2", "--train-size", "20") == 0
    text = capsys.readouterr().out
    for field in ("loss=", "tok_s=", "lr=", "peak="):  # the progress bar
        assert field in text
    assert text.count("    Q: ") == 6  # three sample generations, before and after
    assert "[before] held-out loss" in text and "[after] held-out loss" in text
    table = text[text.index("before      after") :]
    assert "held-out loss" in table and "exact match %" in table and "peak memory" in table
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["steps"] == 2 and s["config"]["quant_type"] == "nf4"
    assert {"loss", "exact_match"} <= set(s["before"]) and {"loss", "exact_match"} <= set(
        s["after"]
    )
    assert s["peak_memory_bytes"] > 0 and s["wall_seconds"] > 0 and s["tokens_per_second"] > 0
    assert {"python", "torch", "transformers", "peft", "qlora_ext"} <= set(s["versions"])


@pytest.mark.parametrize("fmt", ["alpaca", "chat", "text"])
def test_user_data_format_is_reported_with_three_samples_before_and_after(
    tiny_dir, tmp_path, capsys, fmt
):
    rec = {
        "alpaca": lambda i: {"instruction": f"Add {i} and 1.", "output": str(i + 1)},
        "chat": lambda i: {
            "messages": [
                {"role": "user", "content": f"Double {i}"},
                {"role": "assistant", "content": str(2 * i)},
            ]
        },
        "text": lambda i: {"text": f"The number {i} comes before {i + 1}."},
    }[fmt]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(rec(i)) + "\n" for i in range(40)))
    out = tmp_path / "run"
    assert finetune(tiny_dir, out, "--data", str(path), "--steps", "2") == 0
    text = capsys.readouterr().out
    assert f"{fmt} format, 38 train / 2 eval" in text
    s = json.loads((out / "summary.json").read_text())
    assert "exact_match" not in s["after"]  # user data: held-out loss only
    for when in ("before", "after"):
        assert len(s[when]["samples"]) == 3
        assert all(x["prompt"] and x["expected"] for x in s[when]["samples"])
    assert text.count("    Q: ") == 6


def test_malformed_data_stops_before_training(tiny_dir, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path.write_text(json.dumps(good) + "\n[1]\n" + json.dumps({"messages": []}) + "\n")
    out = tmp_path / "run"
    assert finetune(tiny_dir, out, "--data", str(path)) == 2
    err = capsys.readouterr().err
    assert "2 malformed line(s) (chat format)" in err
    assert "line 2: expected a JSON object" in err and "line 3: 'messages'" in err
    assert not (out / "checkpoints").exists() and not (out / "summary.json").exists()


def test_missing_paths_and_bad_settings_are_clear_errors(tiny_dir, tmp_path, capsys):
    nope = str(tmp_path / "nope")
    for cmd in (
        ["eval", "--adapter", nope],
        ["generate", "--adapter", nope, "--prompt", "hi"],
        ["merge", "--adapter", nope, "--output-dir", str(tmp_path / "m")],
    ):
        assert cli.main([cmd[0], "--model", tiny_dir, *cmd[1:]]) == 2
        assert f"--adapter: {nope} is not an adapter directory" in capsys.readouterr().err
    assert cli.main(["generate", "--model", nope, "--prompt", "hi"]) == 2
    assert "--model: no such file or directory" in capsys.readouterr().err
    for args, msg in (
        (["--save-every", "0"], "--save-every must be positive"),
        (["--epochs", "0"], "--epochs must be positive"),
        # Every built-in prompt is longer than 32 characters: no token left to learn.
        (["--seq-len", "32"], "--seq-len 32 leaves no train example a response token"),
    ):
        assert finetune(tiny_dir, tmp_path / "x", *args) == 2
        assert msg in capsys.readouterr().err


def test_examples_cut_to_their_prompt_are_left_out_not_trained_as_nan(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune(tiny_dir, out, "--seq-len", "72", "--train-size", "60", "--steps", "3") == 0
    assert "warning: --seq-len 72 cuts" in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert all(torch.isfinite(torch.tensor(s["history"]["loss"])))
    assert s["after"]["loss"] > 0 and s["before"]["loss"] > 0


def test_resume_keeps_the_pre_training_eval(tiny_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--steps", "4", "--save-every", "2", "--train-size", "20"]
    assert finetune(tiny_dir, out, *args) == 0
    first = json.loads((out / "summary.json").read_text())
    # What a kill after step 2 leaves behind.
    (out / "summary.json").unlink()
    for p in (out / "checkpoints" / "step_000004").iterdir():
        p.unlink()
    (out / "checkpoints" / "step_000004").rmdir()
    assert finetune(tiny_dir, out, *args, "--resume") == 0
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["before"] == first["before"]
    assert resumed["history"]["loss"] == first["history"]["loss"]


@pytest.mark.parametrize(
    "quant", [["--quant-type", "fp4"], ["--no-double-quant"], ["--quant-type", "none"]]
)
def test_eval_and_merge_rebuild_the_base_the_adapter_was_trained_on(
    tiny_dir, tmp_path, capsys, quant
):
    out = tmp_path / "run"
    assert finetune(tiny_dir, out, "--steps", "4", "--train-size", "40", *quant) == 0
    after = json.loads((out / "summary.json").read_text())["after"]["loss"]
    adapter = str(out / "adapter")
    capsys.readouterr()
    assert cli.main(["eval", "--model", tiny_dir, "--adapter", adapter, "--eval-size", "3"]) == 0
    assert f"held-out loss {after:.4f}" in capsys.readouterr().out
    merged = tmp_path / "merged"
    argv = ["merge", "--model", tiny_dir, "--adapter", adapter, "--output-dir", str(merged)]
    assert cli.main([*argv, "--dtype", "float32"]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged, local_files_only=True)
    assert not any("lora" in n for n, _ in model.named_parameters())
    tok = AutoTokenizer.from_pretrained(merged, local_files_only=True)
    _, ev = data.builtin_tasks(0, 3, 0)
    items = [data.tokenize(tok, e, 128) for e in ev]
    loss = train.eval_loss(model, items, 25, tok.pad_token_id, "cpu")
    assert loss == pytest.approx(after, rel=1e-4)


def test_generate_with_and_without_adapter_and_interactive_chat(
    tiny_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    assert finetune(tiny_dir, out, "--steps", "2", "--train-size", "20") == 0
    capsys.readouterr()
    gen = ["generate", "--model", tiny_dir, "--max-new-tokens", "3"]
    assert cli.main([*gen, "--prompt", "Hi"]) == 0
    plain = capsys.readouterr().out
    assert cli.main([*gen, "--prompt", "Hi", "--adapter", str(out / "adapter")]) == 0
    assert capsys.readouterr().out.strip()
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nAnd then?\n\n"))
    assert cli.main(gen) == 0
    chat = capsys.readouterr().out
    assert chat.count("model> ") == 2
    assert chat.split("model> ")[1].split("\n")[0] == plain.strip()  # same greedy answer
    assert cli.main(["eval", "--model", tiny_dir, "--eval-size", "2"]) == 0  # no adapter
    assert "exact match" in capsys.readouterr().out


def test_quantize_writes_weights_bitsandbytes_dequantizes(tiny_dir, tmp_path):
    bnb_F = pytest.importorskip("bitsandbytes.functional")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = tmp_path / "q.safetensors"
    assert cli.main(["quantize", "--model", tiny_dir, "--output", str(path)]) == 0
    sd = load_file(str(path))
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True).state_dict()
    name = "model.layers.1.mlp.down_proj.weight"
    stats = {k[len(name) + 1 :]: v for k, v in sd.items() if k.startswith(name + ".")}
    state = bnb_F.QuantState.from_dict(stats, torch.device("cpu"))
    assert state.quant_type == "nf4" and state.nested  # the defaults: NF4 with double quant
    w = bnb_F.dequantize_4bit(sd[name], state)
    assert w.shape == ref[name].shape
    assert (w - ref[name]).norm() / ref[name].norm() < 0.15  # 4-bit error, not garbage


def test_the_hub_is_switched_off(tiny_dir):
    code = (
        "import os, sys; os.environ.pop('HF_HUB_OFFLINE', None)\n"
        "from qlora_ext import cli\n"
        f"cli.main(['generate', '--model', {tiny_dir!r}, '--prompt', 'a',"
        " '--max-new-tokens', '1'])\n"
        "import huggingface_hub.constants as c; print('offline', c.HF_HUB_OFFLINE)"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "offline True" in r.stdout


def test_16bit_baseline_runs_in_the_compute_dtype():
    """--quant-type none on a GPU trains a bf16 base (the "16-bit" LoRA baseline), with PEFT's
    fp32 adapters; on the CPU the compute dtype is fp32 and nothing changes."""
    cfg = train.TrainConfig(quant_type="none", r=4, target_modules="q_proj,v_proj")
    model = train._prepare(tiny_llama(), cfg, torch.bfloat16)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.base_layer.weight.dtype == torch.bfloat16
    assert q.lora_A["default"].weight.dtype == torch.float32
    ids = torch.randint(0, 100, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert q.lora_B["default"].weight.grad is not None


def test_corrupt_run_files_give_errors_that_name_the_file(tiny_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    assert finetune(tiny_dir, out, "--steps", "2", "--train-size", "8") == 0
    adapter = out / "adapter"
    st, cfg, quant = (
        adapter / "adapter_model.safetensors",
        adapter / "adapter_config.json",
        adapter / train.QUANT_CONFIG_NAME,
    )
    good = {p: p.read_bytes() for p in (st, cfg, quant)}
    tensors = load_file(str(st))
    key = next(k for k in tensors if "lora_A" in k)

    def wrong_dtype(p):
        save_file({**tensors, key: tensors[key].to(torch.int32)}, str(p))

    def wrong_shape(p):
        save_file({**tensors, key: tensors[key][:, :-1].contiguous()}, str(p))

    cases = [
        (st, lambda p: p.write_bytes(good[p][: len(good[p]) // 2]), "not a readable safetensors"),
        (st, lambda p: p.write_bytes(os.urandom(300)), "not a readable safetensors"),
        (st, wrong_dtype, "is torch.int32; LoRA weights must be floating point"),
        (st, wrong_shape, "but this model needs"),
        (cfg, lambda p: p.write_text('{"peft_type": "LO'), "is not valid JSON"),
        (quant, lambda p: p.write_bytes(b"\xff\xfe garbage"), "is not valid JSON"),
        (quant, lambda p: p.write_text("[4]"), "must hold a JSON object"),
    ]
    argv = ["eval", "--model", tiny_dir, "--adapter", str(adapter), "--eval-size", "2"]
    for path, corrupt, match in cases:
        corrupt(path)
        capsys.readouterr()
        assert cli.main(argv) == 2, match
        err = capsys.readouterr().err
        assert str(path) in err and match in err, err
        path.write_bytes(good[path])
    # summary.json is a report for people: no command reads it back, so a truncated one
    # cannot change what eval computes.
    (out / "summary.json").write_text('{"config": {"ste')
    assert cli.main(argv) == 0
