"""Deterministic label noise for robustness studies: corrupt a fraction of the training solutions.

A record is corrupted by drawing a wrong final answer ``w ≠ a`` (``a`` = the number after the completion's last
``#### ``) and writing it into the completion in one of two ways:

- ``"answer"``: only the final ``#### a`` becomes ``#### w``; the chain of thought still computes ``a``
  (a wrong final answer);
- ``"carried"``: every occurrence of the number ``a`` in the completion becomes ``w``, so the last computation
  already produces ``w`` and the error is carried to the end (a wrong number carried to the end).

Which records, and each ``w``, are a pure function of ``(seed, fraction, number of records)``:
``Random(seed)`` samples ``round(fraction · n)`` record indices and then one offset per chosen record,
``w = a + d`` with ``d`` uniform in ``{−10 … 10} \\ {0}`` (``w = a − d`` when ``a + d < 0 ≤ a``, so a non-negative
answer stays non-negative). The record's ``answer`` field, when present, becomes ``w`` as well (the data is wrong,
not only its text) and ``label_noise`` names the kind.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from random import Random
from typing import Any, Literal

__all__ = ["NOISE_KINDS", "corrupt_records"]

NoiseKind = Literal["answer", "carried"]
NOISE_KINDS: tuple[str, ...] = ("answer", "carried")
_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _format(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


def _wrong(answer: float, rng: Random) -> float:
    d = rng.choice([k for k in range(-10, 11) if k != 0])
    w = answer + d
    return answer - d if w < 0 <= answer else w


def corrupt_records(
    records: Sequence[Mapping[str, Any]], fraction: float, kind: NoiseKind = "answer", seed: int = 0
) -> tuple[list[dict[str, Any]], list[int]]:
    """``(records with round(fraction·n) of them corrupted, sorted indices of the corrupted ones)``.

    Records are returned in :func:`targetsft.data.sft.to_prompt_completion` form. A chosen record whose completion
    does not end with ``#### <number>`` raises ValueError naming its index.
    """
    from targetsft.data.sft import to_prompt_completion

    if not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label_noise must be a fraction in [0, 1], got {fraction!r}")
    if kind not in NOISE_KINDS:
        raise ValueError(f"label noise kind must be one of {NOISE_KINDS}, got {kind!r}")
    out = [to_prompt_completion(r, index=i) for i, r in enumerate(records)]
    rng = Random(seed)
    chosen = sorted(rng.sample(range(len(out)), round(fraction * len(out))))
    for i in chosen:
        completion = out[i]["completion"].rstrip()
        m = _FINAL.search(completion)
        if m is None:
            raise ValueError(f"record {i}: label noise needs a completion ending with '#### <number>'")
        a_text = m.group(1)
        a = _number(a_text)
        w = _format(_wrong(a, rng))
        if kind == "answer":
            completion = completion[: m.start()] + f"#### {w}"
        else:
            # whole-number matches of the answer as written, or of its plain form (e.g. "1,200" and "1200")
            forms = sorted({a_text, _format(a)}, key=len, reverse=True)
            pattern = r"(?<![\d.,])(?:" + "|".join(re.escape(f) for f in forms) + r")(?![\d]|[.,]\d)"
            completion = re.sub(pattern, w, completion)
        out[i] = {**out[i], "completion": completion, "answer": w, "label_noise": kind}
    return out, chosen
