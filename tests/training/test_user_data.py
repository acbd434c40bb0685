"""A user's own model and data: nothing cut silently, eval_loss on held-out records, the model loading keys reach
``from_pretrained``, ``TargetLoss`` places and checks its teacher, and the quickstart leaves only its final models."""

from __future__ import annotations

import copy
import csv
import json
import logging
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from targetsft.training.config import ConfigError, ModelInit, load_config  # noqa: E402
from targetsft.training.models import load_frozen  # noqa: E402
from targetsft.training.recipe import train  # noqa: E402


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer, tiny_llama):
    root = tmp_path_factory.mktemp("user_models")
    student, teacher = root / "student", root / "teacher"
    tiny_llama.save_pretrained(student)
    tiny_tokenizer.save_pretrained(student)
    torch.manual_seed(7)
    transformers.LlamaForCausalLM(copy.deepcopy(tiny_llama.config)).save_pretrained(teacher)
    tiny_tokenizer.save_pretrained(teacher)
    return student, teacher


def _records(n: int, offset: int = 0) -> list[dict]:
    return [
        {"prompt": f"What is {i} + {i % 7}?", "completion": f"{i} + {i % 7} = {i + i % 7}\n#### {i + i % 7}"}
        for i in range(offset, offset + n)
    ]


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _overrides(model_dirs, out, data, *extra):
    return [
        f"model={model_dirs[0]}",
        f"output_dir={out}",
        f"data.train={data}",
        "train.per_device_train_batch_size=8",
        "train.learning_rate=1e-3",
        "train.warmup_steps=0",
        "train.logging_steps=1",
        "train.report_to=[]",
        "train.disable_tqdm=true",
        "precision=fp32",
        *extra,
    ]


def _rows(out: Path) -> list[dict]:
    with (out / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_a_users_file_is_used_whole_and_the_step_cap_is_printed(model_dirs, tmp_path, caplog):
    """1,500 records with data.size unset: all 1,500 are tokenized and counted; 2 steps see 16 of them, and the
    run says so (in its log and in summary.json) with the key that changes it."""
    caplog.set_level(logging.INFO, logger="targetsft")
    data = _jsonl(tmp_path / "mine.jsonl", _records(1500))
    summary = train(load_config(None, _overrides(model_dirs, tmp_path / "out", data, "train.max_steps=2")))
    assert summary["data"]["records"] == summary["data"]["kept"] == summary["data"]["available"] == 1500
    printed = caplog.text
    assert "covers 16 of 1500 training examples" in printed and "num_train_epochs" in printed
    assert any("16 of 1500" in note for note in summary["data_notes"])


def test_data_size_of_a_file_is_reported_and_epochs_are_not_capped(model_dirs, tmp_path):
    data = _jsonl(tmp_path / "mine.jsonl", _records(40))
    cfg = load_config(None, _overrides(model_dirs, tmp_path / "out", data, "data.size=16", "train.num_train_epochs=1"))
    assert "max_steps" not in cfg.training_arguments()  # no default step cap over the epochs asked for
    summary = train(cfg)
    assert summary["data"]["kept"] == 16
    assert summary["steps"] == 2  # one epoch of 16 at batch 8
    assert summary["data_notes"] == ["data.size 16: training on the first 16 of 40 records (data.size: null keeps all)"]


@pytest.mark.parametrize("held_out", ["fraction", "file"])
def test_data_eval_gives_eval_loss_and_target_statistics(held_out, model_dirs, tmp_path):
    data = _jsonl(tmp_path / "train.jsonl", _records(40))
    spec = "0.25" if held_out == "fraction" else str(_jsonl(tmp_path / "eval.jsonl", _records(6, offset=500)))
    extra = ("train.max_steps=4", f"data.eval={spec}", "train.eval_steps=2", "loss.method=dft")
    summary = train(load_config(None, _overrides(model_dirs, tmp_path / "out", data, *extra)))
    assert summary["data"]["kept"] == (30 if held_out == "fraction" else 40)
    assert summary["eval_data"]["kept"] == (10 if held_out == "fraction" else 6)
    evals = [r for r in _rows(tmp_path / "out") if r.get("eval_loss")]
    assert [int(r["step"]) for r in evals] == [2, 4]
    for row in evals:
        assert float(row["eval_loss"]) > 0
        assert 0 < float(row["eval_gamma"]) < 1  # DFT's γ = p(y) on the held-out tokens
    assert summary["metrics"]["eval_loss"] == pytest.approx(float(evals[-1]["eval_loss"]))


def test_a_fractional_split_is_disjoint_and_deterministic(model_dirs, tmp_path):
    from targetsft.training.dataset import split_records

    data = _jsonl(tmp_path / "train.jsonl", _records(50))
    cfg = load_config(None, _overrides(model_dirs, tmp_path / "out", data, "data.eval=0.2"))
    train_a, eval_a, _ = split_records(cfg)
    train_b, eval_b, _ = split_records(cfg)
    assert (train_a, eval_a) == (train_b, eval_b) and len(eval_a) == 10 and len(train_a) == 40
    assert not {r["prompt"] for r in train_a} & {r["prompt"] for r in eval_a}


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.eval=1.5", "fraction in \\(0, 1\\)"),
        ("data.size=0", "positive integer or null"),
        ("teacher.dtype=int8", "teacher.dtype must be one of"),
        ("model_init.device_map=cpu", "the Trainer places the student"),
    ],
)
def test_bad_user_settings_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_eval_with_a_teacher_cache_is_refused():
    with pytest.raises(ConfigError, match="the cache holds the training examples only"):
        load_config(None, ["loss.method=kd", "teacher.cache=somewhere", "data.eval=0.1"])


def test_loading_keys_reach_the_loaded_model(model_dirs, tiny_tokenizer, monkeypatch):
    """dtype, attn_implementation and device_map go to from_pretrained (the loaded model shows the first two; the
    call records the third, and the Trainer then leaves the model where it was put); ``auto`` is the training
    precision's dtype for a frozen model."""
    from targetsft.training.fused_forward import KEEP_DEVICE, place_frozen

    calls = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: calls.append(k) or real(*a, **k)
    )
    fp32 = torch.float32
    init = ModelInit(dtype="bfloat16", attn_implementation="eager", device_map="cpu")
    teacher = load_frozen(str(model_dirs[1]), init, fp32, tiny_tokenizer, "teacher")
    assert calls[-1] == {"dtype": torch.bfloat16, "attn_implementation": "eager", "device_map": "cpu"}
    assert next(teacher.parameters()).dtype == torch.bfloat16
    assert teacher.config._attn_implementation == "eager"
    assert getattr(teacher, KEEP_DEVICE) and place_frozen(teacher, "meta") is teacher
    assert next(teacher.parameters()).device.type == "cpu"  # not sent to the student's device
    plain = load_frozen(str(model_dirs[1]), ModelInit(), fp32, tiny_tokenizer, "teacher")
    assert next(plain.parameters()).dtype == torch.float32 and calls[-1] == {"dtype": torch.float32}
    assert not hasattr(plain, KEEP_DEVICE)


def test_auto_dtype_follows_the_precision_rule(model_dirs, tmp_path, monkeypatch, capability):
    """On a CPU that runs bf16 natively (forced), `precision: auto` trains in bf16 autocast and `dtype: auto` loads
    the teacher in bf16 and the student in float32; on one without, both float32."""
    calls = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: calls.append(k["dtype"]) or real(*a, **k)
    )
    data = _jsonl(tmp_path / "train.jsonl", _records(8))
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        capability(cpu_bf16=native)
        calls.clear()
        extra = ("train.max_steps=1", "loss.method=kd", f"teacher.model={model_dirs[1]}", "precision=auto")
        overrides = [
            o for o in _overrides(model_dirs, tmp_path / f"out{native}", data, *extra) if o != "precision=fp32"
        ]
        train(load_config(None, overrides))
        assert calls == [torch.float32, expected]  # student, then teacher


def test_a_bf16_teacher_on_its_own_device_map_trains_a_float32_student(model_dirs, tmp_path):
    """teacher.dtype / attn_implementation / device_map in a config, end to end: the run finishes and records them."""
    data = _jsonl(tmp_path / "train.jsonl", _records(16))
    extra = (
        "train.max_steps=2",
        "loss.method=kd",
        f"teacher.model={model_dirs[1]}",
        "teacher.dtype=bfloat16",
        "teacher.attn_implementation=eager",
        "teacher.device_map=cpu",
        "model_init.attn_implementation=eager",
    )
    summary = train(load_config(None, _overrides(model_dirs, tmp_path / "out", data, *extra)))
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in _rows(tmp_path / "out"))
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["teacher"]["dtype"] == "bfloat16" and saved["teacher"]["device_map"] == "cpu"
    student = transformers.AutoModelForCausalLM.from_pretrained(summary["final_model"])
    assert next(student.parameters()).dtype == torch.float32


def test_keep_checkpoints_false_leaves_only_the_final_model(model_dirs, tmp_path):
    data = _jsonl(tmp_path / "train.jsonl", _records(16))
    out = tmp_path / "out"
    train(
        load_config(None, _overrides(model_dirs, out, data, "train.max_steps=2", "train.save_steps=1")),
        keep_checkpoints=False,
    )
    assert not list(out.glob("checkpoint-*"))
    assert (out / "final" / "model.safetensors").is_file()


class _Recorder:
    """Wraps ``nn.Module.to`` of one model to record where it was sent."""

    def __init__(self, model):
        self.calls, self._to = [], model.to
        model.to = self

    def __call__(self, *args, **kwargs):
        self.calls.append(args)
        return self._to(*args, **kwargs)


def test_target_loss_places_the_teacher_and_checks_it(tiny_llama, tiny_tokenizer, tmp_path):
    import targetsft

    student = copy.deepcopy(tiny_llama)
    teacher = copy.deepcopy(tiny_llama)
    recorder = _Recorder(teacher)
    targetsft.TargetLoss("kd", teacher=teacher).bind(student, tiny_tokenizer, tiny_tokenizer)
    assert recorder.calls == [(torch.device("cpu"),)]  # sent to the student's device
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    mapped = copy.deepcopy(tiny_llama)
    mapped.hf_device_map = {"model.embed_tokens": "cpu", "lm_head": "cpu"}
    recorder = _Recorder(mapped)
    targetsft.TargetLoss("kd", teacher=mapped).bind(student)
    assert recorder.calls == []  # a model spread by a device_map stays where it is
    config = copy.deepcopy(tiny_llama.config)
    config.vocab_size += 8
    bigger = transformers.LlamaForCausalLM(config)
    with pytest.raises(ValueError, match="give both tokenizers"):  # 8 more rows: padding only the tokenizers can tell
        targetsft.TargetLoss("kd", teacher=bigger).bind(student)
    padded = targetsft.TargetLoss("kd", teacher=bigger).bind(student, tiny_tokenizer, tiny_tokenizer)
    assert padded.shared_vocab_size == len(tiny_tokenizer) and "embedding rows 608" in padded.alignments[0].note("t")
    swapped = copy.deepcopy(tiny_tokenizer)
    swapped.add_tokens(["<|extra|>"])
    with pytest.raises(ValueError, match="601 ids but its lm_head 600 rows"):
        targetsft.TargetLoss("kd", teacher=teacher).bind(student, tiny_tokenizer, swapped)
    saved = tmp_path / "teacher"
    teacher.save_pretrained(saved)
    swapped.save_pretrained(saved)  # the teacher's own folder holds the other tokenizer: found by its name_or_path
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(saved)
    with pytest.raises(ValueError, match="601 ids but its lm_head 600 rows"):
        targetsft.TargetLoss("kd", teacher=reloaded).bind(student, tiny_tokenizer)


def test_target_loss_gives_the_teacher_its_inputs_on_its_device(tiny_llama, monkeypatch):
    """The batch goes to the teacher's input device and its logits come back to the student's (checked on CPU by
    recording the devices the inputs were moved to)."""
    import targetsft
    from targetsft.training import loss_func

    student, teacher = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    loss_fn = targetsft.TargetLoss("kd", teacher=teacher).bind(student)
    seen = []
    monkeypatch.setattr(loss_func, "input_device", lambda m: seen.append(m) or torch.device("cpu"))
    ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 6))
    out = student(input_ids=ids)
    labels = ids.clone()
    labels[:, :2] = -100
    loss = loss_fn(out, labels)
    assert seen == [teacher] and torch.isfinite(loss)


def test_quickstart_keeps_only_its_final_models(model_dirs, tmp_path, monkeypatch):
    """The main job, shrunk to 2 steps on the tiny model: both fine-tunes leave final/ and no checkpoint (no optimizer
    state), and its results are written."""
    from targetsft.cli.quickstart import run_quickstart
    from targetsft.runtime import models

    monkeypatch.setattr(models, "resolve_model", lambda name=None: str(model_dirs[0]))
    result = run_quickstart(str(tmp_path / "qs"), steps=2, probe_size=2)
    for method in ("sft", "target_sft"):
        folder = tmp_path / "qs" / method
        assert (folder / "final" / "model.safetensors").is_file()
        assert not list(folder.glob("checkpoint-*")) and not list(folder.rglob("optimizer.pt"))
    assert (tmp_path / "qs" / "results.md").is_file() and len(result["rows"]) == 3
    training = {r["model"]: r.get("training") for r in result["rows"]}  # the means over the logged steps
    assert training["base"] is None
    assert (training["sft"]["gamma"], training["sft"]["q_label"]) == (1.0, 1.0) and 0 < training["sft"]["p_label"] < 1
    ts = training["target_sft"]
    assert 0 < ts["gamma"] < 1 and ts["gamma"] <= ts["q_label"] <= 1  # Q(y) = γ + (1 − γ)·π̃(y)


def test_snapshot_steps_keep_the_model_of_those_steps(model_dirs, tmp_path):
    """snapshot_steps: [1, 2]: snapshots/step-N hold the weights of the checkpoint of that step, without optimizer
    state, and stay when the checkpoints go."""
    data = _jsonl(tmp_path / "train.jsonl", _records(16))
    out = tmp_path / "out"
    extra = ("train.max_steps=3", "train.save_steps=2", "snapshot_steps=[1, 2]")
    train(load_config(None, _overrides(model_dirs, out, data, *extra)), keep_checkpoints=False)
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step-1", "step-2"]
    assert not list((out / "snapshots").rglob("optimizer.pt"))
    assert (out / "snapshots" / "step-2" / "tokenizer.json").is_file()
    with pytest.raises(ConfigError, match="snapshot_steps must be a list of positive step numbers"):
        load_config(None, ["snapshot_steps=[0]"])


def test_a_snapshot_equals_the_checkpoint_of_its_step(model_dirs, tmp_path):
    from safetensors.torch import load_file

    data = _jsonl(tmp_path / "train.jsonl", _records(16))
    out = tmp_path / "out"
    train(
        load_config(
            None,
            _overrides(
                model_dirs,
                out,
                data,
                "train.max_steps=3",
                "train.save_steps=2",
                "train.save_total_limit=3",
                "snapshot_steps=[2]",
            ),
        )
    )
    snap = load_file(out / "snapshots" / "step-2" / "model.safetensors")
    ckpt = load_file(out / "checkpoint-2" / "model.safetensors")
    assert snap.keys() == ckpt.keys() and all(torch.equal(snap[k], ckpt[k]) for k in snap)
