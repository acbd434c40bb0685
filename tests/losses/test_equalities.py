"""Known equalities with PyTorch losses and with each method's original (non-Q) loss (issue item 2).

The original losses are written here with autograd (stop-gradients as ``.detach()``); the library's
Q-target gradient must coincide with theirs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import targetsft
from test_reference import IGNORE, label_of, make_batch, onehot

ATOL = 1e-10


def _flat(b):
    return b.logits.reshape(-1, b.logits.shape[-1]), b.labels.reshape(-1)


def _grad(fn, logits):
    z = logits.clone().requires_grad_(True)
    out = fn(z)
    out.backward()
    return out.detach(), z.grad


def _mean_over_kept(per_token, labels):
    valid = labels != IGNORE
    return (per_token * valid).sum() / valid.sum()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sft_equals_torch_cross_entropy(reduction):
    """method='sft' is F.cross_entropy (value and gradient) for mean, sum and none, with ignore_index."""
    b = make_batch(10)
    z2, y = _flat(b)
    gv = torch.randn(b.labels.shape, dtype=torch.float64)

    def ours(z):
        out = targetsft.target_loss(z, b.labels, method="sft", reduction=reduction)
        return (out * gv).sum() if reduction == "none" else out

    def theirs(z):
        out = F.cross_entropy(z.reshape(-1, 11), y, reduction=reduction, ignore_index=IGNORE)
        return (out.view(b.labels.shape) * gv).sum() if reduction == "none" else out

    lo, go = _grad(ours, b.logits)
    lt, gt = _grad(theirs, b.logits)
    torch.testing.assert_close(lo, lt, rtol=0, atol=ATOL)
    torch.testing.assert_close(go, gt, rtol=0, atol=ATOL)
    if reduction == "none":
        per = targetsft.target_loss(b.logits, b.labels, method="sft", reduction="none")
        ref = F.cross_entropy(z2, y, reduction="none", ignore_index=IGNORE).view(b.labels.shape)
        torch.testing.assert_close(per, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.37, 1.0])
def test_label_smoothing_equals_torch_cross_entropy(reduction, eps):
    """method='label_smoothing' is F.cross_entropy(label_smoothing=ε) for every reduction."""
    b = make_batch(11)
    _, y = _flat(b)
    gv = torch.randn(b.labels.shape, dtype=torch.float64)

    def ours(z):
        out = targetsft.target_loss(z, b.labels, method="label_smoothing", epsilon=eps, reduction=reduction)
        return (out * gv).sum() if reduction == "none" else out

    def theirs(z):
        out = F.cross_entropy(z.reshape(-1, 11), y, reduction=reduction, ignore_index=IGNORE, label_smoothing=eps)
        return (out.view(b.labels.shape) * gv).sum() if reduction == "none" else out

    lo, go = _grad(ours, b.logits)
    lt, gt = _grad(theirs, b.logits)
    torch.testing.assert_close(lo, lt, rtol=0, atol=ATOL)
    torch.testing.assert_close(go, gt, rtol=0, atol=ATOL)


def test_dft_gradient_is_p_y_times_sft_gradient():
    """DFT's gradient is p_y·(p − onehot(y))·w, the gradient of −sg(p_y)·log p_y."""
    b = make_batch(12)
    _, g = _grad(lambda z: targetsft.target_loss(z, b.labels, method="dft"), b.logits)
    p = torch.softmax(b.logits, -1)
    p_y = label_of(p, b.labels).unsqueeze(-1)
    expected = p_y * (p - onehot(b.labels, 11, p.dtype)) / b.n_valid
    expected = torch.where(b.valid.unsqueeze(-1), expected, torch.zeros_like(expected))
    torch.testing.assert_close(g, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kd_is_kl_plus_teacher_entropy(temperature):
    """kd's loss is KL(π_T‖p) + H(π_T) with π_T = softmax(teacher/T) (KL via F.kl_div); gradient is that of KL."""
    b = make_batch(13)
    pt = torch.softmax(b.teacher_logits / temperature, -1)
    h = -(pt * pt.log()).sum(-1)

    def ours(z):
        return targetsft.target_loss(z, b.labels, method="kd", teacher_logits=b.teacher_logits, temperature=temperature)

    def theirs(z):
        kl = F.kl_div(torch.log_softmax(z, -1), pt, reduction="none").sum(-1)
        return _mean_over_kept(kl + h, b.labels)

    lo, go = _grad(ours, b.logits)
    lt, gt = _grad(theirs, b.logits)
    torch.testing.assert_close(lo, lt, rtol=0, atol=ATOL)
    torch.testing.assert_close(go, gt, rtol=0, atol=ATOL)


def test_target_sft_eta0_is_dft():
    """target_sft at η = 0 has exactly DFT's gradient, loss and target (the teacher is unused)."""
    b = make_batch(14)
    lo, go = _grad(
        lambda z: targetsft.target_loss(z, b.labels, method="target_sft", eta=0.0, teacher_logits=b.teacher_logits),
        b.logits,
    )
    ld, gd = _grad(lambda z: targetsft.target_loss(z, b.labels, method="dft"), b.logits)
    torch.testing.assert_close(go, gd, rtol=0, atol=1e-15)
    torch.testing.assert_close(lo, ld, rtol=0, atol=1e-15)


@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_target_sft_eta1_is_confidence_kd(temperature):
    """target_sft at η = 1 equals confidence_kd (γ = p_y, π̃ = teacher): loss, gradient and Q."""
    b = make_batch(15)
    kw = dict(teacher_logits=b.teacher_logits, temperature=temperature)
    lo, go = _grad(lambda z: targetsft.target_loss(z, b.labels, method="target_sft", eta=1.0, **kw), b.logits)
    lc, gc = _grad(lambda z: targetsft.target_loss(z, b.labels, method="confidence_kd", **kw), b.logits)
    torch.testing.assert_close(go, gc, rtol=0, atol=ATOL)
    torch.testing.assert_close(lo, lc, rtol=0, atol=ATOL)
    qo = targetsft.build_target(b.logits, b.labels, method="target_sft", eta=1.0, **kw)
    qc = targetsft.build_target(b.logits, b.labels, method="confidence_kd", **kw)
    torch.testing.assert_close(qo, qc, rtol=0, atol=ATOL)


def test_target_sft_eta1_is_confidence_kd_with_topk_teacher():
    """The η = 1 identity also holds for a top-k teacher (both completions)."""
    b = make_batch(16)
    vals, ids = torch.log_softmax(b.teacher_logits, -1).topk(4, -1)
    for tail in ("student", "renormalize"):
        kw = dict(teacher_topk=(ids, vals), tail=tail)
        qo = targetsft.build_target(b.logits, b.labels, method="target_sft", eta=1.0, **kw)
        qc = targetsft.build_target(b.logits, b.labels, method="confidence_kd", **kw)
        torch.testing.assert_close(qo, qc, rtol=0, atol=ATOL)


# --- each method's original loss, written with autograd, has the library's gradient -------------------------


def _logp(z):
    return torch.log_softmax(z, -1)


def _logp_y(z, y):
    return label_of(_logp(z), y)


def _clipped(r, eps):
    """PPO's clipped objective at advantage +1: ``min(r, clip(r, 1 − ε, 1 + ε))``."""
    return torch.minimum(r, r.clamp(1 - eps, 1 + eps))


def _original_losses(b):
    """name, params, side inputs, per-token original loss ℓ(z) (stop-gradients as detach) for 'mean'."""
    y = b.labels
    pr = torch.softmax(b.ref_logits, -1)
    pt = torch.softmax(b.teacher_logits, -1)

    def kl(target, z):
        return F.kl_div(_logp(z), target, reduction="none").sum(-1)

    return [
        ("beyond_log", {"alpha": 0.5}, {}, lambda z: (1 - _logp_y(z, y).exp() ** 0.5) / 0.5),
        ("beyond_log", {"alpha": 2.0}, {}, lambda z: (1 - _logp_y(z, y).exp() ** 2.0) / 2.0),
        ("profit", {"tau": 0.2}, {}, lambda z: -(_logp_y(z, y).exp() > 0.2).detach().double() * _logp_y(z, y)),
        ("weighted", {}, {"token_weights": b.weights}, lambda z: -b.weights * _logp_y(z, y)),
        ("critical", {}, {"token_weights": b.flags}, lambda z: -b.flags * _logp_y(z, y)),
        (
            "sft_kl",
            {"lam": 0.3, "scale": "original"},
            {"ref_logits": b.ref_logits},
            lambda z: -_logp_y(z, y) + 0.3 * kl(pr, z),
        ),
        (
            "asft",
            {"lam": 0.3, "scale": "original"},
            {"ref_logits": b.ref_logits},
            lambda z: -_logp_y(z, y).exp().detach() * _logp_y(z, y) + 0.3 * kl(pr, z),
        ),
        (
            "hybrid_kd",
            {"lam": 0.3},
            {"teacher_logits": b.teacher_logits},
            lambda z: -0.7 * _logp_y(z, y) - 0.3 * (pt * _logp(z)).sum(-1),
        ),
        (
            "self_smoothing",
            {"lam": 0.25},
            {},
            lambda z: -0.75 * _logp_y(z, y),
        ),
        *[
            (  # Proximal SFT as written: −min(r, clip(r, 1 − ε, 1 + ε)), r = p_θ(y)/π_old(y), π_old fixed
                "proximal_sft",
                {"epsilon": eps, "scale": "original"},
                {"ref_logits": b.ref_logits},
                lambda z, eps=eps: (
                    -torch.minimum(r := _logp_y(z, y).exp() / label_of(pr, y), r.clamp(1 - eps, 1 + eps))
                ),
            )
            for eps in (0.2, 0.05, 1.0)
        ],
    ]


@pytest.mark.parametrize("index", range(12))
def test_gradient_equals_original_loss_gradient(index):
    """Beyond-log ((1 − p_y^α)/α), ProFiT, iw-SFT, CFT, SFT+KL, ASFT (original scale), hybrid KD,
    self-smoothing and Proximal SFT (original scale, three ε): the library's gradient equals the autograd gradient of
    the method's original loss."""
    b = make_batch(17)
    method, params, side, original = _original_losses(b)[index]
    _, go = _grad(lambda z: targetsft.target_loss(z, b.labels, method=method, **side, **params), b.logits)
    _, gt = _grad(lambda z: _mean_over_kept(original(z), b.labels), b.logits)
    torch.testing.assert_close(go, gt, rtol=0, atol=ATOL)


def test_sft_kl_original_loss_value():
    """sft_kl(scale='original') loss = −log p_y + λ·KL(π_ref‖p) + λ·H(π_ref) (cross-entropy form)."""
    b = make_batch(18)
    lam = 0.4
    pr = torch.softmax(b.ref_logits, -1)
    loss = targetsft.target_loss(
        b.logits, b.labels, method="sft_kl", lam=lam, scale="original", ref_logits=b.ref_logits
    )
    kl = F.kl_div(_logp(b.logits), pr, reduction="none").sum(-1)
    h = -(pr * pr.log()).sum(-1)
    expected = _mean_over_kept(-_logp_y(b.logits, b.labels) + lam * (kl + h), b.labels)
    torch.testing.assert_close(loss, expected, rtol=0, atol=ATOL)


def test_proximal_sft_clips_past_the_trust_region_and_needs_full_reference_logits():
    """Default scale: ∂ℓ/∂z = 1{r ≤ 1 + ε}·(p − onehot)/n; both clipped and kept tokens occur; a top-k π_old is
    refused with a clear error (a label outside its ids has no probability there)."""
    b = make_batch(19)
    z, y = _flat(b)
    ref = b.ref_logits.reshape(z.shape)
    _, g = _grad(lambda t: targetsft.target_loss(t, y, method="proximal_sft", epsilon=0.2, ref_logits=ref), z)
    p, valid = torch.softmax(z, -1), y != IGNORE
    ratio = label_of(p, y.clamp(min=0)) / label_of(torch.softmax(ref, -1), y.clamp(min=0))
    keep = ((ratio <= 1.2) & valid).double()
    assert 0 < keep.sum() < valid.sum()
    expected = keep[:, None] * (p - onehot(y.clamp(min=0), z.shape[-1], p.dtype)) / valid.sum()
    torch.testing.assert_close(g, expected, rtol=0, atol=ATOL)
    top = torch.log_softmax(ref, -1).topk(3, -1)
    with pytest.raises(ValueError, match="full logits"):
        targetsft.target_loss(z, y, method="proximal_sft", ref_topk=(top.indices, top.values))
