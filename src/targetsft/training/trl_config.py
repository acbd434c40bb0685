"""``TargetSFTConfig``: TRL's ``SFTConfig`` plus what ``TargetSFTTrainer`` trains, as ``GKDConfig`` carries GKD's."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from trl import SFTConfig


@dataclass
class TargetSFTConfig(SFTConfig):
    """``trl.SFTConfig`` plus the target of :class:`~targetsft.training.trl_trainer.TargetSFTTrainer`.

    ``method``: a name of ``targetsft.METHODS`` (None: chosen by ``loss_type`` / ``label_smoothing_factor`` as in
    ``SFTConfig``), with ``method_params`` (e.g. ``{"eta": 0.5}``). ``teacher_model_name_or_path`` /
    ``ref_model_name_or_path``: a teacher (or the reference of ``asft`` / ``sft_kl``) loaded in the student's dtype
    when the trainer is given none. ``teacher_align``: ``auto`` | ``ids`` | ``text`` (a teacher of another tokenizer
    read through the text, ``align_top_k`` of its tokens per position, refused below ``min_aligned_share`` of the
    supervised tokens aligned). ``chunk_size``: rows per chunk of the fused loss (None: automatic);
    ``teacher_placement`` / ``ref_placement``: ``auto`` | ``replicated`` | ``sharded``.
    """

    method: str | None = field(default=None, metadata={"help": "the target: a name of targetsft.METHODS"})
    method_params: dict[str, Any] | None = field(default=None, metadata={"help": "the method's parameters"})
    teacher_model_name_or_path: str | None = field(default=None, metadata={"help": "a teacher's path or hub id"})
    ref_model_name_or_path: str | None = field(default=None, metadata={"help": "a reference's path or hub id"})
    teacher_align: str = field(default="auto", metadata={"help": "auto | ids | text"})
    align_top_k: int = field(default=256, metadata={"help": "teacher tokens per position under text alignment"})
    min_aligned_share: float = field(default=0.5, metadata={"help": "least share of supervised tokens aligned"})
    chunk_size: int | None = field(default=None, metadata={"help": "rows per chunk of the fused loss"})
    teacher_placement: str = field(default="auto", metadata={"help": "auto | replicated | sharded"})
    ref_placement: str = field(default="auto", metadata={"help": "auto | replicated | sharded"})


# the trainer's keywords that TargetSFTConfig now carries (kept on the trainer for one release, deprecated)
LOOSE_KEYWORDS = (
    "method",
    "method_params",
    "teacher_align",
    "align_top_k",
    "min_aligned_share",
    "chunk_size",
    "teacher_placement",
    "ref_placement",
)
DEFAULTS = {f.name: f.default for f in fields(TargetSFTConfig) if f.name in LOOSE_KEYWORDS}
