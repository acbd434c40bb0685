"""The runner on a tiny model: finished runs skipped, a killed run resumed, a changed config refused, a teacher cache
built once, runs shared between experiments, records that outlive the models, precisions never mixed, teacher
snapshots and temperatures; the probe's histogram and the progress line."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import shutil
from pathlib import Path

import pytest

from experiment_helpers import tiny_experiment, tiny_files
from targetsft import experiments as X
from targetsft.data.sft import read_jsonl
from targetsft.experiments.plots import baseline_bands
from targetsft.runtime.files import sha256_file
from targetsft.training.config import config_from_dict
from targetsft.training.scoring import probe_histogram


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


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, tiny_tokenizer, tiny_llama):
    """The tiny model and its two sets (``tiny_files``), written once for the module."""
    return tiny_files(tmp_path_factory.mktemp("exp"), tiny_llama, tiny_tokenizer)


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
    from targetsft.training import recipe

    model, qa, mc = tiny_setup
    out = tmp_path / "exp"
    exp = X.experiment_from_dict(tiny_experiment(out, model, qa, mc))
    real_train, calls, kill = recipe.train, [], {"dft-s0"}

    def spy(cfg, *, resume=False, callbacks=None):
        run = Path(cfg.output_dir).name
        calls.append((run, resume))
        return real_train(cfg, resume=resume, callbacks=[*callbacks, *([_KillAfterSave(2)] if run in kill else [])])

    monkeypatch.setattr(recipe, "train", spy)
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
    items = runs / "dft-s0" / done["sets"]["qa"]["items"]  # the real evaluate_generation output, kept compressed
    assert not items.exists() and items.with_name(items.name + ".gz").is_file() and len(read_jsonl(items)) == 3
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
    raw = tiny_experiment(out, model, qa, mc)
    raw["eval"].append({"name": "qa2", "set": str(qa), "max_new_tokens": 2, "batch_size": 4})
    X.run_experiment(X.experiment_from_dict(raw), progress=False)
    assert calls == []
    assert (runs / "sft-s0" / "eval" / "qa" / "result.json").stat().st_mtime_ns == qa_result
    assert "qa2" in json.loads((runs / "sft-s0" / "DONE.json").read_text())["sets"]

    # a changed training config is refused rather than silently reused
    changed = tiny_experiment(out, model, qa, mc)
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
    from targetsft.training import recipe
    from targetsft.training.teacher_cache import from_config

    model, qa, mc = tiny_setup
    out = tmp_path / "exp"
    raw = tiny_experiment(out, model, qa, mc, baseline=False, teacher_cache_k=8, gamma_probe=0)
    raw["base"]["teacher"] = {"model": str(model), "prompt": "answer_hint"}
    raw["base"]["train"]["max_steps"] = 2
    raw["grid"] = [{"method": "sft", "seeds": [0]}, {"method": "target_sft", "seeds": [0, 1]}]
    raw["eval"] = raw["eval"][1:]
    real_train, real_cache, seen, builds = recipe.train, from_config.cache_teacher, [], []

    def spy_train(cfg, **kwargs):
        seen.append((Path(cfg.output_dir).name, cfg.teacher.model, cfg.teacher.cache))
        return real_train(cfg, **kwargs)

    def spy_cache(cfg, folder, **kwargs):
        builds.append(folder)
        return real_cache(cfg, folder, **kwargs)

    monkeypatch.setattr(recipe, "train", spy_train)
    monkeypatch.setattr(from_config, "cache_teacher", spy_cache)
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
    stats = json.loads((builds[0] / from_config.LABEL_STATS_FILE).read_text())
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
    assert from_config.teacher_label_stats(cfg, builds[0]) == stats
    stale = builds[0] / from_config.LABEL_STATS_FILE
    stale.write_text(json.dumps({**stats, "top1": 2.0, "manifest_sha256": "another cache"}))
    assert from_config.teacher_label_stats(cfg, builds[0]) == pytest.approx(stats)


def test_experiments_sharing_runs_dir_share_runs(tiny_setup, tmp_path, monkeypatch):
    from targetsft.training import recipe

    model, qa, mc = tiny_setup
    shared = tmp_path / "shared-runs"
    first = tiny_experiment(tmp_path / "a", model, qa, mc, baseline=False, gamma_probe=0, runs_dir=str(shared))
    first["base"]["train"]["max_steps"] = 2
    first["grid"] = [{"method": "sft", "seeds": [0]}]
    first["eval"] = first["eval"][1:]  # mc
    second = copy.deepcopy(first)
    second["output_dir"] = str(tmp_path / "b")
    second["grid"].append({"method": "dft", "seeds": [0]})
    second["eval"] = tiny_experiment(tmp_path, model, qa, mc)["eval"][:1]  # qa
    real_train, trained = recipe.train, []
    monkeypatch.setattr(recipe, "train", lambda cfg, **kw: trained.append(cfg.output_dir) or real_train(cfg, **kw))
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
    from targetsft.training import recipe

    model, qa, mc = tiny_setup
    runs, records = tmp_path / "runs", tmp_path / "records"
    first = tiny_experiment(
        tmp_path / "a", model, qa, mc, baseline=False, gamma_probe=0, runs_dir=str(runs), records_dir=str(records)
    )
    first["base"]["train"]["max_steps"] = 2
    first["grid"] = [{"method": "sft", "seeds": [0]}, {"method": "dft", "seeds": [0]}]
    first["eval"] = first["eval"][1:]  # mc
    second = copy.deepcopy(first)
    second["output_dir"] = str(tmp_path / "b")
    second["grid"] = [{"method": "sft", "seeds": [0]}]
    second["eval"] = tiny_experiment(tmp_path, model, qa, mc)["eval"][:1]  # qa
    exps = [X.experiment_from_dict(first), X.experiment_from_dict(second)]
    real_train, events = recipe.train, []
    monkeypatch.setattr(
        recipe, "train", lambda cfg, **kw: events.append(Path(cfg.output_dir).name) or real_train(cfg, **kw)
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
    from targetsft.training import recipe

    model, qa, mc = tiny_setup
    runs, records, caches = tmp_path / "runs", tmp_path / "records", tmp_path / "caches"
    raw = tiny_experiment(tmp_path / "exp", model, qa, mc, runs_dir=str(runs), records_dir=str(records))
    raw.update(teacher_cache_k=4, teacher_cache_dir=str(caches), baseline=False)
    raw["base"]["train"]["max_steps"] = 2
    raw["base"]["teacher"] = {"model": "@teach-s0"}
    raw["grid"] = [{"name": "teach", "method": "sft", "seeds": [0]}, {"method": "kd", "seeds": [0]}]
    raw["eval"] = raw["eval"][1:]  # mc
    real_train, trained = recipe.train, []
    monkeypatch.setattr(
        recipe, "train", lambda cfg, **kw: trained.append(Path(cfg.output_dir).name) or real_train(cfg, **kw)
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


def test_runs_of_two_precisions_are_never_mixed(tiny_setup, tmp_path, capability):
    """A grid recorded at fp32 is refused, before anything starts, on a machine where its ``auto`` means bf16;
    records of two precisions are not aggregated; a record from before precision was recorded is read from its
    explicit ``train.bf16``."""
    model, qa, mc = tiny_setup
    raw = tiny_experiment(tmp_path / "exp", model, qa, mc, grid=[{"method": "sft", "seeds": [0, 1]}])
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
    raw = tiny_experiment(out, model, qa, mc, baseline=False, gamma_probe=0)
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
