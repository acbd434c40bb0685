"""Statistics of an experiment's results.

Statistics
----------
* Over seeds: mean and the t-interval ``mean ± t_{0.975,n−1}·s/√n`` (:func:`t_interval`; ``s`` with ``n − 1``);
  with one run the table shows that run's own interval over problems instead (marked ``*``).
* Paired, config A − config B, on the problems both evaluated and the seeds both ran (a baseline pairs with every
  seed): per problem the mean over seeds of ``a − b``, then the t-interval over problems (problems are the unit:
  the seeds of one problem are not independent). For 0/1 metrics, also the exact McNemar test on the discordant
  (seed, problem) pairs: ``p = min(1, 2·P(X ≤ min(b, c)))``, ``X ~ Bin(b + c, 1/2)`` (:func:`mcnemar_exact`).
  A difference is a ``win``/``loss`` only when its interval excludes 0, else a ``tie``.
* Across configs, a property against an accuracy (one point per config): Spearman's ρ and its two-sided
  permutation p-value, exact (all n! pairings) for n ≤ 8 (:func:`rank_correlation`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def t_quantile(df: int, confidence: float = 0.95) -> float:
    """The two-sided Student-t quantile t_{(1+c)/2, df}: the t with P(|T| ≤ t) = c (``scipy.stats.t.ppf``)."""
    from scipy import stats

    if not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an int >= 1, got {df!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(stats.t.ppf(0.5 + confidence / 2, df))


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and t-interval ``mean ± t_{(1+c)/2, n−1}·s/√n`` (``s``: sample sd with n − 1); n = 1: NaN bounds,
    n = 0: all NaN."""
    from targetsft.evaluation.metrics import mean_interval

    return mean_interval(values, lambda n: t_quantile(n - 1, confidence))


def mcnemar_exact(b: int, c: int) -> float:
    """Exact McNemar test on ``b`` (A right, B wrong) and ``c`` (A wrong, B right) discordant pairs: the two-sided
    binomial test of ``b`` in ``b + c`` at 1/2 (``scipy.stats.binomtest``), ``min(1, 2·P(X ≤ min(b, c)))``; 1 without
    discordant pairs."""
    from scipy import stats

    return 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)


def paired_comparison(
    a: dict[Any, dict[str, float]], b: dict[Any, dict[str, float]], *, binary: bool, confidence: float = 0.95
) -> dict[str, Any]:
    """A − B over the same problems and seeds. ``a``/``b``: ``{seed: {problem id: value}}`` (a side with the single
    seed None, a baseline, pairs with every seed of the other). Per problem the mean over seeds of ``a − b``, its
    mean and t-interval over problems; for 0/1 values also McNemar on the discordant (seed, problem) pairs."""
    if None in a or None in b:  # a baseline: its one evaluation pairs with every seed of the other side
        seeds = sorted((set(a) | set(b)) - {None}) or [None]
    else:
        seeds = sorted(set(a) & set(b))
    diffs: dict[str, list[float]] = {}
    n_ab = n_ba = 0
    for s in seeds:
        va, vb = (a[s] if s in a else a[None]), (b[s] if s in b else b[None])
        for pid in va.keys() & vb.keys():
            diffs.setdefault(pid, []).append(va[pid] - vb[pid])
            n_ab += va[pid] > vb[pid]
            n_ba += va[pid] < vb[pid]
    per_problem = [math.fsum(d) / len(d) for d in diffs.values()]
    mean, lo, hi = t_interval(per_problem, confidence)
    lo, hi = max(-1.0, lo), min(1.0, hi)  # differences of fractions
    verdict = "win" if lo > 0 else "loss" if hi < 0 else "tie"
    return {
        "diff": mean,
        "lo": lo,
        "hi": hi,
        "n_problems": len(per_problem),
        "n_seeds": len(seeds),
        "a_better": n_ab,
        "b_better": n_ba,
        "p_mcnemar": mcnemar_exact(n_ab, n_ba) if binary else None,
        "verdict": verdict if not math.isnan(lo) else "n/a",
    }


#: the largest n whose permutation test enumerates all n! pairings (8! = 40,320); above it, a seeded sample
EXACT_PERMUTATIONS_UP_TO = 8


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """Spearman's ρ of ``x`` and ``y`` (``scipy.stats.spearmanr``, ties at their mean rank) and its two-sided
    permutation p-value ``min(1, 2·min(P(ρ_π ≥ ρ), P(ρ_π ≤ ρ)))`` over the pairings π of ``x`` with ``y``
    (``scipy.stats.permutation_test``): exact for n ≤ ``EXACT_PERMUTATIONS_UP_TO``, else 9,999 seeded pairings.
    NaN for n < 3 or a constant side."""
    from scipy import stats

    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} and {len(y)}")
    n = len(x)
    nan = {"rho": math.nan, "p": math.nan, "n": n, "exact": False}
    if n < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return nan

    def rho(a: Sequence[float]) -> float:
        return float(stats.spearmanr(a, y).statistic)

    exact = n <= EXACT_PERMUTATIONS_UP_TO
    test = stats.permutation_test(
        (list(x),),
        rho,
        permutation_type="pairings",
        n_resamples=math.factorial(n) if exact else 9_999,
        alternative="two-sided",
        rng=0,
    )
    return {"rho": float(test.statistic), "p": float(test.pvalue), "n": n, "exact": exact}
