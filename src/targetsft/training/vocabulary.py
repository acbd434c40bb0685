"""Matching a teacher's (or reference's) vocabulary to the student's by tokenizer, not by matrix size.

Two models of one family share a token → id map but may differ in embedding rows (Qwen2.5-1.5B has 151,936 rows,
-7B 152,064, both for 151,665 tokens), in special tokens (a base model's eos against its instruct release's) and in
chat template. Rows past the real vocabulary are padding: the loss keeps only the shared tokens' columns of the
teacher and renormalises them (``shared_vocab_size`` of :func:`targetsft.target_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CROSS_TOKENIZER_HINT = (
    "a teacher of another family reads the text with its own tokenizer under teacher.align: text (target-sft "
    "train and cache-teacher; TargetSFTTrainer(teacher_align='text'); TargetTrainer(teacher_alignment=TextAligner))"
)


@dataclass(frozen=True)
class VocabAlignment:
    """How another model's vocabulary lines up with the student's.

    ``shared`` ids ``[0, shared)`` are the student's real tokens, each with the same id in both models; the loss
    drops the other model's columns at or past it and the student's own padding rows get none of its mass.
    """

    shared: int
    student_rows: int
    other_rows: int
    other_only_tokens: int = 0  # real tokens only the other model has (a later release's): their mass is dropped
    differences: tuple[str, ...] = field(default=())  # what differs besides the shared ids, one phrase each

    @property
    def same(self) -> bool:
        """Nothing differs: the same rows, all real, the same special tokens and chat template."""
        return not self.differences and self.shared == self.student_rows == self.other_rows

    def note(self, role: str) -> str:
        """One line for the start of a run: what differs, or that nothing does."""
        if self.same:
            return f"{role}: the student's tokenizer and vocabulary"
        return f"{role}: shares the student's {self.shared:,} token ids; differs in " + "; ".join(self.differences)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shared_vocab_size": self.shared,
            "student_rows": self.student_rows,
            "other_rows": self.other_rows,
            "other_only_tokens": self.other_only_tokens,
            "differences": list(self.differences),
        }


def id_to_token(tokenizer: Any) -> list[str | None]:
    """The tokenizer's tokens by id (added tokens included; ``None`` for an id no token has)."""
    if not hasattr(tokenizer, "get_vocab"):
        raise TypeError(f"tokenizer must have get_vocab() (a transformers tokenizer), got {type(tokenizer).__name__}")
    vocab = tokenizer.get_vocab()
    out: list[str | None] = [None] * (max(vocab.values(), default=-1) + 1)
    for token, i in vocab.items():
        out[int(i)] = str(token)
    return out


def _special_tokens(tokenizer: Any) -> dict[str, str]:
    out = {}
    for name, value in dict(getattr(tokenizer, "special_tokens_map", None) or {}).items():
        out[str(name)] = str(sorted(map(str, value)) if isinstance(value, (list, tuple)) else value)
    return out


def _differences(student: Any, other: Any, student_rows: int, other_rows: int, shared: int) -> list[str]:
    out = []
    mine, theirs = _special_tokens(student), _special_tokens(other)
    for name in sorted(set(mine) | set(theirs)):
        if mine.get(name) != theirs.get(name):
            out.append(f"{name} {theirs.get(name)!r} (student {mine.get(name)!r})")
    if getattr(student, "chat_template", None) != getattr(other, "chat_template", None):
        out.append("chat template")
    if other_rows != student_rows or shared != student_rows:
        out.append(
            f"embedding rows {other_rows:,} ({other_rows - shared:,} past the shared tokens; student "
            f"{student_rows:,}, {student_rows - shared:,} past them)"
        )
    return out


def check_token_maps(tokenizer: Any, other_tokenizer: Any, role: str = "teacher") -> tuple[int, int]:
    """``(shared, other_only)``: the student's ``len(tokenizer)`` tokens, each with the same id in the ``role``'s
    tokenizer, and the number of tokens only the ``role`` has. ValueError naming the first token concerned where an
    id means another token, or where a student token is missing from the ``role``'s (it reads the student's ids)."""
    mine, theirs = id_to_token(tokenizer), id_to_token(other_tokenizer)
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if a != b:
            raise ValueError(
                f"the {role}'s tokenizer gives id {i} to {b!r}, the student's to {a!r}: the token → id maps differ. "
                + CROSS_TOKENIZER_HINT
            )
    if len(mine) > len(theirs):
        first = len(theirs)
        raise ValueError(
            f"the student's token {mine[first]!r} (id {first}) is not in the {role}'s vocabulary of {len(theirs):,} "
            f"tokens, and the {role} reads the student's ids. " + CROSS_TOKENIZER_HINT
        )
    return len(mine), len(theirs) - len(mine)


def align_vocabularies(
    tokenizer: Any, other_tokenizer: Any, *, student_rows: int, other_rows: int, role: str = "teacher"
) -> VocabAlignment:
    """Compare the student's ``tokenizer`` with ``other_tokenizer`` (the ``role``'s) by their token → id maps
    (:func:`check_token_maps`) and the models' lm_head rows.

    Accepted beside the shared ids: padding rows on either side, other special tokens or chat template, and tokens
    only the other model has (a later release's): no data the student's tokenizer makes holds them and the student
    cannot predict them, so their mass is dropped with the padding's.
    """
    shared, other_only = check_token_maps(tokenizer, other_tokenizer, role)
    for name, ids, rows in (("student", shared, student_rows), (role, shared + other_only, other_rows)):
        if ids > rows:
            raise ValueError(f"the {name}'s tokenizer has {ids:,} ids but its lm_head {rows:,} rows")
    differences = _differences(tokenizer, other_tokenizer, student_rows, other_rows, shared)
    if other_only:
        differences.append(f"{other_only:,} tokens only the {role} has (their mass is dropped)")
    return VocabAlignment(shared, student_rows, other_rows, other_only, tuple(differences))


def align_by_rows(student_rows: int, other_rows: int, role: str = "teacher") -> VocabAlignment:
    """Without tokenizers: the same number of rows, all taken as shared; else ValueError asking for them."""
    if student_rows != other_rows:
        raise ValueError(
            f"the {role} has {other_rows:,} vocabulary rows, the student {student_rows:,}: give both tokenizers so "
            "that the shared vocabulary can be found (padding rows differ between sizes of one family)"
        )
    return VocabAlignment(student_rows, student_rows, other_rows)


def resolve_align(align: str, tokenizer: Any, other_tokenizer: Any, role: str = "teacher") -> str:
    """``ids`` or ``text``: ``align`` itself, or for ``auto`` ``ids`` when the token → id maps agree
    (:func:`check_token_maps`) and otherwise a ValueError that names ``text``; ``ids`` is checked the same way."""
    if align not in ("auto", "ids", "text"):
        raise ValueError(f"align must be 'auto', 'ids' or 'text', got {align!r}")
    if align == "text":
        return "text"
    check_token_maps(tokenizer, other_tokenizer, role)
    return "ids"
