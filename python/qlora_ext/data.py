"""Training data for the fine-tuning job: a built-in task generator and JSONL loading.

The built-in data is a deterministic generator of short instruction tasks whose answers can be
checked exactly (arithmetic word problems, unit conversions, string and list manipulations,
extracting fields into JSON). The same seed always gives the same examples; the train and eval
sets are drawn from disjoint seeds and are checked never to share a prompt, so held-out
exact-match accuracy measures generalisation, not recall.

User data is JSONL in one of three formats, detected from the first record and then required of
every line:

- alpaca: ``{"instruction": ..., "input": ... (optional), "output": ...}``
- chat:   ``{"messages": [{"role": "user" | "assistant" | "system", "content": ...}, ...]}``
- text:   ``{"text": ...}`` (plain language modelling: the loss covers every token)

Every malformed line is reported with its line number before any training starts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("alpaca", "chat", "text")


@dataclass(frozen=True)
class Example:
    """One instruction and its exact answer (for text data, prompt is empty)."""

    prompt: str
    answer: str
    task: str = "user"

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]


class DataError(ValueError):
    """A data file that cannot be used; the message lists every problem with its line."""


# ---------------------------------------------------------------- the built-in tasks
_NAMES = ["Maria", "Tom", "Aisha", "Kenji", "Lena", "Omar", "Sofia", "Ravi", "Chloe", "Diego"]
_CITIES = ["Lisbon", "Osaka", "Nairobi", "Oslo", "Lima", "Delhi", "Quebec", "Cairo", "Perth"]
_THINGS = ["apples", "books", "marbles", "stamps", "coins", "pencils", "shells", "cards"]
_WORDS = [
    "apple",
    "river",
    "planet",
    "garden",
    "silver",
    "window",
    "rocket",
    "forest",
    "candle",
    "bridge",
    "pencil",
    "orange",
    "marble",
    "dragon",
    "winter",
    "castle",
    "flower",
    "mirror",
]
_UNITS = [  # (from, to, factor)
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("liters", "milliliters", 1000),
    ("days", "hours", 24),
    ("weeks", "days", 7),
]


def _arithmetic(r: random.Random) -> Example:
    name, thing = r.choice(_NAMES), r.choice(_THINGS)
    a, b = r.randint(2, 60), r.randint(2, 40)
    kind = r.randrange(3)
    if kind == 0:
        q = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
        return Example(q, str(a + b), "arithmetic")
    if kind == 1:
        a, b = max(a, b), min(a, b)
        q = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?"
        return Example(q, str(a - b), "arithmetic")
    a, b = r.randint(2, 12), r.randint(2, 12)
    q = f"{name} buys {a} boxes with {b} {thing} in each box. How many {thing} is that in total?"
    return Example(q, str(a * b), "arithmetic")


def _conversion(r: random.Random) -> Example:
    src, dst, f = r.choice(_UNITS)
    n = r.randint(2, 250)
    return Example(
        f"Convert {n} {src} to {dst}. Answer with the number only.", str(n * f), "conversion"
    )


def _string(r: random.Random) -> Example:
    # One word or two: about 1,500 distinct phrases, so the train set never runs short.
    w = r.choice(_WORDS) if r.random() < 0.3 else " ".join(r.sample(_WORDS, 2))
    kind = r.randrange(3)
    if kind == 0:
        return Example(f"Reverse the letters of '{w}'.", w[::-1], "string")
    if kind == 1:
        return Example(f"Write '{w}' in uppercase.", w.upper(), "string")
    return Example(
        f"How many letters (not counting spaces) are in '{w}'?",
        str(len(w.replace(" ", ""))),
        "string",
    )


def _list(r: random.Random) -> Example:
    xs = r.sample(range(1, 60), r.randint(3, 5))
    s = ", ".join(map(str, xs))
    kind = r.randrange(3)
    if kind == 0:
        return Example(
            f"Sort these numbers from smallest to largest: {s}.",
            ", ".join(map(str, sorted(xs))),
            "list",
        )
    if kind == 1:
        return Example(f"What is the largest number in this list: {s}?", str(max(xs)), "list")
    return Example(f"Write this list in reverse order: {s}.", ", ".join(map(str, xs[::-1])), "list")


def _json(r: random.Random) -> Example:
    name, city, age = r.choice(_NAMES), r.choice(_CITIES), r.randint(18, 80)
    text = f"{name} is {age} years old and lives in {city}."
    q = (
        'Extract the name, age and city from this sentence as JSON with keys "name", "age" '
        f'and "city": {text}'
    )
    return Example(q, json.dumps({"name": name, "age": age, "city": city}), "json")


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "arithmetic": _arithmetic,
    "conversion": _conversion,
    "string": _string,
    "list": _list,
    "json": _json,
}


def builtin_tasks(n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> tuple[list, list]:
    """Deterministic (train, eval) lists of Examples, tasks in equal shares, never sharing a
    prompt. The eval set is drawn first from its own stream, then train skips its prompts."""
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0, got {n_train}, {n_eval}")
    names = list(TASKS)

    def draw(stream: random.Random, n: int, exclude: set[str]) -> list[Example]:
        out: list[Example] = []
        seen = set(exclude)
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 50 * (n + 10):
                raise ValueError(f"could not draw {n} distinct examples; ask for fewer")
            ex = TASKS[names[len(out) % len(names)]](stream)
            if ex.prompt not in seen:
                seen.add(ex.prompt)
                out.append(ex)
        return out

    eval_set = draw(random.Random(f"qlora-ext-eval-{seed}"), n_eval, set())
    train = draw(random.Random(f"qlora-ext-train-{seed}"), n_train, {e.prompt for e in eval_set})
    return train, eval_set


def exact_match(prediction: str, answer: str) -> bool:
    """Exact match after trimming whitespace and a trailing period (and, for JSON answers,
    comparing the parsed objects, so key order and spacing do not matter)."""
    p, a = prediction.strip().rstrip("."), answer.strip()
    if a.startswith("{"):
        try:
            return json.loads(p) == json.loads(a)
        except json.JSONDecodeError:
            return False
    return p == a


# ---------------------------------------------------------------- JSONL files
def detect_format(record: dict) -> str | None:
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def _check_record(rec, fmt: str) -> str | None:
    """Why `rec` is not a valid `fmt` record, or None."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    if fmt == "text":
        return (
            None
            if isinstance(rec.get("text"), str) and rec["text"]
            else "'text' must be a non-empty string"
        )
    if fmt == "alpaca":
        for k in ("instruction", "output"):
            if not isinstance(rec.get(k), str) or not rec[k].strip():
                return f"'{k}' must be a non-empty string"
        if "input" in rec and not isinstance(rec["input"], str):
            return "'input' must be a string"
        return None
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            return f"messages[{i}] needs a role of system, user or assistant"
        if not isinstance(m.get("content"), str):
            return f"messages[{i}].content must be a string"
    if msgs[-1]["role"] != "assistant":
        return "the last message must be the assistant's (the response to learn)"
    return None


def _to_example(rec: dict, fmt: str) -> Example | list[dict]:
    if fmt == "text":
        return Example("", rec["text"], "text")
    if fmt == "alpaca":
        prompt = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        return Example(prompt, rec["output"], "alpaca")
    return rec["messages"]


def load_jsonl(path: str | Path) -> tuple[str, list]:
    """Read a JSONL file: returns (format, records). Records are Examples, or message lists for
    chat data. Raises DataError listing every malformed line (up to 20) with its number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data: no such file: {path}")
    fmt: str | None = None
    records, problems = [], []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"line {lineno}: not valid JSON ({e.msg})")
                continue
            if fmt is None and isinstance(rec, dict):
                fmt = detect_format(rec)
                if fmt is None:
                    problems.append(
                        f"line {lineno}: cannot tell the format: expected 'messages' (chat), "
                        "'instruction' + 'output' (alpaca) or 'text'"
                    )
                    continue
            why = _check_record(rec, fmt or "text")
            if why:
                problems.append(f"line {lineno}: {why}")
            else:
                records.append(_to_example(rec, fmt))
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        kind = fmt or "unknown"
        raise DataError(
            f"{path}: {len(problems)} malformed line(s) ({kind} format):\n  {shown}{more}"
        )
    if not records:
        raise DataError(f"{path}: no records")
    return fmt, records


def split_train_eval(
    records: list, eval_fraction: float = 0.05, seed: int = 0
) -> tuple[list, list]:
    """A deterministic held-out split of user data (at least one eval record when possible)."""
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    n_eval = (
        min(len(records) - 1, max(1, round(eval_fraction * len(records))))
        if len(records) > 1
        else 0
    )
    ev = set(idx[:n_eval])
    return [r for i, r in enumerate(records) if i not in ev], [records[i] for i in sorted(ev)]


# ---------------------------------------------------------------- tokenization
@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken (the prompt)
    # Set on packed rows only (restarting at 0 at each example); None means 0, 1, 2, ...
    position_ids: list[int] | None = None


def tokenize(tokenizer, item: Example | list[dict], max_len: int) -> Tokenized:
    """Token ids and labels with the loss on the response only, through the model's chat
    template; text examples take the loss on every token."""
    if isinstance(item, Example) and item.task == "text":
        ids = tokenizer(item.answer, add_special_tokens=True)["input_ids"][:max_len]
        return Tokenized(ids, list(ids))
    msgs = item.messages() if isinstance(item, Example) else item[:-1]
    response = item.answer if isinstance(item, Example) else item[-1]["content"]
    # Render, then tokenize: apply_chat_template(tokenize=True) returns ids in some versions
    # of transformers and a BatchEncoding in others.
    prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    end = tokenizer.eos_token or ""
    resp_ids = tokenizer(response + end, add_special_tokens=False)["input_ids"]
    ids = (list(prompt_ids) + resp_ids)[:max_len]
    labels = ([-100] * len(prompt_ids) + resp_ids)[:max_len]
    return Tokenized(ids, labels)


def _append_segment(row: Tokenized, ids: list[int], labels: list[int]) -> None:
    row.input_ids += ids
    # The first token's label would be predicted from the previous segment's last token.
    row.labels += [-100] + labels[1:]
    row.position_ids += list(range(len(ids)))


def pack_rows(items: Iterable[Tokenized], seq_len: int, pad_id: int) -> list[Tokenized]:
    """Examples back to back in rows of exactly seq_len tokens, each row with position_ids
    that restart at 0 where an example starts, and label -100 on every example's first token.

    The position restarts are what transformers (given position_ids and attention_mask=None)
    reads to build a block-diagonal causal mask, so no example attends to another; see
    packed_batch. An example that does not fit at the end of a row is split, and its
    remainder opens the next row with positions from 0 again: it is trained as a sequence of
    its own, without the context of its first part. This is the simplest choice that keeps the
    rows full and every token used once; continuing the positions instead would be wrong, since
    the context they imply is not in the row. The last row is filled with pad tokens, which
    form a segment of their own (so nothing attends to them) and take no loss. Rows left with
    no loss token at all are dropped.
    """
    rows: list[Tokenized] = []
    row = Tokenized([], [], [])
    for it in items:
        start = 0
        while start < len(it.input_ids):
            end = min(len(it.input_ids), start + seq_len - len(row.input_ids))
            _append_segment(row, it.input_ids[start:end], it.labels[start:end])
            start = end
            if len(row.input_ids) == seq_len:
                rows.append(row)
                row = Tokenized([], [], [])
    if row.input_ids:
        fill = seq_len - len(row.input_ids)
        _append_segment(row, [pad_id] * fill, [-100] * fill)
        rows.append(row)
    # A row without a loss token teaches nothing, and a micro-batch of only such rows would make
    # the mean loss 0/0 (NaN gradients).
    return [r for r in rows if any(lab != -100 for lab in r.labels)]


def packed_batch(rows: list[Tokenized]) -> tuple[list, list, list]:
    """(input_ids, labels, position_ids) of rows from pack_rows. There is no attention mask on
    purpose: the model must get attention_mask=None (and no KV cache), or transformers ignores
    the position restarts and lets examples attend to each other."""
    return (
        [r.input_ids for r in rows],
        [r.labels for r in rows],
        [r.position_ids for r in rows],
    )


def batches(
    items: Iterable[Tokenized],
    batch_size: int,
    pad_id: int,
    pack: bool = False,
    seq_len: int | None = None,
):
    """Padding yields (input_ids, labels, attention_mask) lists of lists, each batch padded to
    its longest sequence. Packing yields (input_ids, labels, position_ids) of pack_rows rows of
    exactly seq_len tokens (see packed_batch for how the model must take them)."""
    items = list(items)
    if pack:
        if not seq_len:
            raise ValueError("packing needs seq_len")
        rows = pack_rows(items, seq_len, pad_id)
        for i in range(0, len(rows), batch_size):
            yield packed_batch(rows[i : i + batch_size])
        return
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        width = max(len(c.input_ids) for c in chunk)
        yield (
            [c.input_ids + [pad_id] * (width - len(c.input_ids)) for c in chunk],
            [c.labels + [-100] * (width - len(c.labels)) for c in chunk],
            [[1] * len(c.input_ids) + [0] * (width - len(c.input_ids)) for c in chunk],
        )
