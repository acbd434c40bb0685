"""Reading a teacher cache: checked on open (complete, intact, built for this tokenizer and data), rows looked up per
example from memory-mapped shards.
"""

from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from targetsft.losses.validation import MISSING_ID
from targetsft.training.teacher_cache.storage import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    CacheCorruptError,
    CacheIncompleteError,
    CacheMismatchError,
    _as_int_array,
    _read_manifest,
    _shard_problem,
    _supervised_positions,
    dataset_fingerprint,
    tokenizer_fingerprint,
)


def check_cache_folder(path: str | os.PathLike[str]) -> None:
    """A teacher cache folder exists and holds a manifest, else an :class:`~targetsft.runtime.inputs.InputError`
    (its contents are checked when it is opened)."""
    from targetsft.runtime.inputs import InputError

    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"teacher cache {str(path)!r}: no such folder")
    if not (folder / MANIFEST_NAME).is_file():
        raise InputError(f"teacher cache {str(path)!r}: no {MANIFEST_NAME} (build it with target-sft cache-teacher)")


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
            examples: the data the trainer will use (or ``dataset_fingerprint``, its fingerprint); must match.
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
        """The teacher's lm_head rows."""
        return int(self.manifest["vocab_size"])

    @property
    def alignment(self) -> dict[str, Any] | None:
        """For a teacher read through the text: its token map's counts and the aligned shares (None otherwise)."""
        return self.manifest.get("alignment")

    @property
    def shared_vocab_size(self) -> int:
        """The tokens the teacher shares with the student: every stored id is below it."""
        return int(self.manifest.get("shared_vocab_size", self.manifest["vocab_size"]))

    @property
    def teacher_vocabulary(self) -> dict[str, Any] | None:
        """How the teacher's vocabulary lines up with the student's
        (:meth:`~targetsft.training.vocabulary.VocabAlignment.to_dict`), when the build was given its tokenizer."""
        return self.manifest.get("teacher_vocabulary")

    @property
    def teacher_name(self) -> str:
        return str(self.manifest.get("teacher_name", ""))

    @property
    def teacher_weights_hash(self) -> str | None:
        """sha256 of the teacher's weights (:func:`~targetsft.training.teacher_cache.weights_fingerprint`); ``None``
        for a vLLM teacher or a cache built before it was recorded."""
        return self.manifest.get("teacher_weights_hash")

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
        """Rows of several examples concatenated in the given order: the compact top-k rows of a batch.

        For a batch whose labels are exactly these examples' labels (any padding, ``-100`` on it), this is the
        ``(ids [n, k], logprobs [n, k])`` pair of ``target_loss(..., teacher=TopK(ids, logprobs))``.
        """
        parts = [self.example(i) for i in indices]
        if not parts:
            return torch.zeros(0, self.k, dtype=torch.long), torch.zeros(0, self.k)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def batch_rows(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """:meth:`rows` of the batch's ``example_index`` column (a
        :class:`~targetsft.training.topk_rows.TopKTeacher`), checked against the batch's loss rows."""
        from targetsft.training.topk_rows import check_row_count

        index = batch.get("example_index")
        if index is None:
            raise ValueError("a teacher cache needs the dataset's example_index column in every batch")
        ids, logprobs = self.rows(index.tolist())
        hint = "the cache was built for other data, other max_length or other truncation"
        check_row_count(ids, batch["labels"], "the teacher cache", hint)
        return ids, logprobs

    def label_stats(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """How the cached teacher scores the labels of the ``examples`` it was built on, per supervised token:
        ``top1`` = P[argmax π_T = y], ``in_topk`` = P[y ∈ top-k], ``p_label`` = mean π_T(y) counting 0 where y is
        outside the top-k (a lower bound), ``topk_mass`` = mean Σ_topk π_T, ``topk_entropy`` = mean entropy (nats) of
        the top-k renormalised, a sharpness measure (all at the cache's temperature), over the ``tokens`` rows that
        have a teacher (all of them but where a teacher read through the text has no boundary)."""
        if len(examples) != len(self):
            raise CacheMismatchError(f"the cache holds {len(self)} examples, {len(examples)} were given")
        top1 = in_topk = p_label = mass = entropy = 0.0
        rows = 0
        for i, example in enumerate(examples):
            labels = _as_int_array(example["labels"])
            y = torch.from_numpy(labels[_supervised_positions(labels)]).long()
            ids, lps = self.example(i)
            if y.shape[0] != ids.shape[0]:
                raise CacheMismatchError(
                    f"example {i} has {y.shape[0]} supervised tokens, the cache holds {ids.shape[0]} rows for it"
                )
            kept = ids[:, 0] != MISSING_ID  # rows with a teacher (one read through the text may have none)
            ids, lps, y = ids[kept], lps[kept], y[kept]
            rows += int(kept.sum())
            hit = ids == y[:, None]
            probs = lps.double().exp()
            top1 += (ids[:, 0] == y).sum().item()  # rows are sorted by decreasing log-prob
            in_topk += hit.any(-1).sum().item()
            p_label += (probs * hit).sum().item()
            mass += probs.sum().item()
            renormed = torch.log_softmax(lps.double(), -1)
            entropy += -(renormed.exp() * renormed).sum().item()
        n = max(rows, 1)
        return {
            "tokens": rows,
            "top1": top1 / n,
            "in_topk": in_topk / n,
            "p_label": p_label / n,
            "topk_mass": mass / n,
            "topk_entropy": entropy / n,
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
