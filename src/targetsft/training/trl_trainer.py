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

from targetsft.training.loss_func import check_frozen_model, shared_vocab_size
from targetsft.training.loss_mixin import FusedLossMixin


class TargetSFTTrainer(FusedLossMixin, SFTTrainer):
    """``trl.SFTTrainer`` whose loss is ``targetsft.fused_target_loss`` of ``method``; the keyword arguments are
    :class:`~targetsft.training.loss_mixin.FusedLossMixin` 's (``method``, ``method_params``, ``teacher_model``,
    ``ref_model``, ``chunk_size``, placements). TRL's logits-based metrics (entropy, token accuracy) are replaced by
    the target statistics (``accuracy`` is the top-1 accuracy on supervised tokens). A teacher or reference is
    lined up with the student as :meth:`targetsft.TargetLoss.bind` does it: by token → id map against
    ``processing_class`` (``teacher_tokenizer``, or the one saved beside the teacher), so padding rows, special
    tokens and chat templates may differ; ``self.vocab_notes`` says what differs."""

    def __init__(self, *args: Any, teacher_tokenizer: Any = None, **kwargs: Any) -> None:
        model = kwargs.get("model", args[0] if args else None)
        alignments = []
        if not isinstance(model, str):
            tokenizer = kwargs.get("processing_class")
            for role, other in (("teacher", kwargs.get("teacher_model")), ("reference", kwargs.get("ref_model"))):
                if other is not None:
                    other_tok = teacher_tokenizer if role == "teacher" else None
                    alignment = check_frozen_model(model, other, role, tokenizer, other_tok)
                    alignments.append(alignment)
                    if not alignment.same:
                        print(alignment.note(role), flush=True)
        args_ = kwargs.get("args", args[1] if len(args) > 1 else None)
        packed = bool(getattr(args_, "packing", False) or getattr(args_, "padding_free", False))
        if packed and kwargs.get("teacher_cache") is not None:
            raise ValueError(
                "a teacher cache is looked up by example_index, which TRL's packing merges away: use packing=False "
                "(and padding_free=False) with teacher_cache, or an online teacher_model, which reads each packed "
                "example's own context"
            )
        kwargs.setdefault("shared_vocab_size", shared_vocab_size(alignments))
        self.vocab_notes = [a.to_dict() for a in alignments]
        super().__init__(*args, **kwargs)
