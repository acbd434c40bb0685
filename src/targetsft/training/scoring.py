"""A model scored on tokenized examples: ``log p_θ(y_t)`` of each supervised token, the label probabilities, their
distribution (mean, quantiles, histogram), and the γ probe that records that distribution during training."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from targetsft.runtime.files import atomic_write_text


def label_logprobs(model: Any, items: Sequence[dict[str, Any]]) -> list[list[float]]:
    """Per tokenized example, ``log p_θ(y_t)`` of each supervised token (one forward pass each, no grad)."""
    import torch

    from targetsft.training.fused_forward import IGNORE_INDEX, unwrap

    inner = unwrap(model)
    device = next(inner.parameters()).device
    was_training = inner.training
    inner.eval()
    out: list[list[float]] = []
    try:
        with torch.no_grad():
            for item in items:
                ids = torch.tensor([item["input_ids"]], device=device)
                labels = torch.tensor(item["labels"][1:], device=device)
                keep = labels != IGNORE_INDEX
                logits = inner(input_ids=ids).logits[0, :-1][keep].float()
                out.append(torch.log_softmax(logits, -1).gather(-1, labels[keep][:, None]).flatten().tolist())
    finally:
        inner.train(was_training)
    return out


def label_probabilities(model: Any, items: Sequence[dict[str, Any]]) -> list[float]:
    """p_θ(y_t) of every supervised token of tokenized examples: γ_t itself for the γ = sg p_θ(y) methods (dft,
    target_sft, ...)."""
    return [math.exp(v) for lp in label_logprobs(model, items) for v in lp]


def probe_histogram(values: Sequence[float], bins: int = 20) -> dict[str, Any]:
    """Mean, quantiles (10/25/50/75/90%, nearest rank) and a histogram on ``bins`` equal bins of [0, 1]."""
    v = sorted(values)
    n = len(v)
    quantiles = {f"q{int(100 * q)}": v[min(n - 1, int(q * n))] for q in (0.1, 0.25, 0.5, 0.75, 0.9)} if n else {}
    hist = [0] * bins
    for x in v:
        hist[min(bins - 1, int(x * bins))] += 1
    return {"n": n, "mean": math.fsum(v) / n if n else math.nan, **quantiles, "hist": hist}


def gamma_probe(cfg: Any, examples: int, path: Path) -> Any:
    """A TrainerCallback that records :func:`probe_histogram` of :func:`label_probabilities` on the first ``examples``
    training examples at the start and about every tenth of training into ``path`` (JSON lines, one per step)."""
    from transformers import TrainerCallback

    from targetsft.runtime.models import load_tokenizer, resolve_model
    from targetsft.training.dataset import build_dataset

    small = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, size=min(examples, cfg.data.size or examples)))
    items, _ = build_dataset(small, load_tokenizer(resolve_model(cfg.model)))

    class GammaProbe(TrainerCallback):
        def _record(self, state: Any, model: Any) -> None:
            record = probe_histogram(label_probabilities(model, items))  # on every rank: sharded models need them all
            if state.is_world_process_zero:
                rows = read_probe(path) | {state.global_step: record}
                atomic_write_text(path, "".join(json.dumps({"step": k, **v}) + "\n" for k, v in sorted(rows.items())))

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._record(state, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            every = max(1, state.max_steps // 10)
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                self._record(state, model)

    return GammaProbe()


def read_probe(path: Path) -> dict[int, dict[str, Any]]:
    """``{step: distribution}`` from a probe file (a step recorded twice, after a resume: the last one)."""
    from targetsft.data.sft import read_jsonl

    return {r["step"]: {k: v for k, v in r.items() if k != "step"} for r in read_jsonl(path)} if path.is_file() else {}
