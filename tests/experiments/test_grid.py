"""Experiment grids: expansion into runs, their ids, counts and configs, the strict schema, and teachers from an
earlier run of the grid or a snapshot it keeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiment_helpers import raw_grid
from targetsft import experiments as X
from targetsft.training.config import ConfigError


def test_grid_expansion_ids_count_and_configs():
    runs = X.expand_grid(X.experiment_from_dict(raw_grid()))
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
        X.experiment_from_dict(raw_grid(**change))


def test_teacher_from_an_earlier_run():
    raw = raw_grid(grid=[{"name": "teach", "method": "sft"}, {"method": "kd", "teacher": {"model": "@teach-s0"}}])
    runs = X.expand_grid(X.experiment_from_dict(raw))
    assert [r.id for r in runs] == ["base", "teach-s0", "kd-s0"]
    assert runs[2].config["teacher"]["model"] == "@teach-s0"


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
