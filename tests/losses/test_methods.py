"""Every registered method against the independent reference table (issue item 1).

For each method and several parameter settings, on random float64 inputs with leading dims [3, 5], V = 11 and
some ignored labels: the autograd gradient of ``target_loss`` is ``c·w·(p − Q)`` to 1e-10, ``build_target`` is
the reference ``Q``, ``Q`` is a distribution, the loss is ``c·(−Σ Q log p)`` averaged, and ignored tokens get
exactly zero gradient.
"""

from __future__ import annotations

import pytest
import torch

import targetsft
from targetsft import functional as TF
from test_reference import (
    DEFAULTS,
    NEEDS,
    SIGNED,
    all_cases,
    case_id,
    expected_grad,
    expected_token_loss,
    label_of,
    make_batch,
    reference_target,
    side_kwargs,
)

CASES = all_cases()
ATOL = 1e-10


def _run(method, params, seed=0, reduction="mean"):
    b = make_batch(seed)
    z = b.logits.clone().requires_grad_(True)
    loss = targetsft.target_loss(z, b.labels, method=method, reduction=reduction, **side_kwargs(method, b), **params)
    loss.backward()
    r = reference_target(method, b.logits, b.labels, **side_kwargs(method, b), **params)
    return b, z.grad, loss, r


def test_registry_is_covered_by_the_reference():
    """The reference table has a row for every registered method, so the tests below really cover METHODS."""
    assert set(targetsft.METHODS) == set(DEFAULTS)


@pytest.mark.parametrize("method", sorted(DEFAULTS))
def test_registry_defaults_and_needs(method):
    """Each MethodSpec documents the expected default parameters and side inputs."""
    spec = targetsft.METHODS[method]
    assert spec.defaults == DEFAULTS[method]
    assert set(spec.all_params) == set(DEFAULTS[method])  # the loss's parameters and the trainer's (refresh)
    assert spec.needs == NEEDS[method]
    assert spec.target().needs == NEEDS[method]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradient_is_weighted_p_minus_q(case):
    """autograd ∂loss/∂z = c_t·w_t·(p_t − Q_t) with w = 1/#kept tokens (reduction='mean'), to 1e-10."""
    method, params = case
    b, grad, _, r = _run(method, params)
    torch.testing.assert_close(grad, expected_grad(r, b.labels, 1.0 / b.n_valid), rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_build_target_equals_reference_q(case):
    """build_target returns the reference Q (zero rows at ignored tokens), and Q is a distribution (GEM's: signed,
    summing to one)."""
    method, params = case
    b = make_batch(1)
    q = targetsft.build_target(b.logits, b.labels, method=method, **side_kwargs(method, b), **params)
    r = reference_target(method, b.logits, b.labels, **side_kwargs(method, b), **params)
    assert q.shape == b.logits.shape and q.dtype == torch.float64
    torch.testing.assert_close(q, r.q, rtol=0, atol=ATOL)
    assert method in SIGNED or (q >= 0).all()
    torch.testing.assert_close(q.sum(-1)[b.valid], torch.ones(b.n_valid, dtype=q.dtype), rtol=0, atol=ATOL)
    assert (q[~b.valid] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_loss_value_is_cross_entropy_to_q(case):
    """The mean loss equals mean over kept tokens of c_t·(−Σ_a Q_t(a) log p_t(a))."""
    method, params = case
    b, _, loss, r = _run(method, params, seed=2)
    expected = expected_token_loss(r, b.logits, b.labels).sum() / b.n_valid
    torch.testing.assert_close(loss, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_ignored_tokens_get_exactly_zero_gradient(case):
    """Rows whose label is ignore_index get a gradient of exactly 0 (not merely small)."""
    method, params = case
    b, grad, _, _ = _run(method, params, seed=3, reduction="sum")
    assert (~b.valid).any()
    assert (grad[~b.valid] == 0).all()


@pytest.mark.parametrize("method,eta", [("dft", None), ("target_sft", 0.0), ("target_sft", 0.5), ("target_sft", 1.0)])
def test_exclude_label_removes_label_mass_from_residual(method, eta):
    """exclude_label=True: π̃'(y) = 0 and π̃' = π̃ renormalised on the other tokens; so Q(y) = γ exactly."""
    params = {"exclude_label": True} | ({"eta": eta} if method == "target_sft" else {})
    b = make_batch(5)
    q = targetsft.build_target(b.logits, b.labels, method=method, **side_kwargs(method, b), **params)
    p = torch.softmax(b.logits, -1)
    p_y = label_of(p, b.labels)
    # γ = p_y for both methods; with the label excluded Q(y) is γ and Q elsewhere is (1 − γ)·π̃/(1 − π̃(y)).
    torch.testing.assert_close(label_of(q, b.labels)[b.valid], p_y[b.valid], rtol=0, atol=ATOL)
    if method == "dft":
        pi = p
    else:
        pt = torch.softmax(b.teacher_logits, -1)
        pi = p ** (1 - eta) * pt**eta
        pi = pi / pi.sum(-1, keepdim=True)
    pi_y = label_of(pi, b.labels)
    mask = torch.nn.functional.one_hot(b.labels.clamp(min=0), 11).bool()
    expected = ((1 - p_y) / (1 - pi_y)).unsqueeze(-1) * pi
    expected = expected.masked_fill(mask, 0) + p_y.unsqueeze(-1) * mask
    torch.testing.assert_close(q[b.valid], expected[b.valid], rtol=0, atol=ATOL)


@pytest.mark.parametrize("method,lam", [("asft", 0.1), ("asft", 1.5), ("sft_kl", 0.1), ("sft_kl", 2.0)])
def test_scale_original_multiplies_gradient_by_c(method, lam):
    """scale='original' gives c_t·w·(p − Q) with c_t = p_y + λ (asft) or 1 + λ (sft_kl); Q itself is unchanged."""
    b = make_batch(6)
    side = side_kwargs(method, b)
    grads = {}
    for scale in ("target", "original"):
        z = b.logits.clone().requires_grad_(True)
        targetsft.target_loss(z, b.labels, method=method, lam=lam, scale=scale, **side).backward()
        grads[scale] = z.grad
    p_y = label_of(torch.softmax(b.logits, -1), b.labels)
    c = p_y + lam if method == "asft" else torch.full_like(p_y, 1 + lam)
    torch.testing.assert_close(grads["original"], c.unsqueeze(-1) * grads["target"], rtol=0, atol=ATOL)
    q_t = targetsft.build_target(b.logits, b.labels, method=method, lam=lam, scale="target", **side)
    q_o = targetsft.build_target(b.logits, b.labels, method=method, lam=lam, scale="original", **side)
    torch.testing.assert_close(q_t, q_o, rtol=0, atol=0)


def test_functional_composition_matches_reference():
    """A Target composed from targetsft.functional rules (γ = p_y², π̃ guided at η=0.3) gives the expected Q."""
    b = make_batch(7)
    target = TF.Target(trust=TF.trust.LabelProb(2.0), residual=TF.residual.Guided(eta=0.3))
    z = b.logits.clone().requires_grad_(True)
    targetsft.target_loss(z, b.labels, method=target, teacher_logits=b.teacher_logits, reduction="sum").backward()
    p = torch.softmax(b.logits, -1)
    p_y = label_of(p, b.labels)
    pt = torch.softmax(b.teacher_logits, -1)
    pi = p**0.7 * pt**0.3
    pi = pi / pi.sum(-1, keepdim=True)
    gamma = (p_y**2).unsqueeze(-1)
    q = gamma * torch.nn.functional.one_hot(b.labels.clamp(min=0), 11) + (1 - gamma) * pi
    expected = torch.where(b.valid.unsqueeze(-1), p - q, torch.zeros_like(p))
    torch.testing.assert_close(z.grad, expected, rtol=0, atol=ATOL)


def test_user_defined_trust_rule():
    """Any callable with a ``needs`` attribute works as a trust rule (γ = 0.25 everywhere, π̃ uniform)."""

    class Quarter:
        needs = frozenset()

        def __call__(self, state):
            return torch.full_like(state.logp_y, 0.25)

    b = make_batch(8)
    target = TF.Target(trust=Quarter(), residual=TF.residual.Uniform())
    q = targetsft.build_target(b.logits, b.labels, method=target)
    oh = torch.nn.functional.one_hot(b.labels.clamp(min=0), 11).double()
    expected = torch.where(b.valid.unsqueeze(-1), 0.25 * oh + 0.75 / 11, torch.zeros_like(oh))
    torch.testing.assert_close(q, expected, rtol=0, atol=ATOL)


def test_zero_dim_label_with_one_dim_logits():
    """A single token (0-d label, [V] logits) works: gradient p − Q, loss −Σ Q log p."""
    b = make_batch(9, lead=(1,))
    z0, y0 = b.logits[0], b.labels.new_tensor(3)
    z = z0.clone().requires_grad_(True)
    loss = targetsft.target_loss(z, y0, method="target_sft", teacher_logits=b.teacher_logits[0])
    loss.backward()
    r = reference_target("target_sft", z0, y0, teacher_logits=b.teacher_logits[0])
    torch.testing.assert_close(z.grad, r.p - r.q, rtol=0, atol=ATOL)
    torch.testing.assert_close(loss, -(r.q * torch.log_softmax(z0, -1)).sum(), rtol=0, atol=ATOL)
