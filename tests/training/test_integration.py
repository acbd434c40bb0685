"""The fused loss on transformers models equals the loss on the model's own logits (plain, PEFT, patched)."""

import pytest
import torch

import targetsft
from targetsft.training.fused_forward import FusedForward, causal_lm_target_loss, lm_head, project, shift_labels

transformers = pytest.importorskip("transformers")
from conftest import tiny_model  # noqa: E402


def _tiny(seed, tie=True, vocab=53):
    return tiny_model("llama", vocab, seed, num_key_value_heads=2, tie_word_embeddings=tie).double()


def _batch(vocab=53):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    labels[2, -3:] = -100
    return ids, labels, mask


def _naive(model, ids, labels, mask, method="sft", teacher=None, **kw):
    logits = model(input_ids=ids, attention_mask=mask).logits
    extra = {}
    if teacher is not None:
        with torch.no_grad():
            extra["teacher_logits"] = teacher(input_ids=ids, attention_mask=mask).logits
    return targetsft.target_loss(logits, shift_labels(labels), method=method, **extra, **kw)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("method, kw", [("sft", {}), ("dft", {}), ("target_sft", {"eta": 0.4})])
def test_model_loss_and_gradients_equal_naive(tie, method, kw):
    model, teacher = _tiny(0, tie), _tiny(1, tie)
    ids, labels, mask = _batch()
    use_teacher = teacher if method == "target_sft" else None
    fused = causal_lm_target_loss(
        model, ids, labels, attention_mask=mask, method=method, teacher_model=use_teacher, **kw
    )
    naive = _naive(model, ids, labels, mask, method, use_teacher, **kw)
    params = list(model.parameters())
    assert torch.allclose(fused, naive, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fused, params), torch.autograd.grad(naive, params)):
        assert torch.allclose(a, b, atol=1e-11)


def test_peft_lora_including_lm_head():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        _tiny(2, tie=False),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False),
    )
    ids, labels, mask = _batch()
    fused = causal_lm_target_loss(model, ids, labels, attention_mask=mask, method="dft")
    naive = _naive(model, ids, labels, mask, "dft")
    params = [p for p in model.parameters() if p.requires_grad]
    assert torch.allclose(fused, naive, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fused, params), torch.autograd.grad(naive, params)):
        assert torch.allclose(a, b, atol=1e-11)


def test_privileged_teacher_prompt_aligns_supervised_tokens():
    """A teacher that sees a longer prompt gives the same loss as one fed the student's prompt when the
    extra context is invisible to it (here: the same model with a different prompt; rows must align)."""
    model, teacher = _tiny(3), _tiny(4)
    ids, labels, mask = _batch()
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :5] = -100
    prefix = torch.randint(0, 53, (3, 4))
    t_ids = torch.cat([prefix, ids], 1)
    t_labels = torch.cat([torch.full_like(prefix, -100), labels], 1)
    fused = causal_lm_target_loss(
        model,
        ids,
        labels,
        attention_mask=mask,
        method="kd",
        teacher_model=teacher,
        teacher_input_ids=t_ids,
        teacher_labels=t_labels,
        teacher_attention_mask=torch.ones_like(t_ids),
    )
    with torch.no_grad():
        t_logits = teacher(input_ids=t_ids).logits[:, 4:]
    naive = targetsft.target_loss(
        model(input_ids=ids).logits, shift_labels(labels), method="kd", teacher_logits=t_logits
    )
    assert torch.allclose(fused, naive, atol=1e-12)
    bad = t_labels.clone()
    bad[0, -1] = (bad[0, -1] + 1) % 53
    with pytest.raises(ValueError, match="supervised tokens differ"):
        causal_lm_target_loss(
            model, ids, labels, method="kd", teacher_model=teacher, teacher_input_ids=t_ids, teacher_labels=bad
        )


def test_fused_forward_is_active_only_inside_its_block():
    """Inside ``active()`` a call with target_loss_kwargs gives the fused loss (no logits; with return_logits the
    model's own logits); a call without them, and every call outside the block, is the model's own forward."""
    model = _tiny(5)
    ids, labels, mask = _batch()
    expected = _naive(model, ids, labels, mask, "dft")
    model.train()
    own = model(input_ids=ids, attention_mask=mask, labels=labels)
    fused = FusedForward(model, method="dft")
    with fused.active():
        out = model(input_ids=ids, attention_mask=mask, labels=labels, target_loss_kwargs={})
        assert out.logits is None
        assert torch.allclose(out.loss, expected, atol=1e-12)
        with_logits = model(input_ids=ids, attention_mask=mask, labels=labels, target_loss_kwargs={"return_logits": 1})
        torch.testing.assert_close(with_logits.logits, own.logits, rtol=0, atol=1e-12)
        plain = model(input_ids=ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(plain.loss, own.loss, rtol=0, atol=0)
    assert "forward" not in model.__dict__
    after = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert after.logits is not None and torch.equal(after.loss, own.loss)


def test_project_applies_the_models_logit_transforms():
    model = _tiny(7)
    model.config.final_logit_softcapping = 3.0
    model.config.logit_scale = 0.5
    h = torch.randn(2, 3, model.config.hidden_size, dtype=torch.float64)
    z = h @ model.lm_head.weight.t()
    torch.testing.assert_close(project(lm_head(model), h), 3.0 * torch.tanh(0.5 * z / 3.0))


def test_lm_head_reads_logit_transforms_from_config():
    model = _tiny(6)
    model.config.final_logit_softcapping = 30.0
    model.config.logit_scale = 0.5
    head = lm_head(model)
    assert head.softcap == 30.0 and head.logit_scale == 0.5
    assert head.weight is model.get_output_embeddings().weight


def test_the_forward_reads_every_teacher_one_way():
    """The fused forward asks no teacher its kind: it imports no teacher module (no import circle with
    text_alignment), and a teacher of its own making gives the same loss as the keyword that builds it."""
    import ast
    import inspect

    from targetsft.training import fused_forward
    from targetsft.training.fused_forward import ModelTeacher, RowsTeacher, target_loss_on_hidden

    imported = {
        node.module
        for node in ast.walk(ast.parse(inspect.getsource(fused_forward)))
        if isinstance(node, ast.ImportFrom)
    }
    assert not {m for m in imported if m and "text_alignment" in m}
    body = inspect.getsource(target_loss_on_hidden)
    assert "isinstance" not in body and "teacher_alignment" not in body
    model, teacher = _tiny(8), _tiny(9)
    ids, labels, mask = _batch()
    by_keyword = causal_lm_target_loss(model, ids, labels, attention_mask=mask, method="kd", teacher_model=teacher)
    by_object = causal_lm_target_loss(
        model, ids, labels, attention_mask=mask, method="kd", teacher=ModelTeacher(teacher)
    )
    assert torch.equal(by_keyword, by_object)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits
    flat = shift_labels(labels)
    top = torch.log_softmax(t_logits, -1)[flat != -100].topk(53, -1)
    rows = RowsTeacher(targetsft.TopK(top.indices, top.values))
    by_rows = causal_lm_target_loss(model, ids, labels, attention_mask=mask, method="kd", teacher=rows)
    assert torch.allclose(by_rows, by_keyword, atol=1e-10)
