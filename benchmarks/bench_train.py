"""One optimizer step of SmolLM2-135M-Instruct (batch 4 x seq 256, r=16 on every linear layer):
our QLoRA against PEFT LoRA on the fp32 model and PEFT LoRA over bitsandbytes 4-bit layers.

Each configuration runs in its own process, so its peak memory (RSS on the CPU,
max_memory_allocated on a GPU) is its own. Reports step time (median of the timed steps after
warm-up) and peak memory, with a breakdown into weights, adapters, optimizer state and the
rest (activations, gradients, workspace).

    python benchmarks/bench_train.py [--steps 3] [--device cpu]
    python benchmarks/bench_train.py --flow peft   # the transformers + PEFT flow, both ways

``--flow peft`` times the flow QLoRA users run: ``from_pretrained(quantization_config=...)``,
``prepare_model_for_kbit_training``, ``get_peft_model(LoraConfig(all-linear))``, with our
``QloraExtConfig`` against bitsandbytes' ``BitsAndBytesConfig`` (same model, batch and seed).
The model is SmolLM2-135M's weights, written once as a bf16 HF directory in benchmarks/out/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = ["qlora_ext", "peft_fp32", "peft_bnb"]
FLOW_CONFIGS = ["flow_qlora_ext", "flow_bnb"]
FLOW_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "smollm2-bf16")


def flow_model(config: str, dtype, device: str):
    """The transformers + PEFT flow on SmolLM2's weights, with our config or bitsandbytes'."""
    import peft
    import torch
    import transformers

    if not os.path.isfile(os.path.join(FLOW_DIR, "config.json")):
        from qlora_ext.loading import load_model

        m, t = load_model(None, torch.bfloat16, "cpu")
        # Loaded from GGUF (dequantized): saved as a plain bf16 checkpoint, not as "gguf".
        m.hf_quantizer.remove_quantization_config(m)
        m.save_pretrained(FLOW_DIR)
        t.save_pretrained(FLOW_DIR)
    if config == "flow_qlora_ext":
        import qlora_ext

        qc = qlora_ext.QloraExtConfig(compute_dtype=dtype)
    else:
        qc = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(
        FLOW_DIR, quantization_config=qc, dtype=dtype, device_map=device
    )
    tok = transformers.AutoTokenizer.from_pretrained(FLOW_DIR)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return peft.get_peft_model(model, lora), tok


def child(config: str, steps: int, device: str) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import resource

    import torch

    from qlora_ext.loading import load_model

    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if config.startswith("flow_"):
        model, tok = flow_model(config, dtype, device)
    else:
        model, tok = load_model(None, torch.float32, device)
    model.config.use_cache = False
    if config.startswith("flow_"):
        pass
    elif config == "qlora_ext":
        from qlora_ext import prepare_model

        model = prepare_model(
            model, r=16, alpha=32, dropout=0.05, compute_dtype=dtype, gradient_checkpointing=False
        )
    else:
        import peft

        if config == "peft_bnb":
            import bitsandbytes as bnb

            for name, mod in list(model.named_modules()):
                for cname, child_mod in list(mod.named_children()):
                    full = f"{name}.{cname}" if name else cname
                    if isinstance(child_mod, torch.nn.Linear) and "lm_head" not in full:
                        q = bnb.nn.Linear4bit(
                            child_mod.in_features,
                            child_mod.out_features,
                            bias=child_mod.bias is not None,
                            compute_dtype=dtype,
                            quant_type="nf4",
                            compress_statistics=True,
                        )
                        q.weight = bnb.nn.Params4bit(
                            child_mod.weight.data,
                            requires_grad=False,
                            quant_type="nf4",
                            blocksize=64,
                            compress_statistics=True,
                        )
                        setattr(mod, cname, q.to(device))
        for p in model.parameters():
            p.requires_grad_(False)
        model = peft.get_peft_model(
            model,
            peft.LoraConfig(
                r=16,
                lora_alpha=32,
                lora_dropout=0.05,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tok.vocab_size, (4, 256), generator=g).to(device)

    def weights_bytes():
        return sum(t.numel() * t.element_size() for t in model.state_dict().values())

    times = []
    for i in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step allocates the optimizer state and warms up
            times.append(time.perf_counter() - t)
    adapters = sum(p.numel() * p.element_size() for p in params)
    opt_state = sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    )
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    w = weights_bytes() - adapters
    return {
        "config": config,
        "step_s": statistics.median(times),
        "peak_bytes": peak,
        "weights_bytes": w,
        "adapter_bytes": adapters,
        "optimizer_bytes": opt_state,
        "other_bytes": peak - w - adapters - opt_state,
        "loss": loss.item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--flow", choices=["prepare_model", "peft"], default="prepare_model")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-results", action="store_true")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.steps, args.device)), flush=True)
        return
    from _common import markdown_table, write_json, write_section

    rows = []
    configs = FLOW_CONFIGS if args.flow == "peft" else CONFIGS
    for c in configs:
        p = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                c,
                "--steps",
                str(args.steps),
                "--device",
                args.device,
            ],
            capture_output=True,
            text=True,
        )
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"{c} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
            continue
        rows.append(json.loads(line[0][7:]))
        print(rows[-1], flush=True)
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    base = {r["config"]: r for r in rows}
    table = []
    for r in rows:
        ours = base.get(configs[0])
        rel = f"{r['step_s'] / ours['step_s']:.2f}x ours" if ours and r is not ours else "-"
        table.append(
            [
                r["config"],
                f"{r['step_s']:.2f}",
                rel,
                mib(r["peak_bytes"]),
                mib(r["weights_bytes"]),
                mib(r["adapter_bytes"]),
                mib(r["optimizer_bytes"]),
                mib(r["other_bytes"]),
            ]
        )
    md = markdown_table(
        [
            "config",
            "step s",
            "time vs ours",
            "peak MiB",
            "weights MiB",
            "adapters MiB",
            "optimizer MiB",
            "rest MiB",
        ],
        table,
    )
    print(md)
    write_json(args.json, rows)
    if not args.no_results:
        flow = args.flow == "peft"
        write_section(
            f"bench_train{':peft' if flow else ''}:{args.device}",
            f"One training step, SmolLM2-135M ({args.device})"
            + (", transformers + PEFT flow" if flow else ""),
            md,
            args.device,
            "batch 4 x seq 256, r=16 on every linear layer, AdamW; "
            "each configuration in its own process; peak = RSS high-water mark on CPU."
            + (
                " Both: from_pretrained(quantization_config=QloraExtConfig() or "
                "BitsAndBytesConfig(nf4, double quant)), prepare_model_for_kbit_training, "
                "get_peft_model(LoraConfig(all-linear))."
                if flow
                else ""
            ),
        )


if __name__ == "__main__":
    main()
