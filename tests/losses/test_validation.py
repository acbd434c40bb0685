"""Bad inputs raise a clear ValueError/TypeError that names the offending argument (issue item 7)."""

from __future__ import annotations

import pytest
import torch

import targetsft
from test_reference import DEFAULTS, make_batch

B = make_batch(60)
V = B.logits.shape[-1]
TOPK = torch.log_softmax(B.teacher_logits, -1).topk(3, -1)
IDS, VALS = TOPK.indices, TOPK.values


def _ids_with(value):
    ids = IDS.clone()
    ids[0, 1, 0] = value
    return ids


def _dup_ids():
    ids = IDS.clone()
    ids[0, 1, 1] = ids[0, 1, 0]
    return ids


def _heavy_vals():
    vals = VALS.clone()
    vals[0, 1] = torch.log(torch.tensor([0.6, 0.5, 0.1], dtype=torch.float64))
    return vals


def _labels_with(value, index=(0, 1)):
    y = B.labels.clone()
    y[index] = value
    return y


CASES = [
    # id, exception, message regex, kwargs for target_loss
    ("logits_label_shape", ValueError, "labels", dict(labels=B.labels[:, :4])),
    ("label_too_large", ValueError, "labels", dict(labels=_labels_with(V))),
    ("label_negative", ValueError, "labels", dict(labels=_labels_with(-1))),
    ("label_other_negative", ValueError, "labels", dict(labels=_labels_with(-7))),
    ("float_labels", TypeError, "labels", dict(labels=B.labels.double())),
    ("bool_labels", TypeError, "labels", dict(labels=B.labels > 0)),
    ("integer_logits", TypeError, "logits", dict(logits=B.logits.long())),
    ("logits_not_tensor", TypeError, "logits", dict(logits=B.logits.tolist())),
    ("teacher_vocab", ValueError, "teacher", dict(method="kd", teacher_logits=B.teacher_logits[..., :-1])),
    (
        "teacher_vocab_larger",
        ValueError,
        "teacher",
        dict(method="kd", teacher_logits=torch.cat([B.teacher_logits] * 2, -1)),
    ),
    ("teacher_shape", ValueError, "teacher", dict(method="kd", teacher_logits=B.teacher_logits[:2])),
    ("teacher_int", TypeError, "teacher", dict(method="kd", teacher_logits=B.teacher_logits.long())),
    ("ref_vocab", ValueError, "ref", dict(method="sft_kl", ref_logits=B.ref_logits[..., :5])),
    ("topk_id_too_large", ValueError, "teacher_topk", dict(method="kd", teacher_topk=(_ids_with(V), VALS))),
    ("topk_id_negative", ValueError, "teacher_topk", dict(method="kd", teacher_topk=(_ids_with(-1), VALS))),
    ("topk_duplicate_ids", ValueError, "teacher_topk", dict(method="kd", teacher_topk=(_dup_ids(), VALS))),
    ("topk_mass_above_one", ValueError, "teacher_topk", dict(method="kd", teacher_topk=(IDS, _heavy_vals()))),
    ("topk_positive_logprob", ValueError, "teacher_topk", dict(method="kd", teacher_topk=(IDS, VALS + 5.0))),
    ("topk_float_ids", TypeError, "teacher_topk", dict(method="kd", teacher_topk=(IDS.double(), VALS))),
    ("topk_shape_mismatch", ValueError, "teacher_topk", dict(method="kd", teacher_topk=(IDS, VALS[..., :2]))),
    ("topk_not_pair", TypeError, "teacher_topk", dict(method="kd", teacher_topk=IDS)),
    (
        "topk_nan",
        ValueError,
        "teacher_topk",
        dict(method="kd", teacher_topk=(IDS, VALS.masked_fill(IDS == IDS[0, 0, 0], float("nan")))),
    ),
    ("topk_empty", ValueError, "teacher_topk", dict(method="kd", teacher_topk=(IDS[..., :0], VALS[..., :0]))),
    (
        "teacher_both_forms",
        ValueError,
        "teacher",
        dict(method="kd", teacher_logits=B.teacher_logits, teacher_topk=(IDS, VALS)),
    ),
    ("eta_above_one", ValueError, "eta", dict(method="target_sft", teacher_logits=B.teacher_logits, eta=1.5)),
    ("eta_negative", ValueError, "eta", dict(method="target_sft", teacher_logits=B.teacher_logits, eta=-0.1)),
    ("eta_not_number", TypeError, "eta", dict(method="target_sft", teacher_logits=B.teacher_logits, eta="0.5")),
    (
        "temperature_zero",
        ValueError,
        "temperature",
        dict(method="kd", teacher_logits=B.teacher_logits, temperature=0.0),
    ),
    ("epsilon_range", ValueError, "epsilon", dict(method="label_smoothing", epsilon=1.2)),
    ("lam_negative", ValueError, "lam", dict(method="sft_kl", ref_logits=B.ref_logits, lam=-1.0)),
    ("eaft_k", ValueError, "k", dict(method="eaft", k=1)),
    ("tail", ValueError, "tail", dict(method="kd", teacher_logits=B.teacher_logits, tail="uniform")),
    ("scale", ValueError, "scale", dict(method="asft", ref_logits=B.ref_logits, scale="both")),
    ("exclude_label_not_bool", TypeError, "exclude_label", dict(method="dft", exclude_label=1)),
    (
        "unknown_param",
        ValueError,
        r"(?s)unknown parameter.*bogus.*eta.*temperature.*tail.*exclude_label",
        dict(method="target_sft", teacher_logits=B.teacher_logits, bogus=1),
    ),
    ("param_for_parameterless_method", ValueError, r"(?s)unknown parameter.*eta", dict(method="sft", eta=0.5)),
    ("needs_teacher", ValueError, "teacher", dict(method="target_sft")),
    ("needs_teacher_kd", ValueError, "teacher", dict(method="kd")),
    ("needs_ref", ValueError, "ref", dict(method="asft")),
    ("needs_weights", ValueError, "token_weights", dict(method="weighted")),
    ("unused_teacher", ValueError, "teacher", dict(method="dft", teacher_logits=B.teacher_logits)),
    ("unused_teacher_topk", ValueError, "teacher", dict(method="sft", teacher_topk=(IDS, VALS))),
    ("unused_ref", ValueError, "ref", dict(method="kd", teacher_logits=B.teacher_logits, ref_logits=B.ref_logits)),
    ("unused_weights", ValueError, "token_weights", dict(method="dft", token_weights=B.weights)),
    ("temperature_with_topk", ValueError, "temperature", dict(method="kd", teacher_topk=(IDS, VALS), temperature=2.0)),
    (
        "temperature_with_topk_target_sft",
        ValueError,
        "temperature",
        dict(method="target_sft", teacher_topk=(IDS, VALS), temperature=0.5),
    ),
    ("weights_above_one", ValueError, "token_weights", dict(method="weighted", token_weights=B.weights + 1.0)),
    ("weights_negative", ValueError, "token_weights", dict(method="weighted", token_weights=B.weights - 1.0)),
    ("weights_nan", ValueError, "token_weights", dict(method="weighted", token_weights=B.weights / 0.0 * 0.0)),
    ("weights_shape", ValueError, "token_weights", dict(method="weighted", token_weights=B.weights[:, :2])),
    ("weights_int", TypeError, "token_weights", dict(method="weighted", token_weights=B.flags.long())),
    ("critical_not_binary", ValueError, "token_weights", dict(method="critical", token_weights=B.weights)),
    ("num_items_with_sum", ValueError, "num_items_in_batch", dict(reduction="sum", num_items_in_batch=4)),
    ("num_items_with_none", ValueError, "num_items_in_batch", dict(reduction="none", num_items_in_batch=4)),
    ("num_items_zero", ValueError, "num_items_in_batch", dict(num_items_in_batch=0)),
    ("reduction", ValueError, "reduction", dict(reduction="avg")),
]


@pytest.mark.parametrize("exc,pattern,kwargs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_named_error(exc, pattern, kwargs):
    """Each malformed input raises the stated exception with a message naming the argument."""
    kwargs = dict(kwargs)
    logits = kwargs.pop("logits", B.logits)
    labels = kwargs.pop("labels", B.labels)
    kwargs.setdefault("method", "sft")
    with pytest.raises(exc, match=pattern):
        targetsft.target_loss(logits, labels, **kwargs)


BUILD_CASES = [c for c in CASES if not c[0].startswith(("num_items", "reduction"))]


@pytest.mark.parametrize("exc,pattern,kwargs", [c[1:] for c in BUILD_CASES], ids=[c[0] for c in BUILD_CASES])
def test_build_target_validates_the_same_way(exc, pattern, kwargs):
    """build_target applies the same checks as target_loss."""
    kwargs = dict(kwargs)
    logits = kwargs.pop("logits", B.logits)
    labels = kwargs.pop("labels", B.labels)
    kwargs.setdefault("method", "sft")
    with pytest.raises(exc, match=pattern):
        targetsft.build_target(logits, labels, **kwargs)


@pytest.mark.parametrize("bad", ["dpo", "SFT", "", None, 3])
def test_unknown_method_lists_valid_choices(bad):
    """An unknown method is a ValueError whose message lists every registered method."""
    with pytest.raises(ValueError) as info:
        targetsft.target_loss(B.logits, B.labels, method=bad)
    msg = str(info.value)
    assert "method" in msg
    for name in DEFAULTS:
        assert name in msg


def test_unknown_parameter_lists_valid_parameters():
    """An unknown parameter names itself and lists the method's valid parameters."""
    with pytest.raises(ValueError) as info:
        targetsft.target_loss(B.logits, B.labels, method="guided_kd", teacher_logits=B.teacher_logits, etta=0.3)
    msg = str(info.value)
    assert "etta" in msg
    for p in ("lam", "eta", "temperature", "tail"):
        assert p in msg


def test_valid_edge_values_are_accepted():
    """The range ends are valid: eta ∈ {0, 1}, epsilon ∈ {0, 1}, bool token_weights for critical."""
    targetsft.target_loss(B.logits, B.labels, method="target_sft", teacher_logits=B.teacher_logits, eta=0)
    targetsft.target_loss(B.logits, B.labels, method="target_sft", teacher_logits=B.teacher_logits, eta=1)
    targetsft.target_loss(B.logits, B.labels, method="label_smoothing", epsilon=0.0)
    targetsft.target_loss(B.logits, B.labels, method="label_smoothing", epsilon=1)
    targetsft.target_loss(B.logits, B.labels, method="critical", token_weights=B.flags.bool())
    targetsft.target_loss(B.logits, B.labels, method="kd", teacher_topk=(IDS, VALS), temperature=1.0)
