"""Evaluation: metrics and intervals, answer scoring through the pipeline, the early-stop criterion, generation on the
tiny model (end to end, deterministic, files), multiple-choice log-likelihood scoring, and the CLI hooks."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from targetsft import evaluation as E
from targetsft.cli.eval import add_eval_arguments, run_eval_from_args
from targetsft.evaluation import engines as G
from targetsft.evaluation import generation_set, suite

Z95 = 1.959963984540054


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(texts_per_prompt: list[list[str]]) -> E.GenerationRun:
    outs = [[E.Generation(t, 5, "answer") for t in texts] for texts in texts_per_prompt]
    return E.GenerationRun(outs, 1.0, 1, 5)


# ------------------------------------------------------------------------------------------- intervals, pass@k


def test_mean_ci_hand_computation():
    m, lo, hi = E.mean_ci([1, 2, 3, 4])
    s = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3)  # sample sd, n - 1
    half = Z95 * s / 2  # sqrt(4) = 2
    assert m == 2.5
    assert lo == pytest.approx(2.5 - half, abs=1e-12) and hi == pytest.approx(2.5 + half, abs=1e-12)
    assert lo == pytest.approx(1.234849, abs=1e-6)
    m90, lo90, _ = E.mean_ci([1, 2, 3, 4], confidence=0.90)
    assert m90 == 2.5 and lo90 == pytest.approx(2.5 - 1.6448536 * s / 2, abs=1e-6)
    assert E.mean_ci([0.25, 0.25]) == (0.25, 0.25, 0.25)
    assert math.isnan(E.mean_ci([])[0]) and math.isnan(E.mean_ci([3.0])[1])


def test_wilson_ci_hand_computation():
    p, lo, hi = E.wilson_ci(0, 10)
    assert p == 0 and lo == 0 and hi == pytest.approx((Z95**2 / 10) / (1 + Z95**2 / 10), abs=1e-12)  # 0.2775
    p, lo, hi = E.wilson_ci(5, 10)
    half = Z95 * math.sqrt(0.025 + Z95**2 / 400) / (1 + Z95**2 / 10)
    assert p == 0.5 and lo == pytest.approx(0.5 - half) and hi == pytest.approx(0.5 + half)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)


def test_pass_at_k_unbiased():
    assert E.pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert E.pass_at_k(4, 0, 4) == 0.0 and E.pass_at_k(4, 3, 2) == 1.0
    assert E.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c/n
    with pytest.raises(ValueError):
        E.pass_at_k(2, 1, 3)


# ------------------------------------------------------------------------------- metrics from fixed generations


@pytest.fixture
def gen_set(tmp_path):
    rows = [
        {"question": "Q-one apples?", "answer": "18"},
        {"question": "Q-two?", "answer": "1,234"},
        {"question": "Q-three pears?", "answer": "#### 7"},
    ]
    return _write_jsonl(tmp_path / "toy.jsonl", rows)


def _fake_generate(sample_texts, greedy_texts, calls):
    def fake(model, tokenizer, prompts, *, samples=1, temperature=0.0, **kw):
        calls.append({"prompts": list(prompts), "samples": samples, "temperature": temperature, **kw})
        return _run(greedy_texts if temperature == 0 else sample_texts)

    return fake


def test_metrics_from_fixed_generations(gen_set, tmp_path, monkeypatch, tiny_tokenizer):
    samples = [
        ["#### 18", "#### 17", "so 18", "\\boxed{18}"],  # 3/4
        ["#### 1234.5", "no idea", "#### 12", "#### 34"],  # 0/4
        ["#### 7", "#### 8", "#### 9", "#### 70"],  # 1/4
    ]
    greedy = [["the answer is 18"], ["#### 1"], ["#### 7\n"]]  # 2/3
    calls: list[dict] = []
    monkeypatch.setattr(generation_set, "generate_detailed", _fake_generate(samples, greedy, calls))
    out = tmp_path / "out"
    s = E.evaluate_generation(
        None, tiny_tokenizer, str(gen_set), samples=4, temperature=0.8, greedy=True, out_dir=out, progress=False
    )
    m = s["metrics"]
    assert m["average@4"]["value"] == pytest.approx(1 / 3)
    assert m["pass@4"]["value"] == pytest.approx(2 / 3)
    assert m["greedy"]["value"] == pytest.approx(2 / 3)
    assert m["pass@1"]["value"] == pytest.approx(1 / 3)  # unbiased pass@1 = Average@k
    assert m["pass@2"]["value"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)  # per problem 1 - C(4-c,2)/C(4,2)
    # intervals: normal for the per-problem fractions (clipped), Wilson for 0/1 values
    _, lo, hi = E.mean_ci([0.75, 0.0, 0.25])
    assert (m["average@4"]["lo"], m["average@4"]["hi"], m["average@4"]["ci"]) == (max(0, lo), hi, "normal")
    assert (m["greedy"]["lo"], m["greedy"]["hi"]) == pytest.approx(E.wilson_ci(2, 3)[1:])
    assert m["greedy"]["ci"] == "wilson" and m["pass@4"]["ci"] == "wilson"
    # one sampling pass and one greedy pass, with the training prompt format
    assert [(c["samples"], c["temperature"]) for c in calls] == [(4, 0.8), (1, 0.0)]
    assert calls[0]["prompts"][0] == E.build_prompt(tiny_tokenizer, "Q-one apples?")
    assert calls[0]["prompts"][0].endswith("<|im_start|>assistant\n")
    assert "end your answer with '#### <number>'" in calls[0]["prompts"][0]
    # files
    recs = [json.loads(x) for x in (out / "toy.generations.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in recs] == ["18", "1234", "7"]
    assert [[x["correct"] for x in r["samples"]] for r in recs][0] == [True, False, True, True]
    assert recs[0]["samples"][3]["extracted"] == "18" and recs[1]["samples"][0]["extracted"] == "1234.5"
    assert recs[2]["greedy"] == {
        "text": "#### 7\n",
        "extracted": "7",
        "correct": True,
        "n_tokens": 5,
        "finish_reason": "answer",
    }
    summ = json.loads((out / "toy.summary.json").read_text())
    assert summ["n"] == 3 and summ["k"] == 4 and summ["metrics"] == json.loads(json.dumps(m))
    assert summ["decoding"]["temperature"] is not None and "seconds" in summ and "tokens_per_second" in summ
    assert not list(out.glob(".*.tmp"))  # no temp files left behind


def test_recorded_items_score_again_to_their_metrics(gen_set, tmp_path, monkeypatch, tiny_tokenizer):
    """The items a generation set writes score again, without a model, to the metrics it reported, from the plain
    file and from its gzip-compressed form alike; an item whose recorded outcome the checker does not give is
    named; the ``boxed`` prompt checks the last ``\\boxed{}``."""
    from targetsft.data.sft import read_jsonl
    from targetsft.evaluation.rescore import rescore_generations, rescore_items
    from targetsft.runtime.files import compress_file

    samples = [
        ["#### 18", "#### 17", "so 18", "\\boxed{18}"],
        ["#### 1234.5", "no", "#### 12", "#### 34"],
        ["#### 7"] * 4,
    ]
    greedy = [["the answer is 18"], ["#### 1"], ["#### 7\n"]]
    monkeypatch.setattr(generation_set, "generate_detailed", _fake_generate(samples, greedy, []))
    out = tmp_path / "out"
    s = E.evaluate_generation(
        None, tiny_tokenizer, str(gen_set), samples=4, temperature=0.8, greedy=True, out_dir=out, progress=False
    )
    items = out / "toy.generations.jsonl"
    plain = rescore_items(items)
    assert plain == {"n": 3, "metrics": s["metrics"], "changed": []}
    compress_file(items)
    assert not items.exists() and rescore_items(items) == plain == rescore_items(out / "toy.generations.jsonl.gz")
    rows = read_jsonl(items)
    rows[1]["samples"][0]["correct"] = True  # recorded as correct, which "#### 1234.5" for 1,234 is not
    again = rescore_items(_write_jsonl(tmp_path / "edited.jsonl", rows))
    assert again["changed"] == [rows[1]["id"]] and again["metrics"] == s["metrics"]
    item = {"id": "b", "gold": "7", "samples": [{"text": "#### 7", "correct": True}], "greedy": None}
    assert rescore_generations([item])[0]["average@1"]["value"] == 1.0
    assert rescore_generations([item], prompt="boxed") == (
        {
            "average@1": E.generation_metrics([[False]])["average@1"],
            "pass@1": E.generation_metrics([[False]])["pass@1"],
        },
        ["b"],
    )


def test_answer_extraction_tricky_formats(tmp_path, monkeypatch, tiny_tokenizer):
    rows = [
        {"question": "a", "answer": "1234"},
        {"question": "b", "answer": "18"},
        {"question": "c", "answer": "18"},
        {"question": "d", "answer": "18"},
        {"question": "e", "answer": "18"},
        {"question": "f", "answer": "-3"},
    ]
    texts = [
        ["12 + 1222 = 1234\n#### 1,234"],
        ["so the total is \\boxed{18}"],
        ["She pays $18.00 in total."],
        ["18 dollars"],
        ["the answer is 18, or rather\n#### 20"],  # the number after the last #### decides
        ["#### −3\n"],  # unicode minus
    ]
    monkeypatch.setattr(generation_set, "generate_detailed", _fake_generate(texts, texts, []))
    s = E.evaluate_generation(
        None, tiny_tokenizer, str(_write_jsonl(tmp_path / "t.jsonl", rows)), out_dir=tmp_path, progress=False
    )
    recs = [json.loads(x) for x in (tmp_path / "t.generations.jsonl").read_text().splitlines()]
    assert [r["samples"][0]["extracted"] for r in recs] == ["1234", "18", "18", "18", "20", "-3"]
    assert [r["samples"][0]["correct"] for r in recs] == [True, True, True, True, False, True]
    assert s["metrics"]["greedy"]["value"] == pytest.approx(5 / 6) and s["metrics"]["average@1"]["value"] == 5 / 6


def test_greedy_with_several_samples_is_an_error(gen_set, tiny_tokenizer):
    with pytest.raises(ValueError, match="temperature"):
        E.evaluate_generation(None, tiny_tokenizer, str(gen_set), samples=4, temperature=0.0)


# ---------------------------------------------------------------------------------------- stopping criterion


@pytest.mark.parametrize(
    ("text", "done"),
    [
        ("Step 1: 5 + 7 = 12\n#### 12", False),  # 125 may still follow
        ("#### 12\n", True),
        ("#### 12 dollars", True),
        ("#### 12<", True),
        ("#### 1,2", False),
        ("#### 1,234\n", True),
        ("#### 12.", False),  # 12.5 may follow
        ("#### 12.\n", True),
        ("#### 12.5 ", True),
        ("#### $18.00\n", True),
        ("####\n7\n", True),
        ("####", False),
        ("#### \n", False),
        ("12 apples\n", False),
    ],
)
def test_stopping_criterion_marks_complete_answers(tiny_tokenizer, text, done):
    prompt = tiny_tokenizer(E.build_prompt(tiny_tokenizer, "How many?"), add_special_tokens=False)["input_ids"]
    new = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    crit = E.AnswerStoppingCriteria(tiny_tokenizer, len(prompt))
    out = crit(torch.tensor([prompt + new]), None)
    assert out.dtype == torch.bool and out.shape == (1,)
    assert bool(out[0]) is done
    assert crit.reasons[0] == ("answer" if done else None)
    assert E.answer_complete(text) is done


def test_stopping_criterion_token_by_token(tiny_tokenizer):
    """Fed one token at a time (as generate does), the row finishes exactly at the token after ``#### 12``."""
    tok = tiny_tokenizer
    prompt = tok(E.build_prompt(tok, "How many?"), add_special_tokens=False)["input_ids"]
    new = tok("5 + 7 = 12\n#### 12\nThe end", add_special_tokens=False)["input_ids"]
    crit = E.AnswerStoppingCriteria(tok, len(prompt))
    flips = []
    for i in range(1, len(new) + 1):
        if bool(crit(torch.tensor([prompt + new[:i]]), None)[0]):
            flips.append(i)
    first = flips[0]
    assert flips == list(range(first, len(new) + 1))  # stays finished
    assert tok.decode(new[: first - 1]).endswith("#### 12")  # not finished while the number may go on
    after = tok.decode(new[:first])
    assert after.startswith("5 + 7 = 12\n#### 12") and not after[len("5 + 7 = 12\n#### 12")].isdigit()
    assert crit.n_tokens[0] == first and crit.reasons[0] == "answer"


def test_stopping_criterion_batch_eos_and_flag(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = tok(E.build_prompt(tok, "Q?"), add_special_tokens=False)["input_ids"]
    rows = [
        tok("#### 12\n", add_special_tokens=False)["input_ids"],
        tok("#### 12", add_special_tokens=False)["input_ids"],
        tok("no answer", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
    ]
    width = max(map(len, rows))
    # generated tokens are right-aligned to the current step: pad the shorter rows in front of their new tokens
    batch = torch.tensor([prompt + [tok.unk_token_id] * (width - len(r)) + r for r in rows])
    crit = E.AnswerStoppingCriteria(tok, len(prompt))
    assert crit(batch, None).tolist() == [True, False, True]
    assert crit.reasons == ["answer", None, "eos"] and crit.n_tokens == [width, None, width]
    plain = E.AnswerStoppingCriteria(tok, len(prompt), stop_on_answer=False)
    assert plain(batch, None).tolist() == [False, False, True]
    from transformers import StoppingCriteria

    assert isinstance(crit, StoppingCriteria)


def test_cut_at_answer():
    assert E.cut_at_answer("a\n#### 12\n#### 13\nloop") == "a\n#### 12"
    assert E.cut_at_answer("#### 12 dollars\nmore") == "#### 12"  # an early-stopped row never has the rest
    assert E.cut_at_answer("#### $1,234.50.\n") == "#### $1,234.50"
    assert E.cut_at_answer("#### 12.\n") == "#### 12"
    assert E.cut_at_answer("x #### 12") == "x #### 12"  # incomplete: unchanged
    assert E.cut_at_answer("no marker\n") == "no marker\n"


# --------------------------------------------------------------------------------- generation on the tiny model


class _Script:
    """Logits processor forcing, per prompt, a scripted continuation (then eos)."""

    def __init__(self, tokenizer, scripts: dict[tuple[int, ...], list[int]]):
        self.tok, self.scripts, self.start = tokenizer, scripts, None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        forced = torch.full_like(scores, float("-inf"))
        for row in range(input_ids.shape[0]):
            ids = input_ids[row, : self.start].tolist()
            while ids and ids[0] == self.tok.pad_token_id:  # strip the left padding
                ids.pop(0)
            prompt = tuple(ids)
            script = self.scripts[prompt]
            forced[row, script[step] if step < len(script) else self.tok.eos_token_id] = 0.0
        return forced


def _scripted(tok, questions, texts):
    prompts = E.build_prompts(tok, questions)
    pids = tok(prompts, add_special_tokens=False)["input_ids"]
    scripts = {tuple(p): tok(t, add_special_tokens=False)["input_ids"] for p, t in zip(pids, texts, strict=True)}
    return prompts, scripts


@pytest.mark.parametrize("engine", ["compact", "hf"])
def test_early_stop_in_generate(tiny_llama, tiny_tokenizer, engine):
    from transformers import LogitsProcessorList

    tok = tiny_tokenizer
    texts = ["Step\n#### 12\n#### 13\nloop loop loop loop loop loop", "A longer answer: 3 + 4 = 7\n#### 7 apples\nmore"]
    prompts, scripts = _scripted(tok, ["Short one?", "A longer question with more words?"], texts)

    def run(stop, cut=True):
        return E.generate_detailed(
            tiny_llama,
            tok,
            prompts,
            max_new_tokens=60,
            batch_size=2,
            stop_on_answer=stop,
            cut=cut,
            progress=False,
            generation_kwargs={"logits_processor": LogitsProcessorList([_Script(tok, scripts)])},
            engine=engine,
        )

    early, plain, raw = run(True), run(False), run(False, cut=False)
    assert [o[0].text for o in early.outputs] == ["Step\n#### 12", "A longer answer: 3 + 4 = 7\n#### 7"]
    assert [o[0].text for o in plain.outputs] == [o[0].text for o in early.outputs]  # same scored text
    assert [o[0].text for o in raw.outputs] == texts  # cut=False keeps everything (until eos)
    assert [o[0].finish_reason for o in early.outputs] == ["answer", "answer"]
    assert [o[0].finish_reason for o in plain.outputs] == ["eos", "eos"]
    n_stop = [
        len(tok(t, add_special_tokens=False)["input_ids"])
        for t in ("Step\n#### 12\n", "A longer answer: 3 + 4 = 7\n#### 7 apples")
    ]
    assert [o[0].n_tokens for o in early.outputs] == n_stop
    assert [o[0].n_tokens for o in plain.outputs] == [len(scripts[k]) + 1 for k in scripts]  # + eos
    assert early.decode_steps == max(n_stop) < plain.decode_steps
    assert early.generated_tokens < plain.generated_tokens


@pytest.mark.parametrize("engine", ["compact", "hf"])
def test_generate_deterministic_and_rng_independent(tiny_llama, tiny_tokenizer, engine):
    prompts = E.build_prompts(tiny_tokenizer, ["What is 2 + 3?", "How many apples did Emily buy in May?", "Q"])
    kw = {"samples": 2, "temperature": 1.0, "max_new_tokens": 6, "batch_size": 4, "progress": False}
    kw["engine"] = engine
    torch.manual_seed(123)
    a = E.generate(tiny_llama, tiny_tokenizer, prompts, seed=5, **kw)
    torch.manual_seed(999)
    state = torch.get_rng_state()
    b = E.generate(tiny_llama, tiny_tokenizer, prompts, seed=5, **kw)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched
    assert a == b and len(a) == 3 and all(len(x) == 2 for x in a)
    assert E.generate(tiny_llama, tiny_tokenizer, prompts, seed=6, **kw) != a
    g = E.generate(tiny_llama, tiny_tokenizer, prompts, samples=3, max_new_tokens=6, progress=False, engine=engine)
    assert all(len(set(x)) == 1 and len(x) == 3 for x in g)  # greedy: one generation repeated


@pytest.mark.parametrize("engine", ["compact", "hf"])
def test_generate_restores_input_order(tiny_llama, tiny_tokenizer, engine):
    qs = ["Q", "What is 2 + 3?", "How many apples did Emily buy in April and in May together?"]
    prompts = E.build_prompts(tiny_tokenizer, qs)
    kw = {"max_new_tokens": 5, "batch_size": 2, "progress": False, "stop_on_answer": False, "engine": engine}
    fwd = E.generate(tiny_llama, tiny_tokenizer, prompts, **kw)
    rev = E.generate(tiny_llama, tiny_tokenizer, prompts[::-1], **kw)
    one = [E.generate(tiny_llama, tiny_tokenizer, [p], **kw)[0] for p in prompts]
    assert fwd == rev[::-1] == one


def test_evaluate_generation_end_to_end(tiny_llama, tiny_tokenizer, gen_set, tmp_path):
    kw = {"samples": 2, "temperature": 1.0, "greedy": True, "max_new_tokens": 6, "batch_size": 4, "progress": False}
    s1 = E.evaluate_generation(tiny_llama, tiny_tokenizer, str(gen_set), out_dir=tmp_path / "a", seed=1, **kw)
    s2 = E.evaluate_generation(tiny_llama, tiny_tokenizer, str(gen_set), out_dir=tmp_path / "b", seed=1, **kw)
    ga, gb = (tmp_path / d / "toy.generations.jsonl" for d in "ab")
    assert ga.read_text() == gb.read_text()
    recs = [json.loads(x) for x in ga.read_text().splitlines()]
    assert len(recs) == 3 and all(len(r["samples"]) == 2 and r["greedy"] is not None for r in recs)
    assert {"text", "extracted", "correct", "n_tokens", "finish_reason"} <= set(recs[0]["samples"][0])
    assert set(recs[0]) == {"id", "question", "gold", "samples", "greedy"}
    summ = json.loads((tmp_path / "a" / "toy.summary.json").read_text())
    assert summ["metrics"] == s1["metrics"] == s2["metrics"]
    assert {"average@2", "pass@2", "pass@1", "greedy"} == set(summ["metrics"])
    assert summ["decoding"]["samples"] == 2 and summ["decoding"]["max_new_tokens"] == 6
    assert summ["generated_tokens"] > 0 and summ["tokens_per_second"] > 0 and summ["n"] == 3
    assert summ["stats"]["samples"]["sequences"] == 6 and summ["stats"]["greedy"]["sequences"] == 3


# ------------------------------------------------------------------------------------- compact decode loop


class _Force:
    """Logits processor forcing token ``plan[prompt][step]`` at the given steps of the given prompts and leaving
    every other score alone (the rows keep decoding freely). Works with both engines: it finds a row's prompt by
    stripping the left padding of the first ``start`` columns."""

    def __init__(self, tokenizer, plan: dict[tuple[int, ...], dict[int, int]]):
        self.tok, self.plan, self.start = tokenizer, plan, None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        scores = scores.clone()
        for row in range(input_ids.shape[0]):
            ids = input_ids[row, : self.start].tolist()
            while ids and ids[0] == self.tok.pad_token_id:
                ids.pop(0)
            forced = self.plan.get(tuple(ids), {}).get(step)
            if forced is not None:
                scores[row] = float("-inf")
                scores[row, forced] = 0.0
        return scores


class _RowCounter:
    """Forward pre-hook recording the number of rows of every forward pass of a model."""

    def __init__(self, model):
        self.rows: list[int] = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.rows.append(int(ids.shape[0]))

    def remove(self):
        self.handle.remove()


_QUESTIONS = [
    "How many apples did Emily buy in April and in May together, if she bought 12 in April?",  # longest
    "What is 2 + 3?",
    "Natalia sold clips to 48 of her friends. How many?",
    "Q",  # shortest
]


def _prompt_ids(tok, prompts):
    return [tuple(x) for x in tok(prompts, add_special_tokens=False)["input_ids"]]


def _forced_plan(tok, prompts, eos_at=2, answer_from=1):
    """Prompt 1 emits eos at step ``eos_at``; prompt 2 writes ``#### 12`` + newline from step ``answer_from``;
    prompts 0 and 3 decode freely."""
    pids = _prompt_ids(tok, prompts)
    answer = tok("#### 12\n", add_special_tokens=False)["input_ids"]
    return {
        pids[1]: {eos_at: tok.eos_token_id},
        pids[2]: {answer_from + i: t for i, t in enumerate(answer)},
    }, len(answer)


def test_compact_greedy_equals_model_generate(tiny_llama, tiny_tokenizer):
    """Plain greedy, no processors: the compact loop's tokens are model.generate's tokens, row by row."""
    tok = tiny_tokenizer
    prompts = E.build_prompts(tok, _QUESTIONS)
    run = E.generate_detailed(
        tiny_llama, tok, prompts, max_new_tokens=12, batch_size=4, stop_on_answer=False, cut=False, progress=False
    )
    assert run.settings["engine"] == "compact"
    ids, mask = G._left_pad([list(p) for p in _prompt_ids(tok, prompts)], tok.pad_token_id, torch.device("cpu"))
    assert len(set(mask.sum(1).tolist())) == 4  # four prompt lengths: real left padding
    with torch.no_grad():
        ref = tiny_llama.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=12,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[:, ids.shape[1] :]
    for i, outs in enumerate(run.outputs):
        g = outs[0]
        assert list(g.token_ids) == ref[i, : g.n_tokens].tolist()
        assert g.text == tok.decode(ref[i, : g.n_tokens], skip_special_tokens=True)


@pytest.mark.parametrize("batch_size", [4, 3])
def test_compact_greedy_equals_hf_with_early_finishes(tiny_llama, tiny_tokenizer, batch_size):
    """Rows that finish early (one by eos, one by the answer rule) leave the compact batch; every row's tokens,
    token count, finish reason and text equal model.generate's, and the forward passes shrink accordingly."""
    from transformers import LogitsProcessorList

    tok = tiny_tokenizer
    prompts = E.build_prompts(tok, _QUESTIONS)
    plan, n_answer = _forced_plan(tok, prompts)
    cap = 12
    runs, counts = {}, {}
    for engine in ("hf", "compact"):
        counter = _RowCounter(tiny_llama)
        try:
            runs[engine] = E.generate_detailed(
                tiny_llama,
                tok,
                prompts,
                max_new_tokens=cap,
                batch_size=batch_size,
                cut=False,
                progress=False,
                engine=engine,
                generation_kwargs={"logits_processor": LogitsProcessorList([_Force(tok, plan)])},
            )
        finally:
            counter.remove()
        counts[engine] = counter.rows
    hf, compact = runs["hf"], runs["compact"]
    assert compact.settings["engine"] == "compact" and hf.settings["engine"] == "hf"
    for a, b in zip(hf.outputs, compact.outputs, strict=True):
        assert a[0].token_ids == b[0].token_ids and len(b[0].token_ids) == b[0].n_tokens
        assert (a[0].text, a[0].n_tokens, a[0].finish_reason) == (b[0].text, b[0].n_tokens, b[0].finish_reason)
    g = [o[0] for o in compact.outputs]
    assert (g[1].finish_reason, g[1].n_tokens, g[1].token_ids[-1]) == ("eos", 3, tok.eos_token_id)
    assert g[2].finish_reason == "answer" and g[2].text.endswith("#### 12\n") and g[2].n_tokens <= 1 + n_answer
    assert g[0].finish_reason == g[3].finish_reason == "length" and g[0].n_tokens == g[3].n_tokens == cap
    # cost: compact runs each row for its own tokens only; hf keeps every row until its batch ends
    n_batches = -(-4 // batch_size)
    assert compact.decode_steps == hf.decode_steps == len(counts["compact"]) == n_batches * cap
    assert compact.row_steps == sum(counts["compact"]) == sum(x.n_tokens for x in g)
    assert hf.row_steps == sum(counts["hf"]) == 4 * cap
    assert compact.row_steps < hf.row_steps
    if batch_size == 4:  # one batch: 4 rows until the eos row leaves after step 3, then 3, then 2
        rows = counts["compact"]
        assert rows[:3] == [4, 4, 4] and rows[3] == 3 and rows[-1] == 2 and rows.count(3) == g[2].n_tokens - 3
        assert counts["hf"] == [4] * cap


def test_compact_stops_when_every_row_is_done(tiny_llama, tiny_tokenizer):
    from transformers import LogitsProcessorList

    tok = tiny_tokenizer
    prompts = E.build_prompts(tok, _QUESTIONS[1:3])
    plan, _ = _forced_plan(tok, E.build_prompts(tok, _QUESTIONS))
    counter = _RowCounter(tiny_llama)
    try:
        run = E.generate_detailed(
            tiny_llama,
            tok,
            prompts,
            max_new_tokens=40,
            progress=False,
            generation_kwargs={"logits_processor": LogitsProcessorList([_Force(tok, plan)])},
        )
    finally:
        counter.remove()
    n = [o[0].n_tokens for o in run.outputs]
    assert [o[0].finish_reason for o in run.outputs] == ["eos", "answer"]
    assert run.decode_steps == len(counter.rows) == max(n) < 40
    assert counter.rows == [2] * 3 + [1] * (max(n) - 3) and run.row_steps == sum(n)


def test_compact_sampling_deterministic_and_independent_of_dropped_rows(tiny_llama, tiny_tokenizer):
    from transformers import LogitsProcessorList

    tok = tiny_tokenizer
    prompts = E.build_prompts(tok, _QUESTIONS)
    kw = {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 10, "batch_size": 4, "progress": False}

    def run(seed, procs=None, **extra):
        gk = {"logits_processor": LogitsProcessorList(procs)} if procs else None
        r = E.generate_detailed(tiny_llama, tok, prompts, seed=seed, cut=False, generation_kwargs=gk, **kw, **extra)
        assert r.settings["engine"] == "compact"
        return [o[0] for o in r.outputs]

    torch.manual_seed(1)
    a = run(5)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    b = run(5)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched
    assert [g.token_ids for g in a] == [g.token_ids for g in b] and [g.text for g in a] == [g.text for g in b]
    assert [g.token_ids for g in run(6)] != [g.token_ids for g in a]
    # row 1 forced to eos at step 1 leaves the batch: the other rows draw the same tokens as before
    pid1 = _prompt_ids(tok, prompts)[1]
    c = run(5, [_Force(tok, {pid1: {1: tok.eos_token_id}})])
    assert c[1].finish_reason == "eos" and c[1].n_tokens == 2
    assert [g.token_ids for i, g in enumerate(c) if i != 1] == [g.token_ids for i, g in enumerate(a) if i != 1]
    # sampled rows: several distinct draws of one prompt
    many = E.generate_detailed(tiny_llama, tok, prompts[:1], samples=4, seed=0, **kw).outputs[0]
    assert len({g.token_ids for g in many}) > 1


def test_sample_rows_inverse_cdf():
    scores = torch.log(torch.tensor([[0.5, 0.0, 0.5], [0.25, 0.75, 0.0]]))
    top = 1 - 2**-24  # the largest value torch.rand returns
    for u, want in [((0.0, 0.0), [0, 0]), ((0.49, 0.2), [0, 0]), ((0.5, 0.25), [2, 1]), ((top, top), [2, 1])]:
        assert G._sample_rows(scores, torch.tensor(u)).tolist() == want
    # tokens of probability 0 are never drawn, and the frequencies follow the probabilities
    g = torch.Generator().manual_seed(0)
    u = torch.rand(20000, generator=g)
    p = torch.tensor([0.1, 0.0, 0.6, 0.3])
    idx = G._sample_rows(torch.log(p).expand(len(u), -1), u)
    freq = torch.bincount(idx, minlength=4).float() / len(u)
    assert freq[1] == 0 and torch.allclose(freq, p, atol=0.015)


def test_stopping_criterion_update_on_row_subsets(tiny_tokenizer):
    tok = tiny_tokenizer
    crit = E.AnswerStoppingCriteria(tok, 0, batch_size=3)
    a = tok("#### 12\n", add_special_tokens=False)["input_ids"]
    b = tok("abc", add_special_tokens=False)["input_ids"][: len(a)]
    b += [tok.unk_token_id] * (len(a) - len(b))
    done = crit.update(torch.tensor([b, a]), [2, 0])  # rows 2 and 0 only, in that order
    assert done.tolist() == [False, True] and crit.reasons == ["answer", None, None]
    assert crit.n_tokens == [len(a), None, None]
    done = crit.update(torch.tensor([b + [tok.eos_token_id]]), [1])
    assert done.tolist() == [True] and crit.reasons == ["answer", "eos", None] and crit.done.tolist() == [1, 1, 0]


def test_engine_choice_and_fallback(tiny_llama, tiny_tokenizer, monkeypatch):
    prompts = E.build_prompts(tiny_tokenizer, ["Q"])
    kw = {"max_new_tokens": 3, "progress": False}
    with pytest.raises(ValueError, match="engine"):
        E.generate_detailed(tiny_llama, tiny_tokenizer, prompts, engine="turbo", **kw)
    with pytest.raises(TypeError, match="needs a targetsft.runtime.vllm_engine.VLLMEngine"):
        E.generate_detailed(tiny_llama, tiny_tokenizer, prompts, engine="vllm", **kw)
    with pytest.raises(ValueError, match="logits_processor only|takes only"):
        E.generate_detailed(tiny_llama, tiny_tokenizer, prompts, generation_kwargs={"num_beams": 2}, **kw)
    hf = E.generate_detailed(tiny_llama, tiny_tokenizer, prompts, engine="hf", **kw)
    assert hf.settings["engine"] == "hf" and hf.row_steps == hf.decode_steps == 3
    assert G._compact_unsupported(tiny_llama) is None
    monkeypatch.setattr(G, "_compact_unsupported", lambda model: "no row selection")
    with pytest.warns(UserWarning, match="no row selection"):
        run = E.generate_detailed(tiny_llama, tiny_tokenizer, prompts, **kw)
    assert run.settings["engine"] == "hf" and run.outputs == hf.outputs


def test_compact_refuses_cache_layers_without_row_selection():
    from transformers.cache_utils import DynamicCache, DynamicLayer, StaticLayer

    cache = DynamicCache()
    cache.layers = [DynamicLayer(), StaticLayer(max_cache_len=8)]
    with pytest.raises(NotImplementedError, match="StaticLayer"):
        G._check_selectable(cache)


# ------------------------------------------------------------------------------------------- multiple choice


def test_multiple_choice_matches_direct_loglik(tiny_llama, tiny_tokenizer, tmp_path):
    items = [
        {"question": "Which is a fruit?", "choices": ["apples", "a red brick", "tickets"], "answer_index": 0},
        {"question": "Natalia sold clips. What did she sell?", "choices": ["clips", "shrimp"], "answer_index": 0},
        {"question": "Pick one", "choices": ["marbles in a jar", "books", "cookies", "balloons"], "answer_index": 2},
    ]
    path = _write_jsonl(tmp_path / "mc.jsonl", items)
    s = E.evaluate_multiple_choice(
        tiny_llama, tiny_tokenizer, str(path), batch_size=3, out_dir=tmp_path, progress=False
    )
    recs = [json.loads(x) for x in (tmp_path / "mc.mc.jsonl").read_text().splitlines()]
    tok = tiny_tokenizer
    correct_mean = correct_sum = 0
    for it, rec in zip(items, recs, strict=True):
        sums, means = [], []
        ctx = tok(f"Question: {it['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
        for ch in it["choices"]:
            cont = tok(" " + ch, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = tiny_llama(torch.tensor([ctx + cont])).logits[0]
            lp = torch.log_softmax(logits[len(ctx) - 1 : -1], -1).gather(-1, torch.tensor(cont)[:, None]).sum()
            sums.append(float(lp))
            means.append(float(lp) / len(cont))
        assert rec["logprob_sum"] == pytest.approx(sums, abs=1e-4)
        assert rec["pred_mean"] == max(range(len(means)), key=means.__getitem__)
        assert rec["pred_sum"] == max(range(len(sums)), key=sums.__getitem__)
        correct_mean += rec["pred_mean"] == it["answer_index"]
        correct_sum += rec["pred_sum"] == it["answer_index"]
    assert s["metrics"]["accuracy"]["value"] == pytest.approx(correct_mean / 3)
    assert s["metrics"]["accuracy_sum"]["value"] == pytest.approx(correct_sum / 3)
    from targetsft.evaluation.rescore import rescore_items  # the picks made again from the recorded log-probs

    assert rescore_items(tmp_path / "mc.mc.jsonl") == {"n": 3, "metrics": s["metrics"], "changed": []}
    assert s["metrics"]["accuracy"]["ci"] == "wilson" and s["normalize"] == "mean"
    s2 = E.evaluate_multiple_choice(tiny_llama, tiny_tokenizer, str(path), normalize="sum", progress=False)
    assert s2["metrics"]["accuracy"] == s2["metrics"]["accuracy_sum"]


# ------------------------------------------------------------------------------------------- evaluate and CLI


def test_cli_arguments_and_run(monkeypatch):
    parser = add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--model",
            "m",
            "--data",
            "gsm-heldout",
            "piqa",
            "--data",
            "x.jsonl",
            "--samples",
            "4",
            "--temperature",
            "0.7",
            "--size",
            "all",
            "--no-early-stop",
            "--engine",
            "hf",
        ]
    )
    assert (
        args.engine == "hf"
        and add_eval_arguments(argparse.ArgumentParser()).parse_args(["--data", "a"]).engine == "compact"
    )
    assert args.data == ["gsm-heldout", "piqa", "x.jsonl"] and args.size == "all" and args.stop_on_answer is False
    assert args.samples == 4 and args.temperature == 0.7 and args.greedy is True and args.max_new_tokens == 256
    seen = {}
    monkeypatch.setattr(
        suite, "evaluate", lambda model, sets, **kw: seen.update(model=model, sets=sets, **kw) or {"table": ""}
    )
    assert run_eval_from_args(args) == 0
    decode = seen["decode"]  # the command line's decoding, carried as one DecodeOptions
    assert seen["model"] == "m" and seen["sets"] == args.data and decode.temperature == 0.7 and decode.samples == 4
    assert decode.engine == "hf" and decode.stop_on_answer is False and seen["choice"].batch_size == 16
    with pytest.raises(SystemExit):
        parser.parse_args(["--data", "a", "--size", "-1"])


def test_run_eval_unknown_set_returns_2(capsys):
    args = add_eval_arguments(argparse.ArgumentParser()).parse_args(["--data", "no-such-set"])
    assert run_eval_from_args(args) == 2
    assert "unknown evaluation set" in capsys.readouterr().err


def test_evaluate_from_a_model_folder(tiny_llama, tiny_tokenizer, gen_set, tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    mc = _write_jsonl(tmp_path / "mc.jsonl", [{"question": "q", "choices": ["a", "b"], "answer_index": 1}])
    args = add_eval_arguments(argparse.ArgumentParser()).parse_args(
        [
            "--model",
            str(folder),
            "--data",
            str(gen_set),
            str(mc),
            "--max-new-tokens",
            "4",
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert run_eval_from_args(args) == 0
    table = capsys.readouterr().out
    assert "toy" in table and "greedy" in table and "accuracy" in table and "[" in table
    report = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["kind"] for r in report["results"]] == ["generation", "multiple_choice"]
    assert set(report["results"][0]["metrics"]) == {"average@1", "pass@1", "greedy"}
    assert (tmp_path / "out" / "toy.generations.jsonl").is_file() and (tmp_path / "out" / "mc.mc.jsonl").is_file()


def test_boxed_prompt_scores_latex_answers(tmp_path, monkeypatch, tiny_tokenizer):
    """prompt="boxed": the MATH-style instruction, generation to eos (no '#### n' stop, no cut), the last \\boxed{}
    compared with a LaTeX gold by math-verify; JSONL answers keep their commas unless they are thousands."""
    rows = [
        {"question": "Half?", "answer": "\\frac{1}{2}"},
        {"question": "Point?", "answer": "(3, 4)"},
        {"question": "Big?", "answer": "1,234"},
    ]
    path = _write_jsonl(tmp_path / "math.jsonl", rows)
    greedy = [["so \\boxed{0.5}"], ["#### 7 then \\boxed{(3,4)}"], ["\\boxed{1234} \\boxed{12}"]]
    calls: list[dict] = []
    monkeypatch.setattr(generation_set, "generate_detailed", _fake_generate(greedy, greedy, calls))
    s = E.evaluate_generation(None, tiny_tokenizer, str(path), prompt="boxed", out_dir=tmp_path / "o", progress=False)
    assert s["metrics"]["greedy"]["value"] == pytest.approx(2 / 3)  # the last box decides: 12 ≠ 1234
    assert calls[0]["stop_on_answer"] is False and calls[0]["cut"] is False
    assert calls[0]["prompts"][0].rstrip().endswith("\\boxed{}.<|im_end|>\n<|im_start|>assistant")
    assert "####" not in calls[0]["prompts"][0]
    recs = [json.loads(x) for x in (tmp_path / "o" / "math.generations.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in recs] == ["\\frac{1}{2}", "(3, 4)", "1234"]
    assert [r["greedy"]["extracted"] for r in recs] == ["0.5", "(3,4)", "12"]
    with pytest.raises(ValueError, match="prompt style"):
        E.build_prompt(tiny_tokenizer, "Q", "latex")


def test_decode_options_resolve_and_refuse():
    """One sample defaults to greedy, several to temperature 1; k greedy samples and an unknown field are refused."""
    from targetsft.evaluation import DecodeOptions

    assert DecodeOptions().sampling_temperature == 0.0 and DecodeOptions(samples=4).sampling_temperature == 1.0
    assert DecodeOptions(samples=4, temperature=0.7).sampling_temperature == 0.7
    with pytest.raises(ValueError, match="identical greedy samples"):
        DecodeOptions(samples=2, temperature=0)
    with pytest.raises(ValueError, match="at least 1"):
        DecodeOptions(samples=0)
    with pytest.raises(TypeError):
        DecodeOptions().with_(temprature=0.5)
    assert DecodeOptions().with_(samples=3).samples == 3
