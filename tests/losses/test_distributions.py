"""The teacher and reference as one typed value each (``TopK``, ``Logits``, ``Projected``), the student's head as an
``LMHead``, the chunking as a ``Chunking``: the same loss and gradients as the old keywords, bit for bit; the old
keywords still work with a DeprecationWarning naming the replacement, and are refused beside the object."""

import inspect
import warnings

import pytest
import torch

import targetsft
from targetsft import Chunking, LMHead, Logits, Projected, TopK, fused_target_loss, target_loss

H, V, TH, SHARED = 12, 29, 8, 23


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, H, generator=g, dtype=torch.float64).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    bias = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).requires_grad_(True)
    labels = torch.randint(0, SHARED, (3, 7), generator=g)
    labels[:, :2] = -100
    t_hidden = torch.randn(3, 7, TH, generator=g, dtype=torch.float64)
    t_weight = torch.randn(V + 3, TH, generator=g, dtype=torch.float64) * 0.7  # 3 more padding rows
    t_bias = torch.randn(V + 3, generator=g, dtype=torch.float64) * 0.1
    top = torch.log_softmax(t_hidden @ t_weight[:SHARED].T, -1).topk(5, -1)
    return hidden, weight, bias, labels, t_hidden, t_weight, t_bias, top.indices, top.values


def _same(a, b):
    """Loss and gradients for hidden, weight and bias equal to the last bit."""
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert torch.equal(loss_a, loss_b)
    for x, y in zip(grads_a, grads_b):
        assert torch.equal(x, y)


def _fused(args, **kwargs):
    hidden, weight, bias, labels = args[:4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loss = fused_target_loss(hidden, kwargs.pop("head", weight), labels, **kwargs)
    return loss, torch.autograd.grad(loss, [hidden, weight, bias], allow_unused=True)


FAMILIES = ["topk_teacher", "projected_teacher", "topk_reference", "projected_reference"]


def _family(name, args):
    """(method and parameters, the object's keywords, the old keywords) of one family."""
    _, _, _, _, t_hidden, t_weight, t_bias, ids, lps = args
    role = "teacher" if "teacher" in name else "ref"
    method = {"teacher": dict(method="target_sft", eta=0.4), "ref": dict(method="sft_kl", lam=0.3)}[role]
    if name.startswith("topk"):
        new = {role: TopK(ids, lps, shared_vocab_size=SHARED)}
        old = {f"{role}_topk": (ids, lps)}
    else:
        new = {role: Projected(t_hidden, t_weight, t_bias, shared_vocab_size=SHARED)}
        old = {f"{role}_hidden": t_hidden, f"{role}_lm_head_weight": t_weight, f"{role}_lm_head_bias": t_bias}
    return method, new, {**old, "shared_vocab_size": SHARED}


@pytest.mark.parametrize("family", FAMILIES)
def test_objects_equal_old_keywords_exactly(family):
    """For each family (top-k or projected, teacher or reference) the objects give the old keywords' loss and
    gradients, atol 0, with the student's head as an LMHead and the chunking as a Chunking."""
    args = _inputs()
    hidden, weight, bias, labels = args[:4]
    method, new, old = _family(family, args)
    head = LMHead(weight, bias, logit_scale=0.7, softcap=5.0)
    by_objects = _fused(args, head=head, chunking=Chunking(size=4, loss_tokens=15), **method, **new)
    by_keywords = _fused(
        args, lm_head_bias=bias, logit_scale=0.7, softcap=5.0, chunk_size=4, num_loss_tokens=15, **method, **old
    )
    _same(by_objects, by_keywords)


@pytest.mark.parametrize("kind", ["logits", "topk"])
@pytest.mark.parametrize("role", ["teacher", "ref"])
def test_target_loss_objects_equal_old_keywords_exactly(kind, role):
    """target_loss and build_target with teacher=Logits|TopK (or ref=) equal the old keywords, atol 0."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, V, generator=g, dtype=torch.float64).requires_grad_(True)
    labels = torch.randint(0, SHARED, (2, 6), generator=g)
    labels[0, 0] = -100
    other = torch.randn(2, 6, V + 3, generator=g, dtype=torch.float64)
    top = torch.log_softmax(other[..., :SHARED], -1).topk(4, -1)
    method = dict(method="target_sft", eta=0.3) if role == "teacher" else dict(method="sft_kl", lam=0.2)
    if kind == "logits":
        new, old = {role: Logits(other, SHARED)}, {f"{role}_logits": other}
    else:
        new, old = {role: TopK(top.indices, top.values, SHARED)}, {f"{role}_topk": (top.indices, top.values)}
    a = target_loss(logits, labels, **method, **new)
    with pytest.warns(DeprecationWarning, match=f"target_loss: {role}_{kind}"):
        b = target_loss(logits, labels, shared_vocab_size=SHARED, **method, **old)
    assert torch.equal(a, b)
    assert torch.equal(*(torch.autograd.grad(x, logits)[0] for x in (a, b)))
    with pytest.warns(DeprecationWarning):
        q_old = targetsft.build_target(logits, labels, shared_vocab_size=SHARED, **method, **old)
    assert torch.equal(targetsft.build_target(logits, labels, **method, **new), q_old)


@pytest.mark.parametrize(
    "old, replacement",
    [
        (dict(teacher_topk="topk"), "teacher=TopK"),
        (dict(teacher_hidden="t_hidden", teacher_lm_head_weight="t_weight"), "teacher=Projected"),
        (dict(ref_topk="topk"), "ref=TopK"),
        (dict(ref_hidden="t_hidden", ref_lm_head_weight="t_weight"), "ref=Projected"),
        (dict(lm_head_bias="bias"), "LMHead"),
        (dict(softcap=5.0), "LMHead"),
        (dict(logit_scale=0.5), "LMHead"),
        (dict(chunk_size=3), "Chunking"),
        (dict(num_loss_tokens=15), "Chunking"),
    ],
)
def test_old_keywords_warn_naming_the_replacement(old, replacement):
    """Each old keyword of fused_target_loss gives a DeprecationWarning that names what replaces it, at the
    caller's line."""
    args = _inputs()
    hidden, weight, bias, labels, t_hidden, t_weight, _, ids, lps = args
    values = {"topk": (ids, lps), "t_hidden": t_hidden, "t_weight": t_weight[:V], "bias": bias}
    kwargs = {k: values.get(v, v) if isinstance(v, str) else v for k, v in old.items()}
    role = (
        "teacher" if any(k.startswith("teacher") for k in kwargs) else "ref" if any("ref" in k for k in kwargs) else ""
    )
    method = {"teacher": dict(method="kd"), "ref": dict(method="sft_kl"), "": {}}[role]
    with pytest.warns(DeprecationWarning, match=replacement) as caught:
        fused_target_loss(hidden, weight, labels, **method, **kwargs)
    assert all(w.filename == __file__ for w in caught if issubclass(w.category, DeprecationWarning))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(teacher="topk_obj", teacher_topk="topk"), "teacher= or its old keywords"),
        (dict(teacher="proj_obj", teacher_hidden="t_hidden", teacher_lm_head_weight="t_weight"), "not both"),
        (dict(ref="topk_obj", ref_topk="topk", method="sft_kl"), "ref= or its old keywords"),
        (dict(teacher="shared_obj", shared_vocab_size=SHARED), "shared_vocab_size on teacher= or as a keyword"),
        (dict(head="lmhead", lm_head_bias="bias", method="sft"), "LMHead"),
        (dict(chunking=Chunking(4), chunk_size=4, method="sft"), "chunking= or the old keywords"),
    ],
)
def test_an_object_and_its_old_keywords_together_are_refused(kwargs, match):
    args = _inputs()
    hidden, weight, bias, labels, t_hidden, t_weight, _, ids, lps = args
    values = {
        "topk": (ids, lps),
        "topk_obj": TopK(ids, lps),
        "proj_obj": Projected(t_hidden, t_weight[:V]),
        "shared_obj": TopK(ids, lps, SHARED),
        "t_hidden": t_hidden,
        "t_weight": t_weight[:V],
        "bias": bias,
        "lmhead": LMHead(weight, bias),
    }
    kwargs = {k: values.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    kwargs.setdefault("method", "kd")
    head = kwargs.pop("head", weight)
    with pytest.raises(ValueError, match=match):
        fused_target_loss(hidden, head, labels, **kwargs)
    with pytest.raises(ValueError, match="teacher= or its old keywords"):
        target_loss(hidden @ weight.T, labels, method="kd", teacher=Logits(t_hidden @ t_weight[:V].T), teacher_logits=1)


def test_each_loss_takes_only_its_forms():
    """target_loss takes Logits or TopK, fused_target_loss TopK or Projected; anything else is a TypeError."""
    hidden, weight, _, labels, t_hidden, t_weight, *_ = _inputs()
    with pytest.raises(TypeError, match="teacher must be Logits or TopK"):
        target_loss(hidden @ weight.T, labels, method="kd", teacher=Projected(t_hidden, t_weight[:V]))
    with pytest.raises(TypeError, match="teacher must be TopK or Projected"):
        fused_target_loss(hidden, weight, labels, method="kd", teacher=Logits(t_hidden @ t_weight[:V].T))


def test_fused_target_loss_has_at_most_12_parameters():
    """One value per model (the student's head, the teacher, the reference): at most 12 named parameters besides
    the method's ``**params``; target_loss likewise."""
    for fn in (fused_target_loss, target_loss, targetsft.build_target):
        params = inspect.signature(fn).parameters.values()
        named = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
        assert len(named) <= 12, (fn.__name__, [p.name for p in named])
    names = set(inspect.signature(fused_target_loss).parameters)
    assert {"teacher", "ref", "chunking"} <= names and not {n for n in names if n.startswith(("teacher_", "ref_"))}


def test_objects_are_frozen():
    ids = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(AttributeError):
        TopK(ids, ids.double()).ids = ids
