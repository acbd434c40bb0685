"""Teachers that give the loss top-k rows (a cache, a server, a router over them): the interface the trainer reads,
the collator that lets one start its requests a batch early, and the row arithmetic they share."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

IGNORE_INDEX = -100


@runtime_checkable
class TopKTeacher(Protocol):
    """A teacher whose distribution reaches the loss as top-k rows on the student's ids, one per loss row.

    ``batch_rows(batch)`` gets the collated batch (``input_ids``, ``attention_mask``, ``labels``, and what the
    collator adds: ``example_index``, ``teacher_input_ids``, ``teacher_rows``, ...) and returns ``(ids [n, k] int64,
    logprobs [n, k] float32)`` for the ``n`` supervised tokens after the shift, in batch order; a row whose ids are all
    ``MISSING_ID`` has no teacher. ``temperature``: the temperature its log-probs are at; ``shared_vocab_size``: the
    ids below which its rows lie (None: the student's whole vocabulary)."""

    temperature: float

    @property
    def shared_vocab_size(self) -> int | None: ...

    def batch_rows(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]: ...


def loss_rows(labels: Tensor) -> int:
    """The number of loss rows of a batch: its supervised tokens after the shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def check_row_count(ids: Tensor, labels: Tensor, what: str, hint: str) -> None:
    """``ids`` has one row per loss row of ``labels``, else a ValueError naming ``what`` and ``hint``."""
    expected = loss_rows(labels)
    if ids.shape[0] != expected:
        raise ValueError(f"{what} has {ids.shape[0]} rows for this batch but it supervises {expected} tokens: {hint}")


class PrefetchingCollator:
    """A data collator that hands each batch it makes to ``teacher.prefetch`` before returning it, so a teacher that
    answers over the network has the batch's requests in flight while the trainer still works on the batches
    before it (the Trainer's loader collates one batch ahead, a gradient-accumulation window ahead). In a loader's
    worker process (``dataloader_num_workers > 0``) it starts nothing: the rows are asked for where the loss runs."""

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]], teacher: Any) -> None:
        self.collator = collator
        self.teacher = teacher

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(features)
        if torch.utils.data.get_worker_info() is None:  # the trainer's own process
            self.teacher.prefetch(batch)
        return batch

    def __getattr__(self, name: str) -> Any:  # the wrapped collator's own attributes (e.g. TRL's pad_token_id)
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)


def stack_rows(rows: Sequence[Sequence[Any]], width: int) -> tuple[Tensor, Tensor]:
    """Ragged top-k rows (each starting with its ids and their log-probs, as vLLM gives them) as ``(ids [n, w]
    int64, logprobs [n, w])``, ``w`` the longest row (``width`` when there are none), short rows completed with id −1
    at ``-inf``; log-probs clamped to ≤ 0."""
    width = max((len(r[0]) for r in rows), default=width)
    ids = torch.full((len(rows), width), -1, dtype=torch.long)
    lps = torch.full((len(rows), width), float("-inf"))
    for i, row in enumerate(rows):
        ids[i, : len(row[0])] = torch.tensor(row[0], dtype=torch.long)
        lps[i, : len(row[1])] = torch.tensor(row[1], dtype=torch.float32)
    return ids, lps.clamp(max=0.0)


def round_down_fp16(x: Tensor) -> Tensor:
    """float32 → float16 rounded toward −∞, so that ``exp`` of the stored values never exceeds the true ones."""
    h = x.to(torch.float16)
    up = h.to(torch.float32) > x
    if bool(up.any()):
        h = torch.where(up, torch.nextafter(h, torch.full_like(h, float("-inf"))), h)
    return h


def drop_unshared(ids: Tensor, lps: Tensor, shared: int) -> tuple[Tensor, Tensor]:
    """Top-k rows (sorted by log-prob) without ids at or past ``shared``: those are given distinct unused shared
    ids at ``-inf`` and the row's kept log-probs are renormalised by ``1 − (mass of the dropped ids)``."""
    outside = ids >= shared
    if not bool(outside.any()):
        return ids.to(torch.int32), lps
    dropped = torch.where(outside, lps, float("-inf")).logsumexp(-1, keepdim=True)
    lps = torch.where(outside, float("-inf"), lps - torch.log1p(-dropped.exp().clamp(max=1 - 1e-6)))
    # fill the dropped slots with ids of the shared vocabulary no kept slot uses (the smallest such ids)
    for r in outside.any(-1).nonzero().squeeze(-1).tolist():
        used = set(ids[r][~outside[r]].tolist())
        free = (i for i in range(shared) if i not in used)
        ids[r, outside[r]] = torch.tensor([next(free) for _ in range(int(outside[r].sum()))], dtype=ids.dtype)
    return ids.to(torch.int32), lps.clamp(max=0.0)
