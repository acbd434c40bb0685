"""The library logs and never prints: nothing outside ``targetsft.cli`` calls ``print``, a training run writes nothing
to stdout on its own, and the command line shows the library's lines (``--quiet`` hides them)."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "targetsft"


def test_no_print_outside_the_command_line():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if "cli" in path.relative_to(SRC).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not found, f"print() in library modules (log with logging.getLogger(__name__) instead): {found}"


@pytest.fixture
def library_only():
    """The ``targetsft`` logger without the command line's console handler (an earlier ``main()`` call in this
    process adds one), restored afterwards: what the library itself does."""
    from targetsft.cli.logs import ConsoleHandler

    logger = logging.getLogger("targetsft")
    saved, level = list(logger.handlers), logger.level
    for handler in saved:
        if isinstance(handler, ConsoleHandler):
            logger.removeHandler(handler)
    yield
    logger.handlers[:] = saved
    logger.setLevel(level)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_tokenizer, tiny_llama):
    from conftest import save_model, tiny_model

    root = tmp_path_factory.mktemp("logging")
    teacher = tiny_model("llama", len(tiny_tokenizer), seed=5, tie_word_embeddings=True)
    return save_model(root / "student", tiny_llama, tiny_tokenizer), save_model(
        root / "teacher", teacher, tiny_tokenizer
    )


def test_train_writes_nothing_to_stdout_and_logs_its_lines(folders, tmp_path, capfd, caplog, library_only):
    """``train()`` with a teacher: stdout (the process's, so a child's print would count too) stays empty; the run's
    lines (precision, data, the Trainer's log lines) are log records of ``targetsft``."""
    from conftest import two_step_config
    from targetsft.training.recipe import train

    student, teacher = folders
    capfd.readouterr()
    caplog.set_level(logging.INFO, logger="targetsft")
    train(two_step_config(student, tmp_path / "run", f"teacher.model={teacher}", "loss.params.eta=0.5"))
    assert capfd.readouterr().out == ""
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("targetsft")]
    assert any(m.startswith("precision: fp32") for m in messages)
    assert any(m.startswith("training data:") for m in messages)
    assert sum("'loss':" in m for m in messages) == 2  # one Trainer log line per step


def test_target_sft_trainer_writes_nothing_to_stdout_of_its_own(folders, tiny_tokenizer, tmp_path, capfd, library_only):
    """``TargetSFTTrainer.train()`` with transformers' own printing callbacks removed: nothing else reaches stdout."""
    import transformers
    import trl
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from conftest import SUM_ROWS
    from targetsft.training.trl_trainer import TargetSFTTrainer

    student, teacher = folders
    capfd.readouterr()
    trainer = TargetSFTTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(student),
        args=trl.SFTConfig(str(tmp_path), report_to=[], use_cpu=True, bf16=False, max_length=None, max_steps=2),
        train_dataset=Dataset.from_list(SUM_ROWS),
        processing_class=tiny_tokenizer,
        method="target_sft",
        teacher_model=str(teacher),
    )
    trainer.pop_callback(PrinterCallback), trainer.pop_callback(ProgressCallback)
    trainer.train()
    assert capfd.readouterr().out == ""


def test_the_command_line_shows_the_library_lines_unless_quiet(folders, tmp_path, capsys, library_only):
    from targetsft.cli.main import main

    student, _ = folders
    common = [f"model={student}", "data.size=4", "train.max_steps=1", "train.logging_steps=1"]
    common += ["train.report_to=[]", "precision=fp32"]
    assert main(["train", *common, f"output_dir={tmp_path / 'a'}"]) == 0
    shown = capsys.readouterr().out
    assert "precision: fp32" in shown and "training data:" in shown and "'loss':" in shown
    assert main(["--quiet", "train", *common, f"output_dir={tmp_path / 'b'}"]) == 0
    quiet = capsys.readouterr().out
    assert "precision:" not in quiet and "'loss':" not in quiet
