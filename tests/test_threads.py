"""Thread safety: the ops and modules called from 4 Python threads at once give bitwise the
results they give called one after another, and the ops release the GIL while they run (the
dispatcher's Python binding drops it around the kernel), so the threads really overlap.

Also the CPU output-block cache (Note [Large CPU outputs], cpp/cpu/cpu_alloc.cpp) under
concurrent allocation and release of large outputs.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import qlora_ext
from qlora_ext.lora import LoRALinear4bit
from qlora_ext.optim import PagedAdamW, PagedAdamW8bit

THREADS = 4


def _concurrently(fn, args_list):
    """fn(*args) for each args, THREADS at a time, all started together."""
    barrier = threading.Barrier(min(THREADS, len(args_list)))

    def run(args):
        barrier.wait()
        return fn(*args)

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(run, args_list))


def _same(a, b):
    if isinstance(a, (tuple, list)):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _check(fn, args_list):
    serial = [fn(*args) for args in args_list]
    for _ in range(2):
        concurrent = _concurrently(fn, args_list * 2)
        for i, got in enumerate(concurrent):
            assert _same(got, serial[i % len(args_list)]), i


def _weight(n, k, seed, quant_type="nf4"):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return qlora_ext.quantize_4bit(w, 64, quant_type, double_quant=True)


def test_ops_release_the_gil():
    # While one long op call runs in a thread, this thread keeps running Python: impossible if
    # the call held the GIL (the interpreter would wait for it to return).
    w = torch.randn(4096, 4096)
    packed, state = qlora_ext.quantize_4bit(w)
    x = torch.randn(512, 4096)
    calls = {
        "quantize_4bit": lambda: qlora_ext.quantize_4bit(w),
        "dequantize_4bit": lambda: qlora_ext.dequantize_4bit(packed, state),
        "matmul_4bit": lambda: qlora_ext.matmul_4bit(x, packed, state),
    }
    for name, call in calls.items():
        done = threading.Event()
        t = threading.Thread(target=lambda c=call, d=done: (c(), d.set()))
        spins = 0
        t.start()
        while not done.is_set():
            spins += 1
        t.join()
        assert spins > 1000, f"{name}: this thread ran {spins} iterations during the call"


def test_quantize_and_dequantize_concurrently():
    ws = [
        torch.randn(s, generator=torch.Generator().manual_seed(i)).to(dt)
        for i, (s, dt) in enumerate(
            [((301, 257), torch.float32), ((64, 4096), torch.bfloat16), ((4099,), torch.float16)]
            + [((1000, 130), torch.float32)]
        )
    ]

    def quant(w, qt):
        packed, st = qlora_ext.quantize_4bit(w, 64, qt, double_quant=True)
        return packed, st.absmax, st.state2.absmax, st.offset

    _check(quant, [(w, qt) for w, qt in zip(ws, ("nf4", "fp4", "int4", "nf4"), strict=True)])
    pairs = [qlora_ext.quantize_4bit(w, 128, "nf4") for w in ws]
    _check(qlora_ext.dequantize_4bit, pairs)


@pytest.mark.parametrize("M", [1, 16, 512])
def test_matmul_4bit_concurrently(M):
    # M = 1 and 16 take the fused streaming kernel, 512 the dequantized panels.
    packed, state = _weight(384, 512, 0)
    xs = [torch.randn(M, 512, generator=torch.Generator().manual_seed(i)) for i in range(THREADS)]
    bias = torch.randn(384)
    _check(lambda x: qlora_ext.matmul_4bit(x, packed, state, bias), [(x,) for x in xs])

    def with_grad(x):
        x = x.clone().requires_grad_()
        y = qlora_ext.matmul_4bit(x, packed, state)
        y.backward(torch.ones_like(y))
        return y.detach(), x.grad

    _check(with_grad, [(x,) for x in xs])


def test_lora_forward_and_modules_concurrently():
    torch.manual_seed(0)
    layers = [LoRALinear4bit(256, 192, r=8, dropout=0.1, compute_dtype=None) for _ in range(2)]
    for layer in layers:
        nn.init.normal_(layer.lora_B.weight)
    xs = [torch.randn(33, 256, generator=torch.Generator().manual_seed(i)) for i in range(THREADS)]
    packed, state = layers[0].weight, layers[0].quant_state
    A, B = layers[0].lora_A.weight.detach(), layers[0].lora_B.weight.detach()
    seed = torch.tensor([12345])
    _check(
        lambda x: qlora_ext.lora_4bit(x, packed, state, A, B, 2.0, 0.1, seed), [(x,) for x in xs]
    )

    def module(i, x):
        with torch.no_grad():
            return layers[i % 2].eval()(x)

    _check(module, [(i, x) for i, x in enumerate(xs)])


@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_optimizer_steps_concurrently_on_separate_parameters(cls):
    def train(seed):
        gen = torch.Generator().manual_seed(seed)
        params = [nn.Parameter(torch.randn(s, generator=gen)) for s in ((300, 17), (4099,), (1,))]
        opt = cls(params, lr=1e-2, weight_decay=0.1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach() for p in params] + [
            v for p in params for v in opt.state[p].values() if torch.is_tensor(v)
        ]

    _check(train, [(s,) for s in range(THREADS)])


def test_large_output_cache_under_concurrency():
    # dequantize outputs of 32 MB and more come from the block cache; threads of different
    # sizes take and give back blocks at once, and every output must hold its own values.
    sizes = [(2048, 4096), (2048, 4096 + 256), (2304, 4096), (2048, 4096)]
    pairs = [_weight(n, k, i) for i, (n, k) in enumerate(sizes)]
    want = [qlora_ext.dequantize_4bit(p, s) for p, s in pairs]
    assert all(w.numel() * 4 >= 32 << 20 for w in want)

    def churn(i):
        p, s = pairs[i]
        for _ in range(6):
            a = qlora_ext.dequantize_4bit(p, s)
            b = qlora_ext.dequantize_4bit(p, s)  # two live blocks per thread
            if not (torch.equal(a, want[i]) and torch.equal(b, want[i])):
                return False
            a.fill_(float(i))  # a reused block must be overwritten, not handed out shared
            del a, b
        return True

    assert all(_concurrently(churn, [(i,) for i in range(THREADS)]))
