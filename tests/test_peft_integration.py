"""PEFT on our kernels: prepare_model_for_kbit_training + get_peft_model put the fused
lora_4bit op in every targeted layer; adapters save in PEFT's format; merge_and_unload merges
through dequant(W4); HF Trainer and TRL's SFTTrainer train such a model."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from tiny_llama import tiny_llama, tokens  # noqa: E402
from torch import nn  # noqa: E402

import qlora_ext  # noqa: E402
from qlora_ext.nn import Linear4bit  # noqa: E402

QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp32")
    tiny_llama(seed=5).save_pretrained(d)
    return d


def _peft_model(path, dropout=0.05, compute_dtype=torch.float32, dtype=torch.float32):
    cfg = qlora_ext.QloraExtConfig(compute_dtype=compute_dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=cfg, dtype=dtype, device_map="cpu"
    )
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = peft.LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules="all-linear",
        lora_dropout=dropout,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, lora)


def _lora_layers(model):
    cls = qlora_ext.peft_integration.layer_class()
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


def test_get_peft_model_uses_our_fused_layer(fp32_dir, monkeypatch):
    model = _peft_model(fp32_dir)
    layers = _lora_layers(model)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
    assert leaves == sorted(QUANTIZED) and len(layers) == 2 * len(QUANTIZED)
    for name, m in layers.items():
        assert type(m.get_base_layer()) is Linear4bit, name
    assert type(model.base_model.model.lm_head) is nn.Linear
    # PEFT's slow path would call the base layer and then the adapter's nn.Linear modules;
    # the fused op does neither.
    calls = []
    monkeypatch.setattr(Linear4bit, "forward", lambda self, x: calls.append(1))
    monkeypatch.setattr(nn.Linear, "forward", lambda self, x: calls.append(self.out_features))
    model.base_model.model.model.layers[0].mlp.up_proj(torch.randn(2, 64))
    assert calls == []


def _copy_adapters(src_layers, dst_layers, key):
    g = torch.Generator().manual_seed(0)
    for name, dst in dst_layers.items():
        src = src_layers[key(name)]
        with torch.no_grad():
            # Nonzero B (PEFT and we both start it at zero): the adapter must change the loss.
            src.lora_B.weight.copy_(0.1 * torch.randn(src.lora_B.weight.shape, generator=g))
            dst["A"].copy_(src.lora_A.weight)
            dst["B"].copy_(src.lora_B.weight)


def test_loss_and_gradients_equal_prepare_model(fp32_dir):
    # Dropout 0 and the same adapters: both paths run the same lora_4bit op on the same
    # 4-bit weights and fp32 activations, so loss and gradients must be identical.
    ours = qlora_ext.prepare_model(
        transformers.AutoModelForCausalLM.from_pretrained(fp32_dir, dtype=torch.float32),
        dropout=0.0, compute_dtype=torch.float32, gradient_checkpointing=False,
    )  # fmt: skip
    theirs = _peft_model(fp32_dir, dropout=0.0)
    ours_layers = {n: m for n, m in ours.named_modules() if isinstance(m, qlora_ext.LoRALinear4bit)}
    peft_layers = _lora_layers(theirs)
    dst = {
        n: {"A": m.lora_A["default"].weight, "B": m.lora_B["default"].weight}
        for n, m in peft_layers.items()
    }
    _copy_adapters(ours_layers, dst, key=lambda n: n.removeprefix("base_model.model."))
    x = tokens()
    ours.train(), theirs.train()
    l1 = ours(x, labels=x).loss
    l2 = theirs(x, labels=x).loss
    l1.backward(), l2.backward()
    assert torch.equal(l1, l2)
    for name, m in peft_layers.items():
        o = ours_layers[name.removeprefix("base_model.model.")]
        assert o.lora_A.weight.grad.abs().max() > 0
        assert torch.equal(m.lora_A["default"].weight.grad, o.lora_A.weight.grad), name
        assert torch.equal(m.lora_B["default"].weight.grad, o.lora_B.weight.grad), name


def test_adapter_saves_in_peft_format_and_merge_and_unload(fp32_dir, tmp_path):
    model = _peft_model(fp32_dir, dropout=0.0)
    layers = _lora_layers(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in layers.values():
            m.lora_B["default"].weight.copy_(
                0.1 * torch.randn(m.lora_B["default"].weight.shape, generator=g)
            )
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    # Our own loader reads it: the keys and config are PEFT's standard ones.
    ours = qlora_ext.prepare_model(
        transformers.AutoModelForCausalLM.from_pretrained(fp32_dir, dtype=torch.float32),
        dropout=0.0, compute_dtype=torch.float32, gradient_checkpointing=False,
    )  # fmt: skip
    qlora_ext.load_adapter(ours, tmp_path)
    x = tokens()
    model.eval(), ours.eval()
    with torch.no_grad():
        y_peft, y_ours = model(x).logits, ours(x).logits
    assert torch.equal(y_peft, y_ours)
    expected = qlora_ext.merge_adapter(ours, dtype=torch.float32)
    merged = model.merge_and_unload()
    for name in [n for n, m in expected.named_modules() if n.rsplit(".", 1)[-1] in QUANTIZED]:
        a, b = merged.get_submodule(name), expected.get_submodule(name)
        assert type(a) is nn.Linear and a.weight.dtype == torch.float32, name
        assert torch.equal(a.weight, b.weight), name  # dequant(W4) + s·B@A, both in fp32
    with torch.no_grad():
        y_merged = merged(x).logits
    # The merged model runs dense fp32 matmuls instead of the 4-bit kernel: fp32 rounding.
    torch.testing.assert_close(y_merged, y_peft, rtol=1e-4, atol=1e-4)
