"""The model card (``final/README.md``) of a ``target-sft train`` run: the target, the data, the teacher, the
precision, the final metrics and the whole configuration."""

from __future__ import annotations

import json
from typing import Any

from targetsft.losses.methods import get_method
from targetsft.training.config import TrainConfig


def model_card(
    cfg: TrainConfig,
    counts: dict[str, int],
    metrics: dict[str, Any],
    env: dict[str, Any],
    notes: list[str],
    alignment: dict[str, Any] | None = None,
    teachers: dict[str, dict[str, Any]] | None = None,
) -> str:
    """The card's markdown for a run of ``cfg`` on examples ``counts``, ending at ``metrics``, in environment
    ``env``, with the ``notes`` on where its data was cut and, for a teacher read through the text, its
    ``alignment`` (the shares of :meth:`~targetsft.training.text_alignment.TextAligner.summary`); for routed
    teachers, ``teachers`` (:meth:`~targetsft.training.routed_teacher.RoutedTeacher.summary`)."""
    spec = get_method(cfg.loss.method)
    params = {**spec.defaults, **cfg.loss.params}
    lines = [
        "---",
        "library_name: transformers",
        "tags: [targetsft, " + cfg.loss.method + "]",
        "---",
        f"# Fine-tuned with targetsft: `{cfg.loss.method}`",
        "",
        f"Target: γ = {spec.gamma}; π̃ = {spec.residual} ({spec.reference}).",
        f"Parameters: {json.dumps(params)}",
        f"Base model: {cfg.model or 'SmolLM2-135M-Instruct (embedded default)'}",
        f"Training data: {cfg.data.train} (size {cfg.data.size or 'all'}, seed {cfg.data.seed}, "
        f"max_length {cfg.data.max_length}); "
        f"examples kept {counts.get('kept')}, truncated {counts.get('truncated')}, dropped {counts.get('dropped')}"
        + (f"; held out for eval_loss: {cfg.data.eval}." if cfg.data.eval is not None else "."),
        *(f"Note: {note}." for note in notes),
        _routed_line(cfg, teachers) if cfg.teachers else f"Teacher: {_teacher_name(cfg)} ({_prompt(cfg)}).",
        *(
            [
                f"Teacher alignment: by text; {alignment['aligned_positions']:.1%} of the supervised positions "
                f"aligned, {_mass(alignment)} there on student tokens."
            ]
            if alignment
            else []
        ),
        f"LoRA: {json.dumps(cfg.lora.__dict__) if cfg.lora else 'no (full fine-tuning)'}",
        f"Precision: {env['precision']} (asked: {env['requested_precision']}) on {env['device']}; "
        f"CPU capability {env['cpu_capability']}, native CPU bf16: {env['cpu_native_bf16']}.",
        "",
        "## Final training metrics",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in metrics.items()]
    lines += ["", "## Configuration", "", "```json", json.dumps(cfg.to_dict(), indent=2, default=str), "```", ""]
    return "\n".join(lines)


def _prompt(cfg: Any) -> str:
    return f"prompt: {cfg.teacher.prompt}"


def _routed_line(cfg: Any, teachers: dict[str, dict[str, Any]] | None) -> str:
    """One line on the routed teachers: each one's selector and source, and the examples and loss rows routed to
    it (and to none)."""
    stats = teachers or {}
    parts = []
    for entry in cfg.teachers:
        source = f"cache {entry.cache}" if entry.cache else f"served at {entry.server.url}"
        counted = stats.get(entry.name, {})
        parts.append(
            f"{entry.name} ({source}; select {json.dumps(entry.select)}): {counted.get('examples', '?')} examples, "
            f"{counted.get('loss_rows', '?')} loss rows"
        )
    none = stats.get("none", {})
    parts.append(f"none: {none.get('examples', '?')} examples, {none.get('loss_rows', '?')} loss rows")
    return f"Teachers, routed per example ({_prompt(cfg)}): " + "; ".join(parts) + "."


def _mass(alignment: dict[str, Any]) -> str:
    """The teacher's mass on student tokens as the alignment counted it: over its whole vocabulary, or (a served
    teacher) over the top-k it served."""
    if "aligned_mass" in alignment:
        return f"{alignment['aligned_mass']:.1%} of the teacher's mass"
    return f"{alignment['aligned_mass_topk']:.1%} of the teacher's mass (counted over its served top-k)"


def _teacher_name(cfg: Any) -> str:
    """The teacher as the config names it: a model, a cache folder or a server's model and address."""
    server = cfg.teacher.server
    if server is not None:
        return f"{server.model or 'the model'} served at {server.url}"
    return cfg.teacher.model or cfg.teacher.cache or "—"
