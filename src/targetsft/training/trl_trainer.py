"""``TargetSFTTrainer``: TRL's ``SFTTrainer`` with the fused target loss, for users of TRL's data handling.

    trainer = TargetSFTTrainer(model=model, args=SFTConfig(...), train_dataset=..., processing_class=tokenizer,
                               method="target_sft", method_params={"eta": 0.5}, teacher_model=teacher)

TRL 1.16 deprecates ``compute_loss_func`` (the hook :class:`targetsft.TargetLoss` plugs into), and that hook needs
the full ``[tokens, V]`` logits, which costs TRL an extra forward pass per step. This subclass overrides
``compute_loss`` instead: the loss runs inside the model's patched forward, as in ``target-sft train``, with the
same keyword arguments as :class:`targetsft.training.recipe.TargetTrainer`. TRL prepares the data (prompt and
completion masks, chat templates, packing off); the loss is divided by ``num_items_in_batch``.
"""

from __future__ import annotations

from typing import Any

from trl import SFTTrainer

from targetsft.training.loss_func import check_frozen_model, saved_tokenizer, shared_vocab_size
from targetsft.training.loss_mixin import FusedLossMixin
from targetsft.training.text_alignment import TextAligner, alignment_note
from targetsft.training.vocabulary import resolve_align


class TargetSFTTrainer(FusedLossMixin, SFTTrainer):
    """``trl.SFTTrainer`` whose loss is ``targetsft.fused_target_loss`` of ``method``; the keyword arguments are
    :class:`~targetsft.training.loss_mixin.FusedLossMixin` 's (``method``, ``method_params``, ``teacher_model``,
    ``ref_model``, ``chunk_size``, placements). TRL's logits-based metrics (entropy, token accuracy) are replaced by
    the target statistics (``accuracy`` is the top-1 accuracy on supervised tokens). A teacher or reference is
    lined up with the student as :meth:`targetsft.TargetLoss.bind` does it: by token → id map against
    ``processing_class`` (``teacher_tokenizer``, or the one saved beside the teacher), so padding rows, special
    tokens and chat templates may differ; ``self.vocab_notes`` says what differs. ``teacher_align``: ``auto``
    (by ids, refused naming ``text`` where the maps differ), ``ids`` or ``text``: a teacher of another tokenizer
    reads each example's text with its own (``align_top_k`` of its tokens per position reach the loss; see
    ``teacher.align`` of a training config). It needs padded batches (no packing or padding-free)."""

    def __init__(
        self,
        *args: Any,
        teacher_tokenizer: Any = None,
        teacher_align: str = "auto",
        align_top_k: int = 256,
        **kwargs: Any,
    ) -> None:
        model = kwargs.get("model", args[0] if args else None)
        args_ = kwargs.get("args", args[1] if len(args) > 1 else None)
        packed = bool(getattr(args_, "packing", False) or getattr(args_, "padding_free", False))
        alignments = []
        if not isinstance(model, str):
            tokenizer = kwargs.get("processing_class")
            teacher = kwargs.get("teacher_model")
            aligner = _text_aligner(model, teacher, tokenizer, teacher_tokenizer, teacher_align, align_top_k)
            if aligner is not None:
                if packed:
                    raise ValueError(
                        "a teacher read through the text reads each example's own text: use packing=False and "
                        "padding_free=False"
                    )
                kwargs["teacher_alignment"] = aligner
                print(alignment_note(aligner), flush=True)
            for role, other in (
                ("teacher", teacher if aligner is None else None),
                ("reference", kwargs.get("ref_model")),
            ):
                if other is not None:
                    other_tok = teacher_tokenizer if role == "teacher" else None
                    alignment = check_frozen_model(model, other, role, tokenizer, other_tok)
                    alignments.append(alignment)
                    if not alignment.same:
                        print(alignment.note(role), flush=True)
        if packed and kwargs.get("teacher_cache") is not None:
            raise ValueError(
                "a teacher cache is looked up by example_index, which TRL's packing merges away: use packing=False "
                "(and padding_free=False) with teacher_cache, or an online teacher_model, which reads each packed "
                "example's own context"
            )
        kwargs.setdefault("shared_vocab_size", shared_vocab_size(alignments))
        self.vocab_notes = [a.to_dict() for a in alignments]
        super().__init__(*args, **kwargs)


def _text_aligner(
    model: Any, teacher: Any, tokenizer: Any, teacher_tokenizer: Any, align: str, top_k: int
) -> TextAligner | None:
    """The teacher's :class:`TextAligner` when ``align`` (``auto``, ``ids``, ``text``; see
    :func:`~targetsft.training.vocabulary.resolve_align`) reads it through the text, else None."""
    if teacher is None or tokenizer is None:
        if align == "text":
            raise ValueError("teacher_align='text' needs teacher_model and processing_class (the student's tokenizer)")
        return None
    other = teacher_tokenizer if teacher_tokenizer is not None else saved_tokenizer(teacher, "teacher")
    if resolve_align(align, tokenizer, other) == "ids":
        return None
    return TextAligner.build(tokenizer, other, top_k=top_k)
