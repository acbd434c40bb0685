"""The statistics against hand computations: t quantiles and intervals, McNemar's exact test, Spearman's rank
correlation with its exact p, and paired comparisons."""

from __future__ import annotations

import math

import pytest

from experiment_helpers import T2
from targetsft import experiments as X


def test_t_quantile_and_interval_by_hand():
    assert X.t_quantile(1) == pytest.approx(math.tan(math.pi / 2 * 0.95), rel=1e-12)  # Cauchy: 12.7062
    assert X.t_quantile(2) == pytest.approx(T2, rel=1e-12)  # 4.302653
    assert X.t_quantile(4) == pytest.approx(2.776445105, abs=1e-9)  # tables
    assert X.t_quantile(29) == pytest.approx(2.045229642, abs=1e-9)
    assert X.t_quantile(100_000) == pytest.approx(1.959963985, abs=1e-4)  # → the normal quantile
    assert X.t_quantile(2, 0.90) == pytest.approx(0.90 * math.sqrt(2 / (1 - 0.90**2)), rel=1e-12)
    m, lo, hi = X.t_interval([0.1, 0.2, 0.3])  # s = 0.1, n = 3
    assert (
        m == pytest.approx(0.2)
        and hi - m == pytest.approx(T2 * 0.1 / math.sqrt(3))
        and m - lo == pytest.approx(0.2484138, abs=1e-7)
    )
    assert X.t_interval([0.4])[0] == 0.4 and math.isnan(X.t_interval([0.4])[1]) and math.isnan(X.t_interval([])[0])


def test_mcnemar_exact_by_hand():
    assert X.mcnemar_exact(1, 7) == pytest.approx(2 * (1 + 8) / 2**8)  # 0.0703125
    assert X.mcnemar_exact(0, 5) == pytest.approx(2 / 2**5)
    assert X.mcnemar_exact(3, 3) == 1.0 and X.mcnemar_exact(0, 0) == 1.0


def _spearman_by_hand(x, y):
    """Pearson's r of the ranks, ties at their mean rank."""

    def ranks(v):
        return [sum(w < a for w in v) + (sum(w == a for w in v) + 1) / 2 for a in v]

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


@pytest.mark.parametrize(
    "x, y",
    [
        ([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]),  # ρ = −1: only the reversal reaches it, and the identity |ρ| = 1
        ([68.6, 96.6, 97.7, 97.7, 83.3], [2.7, 7.7, 8.3, 6.0, 4.0]),  # a tie in x
        ([0.1, 0.4, 0.2, 0.9], [3.0, 1.0, 1.0, 2.0]),  # a tie in y
    ],
)
def test_rank_correlation_by_hand(x, y):
    """Spearman's ρ from the ranks by hand, and the two-sided p from all n! pairings enumerated here."""
    import itertools

    r = X.rank_correlation(x, y)
    rho = _spearman_by_hand(x, y)
    assert r["rho"] == pytest.approx(rho, abs=1e-12) and r["n"] == len(x) and r["exact"]
    null = [_spearman_by_hand(list(p), y) for p in itertools.permutations(x)]
    upper = sum(v >= rho - 1e-12 for v in null) / len(null)
    lower = sum(v <= rho + 1e-12 for v in null) / len(null)
    assert r["p"] == pytest.approx(min(1.0, 2 * min(upper, lower)))
    if len(x) == 5 and abs(rho) == pytest.approx(1):
        assert r["p"] == pytest.approx(2 / 120)  # the smallest p of 5 points


def test_rank_correlation_undefined_and_bad_input():
    for x, y in (([1, 2], [2, 1]), ([1, 1, 1], [1, 2, 3]), ([1, 2, 3], [4, 4, 4])):
        r = X.rank_correlation(x, y)
        assert math.isnan(r["rho"]) and math.isnan(r["p"]) and not r["exact"]
    with pytest.raises(ValueError, match="differ in length"):
        X.rank_correlation([1, 2, 3], [1, 2])
    big = X.rank_correlation(list(range(12)), [v * v for v in range(12)])  # 12! pairings: a seeded sample
    assert big["rho"] == pytest.approx(1.0) and not big["exact"] and big["p"] < 0.01


def test_paired_comparison_by_hand():
    a = {0: {"p1": 1, "p2": 1, "p3": 0, "p4": 1}, 1: {"p1": 1, "p2": 0, "p3": 0, "p4": 1}}
    b = {0: {"p1": 0, "p2": 1, "p3": 0, "p4": 0}, 1: {"p1": 0, "p2": 0, "p3": 1, "p4": 0}}
    c = X.paired_comparison(a, b, binary=True)
    # per problem, mean over seeds of a − b: p1 1, p2 0, p3 −0.5, p4 1 → mean 0.375, s = 0.75, n = 4
    assert c["diff"] == pytest.approx(0.375)
    assert c["diff"] - c["lo"] == pytest.approx(3.182446305 * 0.75 / 2, abs=1e-8) and c["hi"] == 1.0  # clipped
    assert (c["a_better"], c["b_better"], c["n_problems"], c["n_seeds"]) == (4, 1, 4, 2)
    assert c["p_mcnemar"] == pytest.approx(2 * (1 + 5) / 2**5) and c["verdict"] == "tie"
    base = {None: {f"p{i}": 0 for i in range(10)}}  # a baseline pairs with every seed
    win = X.paired_comparison(
        {0: {f"p{i}": 1 for i in range(10)}, 1: {f"p{i}": 1 for i in range(10)}}, base, binary=True
    )
    assert (win["diff"], win["verdict"], win["n_seeds"], win["a_better"]) == (1.0, "win", 2, 20)
    loss = X.paired_comparison(base, {0: {f"p{i}": 0.5 + (i % 2) / 4 for i in range(10)}}, binary=False)
    assert loss["verdict"] == "loss" and loss["p_mcnemar"] is None and loss["diff"] == pytest.approx(-0.625)
