"""What each loss teaches on real data: the induced targets ``Q = p − ∂ℓ/∂z`` of several losses on the same tokens.

:func:`induced_target_study` runs a student and a teacher (same tokenizer) over tokenized training examples, takes
every supervised token, and for each loss computes its induced target with :func:`targetsft.induced_target`
(per-token weight 1: ``reduction="sum"``), then splits the target's mass into three parts:

- ``label``: ``Q(y)``;
- ``teacher_top``: mass on the teacher's ``top`` most likely tokens other than ``y``;
- ``other``: the rest (``1 − label − teacher_top``; can be negative for a loss whose ``Q`` is not a distribution).

Also recorded per loss: the mean ``Q(y)`` by bins of the student's own ``p(y)`` (where a loss moves the label
weight), and the entropy of ``Q``. ``target-sft induced-targets`` writes ``induced_targets.csv``, ``.json`` and
two plots.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from targetsft.losses.distributions import Logits
from targetsft.losses.induced import induced_target
from targetsft.losses.loss import target_loss
from targetsft.losses.methods import get_method

__all__ = ["default_losses", "induced_target_study", "write_induced_targets"]

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (logits [n, V], labels [n], teacher logits [n, V]) -> sum
P_BINS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


def _focal(z: Tensor, y: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal loss ``−(1 − p_y)^γ·log p_y`` (Lin et al.), with its modulating factor differentiated."""
    logp = torch.log_softmax(z, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return (-((1 - logp.exp()) ** gamma) * logp).sum()


def default_losses(eta: float = 0.5, epsilon: float = 0.1) -> dict[str, LossFn]:
    """SFT, label smoothing (ε), focal (γ = 2), DFT and Target-SFT (η), as functions of (logits, labels, teacher)."""

    def method(name: str, **params: Any) -> LossFn:
        uses_teacher = "teacher" in get_method(name).needs
        return lambda z, y, t: target_loss(
            z, y, method=name, reduction="sum", teacher=Logits(t) if uses_teacher else None, **params
        )

    return {
        "sft": method("sft"),
        f"label_smoothing (ε={epsilon:g})": method("label_smoothing", epsilon=epsilon),
        "focal (γ=2)": lambda z, y, t: _focal(z, y),
        "dft": method("dft"),
        f"target_sft (η={eta:g})": method("target_sft", eta=eta),
    }


@torch.no_grad()
def _supervised_logits(model: Any, item: dict[str, Any]) -> tuple[Tensor, Tensor]:
    ids = torch.tensor([item.get("teacher_input_ids", item["input_ids"])])
    labels = torch.tensor(item.get("teacher_labels", item["labels"]))
    logits = model(input_ids=ids).logits[0, :-1].float()
    keep = labels[1:] != -100
    return logits[keep], labels[1:][keep]


def induced_target_study(
    student: Any,
    teacher: Any,
    items: Sequence[dict[str, Any]],
    losses: dict[str, LossFn] | None = None,
    *,
    top: int = 5,
) -> dict[str, Any]:
    """Per loss: mean mass split (label / teacher's top tokens / other), mean ``Q(y)`` per bin of ``p(y)``, mean
    entropy of ``Q`` (over tokens where ``Q`` is a distribution), and the fraction of tokens where it is one.
    ``items``: tokenized examples (``input_ids``, ``labels``; optional ``teacher_input_ids``/``teacher_labels``,
    a privileged teacher prompt aligned on the same supervised tokens)."""
    losses = losses or default_losses()
    student.eval()
    teacher.eval()
    zs, ts, ys = [], [], []
    for item in items:
        z, y = _supervised_logits(student, {k: v for k, v in item.items() if not k.startswith("teacher_")})
        t, y_t = _supervised_logits(teacher, item)
        if not torch.equal(y, y_t):
            raise ValueError("the teacher's supervised tokens differ from the student's")
        zs.append(z)
        ts.append(t)
        ys.append(y)
    z, t, y = torch.cat(zs).double(), torch.cat(ts).double(), torch.cat(ys)
    p_y = torch.softmax(z, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    t_top = torch.topk(t, top + 1, dim=-1).indices
    not_label = t_top != y.unsqueeze(-1)
    bins = torch.bucketize(p_y, torch.tensor(P_BINS[1:-1], dtype=p_y.dtype))
    out: dict[str, Any] = {"tokens": int(y.numel()), "top": top, "p_bins": list(P_BINS), "losses": {}}
    out["p_bin_counts"] = [int((bins == b).sum()) for b in range(len(P_BINS) - 1)]
    for name, fn in losses.items():
        ind = induced_target(lambda zz, yy: fn(zz, yy, t), z, y, weight="sum")
        q = ind.q
        label = q.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        teacher_top = (q.gather(-1, t_top) * not_label).sum(-1)  # the teacher's top tokens other than y (≤ top)
        per_bin = [float(label[bins == b].mean()) if (bins == b).any() else math.nan for b in range(len(P_BINS) - 1)]
        dist = ind.is_distribution
        entropy = -(q.clamp_min(1e-30).log() * q.clamp_min(0)).sum(-1)
        out["losses"][name] = {
            "label": float(label.mean()),
            "teacher_top": float(teacher_top.mean()),
            "other": float((1 - label - teacher_top).mean()),
            "label_by_p_bin": per_bin,
            "entropy": float(entropy[dist].mean()) if dist.any() else math.nan,
            "is_distribution": float(dist.double().mean()),
        }
    return out


def _plot(study: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(study["losses"])
    rows = [study["losses"][n] for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    left = [0.0] * len(names)
    parts = [("label", "Q(y): the label"), ("teacher_top", f"teacher's top-{study['top']} (≠ y)"), ("other", "rest")]
    for key, label in parts:
        widths = [r[key] for r in rows]
        ax.barh(names, widths, left=left, label=label)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel(f"mean mass of the induced target Q over {study['tokens']} training tokens")
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    fig.tight_layout()
    mass = folder / "induced_targets_mass.png"
    fig.savefig(mass, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    edges = study["p_bins"]
    centers = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    for name, r in zip(names, rows):
        ax.plot(centers, r["label_by_p_bin"], marker="o", label=name)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="Q(y) = p(y)")
    ax.set_xlabel("student's p(y) (binned)")
    ax.set_ylabel("mean Q(y)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    by_p = folder / "induced_targets_label_vs_p.png"
    fig.savefig(by_p, dpi=110)
    plt.close(fig)
    return [mass, by_p]


def write_induced_targets(
    out: str | Path,
    *,
    teacher: str,
    model: str | None = None,
    teacher_prompt: str = "same",
    data: str = "gsm-train",
    examples: int = 32,
    eta: float = 0.5,
    epsilon: float = 0.1,
    top: int = 5,
) -> tuple[dict[str, Any], list[Path]]:
    """:func:`induced_target_study` of :func:`default_losses` (``eta``, ``epsilon``) for ``model`` (default: the
    embedded default) against ``teacher`` (same tokenizer) on the first ``examples`` records of ``data`` (data seed
    0), written to ``out`` as ``induced_targets.json``, ``induced_targets.csv`` and two plots; the study and the
    plots' paths."""
    from targetsft.runtime.models import load_model, load_tokenizer, resolve_model
    from targetsft.training.config import load_config
    from targetsft.training.dataset import build_dataset
    from targetsft.training.vocabulary import check_token_maps

    overrides = [f"data.train={data}", f"data.size={examples}", f"teacher.prompt={teacher_prompt}"]
    cfg = load_config(None, overrides + ([f"model={model}"] if model else []))
    model_path, teacher_path = resolve_model(cfg.model), resolve_model(teacher)
    tokenizer = load_tokenizer(model_path)
    check_token_maps(tokenizer, load_tokenizer(teacher_path), "teacher")
    items, _ = build_dataset(cfg, tokenizer)
    study = induced_target_study(
        load_model(model_path), load_model(teacher_path), items, default_losses(eta, epsilon), top=top
    )
    study.update(model=cfg.model or "default", teacher=teacher, teacher_prompt=teacher_prompt)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "induced_targets.json").write_text(json.dumps(study, indent=1) + "\n")
    with (folder / "induced_targets.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["loss", "label", "teacher_top", "other", "entropy", "is_distribution"])
        for name, r in study["losses"].items():
            w.writerow(
                [name] + [f"{r[k]:.4f}" for k in ("label", "teacher_top", "other", "entropy", "is_distribution")]
            )
    return study, _plot(study, folder)
