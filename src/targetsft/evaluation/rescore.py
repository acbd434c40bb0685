"""Scoring a set's recorded items again, without a model: the texts of a ``<set>.generations.jsonl`` checked against
their gold answers by :mod:`~targetsft.evaluation.answers`, the log-probs of a ``<set>.mc.jsonl`` picked from again,
and the set's metrics computed from those outcomes as the evaluation computes them
(:mod:`~targetsft.evaluation.metrics`). The file may be gzip-compressed (``.jsonl.gz``, or a ``.jsonl`` that only
its ``.gz`` holds: :func:`~targetsft.data.sft.read_jsonl`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

from targetsft.data.sft import read_jsonl
from targetsft.evaluation.answers import is_correct, is_correct_boxed
from targetsft.evaluation.metrics import _metric, generation_metrics

# a generated item's outcome: each sample's correctness and the greedy answer's (None: no greedy answer recorded)
GenerationOutcome = tuple[list[bool], bool | None]


def _generation_outcome(item: dict[str, Any], check: Callable[[str, Any], bool] | None) -> GenerationOutcome:
    """The item's outcome, as recorded (``check`` None: its ``correct`` fields) or checked again by ``check``."""

    def score(g: dict[str, Any]) -> bool:
        return bool(g["correct"]) if check is None else bool(check(g["text"], item["gold"]))

    greedy = item.get("greedy")
    return [score(s) for s in item["samples"]], None if greedy is None else score(greedy)


def _pick(values: Sequence[float]) -> int:
    """The index of the largest value, the first one on a tie (as the evaluation picks)."""
    return max(range(len(values)), key=values.__getitem__)


def _choice_outcome(item: dict[str, Any], again: bool) -> tuple[int, int]:
    """The item's picks by the mean log-prob per token and by the sum, as recorded or picked again."""
    if not again:
        return item["pred_mean"], item["pred_sum"]
    sums = item["logprob_sum"]
    return _pick([s / n for s, n in zip(sums, item["n_tokens"])]), _pick(sums)


def rescore_generations(
    items: Sequence[dict[str, Any]], prompt: str = "gsm", confidence: float = 0.95
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The metrics of generated items (``{id, gold, samples: [{text, correct, ...}], greedy: {...} or null}``), each
    text checked again against its gold answer (``is_correct_boxed`` for the ``boxed`` prompt, else
    ``is_correct``; ``greedy`` only when every item has a greedy answer), and the ids of the items whose outcome
    differs from the recorded one."""
    check = is_correct_boxed if prompt == "boxed" else is_correct
    outcomes = [_generation_outcome(item, check) for item in items]
    changed = [item["id"] for item, o in zip(items, outcomes) if o != _generation_outcome(item, None)]
    greedy = [g for _, g in outcomes]
    metrics = generation_metrics([c for c, _ in outcomes], greedy if items and None not in greedy else None, confidence)
    return metrics, changed


def rescore_choices(
    items: Sequence[dict[str, Any]], normalize: Literal["mean", "sum"] = "mean", confidence: float = 0.95
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The metrics of multiple-choice items (``{id, answer_index, pred_mean, pred_sum, logprob_sum, n_tokens}``),
    each choice picked again from its summed log-prob and from its mean per token (``accuracy`` by ``normalize``,
    ``accuracy_mean``, ``accuracy_sum``), and the ids of the items whose picks differ from the recorded ones."""
    picks = [_choice_outcome(item, True) for item in items]
    changed = [item["id"] for item, p in zip(items, picks) if p != _choice_outcome(item, False)]
    acc_mean = _metric([float(m == item["answer_index"]) for item, (m, _) in zip(items, picks)], confidence)
    acc_sum = _metric([float(s == item["answer_index"]) for item, (_, s) in zip(items, picks)], confidence)
    metrics = {"accuracy": acc_mean if normalize == "mean" else acc_sum, "accuracy_mean": acc_mean}
    return {**metrics, "accuracy_sum": acc_sum}, changed


def rescore_items(
    path: str | os.PathLike,
    *,
    prompt: str = "gsm",
    normalize: Literal["mean", "sum"] = "mean",
    confidence: float = 0.95,
) -> dict[str, Any]:
    """An evaluation's items file scored again (:func:`rescore_generations`, or :func:`rescore_choices` for
    multiple-choice items, which have ``answer_index``); ``prompt`` and ``normalize``: the set's, as it was
    evaluated. Returns ``{"n": items, "metrics": {...}, "changed": [ids whose outcome differs from the
    recorded]}``."""
    items = read_jsonl(path)
    if items and "answer_index" in items[0]:
        metrics, changed = rescore_choices(items, normalize, confidence)
    else:
        metrics, changed = rescore_generations(items, prompt, confidence)
    return {"n": len(items), "metrics": metrics, "changed": changed}
