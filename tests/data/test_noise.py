"""Label noise: exact fraction, determinism, what each kind changes, and errors."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from targetsft.data.noise import corrupt_records

SOLUTION = "He buys 3 * 4 = 12 apples.\nThen 12 + 1,200 = 1,212.\nSo 1,212 - 2 = 1210\n#### 1210"


def _records(n: int) -> list[dict]:
    return [
        {"question": f"Q{i}?", "solution": f"{i} + {i} = {2 * i}\n#### {2 * i}", "answer": str(2 * i)} for i in range(n)
    ]


def _final(text: str) -> str:
    return re.search(r"####\s*(\S+)\s*$", text).group(1)


@pytest.mark.parametrize(("fraction", "n_corrupted"), [(0.0, 0), (0.2, 20), (0.4, 40), (0.333, 33), (1.0, 100)])
def test_fraction_and_determinism(fraction, n_corrupted):
    recs = _records(100)
    out, chosen = corrupt_records(recs, fraction, "answer", seed=3)
    assert len(out) == 100 and len(chosen) == n_corrupted == len(set(chosen))
    assert (out, chosen) == corrupt_records(recs, fraction, "answer", seed=3)
    changed = [i for i, (r, o) in enumerate(zip(recs, out)) if _final(o["completion"]) != r["answer"]]
    assert changed == chosen  # every chosen record gets a wrong final answer, no other record changes
    for i in chosen:
        assert out[i]["answer"] == _final(out[i]["completion"]) and out[i]["label_noise"] == "answer"
    if 0 < n_corrupted < 100:
        assert corrupt_records(recs, fraction, "answer", seed=4)[1] != chosen


def test_prefix_choice_does_not_depend_on_kind():
    recs = _records(50)
    assert corrupt_records(recs, 0.2, "answer", 1)[1] == corrupt_records(recs, 0.2, "carried", 1)[1]


def test_answer_kind_changes_only_the_final_line():
    (out,), chosen = corrupt_records([{"question": "Q?", "solution": SOLUTION, "answer": "1210"}], 1.0, "answer")
    assert chosen == [0]
    lines = out["completion"].splitlines()
    assert lines[:-1] == SOLUTION.splitlines()[:-1]
    wrong = _final(out["completion"])
    assert wrong != "1210" and 0 < abs(int(wrong) - 1210) <= 10 and out["answer"] == wrong


def test_carried_kind_changes_every_occurrence_of_the_answer():
    sol = "3 * 4 = 12\n12 + 8 = 20\n120 - 100 = 20\n#### 20"
    (out,), _ = corrupt_records([{"question": "Q?", "solution": sol}], 1.0, "carried", seed=0)
    wrong = _final(out["completion"])
    assert wrong != "20"
    assert out["completion"] == f"3 * 4 = 12\n12 + 8 = {wrong}\n120 - 100 = {wrong}\n#### {wrong}"  # 120 untouched
    (out,), _ = corrupt_records([{"question": "Q?", "solution": SOLUTION}], 1.0, "carried", seed=0)
    w = _final(out["completion"])
    assert out["completion"].splitlines()[:2] == SOLUTION.splitlines()[:2]  # 1,212 / 12 are other numbers
    assert out["completion"].splitlines()[2:] == [f"So 1,212 - 2 = {w}", f"#### {w}"]


@settings(max_examples=60, deadline=None)
@given(answer=st.integers(0, 10**6), seed=st.integers(0, 2**31))
def test_wrong_answer_is_different_and_non_negative(answer, seed):
    (out,), _ = corrupt_records([{"prompt": "Q", "completion": f"x\n#### {answer}"}], 1.0, "answer", seed)
    wrong = int(_final(out["completion"]))
    assert wrong != answer and wrong >= 0 and abs(wrong - answer) <= 10


def test_decimal_and_negative_answers():
    (out,), _ = corrupt_records([{"prompt": "Q", "completion": "x\n#### 2.5"}], 1.0, "answer", 0)
    assert float(_final(out["completion"])) != 2.5
    (out,), _ = corrupt_records([{"prompt": "Q", "completion": "x\n#### -7"}], 1.0, "answer", 0)
    assert int(_final(out["completion"])) != -7


def test_errors():
    with pytest.raises(ValueError, match=r"fraction in \[0, 1\]"):
        corrupt_records(_records(4), 1.5)
    with pytest.raises(ValueError, match="kind must be one of"):
        corrupt_records(_records(4), 0.5, "numbers")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="record 1: label noise needs a completion ending with '#### <number>'"):
        corrupt_records([{"prompt": "a", "completion": "#### 1"}, {"prompt": "b", "completion": "no answer"}], 1.0)
