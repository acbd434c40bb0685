"""On a CUDA device: the fused loss equals the naive one (float32 and bf16, plain and under autocast), inside a
model too, and a short ``target-sft train`` runs there in bf16. Skipped where there is no GPU; ``bash
bench/gpu_check.sh`` runs them on a GPU machine, and its CPU rehearsal runs them on the CPU
(``TARGETSFT_TEST_DEVICE=cpu``)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

import targetsft
from targetsft.losses.fused import fused_target_loss

DEVICE = os.environ.get("TARGETSFT_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")

N, H, V = 512, 256, 4096
METHODS = ["sft", "dft", "kd", "target_sft"]


def _inputs(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(N, H, generator=g) * 0.5).to(DEVICE).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * 0.1).to(DEVICE).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    labels[::7] = -100
    t_hidden = (torch.randn(N, H, generator=g) * 0.5).to(DEVICE).to(dtype)
    t_weight = (torch.randn(V, H, generator=g) * 0.1).to(DEVICE).to(dtype)
    return hidden, weight, labels, t_hidden, t_weight


def _both(method: str, dtype: torch.dtype, autocast: bool):
    hidden, weight, labels, t_hidden, t_weight = _inputs(dtype)
    teacher = "teacher" in targetsft.METHODS[method].needs
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        naive_kw = {"teacher_logits": (t_hidden @ t_weight.T).float()} if teacher else {}
        ref = targetsft.target_loss((hidden @ weight.T).float(), labels, method=method, **naive_kw)
        fused_kw = {"teacher_hidden": t_hidden, "teacher_lm_head_weight": t_weight} if teacher else {}
        out = fused_target_loss(hidden, weight, labels, method=method, chunk_size=100, **fused_kw)
    grads = [torch.autograd.grad(loss, [hidden, weight]) for loss in (out, ref)]
    return (out, ref), grads


@pytest.mark.parametrize("method", METHODS)
def test_fused_equals_naive_float32(method):
    (out, ref), (g_out, g_ref) = _both(method, torch.float32, autocast=False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16_inputs", "autocast"])
def test_fused_equals_naive_bf16(method, autocast):
    """bf16 projections on both sides (the target in float32): agreement to bf16 rounding."""
    dtype = torch.float32 if autocast else torch.bfloat16
    (out, ref), (g_out, g_ref) = _both(method, dtype, autocast=autocast)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    for a, b in zip(g_out, g_ref):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("method", ["sft", "target_sft"])
def test_model_loss_on_cuda_equals_naive(method, tiny_llama):
    from targetsft.training.fused_forward import causal_lm_target_loss, shift_labels

    model = copy.deepcopy(tiny_llama).to(DEVICE)
    teacher = copy.deepcopy(tiny_llama).to(DEVICE).eval() if method == "target_sft" else None
    ids = torch.randint(0, model.config.vocab_size, (2, 40), device=DEVICE)
    labels = ids.clone()
    labels[:, :10] = -100
    out = causal_lm_target_loss(model, ids, labels, method=method, teacher_model=teacher)
    kw = {"teacher_logits": teacher(ids).logits} if teacher is not None else {}
    ref = targetsft.target_loss(model(ids).logits, shift_labels(labels), method=method, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_train_runs_on_cuda_in_bf16(tmp_path, tiny_llama, tiny_tokenizer):
    from targetsft.training.config import load_config
    from targetsft.training.recipe import train

    student = tmp_path / "student"
    tiny_llama.save_pretrained(student)
    tiny_tokenizer.save_pretrained(student)
    data = Path(__file__).resolve().parents[2] / "configs" / "data" / "sample_train.jsonl"  # no reasoning-gym needed
    overrides = [f"model={student}", f"output_dir={tmp_path / 'out'}", f"data.train={data}", "data.size=16"]
    overrides += ["train.max_steps=4"]
    overrides += ["precision=bf16", "train.report_to=[]", "loss.method=target_sft", f"teacher.model={student}"]
    summary = train(load_config(None, overrides))
    assert summary["steps"] == 4 and summary["environment"]["precision"] == "bf16"
    assert torch.isfinite(torch.tensor(summary["metrics"]["train_loss"]))


def test_teacher_on_another_device_has_its_head_copied_once(tiny_llama):
    """A teacher left on the CPU (its own device_map) beside a CUDA student: the loss equals the all-CUDA one, and
    the teacher's lm_head weight is copied to the GPU once, not at every step."""
    if DEVICE == "cpu":
        pytest.skip("needs a second device beside the CPU")
    from targetsft.training.fused_forward import causal_lm_target_loss

    model = copy.deepcopy(tiny_llama).to(DEVICE)
    teacher = copy.deepcopy(tiny_llama).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 30), device=DEVICE)
    labels = ids.clone()
    labels[:, :5] = -100
    first = causal_lm_target_loss(model, ids, labels, method="kd", teacher_model=teacher)
    copy_1 = teacher._targetsft_head_copy[1]
    second = causal_lm_target_loss(model, ids, labels, method="kd", teacher_model=teacher)
    assert teacher._targetsft_head_copy[1] is copy_1 and copy_1.device.type == DEVICE
    expected = causal_lm_target_loss(model, ids, labels, method="kd", teacher_model=copy.deepcopy(teacher).to(DEVICE))
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, first)
