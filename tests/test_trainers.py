"""HF Trainer and TRL's SFTTrainer train a model loaded with QloraExtConfig, on our LoRA layers."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
from tiny_hf_model import make_tiny_model_dir  # noqa: E402

import qlora_ext  # noqa: E402
from qlora_ext.nn import Linear4bit  # noqa: E402

# One repeated sentence: a model that learns anything at all drives its loss down fast.
TEXTS = ["the quick brown fox jumps over the lazy dog. " * 2] * 32
STEPS = 40


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"), seed=2)


def _load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=qlora_ext.QloraExtConfig(compute_dtype=torch.float32),
        dtype=torch.float32,
        device_map="cpu",
    )


def _lora_config():
    return peft.LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"
    )


def _args(cls, out, **kw):
    return cls(
        output_dir=str(out), max_steps=STEPS, learning_rate=1e-2, per_device_train_batch_size=4,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0, **kw,
    )  # fmt: skip


def _assert_loss_falls(history):
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == STEPS
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # Random init starts near ln(128) = 4.85. Forty steps of rank-8 adapters on a frozen
    # random base learn the sentence's character statistics: about 0.9 nat from the first
    # five steps to the last five here, while step-to-step noise is under 0.1 nat.
    assert last < first - 0.5, losses


def _assert_our_layers(model):
    cls = qlora_ext.peft_integration.layer_class()
    layers = [m for m in model.modules() if isinstance(m, cls)]
    assert len(layers) == 14
    assert all(type(m.get_base_layer()) is Linear4bit for m in layers)


def test_hf_trainer_trains_our_layers(model_dir, tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = peft.prepare_model_for_kbit_training(_load(model_dir))
    model = peft.get_peft_model(model, _lora_config())
    _assert_our_layers(model)
    enc = tok(TEXTS, truncation=True, max_length=48)
    ds = datasets.Dataset.from_dict(dict(enc))
    collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
    trainer = transformers.Trainer(
        model=model,
        args=_args(transformers.TrainingArguments, tmp_path),
        train_dataset=ds,
        data_collator=collator,
    )
    trainer.train()
    _assert_loss_falls(trainer.state.log_history)


def test_sft_trainer_trains_our_layers(model_dir, tmp_path):
    trl = pytest.importorskip("trl")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    trainer = trl.SFTTrainer(
        model=_load(model_dir),
        args=_args(trl.SFTConfig, tmp_path, max_length=48),
        train_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
        processing_class=tok,
        peft_config=_lora_config(),
    )
    _assert_our_layers(trainer.model)
    trainer.train()
    _assert_loss_falls(trainer.state.log_history)
