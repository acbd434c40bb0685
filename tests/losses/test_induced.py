"""induced_target: recover Q = p − ∂L/∂z / w (and γ, π̃) from any loss (issue item 8).

Round trips through every registered method, then user losses: PyTorch's label smoothing, a focal loss and
TRL's own DFT loss (called through TRL's SFTTrainer.compute_loss, not copied).
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

import targetsft
from test_reference import (
    DEFAULTS,
    IGNORE,
    SIGNED,
    all_cases,
    case_id,
    label_of,
    make_batch,
    reference_target,
    side_kwargs,
)

ATOL = 1e-10

SELF_REFERENCE = {
    "sft",
    "dft",
    "beyond_log",
    "profit",
    "eaft",
    "critical",
    "weighted",
    "self_smoothing",
    "proximal_sft",
}
UNIFORM_REFERENCE = {"label_smoothing", "confidence_smoothing"}
DENSE_RESIDUAL = {"asft", "sft_kl", "kd", "hybrid_kd", "target_sft", "confidence_kd", "guided_kd", "gem"}


def test_reference_groups_cover_registry():
    """Every registered method is assigned a reference shape below."""
    assert SELF_REFERENCE | UNIFORM_REFERENCE | DENSE_RESIDUAL == set(DEFAULTS)


def _reference_for(method, r, params):
    if params.get("exclude_label"):
        return "label_free"  # π̃ puts no mass on y
    if method in SELF_REFERENCE:
        return "self"
    if method in UNIFORM_REFERENCE:
        return "uniform"
    return r.residual  # the method's own residual distribution, from the independent reference


ROUND_TRIP = [c for c in all_cases() if c[1].get("scale", "target") == "target" and c[0] not in SIGNED]


@pytest.mark.parametrize("beta", [0.3, 0.7, 2.0])
def test_gem_induces_its_signed_target(beta):
    """GEM's original loss CE(onehot, p) − CE(q, p), written with autograd, induces Q = onehot(y) + p − q: what
    build_target gives, summing to one, negative somewhere, and so not a distribution."""
    b = make_batch(71)

    def gem(z, y):
        logp = torch.log_softmax(z, -1)
        q = torch.softmax(logp.detach() / beta, -1)
        keep = y != IGNORE
        yy = y.clamp(min=0)
        per = -logp.gather(-1, yy[..., None]).squeeze(-1) + (q * logp).sum(-1)
        return (per * keep).sum() / keep.sum()

    ind = targetsft.induced_target(gem, b.logits, b.labels, reference="self")
    q = targetsft.build_target(b.logits, b.labels, method="gem", beta=beta)
    v = b.valid
    torch.testing.assert_close(ind.q[v], q[v], rtol=0, atol=ATOL)
    torch.testing.assert_close(q.sum(-1)[v], torch.ones(int(v.sum()), dtype=q.dtype), rtol=0, atol=ATOL)
    assert (q[v] < 0).any() and not ind.is_distribution[v].any()


@pytest.mark.parametrize("case", ROUND_TRIP, ids=case_id)
def test_round_trip_every_method(case):
    """loss_fn = target_loss(method): the recovered q equals build_target; with the method's reference shape
    the recovered γ equals the method's γ and π̃ its residual (where γ < 1)."""
    method, params = case
    b = make_batch(70)
    side = side_kwargs(method, b)

    def loss_fn(z, y):
        return targetsft.target_loss(z, y, method=method, **side, **params)

    r = reference_target(method, b.logits, b.labels, **side, **params)
    ind = targetsft.induced_target(loss_fn, b.logits, b.labels, reference=_reference_for(method, r, params))
    q = targetsft.build_target(b.logits, b.labels, method=method, **side, **params)
    v = b.valid
    torch.testing.assert_close(ind.q[v], q[v], rtol=0, atol=ATOL)
    torch.testing.assert_close(ind.q[v], r.q[v], rtol=0, atol=ATOL)
    assert ind.is_distribution[v].all() and not ind.is_distribution[~v].any()
    torch.testing.assert_close(ind.gamma[v], r.gamma.expand(b.labels.shape)[v], rtol=0, atol=1e-9)
    assert torch.isnan(ind.gamma[~v]).all()
    free = v & (r.gamma < 1 - 1e-6)
    if r.residual is not None and free.any():
        assert ind.decomposed[free].all()
        torch.testing.assert_close(ind.residual[free], r.residual[free], rtol=0, atol=1e-8)


def test_label_smoothing_of_torch_recovers_gamma():
    """F.cross_entropy(label_smoothing=0.1) with reference='uniform' gives γ = 0.9 and π̃ = 1/V."""
    b = make_batch(71)
    V = b.logits.shape[-1]

    def loss_fn(z, y):
        return F.cross_entropy(z.reshape(-1, V), y.reshape(-1), label_smoothing=0.1, ignore_index=IGNORE)

    ind = targetsft.induced_target(loss_fn, b.logits, b.labels, reference="uniform")
    v = b.valid
    torch.testing.assert_close(ind.gamma[v], torch.full((b.n_valid,), 0.9, dtype=torch.float64), rtol=0, atol=ATOL)
    torch.testing.assert_close(
        ind.residual[v], torch.full((b.n_valid, V), 1 / V, dtype=torch.float64), rtol=0, atol=ATOL
    )
    assert ind.decomposed[v].all()


def test_focal_loss_induced_target():
    """Focal loss −(1 − p_y)²·log p_y (no stop-gradient): q = p − grad/w exactly, and each q row sums to 1."""
    b = make_batch(72)

    def focal(z, y):
        logp_y = label_of(torch.log_softmax(z, -1), y)
        per = -((1 - logp_y.exp()) ** 2) * logp_y
        return (per * (y != IGNORE)).sum() / (y != IGNORE).sum()

    ind = targetsft.induced_target(focal, b.logits, b.labels)
    z = b.logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(focal(z, b.labels), z)
    q = torch.softmax(b.logits, -1) - grad * b.n_valid
    v = b.valid
    torch.testing.assert_close(ind.q[v], q[v], rtol=0, atol=ATOL)
    torch.testing.assert_close(ind.q.sum(-1)[v], torch.ones(b.n_valid, dtype=torch.float64), rtol=0, atol=ATOL)


@pytest.mark.parametrize("weight", ["sum", 0.5, "tensor"])
def test_explicit_weights(weight):
    """weight='sum', a number or a per-token tensor: q = p − grad/w for the right w."""
    b = make_batch(73)
    if weight == "tensor":
        w = torch.rand(b.labels.shape, dtype=torch.float64) + 0.5
    else:
        w = torch.full(b.labels.shape, 1.0 if weight == "sum" else weight, dtype=torch.float64)

    def loss_fn(z, y):
        per = targetsft.target_loss(z, y, method="dft", reduction="none")
        return (per * w).sum()

    ind = targetsft.induced_target(loss_fn, b.logits, b.labels, weight=w if weight == "tensor" else weight)
    r = reference_target("dft", b.logits, b.labels)
    torch.testing.assert_close(ind.q[b.valid], r.q[b.valid], rtol=0, atol=ATOL)


# --- TRL's DFT loss -------------------------------------------------------------------------------------------


def _trl_dft_loss_fn():
    """Return loss_fn(z, y) that runs TRL's own DFT loss (SFTTrainer.compute_loss with loss_type='dft').

    TRL 1.16 has no standalone ``dft_loss``: DFT lives inside ``SFTTrainer.compute_loss``, which runs the model
    with TRL's fused LM head (``add_fused_lm_head``), shifts the labels by one internally and weights the NLL by
    the detached label probability. To feed it chosen logits ``z`` we use a model whose backbone passes
    ``inputs_embeds`` through and whose LM head is the identity, so the fused head's logits are exactly ``z``.
    The shift is handled honestly: position t of the input predicts ``labels[t + 1]``, so we append one dummy
    position to the hidden states and prepend an ignored label. The trainer ``self`` is a minimal stand-in
    carrying only the attributes compute_loss reads on this single-device path.
    """
    pytest.importorskip("trl")
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import BaseModelOutput
    from trl.trainer.sft_trainer import SFTTrainer
    from trl.trainer.utils import add_fused_lm_head

    class Passthrough(torch.nn.Module):
        def forward(self, inputs_embeds=None, **kwargs):
            return BaseModelOutput(last_hidden_state=inputs_embeds)

    class LogitsAsHidden(PreTrainedModel):
        config_class = PretrainedConfig
        base_model_prefix = "backbone"

        def __init__(self, config):
            super().__init__(config)
            self.backbone = Passthrough()
            self.lm_head = torch.nn.Linear(config.vocab_size, config.vocab_size, bias=False)
            with torch.no_grad():
                self.lm_head.weight.copy_(torch.eye(config.vocab_size))
            self.lm_head.weight.requires_grad_(False)

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, inputs_embeds=None, **kwargs):  # replaced by the fused head's forward
            raise NotImplementedError

    def loss_fn(z, y):
        batch, seq, vocab = z.shape
        model = LogitsAsHidden(PretrainedConfig(vocab_size=vocab)).to(z.dtype)
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        model.train()
        trainer = types.SimpleNamespace(
            model=model,
            args=types.SimpleNamespace(loss_type="dft", average_tokens_across_devices=False),
            accelerator=types.SimpleNamespace(parallelism_config=None, gather_for_metrics=lambda x: x, num_processes=1),
            aux_loss_enabled=False,
            compute_loss_func=None,
            label_smoother=None,
            _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
            _total_train_tokens=0,
            _tp_size=1,
            get_tp_size=lambda: 1,
        )
        hidden = torch.cat([z, z.new_zeros(batch, 1, vocab)], 1)  # position t predicts labels[:, t + 1]
        labels = torch.cat([torch.full((batch, 1), IGNORE), y], 1)
        inputs = {
            "inputs_embeds": hidden,
            "labels": labels,
            "attention_mask": torch.ones(batch, seq + 1, dtype=torch.long),
        }
        return SFTTrainer.compute_loss(trainer, model, inputs)

    return loss_fn


def test_trl_dft_loss_induces_dft_target():
    """TRL's DFT loss, inverted with reference='self', has γ = p_y and π̃ = p (its kernel runs in float32)."""
    b = make_batch(74, lead=(3, 6))
    loss_fn = _trl_dft_loss_fn()
    ind = targetsft.induced_target(loss_fn, b.logits, b.labels, reference="self")
    p = torch.softmax(b.logits, -1)
    v = b.valid
    torch.testing.assert_close(ind.gamma[v], label_of(p, b.labels)[v], rtol=0, atol=1e-6)
    free = v & (label_of(p, b.labels) < 0.99)
    assert ind.decomposed[free].all()
    torch.testing.assert_close(ind.residual[free], p[free], rtol=0, atol=1e-5)
    # and TRL's DFT induces the same target as this library's dft
    q = targetsft.build_target(b.logits, b.labels, method="dft")
    torch.testing.assert_close(ind.q[v], q[v], rtol=0, atol=1e-6)


def test_trl_dft_wrapper_shift_is_right():
    """Guard for the wrapper: with loss_type='dft' and a label-aligned check, TRL's loss value is the mean of
    −p_y·log p_y over kept tokens of *our* (unshifted) labels."""
    b = make_batch(75, lead=(2, 4))
    loss = _trl_dft_loss_fn()(b.logits, b.labels)
    logp_y = label_of(torch.log_softmax(b.logits, -1), b.labels)
    expected = (-(logp_y.exp() * logp_y) * b.valid).sum() / b.n_valid
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
