"""The LoRA model path end to end: a tiny random LlamaForCausalLM, prepared with prepare_model and
trained for 30 steps by our own loop (torch.optim.AdamW) and by transformers.Trainer. The loss
falls in both, and only the adapters change: every base weight keeps its bytes."""

import pytest
import torch
from tiny_llama import tiny_llama, tokens

import qlora_ext

STEPS = 30


def base_snapshot(model):
    """Every non-adapter tensor (4-bit weights, quant state, embeddings, norms, lm_head)."""
    out = {}
    for name, t in model.state_dict(keep_vars=False).items():
        if ".lora_A." not in name and ".lora_B." not in name:
            out[name] = t.detach().clone()
    return out


def adapter_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def check_only_adapters_changed(model, base_before, adapters_before):
    base_after = base_snapshot(model)
    assert base_after.keys() == base_before.keys()
    for name, t in base_before.items():
        # Bytes, not values: bit-identical, including NaN payloads and uint8 packing.
        assert torch.equal(
            t.flatten().view(torch.uint8), base_after[name].flatten().view(torch.uint8)
        ), f"base tensor {name} changed in training"
    changed = [
        n for n, p in adapter_snapshot(model).items() if not torch.equal(p, adapters_before[n])
    ]
    assert len(changed) == len(adapters_before), "every adapter should have been updated"


def assert_loss_fell(losses):
    # The same 4 sequences every step, so the model memorises them: a random model starts near
    # ln(128) = 4.85 and the rank-8 adapters take it down by about 0.9 nats in 30 steps at
    # lr 1e-2. Dropout makes single steps noisy by a few hundredths; 0.4 is far outside that.
    assert losses[0] > 4.0, losses
    assert sum(losses[-3:]) / 3 < losses[0] - 0.4, losses


def prepare():
    model = qlora_ext.prepare_model(tiny_llama(), r=8, alpha=16, dropout=0.05)
    model.train()
    return model


def test_own_loop_adamw():
    model = prepare()
    base_before, adapters_before = base_snapshot(model), adapter_snapshot(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens(batch=4, seq=32)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert_loss_fell(losses)
    check_only_adapters_changed(model, base_before, adapters_before)


def test_transformers_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = prepare()
    base_before, adapters_before = base_snapshot(model), adapter_snapshot(model)
    ids = tokens(batch=4, seq=32)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS
    assert_loss_fell(losses)
    check_only_adapters_changed(model, base_before, adapters_before)
