"""Fused lm_head + target loss that never builds the ``[tokens, V]`` logits or target.

Ignored tokens are dropped before the projection; the remaining rows are processed in chunks. Each chunk's
logits ``z = h·Wᵀ``, target and gradient ``p − Q`` are computed in one pass and turned at once into the
gradients ``∂/∂h = (p − Q)·W`` and ``∂/∂W += (p − Q)ᵀ·h``, so nothing of size ``[tokens, V]`` outlives its
chunk: three matrix products per chunk, as for the logits alone in an unfused forward + backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from targetsft.losses import old_keywords
from targetsft.losses import validation as V
from targetsft.losses.distributions import Chunking, LMHead, Projected, TopK
from targetsft.losses.inputs import (
    SideInputs,
    _select,
    check_other_width,
    check_shared_vocab,
    denominator,
    prepare,
    restrict_vocab,
)
from targetsft.losses.loss import compute_dtype
from targetsft.losses.target import Distribution, Target, TargetStats, loss_and_grad

# Bytes of one float32 [chunk, V] buffer when the chunk size is chosen automatically (a chunk holds ~3 of them).
CHUNK_BYTES_CPU = 32 << 20
CHUNK_BYTES_CUDA = 256 << 20


def auto_chunk_size(n_rows: int, vocab_size: int, device: torch.device, hidden_size: int = 0) -> int:
    """Rows per chunk so that one float32 ``[chunk, V]`` buffer takes about ``CHUNK_BYTES_*`` (at most a
    sixteenth of free memory on CUDA), rounded to a multiple of 8 and at most ``n_rows``.

    On CPU the budget grows to a quarter of the float32 ``[V, H]`` weight-gradient buffer when that is larger:
    each chunk reads the whole weight three times, so a large vocabulary needs more rows per chunk to keep the
    matrix products efficient (``bench/profile_fused.py``), and the chunk then stays small beside the weight
    gradient that every implementation holds.
    """
    budget = max(CHUNK_BYTES_CPU, vocab_size * hidden_size)  # V·H·4 bytes / 4
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(CHUNK_BYTES_CUDA, free // 16)
    rows = max(8, (budget // (4 * vocab_size)) // 8 * 8)
    return max(1, min(rows, n_rows))


@dataclass
class _Head:
    """A projection to the vocabulary: ``z = transform(h·Wᵀ + b)`` for the rows that carry a loss."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    width: int | None = None  # the student's V, for a teacher/reference head that keeps fewer (shared) rows

    def logits(
        self, s: int, e: int, cdt: torch.dtype, logit_scale: float, softcap: float | None, out: Tensor | None = None
    ) -> Tensor:
        """The logits of rows ``s:e`` in ``cdt``, written into ``out`` ``[e − s, V]`` when given; a head of
        fewer rows than ``width`` is padded with ``-inf`` after the transforms (those tokens get no mass)."""
        h = self.hidden[s:e]
        same = h.dtype == self.weight.dtype == cdt
        z = torch.mm(h, self.weight.t(), out=out if same else None)
        if self.bias is not None:
            z += self.bias
        if z.dtype != cdt:
            z = out.copy_(z) if out is not None else z.to(cdt)
        if logit_scale != 1.0:
            z.mul_(logit_scale)
        if softcap is not None:
            z.div_(softcap).tanh_().mul_(softcap)
        if self.width is not None and self.width > z.shape[-1]:
            z = restrict_vocab(z, z.shape[-1], self.width)
        return z


@dataclass
class _Plan:
    """Everything one fused call needs, shared by the forward pass and the recomputing backward."""

    target: Target
    labels: Tensor
    side: SideInputs
    teacher_head: _Head | None
    ref_head: _Head | None
    chunk: int
    logit_scale: float
    softcap: float | None

    def run(
        self,
        student: _Head,
        *,
        need_h: bool,
        need_w: bool,
        need_b: bool,
        row_weight: Tensor | None = None,
        stats: TargetStats | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """Per-row losses and, where asked, the gradients of ``Σ_t row_weight_t·ℓ_t`` for h, W and b."""
        h, w = student.hidden, student.weight
        cdt = compute_dtype(h.dtype)
        n = h.shape[0]
        need_grad = need_h or need_w or need_b
        grad_h = torch.empty(h.shape, dtype=cdt, device=h.device) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=cdt, device=w.device) if need_w else None
        grad_b = torch.zeros(w.shape[0], dtype=cdt, device=w.device) if need_b else None
        w_mm = w if w.dtype == cdt else None  # weight used for dh = g·W, in the matmul dtype
        # Two [chunk, V] buffers reused by every chunk: the logits (then p, then the gradient) and log p.
        buffers = torch.empty((2, min(self.chunk, n), w.shape[0]), dtype=cdt, device=h.device)
        losses = []
        for s in range(0, n, self.chunk):
            e = min(s + self.chunk, n)
            z = student.logits(s, e, cdt, self.logit_scale, self.softcap, out=buffers[0, : e - s])
            dcap = 1.0 - (z / self.softcap).square() if (need_grad and self.softcap is not None) else None
            side = self.side.rows(slice(s, e))
            if self.teacher_head is not None:
                side.teacher = Distribution(logits=self.teacher_head.logits(s, e, cdt, self.logit_scale, self.softcap))
            if self.ref_head is not None:
                side.ref = Distribution(logits=self.ref_head.logits(s, e, cdt, self.logit_scale, self.softcap))
            box = [z]
            del z
            loss, g = loss_and_grad(
                box,
                self.labels[s:e],
                self.target,
                **vars(side),
                need_grad=need_grad,
                stats=stats,
                workspace=buffers[1, : e - s],
            )
            losses.append(loss)
            if not need_grad:
                continue
            if dcap is not None:
                g.mul_(dcap)
                del dcap
            if self.logit_scale != 1.0:
                g.mul_(self.logit_scale)
            if row_weight is not None:
                g.mul_(row_weight[s:e, None].to(cdt))
            if grad_b is not None:
                grad_b += g.sum(0)
            hc = h[s:e]
            if w_mm is not None:  # float32/float64 weights: accumulate in place
                if grad_h is not None:
                    torch.mm(g, w_mm, out=grad_h[s:e])
                if grad_w is not None:
                    grad_w.addmm_(g.t(), hc)
            else:  # low-precision weights: matmuls in their dtype, accumulation in float32
                g_lp = g.to(w.dtype)
                del g
                if grad_h is not None:
                    grad_h[s:e] = g_lp @ w
                if grad_w is not None:
                    grad_w += g_lp.t() @ hc
        loss_rows = torch.cat(losses) if losses else h.new_zeros(0, dtype=cdt)
        return loss_rows, grad_h, grad_w, grad_b


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan, per_row: bool, stats):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        student = _Head(hidden, weight, bias)
        ctx.plan, ctx.per_row, ctx.needs = plan, per_row, (need_h, need_w, need_b)
        if per_row:  # per-token upstream gradients: recompute chunk by chunk in backward
            loss_rows, *_ = plan.run(student, need_h=False, need_w=False, need_b=False, stats=stats)
            ctx.save_for_backward(hidden, weight, bias)
            return loss_rows
        loss_rows, gh, gw, gb = plan.run(student, need_h=need_h, need_w=need_w, need_b=need_b, stats=stats)
        ctx.grads = (gh, gw, gb)
        return loss_rows.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        if ctx.per_row:
            hidden, weight, bias = ctx.saved_tensors
            need_h, need_w, need_b = ctx.needs
            _, gh, gw, gb = ctx.plan.run(
                _Head(hidden, weight, bias), need_h=need_h, need_w=need_w, need_b=need_b, row_weight=grad_out
            )
            grads = (gh, gw, gb)
        else:
            grads = tuple(None if g is None else g.mul_(grad_out.to(g.dtype)) for g in ctx.grads)
            ctx.grads = None
        return *grads, None, None, None


def _teacher_head(name: str, other: Projected, lead, rows, vocab: int, checks: V.Checks) -> _Head:
    """A :class:`Projected` teacher or reference on the loss rows, keeping only the rows of the shared vocabulary."""
    hidden, weight, bias, shared_vocab_size = other.hidden, other.weight, other.bias, other.shared_vocab_size
    V.check_float(f"{name}_hidden", hidden)
    V.check_float(f"{name}_lm_head_weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{name}_lm_head_weight must be [V, H], got shape {tuple(weight.shape)}")
    shared = check_shared_vocab(shared_vocab_size, vocab)
    check_other_width(f"{name}_lm_head_weight", weight.shape[0], vocab, shared, shared_vocab_size is not None)
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{name}_lm_head_bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name}_hidden has size {hidden.shape[-1]} but {name}_lm_head_weight expects {weight.shape[1]}"
        )
    h = _select(hidden.detach(), lead, rows, rows.numel(), f"{name}_hidden")
    checks.finite(f"{name}_hidden", h)
    return _Head(
        h,
        weight.detach()[:shared],
        None if bias is None else bias.detach()[:shared],
        width=vocab if shared < vocab else None,
    )


def fused_target_loss(
    hidden: Tensor,
    lm_head_weight: Tensor | LMHead,
    labels: Tensor,
    *,
    method: str | Target = "sft",
    teacher: TopK | Projected | None = None,
    ref: TopK | Projected | None = None,
    token_weights: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    chunking: Chunking | None = None,
    return_stats: bool | str = False,
    **params: Any,
) -> Tensor | tuple[Tensor, dict[str, float]] | tuple[Tensor, TargetStats]:
    """``target_loss(softcap·tanh(logit_scale·(h·Wᵀ + b)/softcap), labels, ...)`` without the ``[N, V]`` logits.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]`` final hidden states (any float dtype; float32 accumulation).
        lm_head_weight: the ``[V, H]`` output projection (tied or not), or an :class:`~targetsft.LMHead` with its
            bias ``[V]``, ``logit_scale`` and Gemma-style ``softcap``.
        labels: ``[N]`` or ``[B, T]``, already shifted, ``ignore_index`` where there is no loss.
        teacher: :class:`~targetsft.TopK` rows, per position ``[..., k]`` or per loss token ``[n, k]``, or a
            :class:`~targetsft.Projected` teacher (its hidden states and output projection), projected chunk by chunk
            the same way (the student's ``logit_scale``/``softcap``); its weight may have another number of rows
            ``W`` when its ``shared_vocab_size`` is given: only that many rows are projected (padding rows past them,
            on either side, get no mass). ``ref``: a reference model, likewise.
        chunking: a :class:`~targetsft.Chunking`: rows per chunk (None: chosen from ``V`` and free memory) and the
            number of loss tokens when the caller knows it on the host (then nothing is read back to find them).
        return_stats: True: also the means of :func:`targetsft.target_loss`'s statistics (read back once);
            ``"sums"``: their :class:`~targetsft.losses.target.TargetStats` of sums left on the device (a trainer
            adds them up and reads them when it logs).

    The other arguments are as in :func:`targetsft.target_loss`. The keywords ``teacher_topk``, ``teacher_hidden``,
    ``teacher_lm_head_weight``, ``teacher_lm_head_bias`` (likewise ``ref_*``), ``shared_vocab_size``,
    ``lm_head_bias``, ``logit_scale``, ``softcap``, ``chunk_size`` and ``num_loss_tokens`` are deprecated (a
    ``DeprecationWarning``; refused beside the object that replaces them): they become the objects above.

    Under autocast the projections run in the autocast dtype (as autocast would run ``h·Wᵀ``); the target and
    its gradient are always computed in float32. One readable sequence: the projection's inputs checked, the target
    and side inputs prepared, the plan made (every value check read back at once), the chunks run, the loss reduced.
    """
    head = old_keywords.student_head("fused_target_loss", lm_head_weight, params)
    teacher, ref = old_keywords.teacher_and_ref("fused_target_loss", params, teacher, ref, (TopK, Projected))
    chunking = old_keywords.chunking("fused_target_loss", chunking, params)
    _check_projection(hidden, head, labels, chunking.size)
    vocab = head.weight.shape[0]
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
        num_loss_tokens=chunking.loss_tokens,
        checks=(checks := V.Checks()),
    )
    plan, h = _make_plan(target, rows, side, hidden, head.weight, labels, {"teacher": teacher, "ref": ref}, checks)
    size = chunking.size
    plan.chunk = int(size) if size else auto_chunk_size(h.shape[0], vocab, hidden.device, h.shape[-1])
    plan.logit_scale, plan.softcap = float(head.logit_scale), None if head.softcap is None else float(head.softcap)
    n = rows.numel()
    stats = TargetStats() if return_stats else None
    out = _run(plan, h, head.weight, head.bias, reduction == "none", stats)
    if reduction == "none":
        out = out.new_zeros(labels.numel()).index_put((rows,), out).view(labels.shape)
    else:
        out = out / denominator(reduction, num_items_in_batch, n)
    if return_stats == "sums":
        return out, stats
    return (out, stats.means()) if return_stats else out


def _make_plan(
    target: Target,
    rows: Tensor,
    side: SideInputs,
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    others: dict[str, Any],
    checks: V.Checks,
) -> tuple[_Plan, Tensor]:
    """The call's plan (:class:`Projected` teacher and reference heads on the loss rows; chunking and logit transforms
    left at their defaults) and the student's hidden states of the loss rows, after every value check has run."""
    vocab = weight.shape[0]
    heads = {
        name: _teacher_head(name, other, labels.shape, rows, vocab, checks) if isinstance(other, Projected) else None
        for name, other in others.items()
    }
    h = hidden.reshape(-1, hidden.shape[-1])[rows]
    checks.finite("hidden", h)
    checks.finite("lm_head_weight", weight)
    checks.run()  # every value check of the call, read back at once
    plan = _Plan(
        target, labels.reshape(-1)[rows], side, heads["teacher"], heads["ref"], chunk=1, logit_scale=1.0, softcap=None
    )
    return plan, h


def _check_projection(hidden: Tensor, head: LMHead, labels: Tensor, chunk_size: int | None) -> None:
    """The shapes and settings of the student's projection ``h·Wᵀ + b``, each failure named."""
    weight, bias, softcap, logit_scale = head.weight, head.bias, head.softcap, head.logit_scale
    V.check_float("hidden", hidden)
    V.check_float("lm_head_weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"lm_head_weight must be [V, H], got shape {tuple(weight.shape)}")
    vocab, width = weight.shape
    if hidden.shape[-1] != width:
        raise ValueError(f"hidden has size {hidden.shape[-1]} but lm_head_weight is [V={vocab}, H={width}]")
    if not isinstance(labels, Tensor) or labels.shape != hidden.shape[:-1]:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels has shape {shape}, expected {tuple(hidden.shape[:-1])} (hidden without H)")
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"lm_head_bias must have shape [{vocab}], got {tuple(bias.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale != 0):
        raise ValueError(f"logit_scale must be a finite non-zero number, got {logit_scale}")
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size (Chunking.size) must be a positive integer, got {chunk_size}")


def _run(
    plan: _Plan, h: Tensor, weight: Tensor, bias: Tensor | None, per_row: bool, stats: TargetStats | None
) -> Tensor:
    """The fused loss of the loss rows ``h``: per row (``per_row``) or summed. Under autocast the projections run in
    the autocast dtype, explicitly (the target and its gradient stay in float32)."""
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        low = torch.get_autocast_dtype(device_type)
        h, weight = h.to(low), weight.to(low)
        bias = None if bias is None else bias.to(low)
        for head in (plan.teacher_head, plan.ref_head):
            if head is not None:
                head.hidden, head.weight = head.hidden.to(low), head.weight.to(low)
                head.bias = None if head.bias is None else head.bias.to(low)
    with torch.autocast(device_type, enabled=False):
        return _FusedLoss.apply(h, weight, bias, plan, per_row, stats)
