"""Checks of user inputs: each failure is a ``TypeError``/``ValueError`` that names the argument."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

MISSING_ID = -1  # a top-k row of only this id: no distribution at that position

REDUCTIONS = ("mean", "sum", "none")


class Checks:
    """Checks of tensor values, read back from the device once for all of them.

    Each check adds a cheap device-side flag (is anything wrong?) with the check that names the problem; :meth:`run`
    reads every flag in one transfer and runs the naming checks only when one is up. On an accelerator each read is
    a synchronisation, so a batch's inputs cost one instead of one per check.
    """

    def __init__(self) -> None:
        self._flags: list[Tensor] = []
        self._checks: list[Callable[[], None]] = []

    def add(self, flag: Tensor, check: Callable[[], None]) -> None:
        self._flags.append(flag.reshape(()))
        self._checks.append(check)

    def finite(self, name: str, x: Tensor, *, allow_neg_inf: bool = False) -> None:
        """No NaN and no +inf (and no −inf unless ``allow_neg_inf``) in ``x``; see :func:`check_finite`."""
        if allow_neg_inf:
            flag = (torch.isnan(x) | (x == float("inf"))).any()
        else:
            flag = ~torch.isfinite(x.sum())  # NaN or ±inf anywhere makes the sum non-finite (overflow: a false alarm)
        self.add(flag, lambda: check_finite(name, x, allow_neg_inf=allow_neg_inf))

    def run(self) -> None:
        """Raise the first failing check's error, reading the flags back once (nothing to read: no flag)."""
        if not self._flags:
            return
        device = self._flags[0].device
        if bool(torch.stack([f.to(device) for f in self._flags]).any()):
            for check in self._checks:
                check()
        self._flags, self._checks = [], []


def check_float(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_int(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")


def check_finite(name: str, x: Tensor, *, allow_neg_inf: bool = False) -> None:
    """No NaN and no +inf (and no −inf unless ``allow_neg_inf``) anywhere in ``x``."""
    if not allow_neg_inf and bool(torch.isfinite(x.sum())):
        return  # one read pass: a NaN or ±inf anywhere makes the sum non-finite (overflow takes the full check)
    bad = torch.isnan(x) | (x == float("inf"))
    if not allow_neg_inf:
        bad |= x == float("-inf")
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} contains NaN or Inf (first at index {where}: {x[where].item()})")


def check_reduction(reduction: str, num_items_in_batch: Any, checks: Checks | None = None) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None:
        if reduction != "mean":
            raise ValueError(
                "num_items_in_batch replaces the denominator of reduction='mean'; got reduction=" + repr(reduction)
            )

        def check() -> None:
            if bool(torch.as_tensor(num_items_in_batch <= 0).any()):
                raise ValueError(f"num_items_in_batch must be positive, got {num_items_in_batch}")

        if checks is not None and isinstance(num_items_in_batch, Tensor):
            checks.add((num_items_in_batch <= 0).any(), check)
        else:
            check()


def check_labels(labels: Tensor, vocab_size: int, ignore_index: int, checks: Checks | None = None) -> Tensor:
    """Returns the mask of tokens that carry a loss (the range check deferred to ``checks`` when given)."""
    check_int("labels", labels)
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab_size))
    if checks is not None:
        checks.add(bad.any(), lambda: check_labels(labels, vocab_size, ignore_index))
        return valid
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels must be in [0, {vocab_size}) or ignore_index={ignore_index}; "
            f"got {labels[where].item()} at index {where}"
        )
    return valid


def check_topk(name: str, ids: Tensor, logprobs: Tensor, vocab_size: int, checks: Checks | None = None) -> None:
    """Top-k ``(ids, logprobs)`` rows ``[n, k]``: ids in range and distinct, log-probabilities with mass <= 1; a row
    of ids all ``MISSING_ID`` (−1) has no distribution (its log-probabilities are not read)."""
    if ids.shape[-1] == 0:
        raise ValueError(f"{name} must hold at least one token per position (k >= 1)")
    missing = (ids == MISSING_ID).all(-1, keepdim=True)
    logprobs = logprobs.masked_fill(missing, float("-inf"))
    if checks is not None:
        s = ids.sort(-1).values
        repeated = (s[..., 1:] == s[..., :-1]) & ~missing
        flag = (((ids < 0) | (ids >= vocab_size)) & ~missing).any() | repeated.any()
        flag = flag | torch.isnan(logprobs).any() | (logprobs == float("inf")).any() | (logprobs > 1e-4).any()
        flag = flag | (torch.logsumexp(logprobs.double(), -1) > 1e-3).any()
        checks.add(flag, lambda: check_topk(name, ids, logprobs, vocab_size))
        return
    if bool((((ids < 0) | (ids >= vocab_size)) & ~missing).any()):
        raise ValueError(
            f"{name} has token ids outside [0, {vocab_size}), the vocabulary it shares with the student (a row with "
            f"no distribution has all its ids {MISSING_ID})"
        )
    check_finite(f"{name} logprobs", logprobs, allow_neg_inf=True)
    if bool((logprobs > 1e-4).any()):
        raise ValueError(f"{name} logprobs must be <= 0 (log-probabilities), got max {logprobs.max().item():.4g}")
    mass = torch.logsumexp(logprobs.double(), -1)
    if bool((mass > 1e-3).any()):
        raise ValueError(f"{name}: top-k probabilities sum to {mass.exp().max().item():.4f} > 1 at some position")
    if ids.shape[-1] > 1:
        s = ids.sort(-1).values
        if bool(((s[..., 1:] == s[..., :-1]) & ~missing).any()):
            raise ValueError(f"{name} repeats a token id within a position")


def check_token_weights(
    token_weights: Tensor, shape: torch.Size, binary: bool = False, checks: Checks | None = None
) -> None:
    if token_weights.dtype != torch.bool:
        check_float("token_weights", token_weights)
    if token_weights.shape != shape:
        raise ValueError(f"token_weights has shape {tuple(token_weights.shape)}, expected {tuple(shape)} (labels)")
    w = token_weights.to(torch.float32)
    if checks is not None:
        flag = ~torch.isfinite(w).all() | ((w < 0) | (w > 1)).any()
        if binary:
            flag = flag | ((w != 0) & (w != 1)).any()
        checks.add(flag, lambda: check_token_weights(token_weights, shape, binary))
        return
    check_finite("token_weights", w)
    if bool(((w < 0) | (w > 1)).any()):
        raise ValueError("token_weights must lie in [0, 1] (they are the label trust γ)")
    if binary and bool(((w != 0) & (w != 1)).any()):
        raise ValueError("token_weights must be 0/1 flags for this method")
