"""The ``TrainerCallback`` s of ``target-sft train``: the metrics file, the model snapshots of chosen steps, and
π_old, the student's copy that a snapshot reference (:attr:`~targetsft.losses.methods.MethodSpec.ref_model`) is."""

from __future__ import annotations

import copy
import csv
import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from targetsft.runtime.files import atomic_write_text

logger = logging.getLogger(__name__)


class CsvMetricsCallback(TrainerCallback):
    """Appends every training log and every evaluation (``eval_loss``, ``eval_gamma``, ...) to
    ``<output_dir>/metrics.csv``; on resume, rows past the checkpoint are dropped first so the file has each step
    once."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.path.exists():
            return
        with self.path.open() as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if int(float(r.get("step") or 0)) <= state.global_step]
        if len(keep) != len(rows):
            self._write(keep, list(rows[0].keys()))

    def _write(self, rows: list[dict[str, Any]], fields: list[str]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.path, buf.getvalue())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or not ("loss" in logs or "eval_loss" in logs):
            return
        row = {"step": state.global_step, "epoch": state.epoch, **logs}
        rows, fields = [], list(row)
        if self.path.exists():
            with self.path.open() as f:
                rows = list(csv.DictReader(f))
            if rows:
                fields = list(rows[0].keys()) + [k for k in row if k not in rows[0]]
        self._write(rows + [row], fields)


class ModelSnapshots(TrainerCallback):
    """Saves the model (merged if LoRA) and tokenizer to ``<output_dir>/snapshots/step-N`` after each optimizer step
    N of ``steps``: written to a temporary folder and renamed, so a snapshot folder is always complete; one a
    resumed run has already written is kept."""

    def __init__(self, steps: list[int], tokenizer: Any) -> None:
        self.steps, self.tokenizer = set(steps), tokenizer

    def on_step_end(self, args, state, control, model=None, **kwargs):
        target = snapshot_dir(args.output_dir, state.global_step)
        if state.global_step not in self.steps or not state.is_world_process_zero or target.is_dir():
            return
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        inner = model.module if hasattr(model, "module") else model
        if hasattr(inner, "merge_and_unload"):  # LoRA: a full model, the adapters left in place
            inner = copy.deepcopy(inner).merge_and_unload()
        inner.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)


def snapshot_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """Where :class:`ModelSnapshots` keeps the model after optimizer step ``step``."""
    return Path(output_dir) / "snapshots" / f"step-{step}"


class PolicySnapshot(TrainerCallback):
    """π_old of a method with a snapshot reference (``proximal_sft``), a copy of the student (with its LoRA adapters,
    if any): the weights the student trains (every weight, or only the adapters under LoRA; the frozen base is shared
    content, never copied again) and its buffers are copied into it right before every ``refresh``-th optimizer step,
    so the loss of step t sees the model of 1 to ``refresh`` updates before. Those weights are saved in each
    checkpoint (``pi_old.safetensors``) and restored on resume, so an interrupted run continues exactly."""

    FILE = "pi_old.safetensors"

    def __init__(self, model: nn.Module, pi_old: nn.Module, refresh: int) -> None:
        self.model, self.pi_old, self.refresh = model, pi_old, int(refresh)
        self.trained = [name for name, p in model.named_parameters() if p.requires_grad]

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:  # resumed: π_old as it was when the checkpoint was written
            from safetensors.torch import load_model

            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.FILE
            missing, _ = load_model(self.pi_old, path, strict=False)  # the frozen base is not in the file
            lost = sorted(set(missing) & set(self.trained))
            if lost:
                raise ValueError(f"{path} lacks π_old's trained weights {lost[:3]}: the checkpoint is not this run's")

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step % self.refresh == 0:
            old = dict(self.pi_old.named_parameters())
            for name, p in self.model.named_parameters():
                if p.requires_grad:
                    old[name].copy_(p)
            old_buffers = dict(self.pi_old.named_buffers())
            for name, b in self.model.named_buffers():
                old_buffers[name].copy_(b)

    def on_save(self, args, state, control, **kwargs):
        from safetensors.torch import save_file

        if state.is_world_process_zero:
            old = dict(self.pi_old.named_parameters())
            weights = {name: old[name].detach().contiguous() for name in self.trained}
            save_file(weights, str(Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.FILE))


class LogLines(TrainerCallback):
    """The Trainer's log lines (what transformers' ``PrinterCallback`` prints) as INFO records of this module's
    logger, on the main process: floats to 4 significant digits, ``total_flos`` left out."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            logger.info(
                "%s", {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in logs.items() if k != "total_flos"}
            )


class ProgressBars(ProgressCallback):
    """transformers' progress bars (on stderr) without the log lines they write to stdout (:class:`LogLines` logs
    them)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return


def log_instead_of_printing(trainer: Any) -> None:
    """Make ``trainer`` log its log lines (:class:`LogLines`) instead of printing them to stdout, keeping its progress
    bars, so that an application decides what it shows (the command line shows the same lines)."""
    trainer.pop_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ProgressBars)
    trainer.add_callback(LogLines)
