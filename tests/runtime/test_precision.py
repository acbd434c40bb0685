"""Precision by capability: each forced capability answer gives the rule's precision, an explicit bf16 without
native support is warned about once with a measured factor, and the choice reaches ``TrainingArguments``, the
evaluator's model dtype, the teacher cache build and the records."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from targetsft.runtime import precision as P
from targetsft.training.config import ConfigError, load_config


@pytest.mark.parametrize(
    "cpu_bf16, cuda, expected",
    [
        (True, None, ("bf16", "cpu")),
        (False, None, ("fp32", "cpu")),
        (False, "bf16", ("bf16", "cuda")),
        (True, "fp16", ("fp16", "cuda")),  # the GPU decides where there is one
    ],
)
def test_auto_follows_the_capability(capability, cpu_bf16, cuda, expected):
    capability(cpu_bf16=cpu_bf16, cuda=cuda)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto never warns
        got = P.resolve_precision("auto")
    assert (got.name, got.device) == expected and got.native and got.requested == "auto"


def test_explicit_precision_wins_and_slow_bf16_is_warned_once_with_a_factor(capability, monkeypatch):
    capability(cpu_bf16=True)
    assert P.resolve_precision("fp32").name == "fp32"
    capability(cpu_bf16=False)
    monkeypatch.setattr(P, "half_slowdown", lambda name: 46.0)
    with pytest.warns(RuntimeWarning, match=r"no native bf16 kernels: a bf16 matmul measured 46x slower"):
        got = P.resolve_precision("bf16", "cpu")
    assert got.name == "bf16" and not got.native
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P.resolve_precision("bfloat16", "cpu")  # the same request again: no second warning


def test_the_slowdown_is_measured():
    factor = P.half_slowdown("bf16", size=64, repeats=1)
    assert factor > 0 and factor == P.half_slowdown("bf16", size=64, repeats=1)  # measured once


def test_precision_names_and_bad_values():
    assert [P.normalize(x) for x in ("bfloat16", "float32", "FP16", None)] == ["bf16", "fp32", "fp16", "auto"]
    with pytest.raises(ValueError, match="precision must be one of"):
        P.normalize("int8")


@pytest.mark.parametrize(
    "overrides, cpu_bf16, flags",
    [
        ([], False, {"bf16": False, "fp16": False}),
        ([], True, {"bf16": True, "fp16": False}),
        (["train.bf16=false"], True, {"bf16": False, "fp16": False}),  # an explicit fp32
        (["precision=fp32"], True, {"bf16": False, "fp16": False}),
        (["train.bf16=true"], False, {"bf16": True, "fp16": False}),  # the committed experiments' explicit bf16
        (["precision=bf16"], True, {"bf16": True, "fp16": False}),
    ],
)
def test_the_choice_reaches_training_arguments(capability, overrides, cpu_bf16, flags):
    capability(cpu_bf16=cpu_bf16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        args = load_config(None, overrides).training_arguments()
    assert {k: args[k] for k in flags} == flags and args["use_cpu"]


def test_config_refuses_two_precisions():
    with pytest.raises(ConfigError, match="precision must be one of"):
        load_config(None, ["precision=half-ish"])
    with pytest.raises(ConfigError, match="both set"):
        load_config(None, ["precision=fp32", "train.bf16=true"])
    with pytest.raises(ConfigError, match="both true"):
        load_config(None, ["train.bf16=true", "train.fp16=true"])


def test_the_evaluator_loads_the_model_in_the_chosen_dtype(capability, tiny_llama, tiny_tokenizer, tmp_path):
    from targetsft.evaluation import evaluate

    folder = tmp_path / "model"
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "1 + 1?", "answer": "2"}) + "\n")
    for cpu_bf16, dtype in ((True, "bfloat16"), (False, "float32")):
        capability(cpu_bf16=cpu_bf16)
        report = evaluate(str(folder), [str(data)], max_new_tokens=2, progress=False)
        assert report["dtype"] == dtype
        assert report["environment"]["precision"] == {"bfloat16": "bf16", "float32": "fp32"}[dtype]
        assert report["environment"]["cpu_native_bf16"] is cpu_bf16


def test_the_teacher_cache_build_runs_and_records_the_chosen_precision(
    capability, tiny_llama, tiny_tokenizer, tmp_path
):
    from targetsft.data.sft import tokenize_record
    from targetsft.training.teacher_cache import CacheMismatchError, build_teacher_cache

    records = [{"prompt": f"{i} + {i}?", "completion": f"#### {2 * i}"} for i in range(4)]
    examples = [tokenize_record(tiny_tokenizer, r, 1024) for r in records]
    seen = []
    handle = tiny_llama.lm_head.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    try:
        capability(cpu_bf16=True)
        kw = {"tokenizer": tiny_tokenizer, "k": 4, "shard_examples": 2, "progress": False}
        build_teacher_cache(tiny_llama, examples[:2], tmp_path / "a", **kw)
        manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
        assert manifest["build"]["precision"] == "bf16" and seen[-1] == torch.bfloat16
        capability(cpu_bf16=False)
        build_teacher_cache(tiny_llama, examples[:2], tmp_path / "b", **kw)
        assert json.loads((tmp_path / "b" / "manifest.json").read_text())["build"]["precision"] == "fp32"
        assert seen[-1] == torch.float32
    finally:
        handle.remove()
    # a partial cache resumes only at the precision its first shards were built at
    part = tmp_path / "c"
    capability(cpu_bf16=True)
    build_teacher_cache(tiny_llama, examples, part, **kw)
    m = json.loads((part / "manifest.json").read_text())
    m["complete"], m["shards"] = False, m["shards"][:1]
    (part / "manifest.json").write_text(json.dumps(m))
    capability(cpu_bf16=False)
    with pytest.raises(CacheMismatchError, match="built at precision bf16, this build runs at fp32"):
        build_teacher_cache(tiny_llama, examples, part, **kw)
    capability(cpu_bf16=True)
    build_teacher_cache(tiny_llama, examples, part, **kw)  # the same precision resumes
    assert json.loads((part / "manifest.json").read_text())["complete"]


def test_records_name_the_library_versions():
    """Every record names the versions of the libraries that can change its numbers, read from their distributions
    (so they equal what the imported modules say)."""
    import accelerate
    import transformers

    libraries = P.environment()["libraries"]
    assert libraries["transformers"] == transformers.__version__
    assert libraries["accelerate"] == accelerate.__version__
    assert set(libraries) <= set(P._RECORDED_LIBRARIES)
