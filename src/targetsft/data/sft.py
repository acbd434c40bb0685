"""User data for supervised fine-tuning: loading records, prompt/completion conversion, tokenization, collation.

Accepted record formats (checked in this order):

1. ``prompt`` + ``completion`` (TRL conventions): each a string, or a list of chat messages
   (``[{"role": ..., "content": ...}]``; the completion must be a single assistant message).
2. ``messages``: a chat (list of ``{role, content}``). Everything before the **last** assistant turn is the prompt;
   the last assistant turn is the completion. The loss is on that last assistant turn only: earlier assistant turns
   are context without loss. Messages after the last assistant turn are an error.
3. GSM fields: ``question`` + ``solution`` (our generated data), or ``question`` + ``answer`` where the answer is a
   GSM8K solution containing ``#### n`` (the openai/gsm8k format; ``<<…>>`` calculator annotations are removed).
   The prompt is one user message, ``question + "\\nSolve it step by step and end your answer with '#### <number>'."``;
   the completion is the solution.

Tokenization (:func:`tokenize_record`): the prompt goes through the tokenizer's chat template with
``add_generation_prompt=True`` (a string prompt becomes one user message; ``chat_template=False`` keeps a string
prompt as raw text, as TRL does for non-conversational data). The prompt and the completion are tokenized
**separately** and the ids concatenated, followed by ``tokenizer.eos_token`` (``<|im_end|>`` for SmolLM2), so the
prompt ids are exactly what generation will see and no BPE merge crosses the boundary. Labels are ``-100`` on prompt
tokens and the token ids on completion tokens (unshifted; the model shifts).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from targetsft.runtime.files import open_stored, stored_file

__all__ = [
    "GSM_TRAIN_DEFAULT_SIZE",
    "IGNORE_INDEX",
    "DataCollatorForCompletion",
    "load_records",
    "read_jsonl",
    "to_prompt_completion",
    "tokenize_dataset",
    "tokenize_record",
]

IGNORE_INDEX = -100
GSM_TRAIN_DEFAULT_SIZE = 2000
_META_FIELDS = ("id", "source", "answer", "seed")
_CALC = re.compile(r"<<[^<>]*>>")


# ----------------------------------------------------------------------------------------------------- reading


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL file (blank lines skipped); a gzip-compressed one (``.jsonl.gz``) is decompressed, and a
    ``<name>.jsonl`` that is not there is read from its ``<name>.jsonl.gz``
    (:func:`~targetsft.runtime.files.stored_file`). A malformed line (not UTF-8, not JSON, not an object) raises
    ValueError naming the file, the 1-based line number and the error."""
    path = stored_file(path)
    out: list[dict[str, Any]] = []
    with open_stored(path) as fh:  # decoded line by line, so that bytes that are not UTF-8 are found by line
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: line {lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
            out.append(obj)
    return out


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if isinstance(obj, dict):
        for key in ("data", "train", "records", "examples"):
            if isinstance(obj.get(key), list):
                obj = obj[key]
                break
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise ValueError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
    return obj


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow comes with datasets
        raise ModuleNotFoundError("reading Parquet needs pyarrow: pip install pyarrow") from e
    return pq.read_table(path).to_pylist()


def _load_hf(source: str, split: str, **kwargs: Any) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as e:
        raise ModuleNotFoundError(f"loading {source!r} needs the 'datasets' package: pip install datasets") from e
    p = Path(source)
    if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(p))
    else:
        try:
            ds = datasets.load_dataset(source, split=split, **kwargs)
        except Exception as e:
            raise ValueError(
                f"could not load {source!r}: not a local .jsonl/.json/.parquet file and datasets.load_dataset "
                f"failed ({type(e).__name__}: {e}). Without hub access, use a local file or folder."
            ) from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{source!r} has splits {list(ds)}, not {split!r}")
        ds = ds[split]
    return [dict(r) for r in ds]


def load_records(
    source: str | os.PathLike | Sequence[Mapping[str, Any]],
    *,
    size: int | None = None,
    seed: int | None = None,
    split: str = "train",
    validate: bool = True,
    **load_kwargs: Any,
) -> list[dict[str, Any]]:
    """Load training records.

    ``source``: a local ``.jsonl``/``.json``/``.parquet`` file; a folder (``datasets.load_from_disk`` output, or data
    files for ``datasets.load_dataset``); a ``datasets`` name (needs hub access); the built-in ``"gsm-train"``
    (:func:`targetsft.data.gsm.generate_gsm` on the ``train`` templates: ``size`` examples, default
    ``GSM_TRAIN_DEFAULT_SIZE`` = 2000, from ``seed``, default 0, within the training seed range); or a list of dicts.

    ``size``: keep the first ``size`` records (for files and datasets). ``load_kwargs`` go to
    ``datasets.load_dataset`` (or, for ``"gsm-train"``, to ``generate_gsm``, e.g. ``include_flagged=True``).
    ``validate``: check that every record has a supported format (see the module docstring), raising ValueError
    naming the record index and its fields. Records are returned as loaded; :func:`to_prompt_completion` converts
    one.
    """
    if isinstance(source, (str, os.PathLike)) and str(source) == "gsm-train":
        from targetsft.data.gsm import generate_gsm

        n = GSM_TRAIN_DEFAULT_SIZE if size is None else size
        return generate_gsm("train", n, 0 if seed is None else seed, **load_kwargs)
    if not isinstance(source, (str, os.PathLike)):
        records = [dict(r) for r in source]
        name = "records"
    else:
        path = Path(source)
        name = str(source)
        suffix = path.suffix.lower()
        if path.is_file() and suffix == ".jsonl":
            records = read_jsonl(path)
        elif path.is_file() and suffix == ".json":
            records = _read_json(path)
        elif path.is_file() and suffix == ".parquet":
            records = _read_parquet(path)
        elif path.is_file():
            raise ValueError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")
        elif suffix in (".jsonl", ".json", ".parquet"):
            raise FileNotFoundError(f"{path}: no such file")
        else:
            records = _load_hf(str(source), split, **load_kwargs)
    if size is not None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        records = records[:size]
    if validate:
        for i, r in enumerate(records):
            to_prompt_completion(r, index=i, source=name)
    return records


def check_source(source: str, size: int | None = None, seed: int | None = None) -> None:
    """A local training data file (or folder) loads and every record has a supported format, else an
    :class:`~targetsft.runtime.inputs.InputError` naming it; built-in and hub names are left to the loader."""
    from targetsft.runtime.inputs import InputError, looks_like_path

    if source == "gsm-train":
        return
    path = Path(source)
    if not path.exists():
        if path.suffix.lower() in (".jsonl", ".json", ".parquet") or looks_like_path(source):
            raise InputError(f"data {source!r}: no such file")
        return  # a datasets hub name
    try:
        records = load_records(source, size=size, seed=seed)
    except (ValueError, OSError) as err:
        text = str(err)
        raise InputError(text if str(path) in text else f"data {source!r}: {text}") from None
    if not records:
        raise InputError(f"data {source!r}: no records (an empty file, or size 0)")


def aligned_token_weights(
    record: Mapping[str, Any], labels: Sequence[int], supervised: int, where: str
) -> list[float] | None:
    """A record's per-token weights as one value per position of ``labels`` (0 where no loss), or None if it has
    none. ``token_weights``: one value per supervised (completion) token of the whole record, ``supervised`` of them
    (a truncated example keeps the first ones); ``weight``: one value for every token (a trajectory weight, iw-SFT).
    Values must be finite and in [0, 1]; anything else is an :class:`~targetsft.runtime.inputs.InputError` naming
    ``where``."""
    import math

    from targetsft.runtime.inputs import InputError

    if "token_weights" in record and "weight" in record:
        raise InputError(f"{where}: give token_weights or weight, not both")
    if "weight" in record:
        values = [record["weight"]] * supervised
    elif "token_weights" in record:
        values = record["token_weights"]
        if not isinstance(values, (list, tuple)) or len(values) != supervised:
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise InputError(
                f"{where}: token_weights must hold one value per completion token: {supervised}, got {got}"
            )
    else:
        return None
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
            raise InputError(f"{where}: token weights must be finite numbers in [0, 1], got {v!r}")
    kept = iter(values)
    return [0.0 if label == IGNORE_INDEX else float(next(kept)) for label in labels]


# ------------------------------------------------------------------------------------------- record formats


def _content(msg: Mapping[str, Any]) -> str:
    c = msg.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # [{"type": "text", "text": ...}, ...]
        return "".join(p.get("text", "") for p in c if isinstance(p, Mapping))
    raise ValueError(f"message content must be a string or a list of text parts, got {type(c).__name__}")


def _is_messages(x: Any) -> bool:
    return (
        isinstance(x, list) and len(x) > 0 and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in x)
    )


def _norm_messages(msgs: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    return [{"role": str(m["role"]), "content": _content(m)} for m in msgs]


def to_prompt_completion(record: Mapping[str, Any], index: int | None = None, source: str = "records") -> dict:
    """Normalise one record to ``{"prompt": str | list[message], "completion": str, ...}`` (plus ``id``, ``source``,
    ``answer``, ``seed`` when present). Raises ValueError naming the record index and its fields when the record
    has no supported format."""
    where = f"{source}: record {index}" if index is not None else f"{source}: record"
    meta = {k: record[k] for k in _META_FIELDS if k in record and k not in ("prompt", "completion")}

    def fail(why: str) -> ValueError:
        return ValueError(f"{where}: {why}; fields found: {sorted(record)}")

    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if _is_messages(prompt):
            prompt = _norm_messages(prompt)
        elif not isinstance(prompt, str):
            raise fail("'prompt' must be a string or a list of {role, content} messages")
        if _is_messages(completion):
            if len(completion) != 1 or completion[0]["role"] != "assistant":
                raise fail("a conversational 'completion' must be exactly one assistant message")
            completion = _content(completion[0])
        elif not isinstance(completion, str):
            raise fail("'completion' must be a string or a list with one assistant message")
        return {"prompt": prompt, "completion": completion, **meta}
    if "messages" in record:
        msgs = record["messages"]
        if not _is_messages(msgs):
            raise fail("'messages' must be a non-empty list of {role, content}")
        msgs = _norm_messages(msgs)
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            raise fail("'messages' has no assistant turn to train on")
        if last != len(msgs) - 1:
            raise fail("'messages' must end with an assistant turn (the turn that carries the loss)")
        if last == 0:
            raise fail("'messages' needs at least one turn before the assistant turn")
        return {"prompt": msgs[:last], "completion": msgs[last]["content"], **meta}
    if "question" in record and isinstance(record.get("question"), str):
        from targetsft.data.gsm import gsm_user_message

        sol = record.get("solution")
        if not isinstance(sol, str):
            ans = record.get("answer")
            if isinstance(ans, str) and "####" in ans:
                sol = ans
                meta["answer"] = ans.rsplit("####", 1)[1].strip().replace(",", "")
        if isinstance(sol, str) and sol.strip():
            sol = _CALC.sub("", sol).strip()
            return {
                "prompt": [{"role": "user", "content": gsm_user_message(record["question"])}],
                "completion": sol,
                **meta,
            }
        raise fail("'question' needs a 'solution' (or an 'answer' containing '#### n') to train on")
    raise fail(
        "expected 'prompt'+'completion', 'messages', or GSM fields 'question'+'solution' "
        "(or 'question'+'answer' with '####')"
    )


# ----------------------------------------------------------------------------------------------- tokenization


def _render_prompt(tokenizer: Any, prompt: str | list[dict[str, str]], chat_template: bool | None) -> tuple[str, bool]:
    """Prompt text and whether special tokens should be added when tokenizing it."""
    use_template = bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else chat_template
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("conversational prompt but the tokenizer has no chat_template")
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), False
    if use_template:
        msgs = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), False
    return prompt, True


def _ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _tokenize(
    tokenizer: Any,
    record: Mapping[str, Any],
    max_length: int,
    overflow: str,
    chat_template: bool | None,
    index: int | None = None,
) -> tuple[dict[str, list[int]] | None, str]:
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    rec = to_prompt_completion(record, index=index)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token; set one (the completion must end with it)")
    prompt_text, add_special = _render_prompt(tokenizer, rec["prompt"], chat_template)
    prompt_ids = _ids(tokenizer, prompt_text, add_special)
    completion = rec["completion"]
    if tokenizer.eos_token and completion.endswith(tokenizer.eos_token):
        completion = completion[: -len(tokenizer.eos_token)]
    completion_ids = _ids(tokenizer, completion, False) + [eos_id]
    status = "kept"
    if len(prompt_ids) + len(completion_ids) > max_length:
        room = max_length - len(prompt_ids)
        if overflow == "drop" or room < 1:
            return None, "dropped"
        completion_ids = completion_ids[:room]
        status = "truncated"
    input_ids = prompt_ids + completion_ids
    return {
        "input_ids": input_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
        "attention_mask": [1] * len(input_ids),
    }, status


def tokenize_record(
    tokenizer: Any,
    record: Mapping[str, Any],
    max_length: int,
    overflow: Literal["truncate", "drop"] = "truncate",
    chat_template: bool | None = None,
) -> dict[str, list[int]] | None:
    """Tokenize one record (any format :func:`to_prompt_completion` accepts) into ``input_ids``, ``labels``
    (``-100`` on prompt tokens) and ``attention_mask``, ending with ``tokenizer.eos_token``.

    Longer than ``max_length``: ``overflow="truncate"`` cuts the completion (the eos is lost with it; the prompt is
    never cut), ``"drop"`` returns None. A prompt that leaves no room for a completion token is always dropped.
    ``chat_template``: None = apply the tokenizer's chat template when it has one (string prompts become one user
    message); False = string prompts are raw text.
    """
    item, _ = _tokenize(tokenizer, record, max_length, overflow, chat_template)
    return item


def tokenize_dataset(
    tokenizer: Any,
    records: Iterable[Mapping[str, Any]],
    max_length: int,
    overflow: Literal["truncate", "drop"] = "truncate",
    chat_template: bool | None = None,
) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """Tokenize records with :func:`tokenize_record`. Returns the kept items and counts
    ``{"kept", "truncated", "dropped"}``; ``kept`` includes the truncated ones (``kept + dropped`` = records)."""
    items: list[dict[str, list[int]]] = []
    counts = {"kept": 0, "truncated": 0, "dropped": 0}
    for i, r in enumerate(records):
        item, status = _tokenize(tokenizer, r, max_length, overflow, chat_template, index=i)
        if item is None:
            counts["dropped"] += 1
            continue
        counts["kept"] += 1
        if status == "truncated":
            counts["truncated"] += 1
        items.append(item)
    return items, counts


# -------------------------------------------------------------------------------------------------- collation


@dataclass
class DataCollatorForCompletion:
    """Pad ``input_ids`` / ``labels`` / ``attention_mask`` to the longest sequence in the batch (optionally to a
    multiple of ``pad_to_multiple_of``): ``input_ids`` with ``pad_token_id``, ``labels`` with ``-100``, mask with 0.
    Other keys in the features are ignored. Returns ``torch.long`` tensors.

    (transformers' ``DataCollatorForSeq2Seq`` does the same but needs the tokenizer's ``pad``; this one needs only
    the pad id.)
    """

    pad_token_id: int
    label_pad_token_id: int = IGNORE_INDEX
    pad_to_multiple_of: int | None = None
    padding_side: Literal["right", "left"] = "right"

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> DataCollatorForCompletion:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        return cls(pad_token_id=pad, **kwargs)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        if not features:
            raise ValueError("empty batch")
        n = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            n = (n + m - 1) // m * m
        out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
        for f in features:
            ids = list(f["input_ids"])
            labels = list(f["labels"]) if "labels" in f else list(ids)
            mask = list(f["attention_mask"]) if "attention_mask" in f else [1] * len(ids)
            if not len(ids) == len(labels) == len(mask):
                raise ValueError("input_ids, labels and attention_mask differ in length")
            pad = n - len(ids)
            parts = {
                "input_ids": (ids, [self.pad_token_id] * pad),
                "labels": (labels, [self.label_pad_token_id] * pad),
                "attention_mask": (mask, [0] * pad),
            }
            for k, (seq, padding) in parts.items():
                out[k].append(seq + padding if self.padding_side == "right" else padding + seq)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
