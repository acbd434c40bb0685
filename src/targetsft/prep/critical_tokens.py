"""``target-sft mark-critical``: find the critical tokens of GSM solutions by counterfactual rollouts (CFT).

Critical-token fine-tuning (arXiv 2510.10974) trains only on the tokens of a correct solution that decide its
outcome: ``y_t`` is critical when every alternative ``ỹ_t ∈ A_t`` makes the continuation wrong,
``c_t = 1[∀ỹ_t ∈ A_t: Correct(y_<t, ỹ_t, ·) = 0]``. Here, at a small and stated budget:

* ``A_t`` is the model's ``alternatives`` most likely tokens other than ``y_t`` at that position;
* the positions examined are the completion tokens whose text holds a digit (``positions="numbers"``: the numbers a
  GSM solution computes, where a change can move the answer) or every completion token (``"all"``); tokens not
  examined are marked 0 (not critical);
* each rollout decodes the prefix ``y_<t, ỹ_t`` back to text, continues it greedily (the compact engine, early stop at
  a complete ``#### n``, ``max_new_tokens``) and checks the final answer with math-verify. Re-tokenizing the decoded
  prefix can merge the last tokens differently from the ids it came from: the rollout is of the text, not of the
  exact ids.

The output is a JSONL file of the records with ``token_weights`` (1 critical, 0 not), one per completion token, to
train with ``loss.method: critical`` and ``data.train: <that file>`` (:func:`~targetsft.data.sft.aligned_token_weights`
checks the alignment), plus per-record counts. Cost: ``alternatives`` rollouts per examined token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from targetsft.runtime.inputs import InputError

if TYPE_CHECKING:
    from targetsft.training.config import TrainConfig

POSITIONS = ("numbers", "all")
_DIGIT = re.compile(r"\d")


def _examined(tokenizer: Any, completion_ids: Sequence[int], positions: str) -> list[int]:
    """Indices into the completion of the tokens to examine (the last one, the end of turn, never)."""
    idx = range(len(completion_ids) - 1)
    if positions == "all":
        return list(idx)
    return [k for k in idx if _DIGIT.search(tokenizer.decode([completion_ids[k]]))]


def mark_record(
    model: Any,
    tokenizer: Any,
    record: dict[str, Any],
    *,
    alternatives: int = 2,
    positions: str = "numbers",
    max_new_tokens: int = 128,
    batch_size: int = 32,
) -> dict[str, Any]:
    """``record`` as prompt/completion with ``token_weights`` (1 on its critical tokens) and the counts
    ``examined``, ``critical``, ``rollouts``."""
    import torch

    from targetsft.data.sft import to_prompt_completion, tokenize_record
    from targetsft.evaluation.answers import is_correct
    from targetsft.evaluation.engines import generate_detailed

    pc = to_prompt_completion(record)
    answer = record.get("answer")
    if answer is None:
        raise InputError("mark-critical needs an 'answer' field in every record (the rollouts are checked on it)")
    item = tokenize_record(tokenizer, record, 1 << 30)
    ids, labels = item["input_ids"], item["labels"]
    start = next(t for t, label in enumerate(labels) if label != -100)
    completion = ids[start:]
    chosen = _examined(tokenizer, completion, positions)
    inner = model.eval()
    with torch.no_grad():
        logits = inner(input_ids=torch.tensor([ids], device=next(inner.parameters()).device)).logits[0].float()
    prompt_text = tokenizer.decode(ids[:start])
    prefixes, owner = [], []
    for k in chosen:
        row = logits[start + k - 1].clone()
        row[completion[k]] = float("-inf")  # the alternatives are the other tokens
        for alt in row.topk(alternatives).indices.tolist():
            prefixes.append(tokenizer.decode(completion[:k] + [alt]))
            owner.append(k)
    texts = []
    if prefixes:
        run = generate_detailed(
            inner,
            tokenizer,
            [prompt_text + p for p in prefixes],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=False,
        )
        texts = [p + outs[0].text for p, outs in zip(prefixes, run.outputs, strict=True)]
    survives = {k: False for k in chosen}
    for k, text in zip(owner, texts, strict=True):
        survives[k] = survives[k] or is_correct(text, answer)
    flags = [0.0] * len(completion)
    for k in chosen:
        flags[k] = 0.0 if survives[k] else 1.0
    return {
        "prompt": pc["prompt"],
        "completion": pc["completion"],
        "answer": answer,
        "token_weights": flags,
        "examined": len(chosen),
        "critical": int(sum(flags)),
        "rollouts": len(prefixes),
    }


def mark_critical(
    cfg: TrainConfig,
    out: str | Path,
    *,
    model: str | None = None,
    examples: int = 8,
    alternatives: int = 2,
    positions: str = "numbers",
    max_new_tokens: int = 128,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """:func:`mark_record` on the first ``examples`` records of the config's training data, rolled out by ``model``
    (default: the config's), written to ``out`` (JSONL); the marked records."""
    from tqdm.auto import tqdm

    from targetsft.data.sft import load_records
    from targetsft.runtime.files import atomic_write_text
    from targetsft.runtime.models import load_model, load_tokenizer, resolve_model

    if examples < 1 or alternatives < 1:
        raise InputError("--examples and --alternatives must be >= 1")
    records = load_records(cfg.data.train, size=examples, seed=cfg.data.seed)
    path = resolve_model(model or cfg.model)
    tokenizer, loaded = load_tokenizer(path, padding_side="left"), load_model(path)
    options = {"alternatives": alternatives, "positions": positions, "max_new_tokens": max_new_tokens}
    marked = [
        mark_record(loaded, tokenizer, r, batch_size=batch_size, **options)
        for r in tqdm(records, desc="mark-critical", unit="record")
    ]
    atomic_write_text(Path(out), "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in marked))
    return marked
