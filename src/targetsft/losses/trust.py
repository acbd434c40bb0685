"""Label-trust rules: how much of the target's mass ``γ_t ∈ [0, 1]`` goes on the observed token ``y_t``.

Each rule is a small frozen dataclass called on a :class:`~targetsft.losses.target.TokenState`; every quantity that
depends on the model is computed from detached log-probabilities, so ``γ`` is a constant of the loss
(stop-gradient), as the Q-target view requires.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from targetsft.losses.target import TokenState

_NONE: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Constant:
    """``γ = value`` for every token (SFT: 1, label smoothing: 1 − ε, hybrid KD: 1 − λ, KD: 0)."""

    value: float
    needs: ClassVar[frozenset[str]] = _NONE

    def __call__(self, state: TokenState) -> Tensor:
        return torch.full_like(state.logp_y, self.value)


@dataclass(frozen=True)
class LabelProb:
    """``γ = sg(p_θ(y))^α`` (DFT: α = 1; Beyond-log: any α > 0)."""

    alpha: float = 1.0
    needs: ClassVar[frozenset[str]] = _NONE

    def __call__(self, state: TokenState) -> Tensor:
        return (self.alpha * state.logp_y).exp()


@dataclass(frozen=True)
class Threshold:
    """``γ = 1{p_θ(y) > τ}`` (ProFiT): train on the label only where the model already finds it plausible."""

    tau: float
    needs: ClassVar[frozenset[str]] = _NONE

    def __call__(self, state: TokenState) -> Tensor:
        return (
            state.logp_y > math.log(self.tau) if self.tau > 0 else torch.ones_like(state.logp_y, dtype=torch.bool)
        ).to(state.logp.dtype)


@dataclass(frozen=True)
class TopkEntropy:
    """``γ = (H(top-k of p_θ, renormalised) / log k)^α`` (EAFT): confident tokens (low entropy) get little trust."""

    k: int = 20
    alpha: float = 1.0
    needs: ClassVar[frozenset[str]] = _NONE

    def __call__(self, state: TokenState) -> Tensor:
        k = min(self.k, state.vocab_size)
        if k < 2:
            return torch.ones_like(state.logp_y)
        top = torch.log_softmax(state.logp.topk(k, dim=-1).values, dim=-1)
        entropy = -(top.exp() * top).sum(-1)
        return (entropy / math.log(k)).clamp(0.0, 1.0) ** self.alpha


@dataclass(frozen=True)
class Ratio:
    """``γ = p_θ(y) / (p_θ(y) + λ)`` (ASFT: DFT plus a KL anchor of weight λ)."""

    lam: float
    needs: ClassVar[frozenset[str]] = _NONE

    def __call__(self, state: TokenState) -> Tensor:
        p_y = state.p_y
        return p_y / (p_y + self.lam) if self.lam > 0 else torch.ones_like(p_y)


@dataclass(frozen=True)
class TokenWeights:
    """``γ = token_weights`` given per token (iw-SFT importance weights; 0/1 critical-token flags if ``binary``)."""

    binary: bool = False
    needs: ClassVar[frozenset[str]] = frozenset({"token_weights"})

    def __call__(self, state: TokenState) -> Tensor:
        return state.token_weights.to(state.logp.dtype)


@dataclass(frozen=True)
class ClipRatio:
    """``γ = 1{r ≤ 1 + ε}`` with ``r = p_θ(y)/π_old(y)`` (Proximal SFT, ``ℓ = −min(r, clip(r, 1 − ε, 1 + ε))``): a
    token whose probability has already risen past the trust region gets no update; ``π_old`` is the reference."""

    epsilon: float = 0.2
    needs: ClassVar[frozenset[str]] = frozenset({"ref"})

    def __call__(self, state: TokenState) -> Tensor:
        return (state.logp_y - state.ref_logp_y <= math.log1p(self.epsilon)).to(state.logp.dtype)


@dataclass(frozen=True)
class RefRatio:
    """``r = p_θ(y)/π_ref(y)``: the per-token scale of Proximal SFT's original loss, ``∂ℓ/∂z = r·(p − Q)``."""

    needs: ClassVar[frozenset[str]] = frozenset({"ref"})

    def __call__(self, state: TokenState) -> Tensor:
        return (state.logp_y - state.ref_logp_y).exp()


@dataclass(frozen=True)
class LabelProbPlus:
    """``p_θ(y) + λ``: the per-token scale of ASFT's original loss, ``∂ℓ/∂z = (p_y + λ)·(p − Q)``."""

    lam: float
    needs: ClassVar[frozenset[str]] = _NONE

    def __call__(self, state: TokenState) -> Tensor:
        return state.p_y + self.lam
