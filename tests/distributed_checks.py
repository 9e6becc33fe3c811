"""What tests/distributed_worker.py checks inside each rank: that every 4-bit layer computes
with exactly the bytes it was built with (a forward pre-hook, so what is checked is what the
kernels read after FSDP2's all-gather and mixed-precision cast), how many frozen 4-bit bytes a
rank holds, what DDP sends after its construction, the errors of configurations that cannot
work, and a model from the transformers loading path."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from qlora_ext.nn import Linear4bit

_STATE = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset")


def _typed_state(m: Linear4bit) -> dict[str, torch.Tensor]:
    # The packed weight and every tensor of the state, as the kernels read them.
    d = {k: v for k, v in m.quant_state.as_dict().items() if isinstance(v, torch.Tensor)}
    d["weight"] = m.weight
    if m.nested_offset is not None:
        d["nested_offset"] = m.quant_state.offset
    return {k: v.detach().clone() for k, v in d.items()}


class StateWatch:
    """Snapshots every 4-bit layer's packed weight and state before any wrapping, then checks
    at each of their forwards that they are the same dtype and the same bits."""

    def __init__(self, model: nn.Module):
        # PEFT's fused layer computes with its base Linear4bit's tensors without calling it,
        # so the hook goes on the module whose forward runs: the wrapper where there is one.
        self.layers = {}
        for n, m in model.named_modules():
            base = m.get_base_layer() if hasattr(m, "get_base_layer") else m
            if isinstance(base, Linear4bit) and not any(base is b for b, _ in self.layers.values()):
                self.layers[n] = (base, m)
        self.ref = {n: _typed_state(base) for n, (base, _) in self.layers.items()}
        self.checked, self.mismatches = 0, []
        for name, (base, m) in self.layers.items():
            m.register_forward_pre_hook(self._hook(name, base))

    def _hook(self, name, base):
        def check(module, args):
            got = _typed_state(base)
            for k, ref in self.ref[name].items():
                t = got.get(k)
                if t is None:
                    self.mismatches.append(f"{name}.{k}: missing")
                elif t.dtype != ref.dtype or t.shape != ref.shape:
                    self.mismatches.append(f"{name}.{k}: {t.dtype} {tuple(t.shape)}")
                elif not torch.equal(t, ref):
                    diff = int((t != ref).sum())
                    self.mismatches.append(f"{name}.{k}: {diff} of {t.numel()} values differ")
            self.checked += 1

        return check


def _local_bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t  # an FSDP2 DTensor holds one shard
    return t.numel() * t.element_size()


def frozen_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes this rank holds, bytes of the whole) of every 4-bit layer's packed weight and
    quantization state, parameters or buffers."""
    local = total = 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            for t in [m.weight] + [getattr(m, n) for n in _STATE]:
                if t is not None:
                    local += _local_bytes(t)
                    total += t.numel() * t.element_size()  # a DTensor's numel is the whole
    return local, total


def all_ranks(value: int) -> list[int]:
    t = torch.tensor([value], dtype=torch.int64)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [int(x) for x in out]


class CommRecorder:
    """Records every tensor DDP communicates after its construction: the gradient buckets
    (through a comm hook, naming their parameters) and any collective called through
    torch.distributed's Python API (the buffer broadcast goes through _broadcast_coalesced).
    """

    OPS = ("all_reduce", "broadcast", "_broadcast_coalesced", "all_gather", "reduce_scatter")

    def __init__(self, net, model: nn.Module, frozen_ptrs: set[int]):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self.names = {id(p): n for n, p in model.named_parameters()}
        self.frozen_ptrs, self.bucket_params, self.frozen_sent = frozen_ptrs, [], []
        self.calls = {op: 0 for op in self.OPS}
        self.bucket_numel = 0

        def hook(state, bucket):
            self.bucket_params += [self.names[id(p)] for p in bucket.parameters()]
            self.bucket_numel += bucket.buffer().numel()
            return default_hooks.allreduce_hook(state, bucket)

        net.register_comm_hook(None, hook)
        self.originals = {op: getattr(dist, op) for op in self.OPS}
        for op in self.OPS:
            self._patch(op)

    def undo(self) -> None:
        for op, orig in self.originals.items():
            setattr(dist, op, orig)

    def _patch(self, op):
        orig = self.originals[op]

        def recorded(*args, **kwargs):
            self.calls[op] += 1
            for t in _tensors(args) + _tensors(list(kwargs.values())):
                if t.untyped_storage().data_ptr() in self.frozen_ptrs or t.dtype == torch.uint8:
                    self.frozen_sent.append(f"{op}: {t.dtype} {tuple(t.shape)}")
            return orig(*args, **kwargs)

        setattr(dist, op, recorded)


def _tensors(xs) -> list[torch.Tensor]:
    out = []
    for x in xs:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            out += _tensors(x)
    return out


def storage_ptrs(model: nn.Module) -> set[int]:
    ptrs = set()
    for m in model.modules():
        if isinstance(m, Linear4bit):
            for t in [m.weight] + [getattr(m, n) for n in _STATE]:
                if t is not None:
                    ptrs.add(t.untyped_storage().data_ptr())
    return ptrs


# -- errors and corner cases (FSDP2 launches only) ----------------------------------------------
def _raises(fn, match: str) -> str:
    try:
        fn()
    except RuntimeError as e:
        msg = str(e)
        return "ok" if match in msg else f"wrong message: {msg}"
    return "no error"


def error_checks(rank: int, world: int) -> dict[str, str]:
    """Each configuration that cannot work, and the error it must give ("ok" when it does)."""
    from torch.distributed.fsdp import fully_shard

    from qlora_ext.distributed import fully_shard_model, make_fsdp2_shardable

    out = {}
    # Sharded first, made shardable after: the state could not join the sharded weight.
    net = nn.Sequential(Linear4bit(64, 8, bias=False))
    fully_shard(net)
    out["shardable_after_fully_shard"] = _raises(
        lambda: make_fsdp2_shardable(net), "make_fsdp2_shardable(model) before fully_shard"
    )
    # A 4-bit layer called outside the forward of the unit that gathers it.
    torch.manual_seed(0)
    blocks = nn.Sequential(
        nn.Sequential(Linear4bit(64, 64, bias=False)), nn.Sequential(Linear4bit(64, 8))
    )
    fully_shard_model(blocks)
    x = torch.randn(2, 64)
    out["outside_unit_forward"] = _raises(
        lambda: blocks[0][0](x), "Linear4bit '0.0': its weight is a sharded DTensor"
    )
    # state_dict() of a sharded model gathers the 4-bit layers: the keys and bits of the
    # unsharded one (a collective, as any full state_dict); loading a 4-bit weight into a
    # sharded layer is refused (FSDP2 would go on gathering its own shards over it).
    torch.manual_seed(0)
    small = nn.Sequential(nn.Sequential(Linear4bit(64, 24)), nn.Sequential(Linear4bit(64, 8)))
    ref = {k: v.clone() for k, v in small.state_dict().items()}
    fully_shard_model(small)
    sd = {
        k: v.full_tensor() if hasattr(v, "full_tensor") else v
        for k, v in small.state_dict().items()
    }
    same = list(sd) == list(ref) and all(
        sd[k].dtype == v.dtype and torch.equal(sd[k], v) for k, v in ref.items()
    )
    out["state_dict_of_sharded"] = "ok" if same else f"differs: {sorted(set(sd) ^ set(ref))}"
    out["load_into_sharded"] = _raises(
        lambda: small.load_state_dict(ref), "0.0.weight: this 4-bit layer is sharded by fully_shard"
    )
    # A rank's shard of the state (as if the state had been left out of the gather) next to a
    # whole packed weight: the sizes disagree.
    layer = make_fsdp2_shardable(Linear4bit(64, 8, bias=False))
    half = layer.absmax.detach().chunk(world)[rank].clone()
    layer.absmax = nn.Parameter(half, requires_grad=False)
    out["state_not_gathered"] = _raises(lambda: layer(x), "its absmax has")
    return out


def layer_sharding_checks(world: int) -> dict[str, bool]:
    """fully_shard on single 4-bit layers with uneven dim-0 sizes (3 rows: 3 absmax bytes,
    12 without double quantization, over 2 ranks), one unit each: they must compute what the
    unsharded layer does, to the bit."""
    from qlora_ext.distributed import fully_shard_model

    results = {}
    for dq in (True, False):
        torch.manual_seed(1)
        layer = Linear4bit(64, 3, double_quant=dq, compute_dtype=torch.float32)
        x = torch.randn(4, 64)
        want = layer(x)
        sharded = fully_shard_model(copy.deepcopy(layer))
        results[f"double_quant={dq}"] = bool(torch.equal(sharded(x), want))
    return results


def hf_path_check(hf_dir: str, rank: int, world: int) -> dict:
    """A model from from_pretrained(quantization_config=QloraExtConfig()) + PEFT, sharded with
    fully_shard_model: its loss on the global batch (each rank's mean of its half, averaged)
    equals the unsharded model's in this process, and each rank holds half its frozen bytes."""
    import peft
    import transformers

    import qlora_ext
    from qlora_ext.distributed import fully_shard_model

    cfg = qlora_ext.QloraExtConfig(compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, quantization_config=cfg, dtype=torch.float32, device_map="cpu"
    )
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    model = peft.get_peft_model(model, lora)
    ids = torch.randint(0, 100, (2 * world, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = float(model(input_ids=ids, labels=ids).loss)
    bytes_full = frozen_bytes(model)[1]
    watch = StateWatch(model)
    fully_shard_model(model)
    loss = model(input_ids=ids.chunk(world)[rank], labels=ids.chunk(world)[rank]).loss
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    lora_grads = [
        p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_" in n
    ]
    return dict(
        loss=float(mean) / world,
        ref_loss=ref,
        bytes_per_rank=all_ranks(frozen_bytes(model)[0]),
        bytes_total=bytes_full,
        lora_grads=all(lora_grads) and len(lora_grads) > 0,
        state_checked=watch.checked,
        state_mismatches=watch.mismatches,
    )
