"""``target-sft mark-critical``: a token is critical when every alternative rollout is wrong; the flags are one per
completion token and train ``critical`` as they are."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from targetsft.prep import critical_tokens as C  # noqa: E402
from targetsft.training.dataset import build_dataset  # noqa: E402

RECORD = {"question": "Tom has 3 apples and buys 4 more. How many?", "solution": "3 + 4 = 7\n#### 7", "answer": "7"}


def _fake_rollouts(monkeypatch, correct_when):
    """Rollouts that end right (``#### 7``) when ``correct_when(i, prefix)`` (i: the rollout's index in the call),
    else wrong; records the prefixes."""
    from targetsft.evaluation import engines as generation
    from targetsft.evaluation.engines import Generation, GenerationRun

    seen = []

    def fake(model, tokenizer, prompts, **kw):
        seen.extend(prompts)
        outs = [
            [Generation(" #### 7" if correct_when(i, p) else " #### 0", 1, "answer")] for i, p in enumerate(prompts)
        ]
        return GenerationRun(outs, 0.0, 1, 1, len(prompts), {})

    monkeypatch.setattr(generation, "generate_detailed", fake)
    return seen


def test_a_token_is_critical_when_every_alternative_fails(monkeypatch, tiny_llama, tiny_tokenizer):
    record = C.mark_record(tiny_llama, tiny_tokenizer, RECORD, alternatives=2)
    n = len(record["token_weights"])
    digits = C._examined(tiny_tokenizer, _completion(tiny_tokenizer), "numbers")
    assert record["examined"] == len(digits) > 0 and record["rollouts"] == 2 * len(digits)
    seen = _fake_rollouts(monkeypatch, lambda i, prefix: False)  # every alternative goes wrong: all examined critical
    wrong = C.mark_record(tiny_llama, tiny_tokenizer, RECORD, alternatives=2)
    assert [k for k in range(n) if wrong["token_weights"][k]] == digits and len(seen) == 2 * len(digits)
    _fake_rollouts(monkeypatch, lambda i, prefix: True)  # some alternative always works: nothing is critical
    assert sum(C.mark_record(tiny_llama, tiny_tokenizer, RECORD)["token_weights"]) == 0
    _fake_rollouts(monkeypatch, lambda i, prefix: i % 2 == 0)  # only the first of the 2 alternatives works
    assert sum(C.mark_record(tiny_llama, tiny_tokenizer, RECORD, positions="all")["token_weights"]) == 0
    _fake_rollouts(monkeypatch, lambda i, prefix: i % 2 == 1)  # only the second
    assert sum(C.mark_record(tiny_llama, tiny_tokenizer, RECORD, positions="all")["token_weights"]) == 0


def _completion(tokenizer):
    from targetsft.data.sft import tokenize_record

    item = tokenize_record(tokenizer, RECORD, 1 << 30)
    return [i for i, label in zip(item["input_ids"], item["labels"]) if label != -100]


def test_marked_records_train_critical(tmp_path, monkeypatch, tiny_llama, tiny_tokenizer):
    """The written records load as training data for ``critical``: flags aligned one per completion token."""
    from targetsft.training.config import load_config

    _fake_rollouts(monkeypatch, lambda i, prefix: i % 3 == 0)
    marked = [C.mark_record(tiny_llama, tiny_tokenizer, RECORD) for _ in range(2)]
    path = tmp_path / "critical.jsonl"
    path.write_text("".join(json.dumps(m) + "\n" for m in marked))
    model = tmp_path / "model"
    tiny_llama.save_pretrained(model)
    tiny_tokenizer.save_pretrained(model)
    cfg = load_config(None, [f"model={model}", f"data.train={path}", "loss.method=critical", "data.max_length=1024"])
    items, counts = build_dataset(cfg, tiny_tokenizer)
    assert counts["kept"] == 2
    for item, m in zip(items, marked, strict=True):
        supervised = [w for w, label in zip(item["token_weights"], item["labels"]) if label != -100]
        assert supervised == m["token_weights"]
