"""What the losses take for each model: one typed value for the teacher, one for the reference, one for the student's
output projection.

A teacher or reference is a next-token distribution ``π`` at every loss row, given in one of three forms:

| form | ``π`` | loss |
|---|---|---|
| :class:`TopK` ``(ids, logprobs)`` | ``exp(logprobs)`` on ``ids``, the rest completed by the method's tail | both |
| :class:`Logits` ``(logits)`` | ``softmax(logits)`` | :func:`~targetsft.target_loss` |
| :class:`Projected` ``(hidden, weight, bias)`` | ``softmax(transform(h·Wᵀ + b))``, projected chunk by chunk | fused |

Each carries ``shared_vocab_size``: the real tokens it shares with the student (its columns or ids at or past it are
padding and get no mass; the softmax renormalises over the rest). None: its vocabulary is the student's, all real.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True, eq=False)
class TopK:
    """``π(a) = exp(logprobs[j])`` for ``a = ids[j]``; the mass ``1 − Σ_j exp(logprobs[j])`` outside the ``k`` ids is
    completed as the method's tail says.

    ``ids`` (integer) and ``logprobs`` (float) have shape ``[..., k]``, one row per label, or ``[n, k]``, one row per
    label that carries a loss, in order; a row whose ids are all ``-1`` has no distribution (the student's own,
    without gradient, stands in). Ids lie below ``shared_vocab_size`` (the student's ``V`` when None)."""

    ids: Tensor
    logprobs: Tensor
    shared_vocab_size: int | None = None


@dataclass(frozen=True, eq=False)
class Logits:
    """``π = softmax(logits[..., :shared_vocab_size])``: dense logits ``[..., W]``, one row per label or per loss
    label (``W`` is the student's ``V`` unless ``shared_vocab_size`` is given; then any ``W ≥ shared_vocab_size``)."""

    logits: Tensor
    shared_vocab_size: int | None = None


@dataclass(frozen=True, eq=False)
class Projected:
    """``π = softmax(softcap·tanh(logit_scale·(h·Wᵀ + b)/softcap))`` restricted to the first ``shared_vocab_size``
    rows of ``W`` and renormalised, with the student's ``logit_scale`` and ``softcap``; computed by the fused loss a
    chunk of rows at a time, never as ``[tokens, W]`` logits.

    ``hidden``: final hidden states ``[..., H']`` (one row per label or per loss label); ``weight``: the model's
    ``[W, H']`` output projection; ``bias``: ``[W]`` or None. Used without gradient."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    shared_vocab_size: int | None = None


Given = TopK | Logits | Projected


@dataclass(frozen=True, eq=False)
class LMHead:
    """A causal LM's output projection: the logits of final hidden states ``h`` are
    ``z = softcap·tanh(logit_scale·(h·Wᵀ + b)/softcap)`` (no ``tanh`` when ``softcap`` is None)."""

    weight: Tensor
    bias: Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None


@dataclass(frozen=True)
class Chunking:
    """How the fused loss cuts its loss rows; neither changes the result.

    ``size``: rows per chunk (None: chosen from ``V`` and free memory). ``loss_tokens``: how many labels carry a loss,
    when the caller knows it on the host (a data collator does): the loss rows are then found without reading
    anything back from the device (checked with the other value checks)."""

    size: int | None = None
    loss_tokens: int | None = None
