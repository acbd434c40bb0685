"""Residual rules: the distribution ``π̃_t`` that receives the target's remaining mass ``1 − γ_t``.

Each rule returns a :class:`~targetsft.losses.target.Residual` in structured form so that the fused path never
builds a dense ``[tokens, V]`` target when it does not have to.

Teachers given as top-k ``(ids, logprobs)`` must be completed outside the top-k. ``tail="student"`` (the
default) spreads the teacher's missing mass ``m_T = 1 − Σ_topk π_T`` over the other tokens in proportion to the
student: ``π_T(a) = m_T · p(a) / m_S`` with ``m_S = 1 − Σ_topk p``. This keeps the full-vocabulary support the
paper's residual has, adds no opinion of its own where the teacher is silent, and makes the completed
residual a multiple of ``p`` plus ``k`` sparse entries (cheap). ``tail="renormalize"`` drops the tail instead
and renormalises the top-k. Where the student itself has (numerically) no mass outside the top-k
(``m_S < sqrt(machine eps)``, e.g. ``k = V``), ``m_T/m_S`` is rounding noise, and such rows are renormalised too.
A top-k row whose ids are all −1 has no teacher (a cross-tokenizer teacher with no token boundary there): its
``π_T`` is the student's own ``sg p``, under either tail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from targetsft.losses.target import Distribution, Residual, TokenState

Tail = Literal["student", "renormalize"]
TAILS: tuple[str, ...] = ("student", "renormalize")
_NONE: frozenset[str] = frozenset()


def _tiny_log(dtype: torch.dtype) -> float:
    return math.log(torch.finfo(dtype).tiny)


def _one_minus_exp(log_mass: Tensor) -> Tensor:
    """``1 − exp(x)`` for ``x ≤ 0``, accurate near 0 and clamped to ``[0, 1]``."""
    return (-torch.expm1(log_mass.clamp(max=0.0))).clamp(0.0, 1.0)


@dataclass(frozen=True)
class Uniform:
    """``π̃ = 1/V`` (label smoothing)."""

    needs: ClassVar[frozenset[str]] = _NONE

    def __call__(self, state: TokenState) -> Residual:
        return Residual(uniform=torch.ones_like(state.logp_y))


@dataclass(frozen=True)
class Self:
    """``π̃ = sg(p_θ)``, the model's own distribution (DFT and the other label-trust methods)."""

    needs: ClassVar[frozenset[str]] = _NONE

    def __call__(self, state: TokenState) -> Residual:
        return Residual(self_coef=torch.ones_like(state.logp_y))


def _topk_parts(state: TokenState, dist: Distribution) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For a top-k distribution: ids, its log-probs, the student's log-probs at the ids, and ``log(m_T/m_S)``
    where the student has mass outside the top-k, ``-inf`` in rows to renormalise (see the module docstring).
    A row with no distribution (``dist.missing``) takes the student's: its log-probs are ``lp`` and ``m_T = m_S``."""
    ids, lt = dist.topk_ids, dist.topk_logprobs.to(state.logp.dtype)
    lp = state.logp.gather(-1, ids)
    log_m_teacher = torch.log(_one_minus_exp(torch.logsumexp(lt, -1))).clamp(min=_tiny_log(lt.dtype))
    log_m_student, _ = state.tail(ids)
    log_c = torch.where(log_m_student > float("-inf"), log_m_teacher - log_m_student, float("-inf"))
    if dist.missing is not None:
        lt = torch.where(dist.missing[:, None], lp, lt)
        log_c = log_c.masked_fill(dist.missing, 0.0)
    return ids, lt, lp, log_c


def _renormalized_topk(state: TokenState, dist: Distribution, values: Tensor) -> Residual:
    """``values`` on the top-k ids, rows that sum to 1; a row with no distribution is the student's ``p`` instead
    (its share off the ids as ``self_coef`` 1, on them as values)."""
    ids = dist.topk_ids
    if dist.missing is None:
        return Residual(sparse_ids=ids, sparse_values=values)
    values = torch.where(dist.missing[:, None], state.logp.gather(-1, ids).exp(), values)
    return Residual(self_coef=dist.missing.to(values.dtype), self_skip=ids, sparse_ids=ids, sparse_values=values)


def _distribution_residual(state: TokenState, dist: Distribution, temperature: float, tail: Tail) -> Residual:
    """``π̃ = π_T`` at ``temperature`` (dense), or completed from top-k (see the module docstring)."""
    if not dist.is_topk:
        return Residual(dense=torch.softmax(dist.logits.to(state.logp.dtype) / temperature, dim=-1))
    if tail == "renormalize":
        return _renormalized_topk(state, dist, torch.softmax(dist.topk_logprobs.to(state.logp.dtype), -1))
    ids, lt, lp, log_c = _topk_parts(state, dist)
    c = log_c.exp()  # outside the top-k: c·p; on the ids: π_T (renormalised where the student has no tail)
    inside = torch.where(c[:, None] > 0, lt.exp(), torch.softmax(lt, -1))
    return Residual(self_coef=c, self_skip=ids, sparse_ids=ids, sparse_values=inside)


@dataclass(frozen=True)
class Teacher:
    """``π̃ = π_T(·|x)`` at temperature ``temperature`` (knowledge distillation)."""

    temperature: float = 1.0
    tail: Tail = "student"
    needs: ClassVar[frozenset[str]] = frozenset({"teacher"})

    def __call__(self, state: TokenState) -> Residual:
        return _distribution_residual(state, state.teacher, self.temperature, self.tail)


@dataclass(frozen=True)
class Reference:
    """``π̃ = π_ref(·|x)``, a frozen reference (base) model (SFT+KL, ASFT)."""

    tail: Tail = "student"
    needs: ClassVar[frozenset[str]] = frozenset({"ref"})

    def __call__(self, state: TokenState) -> Residual:
        return _distribution_residual(state, state.ref, 1.0, self.tail)


@dataclass(frozen=True)
class Guided:
    """``π̃ ∝ π_θ^(1−η) · π_T^η`` (Target-SFT): η = 0 is the student, η = 1 the teacher.

    The closed-form maximiser of ``E_π[log π_T − log π_θ] − KL(π‖π_θ)/η``: the teacher reshapes the student's own
    distribution. With a top-k teacher completed by ``tail="student"``, ``π_T ∝ p`` outside the top-k, hence
    ``π̃ ∝ c^η·p`` there and ``p^(1−η)·π_T^η`` on the ids.
    """

    eta: float = 0.5
    temperature: float = 1.0
    tail: Tail = "student"
    needs: ClassVar[frozenset[str]] = frozenset({"teacher"})

    def __call__(self, state: TokenState) -> Residual:
        if self.eta == 0.0:
            return Self()(state)
        if self.eta == 1.0:
            return _distribution_residual(state, state.teacher, self.temperature, self.tail)
        eta, dist = self.eta, state.teacher
        if not dist.is_topk:
            lt = torch.log_softmax(dist.logits.to(state.logp.dtype) / self.temperature, dim=-1)
            return Residual(dense=torch.softmax((1.0 - eta) * state.logp + eta * lt, dim=-1))
        if self.tail == "renormalize":
            lt = torch.log_softmax(dist.topk_logprobs.to(state.logp.dtype), -1)
            lp = state.logp.gather(-1, dist.topk_ids)
            return _renormalized_topk(state, dist, torch.softmax((1.0 - eta) * lp + eta * lt, -1))
        ids, lt, lp, log_c = _topk_parts(state, dist)
        log_m_student, _ = state.tail(ids)
        inside = (1.0 - eta) * lp + eta * lt  # log of the unnormalised mass on each id
        log_outside = eta * log_c + log_m_student  # log of the unnormalised mass outside the top-k
        log_z = torch.logsumexp(torch.cat([inside, log_outside[:, None]], -1), -1)
        self_coef = (eta * log_c - log_z).exp()
        values = (inside - log_z[:, None]).exp()
        return Residual(self_coef=self_coef, self_skip=ids, sparse_ids=ids, sparse_values=values)


@dataclass(frozen=True)
class Entropic:
    """GEM's signed residual ``π̃ = onehot(y) + sg π_θ − q`` with ``q ∝ sg π_θ^(1/β)`` (the student sharpened at
    temperature β): used with γ = 0, ``Q = π̃`` sums to 1 but is negative where ``q > p``, and ``p − Q = q −
    onehot(y)`` is exactly GEM's logit gradient. Its entropy is not defined (logged as NaN)."""

    beta: float = 0.7
    needs: ClassVar[frozenset[str]] = _NONE

    def __call__(self, state: TokenState) -> Residual:
        ones = torch.ones_like(state.logp_y)
        q = torch.softmax(state.logp / self.beta, dim=-1)
        return Residual(self_coef=ones, dense=q.neg_(), sparse_ids=state.labels[:, None], sparse_values=ones[:, None])
