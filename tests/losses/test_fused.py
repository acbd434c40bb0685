"""The fused lm_head + loss equals ``target_loss(h·Wᵀ + b, ...)`` in loss and in all gradients."""

import pytest
import torch

import targetsft
from targetsft.losses.fused import auto_chunk_size, fused_target_loss

H, V, TH = 24, 61, 16


def _inputs(lead=(41,), dtype=torch.float32, seed=0, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*lead, H, generator=g) * 0.8).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_(True)
    bias = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, lead, generator=g)
    labels.view(-1)[::ignore_every] = -100
    t_hidden = torch.randn(*lead, TH, generator=g).to(dtype)
    t_weight = (torch.randn(V, TH, generator=g) * 0.7).to(dtype)
    weights = torch.rand(lead, generator=g).round().to(dtype)
    return hidden, weight, bias, labels, t_hidden, t_weight, weights


def _side(spec, t_hidden, t_weight, weights, logit_fn):
    """Keyword arguments for the naive and the fused call of one method."""
    naive, fused = {}, {}
    if "teacher" in spec.needs:
        naive["teacher_logits"] = logit_fn(t_hidden, t_weight)
        fused.update(teacher_hidden=t_hidden, teacher_lm_head_weight=t_weight)
    if "ref" in spec.needs:
        naive["ref_logits"] = logit_fn(t_hidden, t_weight)
        fused.update(ref_hidden=t_hidden, ref_lm_head_weight=t_weight)
    if "token_weights" in spec.needs:
        naive["token_weights"] = fused["token_weights"] = weights
    return naive, fused


def _grads(loss, tensors, upstream):
    return torch.autograd.grad((loss * upstream).sum(), tensors)


@pytest.mark.parametrize("method", list(targetsft.METHODS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_equals_naive_every_method(method, reduction):
    """Loss and the gradients for hidden, weight and bias agree to 1e-5 in float32, chunk 7 (N not divisible)."""
    hidden, weight, bias, labels, t_hidden, t_weight, weights = _inputs()
    spec = targetsft.METHODS[method]
    naive_kw, fused_kw = _side(spec, t_hidden, t_weight, weights, lambda h, w: h @ w.T)
    logits = hidden @ weight.T + bias
    ref = targetsft.target_loss(logits, labels, method=method, reduction=reduction, **naive_kw)
    out = fused_target_loss(
        hidden, weight, labels, method=method, lm_head_bias=bias, reduction=reduction, chunk_size=7, **fused_kw
    )
    upstream = torch.rand_like(ref) + 0.5
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(_grads(out, [hidden, weight, bias], upstream), _grads(ref, [hidden, weight, bias], upstream)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["sft", "dft", "label_smoothing", "kd", "target_sft", "hybrid_kd"])
@pytest.mark.parametrize("chunk", [1, 3, 8, 1000, None])
def test_fused_topk_teacher_and_chunks_float64(method, chunk):
    """Top-k teacher rows, any chunk size, 3-D inputs: equal to the naive path to 1e-10 in float64."""
    hidden, weight, _, labels, t_hidden, t_weight, _ = _inputs(lead=(3, 9), dtype=torch.float64, seed=1)
    spec = targetsft.METHODS[method]
    kw = {}
    if "teacher" in spec.needs:
        top = torch.log_softmax(t_hidden @ t_weight.T, -1).topk(5, -1)
        kw["teacher_topk"] = (top.indices, top.values)
    ref = targetsft.target_loss(hidden @ weight.T, labels, method=method, **kw)
    out = fused_target_loss(hidden, weight, labels, method=method, chunk_size=chunk, **kw)
    assert torch.allclose(out, ref, atol=1e-10)
    for a, b in zip(torch.autograd.grad(out, [hidden, weight]), torch.autograd.grad(ref, [hidden, weight])):
        assert torch.allclose(a, b, atol=1e-10)


def test_compact_topk_rows_equal_per_position_rows():
    """teacher_topk may be given per position [B, T, k] or only for loss tokens [n, k], in label order."""
    hidden, weight, _, labels, t_hidden, t_weight, _ = _inputs(lead=(2, 7), dtype=torch.float64, seed=2)
    top = torch.log_softmax(t_hidden @ t_weight.T, -1).topk(4, -1)
    keep = labels != -100
    full = fused_target_loss(hidden, weight, labels, method="target_sft", teacher_topk=(top.indices, top.values))
    compact = fused_target_loss(
        hidden, weight, labels, method="target_sft", teacher_topk=(top.indices[keep], top.values[keep])
    )
    assert torch.allclose(full, compact, atol=1e-12)


@pytest.mark.parametrize("method", ["sft", "dft", "target_sft", "kd"])
def test_softcap_and_logit_scale(method):
    """Gemma-style soft-capping and logit scaling equal the naive loss on transformed logits (teacher too)."""
    hidden, weight, bias, labels, t_hidden, t_weight, weights = _inputs(dtype=torch.float64, seed=3)
    scale, cap = 1.7, 4.0

    def logit_fn(h, w, b=None):
        z = h @ w.T + (0 if b is None else b)
        return cap * torch.tanh(scale * z / cap)

    spec = targetsft.METHODS[method]
    naive_kw, fused_kw = _side(spec, t_hidden, t_weight, weights, logit_fn)
    ref = targetsft.target_loss(logit_fn(hidden, weight, bias), labels, method=method, **naive_kw)
    out = fused_target_loss(
        hidden,
        weight,
        labels,
        method=method,
        lm_head_bias=bias,
        logit_scale=scale,
        softcap=cap,
        chunk_size=5,
        **fused_kw,
    )
    assert torch.allclose(out, ref, atol=1e-10)
    for a, b in zip(torch.autograd.grad(out, [hidden, weight, bias]), torch.autograd.grad(ref, [hidden, weight, bias])):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("method", ["sft", "target_sft"])
def test_bf16_inputs(method):
    """bf16 hidden and weights: float32 loss, gradients in the input dtype, close to the float32 computation."""
    hidden, weight, _, labels, t_hidden, t_weight, _ = _inputs(seed=4)
    kw32, kw16 = {}, {}
    if method == "target_sft":
        kw32 = dict(teacher_hidden=t_hidden, teacher_lm_head_weight=t_weight)
        kw16 = dict(teacher_hidden=t_hidden.bfloat16(), teacher_lm_head_weight=t_weight.bfloat16())
    h16 = hidden.detach().bfloat16().requires_grad_(True)
    w16 = weight.detach().bfloat16().requires_grad_(True)
    out16 = fused_target_loss(h16, w16, labels, method=method, chunk_size=8, **kw16)
    ref = fused_target_loss(hidden, weight, labels, method=method, chunk_size=8, **kw32)
    assert out16.dtype == torch.float32
    assert torch.allclose(out16, ref, rtol=2e-2, atol=2e-2)
    g16 = torch.autograd.grad(out16, [h16, w16])
    g32 = torch.autograd.grad(ref, [hidden, weight])
    for a, b in zip(g16, g32):
        assert a.dtype == torch.bfloat16
        assert (a.float() - b).abs().max() <= 0.05 * b.abs().max() + 1e-3


def test_tied_head_gets_both_gradients():
    """A tied lm_head (weight = embedding) accumulates the fused gradient onto the shared parameter."""
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (13,), generator=g)
    labels = torch.randint(0, V, (13,), generator=g)
    hidden = torch.tanh(emb[ids] * 1.3)  # hidden depends on the same weight
    ref = targetsft.target_loss(hidden @ emb.T, labels)
    (g_ref,) = torch.autograd.grad(ref, emb)
    hidden = torch.tanh(emb[ids] * 1.3)
    (g_fused,) = torch.autograd.grad(fused_target_loss(hidden, emb, labels, chunk_size=4), emb)
    assert torch.allclose(g_ref, g_fused, atol=1e-12)


def test_frozen_weight_and_hidden_only_gradients():
    """A frozen head (LoRA) gets no gradient computed and the hidden gradient is still exact."""
    hidden, weight, _, labels, *_ = _inputs(dtype=torch.float64, seed=6)
    frozen = weight.detach()
    out = fused_target_loss(hidden, frozen, labels, method="dft", chunk_size=6)
    ref = targetsft.target_loss(hidden @ frozen.T, labels, method="dft")
    assert torch.allclose(torch.autograd.grad(out, hidden)[0], torch.autograd.grad(ref, hidden)[0], atol=1e-12)


def test_num_items_in_batch_and_stats():
    """num_items_in_batch divides the sum; stats equal the naive path's stats."""
    hidden, weight, _, labels, t_hidden, t_weight, _ = _inputs(dtype=torch.float64, seed=7)
    kw = dict(method="target_sft", eta=0.3, return_stats=True)
    out, stats = fused_target_loss(
        hidden,
        weight,
        labels,
        num_items_in_batch=100,
        teacher_hidden=t_hidden,
        teacher_lm_head_weight=t_weight,
        chunk_size=9,
        **kw,
    )
    ref, ref_stats = targetsft.target_loss(
        hidden @ weight.T, labels, num_items_in_batch=100, teacher_logits=t_hidden @ t_weight.T, **kw
    )
    assert torch.allclose(out, ref, atol=1e-12)
    assert stats.keys() == ref_stats.keys()
    for k in stats:
        assert stats[k] == pytest.approx(ref_stats[k], abs=1e-9)


def test_all_ignored_gives_zero_loss_and_gradient():
    hidden, weight, _, labels, *_ = _inputs(dtype=torch.float64)
    labels = torch.full_like(labels, -100)
    for reduction in ("mean", "sum"):
        out = fused_target_loss(hidden, weight, labels, reduction=reduction)
        gh, gw = torch.autograd.grad(out, [hidden, weight], allow_unused=True)
        assert out.item() == 0.0
        assert gh is None or not gh.any()
        assert gw is None or not gw.any()


def test_ignored_rows_get_no_hidden_gradient():
    hidden, weight, _, labels, *_ = _inputs(dtype=torch.float64)
    (gh,) = torch.autograd.grad(fused_target_loss(hidden, weight, labels, method="dft"), hidden)
    assert not gh[labels == -100].any()
    assert gh[labels != -100].abs().sum(-1).gt(0).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lm_head_weight=torch.randn(V, H + 1)), "hidden has size"),
        (dict(labels=torch.zeros(5, dtype=torch.long)), "labels has shape"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(softcap=-1.0), "softcap"),
        (
            dict(method="kd", teacher_hidden=torch.randn(41, TH), teacher_lm_head_weight=torch.randn(V + 3, TH)),
            "vocabulary",
        ),
        (dict(method="kd", teacher_hidden=torch.randn(41, TH)), "teacher_hidden and teacher_lm_head_weight"),
        (dict(method="kd"), "teacher"),
        (dict(lm_head_bias=torch.randn(V + 1)), "lm_head_bias"),
    ],
)
def test_bad_input(kwargs, match):
    hidden, weight, _, labels, *_ = _inputs()
    args = dict(hidden=hidden, lm_head_weight=weight, labels=labels)
    for k in ("lm_head_weight", "labels"):
        if k in kwargs:
            args[k] = kwargs.pop(k)
    with pytest.raises(ValueError, match=match):
        fused_target_loss(args["hidden"], args["lm_head_weight"], args["labels"], **kwargs)


def test_nan_hidden_is_an_error():
    hidden, weight, _, labels, *_ = _inputs()
    bad = hidden.detach().clone()
    bad[1, 0] = float("nan")  # row 1 carries a loss
    with pytest.raises(ValueError, match="NaN"):
        fused_target_loss(bad, weight, labels)


def test_auto_chunk_size_bounds():
    cpu = torch.device("cpu")
    assert auto_chunk_size(10, 49152, cpu) == 10
    rows = auto_chunk_size(100000, 49152, cpu)
    assert rows % 8 == 0 and 8 <= rows * 49152 * 4 <= 64 << 20
    assert auto_chunk_size(100000, 10_000_000, cpu) == 8
    # a large vocabulary and hidden size: a quarter of the float32 weight gradient, V·H bytes, per [chunk, V] buffer
    assert auto_chunk_size(100000, 49152, cpu, 576) == rows  # SmolLM2: the fixed budget is larger
    assert auto_chunk_size(100000, 151936, cpu, 1536) == 384  # Qwen-like: 1536 / 4 rows
