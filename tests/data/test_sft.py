"""User records, prompt/completion conversion, tokenization with completion-only labels, collation."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from targetsft.data.sft import (
    IGNORE_INDEX,
    DataCollatorForCompletion,
    load_records,
    read_jsonl,
    to_prompt_completion,
    tokenize_dataset,
    tokenize_record,
)

INSTR = "\nSolve it step by step and end your answer with '#### <number>'."
GSM = {
    "question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
    "solution": "Natalia sold 48/2 = 24 clips in May.\n48 + 24 = 72\n#### 72",
    "answer": "72",
}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------------------------- loading


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": }\n')
    with pytest.raises(ValueError) as ei:
        load_records(str(p))
    msg = str(ei.value)
    assert str(p) in msg and "line 3" in msg and "Expecting value" in msg
    p.write_text('{"prompt": "a", "completion": "b"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="line 2: expected a JSON object"):
        read_jsonl(p)


def test_a_gzip_compressed_jsonl_reads_as_the_plain_one(tmp_path):
    """A ``.jsonl.gz`` gives the records of its plain ``.jsonl``, read by either name; its errors name the line."""
    from targetsft.runtime.files import compress_file

    rows = [{"id": f"q{i}", "samples": [{"text": f"Ünï {i}\n#### {i}", "correct": i % 2 == 0}]} for i in range(50)]
    plain = _write_jsonl(tmp_path / "set.generations.jsonl", rows)
    assert read_jsonl(plain) == rows
    packed = compress_file(plain)
    assert not plain.exists() and read_jsonl(packed) == rows and read_jsonl(plain) == rows
    bad = _write_jsonl(tmp_path / "bad.jsonl", rows[:2])
    bad.write_text(bad.read_text() + "{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl\.gz: line 3: invalid JSON"):
        read_jsonl(compress_file(bad))


def test_record_without_known_fields(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"text": "x", "label": 1}])
    with pytest.raises(ValueError) as ei:
        load_records(p)
    assert "record 1" in str(ei.value) and "['label', 'text']" in str(ei.value)


def test_load_formats(tmp_path):
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    assert load_records(_write_jsonl(tmp_path / "a.jsonl", rows)) == rows
    (tmp_path / "b.json").write_text(json.dumps(rows))
    assert load_records(str(tmp_path / "b.json")) == rows
    (tmp_path / "c.json").write_text(json.dumps({"data": rows}))
    assert load_records(tmp_path / "c.json", size=1) == rows[:1]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert load_records(str(tmp_path / "d.parquet")) == rows
    assert load_records(rows) == rows
    with pytest.raises(FileNotFoundError):
        load_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "e.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_records(str(tmp_path / "e.txt"))


def test_load_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert load_records(str(tmp_path / "saved")) == rows
    folder = tmp_path / "files"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", [{"prompt": "a", "completion": "b"}])
    assert load_records(str(folder)) == [{"prompt": "a", "completion": "b"}]


@pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="needs reasoning-gym")
def test_gsm_train_builtin():
    rows = load_records("gsm-train", size=20, seed=5)
    assert len(rows) == 20 and rows[0]["seed"] >= 5
    pc = to_prompt_completion(rows[0])
    assert pc["prompt"] == [{"role": "user", "content": rows[0]["question"] + INSTR}]
    assert pc["completion"] == rows[0]["solution"]


# --------------------------------------------------------------------------------------------- conversion


def test_to_prompt_completion_formats():
    assert to_prompt_completion({"prompt": "p", "completion": "c"}) == {"prompt": "p", "completion": "c"}
    conv = {
        "prompt": [{"role": "user", "content": "hi"}],
        "completion": [{"role": "assistant", "content": "hello"}],
    }
    assert to_prompt_completion(conv) == {"prompt": [{"role": "user", "content": "hi"}], "completion": "hello"}
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": [{"type": "text", "text": "a2"}]},
    ]
    pc = to_prompt_completion({"messages": msgs, "id": "m1"})
    assert pc["completion"] == "a2" and pc["prompt"] == msgs[:4] and pc["id"] == "m1"
    gsm = to_prompt_completion(GSM)
    assert gsm["prompt"] == [{"role": "user", "content": GSM["question"] + INSTR}]
    assert gsm["completion"] == GSM["solution"] and gsm["answer"] == "72"
    hub = to_prompt_completion({"question": "q", "answer": "48/2 = <<48/2=24>>24\n#### 24"})
    assert hub["completion"] == "48/2 = 24\n#### 24" and hub["answer"] == "24"


@pytest.mark.parametrize(
    "rec,match",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                ]
            },
            "must end with an assistant turn",
        ),
        ({"prompt": "p", "completion": [{"role": "user", "content": "x"}]}, "one assistant message"),
        ({"prompt": 3, "completion": "c"}, "'prompt' must be"),
        ({"question": "q", "answer": "4"}, "needs a 'solution'"),
    ],
)
def test_bad_records(rec, match):
    with pytest.raises(ValueError, match=match):
        to_prompt_completion(rec, index=7)


# ------------------------------------------------------------------------------------------- tokenization


def _prompt_ids(tok, msgs):
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_labels_mask_exactly_the_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    item = tokenize_record(tok, GSM, max_length=4096)
    p = _prompt_ids(tok, [{"role": "user", "content": GSM["question"] + INSTR}])
    n = len(p)
    assert item["input_ids"][:n] == p
    assert item["labels"][:n] == [IGNORE_INDEX] * n
    assert all(t != IGNORE_INDEX for t in item["labels"][n:])
    assert item["labels"][n:] == item["input_ids"][n:]
    assert item["attention_mask"] == [1] * len(item["input_ids"])
    assert item["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(item["labels"][n:]) == GSM["solution"] + "<|im_end|>"
    assert tok.decode(item["input_ids"]).endswith("<|im_start|>assistant\n" + GSM["solution"] + "<|im_end|>")


def test_messages_loss_only_on_last_assistant_turn(tiny_tokenizer):
    tok = tiny_tokenizer
    msgs = [
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "second answer"},
    ]
    item = tokenize_record(tok, {"messages": msgs}, max_length=512)
    kept = [t for t in item["labels"] if t != IGNORE_INDEX]
    assert tok.decode(kept) == "second answer<|im_end|>"
    assert item["input_ids"][: len(item["input_ids"]) - len(kept)] == _prompt_ids(tok, msgs[:3])


def test_string_prompt_with_and_without_chat_template(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {"prompt": "What is 2+3?", "completion": " 5"}
    with_t = tokenize_record(tok, rec, 256)
    assert tok.decode(with_t["input_ids"]).startswith("<|im_start|>system")
    raw = tokenize_record(tok, rec, 256, chat_template=False)
    n = raw["labels"].count(IGNORE_INDEX)
    assert raw["input_ids"][:n] == tok("What is 2+3?")["input_ids"]  # prompt ids unchanged by the completion
    assert tok.decode(raw["labels"][n:]) == " 5<|im_end|>"
    # a completion that already ends with eos does not get a second one
    twice = tokenize_record(tok, {"prompt": "p", "completion": "c<|im_end|>"}, 256)
    assert twice["input_ids"].count(tok.eos_token_id) == tokenize_record(tok, {"prompt": "p", "completion": "c"}, 256)[
        "input_ids"
    ].count(tok.eos_token_id)


def test_separate_tokenization_at_the_boundary(tiny_tokenizer):
    # raw-text prompt ending mid-word: tokenizing prompt+completion together could merge across the boundary;
    # separate tokenization keeps the prompt ids exactly as generation would see them
    tok = tiny_tokenizer
    rec = {"prompt": "Natal", "completion": "ia sold clips"}
    item = tokenize_record(tok, rec, 256, chat_template=False)
    n = item["labels"].count(IGNORE_INDEX)
    assert item["input_ids"][:n] == tok("Natal")["input_ids"]
    assert tok.decode(item["input_ids"][n:]) == "ia sold clips<|im_end|>"


def test_truncate_and_drop_counts(tiny_tokenizer):
    tok = tiny_tokenizer
    full = tokenize_record(tok, GSM, 4096)
    n_prompt = full["labels"].count(IGNORE_INDEX)
    L = len(full["input_ids"])
    short = {"prompt": "hi", "completion": "ok"}
    recs = [GSM, short, GSM]
    max_len = L - 3
    items, counts = tokenize_dataset(tok, recs, max_len, overflow="truncate")
    assert counts == {"kept": 3, "truncated": 2, "dropped": 0}
    assert len(items[0]["input_ids"]) == max_len
    assert items[0]["input_ids"] == full["input_ids"][:max_len]
    assert items[0]["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert items[0]["input_ids"][-1] != tok.eos_token_id  # the eos is cut with the completion
    items, counts = tokenize_dataset(tok, recs, max_len, overflow="drop")
    assert counts == {"kept": 1, "truncated": 0, "dropped": 2} and len(items) == 1
    assert tokenize_record(tok, GSM, max_len, overflow="drop") is None
    # a prompt that fills max_length leaves nothing to learn: dropped even with "truncate"
    items, counts = tokenize_dataset(tok, [GSM], n_prompt, overflow="truncate")
    assert counts == {"kept": 0, "truncated": 0, "dropped": 1}
    items, counts = tokenize_dataset(tok, [GSM], n_prompt + 1, overflow="truncate")
    assert counts == {"kept": 1, "truncated": 1, "dropped": 0}
    assert sum(t != IGNORE_INDEX for t in items[0]["labels"]) == 1
    with pytest.raises(ValueError, match="overflow"):
        tokenize_record(tok, GSM, 100, overflow="cut")  # type: ignore[arg-type]


def test_tokenize_dataset_reports_bad_record_index(tiny_tokenizer):
    with pytest.raises(ValueError, match="record 1"):
        tokenize_dataset(tiny_tokenizer, [GSM, {"foo": 1}], 256)


# ---------------------------------------------------------------------------------------------- collation


def test_collator_pads_right_and_left(tiny_tokenizer):
    tok = tiny_tokenizer
    items, _ = tokenize_dataset(tok, [GSM, {"prompt": "hi", "completion": "ok"}], 4096)
    coll = DataCollatorForCompletion.from_tokenizer(tok)
    batch = coll(items)
    n0, n1 = len(items[0]["input_ids"]), len(items[1]["input_ids"])
    assert batch["input_ids"].shape == (2, max(n0, n1)) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == [n0, n1]
    assert (batch["labels"][1, n1:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, n1:] == tok.pad_token_id).all()
    assert batch["labels"][0].tolist() == items[0]["labels"]
    left = DataCollatorForCompletion(tok.pad_token_id, padding_side="left", pad_to_multiple_of=8)(items)
    assert left["input_ids"].shape[1] % 8 == 0
    assert left["input_ids"][1, -n1:].tolist() == items[1]["input_ids"]
    assert left["attention_mask"][1, : left["input_ids"].shape[1] - n1].sum() == 0


def test_collated_batch_runs_through_tiny_llama(tiny_tokenizer, tiny_llama):
    items, _ = tokenize_dataset(tiny_tokenizer, [GSM, {"prompt": "hi", "completion": "ok"}], 4096)
    batch = DataCollatorForCompletion.from_tokenizer(tiny_tokenizer)(items)
    with torch.no_grad():
        out = tiny_llama(**batch)
    assert torch.isfinite(out.loss)
