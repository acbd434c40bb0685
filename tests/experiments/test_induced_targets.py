"""Induced-target study on a tiny model: each loss's label mass against its closed form, the mass split sums to 1,
and the CLI writes its files."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from targetsft.cli.tools import add_induced_targets_arguments, run_induced_targets_from_args  # noqa: E402
from targetsft.experiments.induced_targets import induced_target_study  # noqa: E402


@pytest.fixture(scope="module")
def setup(tiny_tokenizer, tiny_llama, tmp_path_factory):
    from targetsft.data.sft import load_records, tokenize_record

    torch.manual_seed(7)
    teacher = transformers.LlamaForCausalLM(copy.deepcopy(tiny_llama.config))
    items = [tokenize_record(tiny_tokenizer, r, 1024) for r in load_records("gsm-train", size=3)]
    return tiny_llama, teacher, items


def _student_p(model, items):
    """p(y) of every supervised token, computed here independently of the module."""
    ps = []
    for item in items:
        with torch.no_grad():
            z = model(input_ids=torch.tensor([item["input_ids"]])).logits[0, :-1].double()
        labels = torch.tensor(item["labels"][1:])
        keep = labels != -100
        ps.append(torch.softmax(z[keep], -1).gather(-1, labels[keep].unsqueeze(-1)).squeeze(-1))
    return torch.cat(ps)


def test_label_mass_matches_closed_forms(setup):
    student, teacher, items = setup
    study = induced_target_study(student, teacher, items, top=3)
    p_y = _student_p(student, items)
    v = student.config.vocab_size
    assert study["tokens"] == p_y.numel() > 50
    losses = study["losses"]
    for row in losses.values():
        assert row["label"] + row["teacher_top"] + row["other"] == pytest.approx(1.0, abs=1e-9)
    assert losses["sft"]["label"] == pytest.approx(1.0, abs=1e-12)
    assert losses["sft"]["teacher_top"] == pytest.approx(0.0, abs=1e-12)
    assert losses["label_smoothing (ε=0.1)"]["label"] == pytest.approx(0.9 + 0.1 / v, abs=1e-9)
    # DFT: Q = p_y·onehot(y) + (1 − p_y)·p  →  Q(y) = p_y + (1 − p_y)·p_y
    assert losses["dft"]["label"] == pytest.approx(float((p_y + (1 - p_y) * p_y).mean()), abs=1e-9)
    # focal (γ = 2): its induced Q need not be a distribution; only the fraction where it is one is reported
    assert 0 <= losses["focal (γ=2)"]["is_distribution"] <= 1
    assert losses["target_sft (η=0.5)"]["is_distribution"] == 1.0 == losses["dft"]["is_distribution"]
    # the guided residual puts more mass on the teacher's top tokens than DFT's self residual does
    assert losses["target_sft (η=0.5)"]["teacher_top"] > losses["dft"]["teacher_top"]
    assert sum(study["p_bin_counts"]) == study["tokens"]


def test_cli_writes_table_json_and_plots(setup, tiny_tokenizer, tmp_path):
    student, teacher, _ = setup
    for name, model in (("student", student), ("teacher", teacher)):
        model.save_pretrained(tmp_path / name)
        tiny_tokenizer.save_pretrained(tmp_path / name)
    args = add_induced_targets_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--examples", "2"]
        + ["--teacher-prompt", "answer_hint", "--out", str(tmp_path / "out")]
    )
    assert run_induced_targets_from_args(args) == 0
    study = json.loads((tmp_path / "out" / "induced_targets.json").read_text())
    assert study["teacher_prompt"] == "answer_hint" and len(study["losses"]) == 5
    assert (tmp_path / "out" / "induced_targets.csv").read_text().startswith("loss,label,teacher_top")
    for png in ("induced_targets_mass.png", "induced_targets_label_vs_p.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
