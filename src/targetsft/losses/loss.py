"""Logits-level losses: :func:`target_loss` and :func:`build_target`.

``target_loss`` is cross-entropy against the method's target held constant: per token
``ℓ_t = −Σ_a Q_t(a) log p_t(a)`` and ``∂ℓ_t/∂z_t = p_t − Q_t`` exactly (times the reduction weight).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from targetsft.losses import old_keywords
from targetsft.losses import validation as V
from targetsft.losses.distributions import Logits, TopK
from targetsft.losses.inputs import SideInputs, denominator, prepare
from targetsft.losses.target import Target, TargetStats, TokenState, dense_target, loss_and_grad

# Rows per block so that one block's float32 temporaries stay near this many bytes.
_BLOCK_BYTES = 1 << 28


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_rows(vocab_size: int) -> int:
    return max(1, _BLOCK_BYTES // (4 * vocab_size))


class _RowLoss(torch.autograd.Function):
    """Per-row ``CE(Q, p)`` over the loss rows of flat logits, with the gradient ``p − Q`` kept for backward."""

    @staticmethod
    def forward(ctx, logits2d: Tensor, rows: Tensor, labels: Tensor, target: Target, side: SideInputs, stats):
        cdt = compute_dtype(logits2d.dtype)
        n, vocab = rows.numel(), logits2d.shape[-1]
        need_grad = ctx.needs_input_grad[0]
        step = _block_rows(vocab)
        losses, grads = [], None
        if need_grad and n > step:
            grads = torch.empty(n, vocab, dtype=cdt, device=logits2d.device)
        for s in range(0, n, step):
            e = min(s + step, n)
            box = [logits2d[rows[s:e]].to(cdt)]
            loss, grad = loss_and_grad(
                box, labels[s:e], target, **vars(side.rows(slice(s, e))), need_grad=need_grad, stats=stats
            )
            losses.append(loss)
            if grads is not None:
                grads[s:e] = grad
            elif need_grad:
                grads = grad
        ctx.save_for_backward(rows, grads if grads is not None else torch.empty(0))
        ctx.shape = logits2d.shape
        ctx.dtype = logits2d.dtype
        return torch.cat(losses) if losses else logits2d.new_zeros(0, dtype=cdt)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows: Tensor):
        rows, grads = ctx.saved_tensors
        out = torch.zeros(ctx.shape, dtype=ctx.dtype, device=grad_rows.device)
        if rows.numel():
            out[rows] = (grads * grad_rows[:, None].to(grads.dtype)).to(ctx.dtype)
        return out, None, None, None, None, None


def _check_logits(logits: Tensor, labels: Tensor) -> int:
    """Float logits ``[..., V]`` and labels of their leading shape; returns ``V``."""
    V.check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if not isinstance(labels, Tensor) or labels.shape != logits.shape[:-1]:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels has shape {shape}, expected {tuple(logits.shape[:-1])} (logits without V)")
    return logits.shape[-1]


def target_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    method: str | Target = "sft",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    teacher: Logits | TopK | None = None,
    ref: Logits | TopK | None = None,
    token_weights: Tensor | None = None,
    return_stats: bool = False,
    **params: Any,
) -> Tensor | tuple[Tensor, dict[str, float]]:
    """Cross-entropy against the designed target ``Q = γ·onehot(y) + (1 − γ)·π̃`` of ``method``.

    ``ℓ_t = −Σ_a sg(Q_t(a))·log softmax(z_t)(a)``, so ``∂ℓ_t/∂z_t = p_t − Q_t`` for every method.

    Args:
        logits: ``[..., V]`` student logits (any float dtype; computed in float32, or float64 if given).
        labels: ``[...]`` target ids, already shifted; ``ignore_index`` marks tokens without loss.
        method: a name from :data:`targetsft.METHODS` or a :class:`targetsft.Target`.
        reduction: ``"mean"`` over non-ignored tokens (0 when there are none, with zero gradient, where
            ``F.cross_entropy`` returns NaN), ``"sum"``, or ``"none"`` (per token, 0 at ignored tokens).
        num_items_in_batch: with ``"mean"``, divide the summed loss by this instead (the transformers/TRL
            convention that keeps gradient accumulation and data parallelism exact).
        teacher: the teacher's distribution: :class:`~targetsft.Logits` ``[..., W]`` or :class:`~targetsft.TopK`
            ``(ids [..., k], logprobs [..., k])`` (also accepted as ``[n_loss_tokens, k]`` in the order of the
            non-ignored labels). Its ``shared_vocab_size``, the real tokens it shares with the student (the student's
            ``len(tokenizer)``), lets its width ``W`` differ: columns at or past it are padding on either side, so
            ``π_T(a) ∝ exp(z_T(a))·1{a < shared_vocab_size}`` (top-k ids must lie below it); None: ``W`` is the
            student's ``V``, all of it real.
        ref: the reference model of ``asft`` and ``sft_kl``, in the same forms.
        token_weights: ``[...]`` per-token γ for ``weighted`` and ``critical``.
        return_stats: also return means over loss tokens of γ, p(y), −log p(y), Q(y), H(π̃) and accuracy.
        **params: the method's parameters (see ``METHODS[method].params``).

    The keywords ``teacher_logits``, ``teacher_topk``, ``ref_logits``, ``ref_topk`` and ``shared_vocab_size`` are
    deprecated (a ``DeprecationWarning``; refused beside ``teacher``/``ref``): they become the objects above.
    """
    teacher, ref = old_keywords.teacher_and_ref("target_loss", params, teacher, ref, (Logits, TopK))
    vocab = _check_logits(logits, labels)
    target, rows, side = prepare(
        method,
        params,
        labels,
        vocab,
        ignore_index=ignore_index,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        teacher=teacher,
        ref=ref,
        token_weights=token_weights,
        checks=(checks := V.Checks()),
    )
    checks.finite("logits", logits)
    checks.run()
    stats = TargetStats() if return_stats else None
    logits2d = logits.reshape(-1, vocab)
    rows_loss = _RowLoss.apply(logits2d, rows, labels.reshape(-1)[rows], target, side, stats)
    if reduction == "none":
        out = rows_loss.new_zeros(labels.numel()).index_put((rows,), rows_loss).view(labels.shape)
    else:
        out = rows_loss.sum() / denominator(reduction, num_items_in_batch, rows.numel())
    return (out, stats.means()) if return_stats else out


def build_target(
    logits: Tensor,
    labels: Tensor,
    *,
    method: str | Target = "sft",
    ignore_index: int = -100,
    teacher: Logits | TopK | None = None,
    ref: Logits | TopK | None = None,
    token_weights: Tensor | None = None,
    **params: Any,
) -> Tensor:
    """The dense target ``Q = γ·onehot(y) + (1 − γ)·π̃`` ``[..., V]`` of ``method`` (zero rows where ignored).

    Meant for analysis and tests on small vocabularies; training never builds it. The arguments are
    :func:`target_loss`'s (its deprecated keywords included).
    """
    teacher, ref = old_keywords.teacher_and_ref("build_target", params, teacher, ref, (Logits, TopK))
    vocab = _check_logits(logits, labels)
    target, rows, side = prepare(
        method,
        params,
        labels,
        vocab,
        ignore_index=ignore_index,
        reduction="mean",
        num_items_in_batch=None,
        teacher=teacher,
        ref=ref,
        token_weights=token_weights,
        checks=(checks := V.Checks()),
    )
    checks.finite("logits", logits)
    checks.run()
    with torch.no_grad():
        z = logits.detach().reshape(-1, vocab)[rows].to(compute_dtype(logits.dtype))
        state = TokenState(logp=torch.log_softmax(z, -1), labels=labels.reshape(-1)[rows], **vars(side))
        q_rows = dense_target(state, target)
        q = torch.zeros(labels.numel(), vocab, dtype=q_rows.dtype, device=logits.device)
        q[rows] = q_rows
    return q.view(*labels.shape, vocab)
