"""Values read back from the device inside a training step (``bench/count_host_reads.py`` counts them: every tensor
method that returns a host value, in the optimizer steps of ``target-sft train`` that do not log). On an
accelerator each is a synchronisation. The library's own: the value checks of a batch, read once, however many
chunks the fused loss runs; the rest are transformers' (the Trainer's NaN filter on the loss, the sdpa mask's
padding test in each model's forward)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from count_host_reads import BENCH_OVERRIDES, count  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer, tiny_llama):
    root = tmp_path_factory.mktemp("reads")
    tiny_llama.save_pretrained(root / "student")
    tiny_tokenizer.save_pretrained(root / "student")
    torch.manual_seed(3)
    transformers.LlamaForCausalLM(copy.deepcopy(tiny_llama.config)).save_pretrained(root / "teacher")
    tiny_tokenizer.save_pretrained(root / "teacher")
    return root


@pytest.mark.parametrize(
    ("method", "extra", "most"),
    [("sft", [], 6), ("target_sft", ["loss.params.eta=0.5", "teacher.model={root}/teacher"], 7)],
)
def test_a_step_that_does_not_log_reads_back_once_for_the_library(models, tmp_path, method, extra, most):
    """Per step: exactly one read by targetsft (the batch's value checks, however many of the 16-row chunks the
    fused loss runs), and at most ``most`` in all: sft ≤ 6; target_sft ≤ 7, the teacher's forward adding its own
    sdpa mask test (two in a padded batch)."""
    steps = count(
        [
            *BENCH_OVERRIDES,  # the benchmark's run, on the tiny models, with 16-row chunks (later keys win)
            f"model={models}/student",
            f"output_dir={tmp_path}",
            "data.size=16",
            "data.max_length=512",
            "train.max_steps=4",
            "loss.chunk_size=16",
            f"loss.method={method}",
            *[e.format(root=models) for e in extra],
        ]
    )
    assert len(steps) == 3
    for step in steps:
        assert step["targetsft"] == 1, step
        assert sum(step.values()) <= most, step


def test_a_host_count_of_loss_tokens_gives_the_same_loss_and_a_wrong_one_is_refused():
    """``num_loss_tokens`` (the collator's host count) finds the same rows as reading them back; a count that does
    not match the labels is an error, not silently wrong rows."""
    import targetsft

    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 6, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :2] = labels[1, 4:] = -100
    read = targetsft.fused_target_loss(hidden, weight, labels, method="dft")
    counted = targetsft.fused_target_loss(hidden, weight, labels, method="dft", num_loss_tokens=8)
    torch.testing.assert_close(counted, read, rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_loss_tokens is 7 but the labels have 8"):
        targetsft.fused_target_loss(hidden, weight, labels, method="dft", num_loss_tokens=7)
