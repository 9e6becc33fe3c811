"""The shardable layout of the 4-bit layers (Note [Quant state as bytes]) in one process:
make_fsdp2_shardable changes where the quantization state lives, not what it is (the same
forward bits, state_dict keys and values, checkpoint round trip, merge), a dtype cast cannot
reach it, and a layer whose state is not whole refuses to run (Note [Gathered together]).
The multi-process behaviour is tests/test_distributed.py's."""

import copy

import pytest
import torch
from torch import nn

import qlora_ext
from qlora_ext.distributed import fully_shard_model, make_fsdp2_shardable, wrap_ddp
from qlora_ext.nn import Linear4bit, LoRALinear4bit

CASES = [dict(double_quant=True), dict(double_quant=False), dict(quant_type="fp4")]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_shardable_layer_computes_and_saves_the_same(kw):
    torch.manual_seed(0)
    layer = LoRALinear4bit(64, 24, dropout=0.0, compute_dtype=torch.float32, **kw)
    nn.init.normal_(layer.lora_B.weight)  # a non-zero adapter, so merging has work to do
    x = torch.randn(3, 64)
    want, sd = layer(x), layer.state_dict()
    shard = make_fsdp2_shardable(copy.deepcopy(layer))
    assert make_fsdp2_shardable(shard) is shard  # idempotent
    assert list(shard.buffers()) == []
    for name in ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset"):
        p = getattr(shard, name)
        if p is not None:
            assert isinstance(p, nn.Parameter) and p.dtype == torch.uint8 and p.dim() == 1
            assert not p.requires_grad
    assert torch.equal(shard(x), want)
    got = shard.state_dict()
    assert list(got) == list(sd)  # bitsandbytes' keys, in the same order
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    # A checkpoint of either layout loads into the other.
    other = make_fsdp2_shardable(LoRALinear4bit(64, 24, dropout=0.0, compute_dtype=torch.float32))
    other.load_state_dict(sd)
    assert torch.equal(other(x), want)
    plain = LoRALinear4bit(64, 24, dropout=0.0, compute_dtype=torch.float32)
    plain.load_state_dict(got)
    assert torch.equal(plain(x), want)
    assert torch.equal(shard.merged_weight(torch.float32), layer.merged_weight(torch.float32))
    # .to(dtype) casts floating-point parameters: the bytes are not floating point.
    shard.to(torch.bfloat16)
    assert shard.absmax.dtype == torch.uint8 and shard.quant_state.code.dtype == torch.float32
    assert torch.equal(shard.dequantized_weight(), layer.dequantized_weight())


def test_shardable_model_merges_like_the_plain_one():
    from tiny_llama import tiny_llama, tokens

    model = qlora_ext.prepare_model(
        tiny_llama(seed=0), r=4, compute_dtype=torch.float32, gradient_checkpointing=False
    )
    shard = make_fsdp2_shardable(copy.deepcopy(model))
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(shard(input_ids=ids).logits, model(input_ids=ids).logits)
    a = qlora_ext.merge_adapter(model, torch.float32).state_dict()
    b = qlora_ext.merge_adapter(shard, torch.float32).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_layer_whose_state_is_not_whole_refuses_to_run():
    x = torch.randn(2, 64)
    layer = make_fsdp2_shardable(Linear4bit(64, 8, bias=False))
    layer._layer_name = "model.layers.0.q_proj"
    for name in ("absmax", "nested_absmax", "quant_map"):
        bad = copy.deepcopy(layer)
        half = getattr(bad, name).detach()[: getattr(bad, name).numel() // 2].clone()
        setattr(bad, name, nn.Parameter(half, requires_grad=False))  # one rank's shard
        with pytest.raises(RuntimeError, match=f"'model.layers.0.q_proj': its {name} has"):
            bad(x)
    bad = copy.deepcopy(layer)
    bad.weight = nn.Parameter(bad.weight.detach()[:100].clone(), requires_grad=False)
    with pytest.raises(RuntimeError, match="its packed weight has 100 elements"):
        bad(x)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        make_fsdp2_shardable("model")
    with pytest.raises(TypeError, match="mp_policy must be a torch.distributed.fsdp"):
        fully_shard_model(nn.Linear(2, 2), mp_policy=torch.bfloat16)
    for flag in ("broadcast_buffers", "forward_sync_buffers"):
        with pytest.raises(ValueError, match=f"{flag}=True would re-send"):
            wrap_ddp(nn.Linear(2, 2), **{flag: True})


def test_transformers_and_peft_on_a_shardable_model(tmp_path):
    """from_pretrained(QloraExtConfig) -> make_fsdp2_shardable -> save_pretrained -> reload:
    the same checkpoint bytes and logits; PEFT's dispatch wraps the shardable layers."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from tiny_llama import tiny_llama, tokens

    tiny_llama(seed=5).save_pretrained(tmp_path / "fp32")
    load = transformers.AutoModelForCausalLM.from_pretrained
    cfg = qlora_ext.QloraExtConfig(compute_dtype=torch.float32)
    plain = load(tmp_path / "fp32", quantization_config=cfg, dtype=torch.float32)
    shard = make_fsdp2_shardable(
        load(tmp_path / "fp32", quantization_config=cfg, dtype=torch.float32)
    )
    x = tokens()
    with torch.no_grad():
        want = plain(x).logits
        assert torch.equal(shard(x).logits, want)
    shard.save_pretrained(tmp_path / "q")
    again = load(tmp_path / "q", device_map="cpu")
    a, b = plain.state_dict(), again.state_dict()
    assert list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    model = peft.get_peft_model(shard, lora)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, want)  # lora_B starts at zero
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
