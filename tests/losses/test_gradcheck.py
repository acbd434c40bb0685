"""torch.autograd.gradcheck in float64 (issue item 3).

Where Q does not depend on the student's logits, target_loss is an ordinary differentiable function and
gradcheck applies to it directly. Where Q depends on the logits through a stop-gradient, the library's
gradient at z0 must be the gradient of the *frozen-target* function ``z ↦ −Σ Q0·log_softmax(z)`` with
``Q0 = build_target(z0)``, which is gradchecked itself.
"""

from __future__ import annotations

import pytest
import torch

import targetsft
from test_reference import DEFAULTS, make_batch, side_kwargs

INDEPENDENT_OF_LOGITS = ["sft", "label_smoothing", "kd", "hybrid_kd", "sft_kl"]
WEIGHTED_FAMILY = ["critical", "weighted", "self_smoothing"]
DEPENDENT_ON_LOGITS = sorted(set(DEFAULTS) - set(INDEPENDENT_OF_LOGITS))


def _small():
    return make_batch(20, lead=(2, 3), V=5)


@pytest.mark.parametrize("method", INDEPENDENT_OF_LOGITS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradcheck_target_loss_directly(method, reduction):
    """gradcheck(target_loss) w.r.t. the logits for methods whose target is a constant of the logits."""
    b = _small()
    side = side_kwargs(method, b)
    params = {"temperature": 1.5} if method in ("kd", "hybrid_kd") else {}

    def f(z):
        return targetsft.target_loss(z, b.labels, method=method, reduction=reduction, **side, **params)

    assert torch.autograd.gradcheck(f, (b.logits.clone().requires_grad_(True),))


@pytest.mark.parametrize("method", WEIGHTED_FAMILY)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradcheck_weighted_family(method, reduction):
    """critical/weighted/self_smoothing have π̃ = sg(p), so their Q moves with z; but their gradient
    γ·(p − onehot) is the true gradient of −γ·log p_y with a constant γ. Gradcheck that function and assert
    the library's gradient equals it."""
    b = _small()
    side = side_kwargs(method, b)
    params = {"lam": 0.5} if method == "self_smoothing" else {}
    gamma = side.get("token_weights", torch.full(b.labels.shape, 0.5, dtype=torch.float64))

    def f(z):
        lp = torch.log_softmax(z, -1).gather(-1, b.labels.clamp(min=0)[..., None]).squeeze(-1)
        return (-gamma * lp * b.valid).sum() / (b.n_valid if reduction == "mean" else 1)

    assert torch.autograd.gradcheck(f, (b.logits.clone().requires_grad_(True),))
    z0 = b.logits.clone().requires_grad_(True)
    targetsft.target_loss(z0, b.labels, method=method, reduction=reduction, **side, **params).backward()
    z1 = b.logits.clone().requires_grad_(True)
    f(z1).backward()
    torch.testing.assert_close(z0.grad, z1.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", DEPENDENT_ON_LOGITS)
def test_stop_gradient_semantics(method):
    """The gradient at z0 is that of z ↦ −Σ Q0·log_softmax(z) with Q0 frozen at z0 (gradchecked)."""
    b = _small()
    side = side_kwargs(method, b)
    params = {"k": 3} if method == "eaft" else {}
    q0 = targetsft.build_target(b.logits, b.labels, method=method, **side, **params)

    def frozen(z):
        return -(q0 * torch.log_softmax(z, -1)).sum() / b.n_valid

    assert torch.autograd.gradcheck(frozen, (b.logits.clone().requires_grad_(True),))
    z0 = b.logits.clone().requires_grad_(True)
    targetsft.target_loss(z0, b.labels, method=method, **side, **params).backward()
    z1 = b.logits.clone().requires_grad_(True)
    frozen(z1).backward()
    torch.testing.assert_close(z0.grad, z1.grad, rtol=0, atol=1e-12)


def test_loss_is_not_the_frozen_targets_derivative_when_q_moves():
    """Sanity: for DFT the true derivative of the *value* differs from the stop-gradient gradient, so the check
    above is meaningful (the loss value's finite differences would not match the library's gradient)."""
    b = _small()

    def f(z):
        return targetsft.target_loss(z, b.labels, method="dft")

    assert not torch.autograd.gradcheck(f, (b.logits.clone().requires_grad_(True),), raise_exception=False)
