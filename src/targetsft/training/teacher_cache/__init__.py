"""Teacher top-k cache: run a teacher once over a tokenized dataset, keep its top-k next-token log-probs.

The losses take a teacher as ``teacher=TopK(ids [n, k], logprobs [n, k])`` with one row per supervised label token, in
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

    manifest.json              identity (teacher name, config, weights; tokenizer, data, k, T), shards, build
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

Modules: :mod:`~targetsft.training.teacher_cache.storage` (identity, fingerprints, manifest, errors),
:mod:`~targetsft.training.teacher_cache.build` (the builder),
:mod:`~targetsft.training.teacher_cache.read` (the reader),
:mod:`~targetsft.training.teacher_cache.from_config` (``cache-teacher`` on a training config, the teacher's label
statistics).
"""

from __future__ import annotations

from targetsft.training.teacher_cache.build import (
    build_teacher_cache,
)
from targetsft.training.teacher_cache.from_config import (
    LABEL_STATS_FILE,
    cache_teacher,
    label_stats_line,
    teacher_label_stats,
)
from targetsft.training.teacher_cache.read import (
    TeacherCache,
    check_cache_folder,
)
from targetsft.training.teacher_cache.storage import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    CacheCorruptError,
    CacheIncompleteError,
    CacheMismatchError,
    TeacherCacheError,
    dataset_fingerprint,
    model_fingerprint,
    shard_name,
    tokenizer_fingerprint,
    weights_fingerprint,
)

__all__ = [
    "CacheCorruptError",
    "CacheIncompleteError",
    "CacheMismatchError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LABEL_STATS_FILE",
    "MANIFEST_NAME",
    "TeacherCache",
    "TeacherCacheError",
    "build_teacher_cache",
    "cache_teacher",
    "check_cache_folder",
    "dataset_fingerprint",
    "label_stats_line",
    "model_fingerprint",
    "shard_name",
    "teacher_label_stats",
    "tokenizer_fingerprint",
    "weights_fingerprint",
]
