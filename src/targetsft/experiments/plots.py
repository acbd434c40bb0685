"""The plots of an experiment: accuracy with intervals, training curves, γ over training, accuracy vs a swept value,
students' accuracy vs their teacher's agreement with the labels and its entropy."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from targetsft.experiments.grid import BASELINE_ID, Experiment, expand_grid, tables_dir, teacher_configs
from targetsft.experiments.records import PROBE_FILE, read_metrics_csv, records_root
from targetsft.training.scoring import read_probe


def _colors(names: Iterable[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(dict.fromkeys(names))}


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_accuracy(rows: Sequence[dict], label: str, metric: str, path: Path) -> Path:
    """Mean per config with its interval (error bars), coloured by method."""
    import matplotlib.pyplot as plt

    colors = _colors(r["method"] for r in rows)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(rows) + 2), 3.8))
    for i, r in enumerate(rows):
        lo, hi = (r["lo"], r["hi"]) if r["lo"] is not None and not math.isnan(r["lo"]) else (r["mean"], r["mean"])
        ax.bar(i, 100 * r["mean"], color=colors[r["method"]], alpha=0.8)
        ax.errorbar(
            i, 100 * r["mean"], yerr=[[100 * (r["mean"] - lo)], [100 * (hi - r["mean"])]], color="black", capsize=4
        )
    ax.set_xticks(range(len(rows)), [r["config"] for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{label}: {metric}, mean and 95% interval over seeds (one run: over problems)", fontsize=8)
    return _save(fig, path)


def _plot_curves(records: Sequence[dict], root: Path, keys: Sequence[str], path: Path) -> Path | None:
    """``keys`` (columns of metrics.csv) against the step, one line per run, coloured by config."""
    import matplotlib.pyplot as plt

    series = [(r, read_metrics_csv(root / r["run"] / "metrics.csv")) for r in records]
    series = [(r, rows) for r, rows in series if rows and all(k in rows[0] for k in keys)]
    if not series:
        return None
    colors = _colors(r["config_id"] for r, _ in series)
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        labelled: set[str] = set()
        for r, rows in series:
            cid = r["config_id"]
            ax.plot(
                [x["step"] for x in rows],
                [x[key] for x in rows],
                color=colors[cid],
                lw=1,
                label=None if cid in labelled else cid,
            )
            labelled.add(cid)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
    axes[0][0].legend(fontsize=6)
    return _save(fig, path)


def _plot_gamma_distribution(records: Sequence[dict], root: Path, path: Path) -> Path | None:
    """γ = p_θ(y) on the probe examples against the step: median, 25–75% and 10–90% bands, one panel per config
    (its first seed)."""
    import matplotlib.pyplot as plt

    first: dict[str, tuple[dict, dict]] = {}
    for r in records:
        probe = read_probe(root / r["run"] / PROBE_FILE)
        if probe and r["config_id"] not in first:
            first[r["config_id"]] = (r, probe)
    if not first:
        return None
    fig, axes = plt.subplots(1, len(first), figsize=(4.5 * len(first), 3.8), squeeze=False, sharey=True)
    for ax, (cid, (r, probe)) in zip(axes[0], first.items(), strict=True):
        steps = sorted(probe)
        q = {k: [probe[s][k] for s in steps] for k in ("q10", "q25", "q50", "q75", "q90", "mean")}
        ax.fill_between(steps, q["q10"], q["q90"], alpha=0.2, label="10–90%")
        ax.fill_between(steps, q["q25"], q["q75"], alpha=0.4, label="25–75%")
        ax.plot(steps, q["q50"], label="median")
        ax.plot(steps, q["mean"], ls="--", label="mean")
        ax.set_title(f"{cid} (seed {r['seed']})", fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("γ = p(label) on probe examples")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def _interval(r: dict) -> tuple[float, float]:
    """``r``'s interval in points below and above its mean (0 where it has none)."""
    if r["lo"] is None or math.isnan(r["lo"]):
        return 0.0, 0.0
    return 100 * (r["mean"] - r["lo"]), 100 * (r["hi"] - r["mean"])


def _plot_vs(rows: Sequence[dict], key: str, path: Path, log_x: bool = False) -> Path:
    """Accuracy (mean over seeds, interval) against a parameter, one line per method × metric."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.8))
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["metric"]), []).append(r)
    for (method, metric), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["x"])
        ys = [100 * r["mean"] for r in rs]
        bars = [_interval(r) for r in rs]
        yerr = [[b[0] for b in bars], [b[1] for b in bars]]
        ax.errorbar([r["x"] for r in rs], ys, yerr=yerr, marker="o", capsize=3, label=f"{method} {metric}")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _plot_vs_teacher(
    points: Sequence[dict], bands: Sequence[dict], comparisons: Sequence[dict], label: str, path: Path
) -> Path:
    """Students by their teacher's top-1 agreement with the labels. Left: each seed's score (small) and the mean
    over seeds (large), one colour per teacher (named in the legend), SFT and DFT as lines (mean solid, each seed
    dotted). Right, where the comparisons have them: each student's paired difference from SFT and from DFT over the
    same problems and seeds, with its interval (a tie where it spans 0). ``points`` carry their seeds' ``values``."""
    import matplotlib.pyplot as plt

    pairs = {(c["a"], c["b"]): c for c in comparisons if c["set"] == label and c["metric"] == points[0]["metric"]}
    base = {b["method"]: b["config"] for b in bands}
    diffs = [(m, p, pairs.get((p["config"], base[m]))) for m in ("sft", "dft") if m in base for p in points]
    diffs = [(m, p, c) for m, p, c in diffs if c is not None]
    fig, axes = plt.subplots(1, 2 if diffs else 1, figsize=(11 if diffs else 6, 4.2), squeeze=False)
    ax = axes[0][0]
    colors = _colors(p["teacher_label"] for p in points)
    band_colors = {"sft": "tab:gray", "dft": "tab:brown"}
    for b in bands:
        color = band_colors.get(b["method"], "k")
        ax.axhline(100 * b["mean"], color=color, lw=1.2, label=f"{b['config']} (mean)")
        for v in b.get("values") or []:
            ax.axhline(100 * v, color=color, lw=0.8, ls=":")
    for p in points:
        x, color = 100 * p["top1"], colors[p["teacher_label"]]
        values = p.get("values") or []
        ax.scatter([x] * len(values), [100 * v for v in values], s=14, color=color, alpha=0.6)
        ax.scatter([x], [100 * p["mean"]], s=60, color=color, edgecolor="k", label=p["teacher_label"], zorder=3)
    ax.set_xlabel("teacher's top-1 = label on the training tokens (%)")
    ax.set_ylabel(f"{label}: {points[0]['metric']} (%)")
    ax.set_title("students: each seed (small) and their mean (large)", fontsize=9)
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    if diffs:
        ax = axes[0][1]
        ax.axhline(0, color="k", lw=0.8)
        for method, p, c in diffs:
            x = 100 * p["top1"] + (0.3 if method == "dft" else -0.3)
            y, lo, hi = (100 * float(c[k]) for k in ("diff", "lo", "hi"))
            ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], marker="o" if method == "sft" else "s", capsize=3,
                        color=colors[p["teacher_label"]], mfc="white" if method == "dft" else None)  # fmt: skip
        ax.plot([], [], "ko", label="student − SFT")
        ax.plot([], [], "ks", mfc="white", label="student − DFT")
        ax.set_xlabel("teacher's top-1 = label on the training tokens (%)")
        ax.set_ylabel("paired difference (points)")
        ax.set_title("paired over the same problems and seeds; a tie where the interval spans 0", fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)


def baseline_bands(exp: Experiment, summary: Sequence[dict], label: str, metric: str) -> list[dict]:
    """The summary rows drawn as bands beside the students of :func:`_plot_vs_teacher`: the SFT and DFT configs on
    ``label`` / ``metric``, except those trained as another run's teacher (an SFT run, but not a baseline)."""
    teaching = teacher_configs(expand_grid(exp))
    return [
        r
        for r in summary
        if (r["set"], r["metric"]) == (label, metric) and r["method"] in ("sft", "dft") and r["config"] not in teaching
    ]


def write_plots(
    exp: Experiment,
    records: Sequence[dict],
    summary: Sequence[dict],
    *,
    teacher_points: Sequence[dict] = (),
    comparisons: Sequence[dict] = (),
    update_results: bool = False,
) -> list[Path]:
    """PNGs in ``plots/`` of :func:`~targetsft.experiments.grid.tables_dir` (``output_dir``; ``results_dir`` with
    ``update_results``): accuracy per config and set (with intervals); training curves (loss, NLL);
    for dft vs target_sft the mean γ per logging step (metrics.csv) and its distribution on the probe examples
    (``gamma_probe.jsonl``); accuracy vs η (target_sft) and vs learning rate, where the grid varies them; students'
    accuracy vs their teacher's agreement and entropy (``teacher_points``: :func:`~targetsft.experiments.teachers.
    teacher_points`), where a set has students of two teachers or more, beside SFT and DFT
    (:func:`baseline_bands`) and with their paired differences from them (``comparisons``)."""
    import matplotlib

    matplotlib.use("Agg")
    root, plots = records_root(exp), tables_dir(exp, update_results) / "plots"
    safe = lambda s: re.sub(r"[^A-Za-z0-9._-]+", "_", s)  # noqa: E731
    out = []
    for label, metric in dict.fromkeys((r["set"], r["metric"]) for r in summary):
        rows = [r for r in summary if (r["set"], r["metric"]) == (label, metric)]
        out.append(_plot_accuracy(rows, label, metric, plots / f"accuracy_{safe(label)}_{safe(metric)}.png"))
    trained = [r for r in records if r["method"] != BASELINE_ID]
    out.append(_plot_curves(trained, root, ("loss", "nll"), plots / "training_curves.png"))
    gamma_runs = [r for r in trained if r["method"] in ("dft", "target_sft")]
    out.append(_plot_curves(gamma_runs, root, ("gamma",), plots / "gamma.png"))
    out.append(_plot_gamma_distribution(gamma_runs, root, plots / "gamma_distribution.png"))
    for label in dict.fromkeys(r["set"] for r in summary):
        eta = [{**r, "x": r["params"]["eta"]} for r in summary if r["set"] == label and r["method"] == "target_sft"]
        if len({r["x"] for r in eta}) > 1:
            out.append(_plot_vs(eta, "η (target_sft)", plots / f"accuracy_vs_eta_{safe(label)}.png"))
        lr = [{**r, "x": r["learning_rate"]} for r in summary if r["set"] == label and r["learning_rate"]]
        if any(len({r["x"] for r in lr if r["method"] == m}) > 1 for m in {r["method"] for r in lr}):
            out.append(_plot_vs(lr, "learning rate", plots / f"accuracy_vs_lr_{safe(label)}.png", log_x=True))
        points = [p for p in teacher_points if p["set"] == label]
        if len({p["cache"] for p in points}) > 1:
            metric = points[0]["metric"]
            bands = baseline_bands(exp, summary, label, metric)
            seeds = {(r["config"], r["set"], r["metric"]): r["values"] for r in summary}
            points = [{**p, "values": seeds.get((p["config"], label, metric), [])} for p in points]
            png = plots / f"accuracy_vs_teacher_{safe(label)}.png"
            out.append(_plot_vs_teacher(points, bands, comparisons, label, png))
    return [p for p in out if p is not None]
