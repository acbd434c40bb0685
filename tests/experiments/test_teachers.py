"""The teachers of the students: what predicts a student, on the seeds every student has, and a teacher rebuilt into
its cache folder told apart by its build."""

from __future__ import annotations

import pytest


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
