"""transformers integration: from_pretrained(quantization_config=QloraExtConfig()) quantizes on
load into Linear4bit; 4-bit checkpoints save and reload; bitsandbytes 4-bit checkpoints load."""

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from tiny_llama import tiny_llama, tokens  # noqa: E402
from torch import nn  # noqa: E402

import qlora_ext  # noqa: E402
from qlora_ext.nn import Linear4bit  # noqa: E402

AutoModelForCausalLM = transformers.AutoModelForCausalLM
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bf16")
    tiny_llama(seed=3).to(torch.bfloat16).save_pretrained(d)
    return d


def _load(path, **kw):
    kw.setdefault("dtype", torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **kw)


def test_import_does_not_import_transformers():
    code = "import sys, qlora_ext; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_load_is_bit_identical_to_quantize_4bit(bf16_dir, dtype, quant_type):
    cfg = qlora_ext.QloraExtConfig(quant_type=quant_type, compute_dtype=dtype)
    model = _load(bf16_dir, quantization_config=cfg, dtype=dtype)
    sd = load_file(str(bf16_dir / "model.safetensors"))
    n = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in QUANTIZED:
            continue
        assert type(module) is Linear4bit, name
        # The loader hands the quantizer the checkpoint tensor cast to the load dtype.
        w = sd[name + ".weight"].to(dtype)
        packed, state = qlora_ext.quantize_4bit(w, 64, quant_type, True)
        assert torch.equal(module.weight.reshape(-1), packed.reshape(-1)), name
        ref, got = state.as_dict(), module.quant_state.as_dict()
        assert ref.keys() == got.keys()
        for k, v in ref.items():
            assert torch.equal(v, got[k]) if isinstance(v, torch.Tensor) else v == got[k], (name, k)
        assert module.compute_dtype == dtype
        n += 1
    assert n == 2 * len(QUANTIZED)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == dtype
    assert model.is_loaded_in_4bit


def test_skip_modules_stay_16bit_and_match_the_checkpoint(bf16_dir):
    cfg = qlora_ext.QloraExtConfig(skip_modules=["down_proj", "model.layers.0.self_attn.q_proj"])
    model = _load(bf16_dir, quantization_config=cfg)
    sd = load_file(str(bf16_dir / "model.safetensors"))
    skipped = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    skipped += ["model.layers.0.self_attn.q_proj", "lm_head"]
    for name in skipped:
        m = model.get_submodule(name)
        assert type(m) is nn.Linear, name
        assert torch.equal(m.weight, sd[name + ".weight"]), name
    assert type(model.get_submodule("model.layers.1.self_attn.q_proj")) is Linear4bit


def test_quantized_model_computes_what_prepare_model_does(bf16_dir):
    # Same 4-bit weights, same op: the logits must be identical, not merely close.
    ours = _load(bf16_dir, quantization_config=qlora_ext.QloraExtConfig())
    plain = _load(bf16_dir)
    for name in [n for n, m in plain.named_modules() if n.rsplit(".", 1)[-1] in QUANTIZED]:
        lin = plain.get_submodule(name)
        plain.set_submodule(name, Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16))
    x = tokens()
    with torch.no_grad():
        a, b = ours(x).logits, plain(x).logits
    assert a.abs().max() > 0.01
    assert torch.equal(a, b)


def test_save_and_reload_without_requantizing(bf16_dir, tmp_path, monkeypatch):
    model = _load(bf16_dir, quantization_config=qlora_ext.QloraExtConfig(skip_modules=["v_proj"]))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "qlora_ext" and cfg["skip_modules"] == ["v_proj"]
    saved = load_file(str(tmp_path / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    for suffix in ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"):
        assert key + suffix in saved, suffix
    assert key + ".quant_state.bitsandbytes__nf4" in saved
    assert saved[key].dtype == torch.uint8

    def no_quantize(*a, **k):
        raise AssertionError("a 4-bit checkpoint was quantized again")

    monkeypatch.setattr(Linear4bit, "quantize_weight_", no_quantize)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    for (n1, t1), (n2, t2) in zip(
        model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2), n1
    assert type(again.model.layers[0].self_attn.v_proj) is nn.Linear
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)


def test_bitsandbytes_checkpoint_loads_into_our_layers(bf16_dir, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    bnb_cfg = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    theirs = _load(bf16_dir, quantization_config=bnb_cfg, dtype=torch.float32)
    assert isinstance(theirs.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    theirs.save_pretrained(tmp_path)
    config = qlora_ext.config_from_bitsandbytes(tmp_path)
    ours = _load(tmp_path, config=config, dtype=torch.float32)
    # The fp32 model that both 4-bit models stand for: nn.Linear holding bitsandbytes' dequant.
    ref = _load(bf16_dir, dtype=torch.float32)
    for name, m in theirs.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            mine = ours.get_submodule(name)
            assert type(mine) is Linear4bit, name
            w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
            assert torch.equal(mine.dequantized_weight(), w), name  # the same 4-bit weight
            with torch.no_grad():
                ref.get_submodule(name).weight.copy_(w)
    x = tokens()
    with torch.no_grad():
        a, b, r = ours(x).logits, theirs(x).logits, ref(x).logits
    assert r.abs().max() > 0.01
    # Ours computes in fp32 as asked: only the summation order differs from the reference.
    torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    # bitsandbytes' CPU matmul rounds below fp32 (about 2e-3 here), so its logits are not the
    # fp32 ones; ours are as close to them as theirs are to the reference.
    assert (a - b).abs().max() <= (b - r).abs().max() + 1e-5
    # Our config on their checkpoint directly: transformers names both config classes.
    with pytest.raises(ValueError, match="quantized with BitsAndBytesConfig but you are passing"):
        _load(tmp_path, quantization_config=qlora_ext.QloraExtConfig(), dtype=torch.float32)


def test_unknown_quant_type_is_refused():
    with pytest.raises(ValueError, match="quant_type must be one of nf4, fp4, int4, got 'nf5'"):
        qlora_ext.QloraExtConfig(quant_type="nf5")


def test_blocksize_that_does_not_divide_a_layer_is_refused(tmp_path):
    # hidden 64 and intermediate 128: blocksize 128 does not divide q_proj's in_features=64.
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=r"blocksize=128\) does not divide in_features=64 of layer"
    ):
        _load(tmp_path, quantization_config=qlora_ext.QloraExtConfig(blocksize=128))


def test_checkpoint_of_another_method_is_refused(bf16_dir, tmp_path):
    config = json.loads((bf16_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantization method 'fp8', not bitsandbytes"):
        qlora_ext.config_from_bitsandbytes(tmp_path)
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has no quantization_config"):
        qlora_ext.config_from_bitsandbytes(tmp_path)
