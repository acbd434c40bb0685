"""The trainer's examples: a config's records, split into training and held-out parts, tokenized, and batched.

:func:`build_dataset` gives the training examples (what the teacher cache is built over), :func:`build_eval_dataset`
the held-out ones of ``data.eval``, both through one tokenization (token weights, privileged teacher prompt);
:func:`data_notes` says, in lines a user reads at start, where a default or a setting cuts or caps their data.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from targetsft.losses.methods import get_method
from targetsft.runtime.inputs import InputError
from targetsft.training.config import TrainConfig
from targetsft.training.fused_forward import IGNORE_INDEX
from targetsft.training.routed_teacher import route_records
from targetsft.training.text_alignment import TextAligner, collate_teacher


def _privileged_prompt(record: dict[str, Any]) -> dict[str, Any]:
    """The record as a teacher with the final answer in its prompt sees it (``teacher.prompt: answer_hint``)."""
    from targetsft.data.sft import to_prompt_completion

    pc = to_prompt_completion(record)
    answer = record.get("answer")
    if answer is None:
        raise ValueError("teacher.prompt=answer_hint needs an 'answer' field in every training record")
    hint = f"\n(For reference, the correct final answer is {answer}.)"
    prompt = pc["prompt"]
    if isinstance(prompt, str):
        prompt = prompt + hint
    else:
        prompt = [dict(m) for m in prompt]
        prompt[-1]["content"] = prompt[-1]["content"] + hint
    return {"prompt": prompt, "completion": pc["completion"]}


def split_records(cfg: TrainConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, int]:
    """(training records, held-out records or None, records available before ``data.size``).

    A fractional ``data.eval`` takes that share of the records (at least one), chosen from ``data.seed``, out of
    the training set; a name loads that file or dataset whole."""
    from targetsft.data.sft import load_records

    data = cfg.data
    if data.train == "gsm-train":  # a generator: it makes as many as asked
        records = load_records(data.train, size=data.size, seed=data.seed)
        available = len(records)
    else:
        records = load_records(data.train, seed=data.seed)
        available = len(records)
        records = records if data.size is None else records[: data.size]
    if data.eval is None:
        return records, None, available
    if isinstance(data.eval, str):
        return records, load_records(data.eval, seed=data.seed), available
    n = max(1, round(data.eval * len(records)))
    if n >= len(records):
        raise InputError(f"data.eval={data.eval} of {len(records)} records leaves nothing to train on")
    held = set(random.Random(data.seed).sample(range(len(records)), n))
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held], available


def teacher_prompt_tokenizer(cfg: TrainConfig, tokenizer: Any, teacher: str | None = None) -> Any:
    """The tokenizer that renders the teacher's prompt under ``teacher.prompt: own_template`` (``teacher.tokenizer``,
    else ``teacher`` or ``teacher.model``), checked to share the student ``tokenizer``'s token ids; None for the other
    prompts."""
    if cfg.teacher.prompt != "own_template":
        return None
    from targetsft.runtime.models import load_tokenizer, resolve_model
    from targetsft.training.vocabulary import check_token_maps

    source = cfg.teacher.tokenizer or teacher or cfg.teacher.model
    if not source:
        raise ValueError("teacher.prompt own_template needs the teacher's tokenizer: set teacher.tokenizer")
    other = load_tokenizer(resolve_model(source))
    if cfg.teacher.align != "text":
        check_token_maps(tokenizer, other, f"teacher tokenizer {source!r}")
    return other


def teacher_aligner(
    cfg: TrainConfig, tokenizer: Any, teacher: str | None = None, teacher_tokenizer: Any = None
) -> TextAligner | None:
    """The :class:`~targetsft.training.text_alignment.TextAligner` of an online teacher (``teacher``, else
    ``teacher.model``) whose tokenizer (``teacher.tokenizer``, else the teacher's own) is aligned by text
    (:func:`~targetsft.training.vocabulary.resolve_align` of ``teacher.align``); None for one aligned by ids."""
    from targetsft.runtime.models import load_tokenizer, resolve_model
    from targetsft.training.vocabulary import resolve_align

    source = cfg.teacher.tokenizer or teacher or cfg.teacher.model
    if not source:
        return None
    other = teacher_tokenizer or load_tokenizer(resolve_model(source))
    if resolve_align(cfg.teacher.align, tokenizer, other, f"teacher {source!r}") == "ids":
        return None
    return TextAligner.build(tokenizer, other, top_k=cfg.teacher.align_top_k)


def _teacher_prompt(
    cfg: TrainConfig, tokenizer: Any, teacher_tokenizer: Any, record: dict[str, Any]
) -> list[int] | None:
    """The teacher's own prompt tokens for ``record`` (None: the teacher reads the student's sequence)."""
    from targetsft.data.sft import tokenize_record

    if cfg.teacher.prompt == "answer_hint":
        rendered = tokenize_record(tokenizer, _privileged_prompt(record), 1 << 30)
    elif cfg.teacher.prompt == "own_template":
        rendered = tokenize_record(teacher_tokenizer, record, 1 << 30)
    else:
        return None
    return [t for t, label in zip(rendered["input_ids"], rendered["labels"]) if label == IGNORE_INDEX]


def tokenize_examples(
    cfg: TrainConfig,
    tokenizer: Any,
    records: list[dict[str, Any]],
    source: str,
    teacher_tokenizer: Any = None,
    aligner: TextAligner | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Tokenized examples (``input_ids``, ``labels``, ``attention_mask``, ``example_index`` and, for a teacher with
    a prompt of its own, ``teacher_input_ids``/``teacher_labels``; ``token_weights`` for the weighted methods) plus
    counts of kept/truncated/dropped records.

    A teacher's own sequence is its prompt (``answer_hint``; ``own_template``, rendered by ``teacher_tokenizer``)
    followed by exactly the student's completion tokens, so the supervised tokens align by construction. A teacher
    of another tokenizer (``aligner``) reads the text instead: ``teacher_input_ids`` and ``teacher_rows`` of
    :meth:`~targetsft.training.text_alignment.TextAligner.example`. With routed teachers (``teachers``), each
    example's ``teacher_route`` is the name of its teacher or None
    (:func:`~targetsft.training.routed_teacher.route_records`).
    """
    from targetsft.data.sft import aligned_token_weights, tokenize_record

    weighted = "token_weights" in get_method(cfg.loss.method).needs
    routes = route_records(records, cfg.teachers) if cfg.teachers else None
    items: list[dict[str, Any]] = []
    counts = {"records": len(records), "kept": 0, "truncated": 0, "dropped": 0}
    for r, record in enumerate(records):
        item = tokenize_record(tokenizer, record, cfg.data.max_length, overflow=cfg.data.overflow)
        if item is None:
            counts["dropped"] += 1
            continue
        truncated = item["input_ids"][-1] != tokenizer.eos_token_id
        counts["kept"] += 1
        counts["truncated"] += int(truncated)
        if weighted:
            where = f"{source}: record {len(items) + counts['dropped']}"
            full = tokenize_record(tokenizer, record, 1 << 30)["labels"] if truncated else item["labels"]
            supervised = sum(label != IGNORE_INDEX for label in full)  # of the whole record, before truncation
            weights = aligned_token_weights(record, item["labels"], supervised, where)
            if weights is None:
                raise InputError(f"{where}: method {cfg.loss.method!r} needs token_weights (or weight) in every record")
            item["token_weights"] = weights
        t_prompt = _teacher_prompt(cfg, tokenizer, teacher_tokenizer, record)
        if aligner is not None:
            if cfg.teacher.prompt == "answer_hint":  # rendered by the student's tokenizer: the teacher reads its text
                t_prompt = aligner.read_prompt(t_prompt)
            item.update(aligner.example(item["input_ids"], item["labels"], t_prompt))
        elif t_prompt is not None and cfg.teacher.align != "text":  # text: a cache holds the teacher's side
            start = next(i for i, l in enumerate(item["labels"]) if l != IGNORE_INDEX)
            item["teacher_input_ids"] = t_prompt + item["input_ids"][start:]
            item["teacher_labels"] = [IGNORE_INDEX] * len(t_prompt) + item["labels"][start:]
        item["example_index"] = len(items)
        if routes is not None:
            item["teacher_route"] = routes[r]
        items.append(item)
    return items, counts


Split = tuple[list[dict[str, Any]], list[dict[str, Any]] | None, int]  # what split_records returns


def build_dataset(
    cfg: TrainConfig,
    tokenizer: Any,
    split: Split | None = None,
    teacher_tokenizer: Any = None,
    aligner: TextAligner | None = None,
) -> tuple[list[dict[str, Any]], dict]:
    """The training examples of ``cfg`` (after ``data.size``, the ``data.eval`` split and ``data.label_noise``) and
    their counts (``available``: records before ``data.size``; ``corrupted`` with label noise); ``split``: the
    :func:`split_records` of ``cfg`` when the caller has it already; ``teacher_tokenizer``: the one of
    :func:`teacher_prompt_tokenizer` (read from ``cfg`` when not given); ``aligner``: a teacher's of
    :func:`teacher_aligner`, when it reads the text."""
    records, _, available = split or split_records(cfg)
    corrupted = None
    if cfg.data.label_noise:
        from targetsft.data.noise import corrupt_records

        records, corrupted = corrupt_records(records, cfg.data.label_noise, cfg.data.noise_kind, cfg.data.seed)
    teacher_tokenizer = teacher_tokenizer or teacher_prompt_tokenizer(cfg, tokenizer)
    items, counts = tokenize_examples(cfg, tokenizer, records, cfg.data.train, teacher_tokenizer, aligner)
    counts["available"] = available
    if corrupted is not None:
        counts["corrupted"] = len(corrupted)
    return items, counts


def build_eval_dataset(
    cfg: TrainConfig,
    tokenizer: Any,
    split: Split | None = None,
    teacher_tokenizer: Any = None,
    aligner: TextAligner | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]] | None:
    """The held-out examples of ``data.eval`` (never corrupted by label noise) and their counts, or None;
    ``teacher_tokenizer`` and ``aligner`` as in :func:`build_dataset`."""
    _, held_out, _ = split or split_records(cfg)
    if held_out is None:
        return None
    source = cfg.data.eval if isinstance(cfg.data.eval, str) else f"{cfg.data.train} (eval split)"
    teacher_tokenizer = teacher_tokenizer or teacher_prompt_tokenizer(cfg, tokenizer)
    return tokenize_examples(cfg, tokenizer, held_out, source, teacher_tokenizer, aligner)


def data_notes(cfg: TrainConfig, counts: dict[str, int], examples_seen: int | None) -> list[str]:
    """Where the data is cut or capped, each with the key that changes it (printed at start, kept in summary)."""
    notes = []
    data = cfg.data
    if data.size is None and data.train == "gsm-train":
        notes.append(f"data.size unset: gsm-train generates {counts['records']} examples (set data.size for more)")
    elif data.size is not None and counts["available"] > data.size:
        notes.append(
            f"data.size {data.size}: training on the first {data.size} of {counts['available']} records "
            "(data.size: null keeps all)"
        )
    if counts["truncated"] or counts["dropped"]:
        what = "truncated" if data.overflow == "truncate" else "dropped"
        n = counts["truncated"] or counts["dropped"]
        notes.append(
            f"data.max_length {data.max_length}: {n} of {counts['records']} examples {what} (raise data.max_length, "
            "or data.overflow: drop)"
        )
    if examples_seen is not None and examples_seen < counts["kept"]:
        capped = "the default" if "max_steps" not in cfg.train else "set"
        notes.append(
            f"train.max_steps ({capped}) covers {examples_seen} of {counts['kept']} training examples: set "
            "train.num_train_epochs (and no max_steps) or a larger train.max_steps to use them all"
        )
    attention = cfg.model_init.attn_implementation or "the model's default"
    if data.packing and not str(attention).startswith("flash"):
        notes.append(
            f"data.packing with attention {attention}: each packed row attends through a mask of its whole length "
            "squared (docs/benchmarks.md: no faster on CPU, out of memory at batch 32); flash_attention_2 takes "
            "the sequence boundaries instead"
        )
    return notes


class Collator:
    """Pads the student's and (if present) the privileged teacher's sequences; keeps ``example_index``; counts the
    tokens that carry a loss on the host (``num_loss_tokens``, an int the loss takes instead of reading it back).

    ``packing=True``: no padding; the batch's examples go end to end in one row with ``position_ids`` restarting at
    each, which the model turns into attention within each example (and an online teacher gets them too). The
    label at each example's first position is ignored, so no token predicts across examples. The supervised tokens
    and their order are those of the padded batch, so the loss, a teacher cache's rows and ``num_items_in_batch``
    are unchanged.
    """

    def __init__(self, pad_token_id: int, packing: bool = False, teacher_pad_id: int = 0) -> None:
        from targetsft.data.sft import DataCollatorForCompletion

        self.pad = DataCollatorForCompletion(pad_token_id=pad_token_id)
        self.packing = packing
        self.teacher_pad_id = teacher_pad_id  # a teacher of another tokenizer pads with its own id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.packing:
            return self._packed(features)
        batch = self.pad(features)
        if "teacher_rows" in features[0]:  # a teacher of another tokenizer: its own sequences, rows per loss token
            batch.update(collate_teacher(features, self.teacher_pad_id))
        elif "teacher_input_ids" in features[0]:
            teacher = self.pad([{"input_ids": f["teacher_input_ids"], "labels": f["teacher_labels"]} for f in features])
            batch["teacher_input_ids"] = teacher["input_ids"]
            batch["teacher_labels"] = teacher["labels"]
            batch["teacher_attention_mask"] = teacher["attention_mask"]
        if "token_weights" in features[0]:
            n = batch["labels"].shape[1]
            rows = [f["token_weights"] + [0.0] * (n - len(f["token_weights"])) for f in features]
            batch["token_weights"] = torch.tensor(rows, dtype=torch.float32)
        if "example_index" in features[0]:
            batch["example_index"] = torch.tensor([f["example_index"] for f in features], dtype=torch.long)
        batch["num_loss_tokens"] = _loss_tokens(features)
        return batch

    def _packed(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "teacher_input_ids" in features[0] and "teacher_rows" not in features[0]:
            raise ValueError("data.packing: a teacher with a prompt of its own reads other sequences; use packing off")
        labels = [[IGNORE_INDEX, *f["labels"][1:]] for f in features]
        batch = {
            "input_ids": torch.tensor([[t for f in features for t in f["input_ids"]]]),
            "labels": torch.tensor([[t for row in labels for t in row]]),
            "position_ids": torch.tensor([[i for f in features for i in range(len(f["input_ids"]))]]),
        }
        if "token_weights" in features[0]:
            batch["token_weights"] = torch.tensor([[w for f in features for w in f["token_weights"]]])
        if "example_index" in features[0]:
            batch["example_index"] = torch.tensor([f["example_index"] for f in features], dtype=torch.long)
        if "teacher_rows" in features[0]:  # padded apart: the loss rows keep their order when packed
            batch.update(collate_teacher(features, self.teacher_pad_id))
        batch["num_loss_tokens"] = _loss_tokens(features)
        return batch


def _loss_tokens(features: list[dict[str, Any]]) -> int:
    """The batch's tokens that carry a loss after the shift (labels past each example's first position), counted on
    the host so that the loss needs no read back to find them."""
    return sum(sum(label != IGNORE_INDEX for label in f["labels"][1:]) for f in features)
