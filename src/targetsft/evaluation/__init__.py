"""The evaluation layer: answer checking (:mod:`~targetsft.evaluation.answers`), prompts and the early stop
(:mod:`~targetsft.evaluation.prompts`), generation engines (:mod:`~targetsft.evaluation.engines`), metrics
(:mod:`~targetsft.evaluation.metrics`), generative and multiple-choice sets
(:mod:`~targetsft.evaluation.generation_set`, :mod:`~targetsft.evaluation.multiple_choice`), the ``evaluate``
entry point (:mod:`~targetsft.evaluation.suite`) and a set's recorded items scored again without a model
(:mod:`~targetsft.evaluation.rescore`).
Imports the data and runtime layers, nothing of training or experiments; the public names are re-exported here."""

from __future__ import annotations

from targetsft.evaluation.answers import (
    extract_answer,
    extract_boxed,
    is_correct,
    is_correct_boxed,
    to_number,
)
from targetsft.evaluation.engines import (
    ENGINES,
    Engine,
    Generation,
    GenerationRun,
    forward_params,
    generate,
    generate_detailed,
    model_device,
)
from targetsft.evaluation.generation_set import (
    evaluate_generation,
    set_label,
)
from targetsft.evaluation.metrics import (
    generation_metrics,
    mean_ci,
    mean_interval,
    pass_at_k,
    wilson_ci,
)
from targetsft.evaluation.multiple_choice import (
    evaluate_multiple_choice,
    mc_context,
    score_continuations,
)
from targetsft.evaluation.options import ChoiceOptions, DecodeOptions
from targetsft.evaluation.prompts import (
    BOXED_INSTRUCTION,
    PROMPT_STYLES,
    AnswerStoppingCriteria,
    FinishReason,
    answer_complete,
    build_prompt,
    build_prompts,
    cut_at_answer,
)
from targetsft.evaluation.rescore import rescore_items
from targetsft.evaluation.suite import (
    evaluate,
    evaluate_set,
    format_table,
    set_kind,
)

__all__ = [
    "AnswerStoppingCriteria",
    "ChoiceOptions",
    "DecodeOptions",
    "BOXED_INSTRUCTION",
    "ENGINES",
    "Engine",
    "FinishReason",
    "Generation",
    "GenerationRun",
    "PROMPT_STYLES",
    "answer_complete",
    "build_prompt",
    "build_prompts",
    "cut_at_answer",
    "evaluate",
    "evaluate_set",
    "evaluate_generation",
    "evaluate_multiple_choice",
    "extract_answer",
    "extract_boxed",
    "format_table",
    "forward_params",
    "generate",
    "generate_detailed",
    "generation_metrics",
    "is_correct",
    "is_correct_boxed",
    "mc_context",
    "mean_ci",
    "mean_interval",
    "model_device",
    "pass_at_k",
    "rescore_items",
    "score_continuations",
    "set_kind",
    "set_label",
    "to_number",
    "wilson_ci",
]
