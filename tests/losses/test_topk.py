"""Top-k teachers ``teacher_topk=(ids, logprobs)`` and their tail completions (issue item 5).

``tail='student'``: outside the top-k, ``π_T(a) = m_T·p(a)/m_S`` with ``m_T = 1 − Σ_topk π_T`` and
``m_S = 1 − Σ_topk p``. ``tail='renormalize'``: the top-k renormalised (kd), and for target_sft
``π̃ ∝ p^(1−η)·π̂_T^η`` on the top-k only. Expected values come from ``complete_topk`` in the reference.
"""

from __future__ import annotations

import pytest
import torch

import targetsft
from test_reference import (
    complete_topk,
    expected_grad,
    make_batch,
    reference_target,
)

ATOL = 1e-10
TEACHER_METHODS = ["kd", "target_sft", "hybrid_kd", "confidence_kd", "guided_kd"]


def _topk(logits, k):
    vals, ids = torch.log_softmax(logits, -1).topk(k, -1)
    # a shuffled order within the top-k must not matter
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k))
    return ids[..., perm], vals[..., perm]


def _student_tail_by_hand(p, ids, logprobs):
    """π_T(a) = m_T·p(a)/m_S outside the ids, written out per row with Python loops."""
    out = torch.empty_like(p)
    flat_p, flat_i, flat_l = (
        p.reshape(-1, p.shape[-1]),
        ids.reshape(-1, ids.shape[-1]),
        logprobs.reshape(-1, ids.shape[-1]),
    )
    flat_o = out.view(-1, p.shape[-1])
    for r in range(flat_p.shape[0]):
        top = set(flat_i[r].tolist())
        m_t = 1 - sum(float(x) for x in flat_l[r].exp())
        m_s = 1 - sum(float(flat_p[r, a]) for a in top)
        for a in range(p.shape[-1]):
            flat_o[r, a] = flat_p[r, a] * m_t / m_s
        for a, lv in zip(flat_i[r].tolist(), flat_l[r].tolist(), strict=True):
            flat_o[r, a] = float(torch.tensor(lv, dtype=torch.float64).exp())
    return out


@pytest.mark.parametrize("k", [1, 3, 6])
def test_kd_student_tail_matches_formula(k):
    """kd with a top-k teacher (tail='student'): Q = π_T completed by m_T·p/m_S, checked against a loop."""
    b = make_batch(40)
    ids, vals = _topk(b.teacher_logits, k)
    q = targetsft.build_target(b.logits, b.labels, method="kd", teacher_topk=(ids, vals))
    pt = _student_tail_by_hand(torch.softmax(b.logits, -1), ids, vals)
    torch.testing.assert_close(q[b.valid], pt[b.valid], rtol=0, atol=ATOL)


@pytest.mark.parametrize("method", TEACHER_METHODS)
@pytest.mark.parametrize("tail", ["student", "renormalize"])
@pytest.mark.parametrize("k", [1, 4])
def test_topk_target_and_gradient_match_completed_teacher(method, tail, k):
    """Every teacher method with a top-k teacher: build_target and the gradient equal the reference computed
    with the completed dense teacher (target_sft/guided_kd: π̃ ∝ p^(1−η)·π_T^η with that teacher)."""
    b = make_batch(41)
    ids, vals = _topk(b.teacher_logits, k)
    pt = complete_topk(torch.softmax(b.logits, -1), ids, vals, tail)
    r = reference_target(method, b.logits, b.labels, teacher_probs=pt)
    q = targetsft.build_target(b.logits, b.labels, method=method, teacher_topk=(ids, vals), tail=tail)
    torch.testing.assert_close(q, r.q, rtol=0, atol=ATOL)
    z = b.logits.clone().requires_grad_(True)
    targetsft.target_loss(z, b.labels, method=method, teacher_topk=(ids, vals), tail=tail).backward()
    torch.testing.assert_close(z.grad, expected_grad(r, b.labels, 1 / b.n_valid), rtol=0, atol=ATOL)


@pytest.mark.parametrize("eta", [0.3, 0.5, 0.9])
def test_target_sft_renormalize_is_supported_on_topk_only(eta):
    """target_sft, tail='renormalize': π̃ is zero outside the top-k and ∝ p^(1−η)·π̂_T^η on it."""
    b = make_batch(42)
    ids, vals = _topk(b.teacher_logits, 3)
    q = targetsft.build_target(
        b.logits, b.labels, method="target_sft", eta=eta, teacher_topk=(ids, vals), tail="renormalize"
    )
    p = torch.softmax(b.logits, -1)
    p_top = p.gather(-1, ids)
    t_hat = vals.exp() / vals.exp().sum(-1, keepdim=True)
    w = p_top ** (1 - eta) * t_hat**eta
    pi = torch.zeros_like(p).scatter(-1, ids, w / w.sum(-1, keepdim=True))
    p_y = p.gather(-1, b.labels.clamp(min=0)[..., None])
    oh = torch.nn.functional.one_hot(b.labels.clamp(min=0), 11).double()
    expected = p_y * oh + (1 - p_y) * pi
    torch.testing.assert_close(q[b.valid], expected[b.valid], rtol=0, atol=ATOL)


@pytest.mark.parametrize("method", TEACHER_METHODS)
@pytest.mark.parametrize("tail", ["student", "renormalize"])
def test_full_k_equals_dense_teacher(method, tail):
    """With k = V the top-k teacher is the dense teacher: loss, gradient and Q agree to 1e-10."""
    b = make_batch(43)
    ids, vals = _topk(b.teacher_logits, 11)
    z1 = b.logits.clone().requires_grad_(True)
    l1 = targetsft.target_loss(z1, b.labels, method=method, teacher_topk=(ids, vals), tail=tail)
    l1.backward()
    z2 = b.logits.clone().requires_grad_(True)
    l2 = targetsft.target_loss(z2, b.labels, method=method, teacher_logits=b.teacher_logits)
    l2.backward()
    torch.testing.assert_close(l1, l2, rtol=0, atol=ATOL)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=0, atol=ATOL)


@pytest.mark.parametrize("method", ["kd", "target_sft", "hybrid_kd"])
def test_gradient_error_shrinks_as_k_grows(method):
    """The L1 error of the top-k (tail='student') gradient against the full-teacher gradient does not grow
    with k over [1, 2, 4, 8, V], and vanishes at k = V."""
    b = make_batch(44, lead=(8, 6), V=32)
    teacher = b.teacher_logits * 1.5

    def grad(**kw):
        z = b.logits.clone().requires_grad_(True)
        targetsft.target_loss(z, b.labels, method=method, **kw).backward()
        return z.grad

    full = grad(teacher_logits=teacher)
    errors = []
    for k in (1, 2, 4, 8, 32):
        vals, ids = torch.log_softmax(teacher, -1).topk(k, -1)
        errors.append(float((grad(teacher_topk=(ids, vals)) - full).abs().sum()))
    for a, c in zip(errors, errors[1:], strict=False):
        assert c <= a + 1e-12, errors
    assert errors[-1] < 1e-10
    assert errors[0] > 1e3 * max(errors[-1], 1e-14)


def test_topk_teacher_accepts_rows_of_kept_tokens_only():
    """teacher_topk may be given as [n_kept, k] in the order of the kept labels; same result as per-position."""
    b = make_batch(45)
    ids, vals = _topk(b.teacher_logits, 3)
    q1 = targetsft.build_target(b.logits, b.labels, method="kd", teacher_topk=(ids, vals))
    q2 = targetsft.build_target(b.logits, b.labels, method="kd", teacher_topk=(ids[b.valid], vals[b.valid]))
    torch.testing.assert_close(q1, q2, rtol=0, atol=0)


@pytest.mark.parametrize("method", TEACHER_METHODS)
@pytest.mark.parametrize("tail", ["student", "renormalize"])
def test_neg_inf_teacher_logprobs_in_topk(method, tail):
    """Top-k teacher log-probabilities of −inf are allowed: finite loss and gradient, Q a distribution that
    puts no teacher mass on those ids (checked against the reference)."""
    b = make_batch(46)
    ids, vals = _topk(b.teacher_logits, 4)
    vals = vals.clone()
    vals[..., 1] = float("-inf")
    vals[0, 0, 2:] = float("-inf")  # a row with a single finite entry
    z = b.logits.clone().requires_grad_(True)
    loss = targetsft.target_loss(z, b.labels, method=method, teacher_topk=(ids, vals), tail=tail)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    pt = complete_topk(torch.softmax(b.logits, -1), ids, vals, tail)
    r = reference_target(method, b.logits, b.labels, teacher_probs=pt)
    q = targetsft.build_target(b.logits, b.labels, method=method, teacher_topk=(ids, vals), tail=tail)
    torch.testing.assert_close(q, r.q, rtol=0, atol=ATOL)
    torch.testing.assert_close(z.grad, expected_grad(r, b.labels, 1 / b.n_valid), rtol=0, atol=ATOL)


@pytest.mark.parametrize("method", ["asft", "sft_kl"])
@pytest.mark.parametrize("tail", ["student", "renormalize"])
def test_ref_topk(method, tail):
    """ref_topk completes the reference model exactly as teacher_topk completes a teacher."""
    b = make_batch(47)
    ids, vals = _topk(b.ref_logits, 3)
    pr = complete_topk(torch.softmax(b.logits, -1), ids, vals, tail)
    r = reference_target(method, b.logits, b.labels, ref_probs=pr)
    q = targetsft.build_target(b.logits, b.labels, method=method, ref_topk=(ids, vals), tail=tail)
    torch.testing.assert_close(q, r.q, rtol=0, atol=ATOL)


@pytest.mark.parametrize("dtype,gap", [(torch.float32, 20.0), (torch.float64, 60.0), (torch.bfloat16, 20.0)])
@pytest.mark.parametrize("method", ["kd", "target_sft"])
def test_confident_student_topk_teacher_is_a_distribution(dtype, gap, method):
    """A confident student (its argmax in the teacher's top-k, remaining mass e^-gap) and a teacher whose top-k
    holds < 1 of its mass: Q must still be a distribution and match the formula, with |∂loss/∂z| ≤ w.

    The student's tail mass m_S = Σ_tail p ≈ (V−1)·e^-gap is tiny but representable; the formula's π_T on the
    tail is m_T·p(a)/m_S ≈ m_T/(V−1). (A common LLM situation: bf16 logits are computed in float32 here.)
    """
    V = 11
    logits = torch.zeros(4, V, dtype=torch.float64)
    logits[:, 3] = gap
    logits = logits.to(dtype)
    labels = torch.tensor([5, 3, 0, 9])
    g = torch.Generator().manual_seed(0)
    lt = torch.log_softmax(torch.randn(4, V, generator=g, dtype=torch.float64), -1)
    ids = torch.tensor([[3, 1, 7]] * 4)
    vals = lt.gather(-1, ids)
    q = targetsft.build_target(logits, labels, method=method, teacher_topk=(ids, vals.to(dtype)))
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(-1).double(), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-4)
    p = torch.softmax(logits.double(), -1)
    pt = complete_topk(p, ids, vals.to(dtype).double(), "student")  # the library sees the rounded log-probs
    r = reference_target(method, logits.double(), labels, teacher_probs=pt)
    torch.testing.assert_close(q.double(), r.q, rtol=0, atol=1e-4)
    z = logits.clone().requires_grad_(True)
    loss = targetsft.target_loss(z, labels, method=method, teacher_topk=(ids, vals.to(dtype)))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() < 100
    assert z.grad.abs().max().item() <= 0.25 + 1e-3


@pytest.mark.parametrize("method", ["kd", "target_sft", "dft", "label_smoothing"])
@pytest.mark.parametrize("k", [1, 4, 11])
def test_residual_entropy_closed_form_equals_dense(method, k):
    """Residual.entropy (closed forms for c·p, u/V and c·p off distinct top-k ids + values on them) equals
    H of the dense residual, also at k = V (no tail). The closed form takes the ids distinct, as the input check
    of a top-k teacher requires (repeated ids are refused before any residual is built)."""
    from targetsft.losses.methods import get_method
    from targetsft.losses.target import Distribution, TokenState

    b = make_batch(43)
    z, y = b.logits.reshape(-1, b.logits.shape[-1]), b.labels.reshape(-1).clamp(min=0)
    ids, vals = _topk(b.teacher_logits.reshape(z.shape), k)
    if k > 1:
        repeated = ids.clone()
        repeated[:, -1] = repeated[:, 0]
        with pytest.raises(ValueError, match="repeats a token id"):
            targetsft.target_loss(z, y, method="kd", teacher_topk=(repeated, vals))
    for topk_ids in (ids,):
        logp = torch.log_softmax(z, -1)
        teacher = Distribution(topk_ids=topk_ids, topk_logprobs=vals)
        state = TokenState(logp=logp, labels=y, teacher=teacher)
        residual = get_method(method).target().residual_for(state)
        dense = residual.to_dense(state)
        expected = -torch.special.xlogy(dense, dense).sum(-1)
        torch.testing.assert_close(residual.entropy(state), expected, rtol=0, atol=1e-10)
