"""Every `qlora-ext finetune` option takes effect: each run is spied on (the prepared model,
the optimizer and its steps, the micro-batches fed to the model, forward passes in training)
and the option is shown to change what is trained, not only what is parsed."""

import json

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from tiny_hf_model import make_tiny_model_dir  # noqa: E402

from qlora_ext import LoRALinear4bit, cli, optim, train  # noqa: E402

BASE = ["--train-size", "60", "--eval-size", "2", "--batch-size", "4", "--seq-len", "256"]
BASE += ["--lr", "3e-3", "--r", "4", "--alpha", "8", "--steps", "2"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def run(tiny_dir, tmp_path, monkeypatch):
    """run(*args) -> what the job did: summary, model, optimizer, optimizer steps, micro-batch
    inputs, and forward passes of layer 0's MLP in training mode (checkpointing recomputes it
    in the backward)."""
    real_prepare, real_opt, real_inputs = train._prepare, train._make_optimizer, train._train_inputs

    def go(*args):
        rec = {"opt_steps": 0, "mlp_train_forwards": 0, "inputs": []}

        def prepare(model, cfg, dtype):
            model = real_prepare(model, cfg, dtype)
            mlp = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp"))

            def count(mod, _args):
                rec["mlp_train_forwards"] += mod.training

            mlp.register_forward_pre_hook(count)
            rec["model"] = model
            return model

        def make_opt(cfg, params):
            opt = real_opt(cfg, params)
            opt.register_step_post_hook(
                lambda *_: rec.__setitem__("opt_steps", rec["opt_steps"] + 1)
            )
            rec["opt"] = opt
            return opt

        def inputs(rows, packed, pad_id, device):
            x = real_inputs(rows, packed, pad_id, device)
            rec["inputs"].append(x)
            return x

        monkeypatch.setattr(train, "_prepare", prepare)
        monkeypatch.setattr(train, "_make_optimizer", make_opt)
        monkeypatch.setattr(train, "_train_inputs", inputs)
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        assert (
            cli.main(["finetune", "--model", tiny_dir, "--output-dir", str(out), *BASE, *args]) == 0
        )
        rec["summary"] = json.loads((out / "summary.json").read_text())
        rec["out"] = out
        return rec

    return go


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear4bit)}


def test_steps_epochs_and_grad_accum_set_the_number_of_updates(run):
    r = run("--steps", "3")
    assert (
        r["opt_steps"] == 3 and len(r["inputs"]) == 3 and len(r["summary"]["history"]["loss"]) == 3
    )
    r = run("--steps", "3", "--grad-accum", "2")
    assert r["opt_steps"] == 3 and len(r["inputs"]) == 6  # two micro-batches per update
    # 60 examples (none cut by --seq-len 256) in batches of 4: half an epoch is ceil(7.5) = 8
    # updates; with two micro-batches per update, 4.
    r = run("--epochs", "0.5")
    assert r["opt_steps"] == 8 and r["summary"]["config"]["steps"] == 8
    r = run("--epochs", "0.5", "--grad-accum", "2")
    assert r["opt_steps"] == 4 and len(r["inputs"]) == 8


def test_batch_size_and_seq_len_shape_the_micro_batches(run):
    r = run("--batch-size", "3", "--seq-len", "100")
    for x in r["inputs"]:
        assert x["input_ids"].shape[0] == 3 and x["input_ids"].shape[1] <= 100


@pytest.mark.parametrize(
    "name,cls",
    [
        ("adamw", torch.optim.AdamW),
        ("paged_adamw", optim.PagedAdamW),
        ("paged_adamw_8bit", optim.PagedAdamW8bit),
    ],
)
def test_optimizer_choice(run, name, cls):
    r = run("--optimizer", name, "--weight-decay", "0.01")
    assert type(r["opt"]) is cls and r["opt_steps"] == 2
    assert r["opt"].param_groups[0]["weight_decay"] == 0.01
    assert r["summary"]["after"]["loss"] != r["summary"]["before"]["loss"]


@pytest.mark.parametrize("quant_type", ["nf4", "none"])
def test_gradient_checkpointing_recomputes_the_layers_in_the_backward(run, quant_type):
    off = run("--quant-type", quant_type)
    on = run("--quant-type", quant_type, "--gradient-checkpointing")
    assert off["mlp_train_forwards"] == 2  # one forward per micro-batch
    assert on["mlp_train_forwards"] == 4  # and one more in each backward
    # Same maths: checkpointing changes memory, not the loss.
    assert on["summary"]["history"]["loss"] == pytest.approx(off["summary"]["history"]["loss"])


def test_quant_type_double_quant_and_blocksize_reach_the_layers(run):
    for qt in ("nf4", "fp4", "int4"):
        layers = lora_layers(run("--quant-type", qt)["model"])
        assert len(layers) == 14 and {m._meta["quant_type"] for m in layers.values()} == {qt}
    layers = lora_layers(run("--no-double-quant", "--blocksize", "32")["model"]).values()
    assert all(m.nested_absmax is None and m._meta["blocksize"] == 32 for m in layers)
    assert all(m.nested_absmax is not None for m in lora_layers(run()["model"]).values())
    r = run("--quant-type", "none")  # the 16-bit baseline: PEFT LoRA on plain nn.Linear
    assert not lora_layers(r["model"])
    peft_layers = [m for m in r["model"].modules() if isinstance(m, peft.tuners.lora.Linear)]
    assert len(peft_layers) == 14
    assert all(type(m.base_layer) is torch.nn.Linear for m in peft_layers)


@pytest.mark.parametrize("quant_type", ["nf4", "none"])
def test_target_modules_r_and_alpha(run, quant_type):
    r = run(
        "--quant-type", quant_type, "--target-modules", "q_proj,v_proj", "--r", "2", "--alpha", "6"
    )
    cfg = json.loads((r["out"] / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 6
    trainable = {n for n, p in r["model"].named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(".q_proj." in n or ".v_proj." in n for n in trainable)


def test_dropout_changes_training_from_the_second_step(run):
    # Step 1 has B = 0, so dropout on the adapter path cannot change its loss; its gradients
    # differ, so the second step's loss does.
    a = run("--dropout", "0.0")["summary"]["history"]["loss"]
    r = run("--dropout", "0.3")
    assert {m.lora_dropout for m in lora_layers(r["model"]).values()} == {0.3}
    b = r["summary"]["history"]["loss"]
    assert a[0] == b[0] and a[1] != b[1]


def test_seed_and_lr(run):
    a, b, c = run("--seed", "1"), run("--seed", "1"), run("--seed", "2")
    assert a["summary"]["history"]["loss"] == b["summary"]["history"]["loss"]
    assert a["summary"]["history"]["loss"] != c["summary"]["history"]["loss"]
    high, low = run()["summary"]["history"], run("--lr", "1e-3")["summary"]["history"]
    assert max(high["lr"]) == pytest.approx(3e-3) and max(low["lr"]) == pytest.approx(1e-3)
    assert high["loss"][0] == low["loss"][0] and high["loss"][1] != low["loss"][1]
