"""A teacher of another tokenizer read through the text (``teacher.align: text``).

Exactness by construction: a teacher whose vocabulary is a permutation of the student's (same strings, other ids,
embedding rows permuted alike) trains, under ``text``, exactly the student its unpermuted self trains under ``ids``,
online and from a cache. A teacher that segments text differently (the student's tokenizer with its last merges
removed) trains with finite loss and an aligned share below 1. The offset alignment and the string mapping are
checked on hand-made cases.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SUM_ROWS, assert_same_weights, trl_batch_grads, two_step_config

transformers = pytest.importorskip("transformers")


from targetsft.losses.loss import target_loss  # noqa: E402
from targetsft.losses.validation import MISSING_ID  # noqa: E402
from targetsft.training.dataset import build_dataset  # noqa: E402
from targetsft.training.fused_forward import LMHead  # noqa: E402
from targetsft.training.recipe import train  # noqa: E402
from targetsft.training.teacher_cache import TeacherCache, cache_teacher  # noqa: E402
from targetsft.training.text_alignment import (  # noqa: E402
    TextAligner,
    TokenMap,
    aligned_topk,
    boundary_rows,
    map_tokens,
    token_bytes,
    without_dummy_prefix,
)


def _variant(tokenizer, *, perm=None, drop_merges=0):
    """A copy of ``tokenizer`` whose ids are permuted (``perm[old] = new``), or without its last merges (and the
    tokens they made, ids renumbered)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    if drop_merges:
        merges = backend["model"]["merges"]
        gone = {"".join(m) if isinstance(m, list) else m.replace(" ", "") for m in merges[-drop_merges:]}
        backend["model"]["merges"] = merges[:-drop_merges]
        vocab = {t: i for i, t in enumerate(t for t in sorted(vocab, key=vocab.get) if t not in gone)}
    if perm is not None:
        vocab = {t: perm[i] for t, i in vocab.items()}
        for added in backend["added_tokens"]:
            added["id"] = perm[added["id"]]
    backend["model"]["vocab"] = vocab
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(backend)),
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        unk_token=tokenizer.unk_token,
    )
    tok.chat_template = tokenizer.chat_template
    return tok


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_tokenizer, tiny_llama):
    """student; teacher (another random model, same tokenizer); the teacher permuted (tokenizer ids and embedding
    rows alike); a student whose tokenizer lacks the last 300 merges (it splits what the teacher keeps whole)."""
    root = tmp_path_factory.mktemp("cross")
    dirs = {name: root / name for name in ("student", "teacher", "permuted", "fine")}
    tiny_llama.save_pretrained(dirs["student"])
    tiny_tokenizer.save_pretrained(dirs["student"])
    torch.manual_seed(11)
    teacher = transformers.LlamaForCausalLM(copy.deepcopy(tiny_llama.config))
    teacher.save_pretrained(dirs["teacher"])
    tiny_tokenizer.save_pretrained(dirs["teacher"])
    perm = torch.randperm(len(tiny_tokenizer), generator=torch.Generator().manual_seed(3))
    permuted = copy.deepcopy(teacher)
    with torch.no_grad():  # new row perm[i] holds old row i (the embedding is tied to the lm_head)
        weight = permuted.get_input_embeddings().weight
        weight[perm] = weight.clone()
    permuted.save_pretrained(dirs["permuted"])
    _variant(tiny_tokenizer, perm=perm.tolist()).save_pretrained(dirs["permuted"])
    fine_tok = _variant(tiny_tokenizer, drop_merges=300)
    fine = transformers.LlamaForCausalLM(copy.deepcopy(tiny_llama.config))
    fine.resize_token_embeddings(len(fine_tok))
    fine.save_pretrained(dirs["fine"])
    fine_tok.save_pretrained(dirs["fine"])
    dirs["perm"] = perm
    return dirs


def _cfg(pair, out, *extra, method="target_sft"):
    return two_step_config(pair["student"], out, *extra, method=method)


# ------------------------------------------------------------------------------------ hand-made alignments


def test_a_word_split_one_to_two_aligns_where_the_boundaries_meet():
    # the student reads "hello world" as 2 tokens, the teacher as 3: every student prefix end is a teacher boundary
    assert boundary_rows([b"hello", b" world"], [True, True], [b"hel", b"lo", b" world"]) == [0, 2]


def test_a_word_split_two_to_one_leaves_the_inner_position_without_a_teacher():
    assert boundary_rows([b"hel", b"lo", b" world"], [True, True, True], [b"hello", b" world"]) == [0, -1, 1]


def test_bytes_of_a_multibyte_character_align_only_at_the_character_end():
    zhong = "中".encode()  # 3 bytes: the student splits them 1 + 2, the teacher keeps them whole
    student = [zhong[:1], zhong[1:], b"!"]
    assert boundary_rows(student, [True, True, True], [zhong, b"!"]) == [0, -1, 1]
    assert boundary_rows(student, [True, True, True], [zhong[:1], zhong[1:2], zhong[2:], b"!"]) == [0, 1, 3]


def test_unsupervised_positions_get_no_row_and_a_mismatch_ends_the_comparison():
    assert boundary_rows([b"a", b"b", b"c"], [False, True, True], [b"a", b"b", b"c"]) == [1, 2]
    assert boundary_rows([b"a", b"b", b"c"], [True, True, True], [b"a", b"x", b"c"]) == [0, 1, -1]
    assert boundary_rows([b"a", b"b", b"c"], [True, True, True], [b"a", None, b"c"]) == [0, 1, -1]


@settings(max_examples=200, deadline=None)
@given(
    text=st.binary(min_size=1, max_size=30),
    student_cuts=st.sets(st.integers(1, 29)),
    teacher_cuts=st.sets(st.integers(1, 29)),
)
def test_a_student_position_has_a_row_exactly_where_both_segmentations_cut(text, student_cuts, teacher_cuts):
    """Any two segmentations of one byte string: the row of the student piece starting at offset o is the number
    of teacher pieces before o when the teacher cuts at o, else −1."""

    def pieces(cuts):
        edges = [0, *sorted(c for c in cuts if c < len(text)), len(text)]
        return [text[a:b] for a, b in zip(edges, edges[1:])], edges

    student, s_edges = pieces(student_cuts)
    teacher, t_edges = pieces(teacher_cuts)
    expected = [t_edges.index(o) if o in t_edges else -1 for o in s_edges[:-1]]
    assert boundary_rows(student, [True] * len(student), teacher) == expected


def test_a_sentencepiece_dummy_prefix_is_not_read_as_text():
    """A teacher that reads "The answer" as "▁The", "▁answer" still meets the student at every word."""
    text = b"The answer"
    spelled = without_dummy_prefix([b" The", b" answer"], text)
    assert spelled == [b"The", b" answer"]
    assert boundary_rows([b"The", b" answer"], [True, True], spelled) == [0, 1]
    assert without_dummy_prefix([b" The"], b" The") == [b" The"]  # a space the text holds stays


class _Tok:
    """A stand-in tokenizer: its tokens in id order (no backend: read as sentencepiece-style)."""

    def __init__(self, tokens, eos=None):
        self.tokens, self.eos_token_id = tokens, eos
        self.added_tokens_decoder = {}

    def get_vocab(self):
        return {t: i for i, t in enumerate(self.tokens)}


def test_space_markers_and_byte_tokens_map_by_their_bytes():
    sp = _Tok(["<eos>", "▁world", "wor", "<0xE4>", "▁", "ld"], eos=0)
    assert token_bytes(sp) == [b"<eos>", b" world", b"wor", b"\xe4", b" ", b"ld"]
    student = _Tok(["<|end|>", " world", "ld", "\xe4", "x"], eos=0)  # no byte alphabet: read as text
    m = map_tokens(student, sp)
    # " world" and "ld" map; the teacher's eos goes to the student's eos; "wor" and "▁" have no student token
    assert m.student_of == [0, 1, -1, -1, -1, 2]
    assert (m.mapped, m.covered) == (3, 3)


def test_byte_level_tokens_read_through_gpt2s_alphabet(tiny_tokenizer):
    table = token_bytes(tiny_tokenizer)
    vocab = tiny_tokenizer.get_vocab()
    assert table[vocab["Ġ"]] == b" "
    assert table[tiny_tokenizer.eos_token_id] == b"<|im_end|>"
    text = "Natalia sold 48 clips. 中文!"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert b"".join(table[i] for i in ids) == text.encode()


def test_aligned_topk_sums_the_mass_of_tokens_of_equal_bytes_and_caps_k():
    torch.manual_seed(0)
    logits = torch.randn(5, 6, dtype=torch.float64)
    token_map = TokenMap(student_of=[0, 1, 1, -1, 2, 3], student_vocab=4, mapped=5, covered=4)
    head = LMHead(weight=torch.eye(6, dtype=torch.float64))
    ids, logprobs, mass = aligned_topk(logits, head, token_map, k=10, temperature=2.0)
    p = torch.softmax(logits / 2.0, -1)
    expected = torch.stack([p[:, 0], p[:, 1] + p[:, 2], p[:, 4], p[:, 5]], -1)
    assert ids.shape == (5, 4)
    dense = torch.zeros(5, 4, dtype=torch.float32).scatter(-1, ids, logprobs.exp())
    torch.testing.assert_close(dense, expected.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(mass, (1 - p[:, 3]).float(), rtol=0, atol=1e-6)


def test_the_aligned_mass_counts_the_whole_teacher_vocabulary():
    """The mapped mass is the teacher's probability on every token with a student token, not only on the candidates
    the top-k is picked from: on a flat 3,000-token teacher whose first 100 tokens have no student token it is
    2,900 / 3,000, though only 1,024 candidates are ranked."""
    logits = torch.zeros(2, 3000)
    token_map = TokenMap(student_of=[-1] * 100 + [t % 50 for t in range(100, 3000)], student_vocab=50, mapped=2900,
                         covered=50)  # fmt: skip
    ids, logprobs, mass = aligned_topk(logits, LMHead(weight=torch.eye(3000)), token_map, k=2, temperature=2.0)
    torch.testing.assert_close(mass, torch.full((2,), 2900 / 3000), rtol=0, atol=1e-6)
    assert ids.shape == (2, 2)


def test_padding_rows_of_the_teacher_map_to_nothing():
    """A teacher whose lm_head has rows past its tokenizer's tokens (padding): those rows' mass is unmapped."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 5.0, 5.0]])  # rows 3 and 4: padding of large logits
    token_map = TokenMap(student_of=[0, 1, 2], student_vocab=3, mapped=3, covered=3)
    ids, logprobs, mass = aligned_topk(logits, LMHead(weight=torch.eye(5)), token_map, k=3)
    p = torch.softmax(logits, -1)[0]
    assert sorted(ids[0].tolist()) == [0, 1, 2]
    torch.testing.assert_close(mass, p[:3].sum()[None])
    torch.testing.assert_close(logprobs.exp().sum(), p[:3].sum())


@pytest.mark.parametrize("tail", ["student", "renormalize"])
def test_a_row_with_no_teacher_takes_the_students_own_distribution(tail):
    """Top-k rows of ids −1: Target-SFT there is DFT (γ = p(y), π̃ = sg p), KD's target is p (no gradient)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 3))
    ids = torch.full((2, 3, 4), MISSING_ID)
    logprobs = torch.full((2, 3, 4), float("-inf"), dtype=torch.float64)
    guided = target_loss(logits, labels, method="target_sft", eta=0.5, tail=tail, teacher_topk=(ids, logprobs))
    dft = target_loss(logits, labels, method="dft")
    torch.testing.assert_close(guided, dft)
    (grad_guided,) = torch.autograd.grad(guided, logits)
    (grad_dft,) = torch.autograd.grad(dft, logits)
    torch.testing.assert_close(grad_guided, grad_dft)
    kd = target_loss(logits, labels, method="kd", tail=tail, teacher_topk=(ids, logprobs))
    (grad_kd,) = torch.autograd.grad(kd, logits)
    assert grad_kd.abs().max() < 1e-12


def test_a_row_half_missing_is_refused():
    logits = torch.randn(1, 2, 7)
    ids = torch.tensor([[[MISSING_ID, 3], [1, 2]]])
    with pytest.raises(ValueError, match="outside \\[0, 7\\).*all its ids -1"):
        target_loss(logits, torch.tensor([[1, 2]]), method="kd", teacher_topk=(ids, torch.zeros(1, 2, 2) - 1.0))


# ------------------------------------------------------------------------------------------ exactness


def test_align_auto_refuses_another_tokenizer_naming_text(pair, tmp_path):
    with pytest.raises(ValueError, match="teacher.align: text"):
        train(_cfg(pair, tmp_path / "run", f"teacher.model={pair['permuted']}", "loss.params.eta=0.5"))


def _plain_and_permuted(pair, tmp_path, *extra, method="target_sft"):
    """Train with the teacher by ids and with its permuted self read through the text (k covering the vocabulary);
    assert the two students equal (1e-5)."""
    plain = train(_cfg(pair, tmp_path / "plain", f"teacher.model={pair['teacher']}", *extra, method=method))
    text = ("teacher.align=text", "teacher.align_top_k=1000")
    permuted = train(
        _cfg(pair, tmp_path / "permuted", f"teacher.model={pair['permuted']}", *text, *extra, method=method)
    )
    assert_same_weights(Path(plain["final_model"]), Path(permuted["final_model"]))


def test_a_permuted_teacher_read_through_the_text_trains_the_student_its_unpermuted_self_trains(pair, tmp_path):
    """Online: every student position aligns, every token maps one to one, k covers the vocabulary: the same
    student to 1e-5; the shares (1 and 1) are logged and in summary.json and the model card."""
    _plain_and_permuted(pair, tmp_path, "loss.params.eta=0.5")
    alignment = json.loads((tmp_path / "permuted" / "summary.json").read_text())["teacher_alignment"]
    assert alignment["aligned_positions"] == 1.0 and alignment["aligned_mass"] == pytest.approx(1.0, abs=1e-6)
    assert alignment["teacher_tokens_mapped"] == alignment["student_tokens_covered"] == alignment["student_tokens"]
    assert "teacher_aligned_positions" in (tmp_path / "permuted" / "metrics.csv").read_text()
    assert "Teacher alignment: by text; 100.0%" in (tmp_path / "permuted" / "final" / "README.md").read_text()


@pytest.mark.parametrize("method", ["kd", "hybrid_kd"])
def test_the_other_teacher_methods_align_the_same_way(pair, tmp_path, method):
    params = ["loss.params.temperature=2.0"] if method == "kd" else ["loss.params.lam=0.5"]
    _plain_and_permuted(pair, tmp_path, *params, method=method)


def test_a_teacher_that_segments_otherwise_trains_with_an_aligned_share_below_one(pair, tmp_path):
    """The student lacks the teacher's last 300 merges: inside a word the teacher keeps whole there is no teacher
    boundary (the student's own distribution stands in) and the whole word's mass maps to no student token."""
    extra = (f"model={pair['fine']}", f"teacher.model={pair['teacher']}", "teacher.align=text", "loss.params.eta=0.5")
    cfg = _cfg(pair, tmp_path / "run", *extra)
    student_tok = transformers.AutoTokenizer.from_pretrained(pair["fine"])
    aligner = TextAligner.build(student_tok, transformers.AutoTokenizer.from_pretrained(pair["teacher"]))
    assert aligner.token_map.covered == len(student_tok) < aligner.token_map.mapped + 300
    items, _ = build_dataset(cfg, student_tok, aligner=aligner)
    rows = [r for item in items for r in item["teacher_rows"]]
    assert 0 < rows.count(MISSING_ID) < len(rows) / 2  # some positions fall back to the student, most align
    summary = train(cfg)
    alignment = summary["teacher_alignment"]
    assert 0.5 < alignment["aligned_positions"] < 1.0
    assert 0.0 < alignment["aligned_mass"] < 1.0
    metrics = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    losses = [
        float(row.split(",")[header.index("loss")]) for row in metrics[1:] if row.split(",")[header.index("loss")]
    ]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_target_sft_train_refuses_a_teacher_that_meets_too_few_tokens(pair, tmp_path):
    """The same pair under ``teacher.min_aligned_share: 1.0``: refused before training, with the share and the key;
    the command line says so in one line (exit status 2)."""
    from targetsft.cli.main import main
    from targetsft.runtime.inputs import InputError
    from targetsft.training.config import ConfigError

    extra = (f"model={pair['fine']}", f"teacher.model={pair['teacher']}", "teacher.align=text", "loss.params.eta=0.5")
    with pytest.raises(InputError, match=r"at only \d+\.\d% .* lower teacher.min_aligned_share"):
        train(_cfg(pair, tmp_path / "run", *extra, "teacher.min_aligned_share=1.0"))
    assert not (tmp_path / "run" / "metrics.csv").exists()
    overrides = [f"output_dir={tmp_path / 'cli'}", "data.size=8", "precision=fp32", *extra]
    assert main(["train", *overrides, "teacher.min_aligned_share=1.0"]) == 2
    with pytest.raises(ConfigError, match="teacher.min_aligned_share must be a fraction"):
        _cfg(pair, tmp_path / "x", *extra, "teacher.min_aligned_share=2")


def test_a_permuted_teachers_cache_trains_the_student_its_unpermuted_self_trains(pair, tmp_path, tiny_tokenizer):
    """From a cache: rows stored on the student's ids; the permuted teacher's cache trains the student the
    unpermuted teacher's cache trains (1e-5); its identity holds both tokenizers; the manifest records the shares."""
    finals = []
    for name, extra in (("teacher", []), ("permuted", ["teacher.align=text"])):
        cache = tmp_path / f"cache-{name}"
        cfg = _cfg(pair, tmp_path / f"run-{name}", f"teacher.cache={cache}", "loss.params.eta=0.5", *extra)
        cache_teacher(cfg, cache, teacher=str(pair[name]), k=len(tiny_tokenizer), batch_size=4)
        finals.append(Path(train(cfg)["final_model"]))
    assert_same_weights(*finals)
    manifest = json.loads((tmp_path / "cache-permuted" / "manifest.json").read_text())
    assert (
        manifest["align"] == "text" and manifest["teacher_tokenizer_fingerprint"] != manifest["tokenizer_fingerprint"]
    )
    assert manifest["alignment"]["aligned_positions"] == 1.0
    assert manifest["alignment"]["aligned_mass"] == pytest.approx(1.0, abs=1e-6)
    summary = json.loads((tmp_path / "run-permuted" / "summary.json").read_text())
    assert summary["teacher_alignment"]["aligned_positions"] == 1.0
    assert "align" not in json.loads((tmp_path / "cache-teacher" / "manifest.json").read_text())


def test_a_cache_of_a_teacher_that_segments_otherwise_holds_rows_without_a_teacher(pair, tmp_path):
    cache = tmp_path / "cache"
    extra = (f"model={pair['fine']}", f"teacher.cache={cache}", "teacher.align=text", "loss.params.eta=0.5")
    cfg = _cfg(pair, tmp_path / "run", *extra)
    cache_teacher(cfg, cache, teacher=str(pair["teacher"]), k=8, batch_size=4)
    opened = TeacherCache.open(cache)
    ids, logprobs = opened.rows(list(range(len(opened))))
    missing = (ids == MISSING_ID).all(-1)
    assert 0 < int(missing.sum()) < ids.shape[0] / 2
    assert bool((ids[~missing] >= 0).all()) and bool(torch.isinf(logprobs[missing]).all())
    alignment = opened.alignment
    assert alignment["aligned_positions"] == pytest.approx(1 - float(missing.float().mean()))
    assert 0.0 < alignment["aligned_mass"] < 1.0
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["teacher_alignment"] == alignment


def test_target_sft_trainer_reads_a_permuted_teacher_through_the_text(pair, tiny_tokenizer, tmp_path):
    """TRL's trainer builds the teacher's text per batch: the permuted teacher's gradients equal the unpermuted
    teacher's (its vocabulary covered: align_top_k ≥ V)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from targetsft.training.trl_trainer import TargetSFTTrainer

    grads = []
    for name, align in (("teacher", "auto"), ("permuted", "text")):
        g, trainer = trl_batch_grads(
            pair["student"], tiny_tokenizer, tmp_path / name, pair[name], teacher_align=align, align_top_k=1000
        )
        grads.append(g)
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=0, atol=1e-7)
    assert trainer.teacher_alignment.take_shares() == {"aligned_positions": 1.0, "aligned_mass": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="teacher.align: text"):
        TargetSFTTrainer(
            model=transformers.AutoModelForCausalLM.from_pretrained(pair["student"]),
            args=trl.SFTConfig(str(tmp_path / "x"), report_to=[], use_cpu=True, max_length=None, bf16=False),
            train_dataset=Dataset.from_list(SUM_ROWS),
            processing_class=tiny_tokenizer,
            method="kd",
            teacher_model=transformers.AutoModelForCausalLM.from_pretrained(pair["permuted"]),
        )


def test_packed_batches_read_the_teacher_through_the_text_as_padded_ones(pair, tmp_path):
    """data.packing: the teacher's sequences are padded apart and its rows keep the loss's order: the permuted
    teacher packed trains the student the unpermuted teacher trains packed."""
    _plain_and_permuted(pair, tmp_path, "data.packing=true", "loss.params.eta=0.5")


@pytest.mark.parametrize(
    ("override", "message"),
    [("teacher.align=chars", "teacher.align must be one of"), ("teacher.align_top_k=0", "align_top_k must be")],
)
def test_bad_alignment_settings_are_refused_by_name(pair, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        _cfg(pair, tmp_path / "run", f"teacher.model={pair['teacher']}", "loss.params.eta=0.5", override)


@pytest.mark.parametrize("prompt", ["own_template", "answer_hint"])
def test_a_teacher_read_through_the_text_takes_a_prompt_of_its_own(pair, tmp_path, prompt):
    """teacher.prompt own_template (rendered by the teacher's tokenizer) and answer_hint (the student's rendering,
    read as text): the permuted teacher still trains the student its unpermuted self trains."""
    _plain_and_permuted(pair, tmp_path, f"teacher.prompt={prompt}", "loss.params.eta=0.5")


def test_target_sft_trainer_refuses_a_teacher_that_meets_too_few_tokens(pair, tmp_path):
    """The share of supervised tokens with a teacher boundary is measured at construction on the first training
    examples: a finer student meets the coarser teacher at a share in (0.5, 1), accepted at the default minimum of
    0.5 and refused, with the share, when the minimum is 1."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from targetsft.training.trl_trainer import TargetSFTTrainer

    fine_tok = transformers.AutoTokenizer.from_pretrained(pair["fine"])

    def build(least):
        return TargetSFTTrainer(
            model=transformers.AutoModelForCausalLM.from_pretrained(pair["fine"]),
            args=trl.SFTConfig(str(tmp_path / "x"), report_to=[], use_cpu=True, max_length=None, bf16=False),
            train_dataset=Dataset.from_list(SUM_ROWS),
            processing_class=fine_tok,
            method="target_sft",
            teacher_model=transformers.AutoModelForCausalLM.from_pretrained(pair["teacher"]),
            teacher_align="text",
            min_aligned_share=least,
        )

    build(0.5)
    with pytest.raises(ValueError, match=r"at only \d+\.\d% of the supervised positions .* lower min_aligned_share"):
        build(1.0)
