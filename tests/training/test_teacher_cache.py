"""Teacher top-k cache: build, read back, resume after a crash, refuse mismatched or corrupted caches.

Everything is offline: a tiny randomly initialised Llama and a WordLevel tokenizer built in memory.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from conftest import tiny_model  # noqa: E402
from targetsft import target_loss  # noqa: E402
from targetsft.losses import validation as V  # noqa: E402
from targetsft.training.teacher_cache import (  # noqa: E402
    MANIFEST_NAME,
    CacheCorruptError,
    CacheIncompleteError,
    CacheMismatchError,
    TeacherCache,
    build_teacher_cache,
    dataset_fingerprint,
    model_fingerprint,
    tokenizer_fingerprint,
    weights_fingerprint,
)

VOCAB = 97
NAME = "tiny-llama"
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def make_tokenizer(swap: bool = False) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over ``<pad> <unk> <s> </s> w4 … w96``; ``swap`` exchanges the ids of w4 and w5."""
    tokens = SPECIALS + [f"w{i}" for i in range(len(SPECIALS), VOCAB)]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if swap:
        vocab["w4"], vocab["w5"] = vocab["w5"], vocab["w4"]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def make_examples(n: int = 10, seed: int = 0, max_len: int = 24) -> list[dict]:
    """Random prompt/answer examples; example 3 has no supervised token, example 1 a label at t = 0 (dropped)."""
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        length = int(rng.randint(4, max_len + 1))
        ids = [2] + rng.randint(4, VOCAB, size=length - 1).tolist()
        prompt = int(rng.randint(1, length - 1))
        labels = [-100] * prompt + ids[prompt:]
        if i == 3:
            labels = [-100] * length
        if i == 1:
            labels = list(ids)
        out.append({"input_ids": ids, "labels": labels})
    return out


def with_teacher_prompts(examples: list[dict], seed: int = 1) -> list[dict]:
    """Give each example a privileged teacher prompt (extra tokens before the prompt) with the same answer."""
    rng = np.random.RandomState(seed)
    out = []
    for ex in examples:
        extra = rng.randint(4, VOCAB, size=int(rng.randint(1, 6))).tolist()
        labels = list(ex["labels"])
        labels[0] = -100  # the label at t = 0 is never supervised; keep the two label sequences identical
        out.append(
            {
                **ex,
                "teacher_input_ids": [2] + extra + ex["input_ids"][1:],
                "teacher_labels": [-100] * (1 + len(extra)) + labels[1:],
            }
        )
    return out


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama and the tokenizer saved to disk (the crash test's subprocess loads the very same ones)."""
    root = tmp_path_factory.mktemp("tiny")
    model = tiny_model(
        "llama",
        VOCAB,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,  # peaked enough that the top-k order is not decided by rounding noise
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    model.save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "tokenizer")
    return {"model": root / "model", "tokenizer": root / "tokenizer"}


@pytest.fixture(scope="module")
def model(saved) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(saved["model"]).eval()


def reference_logprobs(model, input_ids: list[int], labels: list[int], temperature: float) -> torch.Tensor:
    """``log_softmax(logits[t − 1] / T)`` at the supervised positions, from an unbatched forward ``[n, V]``."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([input_ids])).logits[0].float()
    pos = [t - 1 for t in range(1, len(labels)) if labels[t] != -100]
    return torch.log_softmax(logits[pos] / temperature, dim=-1)


def assert_rows_match(ids: torch.Tensor, lps: torch.Tensor, ref: torch.Tensor, k: int) -> None:
    """Cached rows are the reference's top-k: same ids, log-probs within fp16 rounding (and never above)."""
    assert ids.dtype == torch.long and lps.dtype == torch.float32
    assert ids.shape == lps.shape == (ref.shape[0], k)
    top = ref.topk(k, dim=-1)
    assert torch.equal(ids, top.indices)
    if ids.numel():
        assert bool((ids.sort(-1).values.diff(dim=-1) != 0).all()), "ids repeat within a row"
    torch.testing.assert_close(lps, top.values, rtol=2**-10, atol=1e-5)
    assert bool((lps <= ref.gather(-1, ids) + 1e-5).all()), "fp16 log-probs must be rounded down"


def build(model, examples, out, tokenizer, **kw) -> Path:
    """A small build at float32, the reference's precision (``auto`` would run bf16 autocast on a native-bf16 CPU,
    whose top-k may reorder near-ties: the precision rule is tested in test_precision.py)."""
    kw = {
        "precision": "fp32",
        "k": 8,
        "temperature": 1.0,
        "batch_size": 3,
        "shard_examples": 3,
        "teacher_name": NAME,
        "progress": False,
    } | kw
    return build_teacher_cache(model, examples, out, tokenizer=tokenizer, **kw)


def all_rows(cache: TeacherCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [cache.example(i) for i in range(len(cache))]


# ---------------------------------------------------------------------------------------------------------------------


def test_fingerprints(tokenizer, saved, model):
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(make_tokenizer())
    reloaded = transformers.AutoTokenizer.from_pretrained(saved["tokenizer"])
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(make_tokenizer(swap=True)) != tokenizer_fingerprint(tokenizer)

    ex = make_examples()
    assert dataset_fingerprint(ex) == dataset_fingerprint(make_examples())
    assert dataset_fingerprint(ex) != dataset_fingerprint(ex[::-1])
    assert dataset_fingerprint(ex) != dataset_fingerprint(ex[:-1])
    assert dataset_fingerprint(ex) != dataset_fingerprint(with_teacher_prompts(ex))
    as_tensors = [{k: torch.tensor(v) for k, v in e.items()} for e in ex]
    assert dataset_fingerprint(as_tensors) == dataset_fingerprint(ex)

    fp = model_fingerprint(model)
    old = model.config._name_or_path
    try:
        model.config._name_or_path = "/somewhere/else"
        assert model_fingerprint(model) == fp
    finally:
        model.config._name_or_path = old
    other = LlamaConfig.from_pretrained(saved["model"])
    other.num_hidden_layers = 3
    assert model_fingerprint(LlamaForCausalLM(other)) != fp


@pytest.mark.parametrize(("k", "temperature"), [(8, 2.0), (VOCAB, 1.0)])
def test_round_trip(model, tokenizer, tmp_path, k, temperature):
    examples = make_examples()
    out = build(model, examples, tmp_path / "cache", tokenizer, k=k, temperature=temperature)
    cache = TeacherCache.open(out, tokenizer=tokenizer, examples=examples)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] and manifest["k"] == k and manifest["temperature"] == temperature
    assert manifest["vocab_size"] == VOCAB and manifest["num_examples"] == len(examples) == len(cache)
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{i:05d}.safetensors" for i in range(4)]
    assert [(s["start"], s["end"]) for s in manifest["shards"]] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert cache.k == k and cache.temperature == temperature

    total = 0
    for i, ex in enumerate(examples):
        ref = reference_logprobs(model, ex["input_ids"], ex["labels"], temperature)
        ids, lps = cache.example(i)
        assert_rows_match(ids, lps, ref, k)
        assert cache.num_tokens(i) == ref.shape[0]
        V.check_topk("teacher_topk", ids, lps, VOCAB)  # what the loss will check
        total += ref.shape[0]
    assert cache.example(3)[0].shape == (0, k)  # no supervised token
    assert cache.example(1)[0].shape[0] == len(examples[1]["labels"]) - 1  # the label at t = 0 is dropped
    assert cache.tokens == total == manifest["total_tokens"]

    order = [7, 0, 3, 7, 9]
    ids, lps = cache.rows(order)
    parts = [cache.example(i) for i in order]
    assert torch.equal(ids, torch.cat([p[0] for p in parts])) and torch.equal(lps, torch.cat([p[1] for p in parts]))
    assert cache.rows([])[0].shape == (0, k)
    with pytest.raises(IndexError):
        cache.example(len(examples))


def test_rows_are_the_compact_teacher_topk_of_a_batch(model, tokenizer, tmp_path):
    """With k = V the cached teacher is the full distribution: KD from the cache equals KD from dense logits.

    ``tail="renormalize"``: with k = V there is no tail, and the default ``tail="student"`` divides the teacher's
    (rounding-size) missing mass by the student's, which is ~0 when the top-k is the whole vocabulary.
    """
    temperature = 1.5
    examples = make_examples()
    cache = TeacherCache.open(build(model, examples, tmp_path / "c", tokenizer, k=VOCAB, temperature=temperature))
    batch = [5, 2, 8]
    length = max(len(examples[i]["input_ids"]) for i in batch)
    input_ids = torch.zeros(len(batch), length, dtype=torch.long)
    labels = torch.full((len(batch), length), -100)
    for b, i in enumerate(batch):  # right padding, -100 on it
        n = len(examples[i]["input_ids"])
        input_ids[b, :n] = torch.tensor(examples[i]["input_ids"])
        labels[b, :n] = torch.tensor(examples[i]["labels"])
    torch.manual_seed(1)
    student = LlamaForCausalLM(model.config)
    with torch.no_grad():
        student_logits = student(input_ids=input_ids, attention_mask=(labels > -1000).long()).logits
        teacher_logits = model(input_ids=input_ids).logits
    shifted = dict(logits=student_logits[:, :-1], labels=labels[:, 1:], method="kd", tail="renormalize")
    from_cache = target_loss(**shifted, teacher_topk=cache.rows(batch))
    dense = target_loss(**shifted, teacher_logits=teacher_logits[:, :-1], temperature=temperature)
    torch.testing.assert_close(from_cache, dense, rtol=2e-3, atol=2e-3)


def test_label_stats_against_the_dense_teacher(model, tokenizer, tmp_path):
    """Top-1 agreement, label in top-k, mean π_T(y) (0 outside the top-k) and top-k mass, from full log-probs."""
    k = 32
    examples = make_examples(n=12, seed=3)
    cache = TeacherCache.open(build(model, examples, tmp_path / "c", tokenizer, k=k))
    top1 = in_topk = p_label = mass = n = 0.0
    for ex in examples:
        ref = reference_logprobs(model, ex["input_ids"], ex["labels"], 1.0)
        y = torch.tensor([t for t in ex["labels"][1:] if t != -100])
        top = ref.topk(k, dim=-1)
        hit = top.indices == y[:, None]
        top1 += (ref.argmax(-1) == y).sum().item()
        in_topk += hit.any(-1).sum().item()
        p_label += (top.values.exp() * hit).sum().item()
        mass += top.values.exp().sum().item()
        n += y.numel()
    stats = cache.label_stats(examples)
    assert stats["tokens"] == n == cache.tokens
    assert 0 < in_topk < n  # the check below is not vacuous: some labels in the top-k, some outside
    assert stats["top1"] == pytest.approx(top1 / n, abs=1e-12)
    assert stats["in_topk"] == pytest.approx(in_topk / n, abs=1e-12)
    assert stats["p_label"] == pytest.approx(p_label / n, rel=2e-3)  # float16 storage
    assert stats["topk_mass"] == pytest.approx(mass / n, rel=2e-3)
    with pytest.raises(CacheMismatchError, match="holds 12 examples, 11 were given"):
        cache.label_stats(examples[:11])
    shifted = [{**ex, "labels": [-100, *ex["labels"][1:-1], -100]} if i == 4 else ex for i, ex in enumerate(examples)]
    with pytest.raises(CacheMismatchError, match="example 4 has"):
        cache.label_stats(shifted)


class FullLogitsOnly(torch.nn.Module):
    """A teacher whose forward has no ``logits_to_keep``: the builder must take the rows from the full logits."""

    def __init__(self, inner: LlamaForCausalLM) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)
        assert out.logits.shape[1] == input_ids.shape[1]
        return out


def test_teacher_without_logits_to_keep_and_pickling(model, tokenizer, tmp_path):
    examples = make_examples()
    cache = TeacherCache.open(build(model, examples, tmp_path / "a", tokenizer))
    cache.example(4)  # opens a shard handle
    other = TeacherCache.open(build(FullLogitsOnly(model), examples, tmp_path / "b", tokenizer, device="cpu"))
    for (a_ids, a_lp), (b_ids, b_lp) in zip(all_rows(cache), all_rows(other), strict=True):
        assert torch.equal(a_ids, b_ids)
        torch.testing.assert_close(a_lp, b_lp, rtol=2**-9, atol=1e-5)
    clone = pickle.loads(pickle.dumps(cache))
    assert torch.equal(clone.rows([4, 1])[1], cache.rows([4, 1])[1])


def test_privileged_teacher_prompt(model, tokenizer, tmp_path):
    examples = with_teacher_prompts(make_examples())
    cache = TeacherCache.open(build(model, examples, tmp_path / "priv", tokenizer), examples=examples)
    plain = TeacherCache.open(build(model, make_examples(), tmp_path / "plain", tokenizer))
    differs = False
    for i, ex in enumerate(examples):
        ref = reference_logprobs(model, ex["teacher_input_ids"], ex["teacher_labels"], 1.0)
        ids, lps = cache.example(i)
        assert_rows_match(ids, lps, ref, 8)
        # same number of rows as the student's supervised tokens
        assert ids.shape[0] == sum(1 for t in range(1, len(ex["labels"])) if ex["labels"][t] != -100)
        differs |= ids.shape[0] > 0 and not torch.equal(lps, plain.example(i)[1])
    assert differs, "the privileged prompt should change the teacher's rows"

    bad = [dict(ex) for ex in examples]
    bad[4]["teacher_labels"] = list(bad[4]["teacher_labels"])
    bad[4]["teacher_labels"][-1] = (bad[4]["teacher_labels"][-1] + 1) % VOCAB
    with pytest.raises(ValueError, match=r"example 4: the teacher's supervised label tokens differ"):
        build(model, bad, tmp_path / "bad", tokenizer)
    half = [dict(ex) for ex in examples]
    del half[2]["teacher_labels"]
    with pytest.raises(ValueError, match="example 2: give both teacher_input_ids and teacher_labels"):
        build(model, half, tmp_path / "bad", tokenizer)


_CRASH_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    from transformers import AutoTokenizer, LlamaForCausalLM
    from targetsft.training.teacher_cache import build_teacher_cache

    model_dir, tok_dir, data, out, mode = sys.argv[1:]
    real_replace = os.replace

    def crashing_replace(src, dst, *args, **kwargs):
        second = os.path.basename(os.fspath(dst)) == "shard-00001.safetensors"
        if second and mode == "before_replace":  # the temp file of shard 2 is written, not renamed
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst, *args, **kwargs)
        if second and mode == "after_replace":  # shard 2 is in place, the manifest does not list it yet
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = crashing_replace
    with open(data) as fh:
        examples = json.load(fh)
    model = LlamaForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    build_teacher_cache(model, examples, out, tokenizer=tokenizer, k=8, batch_size=3, shard_examples=3,
                        teacher_name="tiny-llama", progress=False, precision="fp32")
    """
)


@pytest.mark.parametrize("mode", ["before_replace", "after_replace"])
def test_resume_after_crash(model, tokenizer, saved, tmp_path, mode):
    examples = make_examples()
    data = tmp_path / "examples.json"
    data.write_text(json.dumps(examples))
    script = tmp_path / "crash.py"
    script.write_text(_CRASH_SCRIPT)
    out = tmp_path / "crashed"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, str(script), str(saved["model"]), str(saved["tokenizer"]), str(data), str(out), mode]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert not manifest["complete"] and [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors"]
    if mode == "before_replace":
        assert list(out.glob(".tmp-shard-00001.safetensors.*")), "the killed build should leave its temp file"
    else:
        assert (out / "shard-00001.safetensors").is_file()
    with pytest.raises(CacheIncompleteError, match=r"incomplete \(examples 3\.\.10 of 10 are missing\)"):
        TeacherCache.open(out)

    forwarded: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: forwarded.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        build(model, examples, out, tokenizer)
    finally:
        hook.remove()
    assert sum(forwarded) == sum(1 for ex in examples[3:] if any(x != -100 for x in ex["labels"][1:]))
    assert not list(out.glob(".tmp-*"))

    resumed = TeacherCache.open(out, tokenizer=tokenizer, examples=examples)
    fresh = TeacherCache.open(build(model, examples, tmp_path / "fresh", tokenizer))
    assert resumed.tokens == fresh.tokens
    for (a_ids, a_lp), (b_ids, b_lp) in zip(all_rows(resumed), all_rows(fresh), strict=True):
        assert torch.equal(a_ids, b_ids) and torch.equal(a_lp, b_lp)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["build"]["sessions"] == 2 and manifest["build"]["tokens"] == fresh.tokens
    assert sorted(p.name for p in out.glob("shard-*")) == [f"shard-{i:05d}.safetensors" for i in range(4)]


def test_corrupted_or_missing_shard(model, tokenizer, tmp_path):
    examples = make_examples()
    out = build(model, examples, tmp_path / "c", tokenizer)
    good = [r for r in all_rows(TeacherCache.open(out))]
    shard = out / "shard-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5:] = bytes(b ^ 0xFF for b in raw[-5:])
    shard.write_bytes(bytes(raw))
    with pytest.raises(CacheCorruptError, match=r"shard-00001\.safetensors fails its sha256 checksum"):
        TeacherCache.open(out)
    TeacherCache.open(out, verify=False)  # sizes only: the flip goes unnoticed by design

    with pytest.warns(
        UserWarning, match=r"shard-00001\.safetensors fails its sha256 checksum .*; rebuilding from example 3"
    ):
        build(model, examples, out, tokenizer)  # resume repairs it
    repaired = all_rows(TeacherCache.open(out))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(good, repaired, strict=True))

    (out / "shard-00002.safetensors").unlink()
    with pytest.raises(CacheCorruptError, match=r"shard-00002\.safetensors is missing"):
        TeacherCache.open(out, verify=False)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CacheCorruptError, match=r"shard-00001\.safetensors has \d+ bytes"):
        TeacherCache.open(out, verify=False)


def test_wrong_tokenizer_or_dataset(model, tokenizer, tmp_path):
    examples = make_examples()
    out = build(model, examples, tmp_path / "c", tokenizer)
    with pytest.raises(CacheMismatchError, match="another tokenizer"):
        TeacherCache.open(out, tokenizer=make_tokenizer(swap=True))
    TeacherCache.open(out, tokenizer=tokenizer_fingerprint(tokenizer))

    other = make_examples(seed=5)
    with pytest.raises(CacheMismatchError, match="other data"):
        TeacherCache.open(out, examples=other)
    with pytest.raises(CacheMismatchError, match="other data"):
        TeacherCache.open(out, dataset_fingerprint=dataset_fingerprint(other))
    TeacherCache.open(out, dataset_fingerprint=dataset_fingerprint(examples))

    # building something else into the folder is refused unless overwrite=True
    with pytest.raises(CacheMismatchError, match=r"dataset_fingerprint: cache has .*overwrite=True"):
        build(model, other, out, tokenizer)
    with pytest.raises(CacheMismatchError, match=r"k: cache has 8, this build has 4"):
        build(model, examples, out, tokenizer, k=4)
    with pytest.raises(CacheMismatchError, match="tokenizer_fingerprint"):
        build(model, examples, out, make_tokenizer(swap=True))
    TeacherCache.open(out, examples=examples)  # untouched
    build(model, other, out, tokenizer, overwrite=True, shard_examples=4)
    cache = TeacherCache.open(out, examples=other)
    assert len(cache) == len(other) and sorted(p.name for p in out.glob("shard-*"))[-1] == "shard-00002.safetensors"


def test_weights_fingerprint(model, saved):
    """Same weights (reloaded, at the same dtype) → same hash; one changed value or another dtype → another; no
    readable weights (no state_dict, meta tensors, a tensor without plain bytes) → None."""
    fp = weights_fingerprint(model)
    assert fp is not None and weights_fingerprint(LlamaForCausalLM.from_pretrained(saved["model"])) == fp
    changed = LlamaForCausalLM.from_pretrained(saved["model"])
    with torch.no_grad():
        changed.model.norm.weight[0] += 2**-20
    assert weights_fingerprint(changed) != fp
    assert weights_fingerprint(LlamaForCausalLM.from_pretrained(saved["model"], dtype=torch.bfloat16)) != fp
    assert weights_fingerprint(object()) is None
    with torch.device("meta"):
        assert weights_fingerprint(LlamaForCausalLM(model.config)) is None
    unreadable = torch.nn.Linear(2, 2)
    assert weights_fingerprint(unreadable) is not None
    unreadable.register_buffer("sparse", torch.eye(2).to_sparse())  # no plain bytes to hash
    assert weights_fingerprint(unreadable) is None


def test_retrained_teacher_is_another_cache(model, tokenizer, saved, tmp_path):
    """A teacher of the same name and config but other weights (retrained in place) does not reuse the cache: the
    build is refused until overwrite=True; a cache that does not record the weights (built before they were) is
    trusted as it is."""
    examples = make_examples()
    out = build(model, examples, tmp_path / "c", tokenizer)
    assert TeacherCache.open(out).teacher_weights_hash == weights_fingerprint(model)
    retrained = LlamaForCausalLM.from_pretrained(saved["model"]).eval()
    with torch.no_grad():
        retrained.lm_head.weight.mul_(1.5)
    with pytest.raises(CacheMismatchError, match=r"teacher_weights_hash: cache has .*overwrite=True"):
        build(retrained, examples, out, tokenizer)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    (out / MANIFEST_NAME).write_text(json.dumps({k: v for k, v in manifest.items() if k != "teacher_weights_hash"}))
    build(retrained, examples, out, tokenizer)  # unknown weights: not compared, the complete cache is kept
    assert TeacherCache.open(out).teacher_weights_hash is None
    build(retrained, examples, out, tokenizer, overwrite=True)
    rebuilt = TeacherCache.open(out, examples=examples)
    assert rebuilt.teacher_weights_hash == weights_fingerprint(retrained) != weights_fingerprint(model)
    ref = reference_logprobs(retrained, examples[0]["input_ids"], examples[0]["labels"], 1.0)
    assert_rows_match(*rebuilt.example(0), ref, 8)


def test_rerun_of_complete_cache_is_a_noop(model, tokenizer, tmp_path, monkeypatch):
    examples = make_examples()
    out = build(model, examples, tmp_path / "c", tokenizer)

    def snapshot() -> dict[str, tuple[int, bytes]]:
        return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.iterdir()) if p.name != ".lock"}

    before = snapshot()

    def boom(*args, **kwargs):
        raise AssertionError("the teacher must not run for a complete cache")

    monkeypatch.setattr(model, "forward", boom)
    assert build(model, examples, out, tokenizer) == out
    assert snapshot() == before


def test_bad_arguments(model, tokenizer, tmp_path):
    examples = make_examples()
    with pytest.raises(ValueError, match=rf"k=98 is larger than the teacher's vocabulary \({VOCAB} tokens\)"):
        build(model, examples, tmp_path / "c", tokenizer, k=VOCAB + 1)
    with pytest.raises(ValueError, match="temperature"):
        build(model, examples, tmp_path / "c", tokenizer, temperature=0.0)
    bad = [dict(ex) for ex in examples]
    bad[6]["labels"] = bad[6]["labels"][:-1]
    with pytest.raises(ValueError, match="example 6: input_ids has"):
        build(model, bad, tmp_path / "c", tokenizer)
    bad = [dict(ex) for ex in examples]
    bad[2]["input_ids"] = [VOCAB] + bad[2]["input_ids"][1:]
    with pytest.raises(ValueError, match=r"example 2: input_ids\[0\] = 97 is outside"):
        build(model, bad, tmp_path / "c", tokenizer)
    with pytest.raises(FileNotFoundError, match="no teacher cache"):
        TeacherCache.open(tmp_path / "nothing")
    assert not (tmp_path / "c" / MANIFEST_NAME).exists()  # nothing was written for the refused builds


def test_folder_guards(model, tokenizer, tmp_path):
    """A concurrent builder is refused; stray shard files without a manifest are not overwritten silently."""
    fcntl = pytest.importorskip("fcntl")
    examples = make_examples()
    out = tmp_path / "locked"
    out.mkdir()
    with open(out / ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another build_teacher_cache is writing"):
            build(model, examples, out, tokenizer)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "shard-00000.safetensors").write_bytes(b"not ours")
    with pytest.raises(CacheMismatchError, match="shard files but no manifest.json; pass overwrite=True"):
        build(model, examples, stray, tokenizer)
    TeacherCache.open(build(model, examples, stray, tokenizer, overwrite=True), examples=examples)


def test_empty_dataset(model, tokenizer, tmp_path):
    cache = TeacherCache.open(build(model, [], tmp_path / "e", tokenizer), examples=[])
    assert len(cache) == 0 and cache.tokens == 0 and cache.rows([])[0].shape == (0, 8)


def test_build_speed_and_size(model, tokenizer, tmp_path):
    """Not asserted: tokens/s of the tiny teacher on this machine and the bytes per cached token."""
    examples = make_examples(n=64, seed=3, max_len=64)
    t0 = time.perf_counter()
    out = build(model, examples, tmp_path / "speed", tokenizer, k=64, batch_size=8, shard_examples=32)
    wall = time.perf_counter() - t0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    shard_bytes = sum(s["bytes"] for s in manifest["shards"])
    tokens = manifest["total_tokens"]
    print(
        f"\n[teacher cache] tiny Llama, k=64: {tokens} tokens in {wall:.2f}s wall "
        f"({manifest['build']['tokens_per_second']} tokens/s in the shard loop), "
        f"{shard_bytes / tokens:.1f} bytes/token on disk (payload {manifest['storage']['bytes_per_token']})"
    )
    assert tokens > 0
