"""Checks of user inputs: each failure is a ``TypeError``/``ValueError`` that names the argument."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


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


def check_reduction(reduction: str, num_items_in_batch: Any) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None:
        if reduction != "mean":
            raise ValueError(
                "num_items_in_batch replaces the denominator of reduction='mean'; got reduction=" + repr(reduction)
            )
        if bool(torch.as_tensor(num_items_in_batch <= 0).any()):
            raise ValueError(f"num_items_in_batch must be positive, got {num_items_in_batch}")


def check_labels(labels: Tensor, vocab_size: int, ignore_index: int) -> Tensor:
    """Returns the mask of tokens that carry a loss."""
    check_int("labels", labels)
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels must be in [0, {vocab_size}) or ignore_index={ignore_index}; "
            f"got {labels[where].item()} at index {where}"
        )
    return valid


def check_topk(name: str, ids: Tensor, logprobs: Tensor, vocab_size: int) -> None:
    """Top-k ``(ids, logprobs)`` rows ``[n, k]``: ids in range and distinct, log-probabilities with mass <= 1."""
    if ids.shape[-1] == 0:
        raise ValueError(f"{name} must hold at least one token per position (k >= 1)")
    if bool(((ids < 0) | (ids >= vocab_size)).any()):
        raise ValueError(f"{name} has token ids outside [0, {vocab_size}), the vocabulary it shares with the student")
    check_finite(f"{name} logprobs", logprobs, allow_neg_inf=True)
    if bool((logprobs > 1e-4).any()):
        raise ValueError(f"{name} logprobs must be <= 0 (log-probabilities), got max {logprobs.max().item():.4g}")
    mass = torch.logsumexp(logprobs.double(), -1)
    if bool((mass > 1e-3).any()):
        raise ValueError(f"{name}: top-k probabilities sum to {mass.exp().max().item():.4f} > 1 at some position")
    if ids.shape[-1] > 1:
        s = ids.sort(-1).values
        if bool((s[..., 1:] == s[..., :-1]).any()):
            raise ValueError(f"{name} repeats a token id within a position")


def check_token_weights(token_weights: Tensor, shape: torch.Size, binary: bool = False) -> None:
    if token_weights.dtype != torch.bool:
        check_float("token_weights", token_weights)
    if token_weights.shape != shape:
        raise ValueError(f"token_weights has shape {tuple(token_weights.shape)}, expected {tuple(shape)} (labels)")
    w = token_weights.to(torch.float32)
    check_finite("token_weights", w)
    if bool(((w < 0) | (w > 1)).any()):
        raise ValueError("token_weights must lie in [0, 1] (they are the label trust γ)")
    if binary and bool(((w != 0) & (w != 1)).any()):
        raise ValueError("token_weights must be 0/1 flags for this method")
