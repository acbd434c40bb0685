"""``target-sft importance-weights``: iw-SFT's trajectory weights ``w(τ) = q(τ)/π_ref(τ)`` for the training records.

iw-SFT (arXiv 2507.12856) weights each curated trajectory by how much more likely a target policy ``q`` finds it than
the reference ``π_ref`` it was drawn from. Here ``log w(τ) = Σ_t log q(y_t) − Σ_t log π_ref(y_t)`` over the
completion tokens (``--per-token``: divided by their number, the geometric mean ratio, which keeps long solutions
from dominating), then self-normalised so that the largest weight is 1 (the weight is the label trust γ of
``loss.method: weighted``, which must lie in [0, 1]) and floored at ``--min-weight``. The records are written with
``weight`` for ``data.train``; the raw log-ratios are kept beside it (``log_ratio``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from targetsft.runtime.inputs import InputError

if TYPE_CHECKING:
    from targetsft.training.config import TrainConfig


def trajectory_weights(
    log_q: Sequence[Sequence[float]], log_ref: Sequence[Sequence[float]], *, per_token: bool, min_weight: float = 0.0
) -> tuple[list[float], list[float]]:
    """``(weights, log_ratios)`` from per-token log-probs of each trajectory under ``q`` and ``π_ref``:
    ``w ∝ exp(log_ratio)`` with the largest 1, floored at ``min_weight``."""
    ratios = []
    for a, b in zip(log_q, log_ref, strict=True):
        if len(a) != len(b) or not a:
            raise ValueError("each trajectory needs the same, non-zero number of tokens under both models")
        r = math.fsum(a) - math.fsum(b)
        ratios.append(r / len(a) if per_token else r)
    top = max(ratios)
    return [max(min_weight, math.exp(r - top)) for r in ratios], ratios


def importance_weights(
    cfg: TrainConfig,
    out: str | Path,
    *,
    target: str,
    reference: str | None = None,
    examples: int | None = None,
    per_token: bool = False,
    min_weight: float = 0.0,
) -> list[float]:
    """The config's training records (the first ``examples``; default its data size) weighted by
    :func:`trajectory_weights` of ``target`` (q) against ``reference`` (π_ref; default the config's model), written
    to ``out`` (JSONL, each record with ``weight`` and ``log_ratio``); the weights."""
    from targetsft.data.sft import load_records, to_prompt_completion, tokenize_record
    from targetsft.runtime.files import atomic_write_text
    from targetsft.runtime.models import load_model, load_tokenizer, resolve_model
    from targetsft.training.scoring import label_logprobs

    if not 0 <= min_weight <= 1:
        raise InputError(f"--min-weight must be in [0, 1], got {min_weight}")
    records = load_records(cfg.data.train, size=examples or cfg.data.size, seed=cfg.data.seed)
    tokenizer = load_tokenizer(resolve_model(cfg.model))
    items = [tokenize_record(tokenizer, r, cfg.data.max_length, overflow=cfg.data.overflow) for r in records]
    kept = [(r, it) for r, it in zip(records, items, strict=True) if it is not None]
    scores: list[list[list[float]]] = []
    for name in (target, reference or cfg.model):
        scores.append(label_logprobs(load_model(resolve_model(name)), [it for _, it in kept]))
    weights, ratios = trajectory_weights(*scores, per_token=per_token, min_weight=min_weight)
    lines = []
    for (record, _), w, r in zip(kept, weights, ratios, strict=True):
        pc = to_prompt_completion(record)
        row: dict[str, Any] = {"prompt": pc["prompt"], "completion": pc["completion"], "weight": w, "log_ratio": r}
        if "answer" in record:
            row["answer"] = record["answer"]
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write_text(Path(out), "".join(lines))
    return weights
