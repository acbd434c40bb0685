"""``TargetSFTTrainer``: TRL's ``SFTTrainer`` with the fused target loss, for users of TRL's data handling.

    config = TargetSFTConfig(output_dir, method="target_sft", method_params={"eta": 0.5})
    trainer = TargetSFTTrainer(model=model, args=config, train_dataset=..., processing_class=tokenizer,
                               teacher_model=teacher)

TRL 1.16 deprecates ``compute_loss_func`` (the hook :class:`targetsft.TargetLoss` plugs into), and that hook needs
the full ``[tokens, V]`` logits, which costs TRL an extra forward pass per step. This subclass overrides
``compute_loss`` instead: the loss runs inside the model's forward, made fused for that call only, as in
``target-sft train``, with the same keyword arguments as :class:`targetsft.training.recipe.TargetTrainer`. TRL
prepares the data (prompt and completion masks, chat templates, packing); the loss is divided by
``num_items_in_batch``. What it changes relative to ``SFTTrainer`` and what it keeps: ``docs/integrations.md``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from trl import SFTTrainer

from targetsft.training.loss_func import check_frozen_model, saved_tokenizer, shared_vocab_size
from targetsft.training.loss_mixin import FusedLossMixin
from targetsft.training.text_alignment import TextAligner, alignment_note, require_aligned_share
from targetsft.training.trl_config import DEFAULTS, LOOSE_KEYWORDS, TargetSFTConfig
from targetsft.training.vocabulary import resolve_align

logger = logging.getLogger(__name__)

__all__ = ["TargetSFTConfig", "TargetSFTTrainer", "WeightCollator"]

# Per-token weights of `weighted` / `critical`, as dataset columns: `token_weights` (one per token of the tokenized
# example) or `weight` (one per example, given to each of its tokens).
WEIGHT_COLUMNS = ("token_weights", "weight")
# TRL's own warning that label smoothing runs an extra forward: not true here (the method label_smoothing is fused).
_TRL_SMOOTHING_WARNING = r"`label_smoothing_factor` is deprecated in `SFTTrainer`"


class TargetSFTTrainer(FusedLossMixin, SFTTrainer):
    """``trl.SFTTrainer`` whose loss is ``targetsft.fused_target_loss`` of the method a
    :class:`~targetsft.training.trl_config.TargetSFTConfig` (``args``) names, with its parameters, alignment,
    chunking and placements; the trainer takes the models and objects: ``teacher_model``, ``ref_model``,
    ``teacher`` (a top-k teacher: a cache, a server), ``teacher_tokenizer`` (see
    :class:`~targetsft.training.loss_mixin.FusedLossMixin`). Those settings given as trainer keywords still work for
    one release, with a ``DeprecationWarning``.

    ``method`` left unset follows ``SFTConfig``: ``loss_type="dft"`` trains ``dft``, ``label_smoothing_factor=ε``
    ``label_smoothing`` (ε); a ``method`` that contradicts them is refused. ``teacher_model`` may be a model, a local
    path or a hub id (loaded in the student's dtype). TRL's logits-based metrics (entropy, token accuracy) are
    replaced by the target statistics (``accuracy`` is the top-1 accuracy on supervised tokens); evaluation with
    ``compute_metrics`` and ``predict`` get the logits as from ``SFTTrainer``.

    A teacher or reference is lined up with the student as :meth:`targetsft.TargetLoss.bind` does it: by token → id
    map against ``processing_class`` (``teacher_tokenizer``, or the one saved beside the teacher), so padding rows,
    special tokens and chat templates may differ; ``self.vocab_notes`` says what differs. ``teacher_align``:
    ``auto`` (by ids, refused naming ``text`` where the maps differ), ``ids`` or ``text``: a teacher of another
    tokenizer reads each example's text with its own (``align_top_k`` of its tokens per position reach the loss; see
    ``teacher.align`` of a training config). It needs padded batches (no packing or padding-free), and at least
    ``min_aligned_share`` of the supervised tokens of the first training examples must meet a teacher boundary.

    Per-token weights (``weighted``, ``critical``) come from a ``token_weights`` column (one value per token of the
    tokenized example) or a ``weight`` column (one per example, for each of its tokens).
    """

    def __init__(self, *args: Any, teacher_tokenizer: Any = None, **kwargs: Any) -> None:
        model = kwargs.get("model", args[0] if args else None)
        args_ = kwargs.get("args", args[1] if len(args) > 1 else None)
        kwargs = settings_from_config(args_, kwargs)
        teacher_align = kwargs.pop("teacher_align")
        align_top_k = kwargs.pop("align_top_k")
        min_aligned_share = kwargs.pop("min_aligned_share")
        if isinstance(kwargs.get("teacher_model"), str):
            kwargs["teacher_model"] = _load_teacher(kwargs["teacher_model"], model, args_)
        if isinstance(kwargs.get("ref_model"), str):
            kwargs["ref_model"] = _load_teacher(kwargs["ref_model"], model, args_)
        packed = bool(getattr(args_, "packing", False) or getattr(args_, "padding_free", False))
        alignments = []
        aligner = None
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
                logger.info(alignment_note(aligner))
            for role, other in (
                ("teacher", teacher if aligner is None else None),
                ("reference", kwargs.get("ref_model")),
            ):
                if other is not None:
                    other_tok = teacher_tokenizer if role == "teacher" else None
                    alignment = check_frozen_model(model, other, role, tokenizer, other_tok)
                    alignments.append(alignment)
                    if not alignment.same:
                        logger.info(alignment.note(role))
        if packed and (kwargs.get("teacher_cache") is not None or kwargs.get("teacher") is not None):
            raise ValueError(
                "a top-k teacher (a cache, a server) reads each example as the dataset holds it, which TRL's packing "
                "merges away: use packing=False (and padding_free=False) with it, or an online teacher_model, which "
                "reads each packed "
                "example's own context"
            )
        kwargs.setdefault("shared_vocab_size", shared_vocab_size(alignments))
        self.vocab_notes = [a.to_dict() for a in alignments]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_TRL_SMOOTHING_WARNING, category=FutureWarning)
            super().__init__(*args, **kwargs)
        if self.aux_loss_enabled:
            raise ValueError(
                f"{type(self.model).__name__} adds a Mixture-of-Experts load-balancing loss (router_aux_loss_coef="
                f"{self.router_aux_loss_coef}), which the fused target loss does not compute: set "
                "SFTConfig(router_aux_loss_coef=0.0) to train without it"
            )
        self._check_token_weights()
        if aligner is not None:
            self._check_aligned_share(aligner, min_aligned_share)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None:  # keep the weight columns for the collator below
            self._signature_columns = [*self._signature_columns, *WEIGHT_COLUMNS]

    def _check_token_weights(self) -> None:
        """A method that reads per-token weights has a weight column; the collator then pads them beside the labels."""
        columns = set(getattr(self.train_dataset, "column_names", None) or [])
        given = [c for c in WEIGHT_COLUMNS if c in columns]
        if "token_weights" in self.method.needs and not given:
            raise ValueError(
                "this method reads per-token weights: give the training data a 'token_weights' column (one value "
                f"per token) or a 'weight' column (one per example); it has {sorted(columns)}"
            )
        if given:
            self.data_collator = WeightCollator(self.data_collator)

    def _check_aligned_share(self, aligner: TextAligner, least: float, examples: int = 64) -> None:
        """The share of the first ``examples`` training examples' supervised tokens that meet a teacher boundary is
        at least ``least`` (:func:`~targetsft.training.text_alignment.require_aligned_share`)."""
        dataset = self.train_dataset
        if dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
            return
        features = [dataset[i] for i in range(min(examples, len(dataset)))]
        batch = self.data_collator(features)
        rows = aligner.batch(batch["input_ids"], batch["labels"])["teacher_rows"]
        share = require_aligned_share(rows, len(features), least, "min_aligned_share")
        logger.info("teacher: %.1f%% of the supervised tokens meet a teacher boundary", 100 * share)


class WeightCollator:
    """TRL's collator, then the examples' ``token_weights`` (or per-example ``weight``) padded beside its labels:
    position t of ``token_weights`` weighs the label at position t (1.0 where the example has none: padding)."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        examples = [dict(e) for e in examples]
        weights = [(e.pop("token_weights", None), e.pop("weight", None)) for e in examples]
        batch = self.collator(examples)
        labels = batch["labels"]
        if labels.shape[0] != len(examples):
            raise ValueError("per-token weights need one row per example: use packing=False and padding_free=False")
        out = torch.ones(labels.shape, dtype=torch.float32)
        for row, (per_token, per_example) in enumerate(weights):
            if per_token is not None:
                values = torch.as_tensor(per_token, dtype=torch.float32).reshape(-1)
                if values.numel() < len(examples[row]["input_ids"]):
                    raise ValueError(
                        f"example {row} of the batch has {values.numel()} token_weights for its "
                        f"{len(examples[row]['input_ids'])} tokens: give one per token of the tokenized example"
                    )
                width = min(values.numel(), labels.shape[1])
                out[row, :width] = values[:width]
            elif per_example is not None:
                out[row] = float(per_example)
        batch["token_weights"] = out
        return batch


def settings_from_config(config: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The trainer's keywords with what a :class:`~targetsft.training.trl_config.TargetSFTConfig` carries: its
    method, parameters, alignment, chunking and placements, and a teacher / reference by name when none is given.
    The same settings given as trainer keywords still work (deprecated; refused where they contradict the config)."""
    kwargs = dict(kwargs)
    loose = [k for k in LOOSE_KEYWORDS if k in kwargs]
    if loose:
        warnings.warn(
            f"TargetSFTTrainer({', '.join(f'{k}=...' for k in loose)}) is deprecated and will be removed in the next "
            "release: set them in TargetSFTConfig (targetsft.training.trl_trainer.TargetSFTConfig, an SFTConfig)",
            DeprecationWarning,
            stacklevel=3,
        )
    if isinstance(config, TargetSFTConfig):
        for key in LOOSE_KEYWORDS:
            value = getattr(config, key)
            if key in kwargs and value != DEFAULTS[key] and kwargs[key] != value:
                raise ValueError(f"{key} is {value!r} in TargetSFTConfig but {kwargs[key]!r} as a keyword: keep one")
            kwargs.setdefault(key, value)
        for role, name in (
            ("teacher_model", config.teacher_model_name_or_path),
            ("ref_model", config.ref_model_name_or_path),
        ):
            if name and kwargs.get(role) is None:
                kwargs[role] = name
    for key in ("teacher_align", "align_top_k", "min_aligned_share"):
        kwargs.setdefault(key, DEFAULTS[key])
    return kwargs


def _load_teacher(name: str, student: Any, args: Any) -> nn.Module:
    """A teacher (or reference) given by local path or hub id, loaded as the student is: in its dtype (a student
    given by name: with ``SFTConfig.model_init_kwargs``)."""
    from transformers import AutoModelForCausalLM

    if isinstance(student, nn.Module):
        kwargs = {"dtype": next(student.parameters()).dtype}
    else:
        kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
        kwargs.pop("device_map", None)
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load teacher_model {name!r} as a causal LM: {err}") from None


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
