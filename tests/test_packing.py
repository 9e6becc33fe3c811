"""--packing: packed rows restart position_ids at every example and mask the label of every
example's first token; through a Llama (plain, prepared for QLoRA, or with PEFT), a packed
batch gives each example exactly the logits and loss it gets on its own, and the check fails
when the model is fed the rows any other way; the fine-tuning job trains on packed rows."""

import json
import math
import random

import pytest
import torch
from tiny_llama import VOCAB, tiny_llama

import qlora_ext
from qlora_ext import data, train

T = data.Tokenized


def test_pack_rows_restarts_positions_and_masks_boundary_labels():
    a = T([1, 2, 3], [-100, 2, 3])
    b = T([4, 5, 6, 7], [-100, -100, 6, 7])
    c = T([8, 9], [8, 9])
    rows = data.pack_rows([a, b, c], seq_len=5, pad_id=0)
    assert [r.input_ids for r in rows] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    # b does not fit: its remainder opens the next row as a sequence of its own; the pad tail
    # is a segment too.
    assert [r.position_ids for r in rows] == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 0]]
    # c's first token (8) had a label: it is dropped, as 8 would be predicted from b's 7.
    assert [r.labels for r in rows] == [[-100, 2, 3, -100, -100], [-100, 7, -100, 9, -100]]
    ids, labels, pos = next(data.batches([a, b, c], 2, pad_id=0, pack=True, seq_len=5))
    assert ids == [r.input_ids for r in rows]
    assert labels == [r.labels for r in rows]
    assert pos == [r.position_ids for r in rows]
    # A row with nothing to learn is dropped (a batch of such rows has a 0/0 mean loss).
    prompt_only = T([1, 2, 3, 4, 5], [-100] * 5)
    assert data.pack_rows([prompt_only, c], seq_len=5, pad_id=0) == [
        T([8, 9, 0, 0, 0], [-100, 9, -100, -100, -100], [0, 1, 0, 1, 2])
    ]


@pytest.mark.parametrize("seed", range(20))
def test_pack_rows_keeps_every_token_once_and_never_predicts_across_examples(seed):
    r = random.Random(seed)
    seq_len = r.randint(4, 24)
    items = []
    for _ in range(r.randint(1, 12)):  # a masked prompt, then learned tokens, as in real data
        n = r.randint(2, seq_len)
        ids = [r.randint(1, 99) for _ in range(n)]
        prompt = r.randint(0, n - 1)
        items.append(T(ids, [-100] * prompt + ids[prompt:]))
    rows = data.pack_rows(items, seq_len, pad_id=0)
    assert all(len(x.input_ids) == len(x.labels) == len(x.position_ids) == seq_len for x in rows)
    ids = [t for x in rows for t in x.input_ids]
    labels = [lab for x in rows for lab in x.labels]
    pos = [p for x in rows for p in x.position_ids]
    for k, p in enumerate(pos):  # positions restart at 0 (always at a row start) or count up
        assert p == 0 if k % seq_len == 0 else p in (0, pos[k - 1] + 1)
        assert p != 0 or labels[k] == -100  # a segment's first token is never a target
    total = sum(len(x.input_ids) for x in items)
    if len(rows) < math.ceil(total / seq_len):
        return  # a row with nothing to learn was dropped
    assert ids[total:] == [0] * (len(ids) - total)  # only the last row's tail is padding
    assert ids[:total] == [t for x in items for t in x.input_ids]
    # Segments are exactly the examples, cut where a row ends.
    example_starts = [sum(len(x.input_ids) for x in items[:i]) for i in range(len(items))]
    boundaries = set(example_starts) | set(range(0, total, seq_len))
    assert {k for k in range(total) if pos[k] == 0} == boundaries
    original = [lab for x in items for lab in x.labels]
    assert labels[:total] == [-100 if k in boundaries else original[k] for k in range(total)]


# ---------------------------------------------------------------- through the model
LENGTHS = [5, 7, 4, 8, 6]  # seq_len 12: rows [5 + 7], [4 + 8], [6 + 6 pad]
STARTS = [(0, 0), (0, 5), (1, 0), (1, 4), (2, 0)]  # (row, column) of each example


def _examples():
    g = torch.Generator().manual_seed(3)
    out = []
    for n in LENGTHS:
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        out.append(T(ids, list(ids)))  # loss on every token, as for text data
    return out


def _model(kind: str, attn: str):
    model = tiny_llama()
    model.set_attn_implementation(attn)
    if kind == "peft":  # the --quant-type none baseline: PEFT must pass position_ids through
        peft = pytest.importorskip("peft")
        cfg = peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        model = peft.get_peft_model(model, cfg)
    if kind == "qlora":
        model = qlora_ext.prepare_model(
            model, r=4, dropout=0.0, compute_dtype=torch.float32, gradient_checkpointing=False
        )
        with torch.no_grad():  # a non-zero adapter, so the LoRA path changes the logits
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)
    return model.eval()


def _packed_and_solo(model, inputs, examples):
    """Per example: (its logits inside the packed batch, its logits run on its own)."""
    with torch.no_grad():
        packed = model(**inputs).logits
        out = []
        for ex, (row, col) in zip(examples, STARTS, strict=True):
            solo = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            out.append((packed[row, col : col + len(ex.input_ids)], solo))
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["hf", "qlora", "peft"])
def test_packed_batch_gives_each_example_its_own_logits_and_loss(kind, attn):
    model, examples = _model(kind, attn), _examples()
    rows = data.pack_rows(examples, seq_len=12, pad_id=0)
    assert len(rows) == 3
    inputs = train._train_inputs(rows, packed=True, pad_id=0, device="cpu")
    for packed, solo in _packed_and_solo(model, inputs, examples):
        torch.testing.assert_close(packed, solo, atol=1e-5, rtol=1e-5)
    # The packed loss is the token-weighted mean of the examples' own losses: no loss term
    # predicts an example's first token from the example before it.
    packed_loss, expected = _packed_and_expected_loss(model, inputs, examples)
    assert math.isclose(packed_loss, expected, rel_tol=1e-5)


def _packed_and_expected_loss(model, inputs, examples):
    """The packed batch's loss, and the token-weighted mean of each example's own loss."""
    with torch.no_grad():
        packed_loss = model(**inputs).loss.item()
        solo = [
            model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss
            for e in examples
        ]
    n = [len(e.input_ids) - 1 for e in examples]
    return packed_loss, sum(s.item() * k for s, k in zip(solo, n, strict=True)) / sum(n)


@pytest.mark.parametrize(
    "wrong", ["no position_ids", "an all-ones attention mask", "a KV cache", "boundary labels"]
)
def test_the_packed_check_fails_when_packing_is_done_wrong(wrong):
    model, examples = _model("hf", "sdpa"), _examples()
    rows = data.pack_rows(examples, seq_len=12, pad_id=0)
    inputs = train._train_inputs(rows, packed=True, pad_id=0, device="cpu")
    if wrong == "boundary labels":  # the label of each second example's first token kept
        for row, col in STARTS[1::2]:
            inputs["labels"][row, col] = inputs["input_ids"][row, col]
        packed_loss, expected = _packed_and_expected_loss(model, inputs, examples)
        assert not math.isclose(packed_loss, expected, rel_tol=1e-5)
        return
    if wrong == "no position_ids":
        del inputs["position_ids"]
    elif wrong == "an all-ones attention mask":
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    else:
        inputs["use_cache"] = True
    pairs = _packed_and_solo(model, inputs, examples)
    # An example that opens its row sees only itself either way; the ones after it do not.
    for i, (packed, solo) in enumerate(pairs):
        diff = (packed - solo).abs().max().item()
        assert diff > 1e-3 if STARTS[i][1] > 0 else diff < 1e-5, (i, diff)


# ---------------------------------------------------------------- the fine-tuning job
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    pytest.importorskip("peft")
    from tiny_hf_model import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("quant_type", ["nf4", "none"])
def test_finetune_with_packing_trains_on_packed_rows(tiny_dir, tmp_path, monkeypatch, quant_type):
    from qlora_ext import cli

    seen = []
    real = train._train_inputs

    def spy(rows, packed, pad_id, device):
        inputs = real(rows, packed, pad_id, device)
        seen.append(inputs)
        return inputs

    monkeypatch.setattr(train, "_train_inputs", spy)
    out = tmp_path / "run"
    args = ["finetune", "--model", tiny_dir, "--output-dir", str(out), "--packing"]
    args += ["--steps", "6", "--train-size", "40", "--eval-size", "3", "--batch-size", "2"]
    args += ["--seq-len", "256", "--lr", "3e-3", "--r", "4", "--alpha", "8"]
    args += ["--quant-type", quant_type]
    assert cli.main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["packing"] and len(s["history"]["loss"]) == 6
    assert all(math.isfinite(x) for x in s["history"]["loss"])
    assert s["after"]["loss"] < s["before"]["loss"]
    assert len(seen) == 6
    for inputs in seen:
        assert inputs["attention_mask"] is None and inputs["use_cache"] is False
        pos = inputs["position_ids"]
        assert pos.shape == inputs["input_ids"].shape == (2, 256)
        assert (pos[:, 1:] == 0).any(dim=1).all()  # several examples in every row
        starts = pos == 0
        assert (inputs["labels"][starts] == -100).all()


def test_finetune_refuses_fewer_packed_rows_than_a_batch(tiny_dir, tmp_path, capsys):
    """Four short examples fill one row of 1024 tokens: no batch of 4 rows can be drawn, which
    would otherwise loop forever."""
    from qlora_ext import cli

    args = ["finetune", "--model", tiny_dir, "--output-dir", str(tmp_path / "x"), "--packing"]
    args += ["--train-size", "4", "--eval-size", "2", "--batch-size", "4", "--seq-len", "1024"]
    assert cli.main(args) == 2
    assert "fewer than --batch-size 4" in capsys.readouterr().err
