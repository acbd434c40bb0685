"""Metrics of generative sets and their intervals over problems.

With ``k`` samples per problem and ``c_i`` of them correct on problem ``i`` (``n`` problems):

* ``average@k`` = mean over problems of ``c_i / k`` (the paper's Average@k; the expected accuracy of one sample),
* ``pass@k`` = fraction of problems with at least one correct sample, and, for ``k > 1``, the unbiased estimates
  ``pass@j`` for ``j`` in 1, 2, 4, … < k: mean over problems of ``1 - C(k - c_i, j) / C(k, j)`` (Chen et al. 2021;
  ``pass@1`` equals ``average@k``),
* ``greedy`` = accuracy of one greedy answer per problem (a separate greedy pass unless the samples are greedy).

95% intervals are over problems (the samples of one problem are not independent draws of the benchmark):

* per-problem values that are all 0 or 1 (greedy accuracy, pass@k, average@1, multiple-choice accuracy): the
  **Wilson score interval** (:func:`wilson_ci`), which stays inside [0, 1] and does not collapse to a point at 0% or
  100% (the pilot's accuracies sit at 0–12%);
* other per-problem means (``average@k`` for ``k > 1``, unbiased ``pass@j``): the **normal interval**
  (:func:`mean_ci`) ``mean ± z·s/√n`` with ``s`` the sample standard deviation (``n − 1``) and ``z`` the normal
  quantile (1.96 for 95%), clipped to [0, 1]. Closed form, deterministic. A t quantile would widen it by about
  2.5% at n = 50 and 0.4% at n = 300.

Compare two models on the same problems with a paired test on the per-problem results in the JSONL files, not by
checking whether these intervals overlap.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values`` and its normal-approximation interval ``mean ± z·s/√n`` (``s``: sample standard
    deviation with ``n − 1``; ``z``: the two-sided normal quantile, 1.959964 for 95%). Not clipped.
    ``n == 0``: all NaN; ``n == 1``: NaN bounds."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    return mean_interval(values, lambda n: z)


def mean_interval(values: Iterable[float], quantile: Callable[[int], float]) -> tuple[float, float, float]:
    """``(mean, mean − half, mean + half)`` with ``half = quantile(n)·s/√n`` (``s``: sample standard deviation with
    ``n − 1``); ``n == 0``: all NaN; ``n == 1``: NaN bounds. Shared by the normal and the t intervals."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return math.nan, math.nan, math.nan
    m = math.fsum(vals) / n
    if n == 1:
        return m, math.nan, math.nan
    s = math.sqrt(math.fsum((v - m) ** 2 for v in vals) / (n - 1))
    half = quantile(n) * s / math.sqrt(n)
    return m, m - half, m + half


def wilson_ci(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """Proportion ``successes / n`` and its Wilson score interval (``scipy.stats.binomtest(...).proportion_ci``,
    ``method="wilson"``; all NaN when ``n == 0``)."""
    from scipy import stats

    if n == 0:
        return math.nan, math.nan, math.nan
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n], got {successes} of {n}")
    ci = stats.binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return successes / n, float(ci.low), float(ci.high)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 − C(n − c, k) / C(n, k)`` (k ≤ n)."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"need 0 < k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _metric(values: Sequence[float], confidence: float) -> dict[str, Any]:
    """Mean of per-problem values with a 95% interval: Wilson when all are 0/1, else normal clipped to [0, 1]."""
    vals = [float(v) for v in values]
    if all(v in (0.0, 1.0) for v in vals):
        m, lo, hi = wilson_ci(int(sum(vals)), len(vals), confidence)
        method = "wilson"
    else:
        m, lo, hi = mean_ci(vals, confidence)
        lo, hi, method = max(0.0, lo), min(1.0, hi), "normal"
    return {"value": _num(m), "lo": _num(lo), "hi": _num(hi), "n": len(vals), "ci": method}


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


def generation_metrics(
    correct: Sequence[Sequence[bool]],
    greedy_correct: Sequence[bool] | None = None,
    confidence: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Metrics from per-problem correctness: ``correct[i]`` = the k sample results of problem ``i`` (same k for
    all), ``greedy_correct[i]`` = its greedy result. Keys: ``average@k``, ``pass@k``, ``pass@j`` (unbiased, j = 1,
    2, 4, … < k, only for k > 1) and ``greedy``; each ``{value, lo, hi, n, ci}`` (see the module docstring)."""
    out: dict[str, dict[str, Any]] = {}
    if correct:
        ks = {len(c) for c in correct}
        if len(ks) != 1 or 0 in ks:
            raise ValueError(f"every problem needs the same number k >= 1 of samples, got {sorted(ks)}")
        k = ks.pop()
        out[f"average@{k}"] = _metric([sum(map(bool, c)) / k for c in correct], confidence)
        out[f"pass@{k}"] = _metric([float(any(c)) for c in correct], confidence)
        j = 1
        while j < k:
            out[f"pass@{j}"] = _metric([pass_at_k(k, sum(map(bool, c)), j) for c in correct], confidence)
            j *= 2
    if greedy_correct is not None:
        out["greedy"] = _metric([float(bool(c)) for c in greedy_correct], confidence)
    return out
