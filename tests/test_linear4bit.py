"""qlora_ext.nn.Linear4bit: construction, forward/backward, devices and dtypes, train/eval, and
checkpoint interchange with bitsandbytes.nn.Linear4bit."""

import copy

import pytest
import torch
import torch.nn.functional as F

import qlora_ext
from conftest import DEVICES
from qlora_ext.nn import Linear4bit


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16], ids=["input-dtype", "bf16"])
def test_from_linear_forward_backward(device, compute_dtype):
    lin = torch.nn.Linear(128, 48).to(device)
    q = Linear4bit.from_linear(lin, "nf4", 64, True, compute_dtype)
    assert q.weight.dtype == torch.uint8 and not q.weight.requires_grad
    w_hat = q.dequantized_weight()
    assert ((w_hat - lin.weight).norm() / lin.weight.norm()).item() < 0.11  # NF4-level error
    x = torch.randn(4, 9, 128, device=device, requires_grad=True)
    y = q(x)
    assert y.dtype == x.dtype and y.shape == (4, 9, 48)
    cd = compute_dtype or torch.float32
    ref = F.linear(x.to(cd), w_hat.to(cd), lin.bias.to(cd)).float()
    tol = 1e-5 if cd == torch.float32 else 3e-2
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
    y.sum().backward()
    assert x.grad is not None and q.bias.grad is not None and q.weight.grad is None


def test_to_dtype_and_device_keep_it_quantized():
    q = Linear4bit(128, 32, quant_type="fp4")
    before = q.dequantized_weight()
    q = q.to(torch.bfloat16)
    assert q.weight.dtype == torch.uint8 and q.absmax.dtype == torch.uint8
    assert q.nested_absmax.dtype == torch.float32 and q.quant_map.dtype == torch.float32
    assert q.bias.dtype == torch.bfloat16
    torch.testing.assert_close(q.dequantized_weight(), before)  # state dtype is unchanged
    assert q(torch.randn(2, 128, dtype=torch.bfloat16)).dtype == torch.bfloat16
    if torch.cuda.is_available() and qlora_ext.build_info()["cuda"]:
        qc = q.to("cuda")
        assert qc.weight.is_cuda and qc.absmax.is_cuda and qc.weight.dtype == torch.uint8


def test_train_eval_switch_and_state_dict_round_trip():
    q = Linear4bit(64, 16)
    x = torch.randn(3, 64)
    q.eval()
    y_eval = q(x)
    q.train()
    torch.testing.assert_close(q(x), y_eval)
    q2 = Linear4bit(64, 16, quant_type="fp4", double_quant=False)
    q2.load_state_dict(q.state_dict())
    torch.testing.assert_close(q2(x), y_eval, rtol=0, atol=0)
    assert "double_quant=True" in repr(q2) and "quant_type=nf4" in repr(q2)


def test_cached_quant_state_follows_every_change_of_the_state():
    """Linear4bit builds its QuantState once (Note [Cached quant state]): loading another
    checkpoint, assigning a state buffer, .to() and deepcopy must each show in the next forward
    of the layer they changed, and only there."""
    x = torch.randn(3, 64)
    a = Linear4bit(64, 16, bias=False)
    b = Linear4bit(64, 16, bias=False, quant_type="fp4", double_quant=False)
    b(x)  # builds b's fp4 state
    b.load_state_dict(a.state_dict())
    assert b.quant_state.quant_type == "nf4" and b.quant_state.nested
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)

    c = Linear4bit(64, 16, bias=False, double_quant=False)
    y = c(x)
    c.absmax = c.absmax * 2  # a new tensor, assigned
    torch.testing.assert_close(c(x), 2 * y)
    c.to(torch.bfloat16)  # _apply: the state is restored as new tensors
    assert c.quant_state.absmax is c.absmax
    torch.testing.assert_close(c(x), 2 * y)

    d = copy.deepcopy(c)
    y_c = c(x)
    with torch.no_grad():
        d.absmax.mul_(3)  # in place, on the copy's own tensor
    torch.testing.assert_close(c(x), y_c, rtol=0, atol=0)
    torch.testing.assert_close(d(x), 3 * y_c)


def test_bad_checkpoints_and_shapes():
    q = Linear4bit(64, 16)
    with pytest.raises(RuntimeError, match="unquantized checkpoint"):
        q.load_state_dict(torch.nn.Linear(64, 16).state_dict())
    bigger = Linear4bit(128, 16).state_dict()
    with pytest.raises(RuntimeError, match="the 4-bit weight has shape \\(16, 128\\)"):
        q.load_state_dict(bigger)
    with pytest.raises(ValueError, match="in_features=100 is not a multiple of blocksize=64"):
        Linear4bit(100, 8)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        Linear4bit.from_linear(torch.nn.Conv1d(1, 1, 1))


bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_checkpoint_interchange_with_bitsandbytes(quant_type, double_quant):
    lin = torch.nn.Linear(128, 64)
    ref = bnb.nn.Linear4bit(
        128,
        64,
        quant_type=quant_type,
        compress_statistics=double_quant,
        compute_dtype=torch.float32,
    )
    ref.weight = bnb.nn.Params4bit(
        lin.weight.data.clone(),
        requires_grad=False,
        quant_type=quant_type,
        blocksize=64,
        compress_statistics=double_quant,
    )
    ref.bias = torch.nn.Parameter(lin.bias.data.clone())
    ref = ref.to("cpu")  # quantizes
    ours = Linear4bit.from_linear(lin, quant_type, 64, double_quant)
    sd_bnb, sd_ours = ref.state_dict(), ours.state_dict()
    assert set(sd_bnb) == set(sd_ours)
    for k in sd_bnb:
        if "quant_state" not in k:
            assert torch.equal(sd_bnb[k], sd_ours[k]), k
    x = torch.randn(5, 128)
    # bitsandbytes' checkpoint loads into ours...
    mine = Linear4bit(128, 64)
    mine.load_state_dict(sd_bnb)
    torch.testing.assert_close(mine(x), ref(x), rtol=1e-5, atol=1e-5)
    # ...and ours into bitsandbytes', the way it loads its own checkpoints (transformers does
    # this too): Params4bit.from_prequantized on the weight and its quant-state keys.
    theirs = bnb.nn.Linear4bit(128, 64, quant_type=quant_type, compute_dtype=torch.float32)
    stats = {k[len("weight.") :]: v for k, v in sd_ours.items() if k.startswith("weight.")}
    theirs.weight = bnb.nn.Params4bit.from_prequantized(
        sd_ours["weight"], stats, requires_grad=False, device="cpu", module=theirs
    )
    theirs.bias = torch.nn.Parameter(sd_ours["bias"].clone())
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)


def test_state_dict_of_many_layers_saves_with_safetensors(tmp_path):
    """No two layers' quant state may share storage (safetensors refuses shared tensors)."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = torch.nn.Sequential(Linear4bit(64, 64), Linear4bit(64, 64, quant_type="fp4"))
    path = tmp_path / "m.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    back = torch.nn.Sequential(Linear4bit(64, 64), Linear4bit(64, 64))
    back.load_state_dict(safetensors_torch.load_file(path))
    x = torch.randn(2, 64)
    torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
