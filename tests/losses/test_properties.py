"""Property tests with hypothesis over random shapes, vocabularies, masks, scales and methods (issue item 9).

For a random registered method (side inputs supplied as its MethodSpec.needs says), random leading shape
(0-d label with 1-d logits up to 3 leading dims), V ∈ [2, 1000], random ignore mask and logit scales up to 1e4:
the gradient is w·(p − Q) with Q = build_target, Q is a distribution (zero rows where ignored), and the loss
and gradient are finite.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import targetsft
from test_reference import IGNORE, PARAM_GRID

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
SCALES = [1e-3, 0.5, 3.0, 30.0, 300.0, 1e4]


@st.composite
def problems(draw, topk: bool):
    methods = sorted(targetsft.METHODS)
    if topk:
        # proximal_sft needs π_old's full logits (a top-k reference is refused: tests/losses/test_equalities.py)
        methods = [m for m in methods if targetsft.METHODS[m].needs & {"teacher", "ref"} and m != "proximal_sft"]
    method = draw(st.sampled_from(methods))
    ndim = draw(st.integers(0, 3))
    lead = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    V = draw(st.integers(2, 1000))
    n = math.prod(lead)
    if n * V > 6000:
        V = max(2, 6000 // n)
    options = [{}] + [
        p
        for p in PARAM_GRID.get(method, [])
        if p.get("scale", "target") == "target" and not (topk and "temperature" in p)
    ]
    params = dict(draw(st.sampled_from(options)))
    if topk:
        params["tail"] = draw(st.sampled_from(["student", "renormalize"]))
    return dict(
        method=method,
        lead=lead,
        V=V,
        params=params,
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        scale=draw(st.sampled_from(SCALES)),
        side_scale=draw(st.sampled_from(SCALES)),
        agree=draw(st.sampled_from([0.0, 0.5, 1.0])),
        p_ignore=draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])),
        k=draw(st.integers(1, 8)),
        reduction=draw(st.sampled_from(["mean", "sum"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _inputs(pb, topk):
    g = torch.Generator().manual_seed(pb["seed"])
    lead, V, dt = pb["lead"], pb["V"], pb["dtype"]
    logits = (torch.randn(*lead, V, generator=g, dtype=torch.float64) * pb["scale"]).to(dt)
    labels = torch.randint(0, V, lead, generator=g)
    labels = torch.where(torch.rand(lead, generator=g) < pb["p_ignore"], torch.full_like(labels, IGNORE), labels)
    needs = targetsft.METHODS[pb["method"]].needs
    side = {}
    for who in ("teacher", "ref"):
        if who in needs:
            noise = torch.randn(*lead, V, generator=g, dtype=torch.float64) * pb["side_scale"]
            # teachers usually agree with the student to some degree: mix in the student's own logits
            other = pb["agree"] * logits.double() + (1 - pb["agree"]) * noise
            if topk:
                vals, ids = torch.log_softmax(other, -1).topk(min(pb["k"], V), -1)
                side[f"{who}_topk"] = (ids, vals.to(dt))
            else:
                side[f"{who}_logits"] = other.to(dt)
    if "token_weights" in needs:
        w = torch.rand(lead, generator=g, dtype=torch.float64)
        side["token_weights"] = ((w < 0.5).double() if pb["method"] == "critical" else w).to(dt)
    return logits, labels, side


def _check(pb, topk):
    logits, labels, side = _inputs(pb, topk)
    method, params = pb["method"], pb["params"]
    valid = labels != IGNORE
    n = int(valid.sum())
    w = 1.0 / max(n, 1) if pb["reduction"] == "mean" else 1.0
    tol = 1e-10 if pb["dtype"] == torch.float64 else 2e-5

    z = logits.clone().requires_grad_(True)
    loss = targetsft.target_loss(z, labels, method=method, reduction=pb["reduction"], **side, **params)
    loss.backward()
    assert torch.isfinite(loss), loss
    assert torch.isfinite(z.grad).all()

    q = targetsft.build_target(logits, labels, method=method, **side, **params)
    assert q.shape == logits.shape
    assert torch.isfinite(q).all()
    assert (q >= -tol).all()
    sums = q.sum(-1)
    assert (sums[valid] - 1).abs().max().item() <= tol if n else True, sums[valid]
    assert (q[~valid] == 0).all()

    p = torch.softmax(logits.to(q.dtype), -1)
    expected = torch.where(valid.unsqueeze(-1), w * (p - q), torch.zeros_like(p))
    torch.testing.assert_close(z.grad.to(q.dtype), expected, rtol=0, atol=tol * max(w, 1e-12) * 4)
    assert (z.grad[~valid] == 0).all()


@SETTINGS
@given(problems(topk=False))
def test_property_dense_side_inputs(pb):
    """Every method with dense teacher/ref logits: gradient w(p − Q), Q a distribution, finite."""
    _check(pb, topk=False)


@SETTINGS
@given(problems(topk=True))
def test_property_topk_side_inputs(pb):
    """Teacher/ref methods with top-k side inputs (both tails): gradient w(p − Q), Q a distribution, finite."""
    _check(pb, topk=True)
