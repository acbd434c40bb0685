"""Gradient inversion: the target ``Q = softmax(z) − (∂L/∂z)/w`` that any differentiable token loss induces.

The decomposition ``Q = γ·onehot(y) + (1 − γ)·π̃`` is not unique from ``Q`` alone: the residual's own mass on
the label, ``π̃(y)``, is unobserved. :func:`induced_target` fixes it by a *reference* shape: ``π̃`` is assumed to
weigh the label relative to the other tokens as the reference does, ``π̃(y)/(1 − π̃(y)) = r(y)/(1 − r(y))``,
which gives ``γ = (Q(y) − r(y)) / (1 − r(y))`` and ``π̃ = (Q − γ·onehot(y)) / (1 − γ)``. With the reference a
method actually uses (the model itself for DFT-like losses, uniform for label smoothing, the teacher for KD)
this recovers that method's ``γ`` and ``π̃`` exactly; ``reference="label_free"`` gives the largest ``γ = Q(y)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from targetsft.losses import validation as V


@dataclass
class InducedTarget:
    """What a loss teaches, per token: ``q`` ``[..., V]``, its split into ``gamma`` ``[...]`` and ``residual``.

    ``is_distribution`` marks tokens whose ``q`` is a distribution (non-negative up to ``tol``, sums to 1);
    ``decomposed`` marks tokens where ``γ ∈ [0, 1]`` and ``π̃`` is a distribution (``γ < 1``). Elsewhere
    ``residual`` is NaN. Ignored tokens are neither.
    """

    q: Tensor
    gamma: Tensor
    residual: Tensor
    is_distribution: Tensor
    decomposed: Tensor


def induced_target(
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    weight: str | float | Tensor = "mean",
    reference: str | Tensor = "self",
    tol: float = 1e-6,
) -> InducedTarget:
    """The target ``Q_t = p_t − (∂L/∂z_t) / w_t`` that ``loss_fn(logits, labels)`` induces, and its ``γ``/``π̃``.

    Args:
        loss_fn: any differentiable function of ``(logits [..., V], labels [...])`` returning a scalar.
        weight: the reduction weight ``w_t``: ``"mean"`` (1 / number of non-ignored tokens), ``"sum"`` (1), a
            number, or a ``[...]`` tensor.
        reference: the shape that fixes ``π̃(y)``: ``"self"`` (softmax of ``logits``), ``"uniform"``,
            ``"label_free"`` (``π̃(y) = 0``), or a ``[..., V]`` probability tensor.
        tol: tolerance of the distribution checks.
    """
    V.check_float("logits", logits)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {tuple(logits.shape[:-1])}")
    valid = V.check_labels(labels, logits.shape[-1], ignore_index)
    z = logits.detach().clone().requires_grad_(True)
    loss = loss_fn(z, labels)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar tensor")
    (grad,) = torch.autograd.grad(loss.reshape(()), z)
    if weight == "mean":
        w = torch.full(labels.shape, 1.0 / max(int(valid.sum()), 1), dtype=z.dtype, device=z.device)
    elif weight == "sum":
        w = torch.ones(labels.shape, dtype=z.dtype, device=z.device)
    else:
        w = torch.as_tensor(weight, dtype=z.dtype, device=z.device).expand(labels.shape)
    with torch.no_grad():
        p = torch.softmax(z, -1)
        q = p - grad / w.unsqueeze(-1)
        y = labels.clamp(min=0).unsqueeze(-1)
        if isinstance(reference, Tensor):
            r_y = reference.to(q.dtype).gather(-1, y).squeeze(-1)
        elif reference == "self":
            r_y = p.gather(-1, y).squeeze(-1)
        elif reference == "uniform":
            r_y = torch.full_like(w, 1.0 / logits.shape[-1])
        elif reference == "label_free":
            r_y = torch.zeros_like(w)
        else:
            raise ValueError(f"reference must be 'self', 'uniform', 'label_free' or a tensor, got {reference!r}")
        q_y = q.gather(-1, y).squeeze(-1)
        is_dist = valid & (q.amin(-1) >= -tol) & ((q.sum(-1) - 1).abs() <= tol * q.shape[-1])
        gamma = (q_y - r_y) / (1 - r_y)
        rest = 1 - gamma
        residual = (q - gamma.unsqueeze(-1) * torch.zeros_like(q).scatter_(-1, y, 1.0)) / rest.unsqueeze(-1)
        decomposed = is_dist & (gamma >= -tol) & (rest > tol) & (residual.amin(-1) >= -tol)
        residual = torch.where(decomposed.unsqueeze(-1), residual, torch.nan)
        gamma = torch.where(valid, gamma, torch.nan)
    return InducedTarget(q=q, gamma=gamma, residual=residual, is_distribution=is_dist, decomposed=decomposed)
