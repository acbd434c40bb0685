"""return_stats=True: per-token means of γ, p(y), NLL, Q(y), H(π̃), accuracy and the token count (item 10)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import targetsft
from test_reference import IGNORE, SIGNED, all_cases, case_id, label_of, make_batch, reference_target, side_kwargs

KEYS = {"gamma", "p_label", "nll", "q_label", "residual_entropy", "accuracy", "tokens"}


def test_stats_for_dft():
    """dft: gamma mean = mean p_y = p_label; nll = F.cross_entropy; q_label = mean(2p_y − p_y²);
    residual_entropy = mean H(p); accuracy = argmax accuracy; tokens = number of kept labels."""
    b = make_batch(80)
    loss, stats = targetsft.target_loss(b.logits, b.labels, method="dft", return_stats=True)
    assert set(stats) == KEYS
    v = b.valid
    p = torch.softmax(b.logits, -1)
    p_y = label_of(p, b.labels)[v]
    assert stats["tokens"] == b.n_valid
    assert stats["gamma"] == pytest.approx(p_y.mean().item(), abs=1e-12)
    assert stats["p_label"] == pytest.approx(p_y.mean().item(), abs=1e-12)
    nll = F.cross_entropy(b.logits.reshape(-1, 11), b.labels.reshape(-1), ignore_index=IGNORE)
    assert stats["nll"] == pytest.approx(nll.item(), abs=1e-12)
    assert stats["q_label"] == pytest.approx((2 * p_y - p_y**2).mean().item(), abs=1e-12)
    h = -(p * p.log()).sum(-1)[v]
    assert stats["residual_entropy"] == pytest.approx(h.mean().item(), abs=1e-12)
    acc = (b.logits.argmax(-1) == b.labels)[v].double().mean()
    assert stats["accuracy"] == pytest.approx(acc.item(), abs=1e-12)
    plain = targetsft.target_loss(b.logits, b.labels, method="dft")
    torch.testing.assert_close(loss, plain, rtol=0, atol=0)


@pytest.mark.parametrize("case", all_cases(), ids=case_id)
def test_stats_match_reference_for_every_method(case):
    """For every method: gamma, q_label and residual_entropy are the reference's per-token means."""
    method, params = case
    b = make_batch(81)
    side = side_kwargs(method, b)
    _, stats = targetsft.target_loss(b.logits, b.labels, method=method, return_stats=True, **side, **params)
    r = reference_target(method, b.logits, b.labels, **side, **params)
    v = b.valid
    assert stats["gamma"] == pytest.approx(r.gamma.expand(b.labels.shape)[v].mean().item(), abs=1e-10)
    assert stats["q_label"] == pytest.approx(label_of(r.q, b.labels)[v].mean().item(), abs=1e-10)
    if method in SIGNED:  # a signed residual has no entropy
        assert math.isnan(stats["residual_entropy"])
    elif r.residual is not None:
        h = -torch.special.xlogy(r.residual, r.residual).sum(-1)[v]
        assert stats["residual_entropy"] == pytest.approx(h.mean().item(), abs=1e-10)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_stats_do_not_depend_on_reduction(reduction):
    """The stats are per-token means whatever the reduction of the loss."""
    b = make_batch(82)
    _, s1 = targetsft.target_loss(b.logits, b.labels, method="dft", return_stats=True)
    _, s2 = targetsft.target_loss(b.logits, b.labels, method="dft", return_stats=True, reduction=reduction)
    assert s1 == pytest.approx(s2, abs=1e-12)
