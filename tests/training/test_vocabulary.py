"""Teachers whose lm_head has another number of rows than the student's, over one shared tokenizer: the loss keeps
the shared tokens' columns and renormalises them (logits and fused paths), and tokenizers are compared by their
token → id maps (special tokens and chat templates may differ)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import targetsft
from targetsft.training.vocabulary import align_by_rows, align_vocabularies, check_token_maps

NEG_INF = float("-inf")


def _case(n=6, vocab=10, shared=8, width=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, shared, (n,), generator=g)
    teacher = torch.randn(n, width, generator=g, dtype=torch.float64) * 2
    return logits, labels, teacher


def _pi_teacher(teacher, shared, vocab):
    """The teacher on the student's columns by hand: softmax over its first ``shared`` logits, zero elsewhere."""
    out = torch.zeros(teacher.shape[0], vocab, dtype=teacher.dtype)
    out[:, :shared] = torch.softmax(teacher[:, :shared], -1)
    return out


def _expected_q(method, logits, labels, pi_t, eta=0.5, lam=0.5):
    """Q of the teacher methods written out from their definitions (independent of the library's kernels)."""
    p = torch.softmax(logits, -1)
    onehot = torch.nn.functional.one_hot(labels, logits.shape[-1]).to(p.dtype)
    p_y = (p * onehot).sum(-1, keepdim=True)
    if method == "kd":
        return pi_t
    if method == "hybrid_kd":
        return (1 - lam) * onehot + lam * pi_t
    guided = p ** (1 - eta) * pi_t**eta
    guided = guided / guided.sum(-1, keepdim=True)
    return p_y * onehot + (1 - p_y) * guided  # target_sft


@pytest.mark.parametrize(("method", "params"), [("kd", {}), ("hybrid_kd", {"lam": 0.5}), ("target_sft", {"eta": 0.5})])
@pytest.mark.parametrize(("vocab", "shared", "width"), [(10, 8, 13), (10, 10, 16), (12, 8, 8), (10, 8, 10)])
def test_a_teacher_of_another_width_is_its_renormalised_shared_slice(method, params, vocab, shared, width):
    """Loss and logit gradient against Q built by hand from softmax(z_T[:shared]): padding rows on either side (the
    teacher's past ``shared``, the student's own past ``shared``) get no teacher mass; ∂ℓ/∂z = (p − Q)/n."""
    logits, labels, teacher = _case(vocab=vocab, shared=shared, width=width)
    z = logits.clone().requires_grad_(True)
    loss = targetsft.target_loss(z, labels, method=method, teacher_logits=teacher, shared_vocab_size=shared, **params)
    loss.backward()
    q = _expected_q(method, logits, labels, _pi_teacher(teacher, shared, vocab), **params)
    if method == "target_sft":
        assert torch.all(q[:, shared:] == 0) or shared == vocab
    logp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(loss, -(q * logp).sum(-1).mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z.grad, (torch.softmax(logits, -1) - q) / len(labels), rtol=1e-10, atol=1e-12)
    dense = targetsft.build_target(
        logits, labels, method=method, teacher_logits=teacher, shared_vocab_size=shared, **params
    )
    torch.testing.assert_close(dense, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["kd", "target_sft", "guided_kd"])
def test_fused_with_a_padded_teacher_head_equals_the_unpadded_teacher(method):
    """The same teacher with 128 rows of random padding appended: the fused loss and its gradients are those of the
    unpadded teacher (to 1e-12 in float64), and those of the logits path."""
    torch.manual_seed(0)
    n, hidden, vocab = 20, 8, 24
    h = torch.randn(n, hidden, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hidden, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (n,))
    labels[:3] = -100
    t_h = torch.randn(n, hidden + 4, dtype=torch.float64)
    t_w = torch.randn(vocab, hidden + 4, dtype=torch.float64)
    t_w_padded = torch.cat([t_w, torch.randn(128, hidden + 4, dtype=torch.float64) * 5])
    params = {} if method == "kd" else {"eta": 0.7}
    results = []
    for teacher_w, shared in ((t_w, None), (t_w_padded, vocab)):
        h.grad = w.grad = None
        loss = targetsft.fused_target_loss(
            h,
            w,
            labels,
            method=method,
            teacher_hidden=t_h,
            teacher_lm_head_weight=teacher_w,
            shared_vocab_size=shared,
            chunk_size=7,
            **params,
        )
        loss.backward()
        results.append((loss.detach(), h.grad.clone(), w.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    z = (h @ w.t()).detach()
    logits_loss = targetsft.target_loss(
        z, labels, method=method, teacher_logits=t_h @ t_w_padded.t(), shared_vocab_size=vocab, **params
    )
    torch.testing.assert_close(logits_loss, results[0][0], rtol=1e-12, atol=1e-12)


def test_fused_with_student_padding_rows_equals_the_logits_path():
    """A student with padding rows past the shared vocabulary and a narrower teacher (the shared rows only): fused
    == logits path, and no teacher mass lands on the student's padding rows (Q there is γ-free: (1 − γ)·0)."""
    torch.manual_seed(1)
    n, hidden, vocab, shared = 16, 8, 20, 15
    h = torch.randn(n, hidden, dtype=torch.float64)
    w = torch.randn(vocab, hidden, dtype=torch.float64)
    labels = torch.randint(0, shared, (n,))
    t_h, t_w = torch.randn(n, hidden, dtype=torch.float64), torch.randn(shared, hidden, dtype=torch.float64)
    kw = {"method": "target_sft", "eta": 1.0, "shared_vocab_size": shared}
    fused = targetsft.fused_target_loss(
        h, w, labels, teacher_hidden=t_h, teacher_lm_head_weight=t_w, chunk_size=5, **kw
    )
    z = (h @ w.t()).requires_grad_(True)
    plain = targetsft.target_loss(z, labels, teacher_logits=t_h @ t_w.t(), **kw)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    q = targetsft.build_target(z.detach(), labels, teacher_logits=t_h @ t_w.t(), **kw)
    assert torch.all(q[:, shared:] == 0)
    torch.testing.assert_close(q.sum(-1), torch.ones(n, dtype=torch.float64))


@settings(max_examples=30, deadline=None)
@given(
    vocab=st.integers(2, 40),
    data=st.data(),
    eta=st.floats(0.05, 1.0),
)
def test_property_padding_is_never_mass_and_q_is_a_distribution(vocab, data, eta):
    shared = data.draw(st.integers(1, vocab))
    width = data.draw(st.integers(shared, shared + 30))
    logits, labels, teacher = _case(n=5, vocab=vocab, shared=shared, width=width, seed=data.draw(st.integers(0, 99)))
    q = targetsft.build_target(
        logits, labels, method="target_sft", eta=eta, teacher_logits=teacher, shared_vocab_size=shared
    )
    torch.testing.assert_close(q.sum(-1), torch.ones(5, dtype=torch.float64))
    assert torch.all(q >= 0) and torch.all(q[:, shared:] == 0)
    # the teacher's padding logits do not matter at all
    teacher[:, shared:] = torch.randn(5, width - shared, dtype=torch.float64) * 50
    again = targetsft.build_target(
        logits, labels, method="target_sft", eta=eta, teacher_logits=teacher, shared_vocab_size=shared
    )
    torch.testing.assert_close(q, again, rtol=0, atol=0)


def test_widths_and_ids_are_checked():
    logits, labels, teacher = _case(vocab=10, shared=8, width=13)
    with pytest.raises(ValueError, match="shared_vocab_size=len\\(tokenizer\\)"):
        targetsft.target_loss(logits, labels, method="kd", teacher_logits=teacher)
    with pytest.raises(ValueError, match="less than the 8 tokens"):
        targetsft.target_loss(logits, labels, method="kd", teacher_logits=teacher[:, :6], shared_vocab_size=8)
    with pytest.raises(ValueError, match="shared_vocab_size must lie in"):
        targetsft.target_loss(logits, labels, method="kd", teacher_logits=teacher, shared_vocab_size=11)
    ids = torch.tensor([[0, 9]] * 6)
    lps = torch.log(torch.tensor([[0.5, 0.3]] * 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="outside \\[0, 8\\)"):
        targetsft.target_loss(logits, labels, method="kd", teacher_topk=(ids, lps), shared_vocab_size=8)
    h, w = torch.randn(6, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="teacher_lm_head_weight has vocabulary width 13"):
        targetsft.fused_target_loss(
            h, w, labels, method="kd", teacher_hidden=h, teacher_lm_head_weight=torch.randn(13, 4)
        )


# ------------------------------------------------------------------------------------------- tokenizer maps


class _Tok:
    """A tokenizer as far as the alignment reads one: its map, special tokens and chat template."""

    def __init__(self, tokens, eos="</s>", template="T"):
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.special_tokens_map = {"eos_token": eos}
        self.chat_template = template

    def get_vocab(self):
        return dict(self.vocab)


TOKENS = ["<s>", "</s>", "a", "b", "ab", "<|eot|>"]


def test_same_tokenizer_same_rows_is_the_same_vocabulary():
    a = align_vocabularies(_Tok(TOKENS), _Tok(TOKENS), student_rows=6, other_rows=6)
    assert a.same and a.shared == 6 and a.note("teacher").endswith("the student's tokenizer and vocabulary")


def test_other_eos_template_and_padding_are_accepted_and_said():
    a = align_vocabularies(
        _Tok(TOKENS), _Tok(TOKENS, eos="<|eot|>", template="U"), student_rows=8, other_rows=16, role="teacher"
    )
    assert not a.same and a.shared == 6
    note = a.note("teacher")
    assert "eos_token '<|eot|>' (student '</s>')" in note and "chat template" in note
    assert "embedding rows 16 (10 past the shared tokens; student 8, 2 past them)" in note
    assert a.to_dict()["shared_vocab_size"] == 6


def test_a_token_with_another_id_is_refused_by_name():
    swapped = ["<s>", "</s>", "b", "a", "ab", "<|eot|>"]
    with pytest.raises(ValueError, match="gives id 2 to 'b', the student's to 'a'.*teacher.align: text"):
        check_token_maps(_Tok(TOKENS), _Tok(swapped))


def test_tokens_only_the_teacher_has_are_dropped_tokens_only_the_student_has_refused():
    a = align_vocabularies(_Tok(TOKENS), _Tok([*TOKENS, "new"]), student_rows=6, other_rows=8)
    assert a.shared == 6 and a.other_only_tokens == 1 and "1 tokens only the teacher has" in a.note("teacher")
    with pytest.raises(ValueError, match="token 'new' \\(id 6\\) is not in the teacher's vocabulary"):
        check_token_maps(_Tok([*TOKENS, "new"]), _Tok(TOKENS))
    with pytest.raises(ValueError, match="lm_head 5 rows"):
        align_vocabularies(_Tok(TOKENS), _Tok(TOKENS), student_rows=6, other_rows=5)


def test_without_tokenizers_rows_must_agree():
    assert align_by_rows(10, 10).shared == 10
    with pytest.raises(ValueError, match="give both tokenizers"):
        align_by_rows(10, 12)


def test_vllm_rows_lose_their_unshared_ids_by_construction():
    """vLLM ranks the teacher's whole vocabulary: an id at or past the shared vocabulary (padding) becomes an unused
    shared id at -inf, and the kept log-probs are renormalised by the mass the row shows on shared ids."""
    from targetsft.training.topk_rows import drop_unshared

    ids = torch.tensor([[5, 9, 2, 0], [1, 2, 3, 4]])
    lps = torch.log(torch.tensor([[0.5, 0.2, 0.1, 0.05], [0.4, 0.3, 0.2, 0.1]]))
    out_ids, out_lps = drop_unshared(ids.clone(), lps.clone(), shared=8)
    assert out_ids.dtype == torch.int32
    assert out_ids.tolist() == [[5, 1, 2, 0], [1, 2, 3, 4]]  # 1: the smallest id the row does not use
    expected = torch.log(torch.tensor([0.5, 0.0, 0.1, 0.05]) / 0.8)
    torch.testing.assert_close(out_lps[0], expected)
    torch.testing.assert_close(out_lps[1], lps[1])
    logits = torch.randn(3, 8)
    targetsft.target_loss(
        logits, torch.tensor([0, 1, 2]), method="kd", teacher_topk=(out_ids[:1].expand(3, 4), out_lps[:1].expand(3, 4))
    )


def test_vllm_prompt_logprobs_of_a_padded_teacher_become_shared_rows():
    """The vLLM cache path end to end on an engine stand-in that returns known rows: each example's positions are
    taken in order and a padding id in a row is dropped as above."""
    import numpy as np

    from targetsft.training.teacher_cache.build import _teacher_topk_vllm
    from targetsft.training.teacher_cache.storage import _TeacherInput

    class Engine:
        def prompt_logprobs(self, prompts, k):
            # row p of prompt i: ids (10·i + p, 99 if p is odd), log-probs log(0.6), log(0.3)
            rows = [
                [([10 * i + p, 99 if p % 2 else 7], [np.log(0.6), np.log(0.3)]) for p in range(len(ids))]
                for i, ids in enumerate(prompts)
            ]
            return rows

    batch = [_TeacherInput(np.arange(4), np.array([1, 2])), _TeacherInput(np.arange(3), np.array([0]))]
    ids, lps = _teacher_topk_vllm(Engine(), batch, 2, shared=50)
    assert ids.tolist() == [[1, 0], [2, 7], [10, 7]]  # prompt 0 at positions 1, 2; prompt 1 at position 0
    torch.testing.assert_close(lps[0], torch.log(torch.tensor([0.6 / 0.7, 0.0])))  # 99 dropped: mass 0.3 gone
    torch.testing.assert_close(lps[1:], torch.log(torch.tensor([[0.6, 0.3], [0.6, 0.3]])))
