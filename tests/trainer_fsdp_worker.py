"""One rank of transformers.Trainer training a QLoRA model under FSDP2 (accelerate), launched
by tests/test_trainer_fsdp.py through torchrun on the CPU (gloo): the tiny Llama of
tiny_hf_model.py loaded in 4 bits with QloraExtConfig, PEFT LoRA adapters on our layers, and
TrainingArguments(fsdp="full_shard", fsdp_config={"version": 2, ...}).

Rank 0 writes the logged losses and the trained model's logits on a fixed probe (computed by
every rank together under FSDP2) to --out, and the adapter (hf_fsdp.save_adapter_fsdp2) next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import peft  # noqa: E402
import transformers  # noqa: E402

import qlora_ext  # noqa: E402
from qlora_ext.hf_fsdp import (  # noqa: E402
    enable_fsdp2_on_cpu,
    prepare_for_fsdp2,
    save_adapter_fsdp2,
)

TEXTS = ["the quick brown fox jumps over the lazy dog. " * 2] * 32
PROBE = "the quick brown fox"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    out = Path(args.out)
    tok = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model_dir,
        quantization_config=qlora_ext.QloraExtConfig(compute_dtype=torch.float32),
        dtype=torch.float32,
        device_map="cpu",
    )
    # Same seed on every rank: FSDP2 shards each rank's own copy of the fresh adapters.
    torch.manual_seed(0)
    lora = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    model = prepare_for_fsdp2(peft.get_peft_model(model, lora))
    enc = tok(TEXTS, truncation=True, max_length=48)
    targs = transformers.TrainingArguments(
        output_dir=str(out.parent / "trainer"), max_steps=args.steps, learning_rate=1e-2,
        per_device_train_batch_size=2, logging_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", seed=0, fsdp=True,
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model,
        args=targs,
        train_dataset=datasets.Dataset.from_dict(dict(enc)),
        data_collator=transformers.DataCollatorForLanguageModeling(tok, mlm=False),
    )
    enable_fsdp2_on_cpu(trainer)
    trainer.train()
    from torch.distributed.fsdp import FSDPModule

    sharded = sum(isinstance(m, FSDPModule) for m in trainer.model_wrapped.modules())
    save_adapter_fsdp2(trainer, out.parent / "adapter")
    trainer.model_wrapped.eval()
    with torch.no_grad():
        probe = tok([PROBE], return_tensors="pt")
        logits = trainer.model_wrapped(**probe).logits
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        result = dict(
            losses=losses,
            world=trainer.args.world_size,
            fsdp_modules=sharded,
            logits=logits[0].tolist(),
            probe=PROBE,
        )
        out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
