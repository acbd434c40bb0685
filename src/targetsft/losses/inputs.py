"""Validation and row selection shared by the logits-level and the fused losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from targetsft.losses import validation as V
from targetsft.losses.distributions import Given, Logits, Projected, TopK
from targetsft.losses.methods import resolve_target
from targetsft.losses.target import Distribution, Target


@dataclass
class SideInputs:
    """Per-token inputs besides logits and labels, restricted to the rows that carry a loss (in row order)."""

    teacher: Distribution | None = None
    ref: Distribution | None = None
    token_weights: Tensor | None = None

    def rows(self, index: Tensor | slice) -> SideInputs:
        return SideInputs(
            teacher=None if self.teacher is None else self.teacher.rows(index),
            ref=None if self.ref is None else self.ref.rows(index),
            token_weights=None if self.token_weights is None else self.token_weights[index],
        )


def _rules(target: Target) -> list[Any]:
    return [r for r in (target.trust, target.residual, target.scale) if r is not None]


def _select(x: Tensor, lead: torch.Size, rows: Tensor, n_valid: int, name: str) -> Tensor:
    """Rows of a per-token tensor ``[..., k]``: given for every position (``lead``) or only for loss rows."""
    if x.shape[:-1] == lead:
        return x.reshape(-1, x.shape[-1])[rows]
    if x.dim() == 2 and x.shape[0] == n_valid:
        return x
    raise ValueError(
        f"{name} has leading shape {tuple(x.shape[:-1])}; expected {tuple(lead)} (one row per label) "
        f"or ({n_valid},) (one row per label that is not ignore_index)"
    )


def check_shared_vocab(shared_vocab_size: int | None, vocab_size: int) -> int:
    """The number of real tokens the student shares with a teacher or reference (default: all ``vocab_size``)."""
    if shared_vocab_size is None:
        return vocab_size
    if isinstance(shared_vocab_size, bool) or not isinstance(shared_vocab_size, int):
        raise TypeError(f"shared_vocab_size must be an int or None, got {type(shared_vocab_size).__name__}")
    if not 1 <= shared_vocab_size <= vocab_size:
        raise ValueError(
            f"shared_vocab_size must lie in [1, {vocab_size}] (the student's vocabulary), got {shared_vocab_size}"
        )
    return shared_vocab_size


def check_other_width(name: str, width: int, vocab_size: int, shared: int, given: bool) -> None:
    """A teacher or reference ``width`` columns wide: the student's ``vocab_size``, or any width that covers the
    ``shared`` real tokens when ``shared_vocab_size`` was given."""
    if not given and width != vocab_size:
        raise ValueError(
            f"{name} has vocabulary width {width} but the student has {vocab_size}: pass shared_vocab_size="
            "len(tokenizer) when the two share a tokenizer and differ only in padding rows"
        )
    if width < shared:
        raise ValueError(f"{name} has vocabulary width {width}, less than the {shared} tokens shared with the student")


def restrict_vocab(logits: Tensor, shared: int, vocab_size: int) -> Tensor:
    """Logits ``[n, W]`` of another model on the student's ``vocab_size`` columns: the first ``shared`` kept, the
    rest ``-inf`` (padding on either side gets no mass; the softmax renormalises over the shared tokens)."""
    if logits.shape[-1] == shared == vocab_size:
        return logits
    return torch.nn.functional.pad(logits[..., :shared], (0, vocab_size - shared), value=float("-inf"))


def distribution(
    name: str, given: Given | None, lead: torch.Size, rows: Tensor, vocab_size: int, checks: V.Checks
) -> Distribution | None:
    """A teacher or reference given as :class:`Logits` ``[..., W]`` or :class:`TopK` ``(ids, logprobs)``, at the loss
    rows, on the student's ``vocab_size`` columns (columns at or past its ``shared_vocab_size`` are padding: dropped,
    see :func:`restrict_vocab`); its value checks go to ``checks``. None for a :class:`Projected` one (the fused loss
    projects it chunk by chunk) and for none."""
    if given is None:
        return None
    n_valid = rows.numel()
    shared_vocab_size = given.shared_vocab_size
    shared = check_shared_vocab(shared_vocab_size, vocab_size)
    if isinstance(given, Logits):
        logits = given.logits
        V.check_float(f"{name}_logits", logits)
        check_other_width(f"{name}_logits", logits.shape[-1], vocab_size, shared, shared_vocab_size is not None)
        dense = restrict_vocab(_select(logits, lead, rows, n_valid, f"{name}_logits"), shared, vocab_size)
        checks.finite(f"{name}_logits", dense, allow_neg_inf=True)

        def no_empty_row() -> None:
            if bool((dense.amax(-1) == float("-inf")).any()):
                raise ValueError(f"{name}_logits has a row where every logit is -inf")

        if dense.numel():
            checks.add((dense.amax(-1) == float("-inf")).any(), no_empty_row)
        return Distribution(logits=dense)
    if isinstance(given, TopK):
        ids, logprobs = given.ids, given.logprobs
        V.check_int(f"{name}_topk[0] (token ids)", ids)
        V.check_float(f"{name}_topk[1] (logprobs)", logprobs)
        if ids.shape != logprobs.shape:
            raise ValueError(f"{name}_topk: ids shape {tuple(ids.shape)} != logprobs shape {tuple(logprobs.shape)}")
        if ids.dim() == 0 or ids.shape[-1] == 0:
            raise ValueError(f"{name}_topk must hold at least one token per position (k >= 1)")
        ids = _select(ids, lead, rows, n_valid, f"{name}_topk")
        logprobs = _select(logprobs, lead, rows, n_valid, f"{name}_topk")
        V.check_topk(f"{name}_topk", ids, logprobs, shared, checks)
        missing = (ids == V.MISSING_ID).all(-1)  # no distribution there: distinct in-range ids stand in
        ids = torch.where(missing[:, None], torch.arange(ids.shape[-1], device=ids.device), ids.long())
        return Distribution(topk_ids=ids, topk_logprobs=logprobs, missing=missing)
    if isinstance(given, Projected):
        return None
    raise TypeError(f"{name} must be TopK, Logits or Projected, got {type(given).__name__}")


def loss_rows(valid: Tensor, num_loss_tokens: int | None, checks: V.Checks) -> Tensor:
    """Flat indices of the tokens that carry a loss: ``nonzero`` (a read back), or without a read when the caller
    knows their number (``num_loss_tokens``, checked against the labels with the other value checks)."""
    flat = valid.reshape(-1)
    if num_loss_tokens is None:
        return flat.nonzero().squeeze(-1)
    n = int(num_loss_tokens)

    def check() -> None:
        if int(flat.sum()) != n:
            raise ValueError(f"num_loss_tokens is {n} but the labels have {int(flat.sum())} tokens that carry a loss")

    checks.add(flat.sum() != n, check)
    try:
        return torch.nonzero_static(flat, size=n).squeeze(-1)
    except NotImplementedError:  # a backend without it: read the rows back after all
        return flat.nonzero().squeeze(-1)


def prepare(
    method: str | Target,
    params: dict[str, Any],
    labels: Tensor,
    vocab_size: int,
    *,
    ignore_index: int,
    reduction: str,
    num_items_in_batch: Any,
    teacher: Given | None = None,
    ref: Given | None = None,
    token_weights: Tensor | None = None,
    num_loss_tokens: int | None = None,
    checks: V.Checks | None = None,
) -> tuple[Target, Tensor, SideInputs]:
    """Validate everything but the student's logits; return the target, the flat loss-row indices and side inputs.

    A :class:`Projected` teacher or reference counts as given but reaches no side input (the fused loss projects it).
    The checks of tensor values go to ``checks`` for the caller to run with its own (at once when None). The number
    of loss rows sizes everything after it: ``num_loss_tokens`` gives it from the host (checked with the others),
    else it is read back (``nonzero``).
    """
    own = checks is None
    checks = V.Checks() if checks is None else checks
    V.check_reduction(reduction, num_items_in_batch, checks)
    target = resolve_target(method, params)
    valid = V.check_labels(labels, vocab_size, ignore_index, checks)
    rows = loss_rows(valid, num_loss_tokens, checks)
    lead = labels.shape
    side = SideInputs(
        teacher=distribution("teacher", teacher, lead, rows, vocab_size, checks),
        ref=distribution("ref", ref, lead, rows, vocab_size, checks),
    )
    has = {"teacher": teacher is not None, "ref": ref is not None, "token_weights": token_weights is not None}
    for need in ("teacher", "ref", "token_weights"):
        if need in target.needs and not has[need]:
            hint = {"teacher": "a teacher (teacher=TopK, Logits or Projected)", "ref": "a reference (ref=...)"}
            raise ValueError(f"this method needs {hint.get(need, need)}")
        if need not in target.needs and has[need]:
            raise ValueError(f"{need} was given but this method does not use it")
    if token_weights is not None:
        binary = bool(getattr(target.trust, "binary", False))
        V.check_token_weights(token_weights, lead, binary=binary, checks=checks)
        side.token_weights = token_weights.reshape(-1)[rows]
    for dist in (side.teacher, side.ref):
        if dist is not None and dist.is_topk:
            for rule in _rules(target):
                if getattr(rule, "temperature", 1.0) != 1.0:
                    raise ValueError(
                        "a top-k teacher is used at the temperature it was cached at; got temperature="
                        f"{rule.temperature}. Build the cache at that temperature and pass temperature=1.0"
                    )
    if own:
        checks.run()
    return target, rows, side


def denominator(reduction: str, num_items_in_batch: Any, n_valid: int) -> Any:
    """What the summed loss is divided by: ``num_items_in_batch``, the number of loss tokens, or 1."""
    if reduction == "mean":
        if num_items_in_batch is not None:
            return num_items_in_batch
        return max(n_valid, 1)
    return 1
