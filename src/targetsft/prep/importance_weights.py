"""``target-sft importance-weights``: iw-SFT's trajectory weights ``w(τ) = q(τ)/π_ref(τ)`` for the training records.

iw-SFT (arXiv 2507.12856) weights each curated trajectory by how much more likely a target policy ``q`` finds it than
the reference ``π_ref`` it was drawn from. Here ``log w(τ) = Σ_t log q(y_t) − Σ_t log π_ref(y_t)`` over the
completion tokens (``--per-token``: divided by their number, the geometric mean ratio, which keeps long solutions
from dominating), then self-normalised so that the largest weight is 1 (the weight is the label trust γ of
``loss.method: weighted``, which must lie in [0, 1]) and floored at ``--min-weight``. The records are written with
``weight`` for ``data.train``; the raw log-ratios are kept beside it (``log_ratio``).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from targetsft.runtime.inputs import InputError


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


def add_importance_weights_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", help="training config whose data section gives the records (default: gsm-train)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    p.add_argument("--target", required=True, help="the policy q the trajectories are weighted towards (model)")
    p.add_argument("--reference", default=None, help="π_ref, the policy they came from (default: the config's model)")
    p.add_argument("--out", required=True, help="JSONL to write (records with weight and log_ratio)")
    p.add_argument("--examples", type=int, default=None, help="first N records (default: the config's data size)")
    p.add_argument("--per-token", action="store_true", help="length-normalised log-ratio (geometric mean)")
    p.add_argument("--min-weight", type=float, default=0.0, help="floor of the weights, in [0, 1] (default 0)")
    return p


def run_importance_weights_from_args(args: argparse.Namespace) -> int:
    from targetsft.data.sft import load_records, to_prompt_completion, tokenize_record
    from targetsft.runtime.files import atomic_write_text
    from targetsft.runtime.inputs import check_model
    from targetsft.runtime.models import load_model, load_tokenizer, resolve_model
    from targetsft.training.config import check_inputs, load_config
    from targetsft.training.scoring import label_logprobs

    cfg = load_config(args.config, args.overrides)
    check_inputs(cfg)
    for name, role in ((args.target, "--target"), (args.reference, "--reference")):
        check_model(name, role)
    if not 0 <= args.min_weight <= 1:
        raise InputError(f"--min-weight must be in [0, 1], got {args.min_weight}")
    records = load_records(cfg.data.train, size=args.examples or cfg.data.size, seed=cfg.data.seed)
    tokenizer = load_tokenizer(resolve_model(cfg.model))
    items = [tokenize_record(tokenizer, r, cfg.data.max_length, overflow=cfg.data.overflow) for r in records]
    kept = [(r, it) for r, it in zip(records, items, strict=True) if it is not None]
    scores: list[list[list[float]]] = []
    for name in (args.target, args.reference or cfg.model):
        scores.append(label_logprobs(load_model(resolve_model(name)), [it for _, it in kept]))
    weights, ratios = trajectory_weights(*scores, per_token=args.per_token, min_weight=args.min_weight)
    lines = []
    for (record, _), w, r in zip(kept, weights, ratios, strict=True):
        pc = to_prompt_completion(record)
        out: dict[str, Any] = {"prompt": pc["prompt"], "completion": pc["completion"], "weight": w, "log_ratio": r}
        if "answer" in record:
            out["answer"] = record["answer"]
        lines.append(json.dumps(out, ensure_ascii=False) + "\n")
    atomic_write_text(Path(args.out), "".join(lines))
    print(
        f"{len(lines)} records, weights {min(weights):.3g}–{max(weights):.3g} (mean {sum(weights) / len(weights):.3g})"
        f": {args.out}"
    )
    return 0
