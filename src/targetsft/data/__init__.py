"""Data for targetsft: GSM-style training data, evaluation sets, user data loading and tokenization.

Submodules (imported lazily by callers; none imports an optional package at import time):

- :mod:`targetsft.data.gsm`: deterministic GSM8K-style data from reasoning-gym's ``gsm_symbolic`` generators,
  restricted to the ``train`` or ``eval`` templates of ``gsm_symbolic_templates.json`` (shipped here as package data).
- :mod:`targetsft.data.eval_sets`: the evaluation sets (``gsm-heldout``, ``gsm-heldout-new``, ``gsm-intemplate``,
  ``asdiv``, multiple choice ``commonsenseqa``/``piqa``/``openbookqa``) and JSONL files.
- :mod:`targetsft.data.sft`: user records (JSONL/JSON/Parquet/datasets/``gsm-train``) to prompt/completion,
  tokenization with completion-only labels, and a padding collator.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "generate_gsm": "gsm",
    "gsm_user_message": "gsm",
    "GSM_INSTRUCTION": "gsm",
    "load_template_map": "gsm",
    "load_eval_set": "eval_sets",
    "load_mc_set": "eval_sets",
    "EVAL_SETS": "eval_sets",
    "MC_SETS": "eval_sets",
    "load_records": "sft",
    "to_prompt_completion": "sft",
    "tokenize_record": "sft",
    "tokenize_dataset": "sft",
    "DataCollatorForCompletion": "sft",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
