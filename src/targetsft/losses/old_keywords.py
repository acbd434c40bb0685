"""The losses' keywords of 0.2 for a teacher, a reference, the student's head and the chunking, still accepted for
one release: each is taken out of the call's ``**params``, turned into the object that replaces it
(:mod:`targetsft.losses.distributions`) with a ``DeprecationWarning`` naming it, and refused beside that object."""

from __future__ import annotations

import dataclasses
import sys
import warnings
from typing import Any

from targetsft.losses.distributions import Chunking, Given, LMHead, Logits, Projected, TopK


def _warn(where: str, old: str, new: str) -> None:
    """A DeprecationWarning at the first frame outside the loss layer (the caller of the loss function)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith("targetsft.losses"):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"{where}: {old} is deprecated, pass {new} instead", DeprecationWarning, stacklevel=level)


def _take(params: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The given (not None) values of ``keys`` popped from ``params``."""
    taken = {k: params.pop(k) for k in keys if k in params}
    return {k: v for k, v in taken.items() if v is not None}


def _one(where: str, role: str, given: Any, params: dict[str, Any], kinds: tuple[type, ...]) -> Given | None:
    """A teacher or reference: ``given`` (an object of ``kinds``), or built from its old keywords."""
    keys = [f"{role}_topk"]
    keys += [f"{role}_logits"] if Logits in kinds else []
    keys += [f"{role}_hidden", f"{role}_lm_head_weight", f"{role}_lm_head_bias"] if Projected in kinds else []
    old = _take(params, tuple(keys))
    if given is not None:
        if old:
            raise ValueError(f"give {role}= or its old keywords ({', '.join(old)}), not both")
        if not isinstance(given, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise TypeError(f"{where}: {role} must be {names}, got {type(given).__name__}")
        return given
    forms = [k for k in (f"{role}_logits", f"{role}_topk", f"{role}_hidden") if k in old]
    if len(forms) > 1:
        raise ValueError(f"give either {forms[0]} or {forms[1]}, not both")
    if f"{role}_topk" in old:
        topk = old[f"{role}_topk"]
        if not (isinstance(topk, (tuple, list)) and len(topk) == 2):
            raise TypeError(f"{role}_topk must be a pair (token_ids, logprobs)")
        _warn(where, f"{role}_topk=(ids, logprobs)", f"{role}=TopK(ids, logprobs)")
        return TopK(*topk)
    if f"{role}_logits" in old:
        _warn(where, f"{role}_logits=z", f"{role}=Logits(z)")
        return Logits(old[f"{role}_logits"])
    if f"{role}_hidden" in old or f"{role}_lm_head_weight" in old:
        if f"{role}_hidden" not in old or f"{role}_lm_head_weight" not in old:
            raise ValueError(f"give both {role}_hidden and {role}_lm_head_weight")
        _warn(where, f"{role}_hidden/{role}_lm_head_weight/{role}_lm_head_bias", f"{role}=Projected(h, W, b)")
        return Projected(old[f"{role}_hidden"], old[f"{role}_lm_head_weight"], old.get(f"{role}_lm_head_bias"))
    if f"{role}_lm_head_bias" in old:
        raise ValueError(f"{role}_lm_head_bias was given without {role}_hidden and {role}_lm_head_weight")
    return None


def teacher_and_ref(
    where: str, params: dict[str, Any], teacher: Any, ref: Any, kinds: tuple[type, ...]
) -> tuple[Given | None, Given | None]:
    """The call's teacher and reference, of ``kinds``: as given, or from the old keywords in ``params`` (taken out);
    the old ``shared_vocab_size`` keyword goes onto both."""
    teacher = _one(where, "teacher", teacher, params, kinds)
    ref = _one(where, "ref", ref, params, kinds)
    shared = _take(params, ("shared_vocab_size",)).get("shared_vocab_size")
    if shared is None:
        return teacher, ref
    _warn(where, "shared_vocab_size=", "it on the teacher's and reference's object (TopK(..., shared_vocab_size=n))")
    out = []
    for role, given in (("teacher", teacher), ("ref", ref)):
        if given is not None and given.shared_vocab_size is not None:
            raise ValueError(f"give shared_vocab_size on {role}= or as a keyword, not both")
        out.append(None if given is None else dataclasses.replace(given, shared_vocab_size=shared))
    return out[0], out[1]


def student_head(where: str, lm_head: Any, params: dict[str, Any]) -> LMHead:
    """The student's output projection: an :class:`LMHead`, or a weight with the old ``lm_head_bias``,
    ``logit_scale`` and ``softcap`` keywords (taken out of ``params``)."""
    old = _take(params, ("lm_head_bias", "logit_scale", "softcap"))
    if isinstance(lm_head, LMHead):
        if old:
            raise ValueError(f"give lm_head_weight=LMHead(...) or the old keywords ({', '.join(old)}), not both")
        return lm_head
    if old:
        _warn(where, "/".join(old), "LMHead(weight, bias, logit_scale, softcap) as lm_head_weight")
    return LMHead(
        lm_head, old.get("lm_head_bias"), old.get("logit_scale", 1.0), old.get("softcap")
    )  # type checks follow in the loss


def chunking(where: str, given: Chunking | None, params: dict[str, Any]) -> Chunking:
    """The call's :class:`Chunking`: as given, or from the old ``chunk_size`` and ``num_loss_tokens`` keywords."""
    old = _take(params, ("chunk_size", "num_loss_tokens"))
    if given is not None:
        if old:
            raise ValueError(f"give chunking= or the old keywords ({', '.join(old)}), not both")
        if not isinstance(given, Chunking):
            raise TypeError(f"{where}: chunking must be a Chunking, got {type(given).__name__}")
        return given
    if old:
        _warn(where, "/".join(old), "chunking=Chunking(size, loss_tokens)")
    return Chunking(old.get("chunk_size"), old.get("num_loss_tokens"))
