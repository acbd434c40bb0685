"""What a teacher cache is on disk: its identity (fingerprints of the teacher, the tokenizer and the data), the
examples' supervised positions, the manifest and its lock, and the errors a cache can raise (see the package
docstring for the format).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from targetsft.runtime.files import atomic_write_bytes, sha256_file, sha256_json

if TYPE_CHECKING:
    from targetsft.training.text_alignment import TokenMap

FORMAT_NAME = "targetsft.teacher_topk"


FORMAT_VERSION = 1


MANIFEST_NAME = "manifest.json"


IGNORE_INDEX = -100


_TMP_PREFIX = ".tmp-"


_LOCK_NAME = ".lock"


_SHARD_GLOB = "shard-*.safetensors"


_EXAMPLE_KEYS = ("input_ids", "labels", "teacher_input_ids", "teacher_labels")


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


# Identity keys a cache may lack (built before they were recorded) or hold as None (unknowable: the weights of a vLLM
# teacher): compared only when both sides know them.
_IDENTITY_KEYS_IF_KNOWN = ("teacher_weights_hash", "shared_vocab_size")


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
    return sha256_json({"vocab": vocab, "special_tokens": _special_tokens(tokenizer)})


def _as_int_array(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype="<i8").reshape(-1)


def _hash_example(h: Any, example: Mapping[str, Any]) -> None:
    if example.get("teacher_rows") is not None:  # a teacher read through the text: its side follows from the text
        example = {"input_ids": example["input_ids"], "labels": example["labels"]}
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
    return sha256_json(_strip_volatile(config.to_dict()))


def weights_fingerprint(model: Any) -> str | None:
    """sha256 over the model's state dict (each tensor's name, dtype, shape and bytes, in name order): which weights
    the teacher had, so that a retrained teacher of the same name and config is another cache. ``None`` where the
    weights cannot be read: no ``state_dict`` (a vLLM engine), tensors on the meta device (offloaded) or tensors
    that cannot be copied to the CPU as bytes (quantized parameter types)."""
    if not callable(getattr(model, "state_dict", None)):
        return None
    h = hashlib.sha256(f"{FORMAT_NAME}/weights/v1;".encode())
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, Tensor) or tensor.device.type == "meta":
            return None
        try:
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        except (RuntimeError, TypeError, NotImplementedError):
            return None
        h.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{tuple(tensor.shape)};".encode())
        h.update(data)
    return h.hexdigest()


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
    positions: np.ndarray  # t − 1 for each supervised position t (read through the text: the aligned rows)
    rows: np.ndarray | None = None  # read through the text: per supervised token, its teacher position or −1

    @property
    def count(self) -> int:
        """The cache rows of this example: one per supervised token."""
        return int(self.positions.size if self.rows is None else self.rows.size)


def _text_input(index: int, example: Mapping[str, Any], vocab_size: int) -> _TeacherInput:
    """An example whose teacher reads the text: its own ``teacher_input_ids`` and a ``teacher_rows`` entry per
    supervised student token (a teacher position, or −1 where no teacher boundary meets the student's)."""
    labels = _as_int_array(example["labels"])
    if _as_int_array(example["input_ids"]).shape != labels.shape:
        raise ValueError(f"example {index}: input_ids and labels differ in length")
    t_ids, rows = _as_int_array(example["teacher_input_ids"]), _as_int_array(example["teacher_rows"])
    _check_ids(index, "teacher_input_ids", t_ids, vocab_size, labels=False)
    supervised = _supervised_positions(labels).size
    if rows.size != supervised:
        raise ValueError(f"example {index}: {rows.size} teacher_rows for {supervised} supervised tokens")
    if bool(((rows < -1) | (rows >= t_ids.size)).any()):
        raise ValueError(f"example {index}: teacher_rows must lie in [-1, {t_ids.size}) (its teacher_input_ids)")
    return _TeacherInput(t_ids, rows[rows >= 0], rows)


def _teacher_input(index: int, example: Mapping[str, Any], vocab_size: int) -> _TeacherInput:
    """Validate one example; return the teacher's input and row positions (checking privileged-prompt alignment)."""
    if not isinstance(example, Mapping) or "input_ids" not in example or "labels" not in example:
        raise ValueError(f"example {index} must be a mapping with 'input_ids' and 'labels'")
    if example.get("teacher_rows") is not None:
        return _text_input(index, example, vocab_size)
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
        counts.append(_teacher_input(i, example, vocab_size).count)
        _hash_example(h, example)
    h.update(b"n=" + len(counts).to_bytes(8, "little"))
    return counts, h.hexdigest()


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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _identity_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    known = [key for key in _IDENTITY_KEYS_IF_KNOWN if old.get(key) is not None and new.get(key) is not None]
    return [
        f"{key}: cache has {old.get(key)!r}, this build has {new[key]!r}"
        for key in (*_IDENTITY_KEYS, *known)
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


def _alignment_record(token_map: TokenMap, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's ``alignment``: the token map's counts and the shares over the shards built so far; the mass is
    ``aligned_mass`` over the teacher's whole vocabulary, or ``aligned_mass_topk`` over the top-k that vLLM gives."""
    shards = manifest["shards"]
    rows, aligned = sum(s["tokens"] for s in shards), sum(s["aligned"] for s in shards)
    mass = sum(s["aligned_mass"] for s in shards)
    topk = manifest.get("build", {}).get("engine", "transformers") != "transformers"
    return {
        "align": "text",
        **token_map.to_dict(),
        "aligned_positions": aligned / rows if rows else 0.0,
        "aligned_mass_topk" if topk else "aligned_mass": mass / aligned if aligned else 0.0,
    }


def _check_resume(folder: Path, build: Mapping[str, Any], start: int, precision: str, engine: str) -> None:
    """Refuse to continue a cache whose first ``start`` examples were built at another precision or engine."""
    if start == 0:
        return
    built_at = build.get("precision", "fp32")
    if built_at != precision:
        raise CacheMismatchError(
            f"{folder}: its first {start} examples were built at precision {built_at}, this build runs at "
            f"{precision}; resume at {built_at} (precision={built_at!r}) or pass overwrite=True to rebuild"
        )
    if build.get("engine", "transformers") != engine:
        raise CacheMismatchError(
            f"{folder}: its first {start} examples were built with the {build.get('engine', 'transformers')} teacher, "
            f"this build runs the {engine} one; resume with that engine or pass overwrite=True to rebuild"
        )


def _session_started(
    manifest: Mapping[str, Any], device: str, batch_size: int, precision: str, engine: str
) -> dict[str, Any]:
    """A copy of the manifest with one more build session (its device, batch size, precision, engine), incomplete."""
    build = manifest["build"]
    build = {
        **build,
        "sessions": build.get("sessions", 0) + 1,
        "device": device,
        "batch_size": batch_size,
        "precision": precision,
        "engine": engine,
    }
    return {**manifest, "build": build, "complete": False}


def _shard_added(
    manifest: Mapping[str, Any], shard: dict[str, Any], seconds: float, n: int, token_map: TokenMap | None
) -> dict[str, Any]:
    """A copy of the manifest with ``shard`` appended, the build's time and tokens advanced, complete at example
    ``n``, and the aligned shares recomputed for a teacher read through the text."""
    build = dict(manifest["build"])
    build["seconds"] = round(build.get("seconds", 0.0) + seconds, 4)
    build["tokens"] = build.get("tokens", 0) + shard["tokens"]
    build["tokens_per_second"] = round(build["tokens"] / build["seconds"], 1) if build["seconds"] else None
    build["updated_at"] = _now()
    out = {**manifest, "shards": [*manifest["shards"], shard], "build": build, "complete": shard["end"] >= n}
    if token_map is not None:
        out["alignment"] = _alignment_record(token_map, out)
    return out
