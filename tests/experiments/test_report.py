"""Aggregation against hand computations: the summary, its intervals and the comparisons, the γ probe, the
learning-rate selection and the ranking on validation sets; where the tables are written."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest

from experiment_helpers import T2, fake_run
from targetsft import experiments as X
from targetsft.training.config import ConfigError


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
        fake_run(exp, runs, f"sft-s{s}", "sft", "sft", s, sft[s], [1, 0], probe)
        fake_run(exp, runs, f"target_sft-s{s}", "target_sft", "target_sft", s, tsft[s], [1, 1])
    fake_run(exp, runs, "base", "base", "base", None, [0, 0, 0, 0, 0], [0, 0], {0: start})
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
        fake_run(exp, runs, f"{cid}-s0", cid, "sft", 0, [1] * solved[lr] + [0] * (10 - solved[lr]), [1], None, lr)
        rows = ["step,loss,nll"] + [f"{5 * (i + 1)},1.0,{v}" for i, v in enumerate(nll[lr])]
        (runs / f"{cid}-s0" / "metrics.csv").write_text("\n".join(rows) + "\n")
    fake_run(exp, runs, "target_sft-lr1e-05-s0", "target_sft-lr1e-05", "target_sft", 0, [1] * 10, [1])
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
        fake_run(exp, runs, rid, cid, cid.split("-")[0] if cid == "sft" else "target_sft", seed, toy, mcq)
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
        fake_run(exp, tmp_path / "runs", f"sft-s{s}", "sft", "sft", s, [1, 0, s, 0, 0], [1, 0], {0: [0.1, 0.9]})
        fake_run(exp, tmp_path / "runs", f"dft-s{s}", "dft", "dft", s, [1, 1, s, 0, 0], [1, 1], {0: [0.2, 0.8]})
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
