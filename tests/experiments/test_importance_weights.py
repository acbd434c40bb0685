"""iw-SFT's trajectory weights: the self-normalised ratio q(τ)/π_ref(τ), by hand and through the console script."""

from __future__ import annotations

import json
import math

import pytest

from targetsft.prep.importance_weights import trajectory_weights


def test_weights_by_hand():
    log_q = [[-1.0, -2.0], [-0.5], [-3.0, -3.0, -3.0]]
    log_ref = [[-1.5, -2.0], [-1.0], [-2.0, -2.0, -2.0]]
    w, r = trajectory_weights(log_q, log_ref, per_token=False)
    assert r == pytest.approx([0.5, 0.5, -3.0])
    assert w == pytest.approx([1.0, 1.0, math.exp(-3.5)])
    w, r = trajectory_weights(log_q, log_ref, per_token=True, min_weight=0.4)
    assert r == pytest.approx([0.25, 0.5, -1.0])
    assert w == pytest.approx([math.exp(-0.25), 1.0, 0.4])  # floored
    with pytest.raises(ValueError, match="same, non-zero number of tokens"):
        trajectory_weights([[-1.0]], [[-1.0, -2.0]], per_token=False)


def test_cli_writes_records_that_train_weighted(tmp_path, tiny_llama, tiny_tokenizer):
    """q = π_ref: every log-ratio is 0 and every weight 1; the records load as `weighted` training data."""
    from targetsft.cli import main
    from targetsft.training.config import load_config
    from targetsft.training.dataset import build_dataset

    model = tmp_path / "model"
    tiny_llama.save_pretrained(model)
    tiny_tokenizer.save_pretrained(model)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}?", "completion": f"#### {i}"}) + "\n" for i in range(4)))
    out = tmp_path / "iw.jsonl"
    common = [f"model={model}", f"data.train={data}", "data.max_length=1024"]
    assert main(["importance-weights", *common, "--target", str(model), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all(r["log_ratio"] == 0 and r["weight"] == 1 for r in rows)
    cfg = load_config(None, [f"model={model}", f"data.train={out}", "loss.method=weighted", "data.max_length=1024"])
    items, _ = build_dataset(cfg, tiny_tokenizer)
    assert all(w == 1 for it in items for w, y in zip(it["token_weights"], it["labels"]) if y != -100)
