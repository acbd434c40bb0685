"""Reductions, num_items_in_batch and gradient accumulation (issue item 4)."""

from __future__ import annotations

import pytest
import torch

import targetsft
from test_reference import IGNORE, expected_grad, make_batch, reference_target, side_kwargs

ATOL = 1e-10
METHODS = ["sft", "dft", "label_smoothing", "target_sft", "kd", "asft", "eaft", "weighted"]


def _loss_grad(b, method, **kw):
    z = b.logits.clone().requires_grad_(True)
    loss = targetsft.target_loss(z, b.labels, method=method, **side_kwargs(method, b), **kw)
    loss.backward()
    return loss.detach(), z.grad


@pytest.mark.parametrize("method", METHODS)
def test_sum_is_mean_times_count(method):
    """reduction='sum' = 'mean' × number of kept tokens, for values and gradients."""
    b = make_batch(30)
    lm, gm = _loss_grad(b, method, reduction="mean")
    ls, gs = _loss_grad(b, method, reduction="sum")
    torch.testing.assert_close(ls, lm * b.n_valid, rtol=1e-12, atol=ATOL)
    torch.testing.assert_close(gs, gm * b.n_valid, rtol=1e-12, atol=ATOL)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch_divides_the_sum(method, as_tensor):
    """num_items_in_batch = n (int or tensor) gives sum / n, gradient included."""
    b = make_batch(31)
    n = 37
    ls, gs = _loss_grad(b, method, reduction="sum")
    ln, gn = _loss_grad(b, method, reduction="mean", num_items_in_batch=torch.tensor(n) if as_tensor else n)
    torch.testing.assert_close(ln, ls / n, rtol=1e-12, atol=ATOL)
    torch.testing.assert_close(gn, gs / n, rtol=1e-12, atol=ATOL)


def _topk(b, k=4):
    vals, ids = torch.log_softmax(b.teacher_logits, -1).topk(k, -1)
    return ids, vals


@pytest.mark.parametrize(
    "method,use_topk", [("dft", False), ("target_sft", True), ("target_sft", False), ("kd", True), ("asft", False)]
)
def test_micro_batches_with_shared_num_items_sum_to_full_batch(method, use_topk):
    """Splitting a batch into micro-batches with a shared num_items_in_batch and summing their gradients
    reproduces the whole-batch gradient (and loss); the shared n is the whole batch's kept-token count."""
    b = make_batch(32, lead=(6, 5))
    n = b.n_valid
    ids, vals = _topk(b)

    def side(rows):
        out = {}
        if method in ("target_sft", "kd"):
            if use_topk:
                out["teacher_topk"] = (ids[rows], vals[rows])
            else:
                out["teacher_logits"] = b.teacher_logits[rows]
        if method == "asft":
            out["ref_logits"] = b.ref_logits[rows]
        return out

    z = b.logits.clone().requires_grad_(True)
    full = targetsft.target_loss(z, b.labels, method=method, **side(slice(None)))
    full.backward()
    z_micro = b.logits.clone().requires_grad_(True)
    total = 0.0
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):
        part = targetsft.target_loss(z_micro[rows], b.labels[rows], method=method, num_items_in_batch=n, **side(rows))
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(z_micro.grad, z.grad, rtol=0, atol=ATOL)
    torch.testing.assert_close(total, full.detach(), rtol=0, atol=ATOL)


@pytest.mark.parametrize("method", METHODS)
def test_reduction_none_per_token_losses_and_gradients(method):
    """reduction='none' returns per-token losses shaped like labels, exactly 0 at ignored tokens; the
    gradient of Σ v_t·ℓ_t is v_t·(p_t − Q_t)."""
    b = make_batch(33)
    z = b.logits.clone().requires_grad_(True)
    per = targetsft.target_loss(z, b.labels, method=method, reduction="none", **side_kwargs(method, b))
    assert per.shape == b.labels.shape
    assert (per[~b.valid] == 0).all()
    v = torch.randn(b.labels.shape, dtype=torch.float64)
    per.backward(v)
    r = reference_target(method, b.logits, b.labels, **side_kwargs(method, b))
    torch.testing.assert_close(z.grad, expected_grad(r, b.labels, v), rtol=0, atol=ATOL)
    logp = torch.log_softmax(b.logits, -1)
    expected = torch.where(b.valid, -(r.q * logp).sum(-1), torch.zeros_like(per))
    torch.testing.assert_close(per, expected, rtol=0, atol=ATOL)
    mean = targetsft.target_loss(b.logits, b.labels, method=method, **side_kwargs(method, b))
    torch.testing.assert_close(per.sum() / b.n_valid, mean, rtol=0, atol=ATOL)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("method", ["sft", "dft", "target_sft", "kd"])
def test_all_tokens_ignored(reduction, method):
    """Every label ignored: 'sum' and 'mean' return 0 (documented: no NaN, unlike F.cross_entropy) and the
    gradient is exactly zero; 'none' returns zeros."""
    b = make_batch(34)
    labels = torch.full_like(b.labels, IGNORE)
    z = b.logits.clone().requires_grad_(True)
    out = targetsft.target_loss(z, labels, method=method, reduction=reduction, **side_kwargs(method, b))
    assert torch.isfinite(out).all()
    assert (out == 0).all()
    out.sum().backward()
    assert z.grad is not None and (z.grad == 0).all()


def test_all_ignored_with_num_items_in_batch_and_stats():
    """A micro-batch with no kept token under a shared num_items_in_batch contributes 0 and zero gradient;
    its stats report 0 tokens."""
    b = make_batch(35)
    labels = torch.full_like(b.labels, IGNORE)
    z = b.logits.clone().requires_grad_(True)
    out, stats = targetsft.target_loss(z, labels, method="dft", num_items_in_batch=5, return_stats=True)
    out.backward()
    assert out.item() == 0 and (z.grad == 0).all()
    assert stats["tokens"] == 0


def test_custom_ignore_index():
    """A non-default ignore_index marks tokens without loss; -100 is then an invalid label."""
    b = make_batch(36)
    labels = b.labels.masked_fill(~b.valid, 7)
    labels = torch.where(b.valid & (b.labels == 7), torch.zeros_like(labels), labels)
    z = b.logits.clone().requires_grad_(True)
    targetsft.target_loss(z, labels, method="sft", ignore_index=7, reduction="sum").backward()
    kept = labels != 7
    p = torch.softmax(b.logits, -1)
    oh = torch.nn.functional.one_hot(labels, 11).double()
    torch.testing.assert_close(z.grad, torch.where(kept[..., None], p - oh, torch.zeros_like(p)), rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="labels"):
        targetsft.target_loss(b.logits, b.labels, method="sft", ignore_index=7)
