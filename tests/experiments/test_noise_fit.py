"""Noise fit: the corrupted/clean pairs are the run's corrupted training examples, the tail log-probabilities match
an independent computation, the summary's math, and the CLI's files and errors."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from targetsft.cli.tools import add_noise_fit_arguments, run_noise_fit_from_args  # noqa: E402
from targetsft.data.noise import corrupt_records  # noqa: E402
from targetsft.data.sft import load_records  # noqa: E402
from targetsft.experiments.noise_fit import corrupted_pairs, noise_fit_summary, tail_logprobs  # noqa: E402
from targetsft.runtime.inputs import InputError  # noqa: E402
from targetsft.training.config import config_from_dict  # noqa: E402

DATA = {"train": "gsm-train", "size": 12, "seed": 3, "max_length": 1024, "label_noise": 0.5}


@pytest.fixture(scope="module")
def pairs(tiny_tokenizer):
    cfg = config_from_dict({"data": DATA})
    return corrupted_pairs(cfg, tiny_tokenizer)


def test_pairs_are_the_corrupted_examples(pairs, tiny_tokenizer):
    got, skipped = pairs
    records = load_records("gsm-train", size=12, seed=3)
    noisy, chosen = corrupt_records(records, 0.5, "answer", 3)
    assert skipped == 0 and [p["index"] for p in got] == chosen and len(chosen) == 6
    for p in got:
        eos = tiny_tokenizer.eos_token
        assert tiny_tokenizer.decode(p["wrong"]["input_ids"]).endswith(f"#### {noisy[p['index']]['answer']}{eos}")
        assert tiny_tokenizer.decode(p["true"]["input_ids"]).endswith(f"#### {records[p['index']]['answer']}{eos}")
        wrong, true = p["wrong"]["input_ids"], p["true"]["input_ids"]
        assert wrong != true and wrong[-1] == true[-1] == tiny_tokenizer.eos_token_id
        prompt = p["true"]["labels"].index(next(x for x in p["true"]["labels"] if x != -100))
        assert wrong[:prompt] == true[:prompt]  # same prompt: only the completion differs


def test_limit_and_clean_data(tiny_tokenizer):
    cfg = config_from_dict({"data": DATA})
    assert len(corrupted_pairs(cfg, tiny_tokenizer, limit=2)[0]) == 2
    with pytest.raises(ValueError, match="clean data"):
        corrupted_pairs(config_from_dict({"data": {**DATA, "label_noise": 0.0}}), tiny_tokenizer)


def test_truncated_examples_are_skipped(tiny_tokenizer):
    cfg = config_from_dict({"data": {**DATA, "max_length": 80}})
    got, skipped = corrupted_pairs(cfg, tiny_tokenizer)
    assert skipped == 6 and got == []


def _tail_reference(model, seq: list[int], c: int) -> float:
    """Σ_{t ≥ c} log p(seq[t] | seq[:t]) in float64, from the full log-softmax."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
    return sum(float(logp[t - 1, seq[t]]) for t in range(c, len(seq)))


def test_tail_logprobs_match_an_independent_sum(pairs, tiny_llama):
    mode = tiny_llama.training
    got = tail_logprobs(tiny_llama, pairs[0])
    assert tiny_llama.training is mode  # the model's mode is restored
    for p, (w, t) in zip(pairs[0], got, strict=True):
        a, b = p["wrong"]["input_ids"], p["true"]["input_ids"]
        c = next(k for k, (x, y) in enumerate(zip(a, b)) if x != y)
        assert w == pytest.approx(_tail_reference(tiny_llama, a, c), abs=1e-4)
        assert t == pytest.approx(_tail_reference(tiny_llama, b, c), abs=1e-4)
        assert w < 0 and t < 0


def test_summary_math():
    s = noise_fit_summary([(-1.0, -3.0), (-4.0, -2.0), (-2.0, -2.0)])
    assert s["n"] == 3
    assert s["logp_wrong"] == pytest.approx(-7 / 3) and s["logp_true"] == pytest.approx(-7 / 3)
    assert s["delta"] == pytest.approx(0.0) and s["delta_lo"] < 0 < s["delta_hi"]
    assert s["prefer_wrong"] == pytest.approx(1 / 3)  # Δ = 2, −2, 0: only Δ > 0 counts
    sig = [1 / (1 + math.exp(-d)) for d in (2.0, -2.0, 0.0)]
    assert s["wrong_share"] == pytest.approx(sum(sig) / 3)
    assert noise_fit_summary([(-1000.0, 0.0)])["wrong_share"] == 0.0  # no overflow


def _record(tmp_path, tiny_tokenizer, tiny_llama, label_noise=0.5, name="run-a", **extra):
    """A run record whose final model and base model (shared by the records of one test) are both the tiny model."""
    for folder in (tmp_path / "base", tmp_path / name / "model" / "final"):
        if not folder.is_dir():
            tiny_llama.save_pretrained(folder)
            tiny_tokenizer.save_pretrained(folder)
    record = tmp_path / name / "record"
    record.mkdir(parents=True)
    data = {**DATA, "label_noise": label_noise}
    config = {"model": str(tmp_path / "base"), "data": data, "output_dir": str(tmp_path / name / "model"), **extra}
    (record / "run.json").write_text(json.dumps({"run": name, "config": config}))
    return record


def _args(*argv):
    return add_noise_fit_arguments(argparse.ArgumentParser()).parse_args([str(a) for a in argv])


def test_cli_writes_rows_for_runs_and_base(tmp_path, tiny_tokenizer, tiny_llama, caplog):
    caplog.set_level(logging.INFO, logger="targetsft")
    record = _record(tmp_path, tiny_tokenizer, tiny_llama)
    assert run_noise_fit_from_args(_args(record, "--base", "--examples", 3, "--out", tmp_path / "out")) == 0
    rows = list(csv.DictReader((tmp_path / "out" / "noise_fit.csv").open()))
    assert [(r["model"], r["run"], r["n"]) for r in rows] == [("run-a", "run-a", "3"), ("base", "run-a", "3")]
    assert {r["label_noise"] for r in rows} == {"0.5"}
    assert rows[0]["delta"] == rows[1]["delta"]  # here the run's model is its base model
    examples = json.loads((tmp_path / "out" / "noise_fit.json").read_text())["examples"]
    assert len(examples["run-a@run-a@0.5"]) == 3 and "prefers the wrong answer" in caplog.text


def test_cli_errors(tmp_path, tiny_tokenizer, tiny_llama):
    with pytest.raises(InputError, match="no run.json"):
        run_noise_fit_from_args(_args(tmp_path, "--out", tmp_path / "out"))
    clean = _record(tmp_path, tiny_tokenizer, tiny_llama, label_noise=0.0, name="clean")
    with pytest.raises(ValueError, match="clean data"):
        run_noise_fit_from_args(_args(clean, "--out", tmp_path / "out"))
    with pytest.raises(InputError, match="must be in"):
        run_noise_fit_from_args(_args(clean, "--label-noise", 0, "--out", tmp_path / "out"))
    gone = _record(tmp_path, tiny_tokenizer, tiny_llama, name="gone")
    for f in (tmp_path / "gone" / "model" / "final").iterdir():
        f.unlink()
    (tmp_path / "gone" / "model" / "final").rmdir()
    with pytest.raises(InputError, match="is gone"):
        run_noise_fit_from_args(_args(gone, "--out", tmp_path / "out"))


def test_cli_adds_to_its_output_and_shares_the_base_scores(tmp_path, tiny_tokenizer, tiny_llama):
    first, second = (_record(tmp_path, tiny_tokenizer, tiny_llama, name=n) for n in ("run-a", "run-b"))
    out = tmp_path / "out"
    run_noise_fit_from_args(_args(first, "--base", "--examples", 2, "--out", out))
    state = json.loads((out / "noise_fit.json").read_text())
    for e in state["examples"]["base@run-a@0.5"]:  # mark the stored base scores: a rescoring would not reproduce them
        e["logp_wrong"], e["logp_true"] = -1.0, -4.0
    (out / "noise_fit.json").write_text(json.dumps(state))
    run_noise_fit_from_args(_args(first, second, "--base", "--examples", 2, "--out", out))
    rows = {(r["model"], r["run"]): r for r in csv.DictReader((out / "noise_fit.csv").open())}
    assert sorted(rows) == [("base", "run-a"), ("base", "run-b"), ("run-a", "run-a"), ("run-b", "run-b")]
    assert float(rows[("base", "run-b")]["delta"]) == pytest.approx(3.0)  # taken from run-a's (same data)
    assert rows[("run-b", "run-b")]["delta"] == rows[("run-a", "run-a")]["delta"]  # same model, same examples
    with pytest.raises(InputError, match="--examples 2, not 3"):
        run_noise_fit_from_args(_args(second, "--examples", 3, "--out", out))


def test_clean_run_scored_on_a_noise_levels_examples(tmp_path, tiny_tokenizer, tiny_llama):
    noisy = _record(tmp_path, tiny_tokenizer, tiny_llama, label_noise=0.5, name="noisy")
    clean = _record(tmp_path, tiny_tokenizer, tiny_llama, label_noise=0.0, name="clean")
    out = tmp_path / "out"
    run_noise_fit_from_args(_args(noisy, "--out", out))
    run_noise_fit_from_args(_args(clean, "--label-noise", 0.5, "--out", out))
    run_noise_fit_from_args(_args(clean, "--label-noise", 0.25, "--out", out))
    state = json.loads((out / "noise_fit.json").read_text())
    got = {(r["run"], r["label_noise"]): r for r in state["rows"]}
    assert sorted(got) == [("clean", 0.25), ("clean", 0.5), ("noisy", 0.5)]
    # same model, same corrupted examples: the clean run's control row equals the noisy run's
    assert got[("clean", 0.5)]["delta"] == got[("noisy", 0.5)]["delta"]
    assert got[("clean", 0.25)]["n"] == 3 and got[("clean", 0.5)]["n"] == 6


def test_cli_scores_the_teacher_an_experiment_run_names(tmp_path, tiny_tokenizer, tiny_llama, pairs):
    """``teacher.model: "@<run id>"`` is that run's final model beside the run's folder (the run's model is in
    tmp_path/a/model, so its teacher in tmp_path/a/teach/final); its scores are that model's on the run's examples."""
    teacher = {"loss": {"method": "target_sft"}, "teacher": {"model": "@teach"}}
    record = _record(tmp_path, tiny_tokenizer, tiny_llama, name="a", **teacher)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="teacher run's model .* is gone"):
        run_noise_fit_from_args(_args(record, "--teacher", "--out", out))
    tiny_llama.save_pretrained(tmp_path / "a" / "teach" / "final")
    run_noise_fit_from_args(_args(record, "--teacher", "--examples", 2, "--out", out))
    state = json.loads((out / "noise_fit.json").read_text())
    got = [x for e in state["examples"]["teacher@a@0.5"] for x in (e["logp_wrong"], e["logp_true"])]
    want = [x for pair in tail_logprobs(tiny_llama, pairs[0][:2]) for x in pair]
    assert got == pytest.approx(want, abs=1e-5)
    assert json.loads(state["data"]["teacher@a@0.5"])[0] == str(tmp_path / "a" / "teach" / "final")
    hint = _record(
        tmp_path,
        tiny_tokenizer,
        tiny_llama,
        name="hint",
        **{**teacher, "teacher": {"model": "@teach", "prompt": "answer_hint"}},
    )
    with pytest.raises(InputError, match="another prompt"):
        run_noise_fit_from_args(_args(hint, "--teacher", "--examples", 2, "--out", out))
    with pytest.raises(InputError, match="no teacher model"):
        run_noise_fit_from_args(
            _args(_record(tmp_path, tiny_tokenizer, tiny_llama, name="sft"), "--teacher", "--examples", 2, "--out", out)
        )
