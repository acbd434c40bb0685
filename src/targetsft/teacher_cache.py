"""Teacher top-k cache: run a teacher once over a tokenized dataset, keep its top-k next-token log-probs.

The losses take a teacher as ``teacher_topk=(ids [n, k], logprobs [n, k])`` with one row per supervised label token, in
the order of the non-ignored labels (compact form), and complete the tail ``1 − Σ exp(logprobs)`` themselves (see
:mod:`targetsft.residual`). Storing the teacher's full-vocabulary logits is far too big, so
:func:`build_teacher_cache` runs the teacher once and writes exactly those rows, and :class:`TeacherCache` reads them
back per example.

Label convention (Hugging Face, unshifted): ``labels`` has the length of ``input_ids``, ``-100`` on the prompt and on
padding; the logits at position ``t − 1`` predict ``labels[t]``. The supervised tokens of an example are therefore the
positions ``t ≥ 1`` with ``labels[t] != -100`` (a label at ``t = 0`` predicts nothing and is dropped, as the
transformers loss does), and the cached row for such a token is ``log_softmax(teacher_logits[t − 1] / T)``.

An example may carry ``teacher_input_ids`` + ``teacher_labels``: the teacher then sees its own (e.g. privileged)
prompt. Its supervised label tokens must be the student's, in the same order; the rows are taken at the teacher's
own supervised positions. Other keys (``attention_mask`` included) are ignored: examples must be unpadded or padded
on the right with ``-100`` labels.

On-disk format (``format_version`` 1), one folder::

    manifest.json              identity (teacher, tokenizer, data, k, T), shard list with checksums, build timing
    shard-00000.safetensors    examples [0, shard_examples)
    shard-00001.safetensors    examples [shard_examples, 2·shard_examples) ...

Each shard holds a contiguous range of examples and three tensors:

* ``ids`` int32 ``[n, k]``: top-k token ids of each supervised token, by decreasing log-prob, distinct per row;
* ``logprobs`` float16 ``[n, k]``: their log-probs at temperature ``T``, rounded toward −∞ so that the stored top-k
  mass never exceeds the true one (the losses require mass ≤ 1);
* ``offsets`` int64 ``[n_examples_in_shard + 1]``: rows ``offsets[j]:offsets[j+1]`` belong to the shard's j-th example.

Storage is ``k·(4 + 2)`` bytes per supervised token (k = 64: 64·4 + 64·2 = 384 bytes) plus 8 bytes per example.

Every file is written atomically (temp file in the same folder, fsync, ``os.replace``) and the manifest is rewritten
after each finished shard, so a killed build resumes from the first unfinished shard when rerun with the same
arguments. One builder per folder at a time (an advisory lock enforces it on POSIX).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import inspect
import json
import logging
import math
import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from targetsft.files import atomic_write_bytes, sha256_file
from targetsft.precision import Precision, autocast, resolve_precision

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "CacheCorruptError",
    "CacheIncompleteError",
    "CacheMismatchError",
    "TeacherCache",
    "TeacherCacheError",
    "build_teacher_cache",
    "dataset_fingerprint",
    "model_fingerprint",
    "shard_name",
    "tokenizer_fingerprint",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "targetsft.teacher_topk"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
IGNORE_INDEX = -100
_TMP_PREFIX = ".tmp-"
_LOCK_NAME = ".lock"
_SHARD_GLOB = "shard-*.safetensors"
_EXAMPLE_KEYS = ("input_ids", "labels", "teacher_input_ids", "teacher_labels")
_SOFTMAX_ELEMS = 1 << 24  # float32 elements per log_softmax chunk (64 MiB)
# The build must match the manifest on all of these to resume; any difference is a different cache.
_IDENTITY_KEYS = (
    "format",
    "format_version",
    "teacher_name",
    "teacher_config_hash",
    "teacher_dtype",
    "tokenizer_fingerprint",
    "vocab_size",
    "k",
    "temperature",
    "dataset_fingerprint",
    "num_examples",
    "total_tokens",
    "ignore_index",
)
# Keys of ``config.to_dict()`` that do not change what the teacher computes.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "transformers_version",
        "_commit_hash",
        "dtype",
        "torch_dtype",
        "use_cache",
        "attn_implementation",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_attn_implementation_internal",
        "output_attentions",
        "output_hidden_states",
        "_output_attentions",
        "return_dict",
    }
)


class TeacherCacheError(ValueError):
    """Base class of the errors about a teacher cache folder."""


class CacheMismatchError(TeacherCacheError):
    """The cache was built for another teacher, tokenizer, dataset, ``k`` or temperature."""


class CacheIncompleteError(TeacherCacheError):
    """The build has not finished (resume it by rerunning :func:`build_teacher_cache` with the same arguments)."""


class CacheCorruptError(TeacherCacheError):
    """A shard or the manifest is missing, unreadable or fails its checksum."""


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``shard-00000.safetensors``, ..."""
    return f"shard-{index:05d}.safetensors"


# ---------------------------------------------------------------------------------------------------------------------
# fingerprints


def _sha256_json(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _special_tokens(tokenizer: Any) -> dict[str, Any]:
    """``special_tokens_map`` with every token as a string and lists sorted (class-agnostic)."""
    out: dict[str, Any] = {}
    for name, value in dict(getattr(tokenizer, "special_tokens_map", None) or {}).items():
        if isinstance(value, (list, tuple)):
            out[str(name)] = sorted(str(v) for v in value)
        elif value is not None:
            out[str(name)] = str(value)
    return out


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's vocabulary (token → id, added tokens included) and its special tokens.

    Only the mapping matters, not the tokenizer's class or its merges: two tokenizers with the same vocabulary and
    special tokens (slow and fast, saved and reloaded, ...) have the same fingerprint.
    """
    if not hasattr(tokenizer, "get_vocab"):
        raise TypeError(f"tokenizer must have get_vocab() (a transformers tokenizer), got {type(tokenizer).__name__}")
    vocab = sorted(((str(tok), int(i)) for tok, i in tokenizer.get_vocab().items()), key=lambda p: (p[1], p[0]))
    return _sha256_json({"vocab": vocab, "special_tokens": _special_tokens(tokenizer)})


def _as_int_array(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype="<i8").reshape(-1)


def _hash_example(h: Any, example: Mapping[str, Any]) -> None:
    for key in _EXAMPLE_KEYS:
        value = example.get(key)
        if value is None:
            h.update(b"-" + key.encode() + b";")
            continue
        arr = _as_int_array(value)
        h.update(b"+" + key.encode() + arr.size.to_bytes(8, "little") + arr.tobytes() + b";")


def dataset_fingerprint(examples: Iterable[Mapping[str, Any]]) -> str:
    """sha256 over ``input_ids``, ``labels``, ``teacher_input_ids`` and ``teacher_labels`` of all examples in order."""
    h = hashlib.sha256(f"{FORMAT_NAME}/dataset/v1;".encode())
    n = 0
    for example in examples:
        _hash_example(h, example)
        n += 1
    h.update(b"n=" + n.to_bytes(8, "little"))
    return h.hexdigest()


def _strip_volatile(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _strip_volatile(v) for k, v in obj.items() if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(obj, (list, tuple)):
        return [_strip_volatile(v) for v in obj]
    return obj


def model_fingerprint(model: Any) -> str:
    """sha256 of the model's config (``config.to_dict()``, keys sorted, without name/path/version/dtype/runtime keys).

    It identifies the architecture, not the weights: two checkpoints of one architecture share it, which is why the
    manifest also records the teacher's name.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(f"the teacher must have a transformers config (model.config.to_dict()), got {type(model)}")
    return _sha256_json(_strip_volatile(config.to_dict()))


# ---------------------------------------------------------------------------------------------------------------------
# examples


def _supervised_positions(labels: np.ndarray) -> np.ndarray:
    """Positions ``t ≥ 1`` whose label is not ignored (those predicted by the logits at ``t − 1``)."""
    pos = np.nonzero(labels != IGNORE_INDEX)[0]
    return pos[pos >= 1]


def _check_ids(index: int, name: str, arr: np.ndarray, vocab_size: int, *, labels: bool) -> None:
    bad = (arr < 0) | (arr >= vocab_size)
    if labels:
        bad &= arr != IGNORE_INDEX
    if bool(bad.any()):
        j = int(np.nonzero(bad)[0][0])
        allowed = f"[0, {vocab_size})" + (f" or {IGNORE_INDEX}" if labels else "")
        raise ValueError(
            f"example {index}: {name}[{j}] = {int(arr[j])} is outside {allowed} (the teacher's vocabulary)"
        )


def _pair(index: int, example: Mapping[str, Any], ids_key: str, labels_key: str, vocab_size: int):
    ids, labels = _as_int_array(example[ids_key]), _as_int_array(example[labels_key])
    if ids.shape != labels.shape:
        raise ValueError(f"example {index}: {ids_key} has {ids.size} tokens but {labels_key} has {labels.size}")
    _check_ids(index, ids_key, ids, vocab_size, labels=False)
    _check_ids(index, labels_key, labels, vocab_size, labels=True)
    return ids, labels


@dataclass(frozen=True)
class _TeacherInput:
    """What the teacher sees for one example and where its rows are: logits at ``positions`` predict the labels."""

    input_ids: np.ndarray
    positions: np.ndarray  # t − 1 for each supervised position t


def _teacher_input(index: int, example: Mapping[str, Any], vocab_size: int) -> _TeacherInput:
    """Validate one example; return the teacher's input and row positions (checking privileged-prompt alignment)."""
    if not isinstance(example, Mapping) or "input_ids" not in example or "labels" not in example:
        raise ValueError(f"example {index} must be a mapping with 'input_ids' and 'labels'")
    ids, labels = _pair(index, example, "input_ids", "labels", vocab_size)
    has_t = [example.get(k) is not None for k in ("teacher_input_ids", "teacher_labels")]
    if not any(has_t):
        pos = _supervised_positions(labels)
        return _TeacherInput(ids, pos - 1)
    if not all(has_t):
        raise ValueError(f"example {index}: give both teacher_input_ids and teacher_labels, or neither")
    t_ids, t_labels = _pair(index, example, "teacher_input_ids", "teacher_labels", vocab_size)
    student = labels[_supervised_positions(labels)]
    t_pos = _supervised_positions(t_labels)
    teacher = t_labels[t_pos]
    if student.shape != teacher.shape or not np.array_equal(student, teacher):
        n = min(student.size, teacher.size)
        diff = np.nonzero(student[:n] != teacher[:n])[0]
        where = (
            f"first difference at supervised token {int(diff[0])}: student {int(student[diff[0]])}, "
            f"teacher {int(teacher[diff[0]])}"
            if diff.size
            else "one is a prefix of the other"
        )
        raise ValueError(
            f"example {index}: the teacher's supervised label tokens differ from the student's "
            f"(student has {student.size}, teacher has {teacher.size}; {where}); the teacher prompt may differ but "
            "the supervised continuation must be identical"
        )
    return _TeacherInput(t_ids, t_pos - 1)


def _scan_examples(examples: Sequence[Mapping[str, Any]], vocab_size: int) -> tuple[list[int], str]:
    """Validate every example; return the number of supervised tokens of each and the dataset fingerprint."""
    h = hashlib.sha256(f"{FORMAT_NAME}/dataset/v1;".encode())
    counts: list[int] = []
    for i in range(len(examples)):
        example = examples[i]
        counts.append(int(_teacher_input(i, example, vocab_size).positions.size))
        _hash_example(h, example)
    h.update(b"n=" + len(counts).to_bytes(8, "little"))
    return counts, h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# files


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(
        folder / MANIFEST_NAME,
        (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode(),
        tmp_prefix=_TMP_PREFIX,
    )


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheCorruptError(f"{path} is not a readable JSON manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CacheCorruptError(f"{path} is not a targetsft teacher cache manifest (format != {FORMAT_NAME!r})")
    return manifest


def _shard_problem(folder: Path, shard: Mapping[str, Any], verify: bool) -> str | None:
    """Why a finished shard cannot be used (missing, wrong size, checksum), or ``None`` when it is fine."""
    path = folder / shard["file"]
    if not path.is_file():
        return f"shard {shard['file']} is missing"
    size = path.stat().st_size
    if size != shard["bytes"]:
        return f"shard {shard['file']} has {size} bytes, the manifest says {shard['bytes']}"
    if verify and sha256_file(path) != shard["sha256"]:
        return f"shard {shard['file']} fails its sha256 checksum (corrupted or modified)"
    return None


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Exclusive advisory lock on the cache folder (POSIX ``flock``; a no-op where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(folder / _LOCK_NAME, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise RuntimeError(f"another build_teacher_cache is writing to {folder}") from e
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _remove(paths: Iterable[Path]) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# ---------------------------------------------------------------------------------------------------------------------
# teacher forward


def _vocab_size(model: Any) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(config.vocab_size)


def _model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _model_dtype(model: Any) -> str:
    param = next(iter(model.parameters()), None)
    return str(param.dtype).removeprefix("torch.") if param is not None else "unknown"


def _accepts_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _round_down_fp16(x: Tensor) -> Tensor:
    """float32 → float16 rounded toward −∞, so that ``exp`` of the stored values never exceeds the true ones."""
    h = x.to(torch.float16)
    up = h.to(torch.float32) > x
    if bool(up.any()):
        h = torch.where(up, torch.nextafter(h, torch.full_like(h, float("-inf"))), h)
    return h


def _topk_rows(logits: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor]:
    """Top-k of ``log_softmax(logits / T)`` (float32) per row: ids int32 and log-probs float32, on the CPU."""
    step = max(1, _SOFTMAX_ELEMS // max(1, logits.shape[-1]))
    ids, lps = [], []
    for s in range(0, logits.shape[0], step):
        lp = torch.log_softmax(logits[s : s + step].float() / temperature, dim=-1)
        v, i = lp.topk(k, dim=-1, largest=True, sorted=True)
        ids.append(i.to(torch.int32).cpu())
        lps.append(v.clamp(max=0.0).cpu())
    if not ids:
        return torch.zeros(0, k, dtype=torch.int32), torch.zeros(0, k)
    return torch.cat(ids), torch.cat(lps)


def _teacher_logits_rows(
    model: Any, batch: list[_TeacherInput], *, pad_id: int, device: torch.device, keep_ok: bool, vocab: int
) -> Tensor:
    """One right-padded forward; the logits rows ``[Σ n_i, V]`` at every example's positions, in batch order."""
    length = max(int(x.input_ids.size) for x in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for b, x in enumerate(batch):
        ids[b, : x.input_ids.size] = torch.from_numpy(x.input_ids)
        mask[b, : x.input_ids.size] = 1
    keep = np.unique(np.concatenate([x.positions for x in batch]))
    kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
    if keep_ok and keep.size < length:
        kwargs["logits_to_keep"] = torch.from_numpy(keep).to(device)
    logits = model(**kwargs).logits
    if logits.shape[-1] != vocab:
        raise RuntimeError(f"the teacher returned {logits.shape[-1]} logits per token, expected {vocab}")
    if logits.shape[1] == length:
        cols = [x.positions for x in batch]
    elif logits.shape[1] == keep.size:
        cols = [np.searchsorted(keep, x.positions) for x in batch]
    else:
        raise RuntimeError(f"the teacher returned logits of shape {tuple(logits.shape)} for inputs of length {length}")
    b_idx = torch.from_numpy(np.concatenate([np.full(c.size, b) for b, c in enumerate(cols)])).to(logits.device)
    c_idx = torch.from_numpy(np.concatenate(cols)).to(logits.device)
    return logits[b_idx, c_idx]


@dataclass
class _RunSpec:
    model: Any
    k: int
    temperature: float
    batch_size: int
    pad_id: int
    device: torch.device
    keep_ok: bool
    vocab: int


def _compute_shard(
    spec: _RunSpec, examples: Sequence[Mapping[str, Any]], start: int, end: int, bar: Any
) -> dict[str, Tensor]:
    """The shard tensors (``ids``, ``logprobs``, ``offsets``) for examples ``[start, end)``.

    Examples are batched by decreasing teacher length (less padding); rows are put back in example order.
    """
    inputs = {i: _teacher_input(i, examples[i], spec.vocab) for i in range(start, end)}
    order = sorted((i for i in inputs if inputs[i].positions.size), key=lambda i: -inputs[i].input_ids.size)
    rows: dict[int, tuple[Tensor, Tensor]] = {}
    for s in range(0, len(order), spec.batch_size):
        idx = order[s : s + spec.batch_size]
        batch = [inputs[i] for i in idx]
        logits = _teacher_logits_rows(
            spec.model, batch, pad_id=spec.pad_id, device=spec.device, keep_ok=spec.keep_ok, vocab=spec.vocab
        )
        ids, lps = _topk_rows(logits, spec.k, spec.temperature)
        if bool(torch.isnan(lps).any()):
            raise RuntimeError(f"the teacher produced NaN log-probs in examples {sorted(idx)}")
        split = [x.positions.size for x in batch]
        for i, a, b in zip(idx, ids.split(split), lps.split(split), strict=True):
            rows[i] = (a, b)
        bar.update(sum(split))
    empty = (torch.zeros(0, spec.k, dtype=torch.int32), torch.zeros(0, spec.k))
    parts = [rows.get(i, empty) for i in range(start, end)]
    counts = torch.tensor([0] + [p[0].shape[0] for p in parts], dtype=torch.int64)
    return {
        "ids": torch.cat([p[0] for p in parts]).contiguous(),
        "logprobs": _round_down_fp16(torch.cat([p[1] for p in parts])).contiguous(),
        "offsets": counts.cumsum(0),
    }


# ---------------------------------------------------------------------------------------------------------------------
# build


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_build_args(k: int, temperature: float, batch_size: int, shard_examples: int, vocab: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > vocab:
        raise ValueError(f"k={k} is larger than the teacher's vocabulary ({vocab} tokens)")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    for name, v in (("batch_size", batch_size), ("shard_examples", shard_examples)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _identity_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [
        f"{key}: cache has {old.get(key)!r}, this build has {new[key]!r}"
        for key in _IDENTITY_KEYS
        if old.get(key) != new[key]
    ]


def _valid_prefix(folder: Path, manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The finished shards that are contiguous from example 0 and pass their checksums (a bad one ends the prefix)."""
    good: list[dict[str, Any]] = []
    expected_start = 0
    for shard in manifest.get("shards", []):
        problem = _shard_problem(folder, shard, verify=True)
        if problem is None and shard.get("start") != expected_start:
            problem = f"shard {shard.get('file')} starts at example {shard.get('start')}, expected {expected_start}"
        if problem is not None:
            warnings.warn(f"teacher cache {folder}: {problem}; rebuilding from example {expected_start}", stacklevel=3)
            break
        good.append(dict(shard))
        expected_start = shard["end"]
    return good


def _prepare_folder(folder: Path, identity: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """The manifest to continue from: the existing one (same identity, shards verified) or a fresh one."""
    old = _read_manifest(folder) if not overwrite else None
    if overwrite:
        _remove([folder / MANIFEST_NAME, *folder.glob(_SHARD_GLOB)])
    elif old is None and any(folder.glob(_SHARD_GLOB)):
        raise CacheMismatchError(
            f"{folder} holds shard files but no {MANIFEST_NAME}; pass overwrite=True to replace them"
        )
    if old is not None:
        diff = _identity_diff(old, identity)
        if diff:
            raise CacheMismatchError(
                f"{folder} holds a teacher cache for something else ({'; '.join(diff)}); "
                "use another folder or pass overwrite=True to replace it"
            )
        shards = _valid_prefix(folder, old)
        keep = {s["file"] for s in shards}
        _remove(p for p in folder.glob(_SHARD_GLOB) if p.name not in keep)  # orphans of an interrupted shard
        manifest = dict(old)
        manifest["shards"] = shards
        if shards:
            logger.info("teacher cache %s: resuming after example %d", folder, shards[-1]["end"])
        return manifest
    manifest = dict(identity)
    manifest.update(
        complete=False,
        storage={
            "ids": "int32",
            "logprobs": "float16 (rounded toward -inf)",
            "offsets": "int64",
            "bytes_per_token": identity["k"] * 6,
        },
        shards=[],
        build={"seconds": 0.0, "tokens": 0, "tokens_per_second": None, "sessions": 0, "started_at": _now()},
    )
    return manifest


def build_teacher_cache(
    teacher_model: Any,
    examples: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    tokenizer: Any,
    k: int = 64,
    temperature: float = 1.0,
    batch_size: int = 8,
    shard_examples: int = 256,
    teacher_name: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    overwrite: bool = False,
    precision: str = "auto",
) -> Path:
    """Run ``teacher_model`` over ``examples`` and store its top-k log-probs per supervised token in ``out_dir``.

    Args:
        teacher_model: a causal LM with a transformers config whose forward takes ``input_ids``/``attention_mask``
            and returns ``.logits``; run in eval mode under ``torch.no_grad`` (its mode is restored afterwards).
        examples: indexable sequence (list, ``datasets.Dataset``) of dicts with ``input_ids`` and ``labels``
            (-100 = no loss, unshifted), optionally ``teacher_input_ids`` + ``teacher_labels`` (see the module doc).
        out_dir: cache folder (created). If it holds a cache with the same identity (teacher name and config,
            tokenizer, dataset, ``k``, temperature, teacher dtype) the build resumes, or does nothing if complete.
        tokenizer: the tokenizer of the examples (only its fingerprint and pad id are used).
        k: tokens kept per position (≤ vocabulary size).
        temperature: the cached rows are ``log_softmax(logits / temperature)``; the loss uses them as they are.
        batch_size: examples per teacher forward (right-padded, attention mask).
        shard_examples: examples per shard file (the unit of resume and of checksum verification).
        teacher_name: recorded name of the teacher (default ``config._name_or_path``); part of the identity.
        device: move the teacher there first (default: leave it where it is and feed inputs to its device).
        progress: show a tqdm bar in tokens (with tokens/s).
        overwrite: replace a cache built for something else instead of raising :class:`CacheMismatchError`.
        precision: autocast of the teacher's forward (:func:`targetsft.precision.resolve_precision` on its device;
            the weights keep their dtype); recorded in the manifest's ``build``. A partial cache resumes only at the
            precision its first shards were built at (a build without the record was float32).

    Returns:
        ``Path(out_dir)``.
    """
    if device is not None:
        teacher_model.to(device)
    vocab = _vocab_size(teacher_model)
    _check_build_args(k, temperature, batch_size, shard_examples, vocab)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    counts, dfp = _scan_examples(examples, vocab)
    name = teacher_name if teacher_name is not None else str(getattr(teacher_model.config, "_name_or_path", "") or "")
    identity = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "teacher_name": name,
        "teacher_config_hash": model_fingerprint(teacher_model),
        "teacher_dtype": _model_dtype(teacher_model),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": vocab,
        "k": k,
        "temperature": float(temperature),
        "dataset_fingerprint": dfp,
        "num_examples": len(counts),
        "total_tokens": int(sum(counts)),
        "ignore_index": IGNORE_INDEX,
    }
    with _build_lock(folder):
        _remove(folder.glob(_TMP_PREFIX + "*"))  # temp files of a killed build
        manifest = _prepare_folder(folder, identity, overwrite)
        resolved = resolve_precision(precision, _model_device(teacher_model))
        _run_shards(
            teacher_model, examples, folder, manifest, counts, tokenizer, batch_size, shard_examples, progress, resolved
        )
    return folder


def _run_shards(
    model: Any,
    examples: Sequence[Mapping[str, Any]],
    folder: Path,
    manifest: dict[str, Any],
    counts: list[int],
    tokenizer: Any,
    batch_size: int,
    shard_examples: int,
    progress: bool,
    precision: Precision,
) -> None:
    """Build the shards after the last finished one, rewriting the manifest after each; mark it complete."""
    from safetensors.torch import save as st_save
    from tqdm.auto import tqdm

    n = len(counts)
    start = manifest["shards"][-1]["end"] if manifest["shards"] else 0
    if start >= n and manifest.get("complete"):
        return  # nothing to do: same arguments, complete and verified
    pad_id = getattr(tokenizer, "pad_token_id", None)
    spec = _RunSpec(
        model=model,
        k=manifest["k"],
        temperature=manifest["temperature"],
        batch_size=batch_size,
        pad_id=pad_id if isinstance(pad_id, int) and 0 <= pad_id < manifest["vocab_size"] else 0,
        device=_model_device(model),
        keep_ok=_accepts_logits_to_keep(model),
        vocab=manifest["vocab_size"],
    )
    build = manifest["build"]
    built_at = build.get("precision", "fp32")
    if start > 0 and built_at != precision.name:
        raise CacheMismatchError(
            f"{folder}: its first {start} examples were built at precision {built_at}, this build runs at "
            f"{precision.name}; resume at {built_at} (precision={built_at!r}) or pass overwrite=True to rebuild"
        )
    build.update(sessions=build.get("sessions", 0) + 1, device=str(spec.device), batch_size=batch_size)
    build["precision"] = precision.name
    manifest["complete"] = False
    _write_manifest(folder, manifest)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    bar = tqdm(
        total=manifest["total_tokens"],
        initial=sum(counts[:start]),
        unit="tok",
        unit_scale=True,
        desc="teacher top-k",
        disable=not progress,
    )
    try:
        with torch.no_grad(), autocast(precision):
            while start < n:
                end = min(start + shard_examples, n)
                t0 = time.perf_counter()
                tensors = _compute_shard(spec, examples, start, end, bar)
                meta = {"format": FORMAT_NAME, "start": str(start), "end": str(end), "k": str(spec.k)}
                data = st_save(tensors, metadata=meta)
                path = folder / shard_name(len(manifest["shards"]))
                atomic_write_bytes(path, data, tmp_prefix=_TMP_PREFIX)
                tokens = int(tensors["ids"].shape[0])
                manifest["shards"].append(
                    {
                        "file": path.name,
                        "start": start,
                        "end": end,
                        "tokens": tokens,
                        "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(),
                    }
                )
                build["seconds"] = round(build.get("seconds", 0.0) + time.perf_counter() - t0, 4)
                build["tokens"] = build.get("tokens", 0) + tokens
                build["tokens_per_second"] = round(build["tokens"] / build["seconds"], 1) if build["seconds"] else None
                build["updated_at"] = _now()
                manifest["complete"] = end >= n
                _write_manifest(folder, manifest)
                start = end
        if not manifest["complete"]:  # zero examples: nothing was written in the loop
            manifest["complete"] = True
            _write_manifest(folder, manifest)
    finally:
        bar.close()
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------------------------
# reading


class _OpenShard:
    """A lazily opened shard: its safetensors handle (memory-mapped) and its row offsets."""

    def __init__(self, path: Path, shard: Mapping[str, Any], k: int) -> None:
        from safetensors import safe_open

        try:
            self.handle = safe_open(str(path), framework="pt")
            offsets = self.handle.get_tensor("offsets")
            shapes = {key: list(self.handle.get_slice(key).get_shape()) for key in ("ids", "logprobs")}
        except Exception as e:  # any read failure means the file is unusable
            raise CacheCorruptError(f"cannot read shard {path}: {e}") from e
        n_ex, tokens = shard["end"] - shard["start"], shard["tokens"]
        ok = (
            offsets.shape == (n_ex + 1,)
            and int(offsets[0]) == 0
            and int(offsets[-1]) == tokens
            and bool((offsets[1:] >= offsets[:-1]).all())
            and shapes["ids"] == [tokens, k] == shapes["logprobs"]
        )
        if not ok:
            raise CacheCorruptError(f"shard {path} does not match the manifest (offsets or tensor shapes)")
        self.offsets = offsets.tolist()

    def rows(self, j: int) -> tuple[Tensor, Tensor]:
        a, b = self.offsets[j], self.offsets[j + 1]
        return self.handle.get_slice("ids")[a:b], self.handle.get_slice("logprobs")[a:b]


def _expected_fingerprint(what: str, given: Any, computed: str | None) -> str | None:
    if given is not None and computed is not None and given != computed:
        raise ValueError(f"the {what} given and the one computed from the examples differ")
    return computed if computed is not None else given


class TeacherCache:
    """Read access to a finished teacher top-k cache (use :meth:`open`)."""

    def __init__(self, path: Path, manifest: dict[str, Any], *, max_open_shards: int = 8) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._starts = [s["start"] for s in manifest["shards"]]
        self._max_open = max(1, int(max_open_shards))
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        tokenizer: Any = None,
        examples: Sequence[Mapping[str, Any]] | None = None,
        dataset_fingerprint: str | None = None,
        verify: bool = True,
        max_open_shards: int = 8,
    ) -> TeacherCache:
        """Open the cache at ``path`` after checking it is complete and intact.

        Args:
            tokenizer: the student's tokenizer (or its :func:`tokenizer_fingerprint`); must match the cache's.
            examples / dataset_fingerprint: the data the trainer will use (or its fingerprint); must match.
            verify: check every shard's sha256 (reads the whole cache once); otherwise only sizes are checked.
            max_open_shards: size of the LRU of open (memory-mapped) shards.

        Raises:
            FileNotFoundError: no manifest at ``path``.
            CacheIncompleteError: the build did not finish.
            CacheCorruptError: a shard is missing, has the wrong size or fails its checksum.
            CacheMismatchError: the cache was built for another tokenizer or dataset.
        """
        folder = Path(path)
        manifest = _read_manifest(folder)
        if manifest is None:
            raise FileNotFoundError(f"no teacher cache at {folder} ({MANIFEST_NAME} is missing)")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CacheMismatchError(
                f"{folder}: cache format version {manifest.get('format_version')}, this library reads {FORMAT_VERSION}"
            )
        _check_complete(folder, manifest)
        for shard in manifest["shards"]:
            problem = _shard_problem(folder, shard, verify)
            if problem is not None:
                raise CacheCorruptError(f"teacher cache {folder}: {problem}; rebuild it (build_teacher_cache resumes)")
        if tokenizer is not None:
            fp = tokenizer if isinstance(tokenizer, str) else tokenizer_fingerprint(tokenizer)
            if fp != manifest["tokenizer_fingerprint"]:
                raise CacheMismatchError(
                    f"teacher cache {folder} was built for another tokenizer (tokenizer fingerprint "
                    f"{manifest['tokenizer_fingerprint'][:12]}…, this tokenizer {fp[:12]}…)"
                )
        computed = _dataset_fp(examples) if examples is not None else None
        expected = _expected_fingerprint("dataset_fingerprint", dataset_fingerprint, computed)
        if expected is not None and expected != manifest["dataset_fingerprint"]:
            raise CacheMismatchError(
                f"teacher cache {folder} was built for other data (dataset fingerprint "
                f"{manifest['dataset_fingerprint'][:12]}… over {manifest['num_examples']} examples, "
                f"these examples {expected[:12]}…"
                + (f" over {len(examples)} examples)" if examples is not None else ")")
            )
        return cls(folder, manifest, max_open_shards=max_open_shards)

    def __len__(self) -> int:
        return int(self.manifest["num_examples"])

    def __repr__(self) -> str:
        return (
            f"TeacherCache({str(self.path)!r}, examples={len(self)}, tokens={self.tokens}, k={self.k}, "
            f"temperature={self.temperature}, teacher={self.teacher_name!r})"
        )

    @property
    def k(self) -> int:
        """Token ids kept per supervised token."""
        return int(self.manifest["k"])

    @property
    def temperature(self) -> float:
        """The temperature the log-probs were computed at (the loss must use them at temperature 1.0)."""
        return float(self.manifest["temperature"])

    @property
    def tokens(self) -> int:
        """Total number of supervised tokens (rows)."""
        return int(self.manifest["total_tokens"])

    @property
    def vocab_size(self) -> int:
        """The teacher's vocabulary size (ids are in ``[0, vocab_size)``)."""
        return int(self.manifest["vocab_size"])

    @property
    def teacher_name(self) -> str:
        return str(self.manifest.get("teacher_name", ""))

    def _locate(self, i: int) -> tuple[int, int]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"example index {i} out of range for a cache of {len(self)} examples")
        s = bisect.bisect_right(self._starts, i) - 1
        return s, i - self._starts[s]

    def _shard(self, s: int) -> _OpenShard:
        shard = self._open.get(s)
        if shard is not None:
            self._open.move_to_end(s)
            return shard
        info = self.manifest["shards"][s]
        shard = _OpenShard(self.path / info["file"], info, self.k)
        self._open[s] = shard
        while len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return shard

    def num_tokens(self, i: int) -> int:
        """Number of rows (supervised tokens) of example ``i``."""
        s, j = self._locate(i)
        offsets = self._shard(s).offsets
        return offsets[j + 1] - offsets[j]

    def example(self, i: int) -> tuple[Tensor, Tensor]:
        """Rows of example ``i``: ids int64 ``[n_i, k]`` and log-probs float32 ``[n_i, k]``, in label order."""
        s, j = self._locate(i)
        ids, lps = self._shard(s).rows(j)
        return ids.long(), lps.float()

    def rows(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Rows of several examples concatenated in the given order: the compact ``teacher_topk`` of a batch.

        For a batch whose labels are exactly these examples' labels (any padding, ``-100`` on it), this is the
        ``(ids [n, k], logprobs [n, k])`` pair that ``target_loss(..., teacher_topk=...)`` expects.
        """
        parts = [self.example(i) for i in indices]
        if not parts:
            return torch.zeros(0, self.k, dtype=torch.long), torch.zeros(0, self.k)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def label_stats(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """How the cached teacher scores the labels of the ``examples`` it was built on, per supervised token:
        ``top1`` = P[argmax π_T = y], ``in_topk`` = P[y ∈ top-k], ``p_label`` = mean π_T(y) counting 0 where y is
        outside the top-k (a lower bound), ``topk_mass`` = mean Σ_topk π_T (all at the cache's temperature)."""
        if len(examples) != len(self):
            raise CacheMismatchError(f"the cache holds {len(self)} examples, {len(examples)} were given")
        top1 = in_topk = p_label = mass = 0.0
        for i, example in enumerate(examples):
            labels = _as_int_array(example["labels"])
            y = torch.from_numpy(labels[_supervised_positions(labels)]).long()
            ids, lps = self.example(i)
            if y.shape[0] != ids.shape[0]:
                raise CacheMismatchError(
                    f"example {i} has {y.shape[0]} supervised tokens, the cache holds {ids.shape[0]} rows for it"
                )
            hit = ids == y[:, None]
            probs = lps.double().exp()
            top1 += (ids[:, 0] == y).sum().item()  # rows are sorted by decreasing log-prob
            in_topk += hit.any(-1).sum().item()
            p_label += (probs * hit).sum().item()
            mass += probs.sum().item()
        n = max(self.tokens, 1)
        return {
            "tokens": self.tokens,
            "top1": top1 / n,
            "in_topk": in_topk / n,
            "p_label": p_label / n,
            "topk_mass": mass / n,
        }

    def close(self) -> None:
        """Drop the open shard handles."""
        self._open.clear()

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (e.g. for ``DataLoader`` workers): open shard handles are not carried, they reopen lazily."""
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state


_dataset_fp = dataset_fingerprint  # ``TeacherCache.open`` has a parameter of that name


def _check_complete(folder: Path, manifest: Mapping[str, Any]) -> None:
    n = manifest["num_examples"]
    end = 0
    for shard in manifest["shards"]:
        if shard["start"] != end:
            raise CacheCorruptError(
                f"teacher cache {folder}: the manifest's shards are not contiguous at example {end}"
            )
        end = shard["end"]
    if not manifest.get("complete") or end != n:
        raise CacheIncompleteError(
            f"teacher cache {folder} is incomplete (examples {end}..{n} of {n} are missing); rerun "
            "build_teacher_cache with the same arguments to resume it"
        )
    tokens = sum(s["tokens"] for s in manifest["shards"])
    if tokens != manifest["total_tokens"]:
        raise CacheCorruptError(
            f"teacher cache {folder}: shards hold {tokens} rows, the manifest says {manifest['total_tokens']}"
        )
