"""Versioned run records: ``record_version`` in what the runner writes, :func:`migrate_record` from the 0.2 layout
(version 1, no ``record_version``) to the current one, a newer version refused, and the committed records still
giving the committed tables."""

from __future__ import annotations

import copy
import dataclasses
import glob
import json
from pathlib import Path

import pytest

from targetsft import experiments as X
from targetsft.cli.main import main
from targetsft.experiments.grid import EvalSpec, eval_spec
from targetsft.experiments.records import migrate_record, read_record, same_spec, spec_dict

ROOT = Path(__file__).resolve().parents[2]

# a set's spec as the committed 0.2 records hold it: every option of its time, "engine" not yet among them
SPEC_V1 = {
    "set": "gsm-val",
    "name": "gsm-val",
    "size": 200,
    "data_seed": None,
    "samples": 1,
    "temperature": None,
    "top_p": 1.0,
    "greedy": True,
    "max_new_tokens": 200,
    "batch_size": None,
    "seed": 0,
    "normalize": "mean",
    "metrics": None,
    "dtype": "bfloat16",
    "prompt": "gsm",
}
METRIC = {"value": 0.055, "lo": 0.031, "hi": 0.096, "n": 200, "ci": "wilson"}
TRAIN = {
    "data": {"records": 1200, "kept": 1200, "truncated": 22, "dropped": 0},
    "metrics": {"train_runtime": 1058.8022, "train_loss": 0.506957, "last_loss": 0.157656},
}


def _set_v1(items: str) -> dict:
    return {"spec": dict(SPEC_V1), "kind": "generation", "n": 200, "metrics": {"greedy": METRIC}, "items": items}


def _done_v1(**changes) -> dict:
    """A ``DONE.json`` in the 0.2 layout, as ``results/runs/target_sft-eta0.75-lr5e-05-s0/DONE.json`` has it."""
    record = {
        "run": "target_sft-eta0.75-lr5e-05-s0",
        "config_id": "target_sft-eta0.75-lr5e-05",
        "group": "target_sft",
        "method": "target_sft",
        "params": {"eta": 0.75, "temperature": 1.0, "tail": "student", "exclude_label": False},
        "learning_rate": 5e-05,
        "seed": 0,
        "fingerprint": "e48875a725c011a73ca14d7ca48430d691b424cb1f22cbd85acdb59401082a6e",
        "train": copy.deepcopy(TRAIN),
        "sets": {"gsm-val": _set_v1("eval/gsm-val/gsm-val.generations.jsonl")},
        "seconds": 1174.0,
        "finished": "2026-11-30T08:13:32+0000",
    }
    return {**record, **changes}


def test_a_done_record_of_0_2_migrates_to_the_current_layout():
    old = _done_v1()
    kept = copy.deepcopy(old)
    new = migrate_record(old)
    assert old == kept, "the argument is not changed"
    added = {"record_version", "precision", "eval_environment", "earlier_models"}
    assert set(new) == set(old) | added
    assert new["record_version"] == X.RECORD_VERSION == 2
    assert new["precision"] is None and new["eval_environment"] is None and new["earlier_models"] == []
    assert new["train"] == old["train"], "the trainer's part stays as written: its hash names the model"
    assert {k: new[k] for k in old if k not in ("sets",)} == {k: old[k] for k in old if k != "sets"}
    entry = new["sets"]["gsm-val"]
    assert entry["model"] == X.training_id(TRAIN)
    assert entry["spec"] == {**SPEC_V1, "engine": "compact"}
    assert {k: entry[k] for k in ("kind", "n", "metrics", "items")} == {
        k: old["sets"]["gsm-val"][k] for k in ("kind", "n", "metrics", "items")
    }
    spec = EvalSpec(**{**SPEC_V1, "engine": "compact"})
    assert same_spec(entry["spec"], spec) and not same_spec(old["sets"]["gsm-val"]["spec"], spec)
    # a precision recorded only in the trainer's environment becomes the record's
    trained = copy.deepcopy(TRAIN) | {"environment": {"precision": "fp32", "device": "cpu"}}
    assert migrate_record(_done_v1(train=trained))["precision"] == "fp32"
    assert migrate_record(_done_v1(train=trained, precision="bf16"))["precision"] == "bf16"


def test_sets_of_a_retrained_run_keep_the_training_they_were_evaluated_on():
    """As ``results/runs_fp32/sft-lr5e-05-s0``: sets listed under ``earlier_models`` name that training, the others
    the record's own; a set that names its model keeps it; the baseline's sets name none."""
    earlier_train = {**copy.deepcopy(TRAIN), "metrics": {"train_loss": 0.197138}}
    newer = {**_set_v1("eval/b/b.generations.jsonl"), "model": X.training_id(TRAIN)}
    old = _done_v1(
        precision="fp32",
        eval_environment={"device": "cpu"},
        sets={"a": _set_v1("eval/a/a.generations.jsonl"), "b": newer, "c": _set_v1("eval/c/c.generations.jsonl")},
        earlier_models=[{"sets": ["a"], "train": earlier_train}],
    )
    new = migrate_record(old)
    assert {label: s["model"] for label, s in new["sets"].items()} == {
        "a": X.training_id(earlier_train),
        "b": X.training_id(TRAIN),
        "c": X.training_id(TRAIN),
    }
    assert new["earlier_models"] == old["earlier_models"] and new["eval_environment"] == {"device": "cpu"}
    baseline = migrate_record(_done_v1(run="base", train=None))
    assert baseline["sets"]["gsm-val"]["model"] is None and baseline["precision"] is None


def test_run_json_and_result_json_of_0_2_migrate():
    run = {"run": "sft-s0", "fingerprint": "ab", "config": {"model": None, "train": {"bf16": True}}}
    assert migrate_record(run) == {"record_version": 2, **run, "precision": None}
    result = _set_v1("gsm-val.generations.jsonl")
    new = migrate_record(result)
    assert new == {**result, "record_version": 2, "spec": {**SPEC_V1, "engine": "compact"}, "model": None}


def test_the_current_layout_passes_unchanged():
    for old in (_done_v1(), {"run": "r", "fingerprint": "f", "config": {}}, _set_v1("x.jsonl")):
        current = migrate_record(old)
        again = migrate_record(current)
        assert again == current and again is not current
    written = {
        "record_version": X.RECORD_VERSION,
        "run": "r",
        "fingerprint": "f",
        "config": {"model": None},
        "precision": "fp32",
    }
    assert migrate_record(written) == written


def test_a_reused_result_of_0_2_takes_its_model_from_the_runs_record():
    """A ``result.json`` of 0.2 names no model: reused, it is the run's ``DONE.json`` entry for the set (which names
    it) where that is the same evaluation, else itself (model ``None``, as an interrupted 0.2 run left it)."""
    from targetsft.experiments.runner import _kept_set

    result = migrate_record(_set_v1("gsm-val.generations.jsonl"))
    done = migrate_record(_done_v1())
    kept = _kept_set(result, "gsm-val", done["sets"]["gsm-val"])
    assert kept == done["sets"]["gsm-val"] and kept["model"] == X.training_id(TRAIN)
    other = {**done["sets"]["gsm-val"], "metrics": {"greedy": {**METRIC, "value": 0.06}}}  # evaluated again since
    alone = {k: v for k, v in result.items() if k != "record_version"} | {
        "items": "eval/gsm-val/gsm-val.generations.jsonl"
    }
    assert _kept_set(result, "gsm-val", other) == alone == _kept_set(result, "gsm-val", None)
    assert alone["model"] is None


def test_the_spec_migration_names_every_option_of_eval_spec():
    """Adding an option to EvalSpec needs a new record version (its migration names the option in older specs)."""
    migrated = migrate_record({"spec": {"set": "gsm-val"}})["spec"]
    assert migrated == spec_dict(EvalSpec(set="gsm-val")), "EvalSpec changed: bump RECORD_VERSION and migrate"
    assert [f.name for f in dataclasses.fields(EvalSpec)] == list(spec_dict(EvalSpec(set="x")))


@pytest.mark.parametrize("version", [3, 99])
def test_a_newer_version_is_refused(version, tmp_path):
    with pytest.raises(X.RecordVersionError, match=rf"record_version {version} is newer than this targetsft reads"):
        migrate_record({**_done_v1(), "record_version": version})
    path = tmp_path / "DONE.json"
    path.write_text(json.dumps({**_done_v1(), "record_version": version}))
    with pytest.raises(X.RecordVersionError, match=rf"{path}: record_version {version} is newer"):
        read_record(path)


@pytest.mark.parametrize("version", [0, -1, "2", 2.0, True, None])
def test_a_version_that_is_not_one_is_refused(version):
    with pytest.raises(X.RecordVersionError, match="is not a record version"):
        migrate_record({**_done_v1(), "record_version": version})


def test_the_command_names_a_record_of_a_newer_version_in_one_line(tmp_path, capsys):
    raw = {
        "name": "v",
        "output_dir": str(tmp_path / "out"),
        "runs_dir": str(tmp_path / "runs"),
        "grid": [{"method": "sft", "seeds": [0]}],
        "eval": [{"name": "toy", "set": "toy.jsonl"}],
    }
    config = tmp_path / "v.yaml"
    config.write_text(json.dumps(raw))
    done = tmp_path / "runs" / "sft-s0" / "DONE.json"
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps({**_done_v1(run="sft-s0"), "record_version": X.RECORD_VERSION + 1}))
    for extra in (["--aggregate-only"], ["--dry-run"]):
        assert main(["experiment", "--config", str(config), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(done) in err and "newer than this targetsft reads" in err


def test_every_committed_record_migrates_by_adding_only():
    """Each record under results/ reads in the current layout; the migration only adds (a spec's options, a set's
    model, the keys version 1 could lack), so every value the tables read is the committed one."""
    paths = sorted(glob.glob(str(ROOT / "results" / "*" / "*" / "DONE.json")))
    paths += sorted(glob.glob(str(ROOT / "results" / "*" / "*" / "run.json")))
    paths += sorted(glob.glob(str(ROOT / "results" / "*" / "*" / "eval" / "*" / "result.json")))
    assert len(paths) > 100

    def contains(new, old) -> bool:
        if isinstance(old, dict):
            return isinstance(new, dict) and all(k in new and contains(new[k], v) for k, v in old.items())
        return json.dumps(new) == json.dumps(old)  # NaN (a metric of a signed target) equals itself here

    for path in paths:
        old = json.loads(Path(path).read_text())
        new = read_record(Path(path))
        assert "record_version" not in old and new["record_version"] == X.RECORD_VERSION, path
        assert contains(new, old), path
        for entry in new.get("sets", {}).values():
            assert set(entry["spec"]) == set(spec_dict(EvalSpec(set="x"))) and "model" in entry, path


def test_compacted_records_give_the_same_tables(tmp_path):
    """:func:`compact_records` stores every items file of the records gzip-compressed, leaves the files that name
    them as they are, compresses nothing twice, and the tables (whose paired comparisons read the items) come out
    byte-identical."""
    from experiment_helpers import fake_run

    raw = {
        "name": "c",
        "output_dir": str(tmp_path / "out"),
        "base": {"teacher": {"model": "t"}},
        "grid": [{"method": "sft", "seeds": [0, 1]}, {"method": "dft", "seeds": [0, 1]}],
        "eval": [{"name": "toy", "set": "toy.jsonl"}, {"name": "mcq", "set": "mcq.jsonl"}],
    }
    exp = X.experiment_from_dict(raw)
    runs = tmp_path / "out" / "runs"
    for s in (0, 1):
        fake_run(exp, runs, f"sft-s{s}", "sft", "sft", s, [1, 0, 1, s], [1, 0])
        fake_run(exp, runs, f"dft-s{s}", "dft", "dft", s, [0, 0, 1, 1 - s], [1, 1])
    tables = {n: p.read_bytes() for n, p in X.aggregate(exp, plots=False)["paths"].items()}
    before = {p: p.read_bytes() for p in runs.rglob("*.json")}
    written = X.compact_records(exp)
    assert len(written) == 8 and all(p.name.endswith(".jsonl.gz") for p in written)
    assert not list(runs.rglob("*.jsonl")) and {p: p.read_bytes() for p in runs.rglob("*.json")} == before
    assert X.compact_records(exp) == []
    assert {n: p.read_bytes() for n, p in X.aggregate(exp, plots=False)["paths"].items()} == tables


@pytest.mark.parametrize("name", ["teacher_study", "eta_sweep", "noise", "main", "lr_sweep", "ablation", "new_methods"])
def test_committed_records_give_the_committed_tables(name, tmp_path, monkeypatch):
    """The committed records (0.2's are version 1) aggregate, through migrate_record and from their gzip-compressed
    items, to tables byte-identical to the committed ones (teacher_study: float32 records with models named, one
    retrained; the others: bf16 records of 0.1/0.2)."""
    monkeypatch.chdir(ROOT)  # the experiments name their folders relative to the repository
    exp = dataclasses.replace(X.load_experiment(ROOT / "experiments" / f"{name}.yaml"), output_dir=str(tmp_path))
    paths = X.aggregate(exp, plots=False)["paths"]
    differ = [n for n, p in paths.items() if p.read_bytes() != (ROOT / exp.results_dir / n).read_bytes()]
    assert not differ, f"{name}: {differ} differ from the committed tables"


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
