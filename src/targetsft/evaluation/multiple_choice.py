"""Multiple-choice sets scored by log-likelihood, without generation.

:func:`evaluate_multiple_choice` scores every choice by its log-likelihood as a continuation, without generation:
context ``"Question: {question}\\nAnswer:"`` (:func:`mc_context`), continuation ``" " + choice`` (each tokenized
without special tokens and concatenated, so no BPE merge crosses the boundary). This is the plain-text format of
lm-evaluation-harness' PIQA / CommonsenseQA / OpenBookQA tasks (the way SmolLM2's own scores are measured). No chat
template: these sets measure knowledge retained from pre-training (forgetting), the same prompt must work for a base
and a fine-tuned model, and a chat turn would also score the template's ``<|im_end|>`` layout rather than the
answer. The prediction is the choice with the highest mean log-prob per continuation token (``normalize="mean"``,
length-normalised; default) or the highest sum (``"sum"``); both accuracies are always reported.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any, Literal

import torch

from targetsft.evaluation.engines import model_device
from targetsft.evaluation.generation_set import _jsonl, _model_name, _versions, _write_outputs, set_label
from targetsft.evaluation.metrics import _metric
from targetsft.runtime.vllm_engine import is_vllm


def mc_context(question: str) -> str:
    """The multiple-choice context: ``"Question: {question}\\nAnswer:"``; each choice is scored as ``" " + choice``."""
    return f"Question: {question.strip()}\nAnswer:"


def score_continuations(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "score",
) -> list[tuple[float, int]]:
    """``(sum of log p(continuation tokens | context), number of continuation tokens)`` for each ``(context,
    continuation)``. Context and continuation are tokenized separately without special tokens and concatenated;
    batches of ``batch_size`` sequences sorted by length, right padded; one forward pass per batch. ``model`` may be a
    :class:`~targetsft.runtime.vllm_engine.VLLMEngine`: then vLLM's prompt log-probs, one request per sequence."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ctx = tokenizer([c for c, _ in pairs], add_special_tokens=False)["input_ids"] if pairs else []
    cont = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"] if pairs else []
    for i, (c, k) in enumerate(zip(ctx, cont, strict=True)):
        if not c or not k:
            raise ValueError(f"pair {i}: context and continuation must both be non-empty after tokenization")
    seqs = [list(c) + list(k) for c, k in zip(ctx, cont, strict=True)]
    if is_vllm(model):  # the log-prob of every token after the first, from vLLM's prompt log-probs
        rows = model.prompt_logprobs(seqs, 0)
        return [(sum(r[2] for r in rows[i][len(c) - 1 :]), len(k)) for i, (c, k) in enumerate(zip(ctx, cont))]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model_device(model)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(seqs), desc=desc, disable=not progress, leave=False) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(seqs[i]) for i in idx)
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
                    mask[r, : len(seqs[i])] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                for r, i in enumerate(idx):
                    c, n = len(ctx[i]), len(cont[i])
                    lp = torch.log_softmax(logits[r, c - 1 : c + n - 1].float(), dim=-1)
                    tgt = torch.tensor(cont[i], device=lp.device)
                    out[i] = (float(lp.gather(-1, tgt[:, None]).sum()), n)
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return out


def evaluate_multiple_choice(
    model: Any,
    tokenizer: Any,
    set_name: str,
    *,
    size: int | str | None = None,
    data_seed: int | None = None,
    batch_size: int = 16,
    normalize: Literal["mean", "sum"] = "mean",
    out_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
    confidence: float = 0.95,
    progress: bool = True,
) -> dict[str, Any]:
    """Log-likelihood multiple-choice accuracy on a set of :data:`~targetsft.data.eval_sets.MC_SETS` (or a
    ``.jsonl`` with question/choices/answer_index); no generation.

    Each choice is scored as the continuation ``" " + choice`` of :func:`mc_context` (see the module docstring).
    ``normalize``: predict by the mean log-prob per continuation token (``"mean"``, default) or by the sum
    (``"sum"``). The summary has ``metrics.accuracy`` (by ``normalize``), ``accuracy_mean`` and ``accuracy_sum``,
    each with a Wilson interval. ``out_dir``: also ``<set>.mc.jsonl`` (per item: id, answer_index, pred_mean,
    pred_sum, logprob_sum, n_tokens per choice) and ``<set>.summary.json``, written atomically.
    """
    from targetsft.data.eval_sets import load_mc_set

    if normalize not in ("mean", "sum"):
        raise ValueError(f"normalize must be 'mean' or 'sum', got {normalize!r}")
    items = load_mc_set(set_name, size, data_seed)
    pairs = [(mc_context(it["question"]), " " + str(ch).strip()) for it in items for ch in it["choices"]]
    t0 = time.perf_counter()
    scores = score_continuations(model, tokenizer, pairs, batch_size=batch_size, progress=progress, desc=set_name)
    seconds = time.perf_counter() - t0
    records, pos = [], 0
    for it in items:
        sc = scores[pos : pos + len(it["choices"])]
        pos += len(it["choices"])
        sums = [s for s, _ in sc]
        means = [s / n for s, n in sc]
        records.append(
            {
                "id": it["id"],
                "answer_index": it["answer_index"],
                "pred_mean": max(range(len(means)), key=means.__getitem__),
                "pred_sum": max(range(len(sums)), key=sums.__getitem__),
                "logprob_sum": sums,
                "n_tokens": [n for _, n in sc],
            }
        )
    acc_mean = _metric([float(r["pred_mean"] == r["answer_index"]) for r in records], confidence)
    acc_sum = _metric([float(r["pred_sum"] == r["answer_index"]) for r in records], confidence)
    summary: dict[str, Any] = {
        "set": set_name,
        "kind": "multiple_choice",
        "n": len(items),
        "metrics": {
            "accuracy": acc_mean if normalize == "mean" else acc_sum,
            "accuracy_mean": acc_mean,
            "accuracy_sum": acc_sum,
        },
        "normalize": normalize,
        "confidence": confidence,
        "format": {"context": "Question: {question}\\nAnswer:", "continuation": " {choice}"},
        "model": model_name or _model_name(model),
        "data": {"size": size, "data_seed": data_seed},
        "batch_size": batch_size,
        "engine": "vllm" if is_vllm(model) else "transformers",
        "seconds": seconds,
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if out_dir is not None:
        _write_outputs(out_dir, set_label(set_name), "mc.jsonl", _jsonl(records), summary)
    return summary
