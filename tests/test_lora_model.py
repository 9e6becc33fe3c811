"""LoRALinear4bit, prepare_model and the adapters: exact identity when fresh, gradient
checkpointing, freezing, PEFT interchange both ways, merging, and the bad inputs."""

import json

import pytest
import torch
import torch.nn.functional as F
from tiny_llama import tiny_llama, tokens
from torch.utils.checkpoint import checkpoint

import qlora_ext
from qlora_ext import LoRALinear4bit
from qlora_ext.nn import Linear4bit

# bf16 tolerance for logits of the tiny model (|logits| ~ 1): the two sides round differently
# (merged weights rounded to bf16 vs fp32 accumulation of base + adapter, PEFT's bf16 base
# layer vs ours), each rounding a relative 2^-8 = 0.4%, compounded over two decoder layers.
BF16_LOGITS = dict(rtol=3e-2, atol=3e-2)


def randomize_adapters(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear4bit):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


def prepared(r=8, **kw):
    return qlora_ext.prepare_model(tiny_llama(), r=r, dropout=0.0, **kw).eval()


@pytest.mark.parametrize("M", [5, 40], ids=["stream", "panel"])
def test_fresh_layer_is_exactly_the_base_layer(M):
    lin = torch.nn.Linear(128, 96)
    lora = LoRALinear4bit.from_linear(lin, r=16, alpha=32, dropout=0.05)
    base = Linear4bit.from_linear(lin, "nf4", 64, True, torch.bfloat16)
    assert lora.lora_B.weight.abs().sum() == 0 and lora.lora_A.weight.abs().sum() > 0
    x = torch.randn(3, M, 128)
    lora.train()  # dropout on: it only feeds the adapter, whose B is zero
    assert torch.equal(lora(x), base(x))


def test_fresh_prepared_model_is_exactly_the_quantized_model():
    ids = tokens()
    model = prepared()
    base = tiny_llama()
    # The same model with plain Linear4bit layers and the same 16-bit casts (parameters only:
    # RoPE's inv_freq buffer stays fp32 in both).
    for m in list(base.modules()):
        for leaf, child in list(m.named_children()):
            if isinstance(child, torch.nn.Linear) and leaf != "lm_head":
                setattr(m, leaf, Linear4bit.from_linear(child, "nf4", 64, True, torch.bfloat16))
    for p in base.parameters():
        if p.is_floating_point():
            p.data = p.data.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)


def test_prepare_model_freezes_and_summarises(capsys):
    model = prepared(r=4, target_modules=["q_proj", "v_proj"])
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "trainable params" in out and "weight bytes" in out
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    layers = [n for n, m in model.named_modules() if isinstance(m, LoRALinear4bit)]
    assert len(layers) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in layers)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)


def test_prepare_model_bad_arguments():
    with pytest.raises(ValueError, match=r"target_modules=\['qkv'\] matched no nn.Linear"):
        qlora_ext.prepare_model(tiny_llama(), target_modules=["qkv"])
    with pytest.raises(ValueError, match="r \\(the LoRA rank\\) must be a positive integer"):
        qlora_ext.prepare_model(tiny_llama(), r=0)
    with pytest.raises(ValueError, match="r \\(the LoRA rank\\) must be a positive integer"):
        LoRALinear4bit.from_linear(torch.nn.Linear(64, 8), r=-2)


def test_gradient_checkpointing_through_the_layer():
    """torch.utils.checkpoint recomputes the forward in the backward: with dropout on, the
    recomputation must redraw the same seed (checkpoint restores the RNG state), so the
    gradients equal those of the plain run."""
    layer = LoRALinear4bit.from_linear(torch.nn.Linear(64, 64), r=4, dropout=0.3)
    torch.nn.init.normal_(layer.lora_B.weight)
    layer.train()

    def block(x):
        return F.gelu(layer(F.gelu(layer(x))))

    x = torch.randn(6, 64, requires_grad=True)
    torch.manual_seed(9)
    block(x).float().square().sum().backward()
    want = [t.grad.clone() for t in (x, layer.lora_A.weight, layer.lora_B.weight)]
    for t in (x, layer.lora_A.weight, layer.lora_B.weight):
        t.grad = None
    torch.manual_seed(9)
    checkpoint(block, x, use_reentrant=False).float().square().sum().backward()
    for w, t in zip(want, (x, layer.lora_A.weight, layer.lora_B.weight), strict=True):
        torch.testing.assert_close(t.grad, w, rtol=0, atol=0)


def dequantized_base(model):
    """The 16-bit base model our QLoRA model computes with: tiny_llama's architecture with
    every quantized weight replaced by dequant(W4)."""
    base = tiny_llama().to(torch.bfloat16)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LoRALinear4bit):
                base.get_submodule(name).weight.copy_(m.dequantized_weight())
    return base


def test_save_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    PeftModel = pytest.importorskip("peft").PeftModel

    model = prepared()
    randomize_adapters(model)
    qlora_ext.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["task_type"] == "CAUSAL_LM"
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind
    peft_model = PeftModel.from_pretrained(dequantized_base(model), tmp_path).eval()
    ids = tokens()
    with torch.no_grad():
        ours = model(ids).logits.float()
        theirs = peft_model(input_ids=ids).logits.float()
        plain = dequantized_base(model)(ids).logits.float()
    assert (ours - plain).abs().max() > 0.1  # the adapter matters, so the match means something
    torch.testing.assert_close(theirs, ours, **BF16_LOGITS)


def test_load_adapter_trained_by_peft(tmp_path):
    peft = pytest.importorskip("peft")
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model

    model = prepared()
    peft_model = get_peft_model(
        dequantized_base(model),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0),
    )
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path)
    qlora_ext.load_adapter(model, tmp_path)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids).logits.float(),
            peft_model.eval()(input_ids=ids).logits.float(),
            **BF16_LOGITS,
        )
    assert model.model.layers[0].self_attn.q_proj.scaling == 2.0  # alpha 16 / r 8 from the file


def test_load_adapter_refuses_mismatches(tmp_path):
    model = prepared()
    qlora_ext.save_adapter(model, tmp_path / "ok")
    with pytest.raises(ValueError, match="rank r=8 but layer .* has r=4"):
        qlora_ext.load_adapter(prepared(r=4), tmp_path / "ok")
    with pytest.raises(ValueError, match="targets other modules"):
        qlora_ext.load_adapter(prepared(target_modules=["q_proj"]), tmp_path / "ok")
    # Same names and rank, another base shape (hidden 128 instead of 64).
    from transformers import LlamaConfig, LlamaForCausalLM  # present: tiny_llama() ran

    wide = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=128,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    qlora_ext.prepare_model(wide, r=8)
    with pytest.raises(ValueError, match="trained on a base model of another shape"):
        qlora_ext.load_adapter(wide, tmp_path / "ok")
    # A truncated safetensors file.
    bad = tmp_path / "bad"
    qlora_ext.save_adapter(model, bad)
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        qlora_ext.load_adapter(model, bad)
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        qlora_ext.load_adapter(model, bad)
    with pytest.raises(FileNotFoundError, match="adapter_config.json does not exist"):
        qlora_ext.load_adapter(model, tmp_path / "nowhere")


def test_round_trip_save_load(tmp_path):
    model = prepared()
    randomize_adapters(model)
    qlora_ext.save_adapter(model, tmp_path)
    other = prepared()
    qlora_ext.load_adapter(other, tmp_path)
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(other(ids).logits, model(ids).logits)


def test_merge_adapter_matches_unmerged_model():
    model = prepared()
    randomize_adapters(model)
    merged = qlora_ext.merge_adapter(model, dtype=torch.bfloat16)
    assert not any(isinstance(m, (LoRALinear4bit, Linear4bit)) for m in merged.modules())
    assert merged.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert any(isinstance(m, LoRALinear4bit) for m in model.modules())  # not in place
    # The merge uses dequant(W4), not the original fp32 weights of tiny_llama().
    q = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(
        merged.model.layers[0].self_attn.q_proj.weight.float(),
        (q.dequantized_weight().float() + q.scaling * q.lora_B.weight @ q.lora_A.weight),
        rtol=2**-8,
        atol=1e-6,  # one bf16 rounding
    )
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, **BF16_LOGITS)
        requant = qlora_ext.merge_adapter(model, requantize=True)
        assert isinstance(requant.model.layers[0].self_attn.q_proj, Linear4bit)
        # 4-bit rounding of the merged weight: only a loose agreement (see the docstring).
        err = (requant(ids).logits.float() - model(ids).logits.float()).abs().mean()
        assert err < 0.2


def test_save_adapter_is_atomic(tmp_path, monkeypatch):
    """A write that dies half-way leaves the previous adapter intact and no stray file."""
    import safetensors.torch

    model = prepared()
    qlora_ext.save_adapter(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    randomize_adapters(model)

    def dying_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a header")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(OSError, match="disk full"):
        qlora_ext.save_adapter(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_prepare_model_frees_each_weight_before_quantizing_the_next(monkeypatch):
    """Layer by layer: when a layer is quantized, the full-precision weight of every layer
    quantized before it is already gone, so two full-precision copies never coexist."""
    import weakref

    refs = []
    original = LoRALinear4bit.from_linear.__func__

    def spy(cls, linear, *args, **kwargs):
        alive = [r for r in refs if r() is not None]
        assert not alive, f"{len(alive)} replaced full-precision weights are still alive"
        layer = original(cls, linear, *args, **kwargs)
        refs.append(weakref.ref(linear.weight))
        return layer

    monkeypatch.setattr(LoRALinear4bit, "from_linear", classmethod(spy))
    model = qlora_ext.prepare_model(tiny_llama(), r=4)
    assert len(refs) == 14 and all(r() is None for r in refs)
    assert isinstance(model.model.layers[1].mlp.down_proj, LoRALinear4bit)


def test_layer_constructor_and_state_dict_round_trip():
    layer = LoRALinear4bit(128, 32, r=4, alpha=8, dropout=0.0, compute_dtype=None)
    torch.nn.init.normal_(layer.lora_B.weight)
    sd = layer.state_dict()
    assert {"lora_A.weight", "lora_B.weight", "weight", "bias", "weight.absmax"} <= set(sd)
    other = LoRALinear4bit(128, 32, r=4, alpha=8, dropout=0.0, compute_dtype=None)
    other.load_state_dict(sd)
    x = torch.randn(3, 128)
    assert torch.equal(other(x), layer(x))
    with pytest.raises(ValueError, match="dropout must be in \\[0, 1\\)"):
        LoRALinear4bit(128, 32, dropout=1.0)
