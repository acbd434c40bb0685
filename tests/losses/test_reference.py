"""An independent reference for the Q-target table, and checks of the reference itself.

Everything here is written from the formulas of the paper's unification table (docs/method.md §1-3), with
plain torch operations; nothing in this module imports ``targetsft``. The other tests in this folder import
these helpers to compute *expected* values.

    Q_t = γ_t·onehot(y_t) + (1 − γ_t)·π̃_t,     ∂loss/∂z_t = c_t·w_t·(p_t − Q_t)

with ``c_t = 1`` unless a method is run with ``scale='original'``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

IGNORE = -100

# Every registered method, its documented defaults, and the side inputs it reads.
DEFAULTS: dict[str, dict] = {
    "sft": {},
    "label_smoothing": {"epsilon": 0.1},
    "dft": {"exclude_label": False},
    "beyond_log": {"alpha": 0.5},
    "profit": {"tau": 0.1},
    "eaft": {"k": 20, "alpha": 1.0},
    "critical": {},
    "weighted": {},
    "asft": {"lam": 0.1, "scale": "target", "tail": "student"},
    "sft_kl": {"lam": 0.1, "scale": "target", "tail": "student"},
    "proximal_sft": {"epsilon": 0.2, "refresh": 1, "scale": "target"},
    "gem": {"beta": 0.7},
    "kd": {"temperature": 1.0, "tail": "student"},
    "hybrid_kd": {"lam": 0.5, "temperature": 1.0, "tail": "student"},
    "target_sft": {"eta": 0.5, "temperature": 1.0, "tail": "student", "exclude_label": False},
    "confidence_smoothing": {},
    "self_smoothing": {"lam": 0.5},
    "confidence_kd": {"temperature": 1.0, "tail": "student"},
    "guided_kd": {"lam": 0.5, "eta": 0.5, "temperature": 1.0, "tail": "student"},
}

NEEDS: dict[str, frozenset[str]] = {m: frozenset() for m in DEFAULTS}
NEEDS.update(
    critical=frozenset({"token_weights"}),
    weighted=frozenset({"token_weights"}),
    asft=frozenset({"ref"}),
    sft_kl=frozenset({"ref"}),
    proximal_sft=frozenset({"ref"}),
    kd=frozenset({"teacher"}),
    hybrid_kd=frozenset({"teacher"}),
    target_sft=frozenset({"teacher"}),
    confidence_kd=frozenset({"teacher"}),
    guided_kd=frozenset({"teacher"}),
)

# Methods whose target is signed (sums to 1, not a distribution): GEM's Q = onehot(y) + p − q.
SIGNED = frozenset({"gem"})

# Non-default parameter values exercised for each method (on top of the defaults).
PARAM_GRID: dict[str, list[dict]] = {
    "sft": [],
    "label_smoothing": [{"epsilon": 0.0}, {"epsilon": 0.3}, {"epsilon": 1.0}],
    "dft": [{"exclude_label": True}],
    "beyond_log": [{"alpha": 0.25}, {"alpha": 1.0}, {"alpha": 2.0}],
    "profit": [{"tau": 0.0}, {"tau": 0.05}, {"tau": 0.3}, {"tau": 1.0}],
    "eaft": [{"k": 2}, {"k": 5, "alpha": 0.5}, {"k": 11, "alpha": 2.0}],
    "critical": [],
    "weighted": [],
    "asft": [{"lam": 0.0}, {"lam": 0.5}, {"lam": 2.0, "scale": "original"}, {"scale": "original"}],
    "sft_kl": [{"lam": 0.0}, {"lam": 1.0}, {"lam": 0.3, "scale": "original"}],
    "proximal_sft": [{"epsilon": 0.05}, {"epsilon": 1.0, "scale": "original"}, {"scale": "original"}],
    "gem": [{"beta": 0.3}, {"beta": 1.0}, {"beta": 2.0}],
    "kd": [{"temperature": 0.5}, {"temperature": 2.0}],
    "hybrid_kd": [{"lam": 0.0}, {"lam": 0.2}, {"lam": 1.0}, {"lam": 0.3, "temperature": 2.0}],
    "target_sft": [
        {"eta": 0.0},
        {"eta": 0.3},
        {"eta": 1.0},
        {"temperature": 2.0},
        {"exclude_label": True},
        {"eta": 0.0, "exclude_label": True},
        {"eta": 0.8, "temperature": 0.7, "exclude_label": True},
    ],
    "confidence_smoothing": [],
    "self_smoothing": [{"lam": 0.1}, {"lam": 1.0}],
    "confidence_kd": [{"temperature": 3.0}],
    "guided_kd": [{"lam": 0.3}, {"eta": 0.0}, {"eta": 0.7, "temperature": 0.7}, {"eta": 1.0, "lam": 0.9}],
}


def all_cases() -> list[tuple[str, dict]]:
    """(method, params) for every method: its defaults, then each non-default setting."""
    return [(m, {}) for m in DEFAULTS] + [(m, p) for m in DEFAULTS for p in PARAM_GRID[m]]


def case_id(case) -> str:
    method, params = case
    return method + ("" if not params else "[" + ",".join(f"{k}={v}" for k, v in params.items()) + "]")


# ----------------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Batch:
    logits: torch.Tensor  # [..., V]
    labels: torch.Tensor  # [...]
    teacher_logits: torch.Tensor
    ref_logits: torch.Tensor
    weights: torch.Tensor  # in [0, 1]
    flags: torch.Tensor  # 0/1

    @property
    def valid(self) -> torch.Tensor:
        return self.labels != IGNORE

    @property
    def n_valid(self) -> int:
        return int(self.valid.sum())


def make_batch(seed: int = 0, lead=(3, 5), V: int = 11, dtype=torch.float64, scale: float = 2.0) -> Batch:
    """Random logits/labels (about a quarter ignored, at least one ignored and one kept), teacher, ref, weights."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*lead, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, V, lead, generator=g)
    drop = torch.rand(lead, generator=g) < 0.25
    flat = drop.view(-1)
    flat[0] = True
    flat[-1] = False
    labels = labels.masked_fill(drop, IGNORE)
    teacher = (torch.randn(*lead, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    ref = (torch.randn(*lead, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    weights = torch.rand(lead, generator=g, dtype=torch.float64).to(dtype)
    flags = (torch.rand(lead, generator=g) < 0.5).to(dtype)
    return Batch(logits, labels, teacher, ref, weights, flags)


def side_kwargs(method: str, b: Batch) -> dict:
    """The side inputs ``method`` needs (per :data:`NEEDS`), taken from the batch."""
    need = NEEDS[method]
    out = {}
    if "teacher" in need:
        out["teacher_logits"] = b.teacher_logits
    if "ref" in need:
        out["ref_logits"] = b.ref_logits
    if "token_weights" in need:
        out["token_weights"] = b.flags if method == "critical" else b.weights
    return out


# ----------------------------------------------------------------------------------------------------------
# Reference formulas


def label_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x[..., y]`` (ignored labels read index 0; callers mask them)."""
    return x.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def onehot(y: torch.Tensor, V: int, dtype) -> torch.Tensor:
    return F.one_hot(y.clamp(min=0), V).to(dtype)


def without_label(pi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(π − π(y)·onehot(y)) / (1 − π(y))``: the label's own mass removed and the rest renormalised."""
    oh = onehot(y, pi.shape[-1], pi.dtype)
    return pi * (1 - oh) / (1 - label_of(pi, y)).unsqueeze(-1)


def geometric_mix(p: torch.Tensor, teacher: torch.Tensor, eta: float) -> torch.Tensor:
    """``π̃ ∝ p^(1−η)·π_T^η`` normalised over the vocabulary."""
    w = p.pow(1 - eta) * teacher.pow(eta)
    return w / w.sum(-1, keepdim=True)


def topk_entropy_trust(p: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """EAFT: ``(H(top-k of p renormalised) / log k)^α`` with ``k`` capped at the vocabulary size."""
    k = min(k, p.shape[-1])
    top = p.sort(-1, descending=True).values[..., :k]
    r = top / top.sum(-1, keepdim=True)
    h = -(r * torch.log(r)).sum(-1)
    return (h / math.log(k)) ** alpha


def complete_topk(p: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, tail: str) -> torch.Tensor:
    """Dense teacher from its top-k.

    ``tail='student'``: ``π_T(a) = m_T·p(a)/m_S`` outside the ids, ``m_T = 1 − Σ_topk π_T``, ``m_S = Σ_tail p``.
    ``tail='renormalize'``: the top-k renormalised, zero elsewhere.
    """
    top = logprobs.to(p.dtype).exp()
    inside = torch.zeros_like(p).scatter(-1, ids, 1.0).bool()
    dense = torch.zeros_like(p).scatter(-1, ids, top)
    if tail == "renormalize":
        return dense / top.sum(-1, keepdim=True)
    m_teacher = 1 - top.sum(-1, keepdim=True)
    m_student = (p * (~inside)).sum(-1, keepdim=True)
    return torch.where(inside, dense, m_teacher * p / m_student)


@dataclass
class Ref:
    gamma: torch.Tensor  # [...]
    residual: torch.Tensor | None  # [..., V]
    q: torch.Tensor  # [..., V], zero rows at ignored tokens
    scale: torch.Tensor  # [...], c_t
    p: torch.Tensor


def reference_target(
    method: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_logits=None,
    teacher_probs=None,
    ref_logits=None,
    ref_probs=None,
    token_weights=None,
    **params,
) -> Ref:
    """γ, π̃, Q and the loss scale ``c`` of ``method`` from the paper's table (see the module docstring).

    A teacher/ref is given as logits (softmaxed here, the teacher at the method's temperature) or directly as a
    dense probability tensor (``teacher_probs``/``ref_probs``, e.g. from :func:`complete_topk`).
    """
    P = {**DEFAULTS[method], **params}
    z = logits.detach()
    V = z.shape[-1]
    p = torch.softmax(z, -1)
    y = labels
    p_y = label_of(p, y)
    ones = torch.ones_like(p_y)
    uniform = torch.full_like(p, 1.0 / V)

    def teacher():
        if teacher_probs is not None:
            return teacher_probs.to(p.dtype)
        return torch.softmax(teacher_logits.to(p.dtype) / P["temperature"], -1)

    def reference():
        return ref_probs.to(p.dtype) if ref_probs is not None else torch.softmax(ref_logits.to(p.dtype), -1)

    scale = ones
    if method == "sft":
        gamma, res = ones, None
    elif method == "label_smoothing":
        gamma, res = (1 - P["epsilon"]) * ones, uniform
    elif method == "dft":
        gamma, res = p_y, p
    elif method == "beyond_log":
        gamma, res = p_y ** P["alpha"], p
    elif method == "profit":
        gamma, res = (p_y > P["tau"]).to(p.dtype), p
    elif method == "eaft":
        gamma, res = topk_entropy_trust(p, P["k"], P["alpha"]), p
    elif method in ("critical", "weighted"):
        gamma, res = token_weights.to(p.dtype), p
    elif method == "asft":
        lam = P["lam"]
        gamma, res = (p_y / (p_y + lam) if lam > 0 else ones), reference()
        if P["scale"] == "original":
            scale = p_y + lam
    elif method == "sft_kl":
        lam = P["lam"]
        gamma, res = ones / (1 + lam), reference()
        if P["scale"] == "original":
            scale = ones * (1 + lam)
    elif method == "proximal_sft":  # r = p(y)/π_old(y); tokens past 1 + ε are not updated (Q = p)
        ratio = p_y / label_of(reference(), y)
        gamma, res = (ratio <= 1 + P["epsilon"]).to(p.dtype), p
        if P["scale"] == "original":
            scale = ratio
    elif method == "gem":  # ∂ℓ/∂z = q − onehot(y), q ∝ p^(1/β): Q = onehot(y) + p − q, signed
        gamma, res = 0 * ones, onehot(y, V, p.dtype) + p - torch.softmax(z.log_softmax(-1) / P["beta"], -1)
    elif method == "kd":
        gamma, res = 0 * ones, teacher()
    elif method == "hybrid_kd":
        gamma, res = (1 - P["lam"]) * ones, teacher()
    elif method == "target_sft":
        gamma, res = p_y, geometric_mix(p, teacher(), P["eta"])
    elif method == "confidence_smoothing":
        gamma, res = p_y, uniform
    elif method == "self_smoothing":
        gamma, res = (1 - P["lam"]) * ones, p
    elif method == "confidence_kd":
        gamma, res = p_y, teacher()
    elif method == "guided_kd":
        gamma, res = (1 - P["lam"]) * ones, geometric_mix(p, teacher(), P["eta"])
    else:  # pragma: no cover
        raise KeyError(method)
    if res is not None and P.get("exclude_label", False):
        res = without_label(res, y)
    q = gamma.unsqueeze(-1) * onehot(y, V, p.dtype)
    if res is not None:
        q = q + (1 - gamma).unsqueeze(-1) * res
    valid = (labels != IGNORE).unsqueeze(-1)
    q = torch.where(valid, q, torch.zeros_like(q))
    return Ref(gamma=gamma, residual=res, q=q, scale=scale, p=p)


def expected_grad(r: Ref, labels: torch.Tensor, w) -> torch.Tensor:
    """``c_t·w_t·(p_t − Q_t)`` at kept tokens, exactly zero at ignored ones."""
    valid = (labels != IGNORE).unsqueeze(-1)
    w = torch.as_tensor(w, dtype=r.p.dtype)
    if w.dim() == labels.dim() and w.dim() > 0:
        w = w.unsqueeze(-1)
    g = r.scale.unsqueeze(-1) * w * (r.p - r.q)
    return torch.where(valid, g, torch.zeros_like(g))


def expected_token_loss(r: Ref, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``c_t·(−Σ_a Q_t(a) log p_t(a))`` per token, zero at ignored ones."""
    logp = torch.log_softmax(logits.detach().to(r.p.dtype), -1)
    loss = -(r.q * logp).sum(-1) * r.scale
    return torch.where(labels != IGNORE, loss, torch.zeros_like(loss))


# ----------------------------------------------------------------------------------------------------------
# Checks of the reference itself (hand-computed cases from the paper's text)


def test_reference_dft_matches_the_papers_closed_form():
    """The reference DFT target is Q(y) = 2p_y − p_y², Q(k≠y) = (1 − p_y)·p_k (method.md §2)."""
    b = make_batch(1)
    r = reference_target("dft", b.logits, b.labels)
    p, y, v = r.p, b.labels, b.valid
    p_y = label_of(p, y)
    q_y = label_of(r.q, y)
    torch.testing.assert_close(q_y[v], (2 * p_y - p_y**2)[v], rtol=0, atol=1e-14)
    off = r.q * (1 - onehot(y, p.shape[-1], p.dtype))
    torch.testing.assert_close(off[v], ((1 - p_y).unsqueeze(-1) * p * (1 - onehot(y, p.shape[-1], p.dtype)))[v])


def test_reference_sft_kl_scale_identity():
    """(1+λ)(p − Q) equals the gradient (1+λ)p − onehot − λ·π_ref of −log p_y + λ·KL(π_ref‖p) (method.md §2)."""
    b = make_batch(2)
    lam = 0.7
    r = reference_target("sft_kl", b.logits, b.labels, ref_logits=b.ref_logits, lam=lam, scale="original")
    pr = torch.softmax(b.ref_logits, -1)
    direct = (1 + lam) * r.p - onehot(b.labels, r.p.shape[-1], r.p.dtype) - lam * pr
    torch.testing.assert_close(expected_grad(r, b.labels, 1.0)[b.valid], direct[b.valid], rtol=0, atol=1e-14)


@pytest.mark.parametrize("case", all_cases(), ids=case_id)
def test_reference_targets_are_distributions(case):
    """Every reference Q sums to one on kept tokens and, but for GEM's signed one, is non-negative (so the
    reference itself is sane); GEM's has negative entries indeed."""
    method, params = case
    b = make_batch(3)
    r = reference_target(method, b.logits, b.labels, **side_kwargs(method, b), **params)
    assert (r.q < 0).any() if method in SIGNED else (r.q >= 0).all()
    torch.testing.assert_close(r.q.sum(-1)[b.valid], torch.ones(b.n_valid, dtype=torch.float64))
    assert (r.q[~b.valid] == 0).all()


def test_complete_topk_is_a_distribution_and_exact_at_full_k():
    """The completed top-k teacher sums to 1; with k = V it is the teacher itself."""
    b = make_batch(4)
    p = torch.softmax(b.logits, -1)
    lt = torch.log_softmax(b.teacher_logits, -1)
    for k in (1, 3, 11):
        vals, ids = lt.topk(k, -1)
        for tail in ("student", "renormalize"):
            d = complete_topk(p, ids, vals, tail)
            torch.testing.assert_close(d.sum(-1), torch.ones_like(d.sum(-1)))
        if k == 11:
            torch.testing.assert_close(complete_topk(p, ids, vals, "student"), lt.exp(), rtol=0, atol=1e-14)
